//! The pool's state under one lock, the scheduler's actions carried out,
//! and the manager thread.
//!
//! Locking: the state lock is taken by callers (submit), by reply
//! callbacks on the driver thread (once per finished batch; once per call
//! when retries, timeouts or a memory ceiling need per-call bookkeeping)
//! and by the manager thread. User code never runs under it: completions
//! decided under the lock are collected and run after it is released.
//! Forking a worker (a round trip to the template) happens on the manager
//! thread without the lock.

use super::chunk_batch::{self, BatchOwner, ChunkBatch, Ending};
use super::chunk_results::Results;
use super::job::{complete, fail_sink, Args, Incoming, Job, Sink};
use super::map_chunk::{ChunkSink, RequeueChunk};
use super::options::{Admit, PoolOptions, PoolStats};
use super::staging::{self, StagedBytes, Staging};
use crate::child::registry;
use crate::error::{Error, Result};
use crate::latch::Latch;
use crate::rpc::{Body, Call, Options, Outcome, Payload, Rpc, Waiter};
use crate::template::Template;
use crate::wire::RETIRE_TAG;
use crate::Octets;
use forkrpc_pool::{Action, JobId, Jobs, Scheduler, WorkerId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

/// Per-call bookkeeping when retries, timeouts or a memory ceiling are on:
/// the job's sink waits here (not in the reply callback) so that a timeout
/// can take it first.
struct Tracked {
    sink: Sink,
    /// A copy of the arguments, to resend.
    args: Payload,
    retries: u32,
    worker: Option<WorkerId>,
    /// When it times out (restarted when it is resent through no fault of
    /// its own).
    deadline: Option<Instant>,
}

/// Why the pool killed a worker.
#[derive(Clone, Copy)]
enum Killed {
    /// Job `0` overran the timeout on it.
    Timeout(JobId),
    /// The close deadline passed.
    Deadline,
}

struct Slot {
    rpc: Option<Rpc>,
    pid: i32,
    killed: Option<Killed>,
}

/// One batch in flight: counts its calls down.
struct Countdown {
    left: AtomicUsize,
}

pub(crate) struct State {
    sched: Scheduler<Job>,
    workers: HashMap<WorkerId, Slot>,
    /// Workers whose connection ended before their slot was filled in.
    ended_early: HashSet<WorkerId>,
    to_start: Vec<WorkerId>,
    timer: Option<Duration>,
    tracked: HashMap<JobId, Tracked>,
    deadlines: BinaryHeap<Reverse<(Instant, JobId)>>,
    space_wakers: Vec<Waker>,
    /// The staged jobs' arguments (see [`Args::Staged`]), in queue order:
    /// whatever takes jobs out of the queue takes their bytes from here.
    staging: Staging,
    /// Queued jobs that are odd (see [`Job::is_odd`]): while there are
    /// none, a batch is known to be all staged without looking at it.
    odd: usize,
    /// Why recently ended workers were killed (their failed calls are
    /// handled after the worker is gone); the last few only.
    killed: std::collections::VecDeque<(WorkerId, Killed)>,
    manager_exit: bool,
}

impl State {
    /// Queues a job.
    #[inline(always)] // see `PoolState::submit_small`
    fn submit(&mut self, now: Duration, job: Job) -> JobId {
        self.odd += usize::from(job.is_odd());
        self.sched.submit(now, job)
    }

    /// Puts jobs back at the head of the queue (see `Scheduler::requeue`).
    fn requeue(&mut self, now: Duration, jobs: Vec<(JobId, Job)>) {
        self.odd += jobs.iter().filter(|(_, j)| j.is_odd()).count();
        self.sched.requeue(now, jobs);
    }

    /// Queues a new job at the head of the queue.
    fn submit_front(&mut self, now: Duration, job: Job) -> JobId {
        self.odd += usize::from(job.is_odd());
        self.sched.submit_front(now, job)
    }

    /// Jobs that just left the front of the queue (sent, failed): their
    /// staged bytes, and whether none of them is odd. Looks at the jobs
    /// only when some in the queue are odd.
    fn leaving<'a>(
        &mut self,
        jobs: impl DoubleEndedIterator<Item = &'a Job> + Clone,
    ) -> (StagedBytes, bool) {
        let k = match self.odd {
            0 => 0,
            _ => jobs.clone().filter(|j| j.is_odd()).count(),
        };
        self.odd -= k;
        let uniform = k == 0;
        (self.staging.take(jobs.map(|j| j.args.staged())), uniform)
    }

    /// Takes job `id` out of the queue if it is still there.
    fn cancel(&mut self, now: Duration, id: JobId) -> Option<Job> {
        let job = self.sched.cancel(now, id)?;
        self.odd -= usize::from(job.is_odd());
        if let Args::Staged(s) = job.args {
            let later = self
                .sched
                .queued_jobs_mut()
                .filter_map(|(_, j)| match &mut j.args {
                    Args::Staged(t) => Some(t),
                    Args::Payload(_) => None,
                });
            self.staging.cut(s, later);
        }
        Some(job)
    }

    fn kill_reason(&self, w: WorkerId) -> Option<Killed> {
        match self.workers.get(&w) {
            Some(s) => s.killed,
            None => self.killed.iter().find(|k| k.0 == w).map(|k| k.1),
        }
    }
}

