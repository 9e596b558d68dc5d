//! The template process: a single-threaded loop that forks workers (and
//! derived templates) on request and reports how each child ended.
//! Everything here runs in the template or in a child it just forked.

use super::backend::Backend;
use super::fdpass::{recv_msg, send_msg};
use crate::child::registry::{self, Handler, WorkerArgs};
use crate::error::ExitStatus;
use crate::octets;
use crate::sys::exit_now;
use crate::wire::Octets;
use bytes::Bytes;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

/// Largest control message (a spawn request with its init arguments).
pub(crate) const MAX_CONTROL_MSG: usize = 200 * 1024;

/// Runs the template loop on `ctl` until the parent closes it. Never returns.
///
/// Children are watched through pidfds (Linux 5.3), not SIGCHLD: a
/// re-executed template may run threads of the program's own that do not
/// block the signal, and it would be lost to them.
pub(crate) fn serve(ctl: OwnedFd) -> ! {
    let mut t = Server {
        ctl,
        children: Vec::new(),
        buf: vec![0u8; MAX_CONTROL_MSG],
    };
    loop {
        let ready: Vec<bool> = {
            let mut fds = Vec::with_capacity(1 + t.children.len());
            fds.push(PollFd::new(t.ctl.as_fd(), PollFlags::POLLIN));
            fds.extend(
                t.children
                    .iter()
                    .map(|(_, f)| PollFd::new(f.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("forkrpc template: poll: {e}");
                    exit_now(70)
                }
            }
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        let exited: Vec<usize> = (1..ready.len())
            .filter(|&i| ready[i])
            .map(|i| i - 1)
            .collect();
        for i in exited.into_iter().rev() {
            let (pid, _fd) = t.children.swap_remove(i);
            t.reap(pid);
        }
        if ready[0] {
            t.handle_request();
        }
    }
}

struct Server {
    ctl: OwnedFd,
    /// Live children and their pidfds.
    children: Vec<(Pid, OwnedFd)>,
    buf: Vec<u8>,
}

impl Server {
    fn reply(&self, msg: Octets) {
        if send_msg(self.ctl.as_raw_fd(), &msg.to_bytes(), &[]).is_err() {
            // The parent is gone: our children die with us (PDEATHSIG).
            exit_now(0);
        }
    }

    fn reap(&mut self, pid: Pid) {
        let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus::Signal(sig as i32),
            _ => return,
        };
        let (kind, n) = match status {
            ExitStatus::Code(c) => ("code", c),
            ExitStatus::Signal(s) => ("signal", s),
            ExitStatus::StillRunning => return,
        };
        self.reply(octets![
            "exit",
            pid.as_raw().to_string(),
            kind,
            n.to_string()
        ]);
    }

    fn handle_request(&mut self) {
        let (n, fds) = match recv_msg(self.ctl.as_raw_fd(), &mut self.buf) {
            Ok((0, _)) | Err(_) => exit_now(0), // parent closed: we are done
            Ok(x) => x,
        };
        let msg = match Octets::decode(Bytes::copy_from_slice(&self.buf[..n])) {
            Ok(m) if m.len() >= 3 => m,
            _ => return, // not ours; the client never sends this
        };
        let req = msg[1].clone();
        let result = match &msg[0][..] {
            b"spawn" => self.spawn(&msg, fds),
            b"derive" => self.derive(&msg, fds),
            b"exec" => self.exec(&msg, fds),
            _ => Err(octets!["other", "unknown template request"]),
        };
        match result {
            Ok(pid) => self.reply(octets!["ok", req, pid.to_string()]),
            Err(mut e) => {
                e.0.insert(0, req);
                e.0.insert(0, Bytes::from_static(b"err"));
                self.reply(e)
            }
        }
    }

    /// `["spawn", req, handler, init, backend, extras, args...]`, fds
    /// `[socket, arena memfd, journal memfd, send_fh...]`, where the two
    /// memfds come only if `extras` (comma-separated) names "arena" and
    /// "journal"; backend as [`Backend`] displays it.
    fn spawn(&mut self, msg: &Octets, mut fds: Vec<OwnedFd>) -> Result<i32, Octets> {
        let name = msg.str(2).unwrap_or("");
        let handler = registry::handler(name).map_err(unknown)?;
        let init = match msg.get(3).filter(|s| !s.is_empty()) {
            Some(n) => Some(registry::init(&String::from_utf8_lossy(n)).map_err(unknown)?),
            None => None,
        };
        let Some(backend) = msg.str(4).and_then(|m| m.parse::<Backend>().ok()) else {
            return Err(octets!["other", "spawn request without a valid backend"]);
        };
        if backend == Backend::Sync && handler.is_async() {
            return Err(octets!["needs-async", name.to_owned()]);
        }
        if fds.is_empty() {
            return Err(octets!["other", "spawn request without a socket"]);
        }
        let sock = fds.remove(0);
        let extras = msg.str(5).unwrap_or("");
        let mut extra = |name: &str| {
            (extras.split(',').any(|e| e == name) && !fds.is_empty()).then(|| fds.remove(0))
        };
        let arena = extra("arena");
        let journal = extra("journal");
        let args = WorkerArgs {
            args: msg.get(6..).unwrap_or_default().to_vec(),
            fds,
        };
        self.fork_child(|| {
            if let Some(fd) = arena {
                // Without it the parent's references could not be read:
                // better not to start than to fail every call.
                if let Err(e) = crate::arena::worker::map(fd) {
                    crate::child::fatal(
                        sock.as_raw_fd(),
                        "start",
                        format!("cannot map the shared arena: {e} (FORKRPC_ARENA=0 turns it off, =<bytes> sizes it)"),
                        crate::child::PANIC_EXIT_CODE,
                    );
                }
            }
            if let Some(fd) = journal {
                if let Err(e) = crate::journal::worker::map(fd) {
                    crate::child::fatal(
                        sock.as_raw_fd(),
                        "start",
                        format!("cannot map the crash journal: {e}"),
                        crate::child::PANIC_EXIT_CODE,
                    );
                }
            }
            if let Some(init) = init {
                crate::child::run_init(sock.as_raw_fd(), || init(args));
            }
            let code = match (handler, backend) {
                (Handler::RawEcho, _) => crate::child::raw_echo(sock),
                (h, Backend::Async { limit, uring }) => {
                    crate::child::asynchronous::serve(sock, h, limit, uring)
                }
                (h, Backend::Sync) => crate::child::sync::serve(sock, h),
            };
            exit_now(code)
        })
    }

    /// `["derive", req, init, args...]`, fds `[new control socket, send_fh...]`.
    fn derive(&mut self, msg: &Octets, mut fds: Vec<OwnedFd>) -> Result<i32, Octets> {
        let init = registry::init(msg.str(2).unwrap_or("")).map_err(unknown)?;
        if fds.is_empty() {
            return Err(octets!["other", "derive request without a socket"]);
        }
        let ctl = fds.remove(0);
        let args = WorkerArgs {
            args: msg[3..].to_vec(),
            fds,
        };
        self.fork_child(|| {
            init(args);
            serve(ctl)
        })
    }

    /// `["exec", req, program, args...]`, fds `[socket]`: forks and runs
    /// `program` with the socket as its stdin and stdout (a worker in any
    /// language that speaks the wire format; or `ssh host cmd`).
    fn exec(&mut self, msg: &Octets, mut fds: Vec<OwnedFd>) -> Result<i32, Octets> {
        use std::ffi::CString;
        let program = msg.get(2).cloned().unwrap_or_default();
        let cstr = |b: &Bytes| CString::new(b.to_vec());
        let Ok(prog) = cstr(&program) else {
            return Err(octets!["other", "program name with a NUL byte"]);
        };
        let mut argv = vec![prog.clone()];
        for a in &msg[3..] {
            match cstr(a) {
                Ok(c) => argv.push(c),
                Err(_) => return Err(octets!["other", "program argument with a NUL byte"]),
            }
        }
        if fds.is_empty() {
            return Err(octets!["other", "exec request without a socket"]);
        }
        let sock = fds.remove(0);
        // A close-on-exec pipe says whether exec worked: it just closes on
        // success; on failure the child writes errno into it.
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| octets!["other", format!("pipe: {e}")])?;
        let rd_raw = rd.as_raw_fd();
        let pid = self.fork_child(|| {
            close_raw(rd_raw);
            let ok = nix::unistd::dup2(sock.as_raw_fd(), 0).is_ok()
                && nix::unistd::dup2(sock.as_raw_fd(), 1).is_ok();
            let errno = if ok {
                nix::unistd::execvp(&prog, &argv).unwrap_err() as i32
            } else {
                libc::EBADF
            };
            let _ = nix::unistd::write(&wr, &errno.to_ne_bytes());
            exit_now(127)
        })?;
        drop(wr);
        drop(sock);
        let mut buf = [0u8; 4];
        match nix::unistd::read(rd.as_raw_fd(), &mut buf) {
            Ok(4) => {
                let e = std::io::Error::from_raw_os_error(i32::from_ne_bytes(buf));
                Err(octets![
                    "other",
                    format!(
                        "cannot execute {:?}: {e}",
                        String::from_utf8_lossy(&program)
                    )
                ])
            }
            _ => Ok(pid),
        }
    }

    /// Forks; the child drops the template's own descriptors, dies with
    /// the template, and runs `child`.
    fn fork_child(&mut self, child: impl FnOnce()) -> Result<i32, Octets> {
        let me = nix::unistd::getpid();
        // SAFETY: the template forks only from this loop, on the thread that
        // owns it, and its children run only `child` then exit; in a forked
        // template no other thread exists, and a re-executed one only runs
        // threads the program started before `init()` (documented).
        match unsafe { fork() } {
            Ok(ForkResult::Parent { child }) => {
                match crate::sys::pidfd_open(child.as_raw()) {
                    Ok(fd) => self.children.push((child, fd)),
                    Err(e) => eprintln!(
                        "forkrpc template: pidfd_open({child}): {e}; its exit will not be reported"
                    ),
                }
                Ok(child.as_raw())
            }
            Ok(ForkResult::Child) => {
                close_raw(self.ctl.as_raw_fd());
                for (_, fd) in &self.children {
                    close_raw(fd.as_raw_fd());
                }
                die_with_parent(me);
                child();
                exit_now(0)
            }
            Err(e) => Err(octets!["other", format!("fork failed: {e}")]),
        }
    }
}

fn unknown(e: crate::error::Error) -> Octets {
    match e {
        crate::error::Error::UnknownHandler { kind, name, known } => {
            octets!["unknown", kind, name, known]
        }
        other => octets!["other", other.to_string()],
    }
}

fn close_raw(fd: RawFd) {
    let _ = nix::unistd::close(fd);
}

/// Asks for SIGKILL when the parent dies, and exits if it already has.
pub(crate) fn die_with_parent(parent: Pid) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != parent {
        exit_now(0);
    }
}
