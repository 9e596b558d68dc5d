//! The parent engine: one driver thread owns every worker socket and moves
//! bytes between per-worker buffers and the sockets. It knows frames only to
//! split them; what a frame means is the `Protocol`'s business.
//!
//! # Backend contract
//!
//! In `backend.rs`; one file per backend: `uring.rs`, `epoll.rs`.
//!
//! # Copies of a big payload
//!
//! To a worker we started (either backend), a byte string of 64 KiB or
//! more (`arena::SHARE_MIN`) in an octets call, or a frozen payload that
//! big, takes none of the paths below: the caller copies it once into the
//! shared arena (see `arena.rs`), the worker reads it where it lies, and a
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
pub(crate) mod epoll;
pub(crate) mod uring;

use backend::{Completion, Io, Op};

use crate::call::leftovers::{self, Bin, Shelf, IDLE_FREE};
use crate::call::Call;
use crate::driver_thread::{on_driver_thread, ON_DRIVER};
use crate::error::{Error, ExitStatus};
use crate::idmap::IdMap;
use crate::wire::frame::{id_frames, read_want};
pub(crate) use crate::wire::sendq::SendQueue;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Which I/O backend drives the worker sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring (Linux 5.11+; see `uring` for the features used).
    Uring,
    /// epoll, where io_uring is missing or forbidden.
    Epoll,
}

impl EngineKind {
    /// The engine named by `FORKRPC_ENGINE` (`uring` or `epoll`), else io_uring
    /// where the kernel allows it, else epoll.
    pub fn from_env() -> EngineKind {
        match std::env::var("FORKRPC_ENGINE").as_deref() {
            Ok("epoll") => EngineKind::Epoll,
            Ok("uring") => EngineKind::Uring,
            _ => match uring::available() {
                Ok(()) => EngineKind::Uring,
                Err(e) => {
                    eprintln!("forkrpc: io_uring is unavailable ({e}); using the epoll engine");
                    EngineKind::Epoll
                }
            },
        }
    }

    /// `"uring"` or `"epoll"`.
    pub fn name(&self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Epoll => "epoll",
        }
    }
}

/// Calls submitted to the workers of `conns` and not yet answered.
fn in_flight(conns: &IdMap<u64, Conn>) -> u64 {
    conns.values().map(|c| c.stats.unanswered()).sum()
}

/// When the driver polls before it sleeps. Waking a sleeping thread costs
/// about as much as a whole round trip to a worker on these machines, so
/// while few calls are in flight (a ping-pong, a caller awaiting each
/// reply, whose next call the poll then catches too) the driver polls for
/// up to [`Spin::LIMIT`] before sleeping: W2 went from 1.3–1.45 to
/// 0.86–0.97 of the raw ping-pong, W2f from 2.6–3.0 to 2.07. With many calls in
/// flight a wake-up is shared by a batch of replies and polling would only
/// take CPU from the workers, so it does not. A poll that finds nothing
/// makes the next ones rarer (1, 3, 7 ... up to 63 waits are skipped), so
/// slow calls cost little CPU; one that finds a completion resets that.
/// `FORKRPC_SPIN_US` sets the limit in µs; 0 turns polling off.
pub(crate) struct Spin {
    limit: Duration,
    skip: u32,
    backoff: u32,
}

impl Spin {
    /// Default limit: a little more than a round trip to an idle worker.
    pub(crate) const LIMIT: Duration = Duration::from_micros(30);
    /// Calls in flight up to which the driver polls.
    pub(crate) const MAX_IN_FLIGHT: u64 = 4;

    fn from_env() -> Spin {
        let limit = std::env::var("FORKRPC_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Self::LIMIT, Duration::from_micros);
        Spin::new(limit)
    }

    fn new(limit: Duration) -> Spin {
        Spin {
            limit,
            skip: 0,
            backoff: 0,
        }
    }

    /// How long to poll before a wait with `timeout`, `in_flight` calls
    /// being outstanding.
    /// `in_flight` is asked only when the rest allows polling.
    fn before_wait(
        &mut self,
        timeout: Option<Duration>,
        in_flight: impl FnOnce() -> u64,
    ) -> Duration {
        if self.limit.is_zero()
            || timeout.is_some_and(|t| t < self.limit)
            || in_flight() > Self::MAX_IN_FLIGHT
        {
            return Duration::ZERO;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Duration::ZERO;
        }
        self.limit
    }

    /// After a wait that polled for `spun`, returning after `took`.
    fn after_wait(&mut self, spun: Duration, took: Duration) {
        if spun.is_zero() {
            return;
        }
        if took <= spun {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2 + 1).min(63);
            self.skip = self.backoff;
        }
    }
}

