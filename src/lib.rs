//! forkrpc: offload jobs to forked worker processes — call a named function
//! in a child process, get its results and events back — on io_uring.
//! The model is Perl's AnyEvent::Fork::RPC, and the wire format is
//! byte-compatible with it.
//!
//! ```no_run
//! use forkrpc::{octets, Options, Template};
//!
//! fn main() -> Result<(), forkrpc::Error> {
//!     // First thing in main: register handlers, fork the template.
//!     let template = Template::builder()
//!         .sync("MyWorker::run", |args| {
//!             forkrpc::event(octets!["working"]);
//!             args
//!         })
//!         .start()?;
//!     let rpc = template.fork().run("MyWorker::run", Options::default())?;
//!     let reply = rpc.call_blocking(octets!["rmdir", "/tmp/x"])?;
//!     assert_eq!(reply, octets!["rmdir", "/tmp/x"]);
//!     rpc.close_blocking()
//! }
//! ```
//!
//! # Layout
//!
//! From the bottom up; a module imports only from those above it in this
//! list (`scripts/module-graph` checks that no circle is left):
//!
//! - `error`, `sys` (the few raw syscalls outside the backends), `idmap`,
//!   `latch`, `prefetch`, `driver_thread` (is this a driver thread?).
//! - [`wire`]: the byte layout (BER varints, octets, frames, chunk frames,
//!   arena references) and `wire::sendq`, frames queued for a worker. No
//!   I/O. [`serial`]: serialisers (octets, JSON, rkyv, your own).
//! - `arena`: the shared memory where big strings of calls to sync
//!   workers cross without a copy; `journal`: a worker's crash journal.
//! - `child`: what runs in a worker: the sync backend, the async backend
//!   ([`Done`]) and its runtime (tokio-uring, else tokio), [`event`];
//!   `child::registry`: handlers and init functions by name (the template
//!   registers them, workers run them), typed handlers' adapters.
//! - `process`: fork, exec, descriptor passing and reaping; the template
//!   process and its client. The only place that forks.
//! - `call`: a call as the layers hand it down: its payload, its waiter,
//!   and `call::leftovers`, spent arguments and callbacks freed on a
//!   caller's thread, not the driver's.
//! - `engine`: the parent's driver thread (`engine::driver`) and its
//!   backends (io_uring, epoll) behind one contract (`engine::backend`);
//!   it calls up through `Protocol` (`engine::protocol`), a trait it
//!   defines and `rpc` implements.
//! - `rpc`: the RPC handle ([`Rpc`]) and its [`Options`]; `rpc::session`,
//!   the protocol of a connection, with its parts: `rpc::window`, async
//!   calls in flight by id;
//!   `rpc::outbox`, sync calls framed on the caller's thread;
//!   `rpc::deadline`, a single handle's call timeouts.
//! - `template`: [`Template`], [`Builder`], [`Fork`], [`init`].
//! - `pool`: [`Pool`], acting on the decisions of `forkrpc-pool`'s
//!   scheduler; bulk [`Pool::map`]. Its state (`pool::state`) has its
//!   methods by job in `submit`, `dispatch`, `tracking` and `manager`;
//!   the files below it (jobs, staging, chunk batches, a map's chunks)
//!   call it back through traits they define. `typed`: typed handles ([`Typed`],
//!   [`TypedPool`]) over a codec.

#![warn(missing_docs)]

/// The README's example, run as a doc test so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeExample;

mod arena;
mod call;
mod child;
mod driver_thread;
pub mod engine;
mod error;
mod idmap;
mod journal;
mod latch;
mod pool;
mod prefetch;
mod process;
mod rpc;
pub mod serial;
mod sys;
mod template;
mod typed;
pub mod wire;

pub use arena::{arena_stats, in_shared_arena, ArenaStats};
pub use child::asynchronous::{DEFAULT_CONCURRENCY, OUT_HIGH};
pub use child::done::Done;
pub use child::registry::{
    AsyncHandler, InitFn, IntoReply, SyncHandler, WorkerArgs, BURN, ECHO, ECHO_JSON, ECHO_RKYV,
    SLEEP, SLEEP_BLOCKING,
};
pub use child::runtime::{async_runtime, uring, AsyncRuntime};
pub use child::{event, event_with, retire, PANIC_EXIT_CODE, PROTOCOL_EXIT_CODE};
pub use engine::EngineKind;
pub use error::{Error, ExitStatus, Result};
pub use pool::{ncpu, Map, Ncpu, Pool, PoolCall, PoolConfig, PoolOptions, PoolStats};
pub use process::{template_mode, TemplateMode, MARKER};
pub use rpc::{CallFuture, Closing, Options, Rpc};
pub use template::{init, Builder, Fork, Template};
pub use typed::{Typed, TypedCall, TypedPool};
#[doc(hidden)]
pub use wire::octets::__to_bytes;
pub use wire::Octets;