pub(crate) struct PoolState {
    st: Mutex<State>,
    /// Wakes the manager thread (starts to do, timer changed).
    manager: Condvar,
    /// Wakes callers blocked on a full queue.
    space: Condvar,
    template: Template,
    handler: String,
    opts: Options,
    pub(crate) popts: PoolOptions,
    /// Per-call bookkeeping needed (retries, timeout, memory ceiling).
    tracking: bool,
    /// Calls may travel in chunk frames (see `chunk_batch.rs`): sync workers
    /// with an octets handler, and no per-call bookkeeping (a chunk is
    /// one call to the engine: it has one timeout, one retry).
    chunks: bool,
    /// Workers read big strings of calls in the shared arena.
    arena: Option<&'static crate::arena::Arena>,
    epoch: Instant,
    on_destroy: Option<Arc<dyn Fn() + Send + Sync>>,
    pub(crate) end: Arc<Latch<Result<()>>>,
}

/// A batch to hand to a worker's connection.
struct Outgoing {
    rpc: Rpc,
    worker: WorkerId,
    jobs: Jobs<Job>,
    /// The staged jobs' bytes, in order.
    staged: StagedBytes,
    /// No job is odd: all staged, each with its own waiter.
    uniform: bool,
}

/// What to do once the lock is released.
#[derive(Default)]
struct Deferred {
    sends: Vec<Outgoing>,
    done: Vec<(Sink, Outcome, i32)>,
    destroyed: bool,
    wake_space: bool,
    /// For `on_error` (or stderr): a crash loop's back-off.
    reports: Vec<Error>,
}

