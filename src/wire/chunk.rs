//! Chunk requests and replies (see [`CHUNK_TAG`]): many calls in one frame,
//! for bulk `map`. Only the encoding lives here.
//!
//! Both are octets `[CHUNK_TAG, blob]`, so the frame stays an ordinary
//! `N/a*` request or reply:
//! - request blob: for each call, the BER length of its arguments'
//!   octets encoding, then that encoding;
//! - reply blob: for each call, one status byte, the BER length of a body,
//!   then the body: `r` the reply's octets encoding, `e` the handler's
//!   error message, `p` its panic message (the sync worker exits after the
//!   chunk's reply), `n` nothing (not run: an earlier call panicked).
//!
//! A chunk reply may come in parts: results of its first items in
//! [`CHUNK_PART_TAG`] events, the rest in the reply ([`ReplyWriter::take_part`]).
//!
//! Items are parsed straight out of the blob: each string is a slice of it.

use super::ber::{self, Varint};
use super::{Octets, WireError, CHUNK_PART_TAG, CHUNK_TAG};
use bytes::{BufMut, Bytes, BytesMut};

/// One call's outcome inside a chunk reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemResult {
    /// The handler's reply.
    Reply(Octets),
    /// The handler's error message.
    Error(String),
    /// The handler's panic message.
    Panic(String),
    /// Not run: an earlier call of the chunk panicked.
    NotRun,
}

/// True if `args` is a chunk request or reply.
#[inline]
pub fn is_chunk(args: &Octets) -> bool {
    args.len() == 2 && args[0][..] == *CHUNK_TAG.as_bytes()
}

/// The chunk request (or reply) whose items are `blob`.
pub(crate) fn tagged(blob: Bytes) -> Octets {
    Octets(vec![Bytes::from_static(CHUNK_TAG.as_bytes()), blob])
}

/// Builds a chunk request from argument lists.
///
/// ```
/// use forkrpc::{octets, wire::chunk};
/// let req = chunk::request([octets!["a"], octets!["b", "c"]].iter());
/// assert!(chunk::is_chunk(&req));
/// assert_eq!(chunk::items(&req).unwrap(), [octets!["a"], octets!["b", "c"]]);
/// ```
pub fn request<'a>(calls: impl Iterator<Item = &'a Octets> + Clone) -> Octets {
    request_sized(calls.map(|a| (a.encoded_len(), a)))
}

/// As [`request`], for argument lists whose encoded sizes are known
/// already (measured once, when each call was made).
pub fn request_sized<'a>(calls: impl Iterator<Item = (u64, &'a Octets)> + Clone) -> Octets {
    let total: u64 = calls
        .clone()
        .map(|(n, _)| ber::encoded_len(n) as u64 + n)
        .sum();
    let mut blob = BytesMut::with_capacity(total as usize);
    for (n, a) in calls {
        put_item(a, n, &mut blob);
    }
    tagged(blob.freeze())
}

/// Appends `args` (encoded size `n`) to a chunk request's blob as one item.
#[inline]
pub(crate) fn put_item(args: &Octets, n: u64, blob: &mut BytesMut) {
    ber::encode(n, blob);
    args.encode(blob);
}

/// Reads one BER length at `*pos` of `buf` and returns the range of the
/// `len` bytes after it (a chunk item's encoding, a result's payload),
/// moving `*pos` past them.
pub(crate) fn next_field(buf: &[u8], pos: &mut usize) -> Result<std::ops::Range<usize>, WireError> {
    let (len, used) = match ber::decode(&buf[*pos..]) {
        Varint::Value(n, used) => (n, used),
        Varint::Incomplete => return Err(WireError::Truncated),
        Varint::Overflow => return Err(WireError::VarintOverflow),
    };
    let start = *pos + used;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .filter(|&e| e <= buf.len())
        .ok_or(WireError::Truncated)?;
    *pos = end;
    Ok(start..end)
}

/// Where item `n` of a chunk blob (request or reply) starts.
pub(crate) fn item_offset(blob: &[u8], n: usize) -> Result<usize, WireError> {
    let mut pos = 0;
    for _ in 0..n {
        next_field(blob, &mut pos)?;
    }
    Ok(pos)
}

/// The argument lists of a chunk request (slices of its blob).
pub fn items(req: &Octets) -> Result<Vec<Octets>, WireError> {
    check(req)?;
    each_item(req).collect()
}

/// Checks that a chunk request is well formed, without decoding it;
/// returns how many calls it holds.
///
/// ```
/// use forkrpc::{octets, wire::chunk};
/// let req = chunk::request([octets!["a"], octets!["b", "c"]].iter());
/// assert_eq!(chunk::check(&req), Ok(2));
/// let cut = forkrpc::Octets::from(vec![req[0].clone(), req[1].slice(..4)]);
/// assert!(chunk::check(&cut).is_err());
/// // Not a chunk at all: an error too, not a panic.
/// assert_eq!(chunk::check(&octets!["a"]), Err(forkrpc::wire::WireError::NotChunk));
/// ```
pub fn check(req: &Octets) -> Result<usize, WireError> {
    let blob = blob(req)?;
    let (mut pos, mut n) = (0, 0);
    while pos < blob.len() {
        let r = next_field(blob, &mut pos)?;
        Octets::check(&blob[r])?;
        n += 1;
    }
    Ok(n)
}

