//! The scheduler: AnyEvent::Fork::Pool's rules as a state machine.
//!
//! Rules:
//! - A queued job goes to the least-loaded ready worker whose load is
//!   below `load` (ties: the oldest worker); otherwise it waits in a FIFO
//!   queue. Load counts batches in flight (see [`PoolConfig::max_batch`]).
//! - When jobs wait after that, or fewer than `idle` workers are idle, and
//!   fewer than `max` are active, a worker is started — at most one per
//!   `start` interval (`start` zero: as many as the queue needs at once).
//!   The pool starts with `idle` workers.
//! - A ready worker that has had no job for `stop` is stopped, as long as
//!   more than `idle` workers are idle (ready with no load, or starting).
//! - A retiring worker (it asked to, or reached `max_calls`) gets no new
//!   job and is stopped once its load is zero.
//! - A worker that ends without having been stopped (it crashed, or the
//!   driver killed it) is replaced at once, whatever `start` says. Only a
//!   crash loop is paced: after `crash_loop` deaths in a row of workers
//!   that finished no batch (no batch finished in between), starts wait
//!   a back-off that doubles with each further such death, reported as
//!   [`Action::Backoff`]; a finished batch ends the loop.
//! - Closing: no new submissions; queued jobs are still sent (workers are
//!   started for them if none is left); idle workers are stopped; once
//!   the queue is empty and every worker has exited, [`Action::Destroyed`].
//!   With a deadline, at the deadline the queue is failed and every worker
//!   killed.
//!
//! The driver reports every outcome back: `started`/`start_failed` for each
//! [`Action::Start`], `batch_done` for each [`Action::Send`] once all its
//! jobs are answered, `exited` for each worker that ends (stopped, killed,
//! crashed), and `tick` when the timer of [`Action::Timer`] fires.

use crate::config::PoolConfig;
use crate::ids::{JobId, WorkerId};
use crate::queue::{Jobs, Queue};
use std::collections::BTreeMap;
use std::time::Duration;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<J> {
    /// Start a worker under this id; report `started` or `start_failed`.
    Start(WorkerId),
    /// Send these jobs, in order, to the worker as one batch; report
    /// `batch_done` once every one is answered.
    Send {
        /// The worker.
        worker: WorkerId,
        /// The jobs, oldest first.
        jobs: Jobs<J>,
    },
    /// Close the worker: it finishes what it has, then exits (report
    /// `exited`).
    Stop(WorkerId),
    /// Kill the worker now (close deadline passed); report `exited`.
    Kill(WorkerId),
    /// These queued jobs will not run (close deadline passed).
    Fail(Vec<(JobId, J)>),
    /// Call `tick` at this time (replaces any earlier timer; `None`
    /// disarms).
    Timer(Option<Duration>),
    /// Closed, every job sent and every worker gone: the pool is done.
    Destroyed,
    /// Workers keep dying before they finish anything (see
    /// [`PoolConfig::crash_loop`]): no worker starts before `until`.
    Backoff {
        /// Deaths in a row of workers that finished no batch.
        deaths: usize,
        /// When starts may resume.
        until: Duration,
    },
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Asked to start; takes no jobs yet.
    Starting,
    /// Takes jobs.
    Ready,
    /// Takes no new jobs; stopped when its load reaches zero.
    Retiring,
    /// Asked to stop or killed; waiting for `exited`.
    Stopping,
}

#[derive(Debug)]
struct Worker {
    state: WorkerState,
    /// Batches in flight.
    load: usize,
    /// When its load last became zero (or it became ready).
    idle_since: Duration,
    /// Jobs sent to it so far.
    sent: u64,
    /// Batches it finished.
    done: u64,
    killed: bool,
}

