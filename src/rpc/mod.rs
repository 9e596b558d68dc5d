//! The RPC handle: calls go to one worker, replies come back as futures,
//! callbacks (on the driver thread) or blocking returns.
//!
//! Its files: `options.rs` (the handle's [`Options`]); `session.rs` (the
//! per-connection [`Protocol`](crate::engine::Protocol) that gives frames
//! their meaning, on either backend); `outbox.rs` (sync calls framed by
//! their callers); `window.rs` (async calls in flight by id);
//! `deadline.rs` (call timeouts); `mod.rs` (the [`Rpc`] handle).

pub(crate) mod deadline;
mod options;
pub(crate) mod outbox;
mod session;
pub(crate) mod window;

pub use options::Options;
use session::Session;

use crate::arena::Arena;
pub(crate) use crate::call::{plain_octets_len, Body, Call, Outcome, Payload, Waiter};
use crate::engine::{Command, ConnStats, Engine, EngineKind};
use crate::error::{Error, Result};
use crate::latch::{Latch, Take};
use crate::wire::Octets;
use outbox::Outbox;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A handle to one worker process (`$rpc` in Perl). Cloning shares the
/// worker; when the last clone is dropped (or [`Rpc::close`] runs, on any
/// clone), every queued call is still sent and answered, then the worker
/// exits and `on_destroy` runs.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    pid: i32,
    asynchronous: bool,
    engine: &'static Engine,
    end: Arc<Latch<Result<()>>>,
    stats: Arc<ConnStats>,
    /// The worker reads big strings here (a worker we started).
    arena: Option<&'static Arena>,
    /// Sync workers: where callers frame their calls (see `outbox`).
    outbox: Option<Arc<Outbox>>,
    /// [`Rpc::close`] ran: calls through other clones fail with
    /// [`Error::Closed`].
    closed: std::sync::atomic::AtomicBool,
    /// Per-call timeout (see [`Options::timeout`]).
    timeout: Option<std::time::Duration>,
}

/// Frames a call to a sync worker into its outbox, on the caller's thread
/// (see `outbox`): the one function for both ways. Plain arguments (no
/// string to share or send in place) are encoded straight from `args` and
/// dropped here: no payload built and moved on the way (each move of a
/// value just written stalls on store forwarding). Others become a payload
/// first, their big strings copied into `arena`. Either gives the bytes
/// the driver's own framing (`Session::encode`) would: see the test
/// `caller_framing_matches_the_driver_framing`. `None`: the arguments
/// cannot be sent (too big for a frame) and the call has failed.
#[inline]
fn frame_sync(
    ob: &Outbox,
    args: Body,
    done: Waiter,
    arena: Option<&'static Arena>,
    count: &std::sync::atomic::AtomicU64,
) -> Option<std::result::Result<bool, Waiter>> {
    if let Some(len) = args.plain_len() {
        return Some(ob.put_with(len, |out| args.write(out), done, count));
    }
    let mut args = match Payload::new(args) {
        Ok(p) => p,
        Err(e) => {
            done.complete(Err(e));
            return None;
        }
    };
    if let Some(a) = arena {
        args.share(a, crate::wire::frame::request_header(false));
    }
    // Framed here; the arguments are freed here too.
    Some(ob.put(&args, done, arena, count))
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.engine.push(Command::Close { id: self.id });
    }
}

impl Rpc {
    pub(crate) fn new(
        engine: &'static Engine,
        fd: std::os::fd::OwnedFd,
        pid: i32,
        opts: Options,
        arena: Option<&'static Arena>,
        journal: Option<crate::journal::Journal>,
    ) -> Rpc {
        let id = Engine::next_id();
        let end = Latch::new();
        let stats = Arc::new(ConnStats::default());
        let asynchronous = opts.asynchronous;
        let timeout = opts.timeout;
        let outbox = (!asynchronous).then(|| Arc::new(Outbox::default()));
        let session = Session::new(
            pid,
            opts,
            outbox.clone(),
            end.clone(),
            stats.clone(),
            arena,
            journal,
        );
        engine.push(Command::Add {
            id,
            fd,
            pid,
            proto: Box::new(session),
            stats: stats.clone(),
        });
        Rpc {
            inner: Arc::new(Inner {
                id,
                pid,
                asynchronous,
                engine,
                end,
                stats,
                arena,
                outbox,
                closed: std::sync::atomic::AtomicBool::new(false),
                timeout,
            }),
        }
    }

