//! io_uring backend. Kernel features used:
//! - `IORING_OP_READ` (5.6), `IORING_OP_SEND` (5.6);
//! - `IORING_ENTER_EXT_ARG` for waits with a timeout (5.11);
//! - optional: `IORING_SETUP_SINGLE_ISSUER` (6.0) and
//!   `IORING_SETUP_DEFER_TASKRUN` (6.1), which keep completion work on the
//!   driver thread, with `IORING_SETUP_TASKRUN_FLAG` (5.19), which tells a
//!   polling driver when that work is waiting (an enter runs it); the ring
//!   falls back to plain setup without them (polling then enters each time).

use super::backend::{Completion, Io, Op};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

const ENTRIES: u32 = 256;

pub(crate) struct Uring {
    ring: IoUring,
    /// The kernel flags deferred completion work (TASKRUN_FLAG).
    flagged: bool,
}

/// Whether this kernel lets us set up a ring (it may be missing, disabled by
/// `kernel.io_uring_disabled`, or refused by seccomp).
pub(crate) fn available() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

fn user_data(id: u64, op: Op) -> u64 {
    id << 1 | (op == Op::Send) as u64
}

impl Uring {
    pub(crate) fn new() -> io::Result<Self> {
        let flagged = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(ENTRIES);
        if let Ok(ring) = flagged {
            return Ok(Uring {
                ring,
                flagged: true,
            });
        }
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::new(ENTRIES))?;
        Ok(Uring {
            ring,
            flagged: false,
        })
    }

    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: the entry's buffers are valid until completion, as the
            // callers of `read`/`send` promise (see the trait).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            // The submission queue is full: hand it to the kernel first.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    eprintln!("forkrpc: io_uring submit failed: {e}");
                }
                self.reap_into_backlog();
            }
        }
    }

    /// Submits what is queued, then looks for completions for up to
    /// `limit` without sleeping. Completion work waits on this thread
    /// (DEFER_TASKRUN) until an enter with GETEVENTS runs it, which
    /// `submit_and_wait(0)` does when the TASKRUN flag says it is there.
    fn poll(&mut self, limit: Duration) {
        let flagged = self.flagged;
        let _ = self.ring.submit();
        let t = std::time::Instant::now();
        while self.ring.completion().is_empty() && t.elapsed() < limit {
            if !flagged || self.ring.submission().taskrun() {
                let _ = self.ring.submitter().submit_and_wait(0);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Submission failed with EBUSY (completion queue full): nothing to do
    /// but let the caller's next `wait` drain completions. We cannot drop
    /// an entry, so we wait for room by entering with GETEVENTS.
    fn reap_into_backlog(&mut self) {
        let _ = self.ring.submitter().submit_and_wait(1);
    }
}

impl Io for Uring {
    fn add(&mut self, _fd: RawFd, _id: u64) -> io::Result<()> {
        Ok(())
    }

    fn remove(&mut self, _fd: RawFd, _id: u64) {}

    unsafe fn read(&mut self, fd: RawFd, id: u64, ptr: *mut u8, len: usize) {
        let len = len.min(u32::MAX as usize) as u32;
        let e = opcode::Read::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(user_data(id, Op::Read));
        self.push(e);
    }

    unsafe fn send(&mut self, fd: RawFd, id: u64, ptr: *const u8, len: usize) {
        let len = len.min(u32::MAX as usize) as u32;
        let e = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(id, Op::Send));
        self.push(e);
    }

    fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
        spin: Duration,
    ) -> io::Result<()> {
        if !spin.is_zero() {
            self.poll(spin);
        }
        let r = match timeout {
            None => self.ring.submitter().submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            out.push(Completion {
                id: ud >> 1,
                op: if ud & 1 == 1 { Op::Send } else { Op::Read },
                result: cqe.result(),
            });
        }
        Ok(())
    }
}
