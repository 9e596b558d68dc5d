//! Callers queue calls: the general path, and the lean one for a small
//! octets call joining a waiting queue (staged on the caller's thread).

use super::job::{fail_sink, Args, Incoming, Job, Sink};
use super::options::Admit;
use super::state::{Deferred, PoolState, Tracked};
use crate::error::{Error, Result};
use crate::rpc::{Body, Payload, Waiter};
use crate::wire::Octets;
use forkrpc_pool::{JobId, Scheduler};
use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Instant;

impl PoolState {
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
            return self.submit_job(Incoming::Stageable(o, n), Sink::One(waiter), admit);
        }
        crate::engine::collect_leftovers();
        let (id, next_slot, d) = {
            let mut st = self.lock();
            if st.sched.queued() == 0 || st.sched.is_closing() {
                drop(st);
                return self.submit_job(Incoming::Stageable(o, n), Sink::One(waiter), admit);
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
            (id, next_slot_of(&st.sched), d)
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
                Incoming::Stageable(o, n) if st.sched.queued() > 0 => {
                    let staged = st.staging.stage(&o, n);
                    spent = Some(o);
                    Args::Staged(staged)
                }
                // It may leave at once, alone: a plain call.
                Incoming::Stageable(o, _) => match Payload::new(o) {
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
            next_slot = next_slot_of(&st.sched);
            r
        };
        // As for the engine's queue (see `prefetch`): the driver took the
        // last jobs from these lines.
        crate::prefetch::two_lines(next_slot);
        drop(spent);
        self.finish(d);
        Ok(r)
    }
}

/// Where the next job queued will most likely be stored: just past the
/// newest one (wrong when the queue starts a block; 0 when it is empty).
/// The caller prefetches it (see `prefetch`): the driver took the last
/// jobs from those lines, on its own core.
#[inline]
fn next_slot_of(sched: &Scheduler<Job>) -> usize {
    sched
        .last_queued()
        .map_or(0, |p| (p as *const (JobId, Job)).wrapping_add(1) as usize)
}
