//! The worker's output buffer: replies and events queued for the parent,
//! written by the sync backend itself or by the async backend's writer
//! (which [`Wake`] stands for, so this file knows no backend).

use crate::octets;
use crate::sys::{self, exit_now};
use crate::wire::chunk;
use crate::wire::frame::{put_id_header, EVENT_ID, MAX_PAYLOAD};
use crate::wire::Octets;
use crate::wire::{arena_ref, ERROR_TAG};
use bytes::Bytes;
use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;

/// Output is written once this much is buffered (sync backend), even
/// mid-chunk.
pub(crate) const FLUSH_AT: usize = 256 * 1024;

/// The async backend's writer, as the output buffer wakes it.
pub(crate) trait Wake {
    /// Output was queued: wake the writer (once per batch).
    fn output_queued(&self);
    /// A call finished (its reply is queued).
    fn call_done(&self);
}

thread_local! {
    pub(crate) static OUT: RefCell<Option<Out>> = const { RefCell::new(None) };
}

/// The worker's output buffer, reachable from [`event`](crate::event) inside a handler.
pub(crate) struct Out {
    pub fd: RawFd,
    pub buf: Vec<u8>,
    /// Write events at once (no further request is waiting to be batched
    /// with them), so progress reports of a long call are not held back.
    pub immediate: bool,
    /// Async backend: wake its writer instead of writing here.
    pub wake: Option<Rc<dyn Wake>>,
    /// Results of the chunk being run (sync backend), not yet sent.
    pub part: Option<chunk::ReplyWriter>,
    /// Results of the running chunk written so far (for the journal).
    pub part_results: u64,
}

impl Out {
    pub(crate) fn put_frame(&mut self, id: u32, payload: &Octets) -> bool {
        let len = payload.encoded_len();
        if len > MAX_PAYLOAD {
            return false;
        }
        // The sync backend writes big strings straight from where they lie
        // (for an echo, the receive buffer) instead of copying them here.
        let big = |b: &Bytes| b.len() >= crate::wire::SEND_IN_PLACE;
        if self.wake.is_none() && payload.iter().any(big) {
            put_id_header(&mut self.buf, id, len as u32);
            for b in payload.iter() {
                crate::wire::ber::encode(b.len() as u64, &mut self.buf);
                if big(b) {
                    self.flush();
                    crate::journal::worker::direct_write_started();
                    if sys::send_all(self.fd, b).is_err() {
                        exit_now(0); // the parent went away
                    }
                    crate::journal::worker::direct_write_done(b.len());
                } else {
                    self.buf.extend_from_slice(b);
                }
            }
            return true;
        }
        self.buf.reserve(8 + len as usize);
        put_id_header(&mut self.buf, id, len as u32);
        payload.encode(&mut self.buf);
        true
    }

    /// Queues the results of the running chunk's items done so far as a
    /// part (see [`run_chunk`](super::run_chunk)); false if there are none.
    pub(crate) fn put_part(&mut self) -> bool {
        match self.part.as_mut().filter(|p| !p.is_empty()) {
            Some(p) => {
                let part = p.take_part();
                let ok = self.put_frame(EVENT_ID, &part);
                crate::journal::worker::part_taken(&self.buf, self.part_results);
                ok
            }
            None => false,
        }
    }

    /// Queues the reply of call `id`, or for an error `(kind, message)` an
    /// error note in an event frame that fails that call in the parent.
    pub(crate) fn put_reply(&mut self, id: u32, r: Result<Octets, (&str, String)>) {
        let note = match r {
            Ok(reply) => {
                // Strings that lie in the parent's arena (an echo, a slice
                // of an argument) go back as references.
                let big = |b: &Bytes| b.len() >= crate::arena::SHARE_MIN;
                let in_arena =
                    |b: &Bytes| big(b).then(|| crate::arena::worker::offset_of(b)).flatten();
                let form = match crate::arena::worker::mapped() && reply.iter().any(big) {
                    true => arena_ref::encode(&reply, in_arena),
                    false => None,
                };
                if self.put_frame(id, form.as_ref().unwrap_or(&reply)) {
                    return;
                }
                (
                    "error",
                    format!(
                        "reply of {} bytes exceeds the 4 GiB - 1 frame limit",
                        reply.encoded_len()
                    ),
                )
            }
            Err((kind, msg)) => (kind, msg),
        };
        self.put_frame(
            EVENT_ID,
            &octets![ERROR_TAG, id.to_string(), note.0.to_owned(), note.1],
        );
    }

    /// Queues the release note of arena strings this worker dropped since
    /// the last one, if any (after the replies that named them).
    pub(crate) fn put_releases(&mut self) {
        if let Some(offsets) = crate::arena::worker::take_released() {
            self.put_frame(EVENT_ID, &arena_ref::release_note(&offsets));
        }
    }

    /// Queues a frame whose payload is already frozen.
    pub(crate) fn put_raw(&mut self, id: u32, payload: &[u8]) -> bool {
        if payload.len() as u64 > MAX_PAYLOAD {
            return false;
        }
        put_id_header(&mut self.buf, id, payload.len() as u32);
        // The sync backend writes a big payload from where it lies (for a
        // typed reply, the buffer it was frozen into) instead of copying it.
        if self.wake.is_none() && payload.len() >= crate::wire::SEND_IN_PLACE {
            self.flush();
            crate::journal::worker::direct_write_started();
            if sys::send_all(self.fd, payload).is_err() {
                exit_now(0); // the parent went away
            }
            crate::journal::worker::direct_write_done(payload.len());
            return true;
        }
        self.buf.extend_from_slice(payload);
        true
    }

    /// Queues the reply of a typed call: its frozen payload, or an error
    /// note.
    pub(crate) fn put_raw_reply(&mut self, id: u32, r: Result<&[u8], (&str, String)>) {
        match r {
            Ok(p) if self.put_raw(id, p) => {}
            Ok(p) => self.put_reply(
                id,
                Err((
                    "error",
                    format!(
                        "reply of {} bytes exceeds the 4 GiB - 1 frame limit",
                        p.len()
                    ),
                )),
            ),
            Err(e) => self.put_reply(id, Err(e)),
        }
    }

    /// Writes everything buffered; exits if the parent is gone.
    pub(crate) fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // The journal follows the write: should the worker die in the
        // middle, the parent knows where the stream stops.
        let mut sent = 0;
        while sent < self.buf.len() {
            match sys::send_some(self.fd, &self.buf[sent..]) {
                Ok(n) => {
                    sent += n;
                    crate::journal::worker::out_written(n);
                }
                // The parent went away: nobody wants the results.
                Err(_) => exit_now(0),
            }
        }
        self.buf.clear();
        crate::journal::worker::out_flushed();
    }
}
