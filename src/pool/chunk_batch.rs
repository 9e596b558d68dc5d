//! Chunk frames for the pool (see [`chunk`]): a batch of small octets
//! calls to a sync worker travels as one request frame and comes back as
//! one reply (or a few parts, when handlers emit events mid-chunk), so
//! the driver and the worker handle one frame per batch instead of one
//! per call. Results are handed out part by part, in order.

use super::chunk_results::Results;
use super::job::{complete, Args, Job, Sink};
use super::staging::StagedBytes;
use crate::call::{ChunkWaiter, Payload};
use crate::error::{Error, Result};
use crate::wire::ber;
use crate::wire::chunk;
use crate::wire::Octets;
use crate::wire::SEND_IN_PLACE;
use bytes::{Bytes, BytesMut};
use forkrpc_pool::{JobId, WorkerId};
use std::sync::Arc;

/// What a batch's chunk needs of the pool that sent it. (A trait, so that
/// this file need not know the pool's state; `PoolState` implements it.)
pub(crate) trait BatchOwner: Send + Sync + 'static {
    /// Batch sent to worker `w` (process `pid`) is done once `last` has
    /// delivered its last results.
    fn batch_done(self: &Arc<Self>, w: WorkerId, pid: i32, last: impl FnOnce());
    /// Puts jobs that a dead worker never started back at the head of the
    /// queue, in order.
    fn resend(self: &Arc<Self>, jobs: Vec<(JobId, Job)>);
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
/// nothing else (see [`Staging`](super::staging::Staging)).
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

