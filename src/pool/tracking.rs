//! Per-call bookkeeping, on when a pool has retries, a call timeout or a
//! memory ceiling: replies resolved, resent or dropped (timed out), and
//! call deadlines fired.

use super::dispatch::Countdown;
use super::job::{Args, Job, Sink};
use super::state::{Deferred, Killed, PoolState, State};
use crate::error::Error;
use crate::rpc::Outcome;
use forkrpc_pool::{JobId, WorkerId};
use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl PoolState {
    /// A reply on the tracked path: resolve, resend or drop (timed out).
    pub(super) fn tracked_reply(
        self: &Arc<Self>,
        w: WorkerId,
        pid: i32,
        id: JobId,
        r: Outcome,
        batch: &Countdown,
    ) {
        let last = batch.left.fetch_sub(1, Ordering::AcqRel) == 1;
        let over = last
            && self
                .popts
                .max_rss
                .is_some_and(|limit| crate::process::rss_bytes(pid).is_some_and(|rss| rss > limit));
        self.with(|st, d| {
            let now = self.now();
            if let Some(mut t) = st.tracked.remove(&id) {
                let killed = st.kill_reason(w);
                let died = matches!(r.error(), Some(Error::WorkerExited { .. }));
                // Never started (its worker died in an earlier call), or
                // queued behind a call that overran: it did not run.
                let not_started = matches!(r.error(), Some(Error::NotStarted { .. }))
                    && !matches!(killed, Some(Killed::Deadline));
                let behind_timeout =
                    not_started || (matches!(killed, Some(Killed::Timeout(j)) if j != id) && died);
                if behind_timeout
                    || (died && t.retries > 0 && !matches!(killed, Some(Killed::Deadline)))
                {
                    // Resend: it never started (queued behind a call that
                    // overran), or retries are allowed.
                    if behind_timeout {
                        // Its time restarts: it waited for someone else.
                        if let Some(to) = self.popts.timeout {
                            let d = Instant::now() + to;
                            t.deadline = Some(d);
                            st.deadlines.push(Reverse((d, id)));
                            self.manager.notify_one();
                        }
                    } else {
                        t.retries -= 1;
                    }
                    t.worker = None;
                    let args = t.args.clone();
                    let raw = t.sink.wants_raw();
                    st.tracked.insert(id, t);
                    st.requeue(
                        now,
                        vec![(
                            id,
                            Job {
                                args: Args::Payload(args),
                                sink: Sink::Tracked { raw },
                            },
                        )],
                    );
                } else {
                    d.done.push((t.sink, r, pid));
                }
            }
            if last {
                st.sched.batch_done(now, w);
                if over {
                    st.sched.retire(now, w);
                }
            }
        });
    }

    /// Fires the timer and the call deadlines that are due.
    pub(super) fn fire(self: &Arc<Self>, st: &mut State, d: &mut Deferred) {
        let now = self.now();
        if st.timer.is_some_and(|t| t <= now) {
            st.sched.tick(now);
        }
        let Some(timeout) = self.popts.timeout else {
            return;
        };
        let instant = Instant::now();
        while let Some(&Reverse((t, id))) = st.deadlines.peek() {
            if t > instant {
                break;
            }
            st.deadlines.pop();
            let Some(tracked) = st.tracked.get(&id) else {
                continue;
            };
            if tracked.deadline.is_some_and(|d| d > instant) {
                continue; // restarted; a later entry stands for it
            }
            let worker = tracked.worker;
            let behind_killed = worker
                .and_then(|w| st.kill_reason(w))
                .is_some_and(|k| matches!(k, Killed::Timeout(j) if j != id));
            if behind_killed {
                continue; // it never started; it is resent with a new deadline
            }
            match worker {
                None => {
                    st.cancel(now, id);
                }
                Some(w) => {
                    if self.sync_workers() {
                        if let Some(s) = st.workers.get_mut(&w) {
                            if s.killed.is_none() {
                                s.killed = Some(Killed::Timeout(id));
                                crate::process::kill(s.pid);
                                // No new jobs for it: it is about to die.
                                st.sched.retire(now, w);
                            }
                        }
                    }
                }
            }
            let t = st.tracked.remove(&id).unwrap();
            d.done
                .push((t.sink, Err(Error::Timeout { after: timeout }).into(), 0));
        }
    }
}
