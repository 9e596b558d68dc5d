//! Chunk frames for the pool (see [`chunk`]): a batch of small octets
//! calls to a sync worker travels as one request frame and comes back as
//! one reply (or a few parts, when handlers emit events mid-chunk), so
//! the driver and the worker handle one frame per batch instead of one
//! per call. Results are handed out part by part, in order.

use super::map::ChunkSink;
use super::state::{complete, Args, Job, PoolState, Sink};
use crate::error::{Error, Result};
use crate::rpc::{ChunkWaiter, Payload};
use crate::wire::ber;
use crate::wire::chunk::{self, ItemResult};
use crate::wire::SEND_IN_PLACE;
use crate::Octets;
use bytes::{Bytes, BytesMut};
use forkrpc_pool::{JobId, WorkerId};
use std::sync::Arc;

/// Where a staged job's chunk item lies: bytes `end - len .. end` of
/// all the bytes ever staged in its pool (see [`Staging`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Staged {
    end: u64,
    len: u32,
}

impl Staged {
    fn start(self) -> u64 {
        self.end - u64::from(self.len)
    }
}

/// The chunk items of small octets calls, written by their callers as
/// they join a waiting queue (see [`Args::Staged`]): exactly those of the
/// staged jobs in the queue, in queue order. Offsets count every byte
/// ever staged, so a job's place does not move as batches take bytes
/// from the front, and taking a batch's bytes needs only its last staged
/// job.
#[derive(Default)]
pub(crate) struct Staging {
    buf: BytesMut,
    /// The offset of `buf[0]`.
    base: u64,
}

impl Staging {
    /// Writes the chunk item of `args` (whose encoding is `n` bytes).
    pub(crate) fn stage(&mut self, args: &Octets, n: u32) -> Staged {
        let start = self.buf.len();
        chunk::put_item(args, u64::from(n), &mut self.buf);
        Staged {
            end: self.base + self.buf.len() as u64,
            len: (self.buf.len() - start) as u32,
        }
    }

    /// A staged job left the queue from its middle (cancelled): cuts its
    /// item out and moves the items of `later` jobs up.
    pub(crate) fn cut<'a>(&mut self, s: Staged, later: impl Iterator<Item = &'a mut Staged>) {
        let (start, end) = (
            (s.start() - self.base) as usize,
            (s.end - self.base) as usize,
        );
        let tail = self.buf.split_off(end);
        self.buf.truncate(start);
        self.buf.extend_from_slice(&tail);
        for t in later.filter(|t| t.end > s.end) {
            t.end -= u64::from(s.len);
        }
    }

    /// The bytes of jobs leaving the front of the queue, through their
    /// last staged one.
    pub(crate) fn take<'a>(
        &mut self,
        args: impl DoubleEndedIterator<Item = &'a Args>,
    ) -> StagedBytes {
        let at = self.base;
        let last = if self.buf.is_empty() {
            None // nothing staged: no need to look at the jobs
        } else {
            args.rev().find_map(|a| match a {
                Args::Staged(s) => Some(s.end),
                Args::Payload(_) => None,
            })
        };
        let bytes = match last {
            Some(end) => {
                self.base = end;
                self.buf.split_to((end - at) as usize).freeze()
            }
            None => Bytes::new(),
        };
        StagedBytes { at, bytes }
    }
}

/// The staged bytes a batch took, from offset `at`.
#[derive(Default)]
pub(crate) struct StagedBytes {
    at: u64,
    bytes: Bytes,
}

impl StagedBytes {
    fn range(&self, s: Staged) -> std::ops::Range<usize> {
        (s.start() - self.at) as usize..(s.end - self.at) as usize
    }

    /// A staged job's chunk item.
    pub(crate) fn item(&self, s: Staged) -> Bytes {
        self.bytes.slice(self.range(s))
    }
}

/// The chunk request of a batch whose jobs are all staged: their items
/// are the chunk's blob as they stand.
pub(crate) fn staged_request(staged: &StagedBytes) -> Option<Payload> {
    Payload::new(chunk::tagged(staged.bytes.clone())).ok()
}

