//! The parent's side of a template: requests (spawn, derive) go out with
//! their descriptors; a listener thread reads replies and exit reports.

use super::backend::Backend;
use super::fdpass::{recv_msg, send_msg};
use super::server::MAX_CONTROL_MSG;
use crate::error::{Error, ExitStatus, Result};
use crate::octets;
use crate::wire::Octets;
use bytes::Bytes;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// What a worker runs, and what it gets besides its socket.
pub(crate) struct WorkerSpec<'a> {
    pub handler: &'a str,
    pub init: Option<&'a str>,
    pub backend: Backend,
    /// `send_arg` values, for the init function.
    pub args: &'a [Bytes],
    /// `send_fh` descriptors, for the init function.
    pub fds: &'a [OwnedFd],
    /// The parent's shared arena (a sync worker's).
    pub arena: Option<BorrowedFd<'a>>,
    /// The worker's crash journal (a sync worker's; see `journal`).
    pub journal: Option<BorrowedFd<'a>>,
}

/// Called with every exit the template reports (set once by the engine).
static EXIT_HOOK: OnceLock<Box<dyn Fn(i32, ExitStatus) + Send + Sync>> = OnceLock::new();

pub(crate) fn set_exit_hook(f: impl Fn(i32, ExitStatus) + Send + Sync + 'static) {
    let _ = EXIT_HOOK.set(Box::new(f));
}

/// A connection to one template process.
pub(crate) struct TemplateClient {
    ctl: OwnedFd,
    pid: i32,
    send: Mutex<()>,
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Default)]
struct State {
    next_req: u64,
    replies: HashMap<u64, Result<i32>>,
    gone: Option<String>,
}

impl TemplateClient {
    /// Wraps the parent's end of a new template's control socket and starts
    /// the listener. `reap` says whether the template is our own child.
    pub(crate) fn new(ctl: OwnedFd, pid: i32, reap: bool) -> Result<Arc<Self>> {
        let c = Arc::new(TemplateClient {
            ctl,
            pid,
            send: Mutex::new(()),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let weak = Arc::downgrade(&c);
        // The listener reads through its own descriptor; Drop shuts the
        // socket down, which ends the listener and tells the template.
        let fd = c
            .ctl
            .try_clone()
            .map_err(|e| Error::io("duplicating the template socket", e))?;
        std::thread::Builder::new()
            .name(format!("forkrpc-template-{pid}"))
            .spawn(move || listen(fd, weak, pid, reap))
            .map_err(|e| Error::io("starting the template listener thread", e))?;
        Ok(c)
    }

    /// Process id of the template.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Forks the worker `w` describes, on `sock`; returns its pid.
    pub(crate) fn spawn(&self, w: &WorkerSpec<'_>, sock: OwnedFd) -> Result<i32> {
        let mut msg = octets![
            "spawn",
            "",
            w.handler.to_owned(),
            w.init.unwrap_or("").to_owned(),
            w.backend.to_string(),
            [w.arena.map(|_| "arena"), w.journal.map(|_| "journal")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(",")
        ];
        msg.extend(w.args.iter().cloned());
        let mut raw = vec![sock.as_raw_fd()];
        raw.extend(w.arena.map(|a| a.as_raw_fd()));
        raw.extend(w.journal.map(|j| j.as_raw_fd()));
        raw.extend(w.fds.iter().map(|f| f.as_raw_fd()));
        self.request(msg, &raw)
    }

    /// Forks and execs `program` with `sock` as its stdin and stdout.
    pub(crate) fn spawn_exec(&self, program: &str, args: &[Bytes], sock: OwnedFd) -> Result<i32> {
        let mut msg = octets!["exec", "", program.to_owned()];
        msg.extend(args.iter().cloned());
        self.request(msg, &[sock.as_raw_fd()])
    }

    /// Forks a derived template that runs `init` first; returns its client.
    pub(crate) fn derive(&self, init: &str, args: &[Bytes], fds: &[OwnedFd]) -> Result<Arc<Self>> {
        let (mine, theirs) = control_pair()?;
        let mut msg = octets!["derive", "", init.to_owned()];
        msg.extend(args.iter().cloned());
        let mut raw = vec![theirs.as_raw_fd()];
        raw.extend(fds.iter().map(|f| f.as_raw_fd()));
        let pid = self.request(msg, &raw)?;
        drop(theirs);
        TemplateClient::new(mine, pid, false)
    }

    fn request(&self, mut msg: Octets, fds: &[RawFd]) -> Result<i32> {
        let req = {
            let mut st = self.state.lock().unwrap();
            if let Some(g) = &st.gone {
                return Err(Error::Template(g.clone()));
            }
            st.next_req += 1;
            st.next_req
        };
        msg[1] = Bytes::from(req.to_string());
        let bytes = msg.to_bytes();
        if bytes.len() > MAX_CONTROL_MSG {
            return Err(Error::Template(format!(
                "arguments for the child take {} bytes; at most {MAX_CONTROL_MSG} can be sent with send_arg",
                bytes.len()
            )));
        }
        {
            let _g = self.send.lock().unwrap();
            send_msg(self.ctl.as_raw_fd(), &bytes, fds)
                .map_err(|e| Error::io("sending a request to the template", e))?;
        }
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(r) = st.replies.remove(&req) {
                return r;
            }
            if let Some(g) = &st.gone {
                return Err(Error::Template(g.clone()));
            }
            st = self.cond.wait(st).unwrap();
        }
    }
}

/// A close-on-exec seqpacket pair for a template's control channel.
pub(crate) fn control_pair() -> Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("creating a template control socket", e))
}

