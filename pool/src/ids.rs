//! The numbers the scheduler gives workers and jobs.

/// A worker's number, given by the scheduler in
/// [`Action::Start`](crate::Action::Start).
pub type WorkerId = u64;
/// A job's number, given by [`Scheduler::submit`](crate::Scheduler::submit).
pub type JobId = u64;