    pub(crate) fn submit(&self, args: impl Into<Body>, done: Waiter) {
        if self.inner.closed.load(Ordering::Relaxed) {
            return done.complete(Err(Error::Closed));
        }
        let args = args.into();
        if let Some(ob) = &self.inner.outbox {
            if let Some(put) =
                frame_sync(ob, args, done, self.inner.arena, &self.inner.stats.framed)
            {
                self.framed(put);
            }
            return;
        }
        let mut args = match Payload::new(args) {
            Ok(p) => p,
            Err(e) => return done.complete(Err(e)),
        };
        if let Some(a) = self.inner.arena {
            args.share(a, self.request_offset());
        }
        let done = match self.inner.timeout {
            Some(after) if self.inner.asynchronous => {
                crate::rpc::deadline::timed(done, self.inner.engine, after)
            }
            _ => done,
        };
        self.inner.engine.push_counted(
            Command::Call {
                id: self.inner.id,
                call: Call { args, done },
            },
            Some((&self.inner.stats.submitted, 1)),
        );
    }

    /// After a call was put in the outbox: tells the driver if it must be
    /// told; a call the ended connection refused fails.
    fn framed(&self, put: std::result::Result<bool, Waiter>) {
        if let (Ok(_), Some(after)) = (&put, self.inner.timeout) {
            // This call's number on the connection (a caller framing at the
            // same moment may make it the next one's: its deadline is as
            // good as the same).
            let s = &self.inner.stats;
            let seq = s.framed.load(Ordering::Relaxed) + s.submitted.load(Ordering::Relaxed);
            crate::rpc::deadline::watch_call(Arc::downgrade(s), self.inner.pid, seq, after);
        }
        match put {
            Ok(true) => self.inner.engine.push(Command::Flush { id: self.inner.id }),
            Ok(false) => {}
            Err(done) => done.complete(Err(self.inner.stats.refusal())),
        }
    }

    /// The size of the frame header in front of a request payload: 4 on
    /// the sync backend, 8 on the async one (codecs align to it).
    pub(crate) fn request_offset(&self) -> usize {
        crate::wire::frame::request_header(self.inner.asynchronous)
    }

    /// Kills the worker on purpose; its outstanding calls fail with `e`.
    pub(crate) fn kill_with(&self, e: Error) {
        *self
            .inner
            .stats
            .note
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(e);
        crate::process::kill(self.inner.pid);
    }

    /// Sends several calls in one go (one command for the engine).
    pub(crate) fn submit_batch(&self, calls: Vec<Call>) {
        let n = calls.len() as u64;
        self.inner.engine.push_counted(
            Command::Calls {
                id: self.inner.id,
                calls,
            },
            Some((&self.inner.stats.submitted, n)),
        );
    }

    /// Calls the handler; the future resolves with its reply. Works on any
    /// runtime (or none).
    pub fn call(&self, args: Octets) -> CallFuture {
        let latch = Latch::new();
        self.submit(args, Waiter::Latch(latch.clone()));
        CallFuture(Take(latch))
    }

    /// Calls the handler; `f` runs with the reply on the driver thread, as
    /// Perl's callbacks do. `f` may issue further calls.
    pub fn call_with(&self, args: Octets, f: impl FnOnce(Result<Octets>) + Send + 'static) {
        self.submit(args, Waiter::callback(f));
    }

    /// Calls the handler and blocks this thread until the reply arrives.
    /// Fails with [`Error::WouldDeadlock`] on the driver thread.
    pub fn call_blocking(&self, args: Octets) -> Result<Octets> {
        if crate::driver_thread::on_driver_thread() {
            return Err(Error::WouldDeadlock);
        }
        let latch = Latch::new();
        self.submit(args, Waiter::Latch(latch.clone()));
        latch.wait()
    }

    /// Process id of the worker.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// How many send operations the engine has submitted to this worker so
    /// far. Calls queued together go out as one batch, so under pipelining
    /// this grows far slower than the number of calls.
    pub fn send_ops(&self) -> u64 {
        self.inner.stats.sends.load(Ordering::Relaxed)
    }

