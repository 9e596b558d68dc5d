//! Handlers and init functions, found by name in the child. They are
//! registered before the template forks, so every worker inherits them
//! (copy-on-write) and a re-executed template registers them again by
//! running the same `main` up to `start()`.

use super::done::Done;
pub use super::done::IntoReply;
use crate::serial::Codec;
use crate::wire::Octets;
use crate::wire::REPLY_OFFSET;
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// A sync handler: gets a call's arguments, returns the reply (or an error
/// message, which fails that call with [`Error::Handler`](crate::Error::Handler)).
pub type SyncHandler = Arc<dyn Fn(Octets) -> Result<Octets, String> + Send + Sync>;

/// An async handler: gets the call's [`Done`] and its arguments, and calls
/// `done` (now or later, from the worker's runtime) with the reply.
pub type AsyncHandler = Arc<dyn Fn(Done, Octets) + Send + Sync>;

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

/// A typed sync handler: thaws the request payload (which had the given
/// header size in front of it) and appends the frozen reply payload to the
/// buffer (the sync worker reuses one from call to call).
pub(crate) type RawHandler =
    Arc<dyn Fn(Bytes, usize, &mut bytes::BytesMut) -> Result<(), String> + Send + Sync>;
/// A typed async handler: as [`RawHandler`], replying through `Done`.
pub(crate) type RawAsyncHandler = Arc<dyn Fn(Done, Bytes, usize) + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Handler {
    Sync(SyncHandler),
    Async(AsyncHandler),
    Raw(RawHandler),
    RawAsync(RawAsyncHandler),
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
/// Name of the built-in blocking sleeping handler: as [`SLEEP`], but the
/// worker sleeps (any backend; the async one stalls while it does).
pub const SLEEP_BLOCKING: &str = "forkrpc::sleep-blocking";
/// Name of the built-in JSON echo handler (typed with
/// [`Json`](crate::serial::Json)): returns the value it gets.
pub const ECHO_JSON: &str = "forkrpc::echo-json";
/// Name of the built-in rkyv echo handler (typed with
/// [`Rkyv`](crate::serial::Rkyv), request and reply `Vec<u8>`): reads the
/// request in place and returns its bytes.
pub const ECHO_RKYV: &str = "forkrpc::echo-rkyv";
/// Name of the built-in CPU-burning handler: spins for the number of
/// microseconds in its first argument, then returns its arguments.
pub const BURN: &str = "forkrpc::burn";
pub(crate) const RAW_ECHO: &str = "forkrpc::raw-echo";

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let reg = g.get_or_insert_with(|| {
        let mut r = Registry::default();
        r.handlers.insert(ECHO.into(), Handler::Sync(Arc::new(Ok)));
        r.handlers
            .insert(SLEEP.into(), Handler::Async(Arc::new(sleep_handler)));
        r.handlers.insert(
            SLEEP_BLOCKING.into(),
            Handler::Sync(Arc::new(|args| {
                std::thread::sleep(std::time::Duration::from_millis(first_number(&args)?));
                Ok(args)
            })),
        );
        r.handlers.insert(
            ECHO_JSON.into(),
            Handler::Raw(raw_sync::<_, serde_json::Value, serde_json::Value>(
                crate::serial::Json,
                |v| v,
            )),
        );
        r.handlers.insert(
            ECHO_RKYV.into(),
            Handler::Raw(raw_sync::<_, Vec<u8>, Vec<u8>>(
                crate::serial::Rkyv::checked(),
                |v: crate::serial::Archived<Vec<u8>>| v.as_slice().to_vec(),
            )),
        );
        r.handlers.insert(
            BURN.into(),
            Handler::Sync(Arc::new(|args| {
                let us = first_number(&args)?;
                let until = std::time::Instant::now() + std::time::Duration::from_micros(us);
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                Ok(args)
            })),
        );
        r.handlers.insert(RAW_ECHO.into(), Handler::RawEcho);
        r
    });
    f(reg)
}

impl Handler {
    /// Needs the async backend.
    pub(crate) fn is_async(&self) -> bool {
        matches!(self, Handler::Async(_) | Handler::RawAsync(_))
    }
}

pub(crate) fn add_handler(name: String, h: Handler) {
    with(|r| r.handlers.insert(name, h));
}

pub(crate) fn add_init(name: String, f: InitFn) {
    with(|r| r.inits.insert(name, f));
}

pub(crate) fn handler(name: &str) -> Result<Handler, crate::error::Error> {
    with(|r| lookup(&r.handlers, "handler", name))
}

pub(crate) fn init(name: &str) -> Result<InitFn, crate::error::Error> {
    with(|r| lookup(&r.inits, "init function", name))
}

fn lookup<T: Clone>(
    map: &BTreeMap<String, T>,
    kind: &'static str,
    name: &str,
) -> Result<T, crate::error::Error> {
    map.get(name)
        .cloned()
        .ok_or_else(|| crate::error::Error::UnknownHandler {
            kind,
            name: name.into(),
            known: map.keys().cloned().collect::<Vec<_>>().join(", "),
        })
}

/// The first argument as a number, or the error the built-ins give.
fn first_number(args: &Octets) -> Result<u64, String> {
    args.str(0)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| "the first argument must be a number".to_owned())
}

fn sleep_handler(done: Done, args: Octets) {
    let ms = match first_number(&args) {
        Ok(ms) => ms,
        Err(e) => return done.fail(e),
    };
    tokio::task::spawn_local(async move {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        done.reply(args);
    });
}

/// The `Thawed` form of `T` through codec `C`.
type Thawed<C, T> = <C as Codec<T>>::Thawed;

/// Wraps a typed sync handler for the registry.
pub(crate) fn raw_sync<C, Req, Resp>(
    codec: C,
    f: impl Fn(Thawed<C, Req>) -> Resp + Send + Sync + 'static,
) -> RawHandler
where
    C: Codec<Req> + Codec<Resp>,
{
    Arc::new(move |payload: Bytes, offset: usize, out: &mut BytesMut| {
        let req = <C as Codec<Req>>::thaw(&codec, payload, offset).map_err(|e| e.to_string())?;
        let resp = f(req);
        codec
            .freeze(&resp, out, REPLY_OFFSET)
            .map_err(|e| e.to_string())
    })
}

/// Wraps a typed async handler (an `async fn`) for the registry.
pub(crate) fn raw_async<C, Req, Resp, F, Fut>(codec: C, f: F) -> RawAsyncHandler
where
    C: Codec<Req> + Codec<Resp>,
    F: Fn(Thawed<C, Req>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + 'static,
{
    let codec = Arc::new(codec);
    Arc::new(move |done, payload: Bytes, offset: usize| {
        let req = match <C as Codec<Req>>::thaw(&codec, payload, offset) {
            Ok(r) => r,
            Err(e) => return done.fail(e),
        };
        let fut = f(req);
        let codec = codec.clone();
        tokio::task::spawn_local(async move {
            let resp = fut.await;
            let mut out = BytesMut::new();
            let reply = codec
                .freeze(&resp, &mut out, REPLY_OFFSET)
                .map(|()| &out[..]);
            done.reply_raw(reply.map_err(|e| e.to_string()));
        });
    })
}
