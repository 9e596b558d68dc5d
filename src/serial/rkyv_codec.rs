//! The rkyv codec: aligned payloads, archives read in place (see the
//! parent module's docs for the layout and why).

use super::codec::{codec_error, Codec};
use crate::error::Result;
use bytes::{BufMut, Bytes, BytesMut};
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::{Arena, ArenaHandle};
use rkyv::ser::{Positional, Writer};
use rkyv::util::AlignedVec;
use rkyv::Portable;
use std::marker::PhantomData;

/// Alignment of archives (enough for every rkyv type).
const ALIGN: usize = 16;

/// rkyv: typed values, read in place on receive. Validation (bytecheck) is
/// on unless [`Rkyv::unchecked`] is used.
///
/// ```
/// use forkrpc::serial::{Codec, Rkyv};
///
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
/// struct Job { id: u32, path: String }
///
/// let mut out = bytes::BytesMut::new();
/// Rkyv::checked().freeze(&Job { id: 7, path: "/tmp".into() }, &mut out, 8).unwrap();
/// let job = <Rkyv as Codec<Job>>::thaw(&Rkyv::checked(), out.freeze(), 8).unwrap();
/// assert_eq!(job.id, 7);
/// assert_eq!(job.path.as_str(), "/tmp");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Rkyv {
    checked: bool,
}

impl Default for Rkyv {
    fn default() -> Self {
        Rkyv::checked()
    }
}

impl Rkyv {
    /// Validates every archive before it is read (the default).
    pub fn checked() -> Self {
        Rkyv { checked: true }
    }

    /// Reads archives without validation. Only for peers that trust each
    /// other: a corrupt archive is then undefined behaviour.
    ///
    /// # Safety
    /// Every payload thawed with this codec must be an archive made by
    /// [`Codec::freeze`] of the same type (by this process or a worker
    /// forked from the same program), unaltered.
    pub unsafe fn unchecked() -> Self {
        Rkyv { checked: false }
    }
}

/// The lead padding in front of the archive: up to the next multiple of
/// 16 after the header, and at least 4 bytes for the archive's length.
fn lead(offset: usize) -> usize {
    let l = (ALIGN - offset % ALIGN) % ALIGN;
    if l < 4 {
        l + ALIGN
    } else {
        l
    }
}

thread_local! {
    /// rkyv's scratch space for `freeze`, reused from call to call.
    static SCRATCH: std::cell::RefCell<Arena> = std::cell::RefCell::new(Arena::new());
    /// Size of the last archive this thread froze: the room reserved for
    /// the next (up to [`HINT_MAX`]), so that a run of like calls grows no
    /// buffer while writing.
    static LAST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Room reserved up front at most; a bigger archive grows its buffer by
/// doubling as rkyv writes it.
const HINT_MAX: usize = 64 * 1024;

/// Where [`Rkyv`] serialises: straight into the payload being built,
/// positions counted from the archive's start (which the lead padding puts
/// on a 16-byte boundary in the receiver's buffer), so the archive is
/// written once, not serialised elsewhere and copied.
pub struct PayloadWriter<'o> {
    out: &'o mut BytesMut,
    start: usize,
}

impl Positional for PayloadWriter<'_> {
    fn pos(&self) -> usize {
        self.out.len() - self.start
    }
}

impl<E> Writer<E> for PayloadWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::result::Result<(), E> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }
}

impl<T> Codec<T> for Rkyv
where
    T: for<'a, 'o> rkyv::Serialize<
            HighSerializer<PayloadWriter<'o>, ArenaHandle<'a>, rancor::Error>,
        > + rkyv::Archive
        + 'static,
    T::Archived: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>> + 'static,
{
    type Thawed = Archived<T>;

    fn freeze(&self, value: &T, out: &mut BytesMut, offset: usize) -> Result<()> {
        // `[length, zeros][archive][zeros]` for an archive behind an
        // `offset`-byte header (see the module docs); the length is filled
        // in once the archive is written.
        let lead = lead(offset);
        let at = out.len();
        out.reserve(lead + LAST.get().min(HINT_MAX) + ALIGN);
        out.put_u32_le(0);
        out.put_bytes(0, lead - 4);
        let start = out.len();
        let writer = PayloadWriter { out, start };
        let done = SCRATCH.with_borrow_mut(|arena| {
            rkyv::api::high::to_bytes_in_with_alloc::<_, _, rancor::Error>(
                value,
                writer,
                arena.acquire(),
            )
        });
        if let Err(e) = done {
            out.truncate(at);
            return Err(codec_error("rkyv encode", e));
        }
        let archive = out.len() - start;
        let Ok(len) = u32::try_from(archive) else {
            out.truncate(at);
            return Err(codec_error("rkyv encode", "archive over 4 GiB"));
        };
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        LAST.set(archive);
        let end = offset + lead + archive;
        out.put_bytes(0, (ALIGN - end % ALIGN) % ALIGN);
        Ok(())
    }

    fn thaw(&self, payload: Bytes, offset: usize) -> Result<Archived<T>> {
        let lead = lead(offset);
        if payload.len() < lead {
            return Err(codec_error(
                "rkyv decode",
                "payload shorter than its header",
            ));
        }
        let len = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
        let end = lead
            .checked_add(len)
            .filter(|&e| e <= payload.len())
            .ok_or_else(|| codec_error("rkyv decode", "archive length past the payload"))?;
        let archive = payload.slice(lead..end);
        let store = if archive.as_ptr() as usize % ALIGN == 0 {
            Store::InPlace(archive)
        } else {
            // The stream shifted (another frame kind in between): one
            // copy into an aligned buffer.
            let mut v = AlignedVec::<ALIGN>::with_capacity(archive.len());
            v.extend_from_slice(&archive);
            Store::Copied(v)
        };
        if self.checked {
            rkyv::access::<T::Archived, rancor::Error>(store.bytes())
                .map_err(|e| codec_error("rkyv validation", e))?;
        }
        Ok(Archived {
            store,
            _t: PhantomData,
        })
    }
}

