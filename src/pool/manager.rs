//! The manager thread: forks workers (never under the lock) and fires
//! timers; and the hooks through which a worker's connection tells the
//! pool about it (retire, fatal, ended).

use super::state::{PoolState, Slot};
use crate::error::Result;
use crate::rpc::{Options, Rpc};
use crate::wire::Octets;
use crate::wire::RETIRE_TAG;
use forkrpc_pool::WorkerId;
use std::sync::Arc;
use std::time::Instant;

impl PoolState {
    /// The options of worker `w`: the user's, with the pool's hooks.
    fn worker_opts(self: &Arc<Self>, w: WorkerId) -> Options {
        let mut o = self.opts.clone();
        let user_event = o.on_event.take();
        let weak = Arc::downgrade(self);
        o.on_event = Some(Arc::new(move |ev: Octets| {
            if ev.len() == 1 && ev[0][..] == *RETIRE_TAG.as_bytes() {
                if let Some(pool) = weak.upgrade() {
                    pool.with(|st, _| {
                        let now = pool.now();
                        st.sched.retire(now, w)
                    });
                }
            } else if let Some(f) = &user_event {
                f(ev)
            }
        }));
        let weak = Arc::downgrade(self);
        o.on_fatal = Some(Arc::new(move || {
            // It is about to exit: no new jobs for it.
            if let Some(pool) = weak.upgrade() {
                pool.with(|st, _| {
                    let now = pool.now();
                    st.sched.retire(now, w)
                });
            }
        }));
        let weak = Arc::downgrade(self);
        o.on_end = Some(Arc::new(move |_| {
            if let Some(pool) = weak.upgrade() {
                pool.worker_ended(w);
            }
        }));
        o
    }

    fn worker_ended(self: &Arc<Self>, w: WorkerId) {
        self.with(|st, _| {
            match st.workers.remove(&w) {
                None => {
                    st.ended_early.insert(w);
                }
                Some(Slot {
                    killed: Some(k), ..
                }) => {
                    if st.killed.len() >= 64 {
                        st.killed.pop_front();
                    }
                    st.killed.push_back((w, k));
                }
                Some(_) => {}
            }
            let now = self.now();
            st.sched.exited(now, w);
        });
    }

    /// The manager thread: forks workers and fires timers.
    pub(super) fn manage(self: Arc<Self>) {
        loop {
            let starts = {
                let mut st = self.lock();
                loop {
                    if !st.to_start.is_empty() {
                        break;
                    }
                    if st.manager_exit {
                        return;
                    }
                    let now = Instant::now();
                    let timer = st.timer.map(|t| self.epoch + t);
                    let next = [timer, st.deadlines.peek().map(|r| r.0 .0)]
                        .into_iter()
                        .flatten()
                        .min();
                    match next {
                        Some(t) if t <= now => break,
                        Some(t) => {
                            st = self
                                .manager
                                .wait_timeout(st, t - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        None => st = self.manager.wait(st).unwrap_or_else(|p| p.into_inner()),
                    }
                }
                std::mem::take(&mut st.to_start)
            };
            self.with(|st, d| self.fire(st, d));
            for w in starts {
                let r = self.template.fork().run(&self.handler, self.worker_opts(w));
                self.started(w, r);
            }
        }
    }

    /// A worker's fork finished.
    fn started(self: &Arc<Self>, w: WorkerId, r: Result<Rpc>) {
        let mut report = None;
        self.with(|st, d| {
            let now = self.now();
            match r {
                Ok(rpc) => {
                    if st.ended_early.remove(&w) {
                        return; // it died at once; `exited` was reported
                    }
                    let pid = rpc.pid();
                    st.workers.insert(
                        w,
                        Slot {
                            rpc: Some(rpc),
                            pid,
                            killed: None,
                        },
                    );
                    st.sched.started(now, w);
                }
                Err(e) => {
                    st.sched.start_failed(now, w);
                    if st.sched.active() == 0 {
                        // Nothing can run the queue: fail it rather than
                        // let it wait for ever.
                        let jobs = st.sched.take_queue(now);
                        st.leaving(jobs.iter().map(|(_, j)| j));
                        for (id, job) in jobs {
                            let sink = st.tracked.remove(&id).map_or(job.sink, |t| t.sink);
                            d.done.push((sink, Err(e.clone()).into(), 0));
                        }
                    }
                    report = Some(e);
                }
            }
        });
        if let Some(e) = report {
            self.report(e);
        }
    }
}
