//! Bulk offload: run the handler over an iterator of argument lists with a
//! bounded number of calls in flight, yielding results in order
//! ([`Pool::map`]) or as they come ([`Pool::map_unordered`]).
//!
//! On sync workers the calls travel in chunks (see
//! [`CHUNK_TAG`](crate::wire::CHUNK_TAG)): one frame carries many calls
//! and one reply frame their results, which is what makes bulk offload
//! cheap per call. The chunk size follows Python's `Pool.map`: the
//! iterator's length hint over four times the pool's `max`, at most 1024;
//! [`Map::chunk_size`] overrides it.

use super::chunked::{MapChunk, Results};
use super::options::Admit;
use super::state::{Args, Incoming, Job, PoolState, Sink};
use super::Pool;
use crate::error::{Error, Result};
use crate::rpc::{ChunkWaiter, Payload, Waiter};
use crate::wire::chunk;
use crate::Octets;
use bytes::Bytes;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

const MAX_CHUNK: usize = 1024;

/// Results by item index, as they arrive, and who waits for them.
type Inbox = (VecDeque<(usize, Result<Octets>)>, Option<Waker>);

/// Results arriving from the driver thread, for the consumer.
pub(crate) struct Arrivals {
    inner: Mutex<Inbox>,
    cond: Condvar,
}

impl Arrivals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, items: impl Iterator<Item = (usize, Result<Octets>)>) {
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
    again: Option<(Bytes, Arc<PoolState>)>,
}

impl ChunkSink {
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
        let rest = self.again.as_ref().and_then(|(blob, shared)| {
            let items = blob.slice(chunk::item_offset(blob, first).ok()?..);
            let p = Payload::new(chunk::tagged(items.clone())).ok()?;
            Some((items, shared.clone(), p))
        });
        match rest {
            Some((items, shared, p)) => {
                let sink = Sink::Chunk(ChunkSink {
                    base: self.base + first,
                    n: self.n - first,
                    out: self.out,
                    again: Some((items, shared.clone())),
                });
                shared.resend_new(Job::new(Args::Payload(p), sink));
            }
            None => {
                let n = self.n - first;
                self.deliver(first, (0..n).map(|_| Err(e.clone())).collect());
            }
        }
    }
}

/// The results of [`Pool::map`] (in order, `Result<Octets>`) or
/// [`Pool::map_unordered`] (as they come, `(index, Result<Octets>)`).
/// Iterate it (blocking) or use it as a `futures` `Stream`.
pub struct Map<I> {
    pool: Pool,
    jobs: Option<I>,
    ordered: bool,
    next_index: usize,
    next_yield: usize,
    in_flight: usize,
    window: Option<usize>,
    chunk: Option<usize>,
    arrivals: Arc<Arrivals>,
    /// Results taken from `arrivals`: in arrival order (unordered), or by
    /// index from `next_yield` on (ordered; `None` = not arrived yet).
    local: VecDeque<(usize, Result<Octets>)>,
    ring: VecDeque<Option<Result<Octets>>>,
}

impl<I: Iterator<Item = Octets>> Map<I> {
    pub(crate) fn new(pool: Pool, jobs: I, ordered: bool) -> Self {
        Map {
            pool,
            jobs: Some(jobs),
            ordered,
            next_index: 0,
            next_yield: 0,
            in_flight: 0,
            window: None,
            chunk: None,
            arrivals: Arc::new(Arrivals {
                inner: Mutex::new((VecDeque::new(), None)),
                cond: Condvar::new(),
            }),
            local: VecDeque::new(),
            ring: VecDeque::new(),
        }
    }

