//! The pool: a load-balanced, self-sizing set of workers forked from one
//! template, called like one RPC handle (AnyEvent::Fork::Pool).
//!
//! `forkrpc-pool`'s [`Scheduler`](forkrpc_pool::Scheduler) decides (which
//! worker gets which jobs, when to start and stop workers); this module
//! acts on its decisions:
//! - `state.rs`: the pool's state under one lock, the actions carried
//!   out, and the manager thread that forks workers (never under the lock)
//!   and fires timers;
//! - `map.rs`: bulk `map` with a bounded number of calls in flight, in
//!   chunks on sync workers;
//! - `chunked.rs`: chunk frames: a batch of small calls to a sync worker
//!   sent as one frame, and chunk results handed out part by part.
//!
//! Callbacks run on the engine's driver thread; the pool's lock is never
//! held while user code runs.

pub(crate) mod chunked;
mod map;
pub(crate) mod state;

pub use forkrpc_pool::PoolConfig;
pub use map::Map;

use crate::error::{Error, Result};
use crate::latch::Latch;
use crate::rpc::{Closing, Options, Waiter};
use crate::template::Template;
use crate::Octets;
use forkrpc_pool::JobId;
use state::PoolState;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Pool parameters (AnyEvent::Fork::Pool's, with its defaults) and the
/// extensions beyond it. The RPC options (`asynchronous`, `on_error`,
/// `on_event`, `init`, engine) come from [`Options`]; its `on_destroy`
/// is the pool's: it runs once every job is done and every worker gone.
///
/// ```
/// use std::time::Duration;
/// let p = forkrpc::PoolOptions::default()
///     .max(8)
///     .idle(2)
///     .timeout(Duration::from_secs(30))
///     .queue_limit(10_000);
/// ```
#[derive(Clone, Default, Debug)]
pub struct PoolOptions {
    pub(crate) cfg: PoolConfig,
    pub(crate) retries: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) queue_limit: Option<usize>,
    pub(crate) max_rss: Option<u64>,
}

