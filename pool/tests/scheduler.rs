//! The scheduler on simulated time: each rule of AnyEvent::Fork::Pool as a
//! scenario with exact actions and times, then property tests over random
//! event sequences.

use forkrpc_pool::{Action, JobId, PoolConfig, Scheduler, WorkerId, WorkerState};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A driver that records what the scheduler asks and keeps the state a
/// real driver would: workers starting, batches in flight per worker.
struct Sim {
    s: Scheduler<u32>,
    now: Duration,
    timer: Option<Duration>,
    starting: BTreeSet<WorkerId>,
    batches: BTreeMap<WorkerId, VecDeque<Vec<JobId>>>,
    stopping: BTreeSet<WorkerId>,
    /// Every job id in the order it was sent.
    sent: Vec<JobId>,
    failed: Vec<JobId>,
    /// `(time, worker)` of every start, stop and kill.
    starts: Vec<(Duration, WorkerId)>,
    stops: Vec<(Duration, WorkerId)>,
    kills: Vec<WorkerId>,
    batch_sizes: Vec<usize>,
    /// Every crash-loop back-off: deaths in a row, and until when.
    backoffs: Vec<(usize, Duration)>,
    destroyed: bool,
    cfg: PoolConfig,
}

impl Sim {
    fn new(cfg: PoolConfig) -> Sim {
        let s = Scheduler::new(cfg.clone(), Duration::ZERO);
        let mut sim = Sim {
            s,
            now: Duration::ZERO,
            timer: None,
            starting: BTreeSet::new(),
            batches: BTreeMap::new(),
            stopping: BTreeSet::new(),
            sent: Vec::new(),
            failed: Vec::new(),
            starts: Vec::new(),
            stops: Vec::new(),
            kills: Vec::new(),
            batch_sizes: Vec::new(),
            backoffs: Vec::new(),
            destroyed: false,
            cfg,
        };
        sim.pump();
        sim
    }