    /// Calls made on this worker that have not resolved yet (queued, sent,
    /// or running in the worker). An async worker whose handler never
    /// calls its [`Done`](crate::Done) shows up here: the count stays
    /// above zero, and [`Rpc::close`] waits for those calls.
    pub fn pending(&self) -> u64 {
        let s = &self.inner.stats;
        if s.ended.load(Ordering::Acquire) {
            return 0;
        }
        s.unanswered()
    }

    /// The engine driving this worker.
    pub fn engine(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// Closes the worker and waits until it has finished: `Ok` when every
    /// call was answered and it exited (`on_destroy`), else the error.
    /// Calls already made are still sent and answered; calls made after
    /// this through other clones (a [`Typed`](crate::Typed) handle holds
    /// one) fail with [`Error::Closed`], so no clone keeps the worker, or
    /// this wait, open.
    pub fn close(self) -> Closing {
        let end = self.inner.end.clone();
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.engine.push(Command::Close { id: self.inner.id });
        drop(self);
        Closing(end)
    }

    /// [`Rpc::close`] for threads without a runtime.
    pub fn close_blocking(self) -> Result<()> {
        let end = self.close().0;
        end.wait_clone()
    }
}

/// The reply of one [`Rpc::call`].
pub struct CallFuture(Take<Result<Octets>>);

impl Future for CallFuture {
    type Output = Result<Octets>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Completion of [`Rpc::close`].
pub struct Closing(pub(crate) Arc<Latch<Result<()>>>);

impl Future for Closing {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_clone(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Protocol, SendQueue};
    use crate::wire::SEND_IN_PLACE;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU64;

    /// Every byte queued, in order, as the engine would send it.
    fn drain(out: &mut SendQueue) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(b) = out.next() {
            all.extend_from_slice(&b);
        }
        all
    }

    /// A string of one of the sizes the paths treat apart: inline-small,
    /// copied, and around the send-in-place threshold.
    fn string() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::vec(any::<u8>(), 32..400),
            (SEND_IN_PLACE - 2..SEND_IN_PLACE + 3).prop_map(|n| vec![0xa5; n]),
        ]
    }

    /// A call's arguments: an octets list, or a codec's frozen payload.
    fn body() -> impl Strategy<Value = (bool, Vec<Vec<u8>>)> {
        prop_oneof![
            proptest::collection::vec(string(), 0..5).prop_map(|v| (true, v)),
            string().prop_map(|s| (false, vec![s])),
        ]
    }

    fn make(octets: bool, strings: &[Vec<u8>]) -> Body {
        if octets {
            Body::Octets(Octets(strings.iter().cloned().map(Bytes::from).collect()))
        } else {
            Body::Frozen(Bytes::from(strings[0].clone()))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// The fast path (a sync call framed by its caller, plain arguments
        /// encoded with no payload built) and its general twin (a payload
        /// framed by the driver's protocol) put the same bytes on the wire,
        /// which are the Perl module's: a length header and the arguments.
        #[test]
        fn caller_framing_matches_the_driver_framing(calls in proptest::collection::vec(body(), 1..6)) {
            let (ob, count) = (Outbox::default(), AtomicU64::new(0));
            let mut expected = Vec::new();
            for (octets, strings) in &calls {
                let reference = match make(*octets, strings) {
                    Body::Octets(o) => o.to_bytes().to_vec(),
                    Body::Frozen(b) => b.to_vec(),
                    Body::Small(_) => unreachable!(),
                };
                expected.extend_from_slice(&(reference.len() as u32).to_be_bytes());
                expected.extend_from_slice(&reference);
                let r = frame_sync(&ob, make(*octets, strings), Waiter::callback(|_| {}), None, &count);
                prop_assert!(matches!(r, Some(Ok(_))));
            }
            let (mut by_callers, mut waiters) = (SendQueue::default(), std::collections::VecDeque::new());
            ob.take(&mut by_callers, &mut waiters, &mut vec![], true, &count);
            prop_assert_eq!(waiters.len(), calls.len());

            let stats = Arc::new(ConnStats::default());
            let mut session = Session::new(1, Options::default(), None, Latch::new(), stats, None, None);
            let mut by_driver = SendQueue::default();
            for (octets, strings) in &calls {
                let args = Payload::new(make(*octets, strings)).unwrap();
                session.encode(Call { args, done: Waiter::callback(|_| {}) }, &mut by_driver);
            }
            let (a, b) = (drain(&mut by_callers), drain(&mut by_driver));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a, expected);
        }
    }
}