impl Drop for TemplateClient {
    fn drop(&mut self) {
        let _ = nix::sys::socket::shutdown(self.ctl.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

fn listen(fd: OwnedFd, client: std::sync::Weak<TemplateClient>, pid: i32, reap: bool) {
    let mut buf = vec![0u8; 4096];
    let why = loop {
        let n = match recv_msg(fd.as_raw_fd(), &mut buf) {
            Ok((0, _)) => break format!("template process {pid} exited"),
            Ok((n, _)) => n,
            Err(e) => break format!("template process {pid}: {e}"),
        };
        let Ok(msg) = Octets::decode(Bytes::copy_from_slice(&buf[..n])) else {
            continue;
        };
        match (msg.str(0), msg.num(1)) {
            (Some("exit"), Some(child)) => {
                let n = msg.num(3).unwrap_or(0) as i32;
                let status = match msg.str(2) {
                    Some("signal") => ExitStatus::Signal(n),
                    _ => ExitStatus::Code(n),
                };
                if let Some(hook) = EXIT_HOOK.get() {
                    hook(child as i32, status);
                }
            }
            (Some(kind @ ("ok" | "err")), Some(req)) => {
                let r = if kind == "ok" {
                    Ok(msg.num(2).unwrap_or(-1) as i32)
                } else {
                    Err(template_error(&msg))
                };
                let Some(c) = client.upgrade() else { return };
                c.state.lock().unwrap().replies.insert(req as u64, r);
                c.cond.notify_all();
            }
            _ => {}
        }
    };
    if reap {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }
    if let Some(c) = client.upgrade() {
        c.state.lock().unwrap().gone = Some(why);
        c.cond.notify_all();
    }
}

fn template_error(msg: &Octets) -> Error {
    let s = |i| msg.str(i).unwrap_or("").to_owned();
    match msg.str(2) {
        Some("unknown") => Error::UnknownHandler {
            kind: if s(3) == "handler" {
                "handler"
            } else {
                "init function"
            },
            name: s(4),
            known: s(5),
        },
        Some("needs-async") => Error::NeedsAsync { name: s(3) },
        _ => Error::Template(s(3)),
    }
}