impl PoolState {
    pub(crate) fn new(
        template: &Template,
        handler: &str,
        mut opts: Options,
        popts: PoolOptions,
    ) -> Result<Arc<PoolState>> {
        let kind = registry::handler(handler)?;
        let tracking = popts.retries > 0 || popts.timeout.is_some() || popts.max_rss.is_some();
        let chunks = !opts.asynchronous && !tracking && matches!(kind, registry::Handler::Sync(_));
        if kind.is_async() && !opts.asynchronous {
            return Err(Error::NeedsAsync {
                name: handler.to_owned(),
            });
        }
        if let Some(init) = &opts.init {
            registry::init(init)?;
        }
        let arena = crate::arena::arena();
        let epoch = Instant::now();
        let sched = Scheduler::new(popts.cfg.clone(), Duration::ZERO);
        let on_destroy = opts.on_destroy.take();
        let shared = Arc::new(PoolState {
            st: Mutex::new(State {
                sched,
                workers: HashMap::new(),
                ended_early: HashSet::new(),
                to_start: Vec::new(),
                timer: None,
                tracked: HashMap::new(),
                deadlines: BinaryHeap::new(),
                space_wakers: Vec::new(),
                staging: Staging::default(),
                odd: 0,
                killed: std::collections::VecDeque::new(),
                manager_exit: false,
            }),
            manager: Condvar::new(),
            space: Condvar::new(),
            template: template.clone(),
            handler: handler.to_owned(),
            opts,
            popts,
            tracking,
            chunks,
            arena,
            epoch,
            on_destroy,
            end: Latch::new(),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("forkrpc-pool".into())
            .spawn(move || sh.manage())
            .map_err(|e| Error::io("starting the pool's manager thread", e))?;
        shared.with(|_, _| {}); // carry out the scheduler's first actions
        Ok(shared)
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` under the lock, carries out the scheduler's actions, then
    /// runs what was deferred after unlocking.
    fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut State, &mut Deferred) -> R) -> R {
        let mut d = Deferred::default();
        let r = {
            let mut st = self.lock();
            let r = f(&mut st, &mut d);
            self.execute(&mut st, &mut d);
            r
        };
        self.finish(d);
        r
    }

    fn finish(self: &Arc<Self>, d: Deferred) {
        for s in d.sends {
            self.send(s);
        }
        for e in d.reports {
            self.report(e);
        }
        if d.wake_space {
            self.space.notify_all();
        }
        for (sink, r, pid) in d.done {
            complete(sink, r, pid);
        }
        if d.destroyed {
            if let Some(f) = &self.on_destroy {
                f();
            }
            self.end.set(Ok(()));
        }
    }

    /// Queues a call; returns its job id.
    pub(crate) fn submit(
        self: &Arc<Self>,
        args: impl Into<Body>,
        waiter: Waiter,
        admit: Admit,
    ) -> Result<JobId> {
        let body = match args.into() {
            Body::Octets(o) if self.chunks => {
                match crate::rpc::plain_octets_len(&o)
                    .filter(|&n| (n as usize) < crate::wire::SEND_IN_PLACE)
                {
                    Some(n) => return self.submit_small(o, n, waiter, admit),
                    None => Body::Octets(o),
                }
            }
            body => body,
        };
        match Payload::new(body) {
            Ok(mut p) => {
                if let Some(a) = self.arena {
                    p.share(
                        a,
                        crate::wire::frame::request_header(self.opts.asynchronous),
                    );
                }
                self.submit_job(Incoming::Payload(p), Sink::One(waiter), admit)
            }
            Err(e) => {
                waiter.complete(Err(e.clone()));
                Err(e)
            }
        }
    }

    /// A small octets call. The common case, a call joining a waiting
    /// queue, is staged here with nothing else to do; anything else takes
    /// [`PoolState::submit_job`]. Kept apart so that its job is built where
    /// it is stored: each move of a job just written stalls on store
    /// forwarding, and the general path moved it several times.
    fn submit_small(
        self: &Arc<Self>,
        o: Octets,
        n: u32,
        waiter: Waiter,
        admit: Admit,
    ) -> Result<JobId> {
        if self.popts.queue_limit.is_some() {
            return self.submit_job(Incoming::Small(o, n), Sink::One(waiter), admit);
        }
        crate::engine::collect_leftovers();
        let (id, next_slot, d) = {
            let mut st = self.lock();
            if st.sched.queued() == 0 || st.sched.is_closing() {
                drop(st);
                return self.submit_job(Incoming::Small(o, n), Sink::One(waiter), admit);
            }
            let args = Args::Staged(st.staging.stage(&o, n));
            // It only waits: the scheduler's last time is good enough.
            let now = st.sched.now();
            let id = st.submit(
                now,
                Job {
                    args,
                    sink: Sink::One(waiter),
                },
            );
            let mut d = None;
            if st.sched.has_actions() {
                let mut deferred = Deferred::default();
                self.execute(&mut st, &mut deferred);
                d = Some(deferred);
            }
            (id, st.sched.queue_tail_hint(), d)
        };
        crate::prefetch::two_lines(next_slot);
        drop(o);
        if let Some(d) = d {
            self.finish(d);
        }
        Ok(id)
    }

    pub(crate) fn submit_job(
        self: &Arc<Self>,
        args: Incoming,
        sink: Sink,
        admit: Admit,
    ) -> Result<JobId> {
        let admit = if crate::driver_thread::on_driver_thread() {
            Admit::Force
        } else {
            // The driver sends this pool's jobs, so its callers never queue
            // engine commands that would take its leftovers: take them here.
            crate::engine::collect_leftovers();
            admit
        };
        let mut d = Deferred::default();
        let next_slot;
        // Staged arguments, freed after the lock.
        let mut spent = None;
        let r = {
            let mut st = self.lock();
            if let Some(limit) = self.popts.queue_limit {
                while st.sched.queued() >= limit && !st.sched.is_closing() {
                    match admit {
                        Admit::Force => break,
                        Admit::Fail => {
                            drop(st);
                            fail_sink(sink, Error::QueueFull { limit }, 0);
                            return Err(Error::QueueFull { limit });
                        }
                        Admit::Block => st = self.space.wait(st).unwrap_or_else(|p| p.into_inner()),
                    }
                }
            }
            if st.sched.is_closing() {
                drop(st);
                fail_sink(sink, Error::Closed, 0);
                return Err(Error::Closed);
            }
            // A job joining a non-empty queue only waits: the scheduler's
            // last time is good enough, and reading the clock is not free.
            let now = if st.sched.queued() == 0 {
                self.now()
            } else {
                st.sched.now()
            };
            let args = match args {
                Incoming::Payload(p) => Args::Payload(p),
                // It will wait (see `Scheduler::submit`): stage it. (Only
                // pools with a queue limit get here so; the others stage
                // in `submit_small`.)
                Incoming::Small(o, n) if st.sched.queued() > 0 => {
                    let staged = st.staging.stage(&o, n);
                    spent = Some(o);
                    Args::Staged(staged)
                }
                // It may leave at once, alone: a plain call.
                Incoming::Small(o, _) => match Payload::new(o) {
                    Ok(p) => Args::Payload(p),
                    Err(e) => {
                        drop(st);
                        fail_sink(sink, e.clone(), 0);
                        return Err(e);
                    }
                },
            };
            let r = if self.tracking {
                // Only pools that send chunks stage, and those track nothing.
                let Args::Payload(args) = args else {
                    unreachable!("a tracking pool staged a job")
                };
                let retries = self.popts.retries;
                let deadline = self.popts.timeout.map(|t| Instant::now() + t);
                let raw = sink.wants_raw();
                let tracked = Tracked {
                    sink,
                    args: args.clone(),
                    retries,
                    worker: None,
                    deadline,
                };
                let id = st.submit(
                    now,
                    Job {
                        args: Args::Payload(args),
                        sink: Sink::Tracked { raw },
                    },
                );
                st.tracked.insert(id, tracked);
                if let Some(d) = deadline {
                    st.deadlines.push(Reverse((d, id)));
                    self.manager.notify_one();
                }
                id
            } else {
                st.submit(now, Job { args, sink })
            };
            self.execute(&mut st, &mut d);
            next_slot = st.sched.queue_tail_hint();
            r
        };
        // As for the engine's queue (see `prefetch`): the driver took the
        // last jobs from these lines.
        crate::prefetch::two_lines(next_slot);
        drop(spent);
        self.finish(d);
        Ok(r)
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

    /// Sync workers: they answer in order.
    pub(crate) fn sync_workers(&self) -> bool {
        !self.opts.asynchronous
    }

    /// Calls may travel in chunk frames (see the field).
    pub(crate) fn chunks(&self) -> bool {
        self.chunks
    }

    /// True when a queue limit is set and reached.
    pub(crate) fn queue_full(&self) -> bool {
        match self.popts.queue_limit {
            Some(limit) if !crate::driver_thread::on_driver_thread() => {
                let st = self.lock();
                st.sched.queued() >= limit && !st.sched.is_closing()
            }
            _ => false,
        }
    }

    /// Room in the queue (registers the waker if there is none).
    pub(crate) fn has_room(&self, cx: &mut Context<'_>) -> bool {
        let Some(limit) = self.popts.queue_limit else {
            return true;
        };
        if crate::driver_thread::on_driver_thread() {
            return true;
        }
        let mut st = self.lock();
        if st.sched.queued() < limit || st.sched.is_closing() {
            return true;
        }
        st.space_wakers.push(cx.waker().clone());
        false
    }

    /// The caller gave up on job `id`: take it out of the queue if it is
    /// still there.
    pub(crate) fn cancel(self: &Arc<Self>, id: JobId) {
        self.with(|st, d| {
            let now = self.now();
            if st.cancel(now, id).is_some() {
                st.tracked.remove(&id);
                d.wake_space = true;
            }
        });
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            active: st.sched.active(),
            workers: st.sched.workers().count(),
            queued: st.sched.queued(),
            pids: st.workers.values().map(|s| s.pid).collect(),
        }
    }

    pub(crate) fn close(self: &Arc<Self>, deadline: Option<Duration>) {
        self.with(|st, _| {
            let now = self.now();
            st.sched.close(now, deadline.map(|d| now + d));
        });
    }

    /// Carries out the scheduler's actions (under the lock).
    fn execute(self: &Arc<Self>, st: &mut State, d: &mut Deferred) {
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
    fn send(self: &Arc<Self>, s: Outgoing) {
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
            let sh = self.clone();
            // Wrappers pass the reply on in the form the call's own waiter
            // takes it: a typed call's payload is no list of strings.
            let raw = sink.wants_raw();
            let done = match &batch {
                Some(batch) if self.tracking => {
                    let batch = batch.clone();
                    Waiter::relay(raw, move |r| sh.tracked_reply(w, pid, id, r, &batch))
                }
                // Async workers answer in any order: the batch is done
                // when its last answer comes. A call it never started is
                // sent again.
                Some(batch) => {
                    let (batch, again) = (batch.clone(), args.clone());
                    Waiter::relay(raw, move |r| {
                        let deliver = || sh.deliver_or_resend(id, again, sink, r, pid);
                        if batch.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                            sh.batch_done(w, pid, deliver);
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
                            pool: sh,
                            worker: w,
                            pid,
                        })),
                        Sink::Chunk(c) => c.waiter(pid),
                        sink => {
                            let again = args.clone();
                            Waiter::relay(raw, move |r| {
                                let deliver = || sh.deliver_or_resend(id, again, sink, r, pid);
                                if last {
                                    sh.batch_done(w, pid, deliver)
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

    /// A reply on the tracked path: resolve, resend or drop (timed out).
    fn tracked_reply(
        self: &Arc<Self>,
        w: WorkerId,
        pid: i32,
        id: JobId,
        r: Outcome,
        batch: &Countdown,
    ) {
        let last = batch.left.fetch_sub(1, Ordering::AcqRel) == 1;
        let over = last
            && self
                .popts
                .max_rss
                .is_some_and(|limit| rss_bytes(pid).is_some_and(|rss| rss > limit));
        self.with(|st, d| {
            let now = self.now();
            if let Some(mut t) = st.tracked.remove(&id) {
                let killed = st.kill_reason(w);
                let died = matches!(r.error(), Some(Error::WorkerExited { .. }));
                // Never started (its worker died in an earlier call), or
                // queued behind a call that overran: it did not run.
                let not_started = matches!(r.error(), Some(Error::NotStarted { .. }))
                    && !matches!(killed, Some(Killed::Deadline));
                let behind_timeout =
                    not_started || (matches!(killed, Some(Killed::Timeout(j)) if j != id) && died);
                if behind_timeout
                    || (died && t.retries > 0 && !matches!(killed, Some(Killed::Deadline)))
                {
                    // Resend: it never started (queued behind a call that
                    // overran), or retries are allowed.
                    if behind_timeout {
                        // Its time restarts: it waited for someone else.
                        if let Some(to) = self.popts.timeout {
                            let d = Instant::now() + to;
                            t.deadline = Some(d);
                            st.deadlines.push(Reverse((d, id)));
                            self.manager.notify_one();
                        }
                    } else {
                        t.retries -= 1;
                    }
                    t.worker = None;
                    let args = t.args.clone();
                    let raw = t.sink.wants_raw();
                    st.tracked.insert(id, t);
                    st.requeue(
                        now,
                        vec![(
                            id,
                            Job {
                                args: Args::Payload(args),
                                sink: Sink::Tracked { raw },
                            },
                        )],
                    );
                } else {
                    d.done.push((t.sink, r, pid));
                }
            }
            if last {
                st.sched.batch_done(now, w);
                if over {
                    st.sched.retire(now, w);
                }
            }
        });
    }

    /// The options of worker `w`: the user's, with the pool's hooks.
    fn worker_opts(self: &Arc<Self>, w: WorkerId) -> Options {
        let mut o = self.opts.clone();
        let user_event = o.on_event.take();
        let weak = Arc::downgrade(self);
        o.on_event = Some(Arc::new(move |ev: Octets| {
            if ev.len() == 1 && ev[0][..] == *RETIRE_TAG.as_bytes() {
                if let Some(sh) = weak.upgrade() {
                    sh.with(|st, _| {
                        let now = sh.now();
                        st.sched.retire(now, w)
                    });
                }
            } else if let Some(f) = &user_event {
                f(ev)
            }
        }));
        let weak = Arc::downgrade(self);
        o.on_fatal = Some(Arc::new(move || {
            // It is about to exit: no new jobs for it.
            if let Some(sh) = weak.upgrade() {
                sh.with(|st, _| {
                    let now = sh.now();
                    st.sched.retire(now, w)
                });
            }
        }));
        let weak = Arc::downgrade(self);
        o.on_end = Some(Arc::new(move |_| {
            if let Some(sh) = weak.upgrade() {
                sh.worker_ended(w);
            }
        }));
        o
    }

    fn worker_ended(self: &Arc<Self>, w: WorkerId) {
        self.with(|st, _| {
            match st.workers.remove(&w) {
                None => {
                    st.ended_early.insert(w);
                }
                Some(Slot {
                    killed: Some(k), ..
                }) => {
                    if st.killed.len() >= 64 {
                        st.killed.pop_front();
                    }
                    st.killed.push_back((w, k));
                }
                Some(_) => {}
            }
            let now = self.now();
            st.sched.exited(now, w);
        });
    }

    /// The manager thread: forks workers and fires timers.
    fn manage(self: Arc<Self>) {
        loop {
            let starts = {
                let mut st = self.lock();
                loop {
                    if !st.to_start.is_empty() {
                        break;
                    }
                    if st.manager_exit {
                        return;
                    }
                    let now = Instant::now();
                    let timer = st.timer.map(|t| self.epoch + t);
                    let next = [timer, st.deadlines.peek().map(|r| r.0 .0)]
                        .into_iter()
                        .flatten()
                        .min();
                    match next {
                        Some(t) if t <= now => break,
                        Some(t) => {
                            st = self
                                .manager
                                .wait_timeout(st, t - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        None => st = self.manager.wait(st).unwrap_or_else(|p| p.into_inner()),
                    }
                }
                std::mem::take(&mut st.to_start)
            };
            self.with(|st, d| self.fire(st, d));
            for w in starts {
                let r = self.template.fork().run(&self.handler, self.worker_opts(w));
                self.started(w, r);
            }
        }
    }

    /// Fires the timer and the call deadlines that are due.
    fn fire(self: &Arc<Self>, st: &mut State, d: &mut Deferred) {
        let now = self.now();
        if st.timer.is_some_and(|t| t <= now) {
            st.sched.tick(now);
        }
        let Some(timeout) = self.popts.timeout else {
            return;
        };
        let instant = Instant::now();
        while let Some(&Reverse((t, id))) = st.deadlines.peek() {
            if t > instant {
                break;
            }
            st.deadlines.pop();
            let Some(tracked) = st.tracked.get(&id) else {
                continue;
            };
            if tracked.deadline.is_some_and(|d| d > instant) {
                continue; // restarted; a later entry stands for it
            }
            let worker = tracked.worker;
            let behind_killed = worker
                .and_then(|w| st.kill_reason(w))
                .is_some_and(|k| matches!(k, Killed::Timeout(j) if j != id));
            if behind_killed {
                continue; // it never started; it is resent with a new deadline
            }
            match worker {
                None => {
                    st.cancel(now, id);
                }
                Some(w) => {
                    if self.sync_workers() {
                        if let Some(s) = st.workers.get_mut(&w) {
                            if s.killed.is_none() {
                                s.killed = Some(Killed::Timeout(id));
                                crate::process::kill(s.pid);
                                // No new jobs for it: it is about to die.
                                st.sched.retire(now, w);
                            }
                        }
                    }
                }
            }
            let t = st.tracked.remove(&id).unwrap();
            d.done
                .push((t.sink, Err(Error::Timeout { after: timeout }).into(), 0));
        }
    }

    /// A worker's fork finished.
    fn started(self: &Arc<Self>, w: WorkerId, r: Result<Rpc>) {
        let mut report = None;
        self.with(|st, d| {
            let now = self.now();
            match r {
                Ok(rpc) => {
                    if st.ended_early.remove(&w) {
                        return; // it died at once; `exited` was reported
                    }
                    let pid = rpc.pid();
                    st.workers.insert(
                        w,
                        Slot {
                            rpc: Some(rpc),
                            pid,
                            killed: None,
                        },
                    );
                    st.sched.started(now, w);
                }
                Err(e) => {
                    st.sched.start_failed(now, w);
                    if st.sched.active() == 0 {
                        // Nothing can run the queue: fail it rather than
                        // let it wait for ever.
                        let jobs = st.sched.take_queue(now);
                        st.leaving(jobs.iter().map(|(_, j)| j));
                        for (id, job) in jobs {
                            let sink = st.tracked.remove(&id).map_or(job.sink, |t| t.sink);
                            d.done.push((sink, Err(e.clone()).into(), 0));
                        }
                    }
                    report = Some(e);
                }
            }
        });
        if let Some(e) = report {
            self.report(e);
        }
    }

    /// Tells the user about a pool-wide problem: `on_error`, else stderr.
    fn report(&self, e: Error) {
        if let Some(f) = &self.opts.on_error {
            f(e)
        } else {
            eprintln!("forkrpc: pool: {e}");
        }
    }
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
            .is_some_and(|limit| rss_bytes(pid).is_some_and(|rss| rss > limit));
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

/// Why a call still queued fails when the close deadline has passed.
fn shutdown_queued() -> Error {
    Error::Shutdown {
        detail: "it was still queued when the close deadline passed".into(),
    }
}

/// Resident memory of `pid` in bytes, from /proc/PID/statm.
fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes an integer and has no other preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}
