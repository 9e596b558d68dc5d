//! Bulk offload: run the handler over an iterator of argument lists with a
//! bounded number of calls in flight, yielding results in order
//! ([`Pool::map`](super::Pool::map)) or as they come
//! ([`Pool::map_unordered`](super::Pool::map_unordered)).
//!
//! On sync workers the calls travel in chunks (see
//! [`CHUNK_TAG`](crate::wire::CHUNK_TAG)): one frame carries many calls
//! and one reply frame their results, which is what makes bulk offload
//! cheap per call. The chunk size follows Python's `Pool.map`: the
//! iterator's length hint over four times the pool's `max`, at most 1024;
//! [`Map::chunk_size`] overrides it.

use super::job::{Incoming, Sink};
use super::keep_open::KeepOpen;
use super::map_chunk::{Arrivals, ChunkSink};
use super::options::Admit;
use super::state::PoolState;
use crate::call::{Payload, Waiter};
use crate::error::{Error, Result};
use crate::wire::chunk;
use crate::wire::Octets;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

const MAX_CHUNK: usize = 1024;

/// The results of [`Pool::map`](super::Pool::map) (in order, `Result<Octets>`) or
/// [`Pool::map_unordered`](super::Pool::map_unordered) (as they come, `(index, Result<Octets>)`).
/// Iterate it (blocking) or use it as a `futures` `Stream`.
pub struct Map<I> {
    /// Keeps the pool open while the map runs.
    pool: Arc<KeepOpen>,
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
    pub(crate) fn new(pool: Arc<KeepOpen>, jobs: I, ordered: bool) -> Self {
        Map {
            pool,
            jobs: Some(jobs),
            ordered,
            next_index: 0,
            next_yield: 0,
            in_flight: 0,
            window: None,
            chunk: None,
            arrivals: Arrivals::new(),
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
        let cfg = self.pool.state().popts.cfg.clone();
        let chunk = *self.chunk.get_or_insert_with(|| {
            if !self.pool.state().chunks() {
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
            let pool: &Arc<PoolState> = self.pool.state();
            // Big strings go one call each, through the shared arena: a
            // chunk's one blob would copy them.
            let big = items
                .iter()
                .any(|o| o.iter().any(|b| b.len() >= crate::arena::SHARE_MIN));
            if n > 1 && !big {
                let req = chunk::request(items.iter());
                let sink = Sink::Chunk(ChunkSink::new(
                    base,
                    n,
                    self.arrivals.clone(),
                    Some((req[1].clone(), pool.clone())),
                ));
                match Payload::new(req) {
                    Ok(args) => {
                        let _ = pool.submit_job(Incoming::Payload(args), sink, Admit::Force);
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
                    let _ = pool.submit(args, w, Admit::Force);
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
