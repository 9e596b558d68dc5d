//! The RPC handle: calls go to one worker, replies come back as futures,
//! callbacks (on the driver thread) or blocking returns. Also the per-worker
//! [`Protocol`] that gives frames their meaning (sync and async backends).

pub(crate) mod deadline;
pub(crate) mod outbox;
pub(crate) mod window;

use crate::arena::Arena;
pub(crate) use crate::call::{
    guard, plain_octets_len, write_octets, Body, Call, Outcome, Payload, Waiter,
};
use crate::engine::{Command, ConnStats, Engine, EngineKind, Protocol, SendQueue};
use crate::error::{Error, ExitStatus, Result};
use crate::latch::{Latch, Take};
use crate::wire::frame::{put_id_header, put_len_header, EVENT_ID, SYNC_REPLY_ID};
use crate::wire::{arena_ref, starts_with_tag, CHUNK_PART_TAG, ERROR_TAG, FATAL_TAG, RELEASE_TAG};
use crate::{octets, Octets};
use bytes::{Bytes, BytesMut};
use outbox::Outbox;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use window::Window;

type EventFn = Arc<dyn Fn(Octets) + Send + Sync>;
type ErrorFn = Arc<dyn Fn(Error) + Send + Sync>;
type DestroyFn = Arc<dyn Fn() + Send + Sync>;
/// Internal: runs after the connection ended, with its outcome.
pub(crate) type EndFn = Arc<dyn Fn(&Result<()>) + Send + Sync>;

/// Options of [`Fork::run`](crate::Fork::run), as in AnyEvent::Fork::RPC.
///
/// Callbacks run on the engine's driver thread; keep them short.
///
/// ```
/// let opts = forkrpc::Options::default()
///     .on_event(|ev| eprintln!("{} requests handled", ev))
///     .on_error(|e| eprintln!("FATAL: {e}"));
/// ```
#[derive(Clone, Default)]
pub struct Options {
    pub(crate) init: Option<String>,
    pub(crate) on_error: Option<ErrorFn>,
    pub(crate) on_event: Option<EventFn>,
    pub(crate) on_destroy: Option<DestroyFn>,
    pub(crate) engine: Option<EngineKind>,
    pub(crate) asynchronous: bool,
    pub(crate) concurrency: Option<usize>,
    pub(crate) on_end: Option<EndFn>,
    /// A typed `on_event`: gets event payloads undecoded.
    pub(crate) on_event_raw: Option<Arc<dyn Fn(Bytes) + Send + Sync>>,
    /// Internal: the worker announced it is about to exit.
    pub(crate) on_fatal: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Per-call timeout (see [`Options::timeout`]).
    pub(crate) timeout: Option<std::time::Duration>,
}

impl Options {
    /// Init function (by name) run once in the child before the first
    /// request, with the `send_arg`/`send_fh` values.
    pub fn init(mut self, name: impl Into<String>) -> Self {
        self.init = Some(name.into());
        self
    }

