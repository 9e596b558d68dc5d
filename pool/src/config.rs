//! The pool's parameters.

use std::time::Duration;

/// Pool parameters, with AnyEvent::Fork::Pool's defaults (and two
/// extensions: `max_batch`, `max_calls`).
///
/// ```
/// let c = forkrpc_pool::PoolConfig::default();
/// assert_eq!((c.max, c.idle, c.load), (4, 0, 2));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most workers at once (starting or ready; retiring ones are not
    /// counted, as they take no new jobs).
    pub max: usize,
    /// Workers kept even when idle; the pool starts with this many.
    pub idle: usize,
    /// Most batches queued on one worker at once (a batch is one job
    /// unless jobs pile up; see `max_batch`).
    pub load: usize,
    /// Least time between two worker starts (zero: as fast as needed).
    pub start: Duration,
    /// Idle time after which a worker above `idle` is stopped.
    pub stop: Duration,
    /// Most jobs sent to a worker as one batch. While every worker is at
    /// `load` and jobs wait, a freed slot takes a share of the queue
    /// (`ceil(queued / (2 × ready workers × load))`, guided scheduling) so
    /// that throughput does not stall at `load` jobs per round trip;
    /// without a backlog a batch is one job. 1 gives Perl's pool exactly.
    /// Default 4096: big batches under a big backlog are what lets the
    /// pool keep up with one worker fed directly (forkrpc sends a batch as
    /// one frame; see its pool docs), and each batch a worker finishes
    /// before the next arrives costs it a sleep and a wake-up.
    pub max_batch: usize,
    /// Retire a worker after it was sent this many jobs (None: never),
    /// like Python's `maxtasksperchild`.
    pub max_calls: Option<u64>,
    /// A worker that dies without being asked to (a crash, a kill for a
    /// timeout) is replaced at once, not after `start`. Only a crash loop
    /// is paced: after this many deaths in a row of workers that finished
    /// no batch, with no batch finished by any worker in between, starts
    /// wait `crash_backoff`, doubling with each further such death (at
    /// most 64 times it), until a batch finishes again.
    pub crash_loop: usize,
    /// The first back-off of a crash loop (see `crash_loop`).
    pub crash_backoff: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max: 4,
            idle: 0,
            load: 2,
            start: Duration::from_millis(100),
            stop: Duration::from_secs(10),
            max_batch: 4096,
            max_calls: None,
            crash_loop: 5,
            crash_backoff: Duration::from_millis(100),
        }
    }
}
