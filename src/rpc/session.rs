//! The protocol of one connection, on the driver thread: frames given
//! their meaning (replies, events, chunk parts, arena releases), calls
//! framed, and how the connection's end resolves every call it holds.

use super::options::Options;
use super::outbox::Outbox;
use super::window::Window;
use crate::arena::Arena;
pub(crate) use crate::call::{guard, write_octets, Call, Payload, Waiter};
use crate::engine::{ConnStats, Protocol, SendQueue};
use crate::error::{Error, ExitStatus, Result};
use crate::latch::Latch;
use crate::octets;
use crate::wire::frame::{put_id_header, put_len_header, EVENT_ID, SYNC_REPLY_ID};
use crate::wire::Octets;
use crate::wire::{arena_ref, starts_with_tag, CHUNK_PART_TAG, ERROR_TAG, FATAL_TAG, RELEASE_TAG};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The calls a connection waits for.
enum Calls {
    /// Sync backend: replies come in request order.
    Sync(VecDeque<Waiter>),
    /// Async backend: replies carry the request's id.
    Async(Window<Waiter>),
}

impl Calls {
    fn len(&self) -> usize {
        match self {
            Calls::Sync(q) => q.len(),
            Calls::Async(w) => w.len(),
        }
    }

    /// The waiter of reply `id`, if that call is outstanding.
    fn take(&mut self, id: u32) -> Option<Waiter> {
        match self {
            Calls::Sync(q) if id == SYNC_REPLY_ID => q.pop_front(),
            Calls::Sync(_) => None,
            Calls::Async(w) => w.remove(id),
        }
    }

    /// Calls not answered: a chunk counts its calls, not as one.
    fn outstanding(&self) -> usize {
        match self {
            Calls::Sync(q) => q
                .iter()
                .map(|w| match w {
                    Waiter::Chunk(c) => c.calls_left(),
                    _ => 1,
                })
                .sum(),
            Calls::Async(w) => w.len(),
        }
    }

    /// Every outstanding waiter, oldest first.
    fn drain(&mut self) -> Vec<Waiter> {
        match self {
            Calls::Sync(q) => q.drain(..).collect(),
            Calls::Async(w) => w.drain(),
        }
    }
}

/// The protocol of one connection (either backend), on the driver thread.
pub(super) struct Session {
    pid: i32,
    calls: Calls,
    /// `(kind, message)` of a fatal report from the child.
    fatal: Option<(String, String)>,
    protocol_error: Option<String>,
    opts: Options,
    end: Arc<Latch<Result<()>>>,
    stats: Arc<ConnStats>,
    /// The shared arena, if the worker has it (see `arena.rs`).
    arena: Option<&'static Arena>,
    /// Regions of the arena sent to the worker and not yet released, with
    /// how many times each.
    held: Vec<(usize, u32)>,
    /// Sync workers: calls framed by callers (see `outbox`).
    outbox: Option<Arc<Outbox>>,
    /// A sync worker's crash journal (see `journal`).
    journal: Option<crate::journal::Journal>,
}

impl Session {
    /// The protocol of a new connection to worker `pid`.
    pub(super) fn new(
        pid: i32,
        opts: Options,
        outbox: Option<Arc<Outbox>>,
        end: Arc<Latch<Result<()>>>,
        stats: Arc<ConnStats>,
        arena: Option<&'static Arena>,
        journal: Option<crate::journal::Journal>,
    ) -> Session {
        Session {
            outbox,
            pid,
            calls: if opts.asynchronous {
                Calls::Async(Window::starting_at(1))
            } else {
                Calls::Sync(VecDeque::new())
            },
            fatal: None,
            protocol_error: None,
            opts,
            end,
            stats,
            arena,
            held: Vec::new(),
            journal,
        }
    }

