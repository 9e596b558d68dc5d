//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Waits until process `pid` (not necessarily our child) has exited, by
/// polling its pidfd. Returns false if it was still running after `limit`.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // ESRCH: already gone (and reaped).
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut p = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    matches!(
        nix::poll::poll(&mut p, nix::poll::PollTimeout::try_from(ms).unwrap()),
        Ok(1)
    )
}

/// Whether `/proc/PID` exists (a zombie still has one; a reaped process not).
pub fn proc_exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The engines to test on: both, with io_uring marked unavailable when the
/// kernel refuses it (those tests are then ignored, and say so).
pub fn engines() -> Vec<(forkrpc::EngineKind, bool)> {
    let uring = io_uring_works();
    if !uring {
        eprintln!("note: io_uring is unavailable here; uring variants are ignored, epoll runs");
    }
    vec![
        (forkrpc::EngineKind::Uring, uring),
        (forkrpc::EngineKind::Epoll, true),
    ]
}

fn io_uring_works() -> bool {
    io_uring::IoUring::new(2).is_ok()
}
