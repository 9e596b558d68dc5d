//! Sync calls framed on the caller's thread.
//!
//! A call to a sync worker needs nothing of the driver's state to be framed
//! (its header is its length; its reply is the next one in order), so the
//! caller writes the request frame into the connection's outbox and queues
//! its waiter there itself, under the outbox's lock. The driver takes
//! everything queued in one go when it next loops ([`Outbox::take`]): one
//! move of a buffer and one bulk append of waiters per batch, instead of a
//! command per call that it would read, match, look its connection up for
//! and encode. On a pipelined echo that was about a quarter of the
//! driver's time per call, and the driver is the stage that bounds it.
//!
//! The driver looks at the outbox after every read of the connection's
//! replies, so a caller tells it (a `Flush` command, which wakes it) only
//! when no call of the connection was outstanding. A call made behind an
//! outstanding one therefore leaves when that one's reply arrives, with
//! everything queued meanwhile; a sync worker could not have started it
//! any earlier.
//!
//! A call whose strings lie in the shared arena is framed here too, in its
//! shared form: the caller takes the worker's holds on the regions it
//! names, and the driver adds them to its count with the batch. Async
//! calls go as commands (the driver picks their ids), and so do a pool's
//! batches, to workers only the pool calls; the driver still takes a
//! connection's outbox before any command for it.

use crate::arena::Arena;
use crate::call::{write_octets, Payload, Waiter};
use crate::wire::frame::{put_len_header, LEN_HEADER};
use crate::wire::sendq::SendQueue;
use crate::wire::SEND_IN_PLACE;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Framed calls of one sync connection on their way to the driver.
#[derive(Default)]
pub(crate) struct Outbox {
    inner: Mutex<Framed>,
}

#[derive(Default)]
struct Framed {
    /// Request frames, in call order.
    out: SendQueue,
    /// Their waiters, in the same order.
    waiters: VecDeque<Waiter>,
    /// Arena regions the frames name, each held once for the worker.
    held: Vec<usize>,
    /// The driver will look here again without being told: a `Flush`
    /// command is queued, or it waits for replies of this connection (and
    /// looks after each read of them).
    armed: bool,
    /// The connection has ended: calls are refused.
    ended: bool,
    /// Waiters that are futures' latches (only those can be abandoned;
    /// see [`Outbox::take`]).
    latches: usize,
}

impl Outbox {
    /// Frames a sync request for `args` (in its shared form if some of its
    /// strings lie in `arena`) and queues `done` for its reply, counting it
    /// in `count` (whose only writers hold this lock). Returns whether the
    /// driver must be told (no `Flush` is queued yet), or gives `done`
    /// back if the connection has ended.
    pub(crate) fn put(
        &self,
        args: &Payload,
        done: Waiter,
        arena: Option<&Arena>,
        count: &AtomicU64,
    ) -> Result<bool, Waiter> {
        self.frame(done, count, |f| {
            let start = f.held.len();
            let form = arena.and_then(|a| args.shared_form(a, &mut f.held));
            let len = form.as_ref().map_or(args.len(), |o| o.encoded_len() as u32);
            f.out
                .reserve(LEN_HEADER + (len as usize).min(SEND_IN_PLACE));
            put_len_header(&mut f.out.buf, len);
            match &form {
                Some(o) => {
                    for &r in &f.held[start..] {
                        arena.expect("a shared form names the arena").hold(r);
                    }
                    write_octets(o, &mut f.out)
                }
                None => args.write(&mut f.out),
            }
        })
    }

    /// Frames a sync request of `len` bytes that `write` appends (copying
    /// every byte); as [`Outbox::put`].
    pub(crate) fn put_with(
        &self,
        len: u32,
        write: impl FnOnce(&mut SendQueue),
        done: Waiter,
        count: &AtomicU64,
    ) -> Result<bool, Waiter> {
        self.frame(done, count, |f| {
            f.out.reserve(LEN_HEADER + len as usize);
            put_len_header(&mut f.out.buf, len);
            write(&mut f.out);
        })
    }