enum Store {
    /// A 16-aligned slice of the receive buffer.
    InPlace(Bytes),
    Copied(AlignedVec<ALIGN>),
}

impl Store {
    fn bytes(&self) -> &[u8] {
        match self {
            Store::InPlace(b) => b,
            Store::Copied(v) => v,
        }
    }
}

/// A received rkyv value, read in place: derefs to `T`'s archived form.
/// Built only by [`Rkyv`]'s `thaw`, after checking alignment and (unless
/// unchecked) validating the archive.
pub struct Archived<T: rkyv::Archive> {
    store: Store,
    _t: PhantomData<fn() -> T>,
}

impl<T: rkyv::Archive> Archived<T> {
    /// True if the archive is read straight from the receive buffer (no
    /// copy was needed to align it).
    pub fn in_place(&self) -> bool {
        matches!(self.store, Store::InPlace(_))
    }

    /// The archive's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.store.bytes()
    }
}

impl<T> Archived<T>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    /// A `T` built from the archive (a full deserialisation).
    pub fn deserialize(&self) -> Result<T> {
        rkyv::deserialize::<T, rancor::Error>(&**self).map_err(|e| codec_error("rkyv", e))
    }
}

impl<T: rkyv::Archive> std::ops::Deref for Archived<T>
where
    T::Archived: Portable,
{
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        // SAFETY: `store` is 16-aligned (checked, or copied into an
        // AlignedVec<16>) and holds exactly the archive `freeze` wrote for
        // a `T`: `thaw` validated it with bytecheck, or the codec was made
        // with the unsafe `Rkyv::unchecked`, whose caller vouched for it.
        // The bytes are immutable for as long as `self` lives.
        unsafe { rkyv::access_unchecked::<T::Archived>(self.store.bytes()) }
    }
}

impl<T: rkyv::Archive> std::fmt::Debug for Archived<T>
where
    T::Archived: std::fmt::Debug + Portable,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
    struct Req {
        id: u64,
        name: String,
        data: Vec<u32>,
    }

    fn req() -> Req {
        Req {
            id: 42,
            name: "forty-two".into(),
            data: vec![1, 2, 3],
        }
    }

    #[test]
    fn payload_keeps_the_stream_aligned() {
        for offset in [4, 8] {
            let mut out = BytesMut::new();
            Rkyv::checked().freeze(&req(), &mut out, offset).unwrap();
            assert_eq!((offset + out.len()) % ALIGN, 0, "next frame aligned");
            assert_eq!((offset + lead(offset)) % ALIGN, 0, "archive aligned");
        }
    }

    #[test]
    fn aligned_payloads_are_read_in_place_and_others_copied() {
        let mut out = BytesMut::new();
        Rkyv::checked().freeze(&req(), &mut out, 8).unwrap();
        // A buffer that puts the payload at offset 8 of a 16-aligned block.
        let mut buf = AlignedVec::<16>::new();
        buf.extend_from_slice(&[0u8; 8]);
        buf.extend_from_slice(&out);
        let all = Bytes::copy_from_slice(&buf);
        // `copy_from_slice` may not keep alignment: build from the vec.
        let all = if all.as_ptr() as usize % 16 == 0 {
            all
        } else {
            Bytes::from(buf.to_vec())
        };
        let aligned_payload = all.slice(8..);
        let r: Archived<Req> = Rkyv::checked().thaw(aligned_payload.clone(), 8).unwrap();
        if (aligned_payload.as_ptr() as usize + lead(8)) % 16 == 0 {
            assert!(r.in_place());
        }
        assert_eq!(r.id, 42);
        assert_eq!(r.name.as_str(), "forty-two");
        assert_eq!(r.deserialize().unwrap(), req());
        // Shift by one byte: the archive is copied to be read aligned.
        let mut shifted = BytesMut::new();
        shifted.put_u8(0);
        shifted.extend_from_slice(&out);
        let shifted = shifted.freeze().slice(1..);
        let r: Archived<Req> = Rkyv::checked().thaw(shifted, 8).unwrap();
        assert_eq!(r.deserialize().unwrap(), req());
    }

    #[test]
    fn corrupt_archives_are_errors() {
        let mut out = BytesMut::new();
        Rkyv::checked().freeze(&req(), &mut out, 8).unwrap();
        let mut bad = out.to_vec();
        // The root object sits at the end of the archive; overwrite its
        // string and vector fields so their relative pointers point far
        // outside the buffer.
        let len = u32::from_le_bytes(bad[..4].try_into().unwrap()) as usize;
        let end = lead(8) + len;
        for b in &mut bad[end - 16..end] {
            *b = 0xff;
        }
        let r: Result<Archived<Req>> = Rkyv::checked().thaw(Bytes::from(bad), 8);
        assert!(
            matches!(r, Err(crate::error::Error::Codec { .. })),
            "{:?}",
            r.err()
        );
        let short: Result<Archived<Req>> = Rkyv::checked().thaw(Bytes::from_static(b"\x01"), 8);
        assert!(short.is_err());
        let long: Result<Archived<Req>> =
            Rkyv::checked().thaw(Bytes::from_static(b"\xff\xff\0\0\0\0\0\0"), 8);
        assert!(long.is_err());
    }
}