impl PoolOptions {
    /// Most workers at once (default 4).
    ///
    /// ```
    /// assert_eq!(forkrpc::PoolOptions::default().config().max, 4);
    /// ```
    pub fn max(mut self, n: usize) -> Self {
        self.cfg.max = n;
        self
    }
    /// Workers kept even when idle, and started with the pool (default 0).
    ///
    /// ```
    /// assert_eq!(forkrpc::PoolOptions::default().config().idle, 0);
    /// ```
    pub fn idle(mut self, n: usize) -> Self {
        self.cfg.idle = n;
        self
    }
    /// Most batches queued on one worker (default 2).
    ///
    /// ```
    /// assert_eq!(forkrpc::PoolOptions::default().config().load, 2);
    /// ```
    pub fn load(mut self, n: usize) -> Self {
        self.cfg.load = n;
        self
    }
    /// Least time between two worker starts (default 0.1 s; zero: as fast
    /// as needed).
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(forkrpc::PoolOptions::default().config().start, Duration::from_millis(100));
    /// ```
    pub fn start(mut self, d: Duration) -> Self {
        self.cfg.start = d;
        self
    }
    /// Idle time after which a worker above `idle` stops (default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(forkrpc::PoolOptions::default().config().stop, Duration::from_secs(10));
    /// ```
    pub fn stop(mut self, d: Duration) -> Self {
        self.cfg.stop = d;
        self
    }
    /// Most jobs sent to a worker at once while jobs pile up (default
    /// 4096; 1 = exactly Perl's pool). See [`PoolConfig::max_batch`].
    /// [`Pool::map`] honours it too.
    ///
    /// ```
    /// let o = forkrpc::PoolOptions::default();
    /// assert_eq!(o.config().max_batch, 4096);
    /// ```
    pub fn max_batch(mut self, n: usize) -> Self {
        self.cfg.max_batch = n;
        self
    }
    /// A worker that dies without being asked to is replaced at once; only
    /// a crash loop is paced. After `deaths` deaths in a row of workers
    /// that finished no call (default 5), worker starts wait `backoff`
    /// (default 0.1 s), doubling with each further such death up to 64
    /// times it, until a worker finishes a call again. Each back-off is
    /// reported to `on_error` as [`Error::CrashLoop`]; queued calls wait.
    ///
    /// ```
    /// let o = forkrpc::PoolOptions::default();
    /// assert_eq!(o.config().crash_loop, 5);
    /// assert_eq!(o.config().crash_backoff, std::time::Duration::from_millis(100));
    /// ```
    pub fn crash_loop(mut self, deaths: usize, backoff: Duration) -> Self {
        self.cfg.crash_loop = deaths.max(1);
        self.cfg.crash_backoff = backoff;
        self
    }
    /// Recycle a worker after it was sent `n` calls (Python's
    /// `maxtasksperchild`; default: never).
    ///
    /// ```
    /// assert_eq!(forkrpc::PoolOptions::default().config().max_calls, None);
    /// ```
    pub fn max_calls_per_worker(mut self, n: u64) -> Self {
        self.cfg.max_calls = Some(n);
        self
    }
    /// Resend a call up to `n` times when its worker dies under it (the
    /// calls must be idempotent; default 0). A call whose own handler
    /// panicked is not resent.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }
    /// Fail a call with [`Error::Timeout`] when it has not finished `d`
    /// after it was submitted. A sync worker running it is killed and
    /// replaced, and the calls queued behind it on that worker go back to
    /// the pool's queue (they never started) with their time restarted. On the async backend the
    /// worker is left running (its other calls are unaffected) and the
    /// late reply is dropped.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    /// At most `n` calls wait in the pool's queue: [`Pool::call`] waits
    /// for room, [`Pool::call_blocking`] and [`Pool::call_with`] block,
    /// [`Pool::try_call`] fails with [`Error::QueueFull`]. Calls made from
    /// callbacks on the driver thread, which must not block, go through.
    pub fn queue_limit(mut self, n: usize) -> Self {
        self.queue_limit = Some(n.max(1));
        self
    }
    /// Retire a worker whose resident memory exceeds `bytes` after a call
    /// (checked when its batch of calls finishes), so leaky handlers are
    /// recycled.
    pub fn max_rss(mut self, bytes: u64) -> Self {
        self.max_rss = Some(bytes);
        self
    }
    /// The scheduler parameters.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }
}

/// A pool of workers running one handler. Cloning shares the pool; when
/// the last clone is dropped (or [`Pool::close`] runs), every queued call
/// is still run, then the workers stop and `on_destroy` runs.
///
/// ```no_run
/// use forkrpc::{octets, Options, Pool, PoolOptions, Template};
///
/// fn main() -> Result<(), forkrpc::Error> {
///     let template = Template::builder()
///         .sync("double", |a| octets![format!("{}{}", a, a)])
///         .start()?;
///     let pool = Pool::new(&template, "double", Options::default(), PoolOptions::default())?;
///     assert_eq!(pool.call_blocking(octets!["ab"])?, octets!["abab"]);
///     let all: Vec<_> = pool.map((0..100).map(|i| octets![i.to_string()])).collect();
///     assert_eq!(all.len(), 100);
///     pool.close_blocking()
/// }
/// ```
#[derive(Clone)]
pub struct Pool {
    handle: Arc<Handle>,
}

/// Closes the pool when the last `Pool` clone goes.
struct Handle(Arc<PoolState>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close(None);
    }
}

/// What a pool is doing, for monitoring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Workers starting or ready.
    pub active: usize,
    /// All workers, including retiring and stopping ones.
    pub workers: usize,
    /// Calls waiting in the pool's queue.
    pub queued: usize,
    /// Process ids of the running workers.
    pub pids: Vec<i32>,
}

impl Pool {
    /// A pool running `handler` in workers forked from `template`.
    /// Unknown handler or init names, and an async handler without
    /// [`Options::asynchronous`], are errors here rather than at the
    /// first call.
    pub fn new(
        template: &Template,
        handler: &str,
        opts: Options,
        pool: PoolOptions,
    ) -> Result<Pool> {
        Ok(Pool {
            handle: Arc::new(Handle(PoolState::new(template, handler, opts, pool)?)),
        })
    }

