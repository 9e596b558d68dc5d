//! Frame headers and splitting a byte stream into frames. `Incomplete` is
//! ordinary control flow: it says how many bytes the next frame needs.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest payload a frame can carry (the length is a `u32`).
pub const MAX_PAYLOAD: u64 = u32::MAX as u64;
/// Size of a `NN` header (id, length).
pub const ID_HEADER: usize = 8;
/// Size of an `N` header (length).
pub const LEN_HEADER: usize = 4;

/// Size of the header in front of a request payload: `NN` on the async
/// backend, `N` on the sync one (serialisers that align need it).
pub const fn request_header(asynchronous: bool) -> usize {
    if asynchronous {
        ID_HEADER
    } else {
        LEN_HEADER
    }
}
/// Id of an event frame (child → parent).
pub const EVENT_ID: u32 = 0;
/// Id of every reply of the sync backend.
pub const SYNC_REPLY_ID: u32 = 1;

/// One frame: its id (1 for sync requests, which carry none) and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Request id, reply id, or 0 for an event.
    pub id: u32,
    /// The serialiser's bytes, sharing the receive buffer.
    pub payload: Bytes,
}

/// Result of trying to take a frame off the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame, removed from the buffer.
    Frame(Frame),
    /// Not enough bytes yet; `needed` is the total size of the next frame
    /// when its header is known, else the header size.
    Incomplete {
        /// Bytes the buffer must hold for the next frame.
        needed: usize,
    },
}

/// How many bytes to read next when `buf` holds an incomplete frame that
/// needs `needed` bytes in all: what is missing, but at least `chunk` and
/// at most four times what the buffer holds: the buffer grows with what
/// has arrived (to ten times that at most), however little each read
/// brings, so a huge announced length allocates only as its bytes arrive;
/// and it grows fast enough that a big frame is copied little on the way.
///
/// ```
/// use forkrpc::wire::frame::read_want;
/// let mut buf = bytes::BytesMut::with_capacity(1 << 20);
/// buf.extend_from_slice(&[0; 1000]);
/// assert_eq!(read_want(1100, &buf, 64), 100);
/// assert_eq!(read_want(1010, &buf, 64), 64);
/// // The buffer's capacity (1 MiB) does not count, only what it holds.
/// assert_eq!(read_want(1 << 30, &buf, 64), 4000);
/// ```
#[inline]
pub fn read_want(needed: usize, buf: &BytesMut, chunk: usize) -> usize {
    let missing = needed.saturating_sub(buf.len());
    missing.clamp(chunk, buf.len().saturating_mul(4).max(chunk))
}

/// Appends a sync request header (`N`).
#[inline]
pub fn put_len_header(out: &mut impl BufMut, len: u32) {
    out.put_u32(len);
}

/// Appends an id header (`NN`): async requests, replies, events.
#[inline]
pub fn put_id_header(out: &mut impl BufMut, id: u32, len: u32) {
    out.put_u32(id);
    out.put_u32(len);
}

