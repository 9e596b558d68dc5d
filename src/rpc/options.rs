//! The options of one worker's handle (`Fork::run`): callbacks, init
//! function, backend, timeout, engine.

use crate::engine::EngineKind;
use crate::error::{Error, Result};
use crate::wire::Octets;
use bytes::Bytes;
use std::sync::Arc;

pub(crate) type EventFn = Arc<dyn Fn(Octets) + Send + Sync>;
pub(crate) type ErrorFn = Arc<dyn Fn(Error) + Send + Sync>;
pub(crate) type DestroyFn = Arc<dyn Fn() + Send + Sync>;
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
