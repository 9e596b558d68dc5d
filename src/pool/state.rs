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

use super::job::{complete, Args, Job, Sink};
use super::options::{PoolOptions, PoolStats};
use super::staging::{StagedBytes, Staging};
use crate::child::registry;
use crate::error::{Error, Result};
use crate::latch::Latch;
use crate::rpc::{Options, Outcome, Payload, Rpc};
use crate::template::Template;
use forkrpc_pool::{JobId, Jobs, Scheduler, WorkerId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

/// Per-call bookkeeping when retries, timeouts or a memory ceiling are on:
/// the job's sink waits here (not in the reply callback) so that a timeout
/// can take it first.
pub(super) struct Tracked {
    pub(super) sink: Sink,
    /// A copy of the arguments, to resend.
    pub(super) args: Payload,
    pub(super) retries: u32,
    pub(super) worker: Option<WorkerId>,
    /// When it times out (restarted when it is resent through no fault of
    /// its own).
    pub(super) deadline: Option<Instant>,
}

/// Why the pool killed a worker.
#[derive(Clone, Copy)]
pub(super) enum Killed {
    /// Job `0` overran the timeout on it.
    Timeout(JobId),
    /// The close deadline passed.
    Deadline,
}

pub(super) struct Slot {
    pub(super) rpc: Option<Rpc>,
    pub(super) pid: i32,
    pub(super) killed: Option<Killed>,
}

pub(crate) struct State {
    pub(super) sched: Scheduler<Job>,
    pub(super) workers: HashMap<WorkerId, Slot>,
    /// Workers whose connection ended before their slot was filled in.
    pub(super) ended_early: HashSet<WorkerId>,
    pub(super) to_start: Vec<WorkerId>,
    pub(super) timer: Option<Duration>,
    pub(super) tracked: HashMap<JobId, Tracked>,
    pub(super) deadlines: BinaryHeap<Reverse<(Instant, JobId)>>,
    pub(super) space_wakers: Vec<Waker>,
    /// The staged jobs' arguments (see [`Args::Staged`]), in queue order:
    /// whatever takes jobs out of the queue takes their bytes from here.
    pub(super) staging: Staging,
    /// Queued jobs that are odd (see [`Job::is_odd`]): while there are
    /// none, a batch is known to be all staged without looking at it.
    pub(super) odd: usize,
    /// Why recently ended workers were killed (their failed calls are
    /// handled after the worker is gone); the last few only.
    pub(super) killed: std::collections::VecDeque<(WorkerId, Killed)>,
    pub(super) manager_exit: bool,
}

impl State {
    /// Queues a job.
    #[inline(always)] // see `PoolState::submit_small`
    pub(super) fn submit(&mut self, now: Duration, job: Job) -> JobId {
        self.odd += usize::from(job.is_odd());
        self.sched.submit(now, job)
    }

    /// Puts jobs back at the head of the queue (see `Scheduler::requeue`).
    pub(super) fn requeue(&mut self, now: Duration, jobs: Vec<(JobId, Job)>) {
        self.odd += jobs.iter().filter(|(_, j)| j.is_odd()).count();
        self.sched.requeue(now, jobs);
    }

    /// Queues a new job at the head of the queue.
    pub(super) fn submit_front(&mut self, now: Duration, job: Job) -> JobId {
        self.odd += usize::from(job.is_odd());
        self.sched.submit_front(now, job)
    }

    /// Jobs that just left the front of the queue (sent, failed): their
    /// staged bytes, and whether none of them is odd. Looks at the jobs
    /// only when some in the queue are odd.
    pub(super) fn leaving<'a>(
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
    pub(super) fn cancel(&mut self, now: Duration, id: JobId) -> Option<Job> {
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

    pub(super) fn kill_reason(&self, w: WorkerId) -> Option<Killed> {
        match self.workers.get(&w) {
            Some(s) => s.killed,
            None => self.killed.iter().find(|k| k.0 == w).map(|k| k.1),
        }
    }
}

pub(crate) struct PoolState {
    pub(super) st: Mutex<State>,
    /// Wakes the manager thread (starts to do, timer changed).
    pub(super) manager: Condvar,
    /// Wakes callers blocked on a full queue.
    pub(super) space: Condvar,
    pub(super) template: Template,
    pub(super) handler: String,
    pub(super) opts: Options,
    pub(crate) popts: PoolOptions,
    /// Per-call bookkeeping needed (retries, timeout, memory ceiling).
    pub(super) tracking: bool,
    /// Calls may travel in chunk frames (see `chunk_batch.rs`): sync workers
    /// with an octets handler, and no per-call bookkeeping (a chunk is
    /// one call to the engine: it has one timeout, one retry).
    pub(super) chunks: bool,
    /// Workers read big strings of calls in the state arena.
    pub(super) arena: Option<&'static crate::arena::Arena>,
    pub(super) epoch: Instant,
    pub(super) on_destroy: Option<Arc<dyn Fn() + Send + Sync>>,
    pub(crate) end: Arc<Latch<Result<()>>>,
}

/// A batch to hand to a worker's connection.
pub(super) struct Outgoing {
    pub(super) rpc: Rpc,
    pub(super) worker: WorkerId,
    pub(super) jobs: Jobs<Job>,
    /// The staged jobs' bytes, in order.
    pub(super) staged: StagedBytes,
    /// No job is odd: all staged, each with its own waiter.
    pub(super) uniform: bool,
}

/// What to do once the lock is released.
#[derive(Default)]
pub(super) struct Deferred {
    pub(super) sends: Vec<Outgoing>,
    pub(super) done: Vec<(Sink, Outcome, i32)>,
    pub(super) destroyed: bool,
    pub(super) wake_space: bool,
    /// For `on_error` (or stderr): a crash loop's back-off.
    pub(super) reports: Vec<Error>,
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
        let state = Arc::new(PoolState {
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
        let for_manager = state.clone();
        std::thread::Builder::new()
            .name("forkrpc-pool".into())
            .spawn(move || for_manager.manage())
            .map_err(|e| Error::io("starting the pool's manager thread", e))?;
        state.with(|_, _| {}); // carry out the scheduler's first actions
        Ok(state)
    }

    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` under the lock, carries out the scheduler's actions, then
    /// runs what was deferred after unlocking.
    pub(super) fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut State, &mut Deferred) -> R) -> R {
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

    pub(super) fn finish(self: &Arc<Self>, d: Deferred) {
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

    /// Tells the user about a pool-wide problem: `on_error`, else stderr.
    pub(super) fn report(&self, e: Error) {
        if let Some(f) = &self.opts.on_error {
            f(e)
        } else {
            eprintln!("forkrpc: pool: {e}");
        }
    }
}

/// Why a call still queued fails when the close deadline has passed.
pub(super) fn shutdown_queued() -> Error {
    Error::Shutdown {
        detail: "it was still queued when the close deadline passed".into(),
    }
}
