//! The few raw syscalls forkrpc makes outside the backends, each behind a
//! safe function. Everything else goes through `nix`.

use bytes::BytesMut;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Reads once into the spare capacity of `buf` (at least `min_spare` bytes
/// of it, growing the buffer if needed) and extends `buf` by what was read.
pub(crate) fn read_into(fd: RawFd, buf: &mut BytesMut, min_spare: usize) -> io::Result<usize> {
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(min_spare);
    }
    let spare = buf.spare_capacity_mut();
    loop {
        // SAFETY: `spare` is writable memory owned by `buf` of exactly
        // `spare.len()` bytes; read(2) writes at most that many bytes into it.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: the kernel initialised the first `n` bytes of the spare
            // capacity, and `n <= spare.len()`.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends all of `data` on a blocking stream socket, without SIGPIPE.
pub(crate) fn send_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        data = &data[send_some(fd, data)?..];
    }
    Ok(())
}

/// One send on a blocking stream socket (no SIGPIPE), retried on EINTR;
/// returns how much went (at least one byte).
pub(crate) fn send_some(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        match nix::sys::socket::send(fd, data, nix::sys::socket::MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Number of threads of this process (from /proc/self/task).
pub(crate) fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Exits at once, without running atexit handlers or flushing stdio buffers
/// inherited from the parent (which would print the parent's output twice).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// One non-blocking send (MSG_DONTWAIT, no SIGPIPE); returns what went.
pub(crate) fn send_nonblocking(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    loop {
        match nix::sys::socket::send(fd, data, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A cheap monotonic clock (CLOCK_MONOTONIC_COARSE: a few ms of
/// resolution, no syscall), for rate limits that need no precision.
pub(crate) fn coarse_now() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill in; the
    // clock id is a constant the kernel knows (Linux 2.6.32+).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Closes every descriptor of this process but 0, 1, 2 and `keep`: a
/// template, just forked or executed from the user's program, must not
/// hand the program's files and sockets on to its workers.
pub(crate) fn close_other_fds(keep: RawFd) {
    let keep = keep as u32;
    let ranges = if keep >= 3 {
        [(3, keep - 1), (keep + 1, u32::MAX)]
    } else {
        [(3, u32::MAX), (1, 0)]
    };
    for (from, last) in ranges.into_iter().filter(|(f, l)| f <= l) {
        // SAFETY: close_range (Linux 5.9) takes three integers and only
        // closes descriptors; none of those closed is in use by this
        // single-threaded process afterwards (it owns only `keep`).
        let r = unsafe { libc::syscall(libc::SYS_close_range, from, last, 0) };
        if r != 0 {
            close_each(from, last);
        }
    }
}

/// `close_range`'s fallback: each open descriptor in `from..=last`.
fn close_each(from: u32, last: u32) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= from && fd <= last)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor number; see `close_other_fds`.
        unsafe { libc::close(fd as i32) };
    }
}

/// A new memfd (Linux 3.17) named `name`, `len` bytes long (sparse: pages
/// are allocated as they are touched), close-on-exec; `sealing` allows
/// seals (`F_ADD_SEALS`).
pub(crate) fn memfd(name: &std::ffi::CStr, len: usize, sealing: bool) -> io::Result<OwnedFd> {
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: `name` is NUL-terminated; memfd_create returns a new
    // descriptor nothing else owns, or -1.
    let fd = unsafe { fresh_fd(libc::memfd_create(name.as_ptr(), flags).into()) }?;
    nix::unistd::ftruncate(&fd, len as i64)?;
    Ok(fd)
}

/// The descriptor a call that makes one returned (`raw`), owned; -1 is
/// the call's error (read from `errno`).
///
/// # Safety
/// `raw` is what a call that returns a new descriptor or -1 just returned:
/// a descriptor that nothing else owns.
unsafe fn fresh_fd(raw: libc::c_long) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the caller's promise above.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Maps `len` bytes of `fd` shared, with protection `prot`.
fn map(fd: &OwnedFd, len: usize, prot: libc::c_int) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping at an address the kernel picks; it touches
    // no memory of ours, and what it maps is the callers' business (below).
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(base.cast())
}

/// Maps `len` bytes of `fd` shared and read-write. The caller owns the
/// mapping: it must not shrink `fd` below `len` while the mapping is used,
/// and unmaps it (or keeps it for the life of the process).
pub(crate) fn map_shared(fd: &OwnedFd, len: usize) -> io::Result<*mut u8> {
    map(fd, len, libc::PROT_READ | libc::PROT_WRITE)
}

/// The page size in bytes.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and has no other preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(4096)
}

/// A new non-blocking, close-on-exec eventfd (counter 0).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
    unsafe { fresh_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).into()) }
}

/// Maps all `len` bytes of `fd` shared and read-only (a worker's view of
/// the parent's arena). The caller must not let `fd` shrink below `len`
/// while the mapping is used.
pub(crate) fn map_shared_read(fd: &OwnedFd, len: usize) -> io::Result<*const u8> {
    Ok(map(fd, len, libc::PROT_READ)?.cast_const())
}

/// Unmaps `len` bytes at `base`.
///
/// # Safety
/// `base..base + len` is a mapping this process made (`map_shared`,
/// `map_shared_read`) and nothing refers into it any more.
pub(crate) unsafe fn unmap(base: *mut u8, len: usize) {
    // SAFETY: the caller's promise above.
    unsafe { libc::munmap(base.cast(), len) };
}

/// Keeps `base..base + len` out of children forked from here (Linux
/// 2.6.16, `MADV_DONTFORK`): they get no view of it at all.
pub(crate) fn dont_fork(base: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: advice about a range; it changes no contents of this process
    // (a range that is not a mapping of ours is refused with ENOMEM).
    if unsafe { libc::madvise(base.cast(), len, libc::MADV_DONTFORK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Seals the memfd `fd` against growing, shrinking and new writable
/// mappings (`F_SEAL_FUTURE_WRITE`: Linux 5.1), so that readers can trust
/// it stays as it is mapped.
pub(crate) fn seal_size_and_writes(fd: &OwnedFd) -> io::Result<()> {
    let seals = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the pages of `from..to` of file `fd` back to the system, keeping
/// its size (`FALLOC_FL_PUNCH_HOLE`; shmem since Linux 3.5): the range
/// reads as zeros until written again.
pub(crate) fn punch_hole(fd: &OwnedFd, from: usize, to: usize) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(fd.as_raw_fd(), flags, from as i64, (to - from) as i64)?;
    Ok(())
}

/// A pidfd for our child `pid` (Linux 5.3), close-on-exec.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers; it returns a new descriptor
    // or -1.
    unsafe { fresh_fd(libc::syscall(libc::SYS_pidfd_open, pid, 0)) }
}
