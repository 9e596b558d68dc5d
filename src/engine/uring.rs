//! io_uring backend. Kernel features used:
//! - `IORING_OP_READ` (5.6), `IORING_OP_SEND` (5.6);
//! - `IORING_ENTER_EXT_ARG` for waits with a timeout (5.11);
//! - optional: `IORING_SETUP_SINGLE_ISSUER` (6.0) and
//!   `IORING_SETUP_DEFER_TASKRUN` (6.1), which keep completion work on the
//!   driver thread; the ring falls back to plain setup without them.

use super::{Completion, Io, Op};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

const ENTRIES: u32 = 256;

pub(crate) struct Uring {
    ring: IoUring,
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
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(ENTRIES))
            .or_else(|_| IoUring::new(ENTRIES))?;
        Ok(Uring { ring })
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

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
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
