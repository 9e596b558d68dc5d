//! The RPC handle: calls go to one worker, replies come back as futures,
//! callbacks (on the driver thread) or blocking returns. Also the per-worker
//! [`Protocol`] that gives frames their meaning (sync backend).

use crate::engine::{Command, ConnStats, Engine, EngineKind, Protocol};
use crate::error::{Error, ExitStatus, Result};
use crate::latch::{Latch, Take};
use crate::wire::frame::{put_len_header, Frame, EVENT_ID, MAX_PAYLOAD, SYNC_REPLY_ID};
use crate::wire::FATAL_TAG;
use crate::{octets, Octets};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

type EventFn = Arc<dyn Fn(Octets) + Send + Sync>;
type ErrorFn = Arc<dyn Fn(Error) + Send + Sync>;
type DestroyFn = Arc<dyn Fn() + Send + Sync>;

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

    /// Called when the worker has exited after handling every call.
    pub fn on_destroy(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_destroy = Some(Arc::new(f));
        self
    }

    /// Forces an engine (default: `FORKRPC_ENGINE`, else io_uring where
    /// available, else epoll).
    pub fn engine(mut self, kind: EngineKind) -> Self {
        self.engine = Some(kind);
        self
    }
}

/// One call on its way: its arguments and who wants the reply.
pub(crate) struct Call {
    pub args: Octets,
    pub done: Done,
}

pub(crate) enum Done {
    Callback(Box<dyn FnOnce(Result<Octets>) + Send>),
    Latch(Arc<Latch<Result<Octets>>>),
}

impl Done {
    fn complete(self, r: Result<Octets>) {
        match self {
            Done::Callback(f) => guard("a reply callback", || f(r)),
            Done::Latch(l) => l.set(r),
        }
    }
}

/// Runs a user callback on the driver thread; a panic in it is reported and
/// contained, so one bad callback cannot stop every worker's I/O.
fn guard(what: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        eprintln!("forkrpc: {what} panicked on the driver thread; the panic was contained");
    }
}

impl Call {
    pub(crate) fn fail(self, e: Error) {
        self.done.complete(Err(e))
    }
}