    /// Called with fatal errors (the worker died, broke the protocol, …).
    /// Without it, errors go to `on_event` as `["error", message]`; without
    /// either, they are printed on stderr. Failing calls fail either way.
    pub fn on_error(mut self, f: impl Fn(Error) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(f));
        self
    }

    /// Called with every `forkrpc::event(...)` of the child, in order.
    pub fn on_event(mut self, f: impl Fn(Octets) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// Called with every typed event of the child
    /// ([`event_with`](crate::event_with)), thawed with `codec` (an event
    /// that does not thaw arrives as the error). Replaces `on_event`;
    /// errors then go to `on_error` or stderr.
    pub fn on_event_with<T, C: crate::serial::Codec<T>>(
        mut self,
        codec: C,
        f: impl Fn(Result<C::Thawed>) + Send + Sync + 'static,
    ) -> Self {
        self.on_event_raw = Some(Arc::new(move |p: Bytes| {
            f(codec.thaw(p, crate::wire::REPLY_OFFSET))
        }));
        self
    }

    /// Fails a call that has not finished `d` after it was made with
    /// [`Error::Timeout`]. On the sync backend its worker is killed (it
    /// runs one call at a time: nothing else would stop it): the calls
    /// queued behind it then fail with [`Error::NotStarted`] (they did not
    /// run), and so does every later call on this handle: its worker is
    /// gone; fork another. On the async backend only that call fails: the
    /// worker carries on (the call too, until it ends) and its late reply
    /// is dropped. Pools ignore it: use
    /// [`PoolOptions::timeout`](crate::PoolOptions::timeout), which
    /// replaces the worker and sends the calls queued behind again.
    ///
    /// Without it, a call runs as long as its handler does. Dropping a
    /// call's future (e.g. `tokio::time::timeout` around it) before its
    /// request was written takes it out of the queue: it is never sent;
    /// once written, the worker runs it anyway and its reply is dropped,
    /// and calls made after it wait for it.
    pub fn timeout(mut self, d: std::time::Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Called when the worker has exited after handling every call.
    pub fn on_destroy(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_destroy = Some(Arc::new(f));
        self
    }

    /// Selects the async backend (`async => 1` in Perl): the worker runs
    /// many calls at once on a tokio-uring runtime (tokio current-thread
    /// where io_uring is unavailable) and replies in completion order; the
    /// parent matches replies to calls by id. Handlers registered with
    /// [`Builder::asynchronous`](crate::Builder::asynchronous) or
    /// [`Builder::async_fn`](crate::Builder::async_fn) need it; sync
    /// handlers run in it too, each call finishing when it returns.
    ///
    /// A call whose handler panics, errors, or drops its
    /// [`Done`](crate::Done) fails alone; the worker carries on (the sync
    /// backend exits on a panic instead).
    pub fn asynchronous(mut self, on: bool) -> Self {
        self.asynchronous = on;
        self
    }

    /// Async backend: at most `n` calls run at once in the worker (default
    /// [`DEFAULT_CONCURRENCY`](crate::DEFAULT_CONCURRENCY) = 1024). Further
    /// requests wait unread in the socket, then in the parent; `usize::MAX`
    /// starts every call at once, as Perl does.
    ///
    /// ```
    /// assert_eq!(forkrpc::DEFAULT_CONCURRENCY, 1024);
    /// ```
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// Forces an engine (default: `FORKRPC_ENGINE`, else io_uring where
    /// available, else epoll). An async worker runs on tokio-uring with the
    /// io_uring engine and on plain tokio with epoll.
    pub fn engine(mut self, kind: EngineKind) -> Self {
        self.engine = Some(kind);
        self
    }
}

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
        let session = Session {
            outbox: outbox.clone(),
            pid,
            calls: if opts.asynchronous {
                Calls::Async(Window::starting_at(1))
            } else {
                Calls::Sync(VecDeque::new())
            },
            fatal: None,
            protocol_error: None,
            opts,
            end: end.clone(),
            stats: stats.clone(),
            arena,
            held: Vec::new(),
            journal,
        };
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
            if let Some(len) = args.plain_len() {
                // Encoded straight into the outbox and dropped here: no
                // payload built and moved on the way (each move of a value
                // just written stalls on store forwarding).
                let put = ob.put_with(len, |out| args.write(out), done, &self.inner.stats.framed);
                return self.framed(put);
            }
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
        if let Some(ob) = &self.inner.outbox {
            // Framed here; the arguments are freed here too.
            let put = ob.put(&args, done, self.inner.arena, &self.inner.stats.framed);
            return self.framed(put);
        }
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

/// True if an event payload's first octet string is `tag`.
/// The calls a connection waits for.
enum Calls {
    /// Sync backend: replies come in request order.
    Sync(VecDeque<Waiter>),
    /// Async backend: replies carry the request's id.
    Async(Window<Waiter>),
}

impl Calls {
    fn len(&self) -> usize {
        match self {
            Calls::Sync(q) => q.len(),
            Calls::Async(w) => w.len(),
        }
    }

    /// The waiter of reply `id`, if that call is outstanding.
    fn take(&mut self, id: u32) -> Option<Waiter> {
        match self {
            Calls::Sync(q) if id == SYNC_REPLY_ID => q.pop_front(),
            Calls::Sync(_) => None,
            Calls::Async(w) => w.remove(id),
        }
    }

    /// Calls not answered: a chunk counts its calls, not as one.
    fn outstanding(&self) -> usize {
        match self {
            Calls::Sync(q) => q
                .iter()
                .map(|w| match w {
                    Waiter::Chunk(c) => c.calls_left(),
                    _ => 1,
                })
                .sum(),
            Calls::Async(w) => w.len(),
        }
    }

    /// Every outstanding waiter, oldest first.
    fn drain(&mut self) -> Vec<Waiter> {
        match self {
            Calls::Sync(q) => q.drain(..).collect(),
            Calls::Async(w) => w.drain(),
        }
    }
}

/// The protocol of one connection (either backend), on the driver thread.
struct Session {
    pid: i32,
    calls: Calls,
    /// `(kind, message)` of a fatal report from the child.
    fatal: Option<(String, String)>,
    protocol_error: Option<String>,
    opts: Options,
    end: Arc<Latch<Result<()>>>,
    stats: Arc<ConnStats>,
    /// The shared arena, if the worker has it (see `arena.rs`).
    arena: Option<&'static Arena>,
    /// Regions of the arena sent to the worker and not yet released, with
    /// how many times each.
    held: Vec<(usize, u32)>,
    /// Sync workers: calls framed by callers (see `outbox`).
    outbox: Option<Arc<Outbox>>,
    /// A sync worker's crash journal (see `journal`).
    journal: Option<crate::journal::Journal>,
}

impl Session {
    /// Handles the frames of `rest` (what the worker sent after its last
    /// complete frame) followed by `out` (what it made and never wrote):
    /// the rest of its output stream. Stops at the first violation.
    fn replay(&mut self, rest: BytesMut, out: &[u8]) -> std::result::Result<(), String> {
        let mut stream = rest;
        stream.extend_from_slice(out);
        let stream = stream.freeze();
        let mut error = Ok(());
        crate::wire::frame::id_frames(&stream, |f| {
            if error.is_ok() {
                error = self.frame(f.id, &stream, f.payload);
            }
        });
        error
    }

    /// After the worker's death, what its journal says: delivers the
    /// replies it had not written yet (`rest`: the partial frame the
    /// socket ended with, which its unwritten output continues), and the
    /// running chunk's results. Returns how many of the calls left were
    /// started (the others never were), or None without a journal.
    fn recover(&mut self, rest: BytesMut, received: u64) -> Option<usize> {
        let r = self.journal.as_ref()?.remains(received);
        if let Calls::Async(_) = self.calls {
            // Replies and events it made and had not written, then the
            // count of requests it started, in the order sent (an output
            // mirror that overflowed leaves the started ones failing).
            if let Some(out) = r.out {
                let _ = self.replay(rest, &out);
            }
            return Some(r.frames as usize);
        }
        // A mirror that overflowed: which calls finished is not known.
        let (Some(out), Some(part)) = (r.out, r.part) else {
            return None;
        };
        if self.replay(rest, &out).is_err() {
            return None;
        }
        let answered = self.stats.answered.load(Ordering::Relaxed);
        let started = r.frames.saturating_sub(answered) as usize;
        if started > 0 && r.items > 0 && !part.is_empty() {
            if let Calls::Sync(q) = &mut self.calls {
                if let Some(Waiter::Chunk(c)) = q.front_mut() {
                    let blob = Bytes::from(part);
                    if c.recovered(r.part_first as usize, &blob).is_err() {
                        return None;
                    }
                }
            }
        }
        Some(started.min(self.calls.len()))
    }

    /// The error that says how the worker ended: `note` (set by whoever
    /// killed it on purpose), a protocol violation, or its exit with
    /// `outstanding` calls unanswered.
    fn ending(
        &self,
        pid: i32,
        status: ExitStatus,
        outstanding: usize,
        note: Option<Error>,
    ) -> Error {
        let (kind, msg) = self.fatal.clone().unzip();
        if let Some(e) = note {
            return e;
        }
        if let Some(detail) = self.protocol_error.clone() {
            return Error::Protocol { pid, detail };
        }
        match kind.as_deref() {
            Some("protocol") => Error::Protocol {
                pid,
                detail: format!("the worker rejected a request: {}", msg.unwrap_or_default()),
            },
            Some("start") => Error::Template(format!(
                "worker {pid} could not start: {}",
                msg.unwrap_or_default()
            )),
            _ => Error::WorkerExited {
                pid,
                status,
                outstanding,
                panic: match kind.as_deref() {
                    Some("init-panic") => msg.map(|m| format!("in the init function: {m}")),
                    Some("exit-after-panic") => msg.map(|m| format!("in an earlier call: {m}")),
                    _ => msg,
                },
            },
        }
    }

    fn report(&self, e: &Error) {
        if let Some(f) = &self.opts.on_error {
            guard("on_error", || f(e.clone()))
        } else if let Some(f) = &self.opts.on_event {
            guard("on_event", || f(octets!["error", e.to_string()]))
        } else {
            eprintln!("forkrpc: {e}");
        }
    }

    /// Counts a call answered. The driver is the counter's only writer, so
    /// a plain store does (no locked add per reply).
    fn answered_one(&self) {
        let a = &self.stats.answered;
        a.store(a.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn resolve(&self, w: Waiter, r: Result<Octets>) {
        self.answered_one();
        w.complete(r);
    }

    fn violation(&mut self, detail: String) -> Result<(), String> {
        self.protocol_error = Some(detail.clone());
        Err(detail)
    }

    /// An event frame: a note of ours (fatal, per-call error), or the
    /// user's event (raw to a typed `on_event`, else decoded as octets).
    fn event(&mut self, payload: Bytes) -> Result<(), String> {
        if starts_with_tag(&payload, CHUNK_PART_TAG) {
            return self.chunk_part(payload);
        }
        if self.arena.is_some() && starts_with_tag(&payload, RELEASE_TAG) {
            return self.released(payload);
        }
        let ours = starts_with_tag(&payload, FATAL_TAG) || starts_with_tag(&payload, ERROR_TAG);
        if !ours {
            if let Some(f) = &self.opts.on_event_raw {
                guard("on_event", || f(payload));
                return Ok(());
            }
        }
        let ev = match Octets::decode(payload) {
            Ok(ev) => ev,
            Err(e) => return self.violation(format!("malformed event: {e}")),
        };
        let tag = ev.first().map(|t| &t[..]);
        if tag == Some(FATAL_TAG.as_bytes()) {
            self.fatal = Some((
                ev.str(1).unwrap_or("").to_owned(),
                ev.get(2)
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default(),
            ));
            if let Some(f) = &self.opts.on_fatal {
                f();
            }
        } else if tag == Some(ERROR_TAG.as_bytes()) {
            return self.call_failed(&ev);
        } else if let Some(f) = &self.opts.on_event {
            guard("on_event", || f(ev));
        }
        Ok(())
    }

    /// `[CHUNK_PART_TAG, results]`: results of the first items of the
    /// chunk the (sync) worker runs, which is the oldest call.
    fn chunk_part(&mut self, payload: Bytes) -> Result<(), String> {
        let part = match Octets::decode(payload) {
            Ok(p) if p.len() == 2 => p,
            _ => return self.violation("malformed chunk part".into()),
        };
        let r = match &mut self.calls {
            Calls::Sync(q) => match q.front_mut() {
                Some(Waiter::Chunk(c)) => c.part(&part[1]),
                _ => Err("chunk results for a call that is not a chunk".into()),
            },
            Calls::Async(_) => Err("chunk results from an async worker".into()),
        };
        match r {
            Ok(()) => Ok(()),
            Err(detail) => self.violation(detail),
        }
    }

    /// A region sent to the worker once more.
    fn hold(&mut self, arena: &Arena, region: usize) {
        arena.hold(region);
        self.note_held(region);
    }

    /// Counts a hold of `region` the worker was given (taken already).
    fn note_held(&mut self, region: usize) {
        match self.held.iter_mut().find(|(r, _)| *r == region) {
            Some((_, n)) => *n += 1,
            None => self.held.push((region, 1)),
        }
    }

    /// `[RELEASE_TAG, offsets]`: the worker dropped strings it received.
    fn released(&mut self, payload: Bytes) -> Result<(), String> {
        let arena = self.arena.expect("release notes are read with an arena");
        let offsets = Octets::decode(payload)
            .and_then(|note| arena_ref::released(&note).map(|o| o.collect::<Vec<_>>()));
        let offsets = match offsets {
            Ok(o) => o,
            Err(e) => return self.violation(format!("malformed release note: {e}")),
        };
        for off in offsets {
            let held = arena
                .region_of(off as usize, 1)
                .and_then(|r| Some((r, self.held.iter().position(|(h, _)| *h == r)?)));
            let Some((region, i)) = held else {
                return self.violation(format!(
                    "the worker released offset {off} of the shared arena, which it does not hold"
                ));
            };
            self.held[i].1 -= 1;
            if self.held[i].1 == 0 {
                self.held.swap_remove(i);
            }
            arena.release(region);
        }
        Ok(())
    }

    /// The shared form of `args` (see [`Payload::shared_form`]); the
    /// worker holds its regions from now on.
    fn shared_form(&mut self, args: &Payload) -> Option<Octets> {
        let arena = self.arena?;
        let mut regions = Vec::new();
        let form = args.shared_form(arena, &mut regions)?;
        for r in regions {
            self.hold(arena, r);
        }
        Some(form)
    }

    /// The strings a shared reply stands for: views of regions this worker
    /// holds, each adding a holder.
    fn unshare(&self, buf: &Bytes, range: std::ops::Range<usize>) -> Result<Octets, String> {
        let arena = self.arena.expect("shared replies are read with an arena");
        let o = Octets::decode_in(buf, range).map_err(|e| format!("malformed reply: {e}"))?;
        arena_ref::decode(&o, |off, len| {
            let (off, len) = (usize::try_from(off).ok()?, usize::try_from(len).ok()?);
            let region = arena.region_of(off, len)?;
            self.held
                .iter()
                .any(|(r, _)| *r == region)
                .then(|| arena.view(region, off, len))
                .flatten()
        })
        .map_err(|e| format!("malformed reply: {e}"))
    }

    /// `[ERROR_TAG, id, kind, message]`: the call `id` failed.
    fn call_failed(&mut self, ev: &Octets) -> Result<(), String> {
        let id = ev.str(1).and_then(|s| s.parse::<u32>().ok());
        let Some(w) = id.and_then(|id| self.calls.take(id)) else {
            return self.violation(format!(
                "an error note for call {:?}, which is not outstanding",
                ev.str(1).unwrap_or("?")
            ));
        };
        let message = ev
            .get(3)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        let pid = self.pid;
        let err = match ev.str(2) {
            Some("panic") => Error::HandlerPanicked { pid, message },
            _ => Error::Handler { pid, message },
        };
        self.resolve(w, Err(err));
        Ok(())
    }
}

impl Protocol for Session {
    fn encode(&mut self, call: Call, out: &mut SendQueue) {
        let form = self.shared_form(&call.args);
        let len = form
            .as_ref()
            .map_or(call.args.len(), |f| f.encoded_len() as u32);
        let copied = (len as usize).min(crate::wire::SEND_IN_PLACE);
        match &mut self.calls {
            Calls::Sync(q) => {
                out.reserve(4 + copied);
                put_len_header(&mut out.buf, len);
                q.push_back(call.done);
            }
            Calls::Async(w) => {
                let id = w.insert(call.done);
                out.reserve(8 + copied);
                put_id_header(&mut out.buf, id, len);
            }
        }
        match &form {
            Some(f) => write_octets(f, out),
            None => call.args.write(out),
        }
        call.args.spend();
    }

    fn frame(
        &mut self,
        id: u32,
        buf: &Bytes,
        payload: std::ops::Range<usize>,
    ) -> Result<(), String> {
        if id == EVENT_ID {
            return self.event(buf.slice(payload));
        }
        let Some(w) = self.calls.take(id) else {
            return self.violation(match self.calls {
                Calls::Sync(_) if id != SYNC_REPLY_ID => {
                    format!("frame with id {id}; a sync worker replies with id 1")
                }
                Calls::Sync(_) => "a reply arrived with no call outstanding".to_owned(),
                Calls::Async(_) => {
                    format!("a reply with id {id}, which is not in flight")
                }
            });
        };
        self.answered_one();
        if self.arena.is_some() && arena_ref::starts_shared(&buf[payload.clone()]) {
            return match self.unshare(buf, payload) {
                Ok(o) => {
                    w.complete_octets(o);
                    Ok(())
                }
                Err(detail) => {
                    w.complete(Err(Error::Protocol {
                        pid: self.pid,
                        detail: detail.clone(),
                    }));
                    self.violation(detail)
                }
            };
        }
        match w.complete_payload(self.pid, buf, payload) {
            Ok(()) => Ok(()),
            Err(detail) => self.violation(detail),
        }
    }

    fn take_framed(&mut self, out: &mut SendQueue, live: bool) {
        let mut held = Vec::new();
        if let (Some(ob), Calls::Sync(q)) = (&self.outbox, &mut self.calls) {
            ob.take(out, q, &mut held, live, &self.stats.framed);
        }
        for r in held {
            self.note_held(r);
        }
    }

    fn finish(&mut self, pid: i32, status: Option<ExitStatus>, rest: BytesMut, received: u64) {
        // How it ended, for calls that arrive from now on: recorded before
        // the outbox refuses any, so none of them reads a bare `Closed`.
        let note = self
            .stats
            .note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let status = status.unwrap_or(ExitStatus::StillRunning);
        let _ = self.stats.death.set(Error::NotStarted {
            pid,
            cause: self.ending(pid, status, 0, note.clone()).end_cause(),
        });
        // Calls framed since the driver last looked fail with the others
        // (their regions are released with the others); later ones are
        // refused with how it ended.
        let mut held = Vec::new();
        if let (Some(ob), Calls::Sync(q)) = (&self.outbox, &mut self.calls) {
            q.append(&mut ob.end(&mut held));
        }
        for r in held {
            self.note_held(r);
        }
        // What it computed and had not written yet, and which calls it
        // started at all.
        let started = self.recover(rest, received);
        // The worker is gone: what it held is free (our own views remain).
        if let Some(arena) = self.arena {
            for (region, n) in self.held.drain(..) {
                for _ in 0..n {
                    arena.release(region);
                }
            }
        }
        if self.calls.len() == 0 && self.fatal.is_none() && self.protocol_error.is_none() {
            self.stats.ended.store(true, Ordering::Release);
            if let Some(f) = &self.opts.on_destroy {
                guard("on_destroy", || f());
            }
            if let Some(f) = &self.opts.on_end {
                f(&Ok(()));
            }
            self.end.set(Ok(()));
            return;
        }
        let outstanding = self.calls.outstanding();
        let (kind, msg) = self.fatal.clone().unzip();
        let err = self.ending(pid, status, outstanding, note);
        // Report first: once a call is failed its waiter may carry on (even
        // exit the process), and the report must not be lost or cut short.
        // The end hook too: a pool must know the worker is gone before the
        // failed calls' callbacks resend them.
        self.report(&err);
        self.stats.ended.store(true, Ordering::Release);
        let end = Err(err.clone());
        if let Some(f) = &self.opts.on_end {
            f(&end);
        }
        // Which of the calls left it started: all of them, unless its
        // journal says (sync: the first `started`, in order; async: by
        // their place in the order sent, known within a cycle of ids).
        let marked: Vec<(bool, Waiter)> = match (&mut self.calls, started) {
            (Calls::Async(w), Some(started)) => {
                let all = w.drain_in_order();
                let known = all.iter().all(|(seq, _)| seq.is_some());
                all.into_iter()
                    .map(|(seq, w)| (!known || seq.is_some_and(|s| s < started as u64), w))
                    .collect()
            }
            (calls, started) => calls
                .drain()
                .into_iter()
                .enumerate()
                .map(|(i, w)| (started.is_none_or(|n| i < n), w))
                .collect(),
        };
        // The first call it started was running (a sync worker runs one):
        // it fails with the panic, if that is how the worker ended; the
        // other started ones with how it ended; the rest never started.
        let mut running = Some(if kind.as_deref() == Some("panic") {
            Error::HandlerPanicked {
                pid,
                message: msg.unwrap_or_default(),
            }
        } else {
            err.clone()
        });
        let not_started = Error::NotStarted {
            pid,
            cause: err.end_cause(),
        };
        for (was_started, w) in marked {
            let e = was_started.then(|| running.take().unwrap_or_else(|| err.clone()));
            match (e, w) {
                // A chunk of calls sorts its items out, if the journal says
                // which ran (without it, all of them fail).
                (e, Waiter::Chunk(c)) if started.is_some() => {
                    guard("a reply callback", || c.died(e, not_started.clone()))
                }
                (Some(e), w) => w.complete(Err(e)),
                (None, w) => w.complete(Err(not_started.clone())),
            }
        }
        self.end.set(end);
    }
}
