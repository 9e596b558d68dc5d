//! The scheduler's actions carried out (under the lock), and batches
//! handed to workers' connections (without it): as one chunk frame, or a
//! call each with a waiter that tells the pool when the batch is done.

use super::chunk_batch::{self, BatchOwner, ChunkBatch, Ending};
use super::chunk_results::Results;
use super::job::{complete, Args, Job, Sink};
use super::map_chunk::{ChunkSink, RequeueChunk};
use super::staging::{self};
use super::state::{shutdown_queued, Deferred, Killed, Outgoing, PoolState, State};
use crate::error::Error;
use crate::rpc::{Call, Outcome, Payload, Waiter};
use forkrpc_pool::{Action, JobId, WorkerId};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One batch in flight: counts its calls down.
pub(super) struct Countdown {
    pub(super) left: AtomicUsize,
}

impl BatchOwner for PoolState {
    /// A batch sent to worker `w` is done once `last` has delivered its
    /// last results. The scheduler learns it first, so that a caller woken
    /// by `last` finds the worker's load lowered already; what that frees
    /// (the next sends, `on_destroy`) happens after `last`.
    fn batch_done(self: &Arc<Self>, w: WorkerId, pid: i32, last: impl FnOnce()) {
        let over = self
            .popts
            .max_rss
            .is_some_and(|limit| crate::process::rss_bytes(pid).is_some_and(|rss| rss > limit));
        let mut d = Deferred::default();
        {
            let mut st = self.lock();
            let now = self.now();
            st.sched.batch_done(now, w);
            if over {
                st.sched.retire(now, w);
            }
            self.execute(&mut st, &mut d);
        }
        // The next batch leaves before this one's results are handed out:
        // the worker need not wait for that (on the driver thread, it is
        // written once this reply's handling returns).
        for s in std::mem::take(&mut d.sends) {
            self.send(s);
        }
        last();
        self.finish(d);
    }

    /// Puts jobs that a dead worker never started back at the head of the
    /// queue, in order: they did not run, so sending them again runs them
    /// once. Once the close deadline has passed they fail instead.
    fn resend(self: &Arc<Self>, jobs: Vec<(JobId, Job)>) {
        if jobs.is_empty() {
            return;
        }
        self.with(|st, d| {
            if st.sched.is_aborted() {
                for (_, job) in jobs {
                    d.done
                        .push((job.into_sink(), Err(shutdown_queued()).into(), 0));
                }
                return;
            }
            let now = self.now();
            st.requeue(now, jobs);
        });
    }
}

/// As `resend`, for a chunk made anew: the items of a map's chunk that a
/// dead worker never started.
impl RequeueChunk for PoolState {
    fn requeue_chunk(self: Arc<Self>, args: Payload, sink: ChunkSink) {
        let job = Job::new(Args::Payload(args), Sink::Chunk(sink));
        self.with(|st, d| {
            if st.sched.is_aborted() {
                d.done
                    .push((job.into_sink(), Err(shutdown_queued()).into(), 0));
                return;
            }
            let now = self.now();
            st.submit_front(now, job);
        });
    }
}

impl PoolState {
    /// Carries out the scheduler's actions (under the lock).
    pub(super) fn execute(self: &Arc<Self>, st: &mut State, d: &mut Deferred) {
        loop {
            let actions = st.sched.actions();
            if actions.is_empty() {
                // (Not between actions: the queue has lost the jobs of
                // every send at once, the count only those handled.)
                debug_assert!(st.odd <= st.sched.queued(), "odd jobs miscounted");
                return;
            }
            for a in actions {
                match a {
                    Action::Start(w) => {
                        st.to_start.push(w);
                        self.manager.notify_one();
                    }
                    Action::Send { worker, jobs } => {
                        d.wake_space = self.popts.queue_limit.is_some();
                        // The queue's front: so are their bytes.
                        let (staged, uniform) = st.leaving(jobs.iter().map(|(_, j)| j));
                        match st.workers.get(&worker).and_then(|s| s.rpc.clone()) {
                            Some(rpc) => {
                                if self.tracking {
                                    for (id, _) in jobs.iter() {
                                        if let Some(t) = st.tracked.get_mut(id) {
                                            t.worker = Some(worker);
                                        }
                                    }
                                }
                                d.sends.push(Outgoing {
                                    rpc,
                                    worker,
                                    jobs,
                                    staged,
                                    uniform,
                                });
                            }
                            // Cannot happen: the scheduler sends only to
                            // started workers, and stops them only idle.
                            None => {
                                for (_, job) in jobs {
                                    d.done.push((job.sink, Err(Error::Closed).into(), 0));
                                }
                            }
                        }
                    }
                    Action::Stop(w) => {
                        if let Some(s) = st.workers.get_mut(&w) {
                            s.rpc = None; // closing drains it
                        }
                    }
                    Action::Kill(w) => {
                        if let Some(s) = st.workers.get_mut(&w) {
                            s.killed = Some(Killed::Deadline);
                            let e = Error::Shutdown {
                                detail: format!(
                                    "worker {} was killed when the close deadline passed",
                                    s.pid
                                ),
                            };
                            match s.rpc.take() {
                                Some(rpc) => rpc.kill_with(e),
                                None => crate::process::kill(s.pid),
                            }
                        }
                    }
                    Action::Fail(jobs) => {
                        // Taken from the queue: so are their bytes.
                        st.leaving(jobs.iter().map(|(_, j)| j));
                        for (id, job) in jobs {
                            let sink = match st.tracked.remove(&id) {
                                Some(t) => t.sink,
                                None => job.sink,
                            };
                            d.done.push((sink, Err(shutdown_queued()).into(), 0));
                        }
                    }
                    Action::Timer(t) => {
                        st.timer = t;
                        self.manager.notify_one();
                    }
                    Action::Backoff { deaths, until } => {
                        let backoff = until.saturating_sub(self.now());
                        d.reports.push(Error::CrashLoop { deaths, backoff });
                    }
                    Action::Destroyed => {
                        d.destroyed = true;
                        st.manager_exit = true;
                        d.wake_space = true;
                        self.manager.notify_one();
                    }
                }
            }
            if d.wake_space {
                for w in st.space_wakers.drain(..) {
                    w.wake();
                }
            }
        }
    }

