//! What a pool is told ([`PoolOptions`]) and what it tells
//! ([`PoolStats`]), and how a submission treats a full queue ([`Admit`]).

use forkrpc_pool::PoolConfig;
use std::time::Duration;

/// Pool parameters (AnyEvent::Fork::Pool's, with its defaults) and the
/// extensions beyond it. The RPC options (`asynchronous`, `on_error`,
/// `on_event`, `init`, engine) come from [`Options`](crate::Options); its `on_destroy`
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
    /// [`Pool::map`](crate::Pool::map) honours it too.
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
    /// reported to `on_error` as [`Error::CrashLoop`](crate::Error::CrashLoop); queued calls wait.
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
    /// Fail a call with [`Error::Timeout`](crate::Error::Timeout) when it has not finished `d`
    /// after it was submitted. A sync worker running it is killed and
    /// replaced, and the calls queued behind it on that worker go back to
    /// the pool's queue (they never started) with their time restarted. On the async backend the
    /// worker is left running (its other calls are unaffected) and the
    /// late reply is dropped.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    /// At most `n` calls wait in the pool's queue: [`Pool::call`](crate::Pool::call) waits
    /// for room, [`Pool::call_blocking`](crate::Pool::call_blocking) and [`Pool::call_with`](crate::Pool::call_with) block,
    /// [`Pool::try_call`](crate::Pool::try_call) fails with [`Error::QueueFull`](crate::Error::QueueFull). Calls made from
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
