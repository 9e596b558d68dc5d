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
//! - [`wire`]: the byte layout (BER varints, octets, frames). No I/O.
//! - [`serial`]: serialisers (octets, JSON, rkyv, your own) for typed calls.
//! - `arena`: the shared memory where big strings of calls to sync
//!   workers cross without a copy (mapping, regions, who holds them).
//! - `process`: fork, exec, descriptor passing and reaping; the template
//!   process and its client. The only place that forks.
//! - `engine`: the parent's driver thread and its backends (io_uring,
//!   epoll) behind one contract.
//! - `child`: what runs in a worker: the sync backend, the async backend
//!   ([`Done`]) and its runtime (tokio-uring, else tokio), [`event`];
//!   `child::registry`: handlers and init functions by name (the template
//!   registers them, workers run them), typed handlers' adapters.
//! - `rpc`: the RPC handle ([`Rpc`]) and the protocol of a connection,
//!   with its parts: `rpc::window`, async calls in flight by id;
//!   `rpc::outbox`, sync calls framed on the caller's thread;
//!   `rpc::leftovers`, spent arguments and callbacks freed on a caller's
//!   thread, not the driver's; `rpc::deadline`, a single handle's call
//!   timeouts.
//! - `typed`: typed handles ([`Typed`], [`TypedPool`]) over a codec.
//! - `pool`: [`Pool`], acting on the decisions of `forkrpc-pool`'s
//!   scheduler; bulk [`Pool::map`].
//! - `template`: [`Template`], [`Builder`], [`Fork`], [`init`].
//! - `sys`: the few raw syscalls outside the backends; `idmap`: maps keyed
//!   by our own ids; `prefetch`: cache hints for the callers' queues.

#![warn(missing_docs)]

/// The README's example, run as a doc test so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeExample;

mod arena;
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
pub use child::asynchronous::{Done, DEFAULT_CONCURRENCY, OUT_HIGH};
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