    /// Handles the frames of `rest` (what the worker sent after its last
    /// complete frame) followed by `out` (what it made and never wrote):
    /// the rest of its output stream. Stops at the first violation.
    fn replay(&mut self, rest: BytesMut, out: &[u8]) -> std::result::Result<(), String> {
        let mut stream = rest;
        stream.extend_from_slice(out);
        let stream = stream.freeze();
        let mut error = Ok(());
        crate::wire::frame::id_frames(&stream, |f| {
            if error.is_ok() {
                error = self.frame(f.id, &stream, f.payload);
            }
        });
        error
    }

    /// After the worker's death, what its journal says: delivers the
    /// replies it had not written yet (`rest`: the partial frame the
    /// socket ended with, which its unwritten output continues), and the
    /// running chunk's results. Returns how many of the calls left were
    /// started (the others never were), or None without a journal.
    fn recover(&mut self, rest: BytesMut, received: u64) -> Option<usize> {
        let r = self.journal.as_ref()?.remains(received);
        if let Calls::Async(_) = self.calls {
            // Replies and events it made and had not written, then the
            // count of requests it started, in the order sent (an output
            // mirror that overflowed leaves the started ones failing).
            if let Some(out) = r.out {
                let _ = self.replay(rest, &out);
            }
            return Some(r.frames as usize);
        }
        // A mirror that overflowed: which calls finished is not known.
        let (Some(out), Some(part)) = (r.out, r.part) else {
            return None;
        };
        if self.replay(rest, &out).is_err() {
            return None;
        }
        let answered = self.stats.answered.load(Ordering::Relaxed);
        let started = r.frames.saturating_sub(answered) as usize;
        if started > 0 && r.items > 0 && !part.is_empty() {
            if let Calls::Sync(q) = &mut self.calls {
                if let Some(Waiter::Chunk(c)) = q.front_mut() {
                    let blob = Bytes::from(part);
                    if c.recovered(r.part_first as usize, &blob).is_err() {
                        return None;
                    }
                }
            }
        }
        Some(started.min(self.calls.len()))
    }

    /// The error that says how the worker ended: `note` (set by whoever
    /// killed it on purpose), a protocol violation, or its exit with
    /// `outstanding` calls unanswered.
    fn ending(
        &self,
        pid: i32,
        status: ExitStatus,
        outstanding: usize,
        note: Option<Error>,
    ) -> Error {
        let (kind, msg) = self.fatal.clone().unzip();
        if let Some(e) = note {
            return e;
        }
        if let Some(detail) = self.protocol_error.clone() {
            return Error::Protocol { pid, detail };
        }
        match kind.as_deref() {
            Some("protocol") => Error::Protocol {
                pid,
                detail: format!("the worker rejected a request: {}", msg.unwrap_or_default()),
            },
            Some("start") => Error::Template(format!(
                "worker {pid} could not start: {}",
                msg.unwrap_or_default()
            )),
            _ => Error::WorkerExited {
                pid,
                status,
                outstanding,
                panic: match kind.as_deref() {
                    Some("init-panic") => msg.map(|m| format!("in the init function: {m}")),
                    Some("exit-after-panic") => msg.map(|m| format!("in an earlier call: {m}")),
                    _ => msg,
                },
            },
        }
    }

    fn report(&self, e: &Error) {
        if let Some(f) = &self.opts.on_error {
            guard("on_error", || f(e.clone()))
        } else if let Some(f) = &self.opts.on_event {
            guard("on_event", || f(octets!["error", e.to_string()]))
        } else {
            eprintln!("forkrpc: {e}");
        }
    }

