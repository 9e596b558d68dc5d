//! A call's arguments as they travel: octets or a frozen payload, small
//! ones copied into the call itself, big strings placed in the arena or
//! sent in place; measured once, framed into a send queue.

use crate::arena::{Arena, SHARE_MIN};
use crate::error::{Error, Result};
use crate::wire::arena_ref;
use crate::wire::sendq::SendQueue;
use crate::wire::Octets;
use bytes::{BufMut, Bytes};

/// A call's arguments: octets, encoded by the engine, or a payload a
/// serialiser already froze on the caller's thread; small ones of either
/// kind are copied into the call itself.
#[derive(Clone)]
pub(crate) enum Body {
    Octets(Octets),
    Frozen(Bytes),
    Small(Small),
}

/// Payloads up to this size travel inside the call (see [`Small`]).
pub(crate) const SMALL: usize = 30;

/// A small payload, encoded on the caller's thread into the call itself.
/// The driver then copies it straight into the send buffer: it never
/// reads, and callers never free, the argument list's own allocations,
/// whose memory would otherwise cross between the two threads' cores
/// twice per call (a pipelined echo call's biggest cost on the driver).
#[derive(Clone, Copy)]
pub(crate) struct Small {
    len: u8,
    /// The bytes are an octets encoding (not a codec's frozen payload).
    octets: bool,
    bytes: [u8; SMALL],
}

