//! Handlers and init functions, found by name in the child. They are
//! registered before the template forks, so every worker inherits them
//! (copy-on-write) and a re-executed template registers them again by
//! running the same `main` up to `start()`.

use crate::Octets;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// A sync handler: gets a call's arguments, returns the reply.
pub type SyncHandler = Arc<dyn Fn(Octets) -> Octets + Send + Sync>;

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
pub(crate) const RAW_ECHO: &str = "forkrpc::raw-echo";

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let reg = g.get_or_insert_with(|| {
        let mut r = Registry::default();
        r.handlers
            .insert(ECHO.into(), Handler::Sync(Arc::new(|args| args)));
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
