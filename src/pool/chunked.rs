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
use bytes::Bytes;
use forkrpc_pool::WorkerId;
use std::collections::VecDeque;
use std::sync::Arc;

/// The chunk request of a batch, if its calls can travel as one: at least
/// two, all octets, none big (big arguments are sent in place, which a
/// chunk's one blob would undo).
pub(crate) fn request<'a>(args: impl Iterator<Item = &'a Payload> + Clone) -> Option<Payload> {
    let mut n = 0;
    for a in args.clone() {
        if a.octets().is_none() || a.len() as usize >= SEND_IN_PLACE {
            return None;
        }
        n += 1;
    }
    if n < 2 {
        return None;
    }
    Payload::new(chunk::request(args.filter_map(Payload::octets))).ok()
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

    /// The results in `blob`; more than the chunk has left is an error.
    pub(crate) fn parse(
        &mut self,
        blob: &Bytes,
    ) -> std::result::Result<Vec<Result<Octets>>, String> {
        let rs = chunk::results(blob).map_err(|e| format!("malformed chunk results: {e}"))?;
        if rs.len() > self.left() {
            return Err(format!(
                "{} results for a chunk with {} calls left",
                rs.len(),
                self.left()
            ));
        }
        self.seen += rs.len();
        Ok(rs.into_iter().map(|x| self.convert(x)).collect())
    }

    /// The results of a chunk's reply: exactly the items left.
    pub(crate) fn last(
        &mut self,
        reply: &Octets,
    ) -> std::result::Result<Vec<Result<Octets>>, String> {
        if !chunk::is_chunk(reply) {
            return Err("a chunk of calls got a plain reply".into());
        }
        let left = self.left();
        let rs = self.parse(&reply[1])?;
        if rs.len() != left {
            return Err(format!(
                "{} results for a chunk with {left} calls left",
                rs.len()
            ));
        }
        Ok(rs)
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

impl Batch {
    fn deliver(&mut self, rs: Vec<Result<Octets>>) {
        let pid = self.results.pid;
        for r in rs {
            if let Some(s) = self.sinks.pop_front() {
                complete(s, r, pid);
            }
        }
    }

    fn fail(&mut self, e: Error) {
        let pid = self.results.pid;
        for s in self.sinks.drain(..) {
            complete(s, Err(e.clone()), pid);
        }
    }
}

impl ChunkWaiter for Batch {
    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        let rs = self.results.parse(results)?;
        self.deliver(rs);
        Ok(())
    }

    fn end(mut self: Box<Self>, r: Result<Octets>) {
        let pid = self.results.pid;
        let (shared, worker) = (self.shared.clone(), self.worker);
        shared.batch_done(worker, pid, move || {
            match r.map(|reply| self.results.last(&reply)) {
                Ok(Ok(rs)) => self.deliver(rs),
                Ok(Err(detail)) => self.fail(self.results.protocol(detail)),
                Err(e) => self.fail(e),
            }
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
        let rs = self.results.parse(&private_copy(results))?;
        self.sink.deliver(first, rs);
        Ok(())
    }

    fn end(mut self: Box<Self>, r: Result<Octets>) {
        let first = self.results.seen;
        let left = self.results.left();
        let rs = match r.map(|reply| {
            let own = Octets(reply.0.iter().map(private_copy).collect());
            self.results.last(&own)
        }) {
            Ok(Ok(rs)) => rs,
            Ok(Err(detail)) => vec![Err(self.results.protocol(detail)); left],
            Err(e) => vec![Err(e); left],
        };
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