    /// Calls per chunk on sync workers (1: no chunks).
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.chunk = Some(n.max(1));
        self
    }

    /// Most calls in flight (submitted, result not yet yielded).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.window = Some(n.max(1));
        self
    }

    fn settle_sizes(&mut self) -> (usize, usize) {
        let cfg = self.pool.shared().popts.cfg.clone();
        let chunk = *self.chunk.get_or_insert_with(|| {
            if !self.pool.shared().chunks() {
                return 1;
            }
            let hint = self.jobs.as_ref().map_or(0, |j| j.size_hint().0);
            (hint / (4 * cfg.max.max(1))).clamp(1, MAX_CHUNK.min(cfg.max_batch.max(1)))
        });
        let window = *self
            .window
            .get_or_insert_with(|| (2 * chunk * cfg.max.max(1) * cfg.load.max(1)).max(256));
        (chunk, window.max(chunk))
    }

    /// Submits more calls while the window has room.
    fn refill(&mut self) {
        let (chunk, window) = self.settle_sizes();
        while self.in_flight + chunk <= window || self.in_flight == 0 {
            let Some(jobs) = self.jobs.as_mut() else {
                return;
            };
            let items: Vec<Octets> = jobs.by_ref().take(chunk).collect();
            if items.is_empty() {
                self.jobs = None;
                return;
            }
            let base = self.next_index;
            let n = items.len();
            self.next_index += n;
            self.in_flight += n;
            let shared = self.pool.shared().clone();
            // Big strings go one call each, through the shared arena: a
            // chunk's one blob would copy them.
            let big = items
                .iter()
                .any(|o| o.iter().any(|b| b.len() >= crate::arena::SHARE_MIN));
            if n > 1 && !big {
                let req = chunk::request(items.iter());
                let sink = Sink::Chunk(ChunkSink {
                    base,
                    n,
                    out: self.arrivals.clone(),
                    again: Some((req[1].clone(), shared.clone())),
                });
                match Payload::new(req) {
                    Ok(args) => {
                        let _ = shared.submit_job(Incoming::Payload(args), sink, Admit::Force);
                    }
                    Err(e) => {
                        if let Sink::Chunk(c) = sink {
                            c.waiter(0).complete(Err(e));
                        }
                    }
                }
            } else {
                for (i, args) in items.into_iter().enumerate() {
                    let out = self.arrivals.clone();
                    let w = Waiter::callback(move |r| {
                        out.push(std::iter::once((base + i, r)));
                    });
                    let _ = shared.submit(args, w, Admit::Force);
                }
            }
        }
    }

    /// The next result that may be yielded, if one has arrived.
    fn take_ready(&mut self) -> Option<(usize, Result<Octets>)> {
        if let Some(r) = self.pop_local() {
            return Some(r);
        }
        // Take everything that arrived in one go (one lock per batch).
        {
            let mut g = self.arrivals.lock();
            if g.0.is_empty() {
                return None;
            }
            std::mem::swap(&mut g.0, &mut self.local);
        }
        if self.ordered {
            for (idx, r) in self.local.drain(..) {
                let pos = idx - self.next_yield;
                if self.ring.len() <= pos {
                    self.ring.resize_with(pos + 1, || None);
                }
                self.ring[pos] = Some(r);
            }
        }
        self.pop_local()
    }

    fn pop_local(&mut self) -> Option<(usize, Result<Octets>)> {
        let r = if self.ordered {
            match self.ring.front() {
                Some(Some(_)) => {
                    let r = self.ring.pop_front().flatten()?;
                    self.next_yield += 1;
                    Some((self.next_yield - 1, r))
                }
                _ => None,
            }
        } else {
            self.local.pop_front()
        };
        if r.is_some() {
            self.in_flight -= 1;
        }
        r
    }

    fn finished(&self) -> bool {
        self.jobs.is_none() && self.in_flight == 0
    }

    /// Submits what the window allows, then `Some` with the next result
    /// (or `Some(None)` at the end), or `None` if the caller must wait.
    fn step(&mut self) -> Option<Option<(usize, Result<Octets>)>> {
        self.refill();
        if let Some(r) = self.take_ready() {
            return Some(Some(r));
        }
        self.finished().then_some(None)
    }

    fn next_raw(&mut self) -> Option<(usize, Result<Octets>)> {
        loop {
            if let Some(r) = self.step() {
                return r;
            }
            if crate::driver_thread::on_driver_thread() {
                // Results are delivered by this very thread: waiting
                // would never end.
                self.jobs = None;
                self.in_flight = 0;
                return Some((self.next_yield, Err(Error::WouldDeadlock)));
            }
            let g = self.arrivals.lock();
            if g.0.is_empty() {
                drop(self.arrivals.cond.wait(g));
            }
        }
    }

    fn poll_raw(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, Result<Octets>)>> {
        loop {
            if let Some(r) = self.step() {
                return Poll::Ready(r);
            }
            let mut g = self.arrivals.lock();
            if g.0.is_empty() {
                g.1 = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
    }
}

impl<I: Iterator<Item = Octets>> Iterator for Map<I> {
    /// Ordered maps yield `(index, result)` too; use `.map(|(_, r)| r)` or
    /// [`Map::results`] for the plain results.
    type Item = (usize, Result<Octets>);
    fn next(&mut self) -> Option<Self::Item> {
        self.next_raw()
    }
}

impl<I: Iterator<Item = Octets>> Map<I> {
    /// The results alone, in the map's order.
    pub fn results(self) -> impl Iterator<Item = Result<Octets>> {
        self.map(|(_, r)| r)
    }
}

impl<I: Iterator<Item = Octets> + Unpin> futures_core::Stream for Map<I> {
    type Item = (usize, Result<Octets>);
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_raw(cx)
    }
}