/// The chunk request of a batch, if its calls can travel as one: all
/// octets, none big (big arguments are sent in place, which a chunk's one
/// blob would undo), and more than one unless it was staged (a lone
/// plain call is cheaper for the worker; a staged one is a chunk item
/// already). `staged` holds the staged jobs' items, in order, and
/// nothing else (see [`Staging`]).
pub(crate) fn request<'a>(
    args: impl Iterator<Item = &'a Args> + Clone,
    staged: &StagedBytes,
) -> Option<Payload> {
    let (mut n, mut total, mut plain) = (0, 0, false);
    for a in args.clone() {
        match a {
            Args::Payload(p) => {
                if !p.is_octets() || p.len() as usize >= SEND_IN_PLACE {
                    return None;
                }
                total += ber::encoded_len(u64::from(p.len())) + p.len() as usize;
                plain = true;
            }
            Args::Staged(s) => total += s.len as usize,
        }
        n += 1;
    }
    if n == 0 || (n == 1 && plain) {
        return None;
    }
    if !plain {
        return staged_request(staged);
    }
    let mut blob = BytesMut::with_capacity(total);
    for a in args {
        match a {
            Args::Payload(p) => {
                ber::encode(u64::from(p.len()), &mut blob);
                p.encode_octets(&mut blob);
            }
            Args::Staged(s) => blob.extend_from_slice(&staged.bytes[staged.range(*s)]),
        }
    }
    Payload::new(chunk::tagged(blob.freeze())).ok()
}