/// Takes one `NN/a*` frame (reply, event, async request) off `buf`.
#[inline]
pub fn split_id_frame(buf: &mut BytesMut) -> Decoded {
    if buf.len() < ID_HEADER {
        return Decoded::Incomplete { needed: ID_HEADER };
    }
    let id = u32::from_be_bytes(buf[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(buf[4..8].try_into().unwrap()) as usize;
    let total = ID_HEADER + len;
    if buf.len() < total {
        return Decoded::Incomplete { needed: total };
    }
    buf.advance(ID_HEADER);
    let payload = buf.split_to(len).freeze();
    Decoded::Frame(Frame { id, payload })
}

/// Takes one `N/a*` frame (sync request) off `buf`; its id is reported as 1.
#[inline]
pub fn split_len_frame(buf: &mut BytesMut) -> Decoded {
    if buf.len() < LEN_HEADER {
        return Decoded::Incomplete { needed: LEN_HEADER };
    }
    let len = u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize;
    let total = LEN_HEADER + len;
    if buf.len() < total {
        return Decoded::Incomplete { needed: total };
    }
    buf.advance(LEN_HEADER);
    let payload = buf.split_to(len).freeze();
    Decoded::Frame(Frame {
        id: SYNC_REPLY_ID,
        payload,
    })
}

/// Whether `buf` holds at least one whole `N/a*` frame.
#[inline]
pub fn has_len_frame(buf: &[u8]) -> bool {
    buf.len() >= LEN_HEADER
        && buf.len() - LEN_HEADER >= u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize
}

/// Whether `buf` holds at least one whole `NN/a*` frame.
#[inline]
pub fn has_id_frame(buf: &[u8]) -> bool {
    buf.len() >= ID_HEADER
        && buf.len() - ID_HEADER >= u32::from_be_bytes(buf[4..8].try_into().unwrap()) as usize
}

/// One frame inside a buffer of several (see [`id_frames`]): its id and
/// where its payload lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameAt {
    /// The frame's id (0: an event).
    pub id: u32,
    /// Where its payload lies in the buffer scanned.
    pub payload: std::ops::Range<usize>,
}

/// The `u32 id, u32 len, payload` frames at the start of `buf`: how many
/// bytes the complete ones take, and what the first incomplete one needs
/// (its whole size from its start, at least a header) if one has begun.
/// Lets a reader freeze all complete frames at once and hand out slices
/// of them, instead of splitting the buffer once per frame.
///
/// ```
/// use forkrpc::wire::frame::{id_frames, FrameAt};
/// let buf = b"\0\0\0\x01\0\0\0\x02ab\0\0\0\0\0\0\0\x05xy";
/// let (end, partial) = id_frames(buf, |_| {});
/// assert_eq!((end, partial), (10, Some(13)));
/// let mut frames = Vec::new();
/// id_frames(&buf[..end], |f| frames.push(f));
/// assert_eq!(frames, [FrameAt { id: 1, payload: 8..10 }]);
/// ```
#[inline]
pub fn id_frames(buf: &[u8], mut each: impl FnMut(FrameAt)) -> (usize, Option<usize>) {
    scan(buf, ID_HEADER, |header, payload| {
        each(FrameAt {
            id: u32::from_be_bytes(header[0..4].try_into().unwrap()),
            payload,
        })
    })
}

/// As [`id_frames`], for `u32 len, payload` frames (sync requests): hands
/// out each payload's range.
#[inline]
pub fn len_frames(
    buf: &[u8],
    mut each: impl FnMut(std::ops::Range<usize>),
) -> (usize, Option<usize>) {
    scan(buf, LEN_HEADER, |_, payload| each(payload))
}

/// Frames whose `header` bytes end with the payload's `u32` length.
#[inline]
fn scan(
    buf: &[u8],
    header: usize,
    mut each: impl FnMut(&[u8], std::ops::Range<usize>),
) -> (usize, Option<usize>) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        if rest.is_empty() {
            return (pos, None);
        }
        if rest.len() < header {
            return (pos, Some(header));
        }
        let len = u32::from_be_bytes(rest[header - 4..header].try_into().unwrap()) as usize;
        let total = header + len;
        if rest.len() < total {
            return (pos, Some(total));
        }
        each(&rest[..header], pos + header..pos + total);
        pos += total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_says_what_is_needed() {
        let mut b = BytesMut::from(&b"\x00\x00\x00\x07\x00\x00\x00\x03ab"[..]);
        assert_eq!(split_id_frame(&mut b), Decoded::Incomplete { needed: 11 });
        b.extend_from_slice(b"c\x00");
        assert_eq!(
            split_id_frame(&mut b),
            Decoded::Frame(Frame {
                id: 7,
                payload: Bytes::from_static(b"abc")
            })
        );
        assert_eq!(&b[..], b"\x00");
        assert_eq!(split_id_frame(&mut b), Decoded::Incomplete { needed: 8 });
    }

    #[test]
    fn id_frames_scan_and_report_the_partial_one() {
        let buf = b"\0\0\0\x07\0\0\0\x01a\0\0\0\0\0\0\0\0\0\0";
        let mut got = Vec::new();
        assert_eq!(id_frames(buf, |f| got.push(f)), (17, Some(8)));
        assert_eq!(
            got,
            [
                FrameAt {
                    id: 7,
                    payload: 8..9
                },
                FrameAt {
                    id: 0,
                    payload: 17..17
                }
            ]
        );
        assert_eq!(id_frames(&buf[..17], |_| {}), (17, None));
        assert_eq!(id_frames(&buf[..12], |_| {}), (9, Some(8)));
    }

    #[test]
    fn an_announced_length_allocates_only_as_bytes_arrive() {
        // Reads that bring 1 KiB each towards a frame of 4 GiB - 1, as the
        // engine makes them: the buffer stays within ten times what
        // arrived (reserving `want`, four times that, may double a
        // capacity just short of it). It used to double on every read.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"\0\0\0\x01\xff\xff\xff\xff");
        let needed = ID_HEADER + u32::MAX as usize;
        for _ in 0..1000 {
            let want = read_want(needed, &buf, 64 * 1024);
            if buf.capacity() - buf.len() < want {
                buf.reserve(want);
            }
            buf.extend_from_slice(&[0; 1024]);
            assert!(
                buf.capacity() <= 10 * (buf.len() + 64 * 1024),
                "capacity {} for {} bytes",
                buf.capacity(),
                buf.len()
            );
        }
    }

    #[test]
    fn len_frames_scan() {
        let buf = b"\0\0\0\x01x\0\0\0\x02yz\0\0";
        let mut got = Vec::new();
        assert_eq!(len_frames(buf, |r| got.push(r)), (11, Some(4)));
        assert_eq!(got, [4..5, 9..11]);
    }

    #[test]
    fn len_frames_split() {
        let mut b = BytesMut::from(&b"\x00\x00\x00\x01x\x00\x00"[..]);
        assert!(has_len_frame(&b));
        assert_eq!(
            split_len_frame(&mut b),
            Decoded::Frame(Frame {
                id: 1,
                payload: Bytes::from_static(b"x")
            })
        );
        assert!(!has_len_frame(&b));
        assert_eq!(split_len_frame(&mut b), Decoded::Incomplete { needed: 4 });
    }
}
