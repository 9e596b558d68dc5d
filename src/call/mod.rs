//! A call as the layers hand it down: its arguments ([`Payload`], framed
//! into a [`SendQueue`]) and who waits for its reply ([`Waiter`]), with
//! `leftovers`, the spent arguments and callbacks a caller's thread frees.
//! Below the engine, which carries calls to their connection without
//! knowing more of them than that they frame into a send queue.

pub(crate) mod leftovers;

use crate::arena::{Arena, SHARE_MIN};
use crate::error::{Error, Result};
use crate::latch::Latch;
use crate::wire::arena_ref;
use crate::wire::sendq::SendQueue;
use crate::Octets;
use bytes::{BufMut, Bytes};
use leftovers::{Callback, RawCallback, Spent};
use std::sync::Arc;

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
    on_driver: bool,
    /// Some strings lie in the shared arena (see [`Payload::share`]).
    shared: bool,
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
            shared: false,
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
                        self.shared = true;
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
            self.shared = true;
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
        if !self.shared {
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

    /// Lets sent arguments go: small ones made on a caller's thread are
    /// kept for a caller to free (see [`leftovers`]); big ones, sent in
    /// place, go at once, as the caller may want their buffers back.
    pub(crate) fn spend(self) {
        if matches!(self.body, Body::Small(_)) {
            return; // nothing of the caller's to free
        }
        if self.len < crate::wire::SEND_IN_PLACE as u32 {
            let on_driver = self.on_driver;
            leftovers::keep(Spent::Payload(self), on_driver);
        }
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

/// One call on its way: its arguments and who wants the reply.
pub(crate) struct Call {
    pub args: Payload,
    pub done: Waiter,
}

/// Who waits for a reply. Callback boxes outlive their call, to be freed
/// on a caller's thread (see [`leftovers`]).
///
/// `on_driver`: the callback was boxed on a driver thread (a call made
/// from a callback), so freeing it there at once is the cheap local free.
pub(crate) enum Waiter {
    Callback {
        f: Callback,
        on_driver: bool,
    },
    Latch(Arc<Latch<Result<Octets>>>),
    /// Gets the reply's payload undecoded (typed calls thaw it themselves).
    Raw {
        f: RawCallback,
        on_driver: bool,
    },
    /// Waits for the results of a chunk of calls, which may come in parts.
    Chunk(Box<dyn ChunkWaiter>),
}

/// Who waits for the results of a chunk request (see
/// [`chunk`](crate::wire::chunk)): a pool's batch, a map's chunk. Runs on
/// the driver thread.
pub(crate) trait ChunkWaiter: Send {
    /// Results of the chunk's next items (`[CHUNK_PART_TAG, results]`'s
    /// second element), sent by the worker before an event. An error is a
    /// protocol violation.
    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String>;
    /// The chunk's reply (its remaining results), or why the call failed.
    fn end(self: Box<Self>, r: Result<Octets>);
    /// Results of the chunk's items from item `first` on, recovered from
    /// a dead worker's journal (some may have arrived already: skip those).
    /// An error is a malformed blob.
    fn recovered(&mut self, first: usize, results: &Bytes) -> std::result::Result<(), String>;
    /// The worker died in this chunk: the next item without a result
    /// fails with `running` (it was running), the ones after it with
    /// `not_started` (they never started).
    fn died(self: Box<Self>, running: Option<Error>, not_started: Error);
    /// Calls of the chunk still waiting for their results.
    fn calls_left(&self) -> usize;
}

impl Waiter {
    /// A waiter that runs `f` with the reply.
    pub(crate) fn callback(f: impl FnOnce(Result<Octets>) + Send + 'static) -> Waiter {
        Waiter::Callback {
            f: leftovers::callback!(f),
            on_driver: crate::driver_thread::on_driver_thread(),
        }
    }

    /// A waiter that runs `f` with the reply's payload, undecoded.
    pub(crate) fn raw(f: impl FnOnce(Result<Bytes>) + Send + 'static) -> Waiter {
        Waiter::Raw {
            f: leftovers::callback!(f),
            on_driver: crate::driver_thread::on_driver_thread(),
        }
    }

    /// Nobody waits for the reply any more: a call future that was
    /// dropped (only the waiter holds its latch).
    pub(crate) fn abandoned(&self) -> bool {
        matches!(self, Waiter::Latch(l) if Arc::strong_count(l) == 1)
    }

    /// Whether this waiter takes the reply's payload undecoded (a typed
    /// call thaws it itself).
    pub(crate) fn wants_raw(&self) -> bool {
        matches!(self, Waiter::Raw { .. })
    }

    /// A waiter that hands the reply on to `f` in the form a waiter that
    /// [`wants_raw`](Waiter::wants_raw) (or not) takes it: for whoever
    /// stands between a call and its own waiter (a pool's bookkeeping).
    pub(crate) fn relay(raw: bool, f: impl FnOnce(Outcome) + Send + 'static) -> Waiter {
        if raw {
            Waiter::raw(move |r| f(Outcome::Raw(r)))
        } else {
            Waiter::callback(move |r| f(Outcome::Octets(r)))
        }
    }

    /// Completes with an outcome a [`relay`](Waiter::relay) passed on.
    pub(crate) fn complete_outcome(self, r: Outcome) {
        match (self, r) {
            (w, Outcome::Octets(r)) => w.complete(r),
            (Waiter::Raw { mut f, on_driver }, Outcome::Raw(r)) => {
                guard("a reply callback", || f.reply(r));
                leftovers::keep(Spent::Raw(f), on_driver);
            }
            // A relay built for another kind of waiter: decode after all.
            (w, Outcome::Raw(r)) => w.complete(r.and_then(|p| {
                Octets::decode(p).map_err(|e| Error::Codec {
                    detail: format!("malformed octets reply: {e}"),
                })
            })),
        }
    }

    pub(crate) fn complete(self, r: Result<Octets>) {
        match self {
            Waiter::Callback { mut f, on_driver } => {
                guard("a reply callback", || f.reply(r));
                leftovers::keep(Spent::Callback(f), on_driver);
            }
            Waiter::Latch(l) => l.set(r),
            Waiter::Raw { mut f, on_driver } => {
                guard("a reply callback", || f.reply(r.map(|o| o.to_bytes())));
                leftovers::keep(Spent::Raw(f), on_driver);
            }
            Waiter::Chunk(c) => guard("a reply callback", || c.end(r)),
        }
    }

    /// Completes with a reply's strings (encoded again for a waiter that
    /// wants the payload).
    pub(crate) fn complete_octets(self, o: Octets) {
        match self {
            Waiter::Raw { mut f, on_driver } => {
                guard("a reply callback", || f.reply(Ok(o.to_bytes())));
                leftovers::keep(Spent::Raw(f), on_driver);
            }
            w => w.complete(Ok(o)),
        }
    }

    /// Completes with a reply payload (`range` of `buf`): decoded as
    /// octets unless the waiter wants it raw. A payload that is not octets
    /// fails the call.
    pub(crate) fn complete_payload(
        self,
        pid: i32,
        buf: &Bytes,
        range: std::ops::Range<usize>,
    ) -> Result<(), String> {
        match self {
            Waiter::Raw { mut f, on_driver } => {
                guard("a reply callback", || f.reply(Ok(buf.slice(range))));
                leftovers::keep(Spent::Raw(f), on_driver);
                Ok(())
            }
            w => match Octets::decode_in(buf, range) {
                Ok(o) => {
                    w.complete(Ok(o));
                    Ok(())
                }
                Err(e) => {
                    let detail = format!("malformed reply: {e}");
                    w.complete(Err(Error::Protocol {
                        pid,
                        detail: detail.clone(),
                    }));
                    Err(detail)
                }
            },
        }
    }
}

/// A call's outcome on its way to its waiter through a [relay](Waiter::relay):
/// the payload undecoded for a waiter that thaws it itself, the strings
/// otherwise.
pub(crate) enum Outcome {
    Octets(Result<Octets>),
    Raw(Result<Bytes>),
}

impl Outcome {
    /// Why the call failed, if it did.
    pub(crate) fn error(&self) -> Option<&Error> {
        match self {
            Outcome::Octets(Err(e)) | Outcome::Raw(Err(e)) => Some(e),
            _ => None,
        }
    }
}

impl From<Result<Octets>> for Outcome {
    fn from(r: Result<Octets>) -> Outcome {
        Outcome::Octets(r)
    }
}

/// Runs a user callback on the driver thread; a panic in it is reported and
/// contained, so one bad callback cannot stop every worker's I/O.
pub(crate) fn guard(what: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        eprintln!("forkrpc: {what} panicked on the driver thread; the panic was contained");
    }
}

impl Call {
    pub(crate) fn fail(self, e: Error) {
        self.done.complete(Err(e))
    }
}