    fn pump(&mut self) {
        for a in self.s.actions() {
            assert!(!self.destroyed, "action {a:?} after Destroyed");
            match a {
                Action::Start(w) => {
                    assert!(self.starting.insert(w));
                    self.starts.push((self.now, w));
                }
                Action::Send { worker, jobs } => {
                    assert!(!jobs.is_empty());
                    assert!(
                        !self.starting.contains(&worker),
                        "sent to a starting worker"
                    );
                    assert!(
                        !self.stopping.contains(&worker),
                        "sent to a stopping worker"
                    );
                    self.batch_sizes.push(jobs.len());
                    let ids: Vec<JobId> = jobs.iter().map(|j| j.0).collect();
                    self.sent.extend(&ids);
                    self.batches.entry(worker).or_default().push_back(ids);
                }
                Action::Stop(w) => {
                    assert!(self.stopping.insert(w), "stopped twice");
                    self.stops.push((self.now, w));
                }
                Action::Kill(w) => self.kills.push(w),
                Action::Fail(jobs) => self.failed.extend(jobs.iter().map(|j| j.0)),
                Action::Timer(t) => self.timer = t,
                Action::Destroyed => self.destroyed = true,
                Action::Backoff { deaths, until } => self.backoffs.push((deaths, until)),
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        let mut active = 0;
        for (_, state, load) in self.s.workers() {
            assert!(load <= self.cfg.load, "a worker above load");
            if matches!(state, WorkerState::Starting | WorkerState::Ready) {
                active += 1;
            }
        }
        assert!(active <= self.cfg.max, "more than max active workers");
        if let Some(t) = self.timer {
            assert!(t >= self.now, "timer in the past");
        }
    }

    fn submit(&mut self, n: usize) -> Vec<JobId> {
        let ids = (0..n).map(|i| self.s.submit(self.now, i as u32)).collect();
        self.pump();
        ids
    }

    fn start_all(&mut self) {
        for w in std::mem::take(&mut self.starting) {
            self.s.started(self.now, w);
            self.pump();
        }
    }

    /// Advances to `t`, firing the timer on the way as often as it is due.
    fn advance(&mut self, t: Duration) {
        while let Some(due) = self.timer.filter(|&d| d <= t) {
            self.now = due;
            self.s.tick(due);
            self.pump();
            if self.timer == Some(due) {
                break; // nothing changed; avoid spinning
            }
        }
        self.now = t;
        self.s.tick(t);
        self.pump();
    }

    /// Completes the oldest batch of worker `w`.
    fn finish_batch(&mut self, w: WorkerId) -> bool {
        let Some(q) = self.batches.get_mut(&w) else {
            return false;
        };
        if q.pop_front().is_none() {
            return false;
        }
        self.s.batch_done(self.now, w);
        self.pump();
        true
    }

    fn finish_all_batches(&mut self) {
        let ws: Vec<WorkerId> = self.batches.keys().copied().collect();
        for w in ws {
            while self.finish_batch(w) {}
        }
    }

    /// Reports every stopped or killed worker as exited.
    fn reap(&mut self) {
        let gone: Vec<WorkerId> = self
            .stopping
            .iter()
            .copied()
            .chain(self.kills.iter().copied())
            .collect();
        for w in gone {
            if self.s.workers().any(|(id, _, _)| id == w) {
                self.batches.remove(&w);
                self.s.exited(self.now, w);
                self.pump();
            }
        }
    }

    fn worker_count(&self) -> usize {
        self.s.workers().count()
    }
}

fn perl(max: usize, idle: usize, load: usize) -> PoolConfig {
    PoolConfig {
        max,
        idle,
        load,
        max_batch: 1,
        ..PoolConfig::default()
    }
}

/// The newest waiting job, whatever block it sits in; none once the
/// queue is empty.
#[test]
fn last_queued_is_the_newest_waiting_job() {
    let mut s = Scheduler::<u64>::new(PoolConfig::default(), Duration::ZERO);
    assert!(s.last_queued().is_none());
    // No worker has started yet: jobs wait in the queue.
    let a = s.submit(ms(0), 7);
    assert_eq!(s.last_queued(), Some(&(a, 7)));
    let ids: Vec<JobId> = (0..1000).map(|i| s.submit(ms(0), 100 + i)).collect();
    assert_eq!(s.last_queued(), Some(&(ids[999], 1099)));
    assert!(s.cancel(ms(0), ids[999]).is_some());
    assert_eq!(s.last_queued(), Some(&(ids[998], 1098)));
    s.take_queue(ms(0));
    assert!(s.last_queued().is_none());
}

#[test]
fn burst_grows_one_worker_per_start_interval_up_to_max() {
    let mut sim = Sim::new(perl(4, 0, 2));
    assert!(sim.starts.is_empty(), "idle 0: no worker before work");
    sim.submit(20);
    assert_eq!(sim.starts, [(ms(0), 0)]);
    assert_eq!(sim.timer, Some(ms(100)));
    sim.start_all();
    assert_eq!(sim.sent, [0, 1], "one worker takes `load` jobs");
    // Nothing starts before the interval is over.
    sim.advance(ms(99));
    assert_eq!(sim.starts.len(), 1);
    sim.advance(ms(100));
    assert_eq!(sim.starts, [(ms(0), 0), (ms(100), 1)]);
    sim.advance(ms(1000));
    assert_eq!(
        sim.starts,
        [(ms(0), 0), (ms(100), 1), (ms(200), 2), (ms(300), 3)],
        "starting workers count against max"
    );
    sim.start_all();
    assert_eq!(sim.sent, (0..8).collect::<Vec<_>>(), "4 workers x load 2");
    assert_eq!(sim.s.queued(), 12);
}

#[test]
fn start_zero_starts_what_the_queue_needs_at_once() {
    let mut sim = Sim::new(PoolConfig {
        start: Duration::ZERO,
        ..perl(4, 0, 2)
    });
    sim.submit(5);
    // ceil(5 / load 2) = 3 workers, at once.
    assert_eq!(sim.starts, [(ms(0), 0), (ms(0), 1), (ms(0), 2)]);
    sim.submit(10);
    assert_eq!(sim.starts.len(), 4, "never above max");
}

#[test]
fn idle_worker_stops_after_stop_seconds() {
    let mut sim = Sim::new(perl(4, 0, 2));
    sim.submit(1);
    sim.start_all();
    sim.advance(ms(500));
    sim.finish_all_batches();
    assert_eq!(
        sim.timer,
        Some(ms(10_500)),
        "stop = 10 s after it went idle"
    );
    sim.advance(ms(10_499));
    assert!(sim.stops.is_empty());
    sim.advance(ms(10_500));
    assert_eq!(sim.stops, [(ms(10_500), 0)]);
    sim.reap();
    assert_eq!(sim.worker_count(), 0);
    assert_eq!(sim.timer, None);
}

#[test]
fn idle_floor_is_started_at_once_and_kept() {
    let mut sim = Sim::new(perl(4, 2, 2));
    assert_eq!(
        sim.starts,
        [(ms(0), 0), (ms(0), 1)],
        "the pool starts with idle workers"
    );
    sim.start_all();
    // A burst grows the pool to 3 ...
    sim.submit(6);
    assert_eq!(sim.sent.len(), 4);
    sim.advance(ms(100));
    assert_eq!(sim.starts.len(), 3);
    sim.start_all();
    sim.finish_all_batches();
    sim.finish_all_batches();
    assert_eq!(sim.sent.len(), 6);
    // ... and it shrinks back to idle = 2 and no further.
    sim.advance(ms(60_000));
    assert_eq!(sim.stops.len(), 1);
    sim.reap();
    assert_eq!(sim.s.active(), 2);
    assert_eq!(sim.timer, None, "nothing left to stop");
}

#[test]
fn idle_floor_refills_after_a_crash_at_once() {
    let mut sim = Sim::new(perl(4, 1, 2));
    sim.start_all();
    sim.s.exited(ms(0), 0);
    sim.pump();
    // A death is replaced at once, inside the start interval.
    assert_eq!(sim.starts, [(ms(0), 0), (ms(0), 1)]);
}

#[test]
fn dead_busy_workers_are_replaced_at_once_growth_stays_paced() {
    let mut sim = Sim::new(perl(4, 0, 1));
    sim.submit(1);
    sim.start_all();
    sim.advance(ms(100));
    sim.submit(1); // a second worker, 100 ms after the first
    sim.start_all();
    assert_eq!(sim.starts, [(ms(0), 0), (ms(100), 1)]);
    sim.finish_batch(0); // both have finished work: no loop
    sim.finish_batch(1);
    sim.submit(4); // two take a job each, two wait
    sim.advance(ms(150));
    assert_eq!(sim.starts.len(), 2, "growth: one start per interval");
    sim.advance(ms(200));
    assert_eq!(sim.starts[2..], [(ms(200), 2)]);
    // Both busy workers die: each is replaced at once (the third start's
    // interval has not run out); growth beyond stays paced.
    sim.now = ms(210);
    sim.s.exited(ms(210), 0);
    sim.s.exited(ms(210), 1);
    sim.pump();
    assert_eq!(sim.starts[3..], [(ms(210), 3), (ms(210), 4)]);
    assert_eq!(
        sim.timer,
        Some(ms(310)),
        "the next growth waits for `start`"
    );
}

#[test]
fn a_crash_loop_backs_off_doubling_until_a_batch_finishes() {
    let mut sim = Sim::new(PoolConfig {
        crash_loop: 3,
        crash_backoff: ms(100),
        ..perl(1, 1, 1)
    });
    // Every new worker dies at once, before finishing anything.
    for t in [0u64, 1, 2, 102, 303, 704] {
        sim.advance(ms(t));
        let w = sim.starts.last().unwrap().1;
        sim.starting.remove(&w);
        sim.s.exited(ms(t), w);
        sim.pump();
    }
    assert_eq!(
        sim.backoffs,
        [(3, ms(102)), (4, ms(302)), (5, ms(703)), (6, ms(1504))]
    );
    // Two deaths replaced at once, then one start per back-off's end.
    let times: Vec<Duration> = sim.starts.iter().map(|s| s.0).collect();
    assert_eq!(times, [ms(0), ms(0), ms(1), ms(102), ms(302), ms(703)]);
    // The next worker finishes a batch: the loop is over.
    sim.advance(ms(1504));
    sim.start_all();
    sim.submit(1);
    assert!(sim.finish_batch(sim.starts.last().unwrap().1));
    let w = sim.starts.last().unwrap().1;
    sim.s.exited(ms(1504), w);
    sim.pump();
    assert_eq!(sim.starts.last().unwrap().0, ms(1504), "replaced at once");
}

#[test]
fn load_caps_jobs_per_worker_and_the_rest_wait_in_order() {
    let mut sim = Sim::new(perl(1, 1, 3));
    sim.start_all();
    sim.submit(7);
    assert_eq!(sim.sent, [0, 1, 2]);
    assert_eq!(sim.s.queued(), 4);
    sim.finish_batch(0);
    assert_eq!(sim.sent, [0, 1, 2, 3]);
    sim.finish_all_batches();
    sim.finish_all_batches();
    assert_eq!(sim.sent, (0..7).collect::<Vec<_>>(), "FIFO");
}

#[test]
fn least_loaded_worker_gets_the_job() {
    let mut sim = Sim::new(perl(2, 2, 4));
    sim.start_all();
    sim.submit(3);
    // 0 gets job 0, then 1 (less loaded) job 1, then 0 again (tie: oldest).
    assert_eq!(sim.batches[&0], [vec![0], vec![2]]);
    assert_eq!(sim.batches[&1], [vec![1]]);
    sim.finish_batch(0);
    sim.finish_batch(0);
    sim.submit(1);
    assert_eq!(sim.batches[&0], [vec![3]], "0 is idle, 1 still has one");
}

#[test]
fn retiring_worker_gets_nothing_new_and_is_replaced() {
    let mut sim = Sim::new(perl(1, 1, 2));
    sim.start_all();
    sim.submit(4);
    assert_eq!(sim.sent, [0, 1]);
    sim.now = ms(10);
    sim.s.retire(sim.now, 0);
    sim.pump();
    assert!(sim.stops.is_empty(), "it finishes what it has first");
    sim.finish_batch(0);
    assert_eq!(sim.sent, [0, 1], "no new job for a retiring worker");
    sim.finish_batch(0);
    assert_eq!(sim.stops, [(ms(10), 0)]);
    // max 1, and the retiring one no longer counts: a replacement starts
    // once the interval allows (100 ms after the first start).
    sim.advance(ms(100));
    assert_eq!(sim.starts, [(ms(0), 0), (ms(100), 1)]);
    sim.start_all();
    assert_eq!(sim.sent, [0, 1, 2, 3]);
}

#[test]
fn max_calls_recycles_workers() {
    let mut sim = Sim::new(PoolConfig {
        max_calls: Some(3),
        start: Duration::ZERO,
        ..perl(1, 0, 2)
    });
    sim.submit(5);
    sim.start_all();
    sim.finish_all_batches();
    sim.finish_all_batches();
    assert_eq!(sim.sent, [0, 1, 2]);
    assert_eq!(sim.stops.len(), 1);
    sim.reap();
    sim.start_all();
    sim.finish_all_batches();
    assert_eq!(sim.sent, [0, 1, 2, 3, 4]);
    assert_eq!(sim.starts.len(), 2);
}

#[test]
fn batches_grow_with_the_backlog_and_shrink_at_its_end() {
    let mut sim = Sim::new(PoolConfig {
        max_batch: 64,
        ..perl(2, 2, 2)
    });
    sim.start_all();
    sim.submit(1);
    assert_eq!(sim.batch_sizes, [1], "no backlog: one job per batch");
    sim.finish_all_batches();
    // Fill both workers' slots, then pile up a backlog.
    sim.submit(4 + 200);
    for _ in 0..100 {
        let ws: Vec<WorkerId> = sim.batches.keys().copied().collect();
        for w in ws {
            sim.finish_batch(w);
        }
    }
    assert_eq!(
        sim.sent,
        (0..205).collect::<Vec<_>>(),
        "FIFO across batches"
    );
    let sizes = &sim.batch_sizes;
    assert!(sizes.iter().all(|&n| n <= 64));
    let biggest = *sizes.iter().max().unwrap();
    assert!(biggest > 1, "a backlog is sent in batches: {sizes:?}");
    assert_eq!(
        *sizes.last().unwrap(),
        1,
        "the tail is fine-grained: {sizes:?}"
    );
}

#[test]
fn close_drains_the_queue_then_stops_every_worker() {
    let mut sim = Sim::new(perl(2, 0, 1));
    sim.submit(5);
    sim.start_all();
    sim.s.close(ms(1), None);
    sim.pump();
    assert!(!sim.destroyed);
    for _ in 0..10 {
        sim.advance(sim.now + ms(100));
        sim.start_all();
        sim.finish_all_batches();
    }
    assert_eq!(sim.sent, (0..5).collect::<Vec<_>>(), "every queued job ran");
    assert!(!sim.destroyed, "workers are still there");
    sim.reap();
    assert!(sim.destroyed);
    assert_eq!(sim.worker_count(), 0);
}

#[test]
fn close_with_nothing_to_do_is_immediate() {
    let mut sim = Sim::new(perl(4, 0, 2));
    sim.s.close(ms(0), None);
    sim.pump();
    assert!(sim.destroyed);
}

#[test]
fn close_starts_workers_for_jobs_left_without_any() {
    let mut sim = Sim::new(perl(1, 1, 1));
    sim.start_all();
    sim.submit(3);
    sim.s.close(ms(0), None);
    sim.pump();
    // The only worker crashes with a job in flight.
    sim.batches.remove(&0);
    sim.s.exited(ms(1), 0);
    sim.pump();
    sim.advance(ms(100));
    assert_eq!(
        sim.starts.len(),
        2,
        "a worker is started to drain the queue"
    );
    sim.start_all();
    sim.finish_all_batches();
    sim.finish_all_batches();
    assert_eq!(sim.sent, [0, 1, 2]);
    sim.reap();
    assert!(sim.destroyed);
}

#[test]
fn close_deadline_fails_the_queue_and_kills_the_workers() {
    let mut sim = Sim::new(perl(1, 1, 1));
    sim.start_all();
    sim.submit(4);
    sim.s.close(ms(0), Some(ms(500)));
    sim.pump();
    assert_eq!(sim.timer, Some(ms(500)));
    sim.finish_batch(0);
    sim.advance(ms(500));
    assert_eq!(sim.sent, [0, 1]);
    assert_eq!(sim.failed, [2, 3]);
    assert_eq!(sim.kills, [0]);
    sim.reap();
    assert!(sim.destroyed);
}

#[test]
fn cancelled_jobs_are_never_sent() {
    let mut sim = Sim::new(perl(1, 1, 1));
    sim.start_all();
    let ids = sim.submit(4);
    assert_eq!(sim.s.cancel(ms(0), ids[0]), None, "already sent");
    assert_eq!(sim.s.cancel(ms(0), ids[2]), Some(2));
    sim.pump();
    for _ in 0..4 {
        sim.finish_batch(0);
    }
    assert_eq!(sim.sent, [0, 1, 3]);
}

#[test]
fn requeued_jobs_go_first() {
    let mut sim = Sim::new(perl(1, 1, 1));
    sim.start_all();
    sim.submit(3);
    assert_eq!(sim.sent, [0]);
    sim.s.requeue(ms(0), vec![(0, 0)]);
    sim.pump();
    sim.finish_batch(0);
    assert_eq!(sim.sent, [0, 0], "the requeued job before 1 and 2");
}

#[derive(Debug, Clone)]
enum Op {
    Submit(usize),
    FinishBatch(usize),
    StartAll,
    Retire(usize),
    Crash(usize),
    Cancel(usize),
    Advance(u64),
    Reap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..20).prop_map(Op::Submit),
        (0usize..8).prop_map(Op::FinishBatch),
        Just(Op::StartAll),
        (0usize..8).prop_map(Op::Retire),
        (0usize..8).prop_map(Op::Crash),
        (0usize..50).prop_map(Op::Cancel),
        (0u64..3000).prop_map(Op::Advance),
        Just(Op::Reap),
    ]
}

