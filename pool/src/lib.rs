//! `forkrpc-pool`: the pool *scheduler* of forkrpc as a pure state machine
//! — no processes, no I/O, no clock of its own. forkrpc drives it; it never
//! depends on forkrpc.
//!
//! This crate holds the pool's parameters and their AnyEvent::Fork::Pool
//! defaults; the scheduler itself is the subject of its own issue.

use std::time::Duration;

/// Pool parameters, with AnyEvent::Fork::Pool's defaults.
///
/// ```
/// let c = forkrpc_pool::PoolConfig::default();
/// assert_eq!((c.max, c.idle, c.load), (4, 0, 2));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most workers at once.
    pub max: usize,
    /// Workers kept even when idle (and started at once).
    pub idle: usize,
    /// Most calls queued on one worker.
    pub load: usize,
    /// Least time between two worker starts.
    pub start: Duration,
    /// Idle time after which a worker above `idle` is stopped.
    pub stop: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max: 4,
            idle: 0,
            load: 2,
            start: Duration::from_millis(100),
            stop: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_anyevent_fork_pools() {
        let c = PoolConfig::default();
        assert_eq!(c.start, Duration::from_millis(100));
        assert_eq!(c.stop, Duration::from_secs(10));
    }
}