    fn shared(&self) -> &Arc<PoolState> {
        &self.handle.0
    }

    /// Calls the handler on some worker; the future resolves with its
    /// reply. The call is queued at once; with a queue limit and a full
    /// queue, the future first waits for room (it must be polled then).
    /// Dropping the future before its call was sent takes the call out of
    /// the queue.
    pub fn call(&self, args: Octets) -> PoolCall {
        let shared = self.shared().clone();
        if !shared.queue_full() {
            let latch = Latch::new();
            return match shared.submit(args, Waiter::Latch(latch.clone()), Admit::Force) {
                Ok(job) => PoolCall {
                    state: CallState::Sent { shared, latch, job },
                },
                Err(e) => PoolCall {
                    state: CallState::Failed(Some(e)),
                },
            };
        }
        PoolCall {
            state: CallState::Waiting {
                shared,
                args: Some(args),
            },
        }
    }

    /// As [`Pool::call`], but fails at once with [`Error::QueueFull`]
    /// instead of waiting when the queue is at its limit.
    pub fn try_call(&self, args: Octets) -> Result<PoolCall> {
        let latch = Latch::new();
        let id = self
            .shared()
            .submit(args, Waiter::Latch(latch.clone()), Admit::Fail)?;
        Ok(PoolCall {
            state: CallState::Sent {
                shared: self.shared().clone(),
                latch,
                job: id,
            },
        })
    }

    /// Calls the handler; `f` runs with the reply on the driver thread.
    /// With a queue limit, blocks while the queue is full (except on the
    /// driver thread).
    pub fn call_with(&self, args: Octets, f: impl FnOnce(Result<Octets>) + Send + 'static) {
        let _ = self
            .shared()
            .submit(args, Waiter::callback(f), Admit::Block);
    }

    /// Calls the handler and blocks until the reply arrives.
    pub fn call_blocking(&self, args: Octets) -> Result<Octets> {
        if crate::driver_thread::on_driver_thread() {
            return Err(Error::WouldDeadlock);
        }
        let latch = Latch::new();
        self.shared()
            .submit(args, Waiter::Latch(latch.clone()), Admit::Block)?;
        latch.wait()
    }

    /// Runs the handler on every argument list of `jobs` and yields the
    /// results in order, keeping a bounded number of calls in flight. On
    /// sync workers the calls travel in chunks (many per frame). The
    /// result is an `Iterator` (blocking) and a `futures` `Stream`.
    pub fn map<I>(&self, jobs: I) -> Map<I::IntoIter>
    where
        I: IntoIterator<Item = Octets>,
    {
        Map::new(self.clone(), jobs.into_iter(), true)
    }

    /// As [`Pool::map`], but yields `(index, result)` as results arrive.
    pub fn map_unordered<I>(&self, jobs: I) -> Map<I::IntoIter>
    where
        I: IntoIterator<Item = Octets>,
    {
        Map::new(self.clone(), jobs.into_iter(), false)
    }

    /// Queues a frozen payload (typed calls).
    pub(crate) fn submit_payload(
        &self,
        args: bytes::Bytes,
        w: Waiter,
        admit: Admit,
    ) -> Result<JobId> {
        self.shared().submit(args, w, admit)
    }

    /// The header size in front of a request payload on this pool's
    /// workers (4 sync, 8 async).
    pub(crate) fn request_offset(&self) -> usize {
        crate::wire::frame::request_header(!self.shared().sync_workers())
    }

    /// Counts and pids of the workers and the queue.
    pub fn stats(&self) -> PoolStats {
        self.shared().stats()
    }

    /// Closes the pool and waits until it is done: every queued call
    /// answered, every worker exited, `on_destroy` run. Calls made after
    /// this through other clones (a [`TypedPool`](crate::TypedPool) or a
    /// running [`Map`] holds one) fail with [`Error::Closed`], so no clone
    /// keeps the pool, or this wait, open.
    pub fn close(self) -> Closing {
        let end = self.shared().end.clone();
        self.shared().close(None);
        drop(self);
        Closing(end)
    }

