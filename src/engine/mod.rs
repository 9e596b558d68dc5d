//! The parent engine: one driver thread owns every worker socket and moves
//! bytes between per-worker buffers and the sockets. It knows frames only to
//! split them; what a frame means is the `Protocol`'s business.
//!
//! # Files
//!
//! - `kind.rs`: which backend ([`EngineKind`]);
//! - `protocol.rs`: the contract with the layer above: the `Protocol` a
//!   connection's owner implements (the engine calls up through it) and
//!   the counters both read;
//! - `mailbox.rs`: commands in, leftovers out, and the wake-up eventfd;
//! - `backend.rs`: the backend contract; one file per backend: `uring.rs`,
//!   `epoll.rs`;
//! - `spin.rs`: when the driver polls before it sleeps;
//! - `driver.rs`: the driver loop and the state of a connection;
//! - `mod.rs`: the `Engine` handle: start a driver, push commands.
//!
//! # Copies of a big payload
//!
//! To a worker we started (either backend), a byte string of 64 KiB or
//! more (`arena::SHARE_MIN`) in an octets call, or a frozen payload that
//! big, takes none of the paths below: the caller copies it once into the
//! mailbox arena (see `arena.rs`), the worker reads it where it lies, and a
//! reply that returns it names it again: one copy in all, none by the
//! kernel. What follows is the socket path: exec'd workers, smaller
//! payloads, replies a worker made itself, and strings the arena has no
//! room for.
//!
//! - Send: a byte string of 64 KiB or more (`SEND_IN_PLACE`) in a call's
//!   arguments is sent from the caller's own buffer (the `Bytes` inside its
//!   `Octets`, or a serialiser's frozen payload): no copy in user space,
//!   one by the kernel into the socket. Smaller pieces are copied once into
//!   the connection's send buffer, so that many frames leave in one send.
//! - Receive: the kernel copies into the connection's receive buffer (each
//!   read goes straight into its spare capacity), and a reply's strings
//!   are slices of that buffer: no copy in user space. While a frame larger
//!   than the buffer arrives, the buffer grows by at most doubling (so an
//!   announced length allocates only as its bytes arrive), copying what
//!   came so far: at most about one copy of the frame, amortised; a buffer
//!   that is big enough already is reused without copying.
//! - The sync worker reads the same way, and writes a reply's strings of
//!   64 KiB or more straight from where they lie (for an echo, from its
//!   receive buffer). The async worker copies replies once into its output
//!   buffer.
//!
//! # Wake-ups
//!
//! When a loop has sends for one connection only, small ones (up to 16 KiB)
//! go out with a non-blocking send(2) straight away: a ping-pong then costs
//! one enter per round trip instead of two (the send's completion would end
//! the wait early). Several connections' sends, and big ones, are submitted
//! together through the backend.
//!
//! Callers on any thread push `Command`s to a queue and write an eventfd
//! only when the driver is asleep; the driver drains the queue once per
//! loop. Code running on the driver thread (callbacks) never wakes it.
//! Calls to sync workers skip the queue: callers frame them in the
//! connection's outbox (`crate::rpc::outbox`), and the driver takes it after
//! each read of that connection's replies, so while calls are outstanding
//! nobody wakes it for more (`Command::Flush` tells it otherwise).

mod backend;
mod driver;
pub(crate) mod epoll;
mod kind;
mod mailbox;
mod protocol;
mod spin;
pub(crate) mod uring;

use driver::Driver;
pub use kind::EngineKind;
pub(crate) use mailbox::Command;
use mailbox::{Mailbox, Queue};
pub(crate) use protocol::{ConnStats, Protocol};

use crate::driver_thread::{on_driver_thread, ON_DRIVER};
use crate::error::Error;
pub(crate) use crate::wire::sendq::SendQueue;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Frees what calls left behind on the driver threads, here on the calling
/// thread: for callers that hand work over some other way than queuing
/// commands themselves (a pool's jobs are sent by the driver).
pub(crate) fn collect_leftovers() {
    if on_driver_thread() {
        return;
    }
    for e in ENGINES.iter().filter_map(|e| e.get()?.as_ref().ok()) {
        if e.mailbox.bin_ready.load(Ordering::Relaxed) {
            let bins = e.mailbox.take_bins(&mut e.mailbox.queue.lock().unwrap());
            e.mailbox.free_bins(bins);
        }
    }
}

