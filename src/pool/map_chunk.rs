//! A map's chunk: where its results go (the map's arrivals), and how the
//! items a dead worker never started are sent again.

use super::chunk_results::Results;
use crate::call::{ChunkWaiter, Payload, Waiter};
use crate::error::{Error, Result};
use crate::wire::chunk;
use crate::wire::Octets;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::task::Waker;

/// What a map's chunk needs of its pool: to queue the items a dead
/// worker never started once more. (A trait, so that the chunk's sink,
/// which the pool's jobs hold, need not know the pool's state.)
pub(crate) trait RequeueChunk: Send + Sync {
    /// Queues `args` (a chunk of the map's items) at the head of the
    /// queue, its results for `sink`.
    fn requeue_chunk(self: Arc<Self>, args: Payload, sink: ChunkSink);
}

/// Results by item index, as they arrive, and who waits for them.
type Inbox = (VecDeque<(usize, Result<Octets>)>, Option<Waker>);

/// Results arriving from the driver thread, for the consumer.
pub(crate) struct Arrivals {
    inner: Mutex<Inbox>,
    pub(super) cond: Condvar,
}

impl Arrivals {
    pub(super) fn new() -> Arc<Arrivals> {
        Arc::new(Arrivals {
            inner: Mutex::new((VecDeque::new(), None)),
            cond: Condvar::new(),
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn push(&self, items: impl Iterator<Item = (usize, Result<Octets>)>) {
        let waker = {
            let mut g = self.lock();
            g.0.extend(items);
            g.1.take()
        };
        self.cond.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Where the results of one chunk go.
pub(crate) struct ChunkSink {
    base: usize,
    n: usize,
    out: Arc<Arrivals>,
    /// The chunk's items (its request's blob) and the pool, to send again
    /// the items a dead worker never started.
    again: Option<(Bytes, Arc<dyn RequeueChunk>)>,
}

impl ChunkSink {
    /// Items `base..base + n` of a map, whose results go to `out`; `again`
    /// as the field.
    pub(super) fn new(
        base: usize,
        n: usize,
        out: Arc<Arrivals>,
        again: Option<(Bytes, Arc<dyn RequeueChunk>)>,
    ) -> ChunkSink {
        ChunkSink {
            base,
            n,
            out,
            again,
        }
    }

    /// Waits for the chunk's results from worker `pid`.
    pub(crate) fn waiter(self, pid: i32) -> Waiter {
        Waiter::Chunk(self.chunk(pid))
    }

    /// As [`ChunkSink::waiter`], unwrapped.
    pub(crate) fn chunk(self, pid: i32) -> Box<dyn ChunkWaiter> {
        let results = Results::new(pid, self.n);
        Box::new(MapChunk {
            sink: self,
            results,
        })
    }

    /// Hands over the results of items `first..`, in order.
    pub(crate) fn deliver(&self, first: usize, rs: Vec<Result<Octets>>) {
        let base = self.base + first;
        self.out
            .push(rs.into_iter().enumerate().map(|(i, r)| (base + i, r)));
    }

    /// Sends items `first..` again as a chunk of their own, at the head of
    /// the pool's queue: a dead worker never started them. Without the
    /// items (or if they cannot be read back) they fail with `e`.
    pub(crate) fn resend_from(self, first: usize, e: Error) {
        if first >= self.n {
            return;
        }
        let rest = self.again.as_ref().and_then(|(blob, pool)| {
            let items = blob.slice(chunk::item_offset(blob, first).ok()?..);
            let p = Payload::new(chunk::tagged(items.clone())).ok()?;
            Some((items, pool.clone(), p))
        });
        match rest {
            Some((items, pool, p)) => {
                let sink = ChunkSink {
                    base: self.base + first,
                    n: self.n - first,
                    out: self.out,
                    again: Some((items, pool.clone())),
                };
                pool.requeue_chunk(p, sink);
            }
            None => {
                let n = self.n - first;
                self.deliver(first, (0..n).map(|_| Err(e.clone())).collect());
            }
        }
    }
}

/// A map's chunk: its results go to the map's arrivals.
pub(crate) struct MapChunk {
    sink: ChunkSink,
    results: Results,
}

impl ChunkWaiter for MapChunk {
    fn calls_left(&self) -> usize {
        self.results.left()
    }

    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        let first = self.results.seen;
        let mut rs = Vec::with_capacity(self.results.left());
        let r = self.results.each(&private_copy(results), |r| rs.push(r));
        self.sink.deliver(first, rs);
        r
    }

    fn recovered(&mut self, first: usize, results: &Bytes) -> std::result::Result<(), String> {
        let seen = self.results.seen;
        let mut rs = Vec::with_capacity(self.results.left());
        let r = self
            .results
            .each_from(first, &private_copy(results), |r| rs.push(r));
        self.sink.deliver(seen, rs);
        r
    }

    fn died(self: Box<Self>, running: Option<Error>, not_started: Error) {
        let first = self.results.seen;
        let rs: Vec<_> = running
            .filter(|_| self.results.left() > 0)
            .map(Err)
            .into_iter()
            .collect();
        let next = first + rs.len();
        self.sink.deliver(first, rs);
        self.sink.resend_from(next, not_started);
    }

    fn end(mut self: Box<Self>, r: Result<Octets>) {
        let first = self.results.seen;
        if let Err(e @ Error::NotStarted { .. }) = r {
            // Never sent (its worker had ended): every item again.
            return self.sink.resend_from(first, e);
        }
        let mut rs = Vec::with_capacity(self.results.left());
        let e = match r.map(|reply| {
            let own = Octets(reply.0.iter().map(private_copy).collect());
            self.results.last(&own, |r| rs.push(r))
        }) {
            Ok(Ok(())) => None,
            Ok(Err(detail)) => Some(self.results.protocol(detail)),
            Err(e) => Some(e),
        };
        if let Some(e) = e {
            let left = self.results.n - first - rs.len();
            rs.extend(std::iter::repeat_n(Err(e), left));
        }
        // Items after one that panicked did not run: send them again.
        let skipped = rs
            .iter()
            .position(|r| matches!(r, Err(Error::Skipped { .. })));
        if let Some(k) = skipped {
            rs.truncate(k);
        }
        self.sink.deliver(first, rs);
        if let Some(k) = skipped {
            let pid = self.results.pid;
            let e = Error::NotStarted {
                pid,
                cause: "an earlier call of its chunk panicked".into(),
            };
            self.sink.resend_from(first + k, e);
        }
    }
}

/// Results on a buffer of their own. Their slices would otherwise share
/// the engine's receive buffer, whose reference count the driver thread
/// keeps touching for every frame while the map's consumer thread drops
/// results: one copy per chunk is cheaper than that cache-line ping-pong.
fn private_copy(blob: &Bytes) -> Bytes {
    Bytes::copy_from_slice(blob)
}