/// The argument lists of a chunk request one at a time, as [`items`]
/// reads them (without collecting them first); it ends after an error.
pub fn each_item(req: &Octets) -> impl Iterator<Item = Result<Octets, WireError>> + '_ {
    static NONE: Bytes = Bytes::new();
    let (blob, mut err) = match blob(req) {
        Ok(b) => (b, None),
        Err(e) => (&NONE, Some(e)),
    };
    let mut pos = 0;
    std::iter::from_fn(move || {
        if let Some(e) = err.take() {
            return Some(Err(e));
        }
        if pos >= blob.len() {
            return None;
        }
        let item = next_field(blob, &mut pos).and_then(|r| Octets::decode_in(blob, r));
        if item.is_err() {
            pos = blob.len();
        }
        Some(item)
    })
}

/// The items of a chunk: its second string, once its tag is checked.
fn blob(req: &Octets) -> Result<&Bytes, WireError> {
    if !is_chunk(req) {
        return Err(WireError::NotChunk);
    }
    Ok(&req[1])
}

/// Writes a chunk reply, one call's outcome at a time.
pub struct ReplyWriter {
    blob: BytesMut,
}

impl ReplyWriter {
    /// An empty reply.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty reply with room for `bytes` of results.
    pub fn with_capacity(bytes: usize) -> Self {
        ReplyWriter {
            blob: BytesMut::with_capacity(bytes),
        }
    }

    /// Appends one outcome.
    pub fn push(&mut self, r: &ItemResult) {
        match r {
            ItemResult::Reply(o) => self.reply(o),
            ItemResult::Error(m) => self.error(m),
            ItemResult::Panic(m) => self.panic(m),
            ItemResult::NotRun => self.not_run(),
        }
    }

    /// Appends a reply ([`ItemResult::Reply`]).
    #[inline]
    pub fn reply(&mut self, o: &Octets) {
        self.blob.put_u8(b'r');
        ber::encode(o.encoded_len(), &mut self.blob);
        o.encode(&mut self.blob);
    }

    /// Appends a handler's error ([`ItemResult::Error`]).
    pub fn error(&mut self, m: &str) {
        self.text(b'e', m)
    }

    /// Appends a handler's panic ([`ItemResult::Panic`]).
    pub fn panic(&mut self, m: &str) {
        self.text(b'p', m)
    }

    /// Appends [`ItemResult::NotRun`].
    pub fn not_run(&mut self) {
        self.blob.put_u8(b'n');
        ber::encode(0, &mut self.blob);
    }

    fn text(&mut self, status: u8, m: &str) {
        self.blob.put_u8(status);
        ber::encode(m.len() as u64, &mut self.blob);
        self.blob.put_slice(m.as_bytes());
    }

    /// The outcomes pushed since the last part was taken, as a results
    /// blob.
    pub fn bytes(&self) -> &[u8] {
        &self.blob
    }

    /// True if no outcome was pushed since the last part was taken.
    pub fn is_empty(&self) -> bool {
        self.blob.is_empty()
    }

    /// The outcomes pushed so far as a part event
    /// (`[CHUNK_PART_TAG, results]`); the writer goes on with the rest.
    ///
    /// ```
    /// use forkrpc::{octets, wire::chunk::{self, ItemResult}};
    /// let mut w = chunk::ReplyWriter::new();
    /// w.push(&ItemResult::Reply(octets!["a"]));
    /// let part = w.take_part();
    /// w.push(&ItemResult::Reply(octets!["b"]));
    /// let reply = w.finish();
    /// assert_eq!(chunk::results(&part[1]).unwrap(), [ItemResult::Reply(octets!["a"])]);
    /// assert_eq!(chunk::results(&reply[1]).unwrap(), [ItemResult::Reply(octets!["b"])]);
    /// ```
    pub fn take_part(&mut self) -> Octets {
        let blob = self.blob.split().freeze();
        Octets(vec![Bytes::from_static(CHUNK_PART_TAG.as_bytes()), blob])
    }

    /// The reply octets.
    pub fn finish(self) -> Octets {
        tagged(self.blob.freeze())
    }
}

impl Default for ReplyWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcomes of a chunk reply, in call order; strings are slices of
/// `blob` (the reply's second element).
///
/// ```
/// use forkrpc::{octets, wire::chunk::{self, ItemResult}};
/// let items = [ItemResult::Reply(octets!["x"]), ItemResult::Error("bad".into()), ItemResult::NotRun];
/// let mut w = chunk::ReplyWriter::new();
/// items.iter().for_each(|i| w.push(i));
/// let reply = w.finish();
/// assert_eq!(chunk::results(&reply[1]).unwrap(), items);
/// ```
pub fn results(blob: &Bytes) -> Result<Vec<ItemResult>, WireError> {
    each_result(blob).collect()
}

/// The outcomes of a chunk reply one at a time, as [`results`] reads
/// them (without collecting them first).
pub fn each_result(blob: &Bytes) -> EachResult<'_> {
    EachResult { blob, pos: 0 }
}

/// Iterator of [`each_result`]; it ends after the first error.
pub struct EachResult<'a> {
    blob: &'a Bytes,
    pos: usize,
}

impl Iterator for EachResult<'_> {
    type Item = Result<ItemResult, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        let blob = self.blob;
        if self.pos >= blob.len() {
            return None;
        }
        let item = (|| {
            let status = blob[self.pos];
            self.pos += 1;
            let r = next_field(blob, &mut self.pos)?;
            let text = || String::from_utf8_lossy(&blob[r.clone()]).into_owned();
            Ok(match status {
                b'r' => ItemResult::Reply(Octets::decode_in(blob, r.clone())?),
                b'e' => ItemResult::Error(text()),
                b'p' => ItemResult::Panic(text()),
                b'n' => ItemResult::NotRun,
                _ => return Err(WireError::BadChunkItem),
            })
        })();
        if item.is_err() {
            self.pos = blob.len();
        }
        Some(item)
    }
}