/// The pool scheduler (see the module docs for its rules).
#[derive(Debug)]
pub struct Scheduler<J> {
    cfg: PoolConfig,
    now: Duration,
    workers: BTreeMap<WorkerId, Worker>,
    queue: Queue<J>,
    next_job: JobId,
    next_worker: WorkerId,
    last_start: Option<Duration>,
    /// Workers that died and may be replaced without waiting for `start`.
    replace: usize,
    /// Deaths in a row of workers that finished no batch.
    fruitless: usize,
    /// No start before this (a crash loop's back-off).
    backoff_until: Option<Duration>,
    closing: bool,
    deadline: Option<Duration>,
    aborted: bool,
    destroyed: bool,
    timer: Option<Duration>,
    actions: Vec<Action<J>>,
}

impl<J> Scheduler<J> {
    /// A scheduler at time `now`; its first actions start `idle` workers.
    pub fn new(mut cfg: PoolConfig, now: Duration) -> Self {
        cfg.max = cfg.max.max(1);
        cfg.load = cfg.load.max(1);
        cfg.max_batch = cfg.max_batch.max(1);
        cfg.idle = cfg.idle.min(cfg.max);
        let mut s = Scheduler {
            cfg,
            now,
            workers: BTreeMap::new(),
            queue: Queue::new(),
            next_job: 0,
            next_worker: 0,
            last_start: None,
            replace: 0,
            fruitless: 0,
            backoff_until: None,
            closing: false,
            deadline: None,
            aborted: false,
            destroyed: false,
            timer: None,
            actions: Vec::new(),
        };
        for _ in 0..s.cfg.idle {
            s.start_worker();
        }
        s.maintain();
        s
    }

    /// True when [`Scheduler::actions`] has some to hand out.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The actions decided since the last call, in order.
    pub fn actions(&mut self) -> Vec<Action<J>> {
        std::mem::take(&mut self.actions)
    }

    /// Queues a job (FIFO) and returns its id. After `close`, jobs are
    /// still accepted only from the driver's own retries; callers should
    /// refuse new work once they closed.
    #[inline(always)] // lets a caller build the job where it is stored
    pub fn submit(&mut self, now: Duration, job: J) -> JobId {
        self.advance(now);
        let id = self.next_job;
        self.next_job += 1;
        self.queue.push_back((id, job));
        // After every event either the queue is empty or no ready worker
        // is below `load`; so a job joining a non-empty queue changes
        // nothing, unless starts are unlimited (more may be due).
        if self.queue.len() == 1 || (self.cfg.start.is_zero() && self.active() < self.cfg.max) {
            self.maintain();
        }
        id
    }

    /// Puts jobs that never ran back at the head of the queue, in order
    /// (e.g. those queued behind a call on a worker that was killed).
    pub fn requeue(&mut self, now: Duration, jobs: Vec<(JobId, J)>) {
        self.advance(now);
        for j in jobs.into_iter().rev() {
            self.queue.push_front(j);
        }
        self.maintain();
    }

    /// Queues a job at the head of the queue (a resent part of a job that
    /// was already waited for) and returns its id.
    pub fn submit_front(&mut self, now: Duration, job: J) -> JobId {
        self.advance(now);
        let id = self.next_job;
        self.next_job += 1;
        self.queue.push_front((id, job));
        self.maintain();
        id
    }

    /// Removes a job that is still queued and returns it (None if it was
    /// sent already). Linear in the queue's length.
    pub fn cancel(&mut self, now: Duration, job: JobId) -> Option<J> {
        self.advance(now);
        let j = self.queue.remove(job)?;
        self.maintain();
        Some(j)
    }

    /// Removes and returns every queued job (e.g. when no worker can be
    /// started to run them).
    pub fn take_queue(&mut self, now: Duration) -> Vec<(JobId, J)> {
        self.advance(now);
        let jobs = self.queue.take(usize::MAX).into_iter().collect();
        self.maintain();
        jobs
    }