/// The RPC layer's side of one worker connection; runs on the driver thread.
pub(crate) trait Protocol: Send {
    /// Appends the request frame for `call` to `out` and remembers `call`.
    fn encode(&mut self, call: Call, out: &mut SendQueue);
    /// Handles one reply or event: frame `id`, whose payload is `payload`
    /// of `buf` (the frames of one read, frozen together). An error is a
    /// protocol violation.
    fn frame(
        &mut self,
        id: u32,
        buf: &Bytes,
        payload: std::ops::Range<usize>,
    ) -> Result<(), String>;
    /// The connection ended: EOF (or a read error), and `status` if known;
    /// `rest` is what it sent after its last complete frame, `received`
    /// the bytes read from it in all.
    fn finish(&mut self, pid: i32, status: Option<ExitStatus>, rest: BytesMut, received: u64);
    /// Takes the calls that callers framed themselves (see `outbox`),
    /// appending their frames to `out`, or dropping them when `live` is
    /// false (the worker can no longer read).
    fn take_framed(&mut self, _out: &mut SendQueue, _live: bool) {}
}

/// Counters of one connection, readable from any thread. Callers write
/// `submitted`, the driver the rest: they sit on separate cache lines.
#[derive(Default)]
pub(crate) struct ConnStats {
    /// Calls handed to the engine (by callers, under the engine's queue
    /// lock: see [`Engine::push_counted`]).
    pub submitted: CacheLine<AtomicU64>,
    /// Calls framed by callers (under the connection's outbox lock: see
    /// `outbox`).
    pub framed: CacheLine<AtomicU64>,
    /// Calls resolved by a reply or an error note (by the driver).
    pub answered: CacheLine<AtomicU64>,
    /// Send operations submitted (a batch of frames each, or the rest of
    /// a partly sent batch).
    pub sends: AtomicU64,
    /// The connection has ended and every call is resolved.
    pub ended: AtomicBool,
    /// Set by whoever killed the worker on purpose: the error its
    /// outstanding calls get instead of "worker exited".
    pub note: Mutex<Option<Error>>,
    /// How the worker ended, set when its connection does: what calls made
    /// after that fail with ([`Error::NotStarted`] naming the end: they
    /// were never sent).
    pub death: OnceLock<Error>,
}

impl ConnStats {
    /// Calls handed over (as commands or framed) and not answered yet.
    pub(crate) fn unanswered(&self) -> u64 {
        let made = self.submitted.load(Ordering::Relaxed) + self.framed.load(Ordering::Relaxed);
        made.saturating_sub(self.answered.load(Ordering::Relaxed))
    }

    /// The error for a call that reached the connection after it ended:
    /// how the worker ended, or `Closed` if that is not known.
    pub(crate) fn refusal(&self) -> Error {
        self.death.get().cloned().unwrap_or(Error::Closed)
    }
}

