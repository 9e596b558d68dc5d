//! The driver loop: one thread owns every worker socket, moves bytes
//! between per-connection buffers and the sockets through a backend
//! ([`Io`]), splits frames and hands them to each connection's
//! [`Protocol`]; and the state of a connection.

use super::backend::{Completion, Io, Op};
use super::mailbox::{Command, Mailbox};
use super::protocol::{ConnStats, Protocol};
use super::spin::Spin;
use crate::call::leftovers::IDLE_FREE;
use crate::call::Call;
use crate::error::{Error, ExitStatus};
use crate::idmap::IdMap;
use crate::wire::frame::{id_frames, read_want};
use crate::wire::sendq::SendQueue;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Calls submitted to the workers of `conns` and not yet answered.
fn in_flight(conns: &IdMap<u64, Conn>) -> u64 {
    conns.values().map(|c| c.stats.unanswered()).sum()
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

pub(super) struct Driver<I: Io> {
    io: I,
    mailbox: Arc<Mailbox>,
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
    pub(super) fn new(io: I, mailbox: Arc<Mailbox>) -> Self {
        Driver {
            io,
            mailbox,
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

    pub(super) fn run(mut self) {
        let wake_fd = self.mailbox.wake.as_raw_fd();
        if let Err(e) = self.io.add(wake_fd, WAKE_ID) {
            eprintln!("forkrpc: driver cannot watch its eventfd: {e}");
            return;
        }
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut batch, &mut self.mailbox.queue.lock().unwrap().commands);
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
            self.mailbox.sleeping.store(true, Ordering::SeqCst);
            let timeout = {
                let mut q = self.mailbox.queue.lock().unwrap();
                // Nothing spent stays on this thread while it sleeps.
                q.shelf.hand_over();
                if !q.shelf.is_empty() {
                    self.mailbox.bin_ready.store(true, Ordering::Relaxed);
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
            self.mailbox.sleeping.store(false, Ordering::SeqCst);
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
            let mut q = self.mailbox.queue.lock().unwrap();
            self.free_bin_at = (!q.shelf.is_empty()).then_some((now + IDLE_FREE, q.collected));
            if q.collected == seen {
                self.free_bin_at = None;
                self.mailbox.take_bins(&mut q)
            } else {
                None
            }
        };
        self.mailbox.free_bins(stale);
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