    /// Worker `w` (from [`Action::Start`]) is ready for jobs.
    pub fn started(&mut self, now: Duration, w: WorkerId) {
        self.advance(now);
        if let Some(wk) = self.workers.get_mut(&w) {
            wk.idle_since = now;
            match wk.state {
                WorkerState::Starting => wk.state = WorkerState::Ready,
                // Asked to retire while starting: nothing to finish.
                WorkerState::Retiring if wk.load == 0 => {
                    wk.state = WorkerState::Stopping;
                    self.actions.push(Action::Stop(w));
                }
                _ => {}
            }
        }
        self.maintain();
    }

    /// Worker `w` could not be started.
    pub fn start_failed(&mut self, now: Duration, w: WorkerId) {
        self.exited(now, w)
    }

    /// Every job of one batch sent to `w` has been answered.
    pub fn batch_done(&mut self, now: Duration, w: WorkerId) {
        self.advance(now);
        if let Some(wk) = self.workers.get_mut(&w) {
            wk.done += 1;
            // Workers can work: whatever killed the others was no loop.
            self.fruitless = 0;
            self.backoff_until = None;
            wk.load = wk.load.saturating_sub(1);
            if wk.load == 0 {
                wk.idle_since = now;
                if wk.state == WorkerState::Retiring {
                    wk.state = WorkerState::Stopping;
                    self.actions.push(Action::Stop(w));
                }
            }
        }
        self.maintain();
    }

    /// Worker `w` asked to retire: no new jobs; it stops once idle.
    pub fn retire(&mut self, now: Duration, w: WorkerId) {
        self.advance(now);
        self.retire_worker(w);
        self.maintain();
    }

    /// Worker `w` has ended (stopped, killed, crashed or never started).
    /// Its batches in flight are the driver's to fail or requeue. One that
    /// was not asked to stop died: it is replaced at once, unless workers
    /// are dying in a loop (see the module docs).
    pub fn exited(&mut self, now: Duration, w: WorkerId) {
        self.advance(now);
        if let Some(wk) = self.workers.remove(&w)
            && wk.state != WorkerState::Stopping
            && !self.closing
        {
            self.replace = (self.replace + 1).min(self.cfg.max);
            if wk.done == 0 {
                self.fruitless += 1;
                if self.fruitless >= self.cfg.crash_loop {
                    let doublings = (self.fruitless - self.cfg.crash_loop).min(6) as u32;
                    let until = now + self.cfg.crash_backoff * (1 << doublings);
                    self.backoff_until = Some(until);
                    self.actions.push(Action::Backoff {
                        deaths: self.fruitless,
                        until,
                    });
                }
            }
        }
        self.maintain();
    }

    /// The timer fired (or any time passed).
    pub fn tick(&mut self, now: Duration) {
        self.advance(now);
        self.maintain();
    }

    /// Starts closing: every queued job is still sent, then the workers
    /// stop. With a `deadline`, what is not done by then is failed/killed.
    pub fn close(&mut self, now: Duration, deadline: Option<Duration>) {
        self.advance(now);
        self.closing = true;
        if deadline.is_some() {
            self.deadline = deadline;
        }
        self.maintain();
    }

    /// Fails every queued job and kills every worker now.
    pub fn abort(&mut self, now: Duration) {
        self.advance(now);
        self.closing = true;
        self.abort_now();
        self.maintain();
    }