    /// [`Pool::close`] for threads without a runtime.
    pub fn close_blocking(self) -> Result<()> {
        let end = self.close().0;
        end.wait_clone()
    }

    /// Closes the pool now (whatever other clones exist) and gives it
    /// `deadline` to finish: then queued calls fail and the remaining
    /// workers are killed, their calls failing with [`Error::Shutdown`].
    pub fn close_within(self, deadline: Duration) -> Closing {
        let end = self.shared().end.clone();
        self.shared().close(Some(deadline));
        drop(self);
        Closing(end)
    }
}

/// How a submission treats a full queue.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Block the thread until there is room (not on the driver thread).
    Block,
    /// Fail with `QueueFull`.
    Fail,
    /// Go through regardless.
    Force,
}

/// The reply of one [`Pool::call`].
pub struct PoolCall {
    state: CallState,
}

enum CallState {
    Waiting {
        shared: Arc<PoolState>,
        args: Option<Octets>,
    },
    Sent {
        shared: Arc<PoolState>,
        latch: Arc<Latch<Result<Octets>>>,
        job: JobId,
    },
    Failed(Option<Error>),
    Done,
}

impl Future for PoolCall {
    type Output = Result<Octets>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match &mut self.state {
                CallState::Waiting { shared, args } => {
                    let shared = shared.clone();
                    if !shared.has_room(cx) {
                        return Poll::Pending;
                    }
                    let latch = Latch::new();
                    let args = args.take().expect("polled after completion");
                    match shared.submit(args, Waiter::Latch(latch.clone()), Admit::Force) {
                        Ok(job) => {
                            self.state = CallState::Sent { shared, latch, job };
                        }
                        Err(e) => {
                            self.state = CallState::Done;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                CallState::Sent { latch, .. } => {
                    let r = std::task::ready!(latch.poll_take(cx));
                    self.state = CallState::Done;
                    return Poll::Ready(r);
                }
                CallState::Failed(e) => {
                    let e = e.take().expect("polled after completion");
                    self.state = CallState::Done;
                    return Poll::Ready(Err(e));
                }
                CallState::Done => panic!("PoolCall polled after completion"),
            }
        }
    }
}

impl Drop for PoolCall {
    fn drop(&mut self) {
        if let CallState::Sent { shared, job, .. } = &self.state {
            shared.cancel(*job);
        }
    }
}

/// Physical cores and logical CPUs of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ncpu {
    /// Physical cores (hyperthreads of one core counted once).
    pub physical: usize,
    /// Logical CPUs this process may run on.
    pub logical: usize,
}

/// Physical cores and logical CPUs, for sizing pools (AnyEvent::Fork::Pool's
/// `ncpu`). Reads the CPU topology from sysfs, else `/proc/cpuinfo`; falls
/// back to the logical count, and to 1.
///
/// ```
/// let n = forkrpc::ncpu();
/// assert!(n.physical >= 1 && n.logical >= 1);
/// ```
pub fn ncpu() -> Ncpu {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let physical = physical_from_sysfs()
        .or_else(physical_from_cpuinfo)
        .unwrap_or(logical)
        .max(1);
    Ncpu { physical, logical }
}

fn physical_from_sysfs() -> Option<usize> {
    let mut cores = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
        let e = e.ok()?;
        let name = e.file_name();
        let name = name.to_str()?;
        if name
            .strip_prefix("cpu")
            .is_none_or(|n| n.parse::<u32>().is_err())
        {
            continue;
        }
        let topo = e.path().join("topology");
        let pkg = std::fs::read_to_string(topo.join("physical_package_id")).ok();
        let core = std::fs::read_to_string(topo.join("core_id")).ok();
        if let (Some(p), Some(c)) = (pkg, core) {
            cores.insert((p.trim().to_owned(), c.trim().to_owned()));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

fn physical_from_cpuinfo() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::BTreeSet::new();
    let mut phys = "";
    for line in text.lines() {
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("physical id"), Some(v)) => phys = v,
            (Some("core id"), Some(v)) => {
                cores.insert((phys.to_owned(), v.to_owned()));
            }
            _ => {}
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}
