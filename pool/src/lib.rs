//! `forkrpc-pool`: the pool *scheduler* of forkrpc as a pure state machine
//! — no processes, no I/O, no clock of its own. forkrpc drives it; it never
//! depends on forkrpc.
//!
//! # Layout
//!
//! - [`PoolConfig`]: the parameters, with AnyEvent::Fork::Pool's defaults.
//! - [`Scheduler`]: told what happened ("job submitted", "batch done",
//!   "worker started / exited / retiring", "time is now T"), it answers
//!   with [`Action`]s ("start a worker", "send these jobs to worker W",
//!   "stop W", "arm a timer for T"). Time is a [`Duration`](std::time::Duration) since any
//!   epoch the driver likes, so tests run on simulated time.
//! - [`Jobs`]: the jobs of one batch. The queue keeps jobs in blocks, so a
//!   batch leaves it as whole blocks rather than copied out job by job.
//!
//! ```
//! use forkrpc_pool::{Action, PoolConfig, Scheduler};
//! use std::time::Duration;
//!
//! let ms = Duration::from_millis;
//! let mut s = Scheduler::new(PoolConfig::default(), ms(0));
//! let job = s.submit(ms(0), "job 1");
//! // No worker yet: the job waits, the first worker starts at once, and
//! // another may start after `start` (0.1 s) if the job still waits then.
//! assert_eq!(s.actions(), [Action::Start(0), Action::Timer(Some(ms(100)))]);
//! s.started(ms(1), 0);
//! // The job goes out; no further start is due: the timer is disarmed.
//! assert_eq!(
//!     s.actions(),
//!     [
//!         Action::Send { worker: 0, jobs: vec![(job, "job 1")].into() },
//!         Action::Timer(None),
//!     ],
//! );
//! ```

mod config;
mod ids;
mod queue;
mod scheduler;

pub use config::PoolConfig;
pub use ids::{JobId, WorkerId};
pub use queue::{IntoIter, Jobs};
pub use scheduler::{Action, Scheduler, WorkerState};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn defaults_are_anyevent_fork_pools() {
        let c = PoolConfig::default();
        assert_eq!((c.max, c.idle, c.load), (4, 0, 2));
        assert_eq!(c.start, Duration::from_millis(100));
        assert_eq!(c.stop, Duration::from_secs(10));
    }
}