/// A pool's batch sent as one chunk: each call's sink gets its result as
/// it arrives; when the last has, the batch is done.
pub(crate) struct ChunkBatch<P: BatchOwner> {
    /// The chunk request, to send again the items a dead worker never
    /// started.
    pub(crate) request: Payload,
    /// Its jobs, left in the scheduler's batch as they were (their sinks
    /// are taken one at a time, not collected first).
    pub(crate) jobs: forkrpc_pool::IntoIter<Job>,
    pub(crate) results: Results,
    pub(crate) pool: Arc<P>,
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

impl<P: BatchOwner> ChunkBatch<P> {
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
        self.pool.resend(again);
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

impl<P: BatchOwner> ChunkWaiter for ChunkBatch<P> {
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
        let (pool, worker) = (self.pool.clone(), self.worker);
        pool.batch_done(worker, pid, move || {
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
        let (pool, worker) = (self.pool.clone(), self.worker);
        pool.batch_done(worker, pid, move || {
            let b = &mut *self;
            if let Err(e @ Error::NotStarted { .. }) = r {
                // Never sent (its worker had ended): every item again.
                return b.resend_rest(e);
            }
            let (sinks, results) = (&mut b.jobs, &mut b.results);
            let mut skipped = false;
            let e = match r
                .map(|reply| results.last(&reply, |r| Self::deliver(sinks, &mut skipped, r, pid)))
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
pub(crate) struct Ending<P: BatchOwner> {
    pub(crate) inner: Box<dyn ChunkWaiter>,
    pub(crate) pool: Arc<P>,
    pub(crate) worker: WorkerId,
    pub(crate) pid: i32,
}

impl<P: BatchOwner> ChunkWaiter for Ending<P> {
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

impl<P: BatchOwner> Ending<P> {
    /// Tells the pool its batch is done, then hands the inner waiter to
    /// `f` (see [`BatchOwner::batch_done`]).
    fn done_then(self, f: impl FnOnce(Box<dyn ChunkWaiter>)) {
        let Ending {
            inner,
            pool,
            worker,
            pid,
        } = self;
        pool.batch_done(worker, pid, move || f(inner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::payload::SMALL;
    use crate::call::Body;
    use crate::octets;
    use crate::pool::staging::{unstage, Staging};
    use crate::wire::sendq::SendQueue;

    fn sent(p: &Payload) -> Vec<u8> {
        let mut out = SendQueue::default();
        p.write(&mut out);
        out.buf.to_vec()
    }

    #[test]
    fn small_payloads_travel_encoded_inside_the_call() {
        let args = octets!["rmdir", "/tmp/x"];
        let p = Payload::new(args.clone()).unwrap();
        assert!(matches!(p.body, Body::Small(_)));
        assert!(p.is_octets());
        assert_eq!(p.len() as u64, args.encoded_len());
        assert_eq!(sent(&p), args.to_bytes());
        // SMALL bytes encoded fit; one more does not.
        let fits = octets![vec![7u8; SMALL - 1]];
        assert_eq!(fits.encoded_len(), SMALL as u64);
        assert!(matches!(
            Payload::new(fits.clone()).unwrap().body,
            Body::Small(_)
        ));
        let over = octets![vec![7u8; SMALL]];
        let p = Payload::new(over.clone()).unwrap();
        assert!(matches!(p.body, Body::Octets(_)));
        assert_eq!(sent(&p), over.to_bytes());
        // A codec's small frozen payload is copied as it is, not as octets.
        let frozen = Bytes::from_static(b"\x00\x01frozen");
        let p = Payload::new(frozen.clone()).unwrap();
        assert!(matches!(p.body, Body::Small(_)));
        assert!(!p.is_octets());
        assert_eq!(sent(&p), frozen);
        let frozen = [Args::Payload(p.clone()), Args::Payload(p)];
        let none = StagedBytes::default();
        assert!(request(frozen.iter(), &none).is_none());
    }

    #[test]
    fn chunks_of_small_and_large_payloads_match_the_wire_encoding() {
        let calls = [octets!["a"], octets![vec![1u8; 100]], octets!["b", "cd"]];
        let payloads: Vec<Payload> = calls
            .iter()
            .cloned()
            .map(|o| Payload::new(o).unwrap())
            .collect();
        let args: Vec<Args> = payloads.into_iter().map(Args::Payload).collect();
        let none = StagedBytes::default();
        let req = request(args.iter(), &none).expect("a chunk");
        let mut out = SendQueue::default();
        req.write(&mut out);
        assert_eq!(out.buf.to_vec(), chunk::request(calls.iter()).to_bytes());
        // One plain call alone goes as it is, not as a chunk.
        let one = [Args::Payload(Payload::new(octets!["a"]).unwrap())];
        assert!(request(one.iter(), &none).is_none());
    }

    /// A staged call's chunk item, as a pool's submit writes it.
    fn stage(o: &Octets, staging: &mut Staging) -> Args {
        Args::Staged(staging.stage(o, o.encoded_len() as u32))
    }

    /// The request's bytes on the wire.
    fn wire(req: &Payload) -> Vec<u8> {
        let mut out = SendQueue::default();
        req.write(&mut out);
        out.buf.to_vec()
    }

    /// A staged job's arguments read back from a batch's bytes, as sent.
    fn unstaged(staged: &StagedBytes, a: &Args) -> Vec<u8> {
        let Args::Staged(s) = a else {
            panic!("not a staged job")
        };
        wire(&unstage(&staged.item(*s)).unwrap())
    }

    #[test]
    fn chunks_of_staged_and_plain_calls_match_the_wire_encoding() {
        let calls = [
            octets!["a"],
            octets!["bc", ""],
            octets![vec![3u8; 200]],
            octets![],
        ];
        // Staged, plain, staged, plain: the staged items are cut from
        // their buffer in order, between the plain ones.
        let mut staging = Staging::default();
        let args = [
            stage(&calls[0], &mut staging),
            Args::Payload(Payload::new(calls[1].clone()).unwrap()),
            stage(&calls[2], &mut staging),
            Args::Payload(Payload::new(calls[3].clone()).unwrap()),
        ];
        let staged = staging.take(args.iter().map(Args::staged));
        let req = request(args.iter(), &staged).expect("a chunk");
        assert_eq!(wire(&req), chunk::request(calls.iter()).to_bytes());
        // All staged: the buffer is the blob; even one is a chunk.
        let lone = [stage(&calls[2], &mut staging)];
        let staged = staging.take(lone.iter().map(Args::staged));
        let req = request(lone.iter(), &staged).expect("a chunk");
        assert_eq!(wire(&req), chunk::request(calls[2..3].iter()).to_bytes());
        // And read back as a payload of its own, it is the call's.
        assert_eq!(unstaged(&staged, &lone[0]), calls[2].to_bytes());
        assert!(matches!(
            unstage(&Bytes::from_static(b"\x05ab")),
            Err(Error::Protocol { .. })
        ));
    }

    #[test]
    fn a_cancelled_staged_call_is_cut_out_of_the_later_chunks() {
        let calls = [
            octets!["a"],
            octets!["gone"],
            octets!["bc", "d"],
            octets!["e"],
        ];
        let mut staging = Staging::default();
        let mut args: Vec<Args> = calls.iter().map(|c| stage(c, &mut staging)).collect();
        // The first batch takes the first job only.
        let first = staging.take(args[..1].iter().map(Args::staged));
        let req = request(args[..1].iter(), &first).unwrap();
        assert_eq!(wire(&req), chunk::request(calls[..1].iter()).to_bytes());
        // The second is cancelled: its item goes, the later ones move up.
        let Args::Staged(gone) = args.remove(1) else {
            unreachable!()
        };
        let later = args.iter_mut().filter_map(|a| match a {
            Args::Staged(s) => Some(s),
            Args::Payload(_) => None,
        });
        staging.cut(gone, later);
        let rest = staging.take(args[1..].iter().map(Args::staged));
        let whole = chunk::request(calls[2..].iter()).to_bytes();
        let req = staged_request(&rest).unwrap();
        assert_eq!(wire(&req), whole);
        let req = request(args[1..].iter(), &rest).unwrap();
        assert_eq!(wire(&req), whole);
        assert_eq!(unstaged(&rest, &args[1]), calls[2].to_bytes());
        // A batch with no staged job takes no bytes, and none were left:
        // the next staged call's chunk is its item alone, as it stands.
        let plain = [Args::Payload(Payload::new(octets!["x"]).unwrap())];
        staging.take(plain.iter().map(Args::staged));
        let next = [stage(&calls[3], &mut staging)];
        let staged = staging.take(next.iter().map(Args::staged));
        let req = request(next.iter(), &staged).unwrap();
        assert_eq!(wire(&req), chunk::request(calls[3..].iter()).to_bytes());
    }

    use proptest::prelude::*;

    fn call() -> impl Strategy<Value = Octets> {
        let string = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..8),
            proptest::collection::vec(any::<u8>(), 8..200),
        ];
        proptest::collection::vec(string, 0..4)
            .prop_map(|v| Octets(v.into_iter().map(Bytes::from).collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Staged small calls (the fast path: their chunk items written by
        /// callers, a batch's chunk cut from the staging buffer) and their
        /// general twin (the chunk built from each call's payload) put the
        /// same chunk on the wire, the one `chunk::request` makes, whatever
        /// the mix of staged and plain jobs and whichever staged job was
        /// cancelled from the middle of the queue; and a staged job read
        /// back alone is its call's own payload.
        #[test]
        fn staged_chunks_match_chunks_built_from_payloads(
            calls in proptest::collection::vec(call(), 1..12),
            staged_mask in proptest::collection::vec(any::<bool>(), 12),
            cancel in any::<proptest::sample::Index>(),
            split in any::<proptest::sample::Index>(),
        ) {
            let mut staging = Staging::default();
            let mut calls = calls;
            let mut args: Vec<Args> = calls
                .iter()
                .zip(&staged_mask)
                .map(|(c, &st)| {
                    if st {
                        stage(c, &mut staging)
                    } else {
                        Args::Payload(Payload::new(c.clone()).unwrap())
                    }
                })
                .collect();
            // A job leaves from the middle of the queue (cancelled).
            if calls.len() > 1 {
                let k = cancel.index(calls.len());
                calls.remove(k);
                if let Args::Staged(gone) = args.remove(k) {
                    let later = args.iter_mut().filter_map(|a| match a {
                        Args::Staged(s) => Some(s),
                        Args::Payload(_) => None,
                    });
                    staging.cut(gone, later);
                }
            }
            // Two batches leave the front of the queue in turn.
            let cut = split.index(calls.len() + 1);
            for (batch, batch_calls) in [(&args[..cut], &calls[..cut]), (&args[cut..], &calls[cut..])] {
                let staged = staging.take(batch.iter().map(Args::staged));
                let general: Vec<Args> = batch_calls
                    .iter()
                    .map(|c| Args::Payload(Payload::new(c.clone()).unwrap()))
                    .collect();
                let fast = request(batch.iter(), &staged).map(|p| wire(&p));
                let twin = request(general.iter(), &StagedBytes::default()).map(|p| wire(&p));
                let all_staged = batch.iter().all(|a| a.staged().is_some());
                let expect = chunk::request(batch_calls.iter()).to_bytes().to_vec();
                match (fast, twin) {
                    (Some(f), Some(t)) => {
                        prop_assert_eq!(&f, &t);
                        prop_assert_eq!(&f, &expect);
                    }
                    // A lone plain call, or no call, travels as itself.
                    (None, None) => prop_assert!(batch.len() <= 1),
                    // A lone staged call is a chunk already.
                    (Some(f), None) => {
                        prop_assert!(batch.len() == 1 && all_staged);
                        prop_assert_eq!(f, expect);
                    }
                    (None, Some(_)) => prop_assert!(false, "only the general path made a chunk"),
                }
                if all_staged && !batch.is_empty() {
                    prop_assert_eq!(wire(&staged_request(&staged).unwrap()), chunk::request(batch_calls.iter()).to_bytes().to_vec());
                }
                for (a, c) in batch.iter().zip(batch_calls) {
                    if a.staged().is_some() {
                        prop_assert_eq!(unstaged(&staged, a), c.to_bytes().to_vec());
                    }
                }
            }
        }
    }
}