/// A handle to one worker process (`$rpc` in Perl). Cloning shares the
/// worker; when the last clone is dropped (or [`Rpc::close`] runs), every
/// queued call is still sent and answered, then the worker exits and
/// `on_destroy` runs.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    pid: i32,
    engine: &'static Engine,
    end: Arc<Latch<Result<()>>>,
    stats: Arc<ConnStats>,
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
    ) -> Rpc {
        let id = Engine::next_id();
        let end = Latch::new();
        let session = Session {
            pid,
            pending: VecDeque::new(),
            fatal: None,
            protocol_error: None,
            opts,
            end: end.clone(),
        };
        let stats = Arc::new(ConnStats::default());
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
                engine,
                end,
                stats,
            }),
        }
    }

    fn submit(&self, args: Octets, done: Done) {
        let size = args.encoded_len();
        if size > MAX_PAYLOAD {
            return done.complete(Err(Error::PayloadTooLarge { size }));
        }
        self.inner.engine.push(Command::Call {
            id: self.inner.id,
            call: Call { args, done },
        });
    }

    /// Calls the handler; the future resolves with its reply. Works on any
    /// runtime (or none).
    pub fn call(&self, args: Octets) -> CallFuture {
        let latch = Latch::new();
        self.submit(args, Done::Latch(latch.clone()));
        CallFuture(Take(latch))
    }

    /// Calls the handler; `f` runs with the reply on the driver thread, as
    /// Perl's callbacks do. `f` may issue further calls.
    pub fn call_with(&self, args: Octets, f: impl FnOnce(Result<Octets>) + Send + 'static) {
        self.submit(args, Done::Callback(Box::new(f)));
    }

    /// Calls the handler and blocks this thread until the reply arrives.
    /// Fails with [`Error::WouldDeadlock`] on the driver thread.
    pub fn call_blocking(&self, args: Octets) -> Result<Octets> {
        if crate::engine::on_driver_thread() {
            return Err(Error::WouldDeadlock);
        }
        let latch = Latch::new();
        self.submit(args, Done::Latch(latch.clone()));
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
        self.inner
            .stats
            .sends
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The engine driving this worker.
    pub fn engine(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// Drops this handle and waits until the worker has finished: `Ok` when
    /// every call was answered and it exited (`on_destroy`), else the error.
    /// Other clones keep the worker open until they are dropped too.
    pub fn close(self) -> Closing {
        let end = self.inner.end.clone();
        drop(self);
        Closing(end)
    }

    /// [`Rpc::close`] for threads without a runtime.
    pub fn close_blocking(self) -> Result<()> {
        let end = self.inner.end.clone();
        drop(self);
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
pub struct Closing(Arc<Latch<Result<()>>>);

impl Future for Closing {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_clone(cx)
    }
}

/// The sync backend's protocol, on the driver thread.
struct Session {
    pid: i32,
    pending: VecDeque<Done>,
    /// `(kind, message)` of a fatal report from the child.
    fatal: Option<(String, String)>,
    protocol_error: Option<String>,
    opts: Options,
    end: Arc<Latch<Result<()>>>,
}

impl Session {
    fn report(&self, e: &Error) {
        if let Some(f) = &self.opts.on_error {
            guard("on_error", || f(e.clone()))
        } else if let Some(f) = &self.opts.on_event {
            guard("on_event", || f(octets!["error", e.to_string()]))
        } else {
            eprintln!("forkrpc: {e}");
        }
    }
}

impl Protocol for Session {
    fn encode(&mut self, call: Call, out: &mut BytesMut) {
        let len = call.args.encoded_len();
        out.reserve(4 + len as usize);
        put_len_header(out, len as u32);
        call.args.encode(out);
        self.pending.push_back(call.done);
    }

    fn frame(&mut self, frame: Frame) -> Result<(), String> {
        let decoded = Octets::decode(frame.payload);
        match frame.id {
            EVENT_ID => {
                let ev = decoded.map_err(|e| format!("malformed event: {e}"))?;
                if ev.first().is_some_and(|t| t[..] == *FATAL_TAG.as_bytes()) {
                    self.fatal = Some((
                        ev.str(1).unwrap_or("").to_owned(),
                        ev.get(2)
                            .map(|m| String::from_utf8_lossy(m).into_owned())
                            .unwrap_or_default(),
                    ));
                } else if let Some(f) = &self.opts.on_event {
                    guard("on_event", || f(ev));
                }
                Ok(())
            }
            SYNC_REPLY_ID => {
                let done = self
                    .pending
                    .pop_front()
                    .ok_or("a reply arrived with no call outstanding")?;
                match decoded {
                    Ok(r) => {
                        done.complete(Ok(r));
                        Ok(())
                    }
                    Err(e) => {
                        let detail = format!("malformed reply: {e}");
                        done.complete(Err(Error::Protocol {
                            pid: self.pid,
                            detail: detail.clone(),
                        }));
                        self.protocol_error = Some(detail.clone());
                        Err(detail)
                    }
                }
            }
            id => {
                let detail = format!("frame with id {id}; a sync worker replies with id 1");
                self.protocol_error = Some(detail.clone());
                Err(detail)
            }
        }
    }

    fn finish(&mut self, pid: i32, status: Option<ExitStatus>) {
        if self.pending.is_empty() && self.fatal.is_none() && self.protocol_error.is_none() {
            if let Some(f) = &self.opts.on_destroy {
                guard("on_destroy", || f());
            }
            self.end.set(Ok(()));
            return;
        }
        let outstanding = self.pending.len();
        let status = status.unwrap_or(ExitStatus::StillRunning);
        let (kind, msg) = self.fatal.clone().unzip();
        let err = if let Some(detail) = self.protocol_error.clone() {
            Error::Protocol { pid, detail }
        } else if kind.as_deref() == Some("protocol") {
            Error::Protocol {
                pid,
                detail: format!(
                    "the worker rejected a request: {}",
                    msg.clone().unwrap_or_default()
                ),
            }
        } else {
            Error::WorkerExited {
                pid,
                status,
                outstanding,
                panic: match kind.as_deref() {
                    Some("init-panic") => msg.clone().map(|m| format!("in the init function: {m}")),
                    _ => msg.clone(),
                },
            }
        };
        // Report first: once a call is failed its waiter may carry on (even
        // exit the process), and the report must not be lost or cut short.
        self.report(&err);
        let mut pending = std::mem::take(&mut self.pending).into_iter();
        if kind.as_deref() == Some("panic") {
            if let Some(first) = pending.next() {
                first.complete(Err(Error::HandlerPanicked {
                    pid,
                    message: msg.unwrap_or_default(),
                }));
            }
        }
        for d in pending {
            d.complete(Err(err.clone()));
        }
        self.end.set(Err(err));
    }
}