    /// The latest time the scheduler was told.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The queued jobs, oldest first.
    pub fn queued_jobs(&self) -> impl Iterator<Item = &(JobId, J)> + '_ {
        self.queue.iter()
    }

    /// The queued jobs, oldest first, to change in place (their ids and
    /// order stay).
    pub fn queued_jobs_mut(&mut self) -> impl Iterator<Item = (JobId, &mut J)> + '_ {
        self.queue.iter_mut().map(|(id, j)| (*id, j))
    }

    /// Jobs waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The newest job in the queue (the last submitted that is still
    /// waiting), if any.
    pub fn last_queued(&self) -> Option<&(JobId, J)> {
        self.queue.back()
    }

    /// Workers starting or ready (those that count against `max`).
    pub fn active(&self) -> usize {
        self.workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::Ready))
            .count()
    }

    /// Every worker with its state and load (batches in flight).
    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, WorkerState, usize)> + '_ {
        self.workers.iter().map(|(&id, w)| (id, w.state, w.load))
    }

    /// True once [`Action::Destroyed`] was emitted.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed
    }

    /// True after `close` or `abort`.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// True once the queue was failed (close deadline passed, or `abort`):
    /// nothing will be sent any more.
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    fn advance(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    fn start_worker(&mut self) {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(
            id,
            Worker {
                state: WorkerState::Starting,
                load: 0,
                idle_since: self.now,
                sent: 0,
                done: 0,
                killed: false,
            },
        );
        self.last_start = Some(self.now);
        self.actions.push(Action::Start(id));
    }

    fn retire_worker(&mut self, w: WorkerId) {
        if let Some(wk) = self.workers.get_mut(&w)
            && matches!(wk.state, WorkerState::Starting | WorkerState::Ready)
        {
            if wk.load == 0 && wk.state == WorkerState::Ready {
                wk.state = WorkerState::Stopping;
                self.actions.push(Action::Stop(w));
            } else {
                wk.state = WorkerState::Retiring;
            }
        }
    }

    fn abort_now(&mut self) {
        if self.aborted {
            return;
        }
        self.aborted = true;
        self.deadline = None;
        if !self.queue.is_empty() {
            let jobs = self.queue.take(usize::MAX).into_iter().collect();
            self.actions.push(Action::Fail(jobs));
        }
        for (&id, w) in self.workers.iter_mut() {
            if !w.killed {
                w.killed = true;
                w.state = WorkerState::Stopping;
                self.actions.push(Action::Kill(id));
            }
        }
    }

    /// Applies every rule after an event.
    fn maintain(&mut self) {
        if self.destroyed {
            return;
        }
        if self.deadline.is_some_and(|d| self.now >= d) {
            self.abort_now();
        }
        if !self.aborted {
            self.dispatch();
            self.stop_idle();
            self.start_needed();
            if self.closing && self.queue.is_empty() {
                self.stop_all_idle();
            }
        }
        if self.closing && self.queue.is_empty() && self.workers.is_empty() {
            self.destroyed = true;
            if self.timer.is_some() {
                self.timer = None;
                self.actions.push(Action::Timer(None));
            }
            self.actions.push(Action::Destroyed);
            return;
        }
        self.arm_timer();
    }

    /// Sends queued jobs to workers below `load`, least loaded first.
    fn dispatch(&mut self) {
        let load = self.cfg.load;
        while !self.queue.is_empty() {
            let mut best: Option<(WorkerId, usize)> = None;
            let mut ready = 0;
            for (&id, w) in &self.workers {
                if w.state != WorkerState::Ready {
                    continue;
                }
                ready += 1;
                if w.load < load && best.is_none_or(|(_, l)| w.load < l) {
                    best = Some((id, w.load));
                }
            }
            let Some((id, _)) = best else { return };
            let share = self.queue.len().div_ceil(2 * ready * load);
            let mut n = share.clamp(1, self.cfg.max_batch);
            let wk = self.workers.get_mut(&id).unwrap();
            if let Some(max) = self.cfg.max_calls {
                n = n.min(max.saturating_sub(wk.sent).max(1) as usize);
            }
            let n = n.min(self.queue.len());
            wk.load += 1;
            wk.sent += n as u64;
            let retire = self.cfg.max_calls.is_some_and(|m| wk.sent >= m);
            let jobs = self.queue.take(n);
            self.actions.push(Action::Send { worker: id, jobs });
            if retire {
                self.retire_worker(id);
            }
        }
    }

    /// Workers that are idle or about to be (ready with no load, or
    /// starting): what the `idle` floor counts.
    fn idle_count(&self) -> usize {
        self.workers
            .values()
            .filter(|w| {
                w.state == WorkerState::Starting || (w.state == WorkerState::Ready && w.load == 0)
            })
            .count()
    }

    /// Stops workers idle for `stop`, keeping `idle` idle ones.
    fn stop_idle(&mut self) {
        if self.closing {
            return;
        }
        let mut idle = self.idle_count();
        while idle > self.cfg.idle {
            let stop = self.cfg.stop;
            let now = self.now;
            let victim = self
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.state == WorkerState::Ready && w.load == 0 && now >= w.idle_since + stop
                })
                .min_by_key(|(_, w)| w.idle_since)
                .map(|(&id, _)| id);
            let Some(id) = victim else { return };
            self.workers.get_mut(&id).unwrap().state = WorkerState::Stopping;
            self.actions.push(Action::Stop(id));
            idle -= 1;
        }
    }

    fn stop_all_idle(&mut self) {
        for (&id, w) in self.workers.iter_mut() {
            if w.state == WorkerState::Ready && w.load == 0 {
                w.state = WorkerState::Stopping;
                self.actions.push(Action::Stop(id));
            }
        }
    }

    /// How many workers the rules want started now (before rate limits).
    fn wanted_starts(&self) -> usize {
        let active = self.active();
        if active >= self.cfg.max {
            return 0;
        }
        let starting = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Starting)
            .count();
        let mut want = 0;
        if !self.queue.is_empty() {
            want = if self.cfg.start.is_zero() {
                self.queue
                    .len()
                    .div_ceil(self.cfg.load)
                    .saturating_sub(starting)
            } else {
                1
            };
        }
        if !self.closing {
            want = want.max(self.cfg.idle.saturating_sub(self.idle_count()));
        }
        want.min(self.cfg.max - active)
    }

    /// When the start rate limit (or a crash loop's back-off) next allows
    /// a start, if one is limited.
    fn start_allowed_at(&self) -> Option<Duration> {
        let paced = if self.cfg.start.is_zero() || self.replace > 0 {
            None
        } else {
            self.last_start.map(|t| t + self.cfg.start)
        };
        match (paced, self.backoff_until) {
            (Some(p), Some(b)) => Some(p.max(b)),
            (p, b) => p.or(b),
        }
    }

    fn start_needed(&mut self) {
        let want = self.wanted_starts();
        if want == 0 {
            // The dead keep their claim: a worker that died with calls in
            // flight is wanted again when they come back to the queue.
            return;
        }
        match self.backoff_until {
            Some(t) if self.now < t => return, // the timer brings us back
            // Over: starts resume (the next fruitless death backs off longer).
            Some(_) => self.backoff_until = None,
            None => {}
        }
        if self.replace > 0 {
            // Replacing the dead: at once, as many as died (up to `max`),
            // since any start is wanted; idle ones stop after `stop`.
            let n = self.replace.min(self.cfg.max - self.active());
            self.replace = 0;
            (0..n).for_each(|_| self.start_worker());
            return;
        }
        match self.start_allowed_at() {
            None => (0..want).for_each(|_| self.start_worker()),
            Some(t) if self.now >= t => self.start_worker(),
            Some(_) => {} // the timer brings us back
        }
    }

    fn arm_timer(&mut self) {
        let mut next: Option<Duration> = None;
        let mut consider = |t: Duration| next = Some(next.map_or(t, |n: Duration| n.min(t)));
        if !self.aborted {
            if !self.closing && self.idle_count() > self.cfg.idle {
                let stop = self.cfg.stop;
                for w in self.workers.values() {
                    if w.state == WorkerState::Ready && w.load == 0 {
                        consider((w.idle_since + stop).max(self.now));
                    }
                }
            }
            if self.wanted_starts() > 0
                && let Some(t) = self.start_allowed_at()
            {
                consider(t.max(self.now));
            }
            if let Some(d) = self.deadline {
                consider(d);
            }
        }
        if next != self.timer {
            self.timer = next;
            self.actions.push(Action::Timer(next));
        }
    }
}
