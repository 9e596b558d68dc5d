//! The pool: a load-balanced, self-sizing set of workers forked from one
//! template, called like one RPC handle (AnyEvent::Fork::Pool).
//!
//! `forkrpc-pool`'s [`Scheduler`](forkrpc_pool::Scheduler) decides (which
//! worker gets which jobs, when to start and stop workers); this module
//! acts on its decisions. Its files, bottom up (each imports only those
//! above it in this list):
//! - `options.rs`, `ncpu.rs`: the pool's options and statistics; CPUs;
//! - `staging.rs`: small calls written as chunk items by their callers;
//! - `chunk_results.rs`: a chunk's results counted and decoded;
//! - `map_chunk.rs`: where a map's chunk delivers (a trait,
//!   `RequeueChunk`, for sending its unstarted items again);
//! - `job.rs`: a queued job: its arguments and where its outcome goes;
//! - `chunk_batch.rs`: a batch of small calls to a sync worker sent as
//!   one chunk frame (it calls the pool back through `BatchOwner`);
//! - `state.rs`: the pool's state under one lock (`PoolState`), how work
//!   runs under it and what is deferred until it is released; its methods
//!   are split by job over the next four files, which import it:
//!   - `submit.rs`: callers queue calls (and stage small ones);
//!   - `dispatch.rs`: the scheduler's actions carried out, batches handed
//!     to connections; it implements the two traits above;
//!   - `tracking.rs`: per-call retries, timeouts and the memory ceiling;
//!   - `manager.rs`: the manager thread that forks workers (never under the
//!     lock) and fires timers, and the hooks of each worker's connection;
//! - `keep_open.rs`: closes the pool when the last handle goes;
//! - `map.rs`: bulk `map` with a bounded number of calls in flight, in
//!   chunks on sync workers;
//! - `mod.rs`: the [`Pool`] handle.
//!
//! Callbacks run on the engine's driver thread; the pool's lock is never
//! held while user code runs.

mod chunk_batch;
mod chunk_results;
mod dispatch;
mod job;
mod keep_open;
mod manager;
mod map;
mod map_chunk;
mod ncpu;
mod options;
pub(crate) mod staging;
pub(crate) mod state;
mod submit;
mod tracking;

pub use forkrpc_pool::PoolConfig;
pub use map::Map;
pub use ncpu::{ncpu, Ncpu};
pub(crate) use options::Admit;
pub use options::{PoolOptions, PoolStats};

use crate::error::{Error, Result};
use crate::latch::Latch;
use crate::rpc::{Closing, Options, Waiter};
use crate::template::Template;
use crate::wire::Octets;
use forkrpc_pool::JobId;
use keep_open::KeepOpen;
use state::PoolState;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
    handle: Arc<KeepOpen>,
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
            handle: Arc::new(KeepOpen::new(PoolState::new(
                template, handler, opts, pool,
            )?)),
        })
    }

    fn state(&self) -> &Arc<PoolState> {
        self.handle.state()
    }

    /// Calls the handler on some worker; the future resolves with its
    /// reply. The call is queued at once; with a queue limit and a full
    /// queue, the future first waits for room (it must be polled then).
    /// Dropping the future before its call was sent takes the call out of
    /// the queue.
    pub fn call(&self, args: Octets) -> PoolCall {
        let pool = self.state().clone();
        if !pool.queue_full() {
            let latch = Latch::new();
            return match pool.submit(args, Waiter::Latch(latch.clone()), Admit::Force) {
                Ok(job) => PoolCall {
                    state: CallState::Sent { pool, latch, job },
                },
                Err(e) => PoolCall {
                    state: CallState::Failed(Some(e)),
                },
            };
        }
        PoolCall {
            state: CallState::Waiting {
                pool,
                args: Some(args),
            },
        }
    }

    /// As [`Pool::call`], but fails at once with [`Error::QueueFull`]
    /// instead of waiting when the queue is at its limit.
    pub fn try_call(&self, args: Octets) -> Result<PoolCall> {
        let latch = Latch::new();
        let id = self
            .state()
            .submit(args, Waiter::Latch(latch.clone()), Admit::Fail)?;
        Ok(PoolCall {
            state: CallState::Sent {
                pool: self.state().clone(),
                latch,
                job: id,
            },
        })
    }

    /// Calls the handler; `f` runs with the reply on the driver thread.
    /// With a queue limit, blocks while the queue is full (except on the
    /// driver thread).
    pub fn call_with(&self, args: Octets, f: impl FnOnce(Result<Octets>) + Send + 'static) {
        let _ = self.state().submit(args, Waiter::callback(f), Admit::Block);
    }

    /// Calls the handler and blocks until the reply arrives.
    pub fn call_blocking(&self, args: Octets) -> Result<Octets> {
        if crate::driver_thread::on_driver_thread() {
            return Err(Error::WouldDeadlock);
        }
        let latch = Latch::new();
        self.state()
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
        Map::new(self.handle.clone(), jobs.into_iter(), true)
    }

    /// As [`Pool::map`], but yields `(index, result)` as results arrive.
    pub fn map_unordered<I>(&self, jobs: I) -> Map<I::IntoIter>
    where
        I: IntoIterator<Item = Octets>,
    {
        Map::new(self.handle.clone(), jobs.into_iter(), false)
    }

    /// Queues a frozen payload (typed calls).
    pub(crate) fn submit_payload(
        &self,
        args: bytes::Bytes,
        w: Waiter,
        admit: Admit,
    ) -> Result<JobId> {
        self.state().submit(args, w, admit)
    }

    /// The header size in front of a request payload on this pool's
    /// workers (4 sync, 8 async).
    pub(crate) fn request_offset(&self) -> usize {
        crate::wire::frame::request_header(!self.state().sync_workers())
    }

    /// Counts and pids of the workers and the queue.
    pub fn stats(&self) -> PoolStats {
        self.state().stats()
    }

    /// Closes the pool and waits until it is done: every queued call
    /// answered, every worker exited, `on_destroy` run. Calls made after
    /// this through other clones (a [`TypedPool`](crate::TypedPool) or a
    /// running [`Map`] holds one) fail with [`Error::Closed`], so no clone
    /// keeps the pool, or this wait, open.
    pub fn close(self) -> Closing {
        let end = self.state().end.clone();
        self.state().close(None);
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
        let end = self.state().end.clone();
        self.state().close(Some(deadline));
        drop(self);
        Closing(end)
    }
}

/// The reply of one [`Pool::call`].
pub struct PoolCall {
    state: CallState,
}

enum CallState {
    Waiting {
        pool: Arc<PoolState>,
        args: Option<Octets>,
    },
    Sent {
        pool: Arc<PoolState>,
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
                CallState::Waiting { pool, args } => {
                    let pool = pool.clone();
                    if !pool.has_room(cx) {
                        return Poll::Pending;
                    }
                    let latch = Latch::new();
                    let args = args.take().expect("polled after completion");
                    match pool.submit(args, Waiter::Latch(latch.clone()), Admit::Force) {
                        Ok(job) => {
                            self.state = CallState::Sent { pool, latch, job };
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
        if let CallState::Sent { pool, job, .. } = &self.state {
            pool.cancel(*job);
        }
    }
}
