//! Serialisers: how a call's arguments, its reply and events become frame
//! payloads. The frames stay those of the wire module; only the payload's
//! bytes differ.
//!
//! | codec | carries | compatible with | cost |
//! |---|---|---|---|
//! | [`OctetsCodec`] (default) | a list of byte strings ([`Octets`]) | Perl's `pack "(w/a*)*"` | a length prefix per string; decoding slices the received buffer |
//! | [`Json`] | any `serde` value; a call's arguments as a JSON array | Perl's `JSON::encode_json \@_` | text encode and parse |
//! | [`Rkyv`] | any `rkyv` value; the receiver reads it in place | forkrpc only | encode; receive is validation (or nothing, unchecked) |
//!
//! A [`Codec<T>`] freezes a `T` into a payload and thaws a payload into
//! its [`Codec::Thawed`] form: `T` itself, or for rkyv a zero-copy view.
//! Any type implementing it works end to end: typed handles in the parent
//! ([`Rpc::typed`](crate::Rpc::typed), [`Pool::typed`](crate::Pool::typed))
//! and typed handlers in the child
//! ([`Builder::sync_with`](crate::Builder::sync_with),
//! [`Builder::async_fn_with`](crate::Builder::async_fn_with)).
//!
//! # rkyv and alignment
//!
//! An rkyv archive must be read from memory aligned for its types (16
//! bytes covers all of them), but frames arrive back to back in a byte
//! stream, behind 4- or 8-byte headers. The rkyv payload is therefore laid
//! out so that, in a receive buffer whose frames start 16-aligned, the
//! archive does too, and so does the next frame:
//!
//! ```text
//! | header (4 or 8) | archive length u32 LE, zeros up to 16 | archive | zeros up to a multiple of 16 |
//! ```
//!
//! The receive buffers of the engine and of the workers start 16-aligned
//! and hand out frames in order, so a stream of rkyv frames stays aligned
//! and each archive is read in place, no copy. A frame of another kind in
//! between (an event, an error note) can shift the stream; a payload that
//! is not 16-aligned is then copied once into an aligned buffer before it
//! is read. Either way the archive is validated (bytecheck) before any
//! access, so a corrupt or hostile frame is an error for that call, never
//! undefined behaviour. [`Rkyv::unchecked`] skips validation (alignment is
//! still ensured): use it only between processes that trust each other.

mod codec;
use crate::error::Result;
use crate::wire::Octets;
use bytes::{BufMut, Bytes, BytesMut};
use codec::codec_error;
pub use codec::Codec;

/// The default serialiser: a list of byte strings, Perl's `pack
/// "(w/a*)*"`. Thawing slices the payload (no copy).
#[derive(Debug, Clone, Copy, Default)]
pub struct OctetsCodec;

impl Codec<Octets> for OctetsCodec {
    type Thawed = Octets;
    fn freeze(&self, value: &Octets, out: &mut BytesMut, _offset: usize) -> Result<()> {
        out.reserve(value.encoded_len() as usize);
        value.encode(out);
        Ok(())
    }
    fn thaw(&self, payload: Bytes, _offset: usize) -> Result<Octets> {
        Octets::decode(payload).map_err(|e| codec_error("malformed octets", e))
    }
}

/// JSON, as Perl's `JSON_SERIALISER`: the payload is `encode_json \@_`,
/// the call's arguments as a JSON array. Use a tuple or a `Vec` for the
/// arguments (they serialise as arrays); any owned `serde` type works
/// (`Serialize + DeserializeOwned`: a codec goes both ways).
///
/// ```
/// use forkrpc::serial::{Codec, Json};
/// let mut out = bytes::BytesMut::new();
/// let args = ("rmdir".to_owned(), "/tmp/x".to_owned(), 3);
/// Json.freeze(&args, &mut out, 4).unwrap();
/// assert_eq!(&out[..], br#"["rmdir","/tmp/x",3]"#);
/// let back: (String, String, u32) = Json.thaw(out.freeze(), 4).unwrap();
/// assert_eq!(back, ("rmdir".into(), "/tmp/x".into(), 3));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T> Codec<T> for Json
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    type Thawed = T;
    fn freeze(&self, value: &T, out: &mut BytesMut, _offset: usize) -> Result<()> {
        serde_json::to_writer(out.writer(), value).map_err(|e| codec_error("JSON encode", e))
    }
    fn thaw(&self, payload: Bytes, _offset: usize) -> Result<T> {
        serde_json::from_slice(&payload).map_err(|e| codec_error("JSON decode", e))
    }
}

mod rkyv_codec;
pub use rkyv_codec::{Archived, PayloadWriter, Rkyv};
