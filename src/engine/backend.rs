//! The contract of the engine's I/O backends.
//!
//! A backend (`Io`) runs operations on descriptors and reports their
//! completions, like io_uring does; `uring` is io_uring itself, `epoll`
//! emulates it with readiness. At most one read and one send are in flight
//! per descriptor. Operations queued between two `Io::wait` calls are
//! submitted together by that `wait` (one `io_uring_enter` for the whole
//! batch, for all workers). A buffer handed to `read` or `send` stays valid
//! and untouched until its completion has been returned by `wait`.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// A completed operation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub id: u64,
    pub op: Op,
    /// Bytes moved, or a negated errno.
    pub result: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Send,
}

/// The backend contract (see the module docs).
pub(crate) trait Io {
    /// Starts watching `fd` under `id`.
    fn add(&mut self, fd: RawFd, id: u64) -> io::Result<()>;
    /// Stops watching `fd`; no operation on it may be in flight.
    fn remove(&mut self, fd: RawFd, id: u64);
    /// Queues a read of up to `len` bytes into `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` stays valid and is not otherwise accessed until the
    /// completion of this read has been returned by `Io::wait`.
    unsafe fn read(&mut self, fd: RawFd, id: u64, ptr: *mut u8, len: usize);
    /// Queues a send (MSG_NOSIGNAL) of `len` bytes from `ptr`.
    ///
    /// # Safety
    /// As for `Io::read`: the bytes stay valid until the completion.
    unsafe fn send(&mut self, fd: RawFd, id: u64, ptr: *const u8, len: usize);
    /// Submits what is queued and waits for at least one completion, or
    /// until `timeout` passes (`None` = no limit). Appends to `out`. With a
    /// `spin` above zero it first looks for completions without sleeping,
    /// for up to that long (see `Spin`).
    fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
        spin: Duration,
    ) -> io::Result<()>;
}