    /// Hands a batch to worker `w`'s connection (without the lock).
    pub(super) fn send(self: &Arc<Self>, s: Outgoing) {
        let Outgoing {
            rpc,
            worker: w,
            jobs,
            staged,
            uniform,
        } = s;
        let pid = rpc.pid();
        let plain = |(_, j): &(JobId, Job)| matches!(j.sink, Sink::One(_));
        if self.chunks && (uniform || jobs.iter().all(plain)) {
            // Uniform: the chunk is the staged bytes as they stand, and
            // the jobs are not read until their results arrive.
            let args = if uniform {
                chunk_batch::staged_request(&staged)
            } else {
                chunk_batch::request(jobs.iter().map(|(_, j)| &j.args), &staged)
            };
            if let Some(args) = args {
                let n = jobs.len();
                let request = args.clone();
                let done = Waiter::Chunk(Box::new(ChunkBatch {
                    request,
                    jobs: jobs.into_iter(),
                    results: Results::new(pid, n),
                    pool: self.clone(),
                    worker: w,
                }));
                rpc.submit_batch(vec![Call { args, done }]);
                return;
            }
        }
        // One call each: staged arguments become payloads again.
        let mut each = Vec::with_capacity(jobs.len());
        for (id, job) in jobs {
            let args = match job.args {
                Args::Payload(p) => p,
                Args::Staged(k) => match staging::unstage(&staged.item(k)) {
                    Ok(p) => p,
                    Err(e) => {
                        complete(job.sink, Err(e), pid);
                        continue;
                    }
                },
            };
            each.push((id, args, job.sink));
        }
        let n = each.len();
        if n == 0 {
            return self.batch_done(w, pid, || {});
        }
        let in_order = self.sync_workers();
        let batch = (self.tracking || !in_order).then(|| {
            Arc::new(Countdown {
                left: AtomicUsize::new(n),
            })
        });
        let mut calls = Vec::with_capacity(n);
        for (i, (id, args, sink)) in each.into_iter().enumerate() {
            let pool = self.clone();
            // Wrappers pass the reply on in the form the call's own waiter
            // takes it: a typed call's payload is no list of strings.
            let raw = sink.wants_raw();
            let done = match &batch {
                Some(batch) if self.tracking => {
                    let batch = batch.clone();
                    Waiter::relay(raw, move |r| pool.tracked_reply(w, pid, id, r, &batch))
                }
                // Async workers answer in any order: the batch is done
                // when its last answer comes. A call it never started is
                // sent again.
                Some(batch) => {
                    let (batch, again) = (batch.clone(), args.clone());
                    Waiter::relay(raw, move |r| {
                        let deliver = || pool.deliver_or_resend(id, again, sink, r, pid);
                        if batch.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                            pool.batch_done(w, pid, deliver);
                        } else {
                            deliver();
                        }
                    })
                }
                // A sync worker answers in order: the batch is done when
                // its last call is. A call it never started (it died in
                // an earlier one) is sent again (a map's chunk does that
                // itself).
                None => {
                    let last = i + 1 == n;
                    match sink {
                        Sink::Chunk(c) if last => Waiter::Chunk(Box::new(Ending {
                            inner: c.chunk(pid),
                            pool,
                            worker: w,
                            pid,
                        })),
                        Sink::Chunk(c) => c.waiter(pid),
                        sink => {
                            let again = args.clone();
                            Waiter::relay(raw, move |r| {
                                let deliver = || pool.deliver_or_resend(id, again, sink, r, pid);
                                if last {
                                    pool.batch_done(w, pid, deliver)
                                } else {
                                    deliver()
                                }
                            })
                        }
                    }
                }
            };
            calls.push(Call { args, done });
        }
        rpc.submit_batch(calls);
    }

    /// Delivers call `id`'s outcome to `sink`, or sends the call (its
    /// arguments `again`) once more if its worker never started it.
    fn deliver_or_resend(
        self: &Arc<Self>,
        id: JobId,
        again: Payload,
        sink: Sink,
        r: Outcome,
        pid: i32,
    ) {
        match r.error() {
            Some(Error::NotStarted { .. }) => {
                self.resend(vec![(id, Job::new(Args::Payload(again), sink))])
            }
            _ => complete(sink, r, pid),
        }
    }
}