    /// Under the lock: `write` appends the request frame, `done` waits for
    /// its reply (see [`Outbox::put`]).
    fn frame(
        &self,
        done: Waiter,
        count: &AtomicU64,
        write: impl FnOnce(&mut Framed),
    ) -> Result<bool, Waiter> {
        let mut f = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if f.ended {
            return Err(done);
        }
        write(&mut f);
        f.latches += usize::from(matches!(done, Waiter::Latch(_)));
        f.waiters.push_back(done);
        count.store(count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Ok(!std::mem::replace(&mut f.armed, true))
    }

    /// Driver: moves what is queued to the end of `out` (or drops the
    /// frames if `live` is false: the worker can no longer read them) and
    /// of `waiters`, the connection's outstanding calls.
    ///
    /// While calls are outstanding the driver will read their replies (or
    /// EOF) and look here again then, so callers need not wake it: calls
    /// made meanwhile go out with the next batch. Waking the driver for
    /// each handful of calls instead had it take batches half as big, at
    /// twice the wake-ups and syscalls: more than framing here saved.
    ///
    /// Calls whose future was dropped before this (nobody waits for their
    /// reply) are taken out here, never sent, and uncounted from `framed`
    /// (unless some call holds arena regions: then all go).
    pub(crate) fn take(
        &self,
        out: &mut SendQueue,
        waiters: &mut VecDeque<Waiter>,
        held: &mut Vec<usize>,
        live: bool,
        framed: &AtomicU64,
    ) {
        let mut f = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Only a future's latch can be abandoned: without one, the waiters
        // are not looked at.
        let latches = std::mem::take(&mut f.latches);
        let mut dropped = None;
        if live && latches > 0 && f.held.is_empty() && f.waiters.iter().any(Waiter::abandoned) {
            dropped = Some(f.drop_abandoned(framed));
        }
        held.append(&mut f.held);
        if waiters.is_empty() {
            std::mem::swap(waiters, &mut f.waiters);
        } else {
            waiters.append(&mut f.waiters);
        }
        f.armed = !waiters.is_empty();
        if live {
            out.append(&mut f.out);
            drop(f);
            drop(dropped); // after the lock, as below
            return;
        }
        // Dropped after the lock: a caller's buffer may run code when freed.
        let dead = std::mem::take(&mut f.out);
        drop(f);
        drop(dead);
    }

    /// Driver: the connection ended. Later calls are refused; those
    /// queued are returned, to fail with the others outstanding, and the
    /// regions they hold added to `held`, to be released.
    pub(crate) fn end(&self, held: &mut Vec<usize>) -> VecDeque<Waiter> {
        let mut f = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f.ended = true;
        held.append(&mut f.held);
        let dead = std::mem::take(&mut f.out);
        let waiters = std::mem::take(&mut f.waiters);
        drop(f);
        drop(dead); // after the lock, as in `take`
        waiters
    }
}

impl Framed {
    /// Takes the frames and waiters of abandoned calls out (the frames are
    /// one per waiter, in order, each a length header and its payload);
    /// returns the waiters, to drop after the lock.
    fn drop_abandoned(&mut self, framed: &AtomicU64) -> Vec<Waiter> {
        let mut old = std::mem::take(&mut self.out);
        let mut bytes = bytes::BytesMut::new();
        while let Some(piece) = old.next() {
            bytes.extend_from_slice(&piece);
        }
        let mut gone = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        let mut pos = 0;
        for w in self.waiters.drain(..) {
            let len = u32::from_be_bytes(bytes[pos..pos + LEN_HEADER].try_into().unwrap());
            let end = pos + LEN_HEADER + len as usize;
            if w.abandoned() {
                gone.push(w);
            } else {
                self.out.reserve(end - pos);
                self.out.buf.extend_from_slice(&bytes[pos..end]);
                kept.push_back(w);
            }
            pos = end;
        }
        self.waiters = kept;
        framed.store(
            framed.load(Ordering::Relaxed) - gone.len() as u64,
            Ordering::Relaxed,
        );
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::octets;

    fn call(ob: &Outbox, arg: &'static str, count: &AtomicU64) -> Result<bool, Waiter> {
        let p = Payload::new(octets![arg]).unwrap();
        ob.put(&p, Waiter::callback(|_| {}), None, count)
    }

    #[test]
    fn callers_tell_the_driver_only_when_it_will_not_look_again() {
        let (ob, count) = (Outbox::default(), AtomicU64::new(0));
        assert!(matches!(call(&ob, "a", &count), Ok(true)), "first: tell");
        assert!(matches!(call(&ob, "bc", &count), Ok(false)), "told already");
        assert_eq!(count.load(Ordering::Relaxed), 2);

        // The driver takes both; with their replies outstanding it will
        // look again after reading them, so nobody needs to tell it.
        let (mut out, mut waiters) = (SendQueue::default(), VecDeque::new());
        ob.take(&mut out, &mut waiters, &mut vec![], true, &count);
        assert_eq!(waiters.len(), 2);
        assert!(matches!(call(&ob, "d", &count), Ok(false)));
        ob.take(&mut out, &mut waiters, &mut vec![], true, &count);
        assert_eq!(waiters.len(), 3, "appended after the first two");
        assert_eq!(&out.next().unwrap()[..], b"\0\0\0\x02\x01a\0\0\0\x03\x02bc");
        assert_eq!(&out.next().unwrap()[..], b"\0\0\0\x02\x01d");
        assert!(out.next().is_none());

        // All answered: the next call must tell the driver again.
        waiters.clear();
        ob.take(&mut out, &mut waiters, &mut vec![], true, &count);
        assert!(matches!(call(&ob, "e", &count), Ok(true)));
    }

    #[test]
    fn calls_whose_future_was_dropped_are_not_sent() {
        let (ob, count) = (Outbox::default(), AtomicU64::new(0));
        let mut latches = Vec::new();
        for arg in ["a", "bc", "d"] {
            let l = crate::latch::Latch::new();
            let p = Payload::new(octets![arg]).unwrap();
            assert!(ob.put(&p, Waiter::Latch(l.clone()), None, &count).is_ok());
            latches.push(l);
        }
        drop(latches.remove(1)); // "bc": nobody waits for it
        let (mut out, mut waiters) = (SendQueue::default(), VecDeque::new());
        ob.take(&mut out, &mut waiters, &mut vec![], true, &count);
        assert_eq!(waiters.len(), 2);
        assert_eq!(count.load(Ordering::Relaxed), 2, "uncounted");
        let mut sent = Vec::new();
        while let Some(b) = out.next() {
            sent.extend_from_slice(&b);
        }
        assert_eq!(sent, b"\0\0\0\x02\x01a\0\0\0\x02\x01d");
    }

    #[test]
    fn a_dead_worker_gets_no_frames_and_an_ended_one_no_calls() {
        let (ob, count) = (Outbox::default(), AtomicU64::new(0));
        assert!(call(&ob, "a", &count).is_ok());
        let (mut out, mut waiters) = (SendQueue::default(), VecDeque::new());
        ob.take(&mut out, &mut waiters, &mut vec![], false, &count);
        assert!(out.is_empty(), "frames for a worker that cannot read");
        assert_eq!(waiters.len(), 1, "its call is recorded, to fail later");
        assert!(call(&ob, "b", &count).is_ok());
        assert_eq!(
            ob.end(&mut vec![]).len(),
            1,
            "queued calls fail with the rest"
        );
        assert!(call(&ob, "c", &count).is_err(), "refused once ended");
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
