//! Process creation, the one place that forks, execs, passes descriptors and
//! reaps. Workers are never forked from the caller's (possibly threaded)
//! process: a single-threaded *template* forks them on request.
//!
//! - `init()` in a single-threaded process forks the template directly.
//! - `init()` in a process that already runs threads must not fork: it
//!   re-executes `/proc/self/exe` with [`MARKER`] set, and `init()` in that new
//!   process becomes the template instead of returning.
//! - Without `init()`, the first worker of a single-threaded process forks
//!   the template then; a threaded one gets [`Error::NotInitialised`].
//!
//! Every descriptor is close-on-exec; the template holds a worker's socket
//! only while forking it; workers die with their template (PDEATHSIG) and
//! the template with the program. The template reaps and reports exits.

mod backend;
mod client;
mod fdpass;
mod server;

pub(crate) use backend::Backend;
pub(crate) use client::{set_exit_hook, TemplateClient, WorkerSpec};

use crate::error::{Error, Result};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{fork, ForkResult};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Mutex};

/// Environment variable that makes `init()` become the template: it holds
/// the number of the inherited control socket.
pub const MARKER: &str = "FORKRPC_TEMPLATE_FD";

/// How the root template was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateMode {
    /// Forked from a single-threaded program.
    Forked,
    /// The program re-executed itself because it already ran threads.
    Reexec,
}

static ROOT: Mutex<Option<(Arc<TemplateClient>, TemplateMode)>> = Mutex::new(None);

/// If this process was started as a template, serve and never return.
pub(crate) fn become_template_if_marked() {
    let Some(v) = std::env::var_os(MARKER) else {
        return;
    };
    std::env::remove_var(MARKER);
    let Some(fd) = v.to_str().and_then(|s| s.parse::<i32>().ok()) else {
        eprintln!("forkrpc: {MARKER} is set but is not a descriptor number");
        crate::sys::exit_now(70)
    };
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        eprintln!("forkrpc: {MARKER}={fd} names no open descriptor");
        crate::sys::exit_now(70)
    }
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    // SAFETY: the parent passed this descriptor to us for exactly this use
    // and we checked it is open; nothing else in this process owns it.
    let ctl = unsafe { OwnedFd::from_raw_fd(fd) };
    // What the program left open across exec is not the workers' either.
    crate::sys::close_other_fds(fd);
    server::serve(ctl)
}

/// Starts the root template if none runs yet (what `init()` does): by fork
/// in a single-threaded process, else by re-executing the program.
pub(crate) fn init_root() -> Result<Arc<TemplateClient>> {
    root_with(true)
}

/// The root template, started now by fork if this process is still
/// single-threaded and `init()` was never called.
pub(crate) fn root() -> Result<Arc<TemplateClient>> {
    root_with(false)
}

fn root_with(may_exec: bool) -> Result<Arc<TemplateClient>> {
    let mut root = ROOT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((c, _)) = &*root {
        return Ok(c.clone());
    }
    let started = match (crate::sys::thread_count() == 1, may_exec) {
        (true, _) => (fork_template()?, TemplateMode::Forked),
        (false, true) => (exec_template()?, TemplateMode::Reexec),
        (false, false) => return Err(Error::NotInitialised),
    };
    *root = Some(started.clone());
    Ok(started.0)
}

/// How the root template was started, if it was.
pub fn template_mode() -> Option<TemplateMode> {
    ROOT.lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|r| r.1)
}

fn fork_template() -> Result<Arc<TemplateClient>> {
    use std::io::Write;
    let (mine, theirs) = client::control_pair()?;
    let _ = std::io::stdout().flush();
    let me = nix::unistd::getpid();
    // SAFETY: the caller checked this process runs a single thread, so the
    // child cannot inherit a lock held by another thread.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(mine);
            server::die_with_parent(me);
            // Workers hold their own sockets only, not the program's files.
            crate::sys::close_other_fds(theirs.as_raw_fd());
            server::serve(theirs)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            TemplateClient::new(mine, child.as_raw(), true)
        }
        Err(e) => Err(Error::io("forking the template process", e)),
    }
}

fn exec_template() -> Result<Arc<TemplateClient>> {
    let (mine, theirs) = client::control_pair()?;
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    let mut args = std::env::args_os();
    if let Some(argv0) = args.next() {
        cmd.arg0(argv0);
    }
    cmd.args(args).env(MARKER, fd.to_string());
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs between fork and exec in the child and only
    // makes async-signal-safe calls (fcntl, prctl, getppid) on plain integers.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(0);
            }
            Ok(())
        })
    };
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("re-executing the program as the template", e))?;
    drop(theirs);
    TemplateClient::new(mine, child.id() as i32, true)
}

/// A new stream socketpair for a worker: (parent end, non-blocking; child
/// end, blocking). Both close-on-exec.
pub(crate) fn worker_pair() -> Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("creating a worker socketpair", e))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(
        nix::fcntl::fcntl(a.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::io("fcntl", e))?,
    );
    nix::fcntl::fcntl(
        a.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| Error::io("fcntl", e))?;
    Ok((a, b))
}

/// Sends SIGKILL to a worker (after a protocol violation).
pub(crate) fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Resident memory of process `pid` in bytes, from /proc/PID/statm.
pub(crate) fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * crate::sys::page_size() as u64)
}
