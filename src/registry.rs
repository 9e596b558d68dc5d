//! Handlers and init functions, found by name in the child. They are
//! registered before the template forks, so every worker inherits them
//! (copy-on-write) and a re-executed template registers them again by
//! running the same `main` up to `start()`.

use crate::child::asynchronous::Done;
use crate::Octets;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// A sync handler: gets a call's arguments, returns the reply (or an error
/// message, which fails that call with [`Error::Handler`](crate::Error::Handler)).
pub type SyncHandler = Arc<dyn Fn(Octets) -> Result<Octets, String> + Send + Sync>;

/// An async handler: gets the call's [`Done`] and its arguments, and calls
/// `done` (now or later, from the worker's runtime) with the reply.
pub type AsyncHandler = Arc<dyn Fn(Done, Octets) + Send + Sync>;

/// What a handler may return: the reply, or an error for this call.
///
/// ```
/// use forkrpc::{octets, IntoReply};
/// assert_eq!(octets!["x"].into_reply(), Ok(octets!["x"]));
/// let failed: Result<forkrpc::Octets, std::io::Error> =
///     Err(std::io::Error::other("disk full"));
/// assert_eq!(failed.into_reply(), Err("disk full".to_owned()));
/// ```
pub trait IntoReply {
    /// The reply, or the error message.
    fn into_reply(self) -> Result<Octets, String>;
}

impl IntoReply for Octets {
    fn into_reply(self) -> Result<Octets, String> {
        Ok(self)
    }
}

impl<E: std::fmt::Display> IntoReply for Result<Octets, E> {
    fn into_reply(self) -> Result<Octets, String> {
        self.map_err(|e| e.to_string())
    }
}

/// An init function: runs once in a worker (or a derived template) before
/// anything else, with the arguments and descriptors sent to it.
pub type InitFn = Arc<dyn Fn(WorkerArgs) + Send + Sync>;

/// What `send_arg` and `send_fh` gave a worker, handed to its init function.
#[derive(Debug, Default)]
pub struct WorkerArgs {
    /// The `send_arg` values, in order.
    pub args: Vec<Bytes>,
    /// The `send_fh` descriptors, in order; now owned by the worker.
    pub fds: Vec<OwnedFd>,
}

#[derive(Clone)]
pub(crate) enum Handler {
    Sync(SyncHandler),
    Async(AsyncHandler),
    /// Bench baseline: echoes raw bytes, no framing.
    RawEcho,
}

#[derive(Clone, Default)]
pub(crate) struct Registry {
    pub handlers: BTreeMap<String, Handler>,
    pub inits: BTreeMap<String, InitFn>,
}

/// Name of the built-in echo handler (returns its arguments).
pub const ECHO: &str = "forkrpc::echo";
/// Name of the built-in async sleeping handler: waits the number of
/// milliseconds in its first argument on a timer, then returns its
/// arguments. Needs [`Options::asynchronous`](crate::Options::asynchronous).
pub const SLEEP: &str = "forkrpc::sleep";
pub(crate) const RAW_ECHO: &str = "forkrpc::raw-echo";

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let reg = g.get_or_insert_with(|| {
        let mut r = Registry::default();
        r.handlers.insert(ECHO.into(), Handler::Sync(Arc::new(Ok)));
        r.handlers
            .insert(SLEEP.into(), Handler::Async(Arc::new(sleep_handler)));
        r.handlers.insert(RAW_ECHO.into(), Handler::RawEcho);
        r
    });
    f(reg)
}

pub(crate) fn add_handler(name: String, h: Handler) {
    with(|r| r.handlers.insert(name, h));
}

pub(crate) fn add_init(name: String, f: InitFn) {
    with(|r| r.inits.insert(name, f));
}

pub(crate) fn handler(name: &str) -> Result<Handler, crate::Error> {
    with(|r| lookup(&r.handlers, "handler", name))
}

pub(crate) fn init(name: &str) -> Result<InitFn, crate::Error> {
    with(|r| lookup(&r.inits, "init function", name))
}

fn lookup<T: Clone>(
    map: &BTreeMap<String, T>,
    kind: &'static str,
    name: &str,
) -> Result<T, crate::Error> {
    map.get(name)
        .cloned()
        .ok_or_else(|| crate::Error::UnknownHandler {
            kind,
            name: name.into(),
            known: map.keys().cloned().collect::<Vec<_>>().join(", "),
        })
}

fn sleep_handler(done: Done, args: Octets) {
    let ms = args.str(0).and_then(|s| s.parse::<u64>().ok());
    let Some(ms) = ms else {
        return done.fail("forkrpc::sleep wants a number of milliseconds as its first argument");
    };
    tokio::task::spawn_local(async move {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        done.reply(args);
    });
}