impl Small {
    fn new(octets: bool, fill: impl FnOnce(&mut &mut [u8])) -> Small {
        let mut bytes = [0; SMALL];
        let mut rest = &mut bytes[..];
        fill(&mut rest);
        let len = (SMALL - rest.len()) as u8;
        Small { len, octets, bytes }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl Body {
    /// The encoded size of arguments as they come from a caller, if no
    /// string is big enough to be shared or sent in place (below 64 KiB
    /// each) and the whole fits a frame: a payload [`Body::write`] simply
    /// copies into a frame.
    pub(crate) fn plain_len(&self) -> Option<u32> {
        match self {
            Body::Octets(o) => plain_octets_len(o),
            Body::Frozen(b) if small_string(b.len()) => Some(b.len() as u32),
            _ => None,
        }
    }

    /// Appends the payload; big byte strings are queued in place, not
    /// copied.
    pub(crate) fn write(&self, out: &mut SendQueue) {
        match self {
            Body::Octets(o) => write_octets(o, out),
            Body::Frozen(b) => out.put_shared(b),
            Body::Small(s) => out.buf.extend_from_slice(s.as_slice()),
        }
    }
}

impl From<Octets> for Body {
    fn from(o: Octets) -> Self {
        Body::Octets(o)
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Frozen(b)
    }
}

/// A call's arguments with their encoded size, measured once when the call
/// is made: the one place where a payload too big for a frame is refused,
/// whatever path the call takes.
#[derive(Clone)]
pub(crate) struct Payload {
    pub(crate) body: Body,
    len: u32,
    /// Made on a driver thread (a call from a callback): freed there too.
    pub(super) on_driver: bool,
    /// Some strings lie in the shared arena (see [`Payload::share`]).
    in_arena: bool,
}

impl Payload {
    /// Fails with [`Error::PayloadTooLarge`] beyond 4 GiB - 1.
    pub(crate) fn new(body: impl Into<Body>) -> Result<Payload> {
        let body = body.into();
        let size = match &body {
            Body::Octets(o) => o.encoded_len(),
            Body::Frozen(b) => b.len() as u64,
            Body::Small(s) => s.len as u64,
        };
        let len = u32::try_from(size).map_err(|_| Error::PayloadTooLarge { size })?;
        let body = match body {
            Body::Octets(o) if size as usize <= SMALL => {
                Body::Small(Small::new(true, |out| o.encode(out)))
            }
            Body::Frozen(b) if b.len() <= SMALL => {
                Body::Small(Small::new(false, |out| out.put_slice(&b)))
            }
            body => body,
        };
        Ok(Payload {
            body,
            len,
            on_driver: crate::driver_thread::on_driver_thread(),
            in_arena: false,
        })
    }

    /// Copies big strings into the shared `arena` (on the caller's thread:
    /// the one copy they take on the way to the worker), unless they lie
    /// there already or it is full. A big frozen payload goes there whole,
    /// `header` bytes into its region: where the frame header would have
    /// put it, so a codec's alignment holds.
    pub(crate) fn share(&mut self, arena: &'static Arena, header: usize) {
        let o = match &mut self.body {
            Body::Octets(o) => o,
            Body::Small(_) => return,
            Body::Frozen(b) => {
                if b.len() >= SHARE_MIN && arena.offset_of(b).is_none() {
                    if let Some(copy) = arena.share_at(b, header) {
                        *b = copy;
                        self.in_arena = true;
                    }
                }
                return;
            }
        };
        for b in o.0.iter_mut().filter(|b| b.len() >= SHARE_MIN) {
            if arena.offset_of(b).is_none() {
                match arena.share(b) {
                    Some(copy) => *b = copy,
                    None => continue,
                }
            }
            self.in_arena = true;
        }
    }

    /// Encoded size in bytes.
    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    /// The shared form of the arguments (see [`arena_ref`]) if some of their
    /// strings lie in `arena`, pushing to `regions` the regions it names
    /// (each a hold for the worker to be given).
    pub(crate) fn shared_form(&self, arena: &Arena, regions: &mut Vec<usize>) -> Option<Octets> {
        if !self.in_arena {
            return None;
        }
        let o = match &self.body {
            Body::Octets(o) => o,
            Body::Small(_) => return None,
            Body::Frozen(b) => {
                let off = arena.offset_of(b)?;
                regions.push(arena.region_of(off, b.len())?);
                return Some(arena_ref::encode_frozen(off as u64, b.len() as u64));
            }
        };
        let start = regions.len();
        let form = arena_ref::encode(o, |b| {
            let off = arena.offset_of(b).filter(|_| b.len() >= SHARE_MIN)?;
            regions.push(arena.region_of(off, b.len())?);
            Some(off as u64)
        });
        if form.is_none() {
            regions.truncate(start);
        }
        form
    }

    /// The strings of an octets payload (None for a frozen one).
    pub(crate) fn octets(&self) -> Option<Octets> {
        match &self.body {
            Body::Octets(o) => Some(o.clone()),
            Body::Small(s) if s.octets => {
                Octets::decode(Bytes::copy_from_slice(&s.bytes[..s.len as usize])).ok()
            }
            _ => None,
        }
    }

    /// True if the arguments are octets (not a codec's frozen payload).
    pub(crate) fn is_octets(&self) -> bool {
        match &self.body {
            Body::Octets(_) => true,
            Body::Frozen(_) => false,
            Body::Small(s) => s.octets,
        }
    }

    /// Appends the octets encoding of the arguments (copying every string),
    /// if they are octets.
    pub(crate) fn encode_octets(&self, out: &mut impl bytes::BufMut) {
        match &self.body {
            Body::Octets(o) => o.encode(out),
            Body::Small(s) if s.octets => out.put_slice(s.as_slice()),
            _ => {}
        }
    }

    /// Appends the payload; big byte strings are queued in place, not
    /// copied.
    pub(crate) fn write(&self, out: &mut SendQueue) {
        self.body.write(out)
    }
}

/// A string this long is neither shared nor sent in place.
fn small_string(n: usize) -> bool {
    n < SHARE_MIN.min(crate::wire::SEND_IN_PLACE)
}

/// The encoded size of `o` if [`Body::plain_len`] would give one.
pub(crate) fn plain_octets_len(o: &Octets) -> Option<u32> {
    if o.iter().all(|b| small_string(b.len())) {
        u32::try_from(o.encoded_len()).ok()
    } else {
        None
    }
}

pub(crate) fn write_octets(o: &Octets, out: &mut SendQueue) {
    for b in &o.0 {
        crate::wire::ber::encode(b.len() as u64, &mut out.buf);
        out.put_shared(b);
    }
}
