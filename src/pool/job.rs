//! The pool's jobs: a call's arguments (as given, or staged) and where its
//! outcome goes.

use super::map_chunk::ChunkSink;
use super::staging::Staged;
use crate::call::{Outcome, Payload, Waiter};
use crate::error::Error;
use crate::wire::Octets;

/// Where a job's outcome goes.
pub(crate) enum Sink {
    /// One call: its waiter.
    One(Waiter),
    /// A chunk of `n` calls of a `map`, starting at item `base`.
    Chunk(ChunkSink),
    /// The real sink waits in the pool's tracked calls (retries, timeouts, memory
    /// ceiling): whoever resolves the job takes it from there. `raw`: that
    /// sink takes replies undecoded (see [`Waiter::wants_raw`]).
    Tracked { raw: bool },
}

impl Sink {
    /// Whether the reply must reach this sink undecoded (a typed call).
    pub(super) fn wants_raw(&self) -> bool {
        match self {
            Sink::One(w) => w.wants_raw(),
            Sink::Chunk(_) => false,
            Sink::Tracked { raw } => *raw,
        }
    }
}

/// A job in the scheduler's queue.
pub(crate) struct Job {
    pub(super) args: Args,
    pub(super) sink: Sink,
}

/// A queued job's arguments.
pub(crate) enum Args {
    /// As given.
    Payload(Payload),
    /// Written as a chunk item (BER length, then the octets encoding)
    /// into the pool's [`Staging`](super::staging::Staging): small octets calls that join a waiting
    /// queue of a pool whose batches go as chunks. A batch's chunk is
    /// then cut from there rather than built from each job, and the
    /// caller frees its argument list on its own thread.
    Staged(Staged),
}

impl Args {
    /// Where it is staged, if it is.
    #[inline]
    pub(crate) fn staged(&self) -> Option<Staged> {
        match self {
            Args::Staged(s) => Some(*s),
            Args::Payload(_) => None,
        }
    }
}

impl Job {
    pub(crate) fn new(args: Args, sink: Sink) -> Job {
        Job { args, sink }
    }

    /// Not a staged call with a waiter of its own: a batch with such a job
    /// cannot be sent as its staged bytes alone.
    pub(super) fn is_odd(&self) -> bool {
        !matches!((&self.args, &self.sink), (Args::Staged(_), Sink::One(_)))
    }

    /// Its sink, letting its (sent) arguments go.
    pub(crate) fn into_sink(self) -> Sink {
        if let Args::Payload(p) = self.args {
            p.spend();
        }
        self.sink
    }
}

/// What a caller hands to `PoolState::submit_job`.
pub(crate) enum Incoming {
    Payload(Payload),
    /// Small octets (encoded size given) that may be staged.
    Stageable(Octets, u32),
}

/// Delivers a job's outcome.
pub(crate) fn complete(sink: Sink, r: impl Into<Outcome>, pid: i32) {
    match sink {
        Sink::One(w) => w.complete_outcome(r.into()),
        Sink::Chunk(c) => c.waiter(pid).complete_outcome(r.into()),
        // Resolved through `State::tracked`, never directly.
        Sink::Tracked { .. } => {
            debug_assert!(false, "a tracked job completed without its entry")
        }
    }
}

pub(super) fn fail_sink(sink: Sink, e: Error, pid: i32) {
    complete(sink, Err(e), pid)
}
