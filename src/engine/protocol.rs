//! The contract between the engine and the layer above it: the
//! [`Protocol`] a connection's owner implements (the engine calls up
//! through it: a frame arrived, the connection ended, framed calls to
//! take), and the counters both sides read.

use crate::call::Call;
use crate::error::{Error, ExitStatus};
use crate::wire::sendq::SendQueue;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The RPC layer's side of one worker connection; runs on the driver thread.
pub(crate) trait Protocol: Send {
    /// Appends the request frame for `call` to `out` and remembers `call`.
    fn encode(&mut self, call: Call, out: &mut SendQueue);
    /// Handles one reply or event: frame `id`, whose payload is `payload`
    /// of `buf` (the frames of one read, frozen together). An error is a
    /// protocol violation.
    fn frame(
        &mut self,
        id: u32,
        buf: &Bytes,
        payload: std::ops::Range<usize>,
    ) -> Result<(), String>;
    /// The connection ended: EOF (or a read error), and `status` if known;
    /// `rest` is what it sent after its last complete frame, `received`
    /// the bytes read from it in all.
    fn finish(&mut self, pid: i32, status: Option<ExitStatus>, rest: BytesMut, received: u64);
    /// Takes the calls that callers framed themselves (see `outbox`),
    /// appending their frames to `out`, or dropping them when `live` is
    /// false (the worker can no longer read).
    fn take_framed(&mut self, _out: &mut SendQueue, _live: bool) {}
}

/// Counters of one connection, readable from any thread. Callers write
/// `submitted`, the driver the rest: they sit on separate cache lines.
#[derive(Default)]
pub(crate) struct ConnStats {
    /// Calls handed to the engine (by callers, under the engine's queue
    /// lock: see [`Engine::push_counted`](super::Engine::push_counted)).
    pub submitted: CacheLine<AtomicU64>,
    /// Calls framed by callers (under the connection's outbox lock: see
    /// `outbox`).
    pub framed: CacheLine<AtomicU64>,
    /// Calls resolved by a reply or an error note (by the driver).
    pub answered: CacheLine<AtomicU64>,
    /// Send operations submitted (a batch of frames each, or the rest of
    /// a partly sent batch).
    pub sends: AtomicU64,
    /// The connection has ended and every call is resolved.
    pub ended: AtomicBool,
    /// Set by whoever killed the worker on purpose: the error its
    /// outstanding calls get instead of "worker exited".
    pub note: Mutex<Option<Error>>,
    /// How the worker ended, set when its connection does: what calls made
    /// after that fail with ([`Error::NotStarted`] naming the end: they
    /// were never sent).
    pub death: OnceLock<Error>,
}

impl ConnStats {
    /// Calls handed over (as commands or framed) and not answered yet.
    pub(crate) fn unanswered(&self) -> u64 {
        let made = self.submitted.load(Ordering::Relaxed) + self.framed.load(Ordering::Relaxed);
        made.saturating_sub(self.answered.load(Ordering::Relaxed))
    }

    /// The error for a call that reached the connection after it ended:
    /// how the worker ended, or `Closed` if that is not known.
    pub(crate) fn refusal(&self) -> Error {
        self.death.get().cloned().unwrap_or(Error::Closed)
    }
}

/// A value alone on its cache line, so writers on other threads do not
/// slow each other down.
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct CacheLine<T>(pub T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