/// The arguments of a staged job (its chunk item) as a payload of their
/// own.
pub(crate) fn unstage(item: &Bytes) -> Result<Payload> {
    let bad = |e: crate::wire::WireError| Error::Protocol {
        pid: 0,
        detail: format!("a staged call could not be read back: {e}"),
    };
    let range = chunk::next_field(item, &mut 0).map_err(bad)?;
    Payload::new(Octets::decode_in(item, range).map_err(bad)?)
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

    /// As [`Results::each`], for results from item `first` on (a dead
    /// worker's journal): those already seen are skipped; a gap before
    /// them is an error.
    pub(crate) fn each_from(
        &mut self,
        first: usize,
        blob: &Bytes,
        mut f: impl FnMut(Result<Octets>),
    ) -> std::result::Result<(), String> {
        if first > self.seen {
            return Err(format!(
                "recovered results start at item {first}, after the {} seen",
                self.seen
            ));
        }
        let mut at = first;
        for x in chunk::each_result(blob) {
            let x = x.map_err(|e| format!("malformed chunk results: {e}"))?;
            at += 1;
            if at <= self.seen {
                continue;
            }
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
    /// The chunk request, to send again the items a dead worker never
    /// started.
    pub(crate) request: Payload,
    /// Its jobs, left in the scheduler's batch as they were (their sinks
    /// are taken one at a time, not collected first).
    pub(crate) jobs: forkrpc_pool::IntoIter<Job>,
    pub(crate) results: Results,
    pub(crate) shared: Arc<PoolState>,
    pub(crate) worker: WorkerId,
}

/// How many sinks ahead of the one completed [`next_sink`] asks for.
const AHEAD: usize = 8;

/// The next sink of a batch. The caller wrote the jobs on its own core;
/// asking for one [`AHEAD`] now overlaps fetching it with completing
/// the ones before it.
#[inline]
fn next_sink(jobs: &mut forkrpc_pool::IntoIter<Job>) -> Option<Sink> {
    if let Some(j) = jobs.ahead(AHEAD) {
        crate::prefetch::two_lines(j as *const (JobId, Job) as usize);
    }
    jobs.next().map(|(_, j)| j.into_sink())
}

impl Batch {
    fn fail(&mut self, e: Error) {
        let pid = self.results.pid;
        while let Some(s) = next_sink(&mut self.jobs) {
            complete(s, Err(e.clone()), pid);
        }
    }

    /// Sends the jobs left (the chunk's last items) again: the worker
    /// never started them. What cannot be read back fails with `e`.
    fn resend_rest(&mut self, e: Error) {
        let first = self.results.n - self.jobs.len();
        let blob = match self.request.octets() {
            Some(o) if chunk::is_chunk(&o) => o[1].clone(),
            _ => return self.fail(e),
        };
        let Ok(mut pos) = chunk::item_offset(&blob, first) else {
            return self.fail(e);
        };
        let mut again = Vec::with_capacity(self.jobs.len());
        for (id, job) in self.jobs.by_ref() {
            let sink = job.into_sink();
            let args = chunk::next_field(&blob, &mut pos)
                .ok()
                .and_then(|r| Octets::decode_in(&blob, r).ok())
                .and_then(|o| Payload::new(o).ok());
            match args {
                Some(p) => again.push((id, Job::new(Args::Payload(p), sink))),
                None => complete(sink, Err(e.clone()), self.results.pid),
            }
        }
        self.shared.resend(again);
    }

    /// Hands result `r` of the next item to its sink, unless an item was
    /// skipped (an earlier one panicked): from the first such item on, the
    /// jobs stay, to be sent again.
    fn deliver(
        jobs: &mut forkrpc_pool::IntoIter<Job>,
        skipped: &mut bool,
        r: Result<Octets>,
        pid: i32,
    ) {
        *skipped |= matches!(r, Err(Error::Skipped { .. }));
        if *skipped {
            return;
        }
        if let Some(s) = next_sink(jobs) {
            complete(s, r, pid);
        }
    }
}

impl ChunkWaiter for Batch {
    fn calls_left(&self) -> usize {
        self.results.left()
    }

    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        let (sinks, pid) = (&mut self.jobs, self.results.pid);
        self.results.each(results, |r| {
            if let Some(s) = next_sink(sinks) {
                complete(s, r, pid);
            }
        })
    }

    fn recovered(&mut self, first: usize, results: &Bytes) -> std::result::Result<(), String> {
        let (sinks, pid) = (&mut self.jobs, self.results.pid);
        self.results.each_from(first, results, |r| {
            if let Some(s) = next_sink(sinks) {
                complete(s, r, pid);
            }
        })
    }

    fn died(mut self: Box<Self>, running: Option<Error>, not_started: Error) {
        let pid = self.results.pid;
        let (shared, worker) = (self.shared.clone(), self.worker);
        shared.batch_done(worker, pid, move || {
            if let Some(e) = running {
                if let Some(s) = next_sink(&mut self.jobs) {
                    complete(s, Err(e), pid);
                }
            }
            self.resend_rest(not_started);
        });
    }

    fn end(mut self: Box<Self>, r: Result<Octets>) {
        let pid = self.results.pid;
        let (shared, worker) = (self.shared.clone(), self.worker);
        shared.batch_done(worker, pid, move || {
            let b = &mut *self;
            if let Err(e @ Error::NotStarted { .. }) = r {
                // Never sent (its worker had ended): every item again.
                return b.resend_rest(e);
            }
            let (sinks, results) = (&mut b.jobs, &mut b.results);
            let mut skipped = false;
            let e = match r
                .map(|reply| results.last(&reply, |r| Batch::deliver(sinks, &mut skipped, r, pid)))
            {
                Ok(Ok(())) => {
                    // Items after one that panicked did not run.
                    if skipped {
                        b.resend_rest(Error::NotStarted {
                            pid,
                            cause: "an earlier call of its batch panicked".into(),
                        });
                    }
                    return;
                }
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
    pub(crate) shared: Arc<PoolState>,
    pub(crate) worker: WorkerId,
    pub(crate) pid: i32,
}

impl ChunkWaiter for Ending {
    fn calls_left(&self) -> usize {
        self.inner.calls_left()
    }

    fn part(&mut self, results: &Bytes) -> std::result::Result<(), String> {
        self.inner.part(results)
    }

    fn recovered(&mut self, first: usize, results: &Bytes) -> std::result::Result<(), String> {
        self.inner.recovered(first, results)
    }

    fn died(self: Box<Self>, running: Option<Error>, not_started: Error) {
        (*self).done_then(move |inner| inner.died(running, not_started));
    }

    fn end(self: Box<Self>, r: Result<Octets>) {
        (*self).done_then(move |inner| inner.end(r));
    }
}

impl Ending {
    /// Tells the pool its batch is done, then hands the inner waiter to
    /// `f` (see [`PoolState::batch_done`]).
    fn done_then(self, f: impl FnOnce(Box<dyn ChunkWaiter>)) {
        let Ending {
            inner,
            shared,
            worker,
            pid,
        } = self;
        shared.batch_done(worker, pid, move || f(inner));
    }
}

/// A map's chunk: its results go to the map's arrivals.
pub(crate) struct MapChunk {
    pub(crate) sink: ChunkSink,
    pub(crate) results: Results,
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