/// Handle to a running driver thread.
pub(crate) struct Engine {
    mailbox: Arc<Mailbox>,
    kind: EngineKind,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static ENGINES: [OnceLock<Result<Engine, Error>>; 2] = [OnceLock::new(), OnceLock::new()];

impl Engine {
    /// The engine of `kind`, started on first use.
    pub(crate) fn get(kind: EngineKind) -> Result<&'static Engine, Error> {
        let slot = &ENGINES[kind as usize];
        slot.get_or_init(|| {
            crate::process::set_exit_hook(|pid, status| {
                for e in ENGINES.iter().filter_map(|e| e.get()?.as_ref().ok()) {
                    e.push(Command::Exited { pid, status });
                }
            });
            Engine::start(kind)
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    fn start(kind: EngineKind) -> Result<Engine, Error> {
        let wake =
            crate::sys::eventfd().map_err(|e| Error::io("creating the engine eventfd", e))?;
        let mailbox = Arc::new(Mailbox {
            queue: Mutex::new(Queue::default()),
            bin_ready: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            wake,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let mb = mailbox.clone();
        std::thread::Builder::new()
            .name(format!("forkrpc-{}", kind.name()))
            .spawn(move || {
                ON_DRIVER.set(true);
                // The ring is created on the thread that uses it.
                match kind {
                    EngineKind::Uring => match uring::Uring::new() {
                        Ok(io) => {
                            let _ = tx.send(Ok(()));
                            Driver::new(io, mb).run()
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Error::io("setting up io_uring", e)));
                        }
                    },
                    EngineKind::Epoll => match epoll::Epoll::new() {
                        Ok(io) => {
                            let _ = tx.send(Ok(()));
                            Driver::new(io, mb).run()
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Error::io("setting up epoll", e)));
                        }
                    },
                }
            })
            .map_err(|e| Error::io("starting the driver thread", e))?;
        rx.recv()
            .map_err(|_| Error::Template("driver thread died at start".into()))??;
        Ok(Engine { mailbox, kind })
    }

    /// Which backend this is.
    pub(crate) fn kind(&self) -> EngineKind {
        self.kind
    }

    /// A new connection id.
    pub(crate) fn next_id() -> u64 {
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a command and wakes the driver if it sleeps. Takes what
    /// earlier calls left behind and frees it here, on the caller's thread.
    pub(crate) fn push(&self, cmd: Command) {
        self.push_counted(cmd, None)
    }

    /// As [`Engine::push`], adding `n` to `count` under the queue's lock.
    /// Every writer of a connection's `submitted` counter goes through
    /// here, so the lock orders them and a plain store does: no locked
    /// add per call.
    pub(crate) fn push_counted(&self, cmd: Command, count: Option<(&AtomicU64, u64)>) {
        let next_slot;
        let leftovers = {
            let mut q = self.mailbox.queue.lock().unwrap();
            if let Some((c, n)) = count {
                c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
            }
            q.commands.push(cmd);
            next_slot = q.commands.spare_capacity_mut().as_ptr() as usize;
            if on_driver_thread() {
                None
            } else {
                self.mailbox.take_bins(&mut q)
            }
        };
        // The slot's lines were last read by the driver on the other core:
        // fetching them while this caller prepares its next call shortens
        // the next push's wait for them at the unlock (which drains the
        // pending stores).
        crate::prefetch::two_lines(next_slot);
        // The queue's mutex orders this load after the driver's store of
        // `sleeping` whenever the driver could have missed our command, so
        // a plain load filters the common case without a locked RMW.
        if !on_driver_thread()
            && self.mailbox.sleeping.load(Ordering::Relaxed)
            && self.mailbox.sleeping.swap(false, Ordering::SeqCst)
        {
            let one = 1u64.to_ne_bytes();
            let _ = nix::unistd::write(&self.mailbox.wake, &one);
        }
        self.mailbox.free_bins(leftovers);
    }
}
