//! Helpers shared by the integration tests.
#![allow(dead_code)]

use libtest_mimic::Failed;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
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

/// A test that runs on one engine, with the binary's template.
pub type EngineTest = fn(&forkrpc::Template, forkrpc::EngineKind) -> Result<(), Failed>;

/// One trial per engine and test, named `engine::test`; those on an engine
/// the kernel refuses are ignored (see [`engines`]).
pub fn engine_trials(
    t: &forkrpc::Template,
    tests: &[(&str, EngineTest)],
) -> Vec<libtest_mimic::Trial> {
    let mut trials = Vec::new();
    for (kind, available) in engines() {
        for &(name, f) in tests {
            let t = t.clone();
            trials.push(
                libtest_mimic::Trial::test(format!("{}::{name}", kind.name()), move || f(&t, kind))
                    .with_ignored_flag(!available),
            );
        }
    }
    trials
}

fn io_uring_works() -> bool {
    io_uring::IoUring::new(2).is_ok()
}

/// `Ok` if `cond`, else a failure with `msg`.
pub fn check(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// `Ok` if `a == b`, else a failure showing both.
pub fn eq<T: PartialEq + std::fmt::Debug>(a: T, b: T) -> Result<(), Failed> {
    check(a == b, format!("expected {b:?}, got {a:?}"))
}

/// An `on_destroy` callback and the channel it signals.
pub fn destroy_channel() -> (impl Fn() + Send + Sync + 'static, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    (move || tx.lock().unwrap().send(()).unwrap(), rx)
}

/// Waits for a worker's answer, or fails after 30 s rather than hang the
/// suite.
pub fn recv<T>(rx: &mpsc::Receiver<T>) -> Result<T, Failed> {
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| Failed::from("timed out waiting for the worker"))
}

/// Runs a future to completion on a fresh current-thread runtime.
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Awaits `futs` one after another (on a fresh runtime); their outputs in
/// order.
pub fn await_in_order<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    block(async {
        let mut out = Vec::new();
        for f in futs {
            out.push(f.await);
        }
        out
    })
}

/// What a test saw, in order, as text.
pub type Log = Arc<Mutex<Vec<String>>>;

/// `opts` that log each event (as text) to `log`, then "destroy" when the
/// worker is gone; the receiver fires after that.
pub fn logged(opts: forkrpc::Options, log: &Log) -> (forkrpc::Options, mpsc::Receiver<()>) {
    let (l1, l2) = (log.clone(), log.clone());
    let (destroy, destroyed) = destroy_channel();
    let opts = opts
        .on_event(move |ev| l1.lock().unwrap().push(ev.to_string()))
        .on_destroy(move || {
            l2.lock().unwrap().push("destroy".into());
            destroy()
        });
    (opts, destroyed)
}

/// A codec that is not built in: a byte vector as it is.
#[derive(Clone, Copy)]
pub struct RawBytes;

impl forkrpc::serial::Codec<Vec<u8>> for RawBytes {
    type Thawed = Vec<u8>;
    fn freeze(
        &self,
        v: &Vec<u8>,
        out: &mut bytes::BytesMut,
        _offset: usize,
    ) -> forkrpc::Result<()> {
        out.extend_from_slice(v);
        Ok(())
    }
    fn thaw(&self, p: bytes::Bytes, _offset: usize) -> forkrpc::Result<Vec<u8>> {
        Ok(p.to_vec())
    }
}
