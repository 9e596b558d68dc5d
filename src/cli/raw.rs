//! The raw baselines: a forked child echoing bytes over a bare socketpair,
//! no framework — what the machine allows.

use super::schedule::Schedule;
use super::stats;
use hdrhistogram::Histogram;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Size of one raw frame, about a W1 frame (header + 16-byte argument).
pub const FRAME: usize = 24;

fn set_blocking(fd: &OwnedFd, blocking: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let mut fl = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fl.set(OFlag::O_NONBLOCK, !blocking);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl))?;
    Ok(())
}

fn io_err(e: nix::errno::Errno) -> io::Error {
    e.into()
}

/// Pushes `total` bytes through the echo child as fast as it goes, writing
/// and reading in batches of up to `chunk` bytes; returns the elapsed time.
pub fn stream(fd: &OwnedFd, total: usize, chunk: usize) -> io::Result<Duration> {
    set_blocking(fd, false)?;
    let out = vec![0x5au8; chunk];
    let mut inb = vec![0u8; chunk.max(256 * 1024)];
    let (mut sent, mut got) = (0usize, 0usize);
    let t = Instant::now();
    while got < total {
        let mut flags = PollFlags::POLLIN;
        if sent < total {
            flags |= PollFlags::POLLOUT;
        }
        let mut p = [PollFd::new(fd.as_fd(), flags)];
        poll(&mut p, PollTimeout::NONE).map_err(io_err)?;
        let rev = p[0].revents().unwrap_or(PollFlags::empty());
        if sent < total && rev.contains(PollFlags::POLLOUT) {
            let n = (total - sent).min(chunk);
            match nix::unistd::write(fd, &out[..n]) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if rev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
            match nix::unistd::read(fd.as_raw_fd(), &mut inb) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "raw echo child closed",
                    ))
                }
                Ok(n) => got += n,
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(t.elapsed())
}

/// One frame out, the same frame back, `n` times; latency per round trip.
pub fn ping_pong(fd: &OwnedFd, n: usize) -> io::Result<Histogram<u64>> {
    set_blocking(fd, true)?;
    let out = [0x5au8; FRAME];
    let mut inb = [0u8; FRAME];
    let mut h = stats::histogram();
    for _ in 0..n {
        let t = Instant::now();
        nix::unistd::write(fd, &out).map_err(io_err)?;
        let mut got = 0;
        while got < FRAME {
            match nix::unistd::read(fd.as_raw_fd(), &mut inb[got..]).map_err(io_err)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "raw echo child closed",
                    ))
                }
                k => got += k,
            }
        }
        stats::record(&mut h, t.elapsed());
    }
    Ok(h)
}

/// What the raw echo child gave under an open-loop schedule.
pub struct OpenLoop {
    /// Latency of each echo from its call's due time.
    pub hist: Histogram<u64>,
}

/// `forkrpc load`'s schedule against the raw echo child: a `frame`-byte
/// frame per call, written when due (calls due together go out in one
/// write, up to 64), at most `cap` in flight; a reader thread takes the
/// echoes in order and measures each from its call's due time.
pub fn open_loop(
    fd: &OwnedFd,
    sched: &mut Schedule,
    frame: usize,
    cap: u64,
) -> io::Result<OpenLoop> {
    set_blocking(fd, true)?;
    let answered = AtomicU64::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    std::thread::scope(|s| {
        let reader = s.spawn(|| -> io::Result<Histogram<u64>> {
            let mut h = stats::histogram();
            let mut inb = vec![0u8; 256 * 1024];
            let mut have = 0usize;
            for due in rx {
                while have < frame {
                    match nix::unistd::read(fd.as_raw_fd(), &mut inb).map_err(io_err)? {
                        0 => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "raw echo child closed",
                            ))
                        }
                        n => have += n,
                    }
                }
                have -= frame;
                stats::record(&mut h, due.elapsed());
                answered.fetch_add(1, Ordering::Release);
            }
            Ok(h)
        });
        let out = vec![0x5au8; frame * 64];
        let mut pending = 0usize;
        let mut result = Ok(());
        while let Some(due) = sched.next(|sent| sent - answered.load(Ordering::Acquire) >= cap) {
            pending += 1;
            let _ = tx.send(due);
            if pending == 64 || !sched.due_now() {
                if let Err(e) = write_all(fd, &out[..pending * frame]) {
                    result = Err(e);
                    break;
                }
                pending = 0;
            }
        }
        if result.is_ok() && pending > 0 {
            result = write_all(fd, &out[..pending * frame]);
        }
        drop(tx);
        let hist = reader.join().expect("raw reader thread")?;
        result.map(|()| OpenLoop { hist })
    })
}

fn write_all(fd: &OwnedFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = nix::unistd::write(fd, buf).map_err(io_err)?;
        buf = &buf[n..];
    }
    Ok(())
}