fn config() -> impl Strategy<Value = PoolConfig> {
    (
        1usize..5,
        0usize..3,
        1usize..4,
        prop_oneof![Just(0u64), Just(100), Just(1000)],
        1usize..10,
        prop_oneof![Just(None), (1u64..6).prop_map(Some)],
    )
        .prop_map(
            |(max, idle, load, start, max_batch, max_calls)| PoolConfig {
                max,
                idle,
                load,
                start: ms(start),
                stop: ms(2000),
                max_batch,
                max_calls,
                ..PoolConfig::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Over any sequence of events: no worker above `load`, never more
    /// than `max` active workers (checked after every step), FIFO sends,
    /// and after close every job is sent or cancelled exactly once, and
    /// the pool ends destroyed with no worker left.
    #[test]
    fn invariants_hold_and_nothing_is_lost(cfg in config(), ops in prop::collection::vec(op(), 1..80)) {
        let mut sim = Sim::new(cfg);
        let mut submitted = Vec::new();
        let mut cancelled = BTreeSet::new();
        for op in ops {
            match op {
                Op::Submit(n) => submitted.extend(sim.submit(n)),
                Op::FinishBatch(i) => {
                    let ws: Vec<WorkerId> = sim.batches.keys().copied().collect();
                    if !ws.is_empty() {
                        sim.finish_batch(ws[i % ws.len()]);
                    }
                }
                Op::StartAll => sim.start_all(),
                Op::Retire(i) => {
                    let ws: Vec<WorkerId> = sim.s.workers().map(|w| w.0).collect();
                    if !ws.is_empty() {
                        sim.s.retire(sim.now, ws[i % ws.len()]);
                        sim.pump();
                    }
                }
                Op::Crash(i) => {
                    // A crash answers its batches with errors: sent, done.
                    let ws: Vec<WorkerId> = sim.s.workers().map(|w| w.0).collect();
                    if !ws.is_empty() {
                        let w = ws[i % ws.len()];
                        sim.batches.remove(&w);
                        sim.starting.remove(&w);
                        sim.s.exited(sim.now, w);
                        sim.pump();
                    }
                }
                Op::Cancel(i) => {
                    if !submitted.is_empty() {
                        let id = submitted[i % submitted.len()];
                        if sim.s.cancel(sim.now, id).is_some() {
                            prop_assert!(cancelled.insert(id));
                        }
                        sim.pump();
                    }
                }
                Op::Advance(d) => {
                    let t = sim.now + ms(d);
                    sim.advance(t);
                }
                Op::Reap => sim.reap(),
            }
        }
        // FIFO: jobs go out in the order they were submitted.
        let mut sorted = sim.sent.clone();
        sorted.sort_unstable();
        prop_assert_eq!(&sorted, &sim.sent);
        // Close and drive to the end.
        sim.s.close(sim.now, None);
        sim.pump();
        for _ in 0..1000 {
            if sim.destroyed {
                break;
            }
            sim.start_all();
            sim.finish_all_batches();
            sim.reap();
            let t = sim.now + ms(1000);
            sim.advance(t);
        }
        prop_assert!(sim.destroyed, "never destroyed");
        prop_assert_eq!(sim.worker_count(), 0);
        let mut seen = BTreeSet::new();
        for id in &sim.sent {
            prop_assert!(seen.insert(*id), "job {} sent twice", id);
        }
        for id in &submitted {
            prop_assert!(seen.contains(id) ^ cancelled.contains(id), "job {} lost or sent after cancel", id);
        }
        prop_assert!(sim.failed.is_empty());
    }
}