    /// Counts a call answered. The driver is the counter's only writer, so
    /// a plain store does (no locked add per reply).
    fn answered_one(&self) {
        let a = &self.stats.answered;
        a.store(a.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn resolve(&self, w: Waiter, r: Result<Octets>) {
        self.answered_one();
        w.complete(r);
    }

    fn violation(&mut self, detail: String) -> Result<(), String> {
        self.protocol_error = Some(detail.clone());
        Err(detail)
    }

    /// An event frame: a note of ours (fatal, per-call error), or the
    /// user's event (raw to a typed `on_event`, else decoded as octets).
    fn event(&mut self, payload: Bytes) -> Result<(), String> {
        if starts_with_tag(&payload, CHUNK_PART_TAG) {
            return self.chunk_part(payload);
        }
        if self.arena.is_some() && starts_with_tag(&payload, RELEASE_TAG) {
            return self.released(payload);
        }
        let ours = starts_with_tag(&payload, FATAL_TAG) || starts_with_tag(&payload, ERROR_TAG);
        if !ours {
            if let Some(f) = &self.opts.on_event_raw {
                guard("on_event", || f(payload));
                return Ok(());
            }
        }
        let ev = match Octets::decode(payload) {
            Ok(ev) => ev,
            Err(e) => return self.violation(format!("malformed event: {e}")),
        };
        let tag = ev.first().map(|t| &t[..]);
        if tag == Some(FATAL_TAG.as_bytes()) {
            self.fatal = Some((
                ev.str(1).unwrap_or("").to_owned(),
                ev.get(2)
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default(),
            ));
            if let Some(f) = &self.opts.on_fatal {
                f();
            }
        } else if tag == Some(ERROR_TAG.as_bytes()) {
            return self.call_failed(&ev);
        } else if let Some(f) = &self.opts.on_event {
            guard("on_event", || f(ev));
        }
        Ok(())
    }

    /// `[CHUNK_PART_TAG, results]`: results of the first items of the
    /// chunk the (sync) worker runs, which is the oldest call.
    fn chunk_part(&mut self, payload: Bytes) -> Result<(), String> {
        let part = match Octets::decode(payload) {
            Ok(p) if p.len() == 2 => p,
            _ => return self.violation("malformed chunk part".into()),
        };
        let r = match &mut self.calls {
            Calls::Sync(q) => match q.front_mut() {
                Some(Waiter::Chunk(c)) => c.part(&part[1]),
                _ => Err("chunk results for a call that is not a chunk".into()),
            },
            Calls::Async(_) => Err("chunk results from an async worker".into()),
        };
        match r {
            Ok(()) => Ok(()),
            Err(detail) => self.violation(detail),
        }
    }

    /// A region sent to the worker once more.
    fn hold(&mut self, arena: &Arena, region: usize) {
        arena.hold(region);
        self.note_held(region);
    }

    /// Counts a hold of `region` the worker was given (taken already).
    fn note_held(&mut self, region: usize) {
        match self.held.iter_mut().find(|(r, _)| *r == region) {
            Some((_, n)) => *n += 1,
            None => self.held.push((region, 1)),
        }
    }

    /// `[RELEASE_TAG, offsets]`: the worker dropped strings it received.
    fn released(&mut self, payload: Bytes) -> Result<(), String> {
        let arena = self.arena.expect("release notes are read with an arena");
        let offsets = Octets::decode(payload)
            .and_then(|note| arena_ref::released(&note).map(|o| o.collect::<Vec<_>>()));
        let offsets = match offsets {
            Ok(o) => o,
            Err(e) => return self.violation(format!("malformed release note: {e}")),
        };
        for off in offsets {
            let held = arena
                .region_of(off as usize, 1)
                .and_then(|r| Some((r, self.held.iter().position(|(h, _)| *h == r)?)));
            let Some((region, i)) = held else {
                return self.violation(format!(
                    "the worker released offset {off} of the shared arena, which it does not hold"
                ));
            };
            self.held[i].1 -= 1;
            if self.held[i].1 == 0 {
                self.held.swap_remove(i);
            }
            arena.release(region);
        }
        Ok(())
    }

    /// The shared form of `args` (see [`Payload::shared_form`]); the
    /// worker holds its regions from now on.
    fn shared_form(&mut self, args: &Payload) -> Option<Octets> {
        let arena = self.arena?;
        let mut regions = Vec::new();
        let form = args.shared_form(arena, &mut regions)?;
        for r in regions {
            self.hold(arena, r);
        }
        Some(form)
    }

    /// The strings a shared reply stands for: views of regions this worker
    /// holds, each adding a holder.
    fn unshare(&self, buf: &Bytes, range: std::ops::Range<usize>) -> Result<Octets, String> {
        let arena = self.arena.expect("shared replies are read with an arena");
        let o = Octets::decode_in(buf, range).map_err(|e| format!("malformed reply: {e}"))?;
        arena_ref::decode(&o, |off, len| {
            let (off, len) = (usize::try_from(off).ok()?, usize::try_from(len).ok()?);
            let region = arena.region_of(off, len)?;
            self.held
                .iter()
                .any(|(r, _)| *r == region)
                .then(|| arena.view(region, off, len))
                .flatten()
        })
        .map_err(|e| format!("malformed reply: {e}"))
    }

    /// `[ERROR_TAG, id, kind, message]`: the call `id` failed.
    fn call_failed(&mut self, ev: &Octets) -> Result<(), String> {
        let id = ev.str(1).and_then(|s| s.parse::<u32>().ok());
        let Some(w) = id.and_then(|id| self.calls.take(id)) else {
            return self.violation(format!(
                "an error note for call {:?}, which is not outstanding",
                ev.str(1).unwrap_or("?")
            ));
        };
        let message = ev
            .get(3)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        let pid = self.pid;
        let err = match ev.str(2) {
            Some("panic") => Error::HandlerPanicked { pid, message },
            _ => Error::Handler { pid, message },
        };
        self.resolve(w, Err(err));
        Ok(())
    }
}

impl Protocol for Session {
    fn encode(&mut self, call: Call, out: &mut SendQueue) {
        let form = self.shared_form(&call.args);
        let len = form
            .as_ref()
            .map_or(call.args.len(), |f| f.encoded_len() as u32);
        let copied = (len as usize).min(crate::wire::SEND_IN_PLACE);
        match &mut self.calls {
            Calls::Sync(q) => {
                out.reserve(4 + copied);
                put_len_header(&mut out.buf, len);
                q.push_back(call.done);
            }
            Calls::Async(w) => {
                let id = w.insert(call.done);
                out.reserve(8 + copied);
                put_id_header(&mut out.buf, id, len);
            }
        }
        match &form {
            Some(f) => write_octets(f, out),
            None => call.args.write(out),
        }
        call.args.spend();
    }

    fn frame(
        &mut self,
        id: u32,
        buf: &Bytes,
        payload: std::ops::Range<usize>,
    ) -> Result<(), String> {
        if id == EVENT_ID {
            return self.event(buf.slice(payload));
        }
        let Some(w) = self.calls.take(id) else {
            return self.violation(match self.calls {
                Calls::Sync(_) if id != SYNC_REPLY_ID => {
                    format!("frame with id {id}; a sync worker replies with id 1")
                }
                Calls::Sync(_) => "a reply arrived with no call outstanding".to_owned(),
                Calls::Async(_) => {
                    format!("a reply with id {id}, which is not in flight")
                }
            });
        };
        self.answered_one();
        if self.arena.is_some() && arena_ref::starts_shared(&buf[payload.clone()]) {
            return match self.unshare(buf, payload) {
                Ok(o) => {
                    w.complete_octets(o);
                    Ok(())
                }
                Err(detail) => {
                    w.complete(Err(Error::Protocol {
                        pid: self.pid,
                        detail: detail.clone(),
                    }));
                    self.violation(detail)
                }
            };
        }
        match w.complete_payload(self.pid, buf, payload) {
            Ok(()) => Ok(()),
            Err(detail) => self.violation(detail),
        }
    }

    fn take_framed(&mut self, out: &mut SendQueue, live: bool) {
        let mut held = Vec::new();
        if let (Some(ob), Calls::Sync(q)) = (&self.outbox, &mut self.calls) {
            ob.take(out, q, &mut held, live, &self.stats.framed);
        }
        for r in held {
            self.note_held(r);
        }
    }

    fn finish(&mut self, pid: i32, status: Option<ExitStatus>, rest: BytesMut, received: u64) {
        // How it ended, for calls that arrive from now on: recorded before
        // the outbox refuses any, so none of them reads a bare `Closed`.
        let note = self
            .stats
            .note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let status = status.unwrap_or(ExitStatus::StillRunning);
        let _ = self.stats.death.set(Error::NotStarted {
            pid,
            cause: self.ending(pid, status, 0, note.clone()).end_cause(),
        });
        // Calls framed since the driver last looked fail with the others
        // (their regions are released with the others); later ones are
        // refused with how it ended.
        let mut held = Vec::new();
        if let (Some(ob), Calls::Sync(q)) = (&self.outbox, &mut self.calls) {
            q.append(&mut ob.end(&mut held));
        }
        for r in held {
            self.note_held(r);
        }
        // What it computed and had not written yet, and which calls it
        // started at all.
        let started = self.recover(rest, received);
        // The worker is gone: what it held is free (our own views remain).
        if let Some(arena) = self.arena {
            for (region, n) in self.held.drain(..) {
                for _ in 0..n {
                    arena.release(region);
                }
            }
        }
        if self.calls.len() == 0 && self.fatal.is_none() && self.protocol_error.is_none() {
            self.stats.ended.store(true, Ordering::Release);
            if let Some(f) = &self.opts.on_destroy {
                guard("on_destroy", || f());
            }
            if let Some(f) = &self.opts.on_end {
                f(&Ok(()));
            }
            self.end.set(Ok(()));
            return;
        }
        let outstanding = self.calls.outstanding();
        let (kind, msg) = self.fatal.clone().unzip();
        let err = self.ending(pid, status, outstanding, note);
        // Report first: once a call is failed its waiter may carry on (even
        // exit the process), and the report must not be lost or cut short.
        // The end hook too: a pool must know the worker is gone before the
        // failed calls' callbacks resend them.
        self.report(&err);
        self.stats.ended.store(true, Ordering::Release);
        let end = Err(err.clone());
        if let Some(f) = &self.opts.on_end {
            f(&end);
        }
        // Which of the calls left it started: all of them, unless its
        // journal says (sync: the first `started`, in order; async: by
        // their place in the order sent, known within a cycle of ids).
        let marked: Vec<(bool, Waiter)> = match (&mut self.calls, started) {
            (Calls::Async(w), Some(started)) => {
                let all = w.drain_in_order();
                let known = all.iter().all(|(seq, _)| seq.is_some());
                all.into_iter()
                    .map(|(seq, w)| (!known || seq.is_some_and(|s| s < started as u64), w))
                    .collect()
            }
            (calls, started) => calls
                .drain()
                .into_iter()
                .enumerate()
                .map(|(i, w)| (started.is_none_or(|n| i < n), w))
                .collect(),
        };
        // The first call it started was running (a sync worker runs one):
        // it fails with the panic, if that is how the worker ended; the
        // other started ones with how it ended; the rest never started.
        let mut running = Some(if kind.as_deref() == Some("panic") {
            Error::HandlerPanicked {
                pid,
                message: msg.unwrap_or_default(),
            }
        } else {
            err.clone()
        });
        let not_started = Error::NotStarted {
            pid,
            cause: err.end_cause(),
        };
        for (was_started, w) in marked {
            let e = was_started.then(|| running.take().unwrap_or_else(|| err.clone()));
            match (e, w) {
                // A chunk of calls sorts its items out, if the journal says
                // which ran (without it, all of them fail).
                (e, Waiter::Chunk(c)) if started.is_some() => {
                    guard("a reply callback", || c.died(e, not_started.clone()))
                }
                (Some(e), w) => w.complete(Err(e)),
                (None, w) => w.complete(Err(not_started.clone())),
            }
        }
        self.end.set(end);
    }
}
