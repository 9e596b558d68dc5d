//! epoll backend: emulates completions with edge-triggered readiness. An
//! operation is tried at once when its descriptor was last seen ready, and
//! again each time epoll reports it ready.

use super::backend::{Completion, Io, Op};
use nix::sys::epoll::{Epoll as Ep, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

pub(crate) struct Epoll {
    ep: Ep,
    fds: HashMap<u64, FdState>,
    ready: Vec<Completion>,
    events: Vec<EpollEvent>,
}

struct FdState {
    fd: RawFd,
    readable: bool,
    writable: bool,
    read: Option<(*mut u8, usize)>,
    send: Option<(*const u8, usize)>,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Epoll {
            ep: Ep::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            fds: HashMap::new(),
            ready: Vec::new(),
            events: vec![EpollEvent::empty(); 256],
        })
    }

    /// Runs the pending operations of `id` that readiness allows.
    fn attempt(&mut self, id: u64) {
        let Some(s) = self.fds.get_mut(&id) else {
            return;
        };
        if s.readable {
            if let Some((ptr, len)) = s.read {
                // SAFETY: `ptr..ptr+len` is valid and unaliased until we
                // report this read's completion (the `Io::read` contract).
                let n = unsafe { libc::read(s.fd, ptr.cast(), len) };
                match result(n) {
                    Some(r) => {
                        s.read = None;
                        self.ready.push(Completion {
                            id,
                            op: Op::Read,
                            result: r,
                        });
                    }
                    None => s.readable = false,
                }
            }
        }
        if s.writable {
            if let Some((ptr, len)) = s.send {
                // SAFETY: as above, for the send's bytes (`Io::send` contract).
                let n = unsafe { libc::send(s.fd, ptr.cast(), len, libc::MSG_NOSIGNAL) };
                match result(n) {
                    Some(r) => {
                        s.send = None;
                        self.ready.push(Completion {
                            id,
                            op: Op::Send,
                            result: r,
                        });
                    }
                    None => s.writable = false,
                }
            }
        }
    }
}

/// A syscall result as a completion result, or None for EAGAIN.
fn result(n: isize) -> Option<i32> {
    if n >= 0 {
        return Some(n.min(i32::MAX as isize) as i32);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => None,
        Some(e) => Some(-e),
        None => Some(-libc::EIO),
    }
}

impl Io for Epoll {
    fn add(&mut self, fd: RawFd, id: u64) -> io::Result<()> {
        let ev = EpollEvent::new(
            EpollFlags::EPOLLIN
                | EpollFlags::EPOLLOUT
                | EpollFlags::EPOLLRDHUP
                | EpollFlags::EPOLLET,
            id,
        );
        // SAFETY: the driver keeps `fd` open until it calls `remove`.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.ep.add(bfd, ev)?;
        self.fds.insert(
            id,
            FdState {
                fd,
                readable: true,
                writable: true,
                read: None,
                send: None,
            },
        );
        Ok(())
    }

    fn remove(&mut self, fd: RawFd, id: u64) {
        // SAFETY: the descriptor is still open (the caller closes it after).
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = self.ep.delete(bfd);
        self.fds.remove(&id);
    }

    unsafe fn read(&mut self, _fd: RawFd, id: u64, ptr: *mut u8, len: usize) {
        if let Some(s) = self.fds.get_mut(&id) {
            s.read = Some((ptr, len));
            self.attempt(id);
        }
    }

    unsafe fn send(&mut self, _fd: RawFd, id: u64, ptr: *const u8, len: usize) {
        if let Some(s) = self.fds.get_mut(&id) {
            s.send = Some((ptr, len));
            self.attempt(id);
        }
    }

    fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
        spin: Duration,
    ) -> io::Result<()> {
        let t = std::time::Instant::now();
        loop {
            // Polling (see `Spin`): epoll_wait without a timeout until
            // something is ready or `spin` has passed.
            let polling = self.ready.is_empty() && !spin.is_zero() && t.elapsed() < spin;
            let timeout = if !self.ready.is_empty() || polling {
                EpollTimeout::ZERO
            } else {
                match timeout {
                    None => EpollTimeout::NONE,
                    Some(t) => EpollTimeout::try_from(t).unwrap_or(EpollTimeout::MAX),
                }
            };
            let n = match self.ep.wait(&mut self.events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            for i in 0..n {
                let ev = self.events[i];
                let id = ev.data();
                if let Some(s) = self.fds.get_mut(&id) {
                    let f = ev.events();
                    if f.intersects(
                        EpollFlags::EPOLLIN
                            | EpollFlags::EPOLLRDHUP
                            | EpollFlags::EPOLLHUP
                            | EpollFlags::EPOLLERR,
                    ) {
                        s.readable = true;
                    }
                    if f.intersects(
                        EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                    ) {
                        s.writable = true;
                    }
                }
                self.attempt(id);
            }
            if n > 0 || !polling {
                break;
            }
        }
        out.append(&mut self.ready);
        Ok(())
    }
}