/// A value alone on its cache line, so writers on other threads do not
/// slow each other down.
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct CacheLine<T>(pub T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

pub(crate) enum Command {
    Add {
        id: u64,
        fd: OwnedFd,
        pid: i32,
        proto: Box<dyn Protocol>,
        stats: Arc<ConnStats>,
    },
    Call {
        id: u64,
        call: Call,
    },
    /// Several calls for one connection, in order (a pool's batch).
    Calls {
        id: u64,
        calls: Vec<Call>,
    },
    Close {
        id: u64,
    },
    /// Take the calls framed in the outbox of connection `id`.
    Flush {
        id: u64,
    },
    Exited {
        pid: i32,
        status: ExitStatus,
    },
    /// Run this on the driver thread (a call's timeout completing it, so
    /// that its callback runs where callbacks run).
    Run(Box<dyn FnOnce() + Send>),
}

/// What callers hand the driver (commands) and what it hands back (bins
/// of leftovers), with its sleep flag and the eventfd that wakes it.
struct Mailbox {
    queue: Mutex<Queue>,
    /// The queue's shelf holds bins (a hint for [`collect_leftovers`]).
    bin_ready: AtomicBool,
    sleeping: AtomicBool,
    wake: OwnedFd,
}

/// What callers hand the driver, and what it hands back.
#[derive(Default)]
struct Queue {
    commands: Vec<Command>,
    /// Spent arguments and callbacks for a caller to free.
    shelf: Shelf,
    /// How many times someone took the shelf's bins.
    collected: u64,
}

impl Mailbox {
    /// Takes the shelf's bins (under the lock).
    fn take_bins(&self, q: &mut Queue) -> Option<Vec<Bin>> {
        let bins = q.shelf.take()?;
        q.collected += 1;
        self.bin_ready.store(false, Ordering::Relaxed);
        Some(bins)
    }

    /// Frees what `bins` hold on this thread (without the lock), then
    /// puts the bins back for reuse.
    fn free_bins(&self, bins: Option<Vec<Bin>>) {
        if let Some(mut bins) = bins {
            leftovers::empty(&mut bins);
            self.queue.lock().unwrap().shelf.put_back(bins);
        }
    }
}

/// Frees what calls left behind on the driver threads, here on the calling
/// thread: for callers that hand work over some other way than queuing
/// commands themselves (a pool's jobs are sent by the driver).
pub(crate) fn collect_leftovers() {
    if on_driver_thread() {
        return;
    }
    for e in ENGINES.iter().filter_map(|e| e.get()?.as_ref().ok()) {
        if e.shared.bin_ready.load(Ordering::Relaxed) {
            let bins = e.shared.take_bins(&mut e.shared.queue.lock().unwrap());
            e.shared.free_bins(bins);
        }
    }
}

/// Handle to a running driver thread.
pub(crate) struct Engine {
    shared: Arc<Mailbox>,
    kind: EngineKind,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static ENGINES: [OnceLock<Result<Engine, Error>>; 2] = [OnceLock::new(), OnceLock::new()];

/// Largest send the driver makes with send(2) when one connection alone
/// has something to send (see `flush_dirty`).
const DIRECT_SEND_MAX: usize = 16 * 1024;
/// Read buffers grow at least this much at a time.
const READ_CHUNK: usize = 64 * 1024;
/// How long a worker may keep running after closing its connection with
/// calls outstanding before the calls fail without an exit status.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Exit reports kept for workers the driver does not know (yet).
const EARLY_EXITS: usize = 1024;
/// Token of the wake-up eventfd.
const WAKE_ID: u64 = 0;

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
        // SAFETY: eventfd takes no pointers; a valid result is a new
        // descriptor that nothing else owns.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(Error::io(
                "creating the engine eventfd",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Mailbox {
            queue: Mutex::new(Queue::default()),
            bin_ready: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            wake,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("forkrpc-{}", kind.name()))
            .spawn(move || {
                ON_DRIVER.set(true);
                // The ring is created on the thread that uses it.
                match kind {
                    EngineKind::Uring => match uring::Uring::new() {
                        Ok(io) => {
                            let _ = tx.send(Ok(()));
                            Driver::new(io, sh).run()
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Error::io("setting up io_uring", e)));
                        }
                    },
                    EngineKind::Epoll => match epoll::Epoll::new() {
                        Ok(io) => {
                            let _ = tx.send(Ok(()));
                            Driver::new(io, sh).run()
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
        Ok(Engine { shared, kind })
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
            let mut q = self.shared.queue.lock().unwrap();
            if let Some((c, n)) = count {
                c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
            }
            q.commands.push(cmd);
            next_slot = q.commands.spare_capacity_mut().as_ptr() as usize;
            if on_driver_thread() {
                None
            } else {
                self.shared.take_bins(&mut q)
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
            && self.shared.sleeping.load(Ordering::Relaxed)
            && self.shared.sleeping.swap(false, Ordering::SeqCst)
        {
            let one = 1u64.to_ne_bytes();
            let _ = nix::unistd::write(&self.shared.wake, &one);
        }
        self.shared.free_bins(leftovers);
    }
}

struct Conn {
    fd: OwnedFd,
    pid: i32,
    proto: Box<dyn Protocol>,
    stats: Arc<ConnStats>,
    /// Frames not yet handed to the kernel.
    out: SendQueue,
    /// The buffer of the send in flight, and how much of it went already.
    sending: Option<(Bytes, usize)>,
    inbuf: BytesMut,
    /// Bytes read from the worker in all.
    received: u64,
    want: usize,
    reading: bool,
    /// The handle was dropped: shut the write side once `out` is sent.
    closing: bool,
    shut: bool,
    eof: bool,
    status: Option<ExitStatus>,
    deadline: Option<Instant>,
}

struct Driver<I: Io> {
    io: I,
    shared: Arc<Mailbox>,
    conns: IdMap<u64, Conn>,
    /// Ended connections whose handle is still alive: calls that reach
    /// them fail with how the worker ended ([`ConnStats::refusal`]).
    /// Dropped with the handle (`Command::Close`).
    ended: IdMap<u64, Arc<ConnStats>>,
    by_pid: IdMap<i32, u64>,
    early_exits: VecDeque<(i32, ExitStatus)>,
    dirty: Vec<u64>,
    /// Connections at EOF whose exit is not reported yet (they have a
    /// deadline); lets the loop skip the deadline scans when there are none.
    awaiting_exit: usize,
    done: Vec<Completion>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// When the driver frees bins no caller collected, and the count of
    /// collections it saw when it set that time.
    free_bin_at: Option<(Instant, u64)>,
    spin: Spin,
}

impl<I: Io> Driver<I> {
    fn new(io: I, shared: Arc<Mailbox>) -> Self {
        Driver {
            io,
            shared,
            conns: IdMap::default(),
            ended: IdMap::default(),
            by_pid: IdMap::default(),
            early_exits: VecDeque::new(),
            dirty: Vec::new(),
            awaiting_exit: 0,
            done: Vec::with_capacity(256),
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            free_bin_at: None,
            spin: Spin::from_env(),
        }
    }

    fn run(mut self) {
        let wake_fd = self.shared.wake.as_raw_fd();
        if let Err(e) = self.io.add(wake_fd, WAKE_ID) {
            eprintln!("forkrpc: driver cannot watch its eventfd: {e}");
            return;
        }
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut batch, &mut self.shared.queue.lock().unwrap().commands);
            for cmd in batch.drain(..) {
                self.command(cmd);
            }
            self.flush_dirty();
            if !self.wake_armed {
                self.wake_armed = true;
                let p = self.wake_buf.as_mut_ptr();
                // SAFETY: `wake_buf` is a heap buffer owned by the driver,
                // only touched again after this read completes.
                unsafe { self.io.read(wake_fd, WAKE_ID, p, 8) };
            }
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let timeout = {
                let mut q = self.shared.queue.lock().unwrap();
                // Nothing spent stays on this thread while it sleeps.
                q.shelf.hand_over();
                if !q.shelf.is_empty() {
                    self.shared.bin_ready.store(true, Ordering::Relaxed);
                    if self.free_bin_at.is_none() {
                        self.free_bin_at = Some((Instant::now() + IDLE_FREE, q.collected));
                    }
                }
                if q.commands.is_empty() {
                    self.next_deadline()
                        .map(|d| d.saturating_duration_since(Instant::now()))
                } else {
                    Some(Duration::ZERO)
                }
            };
            let conns = &self.conns;
            let spun = self.spin.before_wait(timeout, || in_flight(conns));
            let t = (!spun.is_zero()).then(Instant::now);
            let r = self.io.wait(&mut self.done, timeout, spun);
            if let Some(t) = t {
                self.spin.after_wait(spun, t.elapsed());
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::EINTR) {
                    eprintln!("forkrpc: driver wait failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let mut done = std::mem::take(&mut self.done);
            for c in done.drain(..) {
                self.completion(c);
            }
            self.done = done;
            self.expire();
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Add {
                id,
                fd,
                pid,
                proto,
                stats,
            } => {
                if let Err(e) = self.io.add(fd.as_raw_fd(), id) {
                    let mut proto = proto;
                    eprintln!("forkrpc: cannot watch worker {pid}: {e}");
                    proto.finish(pid, None, BytesMut::new(), 0);
                    return;
                }
                let status = self
                    .early_exits
                    .iter()
                    .position(|(p, _)| *p == pid)
                    .and_then(|i| self.early_exits.remove(i))
                    .map(|(_, s)| s);
                self.by_pid.insert(pid, id);
                self.conns.insert(
                    id,
                    Conn {
                        fd,
                        pid,
                        proto,
                        stats,
                        out: SendQueue::with_capacity(READ_CHUNK),
                        sending: None,
                        inbuf: BytesMut::with_capacity(READ_CHUNK),
                        received: 0,
                        want: READ_CHUNK,
                        reading: false,
                        closing: false,
                        shut: false,
                        eof: false,
                        status,
                        deadline: None,
                    },
                );
                self.arm_read(id);
            }
            Command::Call { id, call } => {
                self.take_framed(id);
                self.calls(id, std::iter::once(call))
            }
            Command::Calls { id, calls } => {
                self.take_framed(id);
                self.calls(id, calls.into_iter())
            }
            Command::Flush { id } => self.take_framed(id),
            Command::Close { id } => {
                self.take_framed(id);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.closing = true;
                    self.dirty.push(id);
                } else {
                    self.ended.remove(&id);
                }
            }
            Command::Run(f) => f(),
            Command::Exited { pid, status } => match self.by_pid.get(&pid) {
                Some(&id) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.status = Some(status);
                    }
                    self.maybe_finish(id);
                }
                None => {
                    if self.early_exits.len() >= EARLY_EXITS {
                        self.early_exits.pop_front();
                    }
                    self.early_exits.push_back((pid, status));
                }
            },
        }
    }

    /// Starts sends for connections with output and no send in flight, and
    /// shuts down the write side of closing ones that have sent everything.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        // A lone small send (a ping-pong) goes out at once with send(2):
        // its completion would otherwise end the next wait early and cost
        // a second enter per round trip. Several go together in one enter.
        let direct = dirty.len() == 1;
        for id in dirty.drain(..) {
            if direct {
                self.send_direct(id);
            }
            self.start_send(id);
        }
        self.dirty = dirty;
    }

    /// Sends small pieces of connection `id` with non-blocking send(2)
    /// while they go out whole; leaves the rest to `start_send`.
    fn send_direct(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while c.sending.is_none() && !c.shut {
            let Some(buf) = c.out.next_small(DIRECT_SEND_MAX) else {
                return;
            };
            c.stats.sends.fetch_add(1, Ordering::Relaxed);
            match crate::sys::send_nonblocking(c.fd.as_raw_fd(), &buf) {
                Ok(n) if n == buf.len() => {}
                Ok(n) => {
                    // The rest through the ring, as a partly sent buffer.
                    let (ptr, len) = (buf[n..].as_ptr(), buf.len() - n);
                    c.sending = Some((buf, n));
                    // SAFETY: as in `start_send`: the bytes live in
                    // `c.sending` until this send completes.
                    unsafe { self.io.send(c.fd.as_raw_fd(), id, ptr, len) };
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let (ptr, len) = (buf.as_ptr(), buf.len());
                    c.sending = Some((buf, 0));
                    // SAFETY: as above.
                    unsafe { self.io.send(c.fd.as_raw_fd(), id, ptr, len) };
                    return;
                }
                Err(_) => {
                    // The worker is gone: as for a failed ring send.
                    c.out.clear();
                    c.shut = true;
                    return;
                }
            }
        }
    }

    fn start_send(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.sending.is_some() || c.shut {
            return;
        }
        let Some(buf) = c.out.next() else {
            if c.closing && !c.eof {
                c.shut = true;
                let _ =
                    nix::sys::socket::shutdown(c.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            }
            return;
        };
        let (ptr, len) = (buf.as_ptr(), buf.len());
        c.sending = Some((buf, 0));
        c.stats.sends.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the bytes live in `c.sending`, which is neither touched nor
        // dropped until this send completes (see `completion`, `maybe_finish`).
        unsafe { self.io.send(c.fd.as_raw_fd(), id, ptr, len) };
    }

    fn arm_read(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.reading || c.eof {
            return;
        }
        if c.inbuf.capacity() - c.inbuf.len() < c.want {
            c.inbuf.reserve(c.want);
        }
        let spare = c.inbuf.spare_capacity_mut();
        let (ptr, len) = (spare.as_mut_ptr().cast::<u8>(), spare.len());
        c.reading = true;
        // SAFETY: the spare capacity of `c.inbuf` is not touched (no push,
        // no reserve, no drop) until this read completes: `reading` guards it.
        unsafe { self.io.read(c.fd.as_raw_fd(), id, ptr, len) };
    }

    fn completion(&mut self, comp: Completion) {
        if comp.id == WAKE_ID {
            self.wake_armed = false;
            return;
        }
        let Some(c) = self.conns.get_mut(&comp.id) else {
            return;
        };
        match comp.op {
            Op::Send => {
                let (buf, mut sent) = c.sending.take().expect("send completion without a send");
                if comp.result < 0 {
                    // The worker is gone (EPIPE); EOF on the read side tells
                    // the rest. Drop what was queued: it can never arrive.
                    c.out.clear();
                    c.shut = true;
                } else {
                    sent += comp.result as usize;
                    if sent < buf.len() {
                        let (ptr, len) = (buf[sent..].as_ptr(), buf.len() - sent);
                        c.sending = Some((buf, sent));
                        c.stats.sends.fetch_add(1, Ordering::Relaxed);
                        // SAFETY: as in `start_send`; the rest of the same buffer.
                        unsafe { self.io.send(c.fd.as_raw_fd(), comp.id, ptr, len) };
                        return;
                    }
                }
                self.start_send(comp.id);
                self.maybe_finish(comp.id);
            }
            Op::Read => {
                c.reading = false;
                if comp.result <= 0 {
                    c.eof = true;
                    if c.status.is_none() {
                        c.deadline = Some(Instant::now() + EXIT_GRACE);
                        self.awaiting_exit += 1;
                    }
                    self.maybe_finish(comp.id);
                    return;
                }
                // SAFETY: the kernel wrote `result` bytes into the spare
                // capacity handed to this read.
                unsafe { c.inbuf.set_len(c.inbuf.len() + comp.result as usize) };
                c.received += comp.result as u64;
                // Every complete frame is frozen at once and handed out as
                // a slice: one split of the buffer per read, not per frame.
                let (end, partial) = id_frames(&c.inbuf, |_| {});
                if end > 0 {
                    let frames = c.inbuf.split_to(end).freeze();
                    let mut error = None;
                    id_frames(&frames, |f| {
                        if error.is_none() {
                            error = c.proto.frame(f.id, &frames, f.payload).err();
                        }
                    });
                    // The protocol reports the violation when the worker
                    // is gone (to on_error, or stderr without one).
                    if error.is_some() {
                        crate::process::kill(c.pid);
                        c.inbuf.clear();
                    }
                }
                c.want = match partial {
                    Some(needed) if !c.inbuf.is_empty() => read_want(needed, &c.inbuf, READ_CHUNK),
                    _ => READ_CHUNK,
                };
                // Calls framed while these replies were on their way.
                self.take_framed(comp.id);
                self.arm_read(comp.id);
            }
        }
    }

    /// Queues calls on connection `id`. A worker that already closed its
    /// side still gets them recorded (nothing is sent), so they fail with
    /// how it ended once that is known, like the calls it left unanswered.
    fn calls(&mut self, id: u64, calls: impl Iterator<Item = Call>) {
        let Some(c) = self.conns.get_mut(&id) else {
            let e = self.ended.get(&id).map_or(Error::Closed, |s| s.refusal());
            return calls.for_each(|c| c.fail(e.clone()));
        };
        if c.eof || c.shut {
            let mut discard = SendQueue::default();
            for call in calls {
                c.proto.encode(call, &mut discard);
                discard.clear();
            }
            return;
        }
        let empty = c.out.is_empty();
        for call in calls {
            c.proto.encode(call, &mut c.out);
        }
        if empty {
            self.dirty.push(id);
        }
    }

    /// Takes the calls framed in connection `id`'s outbox, before any
    /// later command for it, so that calls keep their order.
    fn take_framed(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return; // ended: its outbox was emptied then (`Protocol::finish`)
        };
        let live = !(c.eof || c.shut);
        let empty = c.out.is_empty();
        c.proto.take_framed(&mut c.out, live);
        if live && empty && !c.out.is_empty() {
            self.dirty.push(id);
        }
    }

    /// Ends a connection once EOF is seen, no send is in flight, and the
    /// template reported the exit (so the worker is reaped before
    /// `on_destroy` or any error) or the grace period ran out.
    fn maybe_finish(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else { return };
        let ready = c.eof
            && c.sending.is_none()
            && (c.status.is_some() || c.deadline.is_some_and(|d| d <= Instant::now()));
        if !ready {
            return;
        }
        let mut c = self.conns.remove(&id).unwrap();
        self.by_pid.remove(&c.pid);
        self.io.remove(c.fd.as_raw_fd(), id);
        if c.deadline.is_some() {
            self.awaiting_exit -= 1;
        }
        let status = c.status.or(c.deadline.map(|_| ExitStatus::StillRunning));
        let rest = std::mem::take(&mut c.inbuf);
        c.proto.finish(c.pid, status, rest, c.received);
        if !c.closing {
            // Its handle lives: later calls must learn how it ended.
            self.ended.insert(id, c.stats.clone());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let bin = self.free_bin_at.map(|(t, _)| t);
        if self.awaiting_exit == 0 {
            return bin;
        }
        let exits = self.conns.values().filter_map(|c| c.deadline).min();
        exits.into_iter().chain(bin).min()
    }

    /// Frees the shelf's bins if nobody took any since the time was set;
    /// else looks again later.
    fn free_idle_bin(&mut self) {
        let Some((at, seen)) = self.free_bin_at else {
            return;
        };
        let now = Instant::now();
        if now < at {
            return;
        }
        let stale = {
            let mut q = self.shared.queue.lock().unwrap();
            self.free_bin_at = (!q.shelf.is_empty()).then_some((now + IDLE_FREE, q.collected));
            if q.collected == seen {
                self.free_bin_at = None;
                self.shared.take_bins(&mut q)
            } else {
                None
            }
        };
        self.shared.free_bins(stale);
    }

    fn expire(&mut self) {
        self.free_idle_bin();
        if self.awaiting_exit == 0 {
            return;
        }
        let now = Instant::now();
        let due: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.maybe_finish(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// docs/engines.md: "polls for up to 30 µs" "while at most four calls
    /// are in flight".
    #[test]
    fn polling_defaults_are_the_documented_ones() {
        assert_eq!(Spin::LIMIT, 30 * US);
        assert_eq!(Spin::MAX_IN_FLIGHT, 4);
    }

    #[test]
    fn the_driver_polls_only_with_few_calls_in_flight() {
        let mut s = Spin::new(30 * US);
        assert_eq!(s.before_wait(None, || 0), 30 * US);
        assert_eq!(s.before_wait(None, || Spin::MAX_IN_FLIGHT), 30 * US);
        assert_eq!(
            s.before_wait(None, || Spin::MAX_IN_FLIGHT + 1),
            Duration::ZERO
        );
        assert_eq!(s.before_wait(Some(Duration::ZERO), || 1), Duration::ZERO);
        assert_eq!(
            s.before_wait(Some(10 * US), || 1),
            Duration::ZERO,
            "a timer due first"
        );
        assert_eq!(s.before_wait(Some(Duration::from_secs(1)), || 1), 30 * US);
        let mut off = Spin::new(Duration::ZERO);
        assert_eq!(off.before_wait(None, || 1), Duration::ZERO);
    }

    #[test]
    fn polls_that_find_nothing_back_off_and_a_find_resets() {
        let mut s = Spin::new(30 * US);
        // Waits that poll, each poll finding nothing (the wait took longer).
        let polled = |s: &mut Spin, waits: usize, found: bool| {
            (0..waits)
                .filter(|_| {
                    let spun = s.before_wait(None, || 1);
                    s.after_wait(spun, if found { 5 * US } else { 40 * US });
                    !spun.is_zero()
                })
                .count()
        };
        let mut at = vec![];
        for i in 0..200 {
            if polled(&mut s, 1, false) == 1 {
                at.push(i);
            }
        }
        // Gaps of 1, 3, 7, ... 63 waits, then every 64th.
        assert_eq!(at, [0, 2, 6, 14, 30, 62, 126, 190]);
        // Sleeping waits between polls (no poll) change nothing; a poll
        // that finds a completion makes the next wait poll again.
        while polled(&mut s, 1, true) == 0 {}
        assert_eq!(polled(&mut s, 5, true), 5);
        assert_eq!(polled(&mut s, 1, false), 1);
        assert_eq!(polled(&mut s, 2, false), 1, "one skipped, then a poll");
    }
}
