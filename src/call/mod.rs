//! A call as the layers hand it down: its arguments (`payload.rs`:
//! [`Payload`], framed into a [`SendQueue`](crate::wire::sendq::SendQueue))
//! and who waits for its reply ([`Waiter`]), with `leftovers`, the spent
//! arguments and callbacks a caller's thread frees. Below the engine, which
//! carries calls to their connection without knowing more of them than
//! that they frame into a send queue.

pub(crate) mod leftovers;
pub(crate) mod payload;

pub(crate) use payload::{plain_octets_len, write_octets, Body, Payload};

use crate::error::{Error, Result};
use crate::latch::Latch;
use crate::wire::Octets;
use bytes::Bytes;
use leftovers::{Callback, RawCallback, Spent};
use std::sync::Arc;

impl Payload {
    /// Lets sent arguments go: small ones made on a caller's thread are
    /// kept for a caller to free (see [`leftovers`]); big ones, sent in
    /// place, go at once, as the caller may want their buffers back.
    pub(crate) fn spend(self) {
        if matches!(self.body, Body::Small(_)) {
            return; // nothing of the caller's to free
        }
        if self.len() < crate::wire::SEND_IN_PLACE as u32 {
            let on_driver = self.on_driver;
            leftovers::keep(Spent::Payload(self), on_driver);
        }
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
