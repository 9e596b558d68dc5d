//! Chunk frames for the pool (see [`chunk`]): a batch of small octets
//! calls to a sync worker travels as one request frame and comes back as
//! one reply (or a few parts, when handlers emit events mid-chunk), so
//! the driver and the worker handle one frame per batch instead of one
//! per call. Results are handed out part by part, in order.

use super::map::ChunkSink;
use super::shared::{complete, Shared, Sink};
use crate::engine::SEND_IN_PLACE;
use crate::error::{Error, Result};
use crate::rpc::{ChunkWaiter, Payload};
use crate::wire::chunk::{self, ItemResult};
use crate::Octets;
use bytes::{Bytes, BytesMut};
use forkrpc_pool::WorkerId;
use std::collections::VecDeque;
use std::sync::Arc;

/// The chunk request of a batch, if its calls can travel as one: at least
/// two, all octets, none big (big arguments are sent in place, which a
/// chunk's one blob would undo).
pub(crate) fn request<'a>(args: impl Iterator<Item = &'a Payload> + Clone) -> Option<Payload> {
    let mut n = 0;
    for a in args.clone() {
        if !a.is_octets() || a.len() as usize >= SEND_IN_PLACE {
            return None;
        }
        n += 1;
    }
    if n < 2 {
        return None;
    }
    let calls = args.map(|a| {
        (u64::from(a.len()), |blob: &mut BytesMut| {
            a.encode_octets(blob)
        })
    });
    Payload::new(chunk::request_with(calls)).ok()
}

/// Counts a chunk's results and turns them into call results.
pub(crate) struct Results {
    pid: i32,
    /// Items in the chunk.
    n: usize,
    /// Items resolved so far.
    seen: usize,
    last_panic: String,
}

impl Results {
    pub(crate) fn new(pid: i32, n: usize) -> Results {
        Results {
            pid,
            n,
            seen: 0,
            last_panic: String::new(),
        }
    }

    /// Items not resolved yet.
    pub(crate) fn left(&self) -> usize {
        self.n - self.seen
    }

    /// Hands each result in `blob` to `f`, in order; more than the chunk
    /// has left, or a malformed one, is an error (those before it were
    /// handed over).
    pub(crate) fn each(
        &mut self,
        blob: &Bytes,
        mut f: impl FnMut(Result<Octets>),
    ) -> std::result::Result<(), String> {
        for x in chunk::each_result(blob) {
            let x = x.map_err(|e| format!("malformed chunk results: {e}"))?;
            if self.left() == 0 {
                return Err(format!("more results than the chunk's {} calls", self.n));
            }
            self.seen += 1;
            f(self.convert(x));
        }
        Ok(())
    }

    /// Hands the results of a chunk's reply to `f`: exactly the items
    /// left.
    pub(crate) fn last(
        &mut self,
        reply: &Octets,
        f: impl FnMut(Result<Octets>),
    ) -> std::result::Result<(), String> {
        if !chunk::is_chunk(reply) {
            return Err("a chunk of calls got a plain reply".into());
        }
        self.each(&reply[1], f)?;
        match self.left() {
            0 => Ok(()),
            n => Err(format!("the chunk's reply lacks {n} results")),
        }
    }

    fn convert(&mut self, x: ItemResult) -> Result<Octets> {
        let pid = self.pid;
        match x {
            ItemResult::Reply(o) => Ok(o),
            ItemResult::Error(message) => Err(Error::Handler { pid, message }),
            ItemResult::Panic(message) => {
                self.last_panic = message.clone();
                Err(Error::HandlerPanicked { pid, message })
            }
            ItemResult::NotRun => Err(Error::Skipped {
                pid,
                message: self.last_panic.clone(),
            }),
        }
    }

    /// The error for the items left when the chunk could not be read.
    pub(crate) fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            pid: self.pid,
            detail,
        }
    }
}

/// A pool's batch sent as one chunk: each call's sink gets its result as
/// it arrives; when the last has, the batch is done.
pub(crate) struct Batch {
    pub(crate) sinks: VecDeque<Sink>,
    pub(crate) results: Results,
    pub(crate) shared: Arc<Shared>,
    pub(crate) worker: WorkerId,
}

/// How many sinks ahead of the one completed [`next_sink`] asks for.
const AHEAD: usize = 8;

/// The next sink of a batch. The caller wrote the sinks on its own core;
/// asking for one [`AHEAD`] now overlaps fetching it with completing
/// the ones before it.
#[inline]
fn next_sink(sinks: &mut VecDeque<Sink>) -> Option<Sink> {
    if let Some(s) = sinks.get(AHEAD) {
        crate::prefetch::two_lines(s as *const Sink as usize);
    }
    sinks.pop_front()
}

impl Batch {
    fn fail(&mut self, e: Error) {
        let pid = self.results.pid;
        for s in self.sinks.drain(..) {
            complete(s, Err(e.clone()), pid);
        }
    }
}

impl ChunkWaiter for Batch {
    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        let (sinks, pid) = (&mut self.sinks, self.results.pid);
        self.results.each(results, |r| {
            if let Some(s) = next_sink(sinks) {
                complete(s, r, pid);
            }
        })
    }

    fn end(mut self: Box<Self>, r: Result<Octets>) {
        let pid = self.results.pid;
        let (shared, worker) = (self.shared.clone(), self.worker);
        shared.batch_done(worker, pid, move || {
            let b = &mut *self;
            let (sinks, results) = (&mut b.sinks, &mut b.results);
            let e = match r.map(|reply| {
                results.last(&reply, |r| {
                    if let Some(s) = next_sink(sinks) {
                        complete(s, r, pid);
                    }
                })
            }) {
                Ok(Ok(())) => return,
                Ok(Err(detail)) => b.results.protocol(detail),
                Err(e) => e,
            };
            b.fail(e);
        });
    }
}

/// The chunk that ends a pool's batch (a map's, sent with others): once
/// its results are in, the batch is done.
pub(crate) struct Ending {
    pub(crate) inner: Box<dyn ChunkWaiter>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) worker: WorkerId,
    pub(crate) pid: i32,
}

impl ChunkWaiter for Ending {
    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        self.inner.part(results)
    }

    fn end(self: Box<Self>, r: Result<Octets>) {
        let Ending {
            inner,
            shared,
            worker,
            pid,
        } = *self;
        shared.batch_done(worker, pid, move || inner.end(r));
    }
}

/// A map's chunk: its results go to the map's arrivals.
pub(crate) struct MapChunk {
    pub(crate) sink: ChunkSink,
    pub(crate) results: Results,
}

impl ChunkWaiter for MapChunk {
    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        let first = self.results.seen;
        let mut rs = Vec::with_capacity(self.results.left());
        let r = self.results.each(&private_copy(results), |r| rs.push(r));
        self.sink.deliver(first, rs);
        r
    }

    fn end(mut self: Box<Self>, r: Result<Octets>) {
        let first = self.results.seen;
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
        self.sink.deliver(first, rs);
    }
}

/// Results on a buffer of their own. Their slices would otherwise share
/// the engine's receive buffer, whose reference count the driver thread
/// keeps touching for every frame while the map's consumer thread drops
/// results: one copy per chunk is cheaper than that cache-line ping-pong.
fn private_copy(blob: &Bytes) -> Bytes {
    Bytes::copy_from_slice(blob)
}
