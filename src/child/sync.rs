//! The sync backend: one call at a time, in order. Blocking reads of large
//! chunks; every complete request in a chunk is handled in turn; replies and
//! events are coalesced into one write per chunk. No runtime, no threads.

use super::{
    capture_panics, fatal, run_chunk, take_panic_message, unshare, unshare_raw, with_reply_buffer,
    Out, FLUSH_AT, OUT, PANIC_EXIT_CODE, PROTOCOL_EXIT_CODE,
};
use crate::child::registry::{Handler, RawHandler};
use crate::octets;
use crate::sys;
use crate::wire::chunk;
use crate::wire::frame::{len_frames, read_want, EVENT_ID, SYNC_REPLY_ID};
use crate::wire::Octets;
use crate::wire::FATAL_TAG;
use bytes::{Bytes, BytesMut};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

const READ_CHUNK: usize = 64 * 1024;

/// Serves requests on `sock` until the parent shuts its side; returns the
/// exit code.
pub(crate) fn serve(sock: OwnedFd, handler: Handler) -> i32 {
    capture_panics();
    let fd = sock.as_raw_fd();
    OUT.with_borrow_mut(|o| {
        *o = Some(Out {
            fd,
            buf: Vec::with_capacity(READ_CHUNK),
            immediate: false,
            wake: None,
            part: None,
            part_results: 0,
        })
    });
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut want = READ_CHUNK;
    loop {
        match sys::read_into(fd, &mut inbuf, want) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return 0, // parent gone
        }
        // Every complete request is frozen at once and handed out as a
        // slice: one split of the buffer per read, not per request.
        let (end, partial) = len_frames(&inbuf, |_| {});
        let frames = match end {
            0 => Bytes::new(), // a big request still arriving
            _ => inbuf.split_to(end).freeze(),
        };
        want = match partial {
            Some(needed) => read_want(needed, &inbuf, READ_CHUNK),
            None => READ_CHUNK,
        };
        // The last request of the read: its output is written at once.
        len_frames(&frames, |r| {
            request(fd, &handler, &frames, r.clone(), r.end == end)
        });
        OUT.with_borrow_mut(|o| o.as_mut().unwrap().flush());
    }
    OUT.with_borrow_mut(|o| o.as_mut().unwrap().flush());
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
    0
}

/// Runs one request (`range` of `frames`); `last`: no further request is
/// waiting, so events are written at once.
fn request(fd: RawFd, handler: &Handler, frames: &Bytes, range: Range<usize>, last: bool) {
    OUT.with_borrow(|o| crate::journal::worker::frame_started(&o.as_ref().unwrap().buf));
    let handler = match handler {
        Handler::Sync(h) => h,
        Handler::Raw(h) => return typed_call(fd, h, frames.slice(range), last),
        _ => unreachable!("the template refuses async handlers on the sync backend"),
    };
    let args = match Octets::decode_in(frames, range).and_then(unshare) {
        Ok(a) => a,
        Err(e) => fatal(
            fd,
            "protocol",
            format!("malformed request: {e}"),
            PROTOCOL_EXIT_CODE,
        ),
    };
    OUT.with_borrow_mut(|o| o.as_mut().unwrap().immediate = last);
    if chunk::is_chunk(&args) {
        let (reply, panicked) = run_chunk(fd, &args, handler);
        OUT.with_borrow_mut(|o| {
            let o = o.as_mut().unwrap();
            if let Some(m) = &panicked {
                // The note first: the parent stops sending work
                // here before the reply frees a slot.
                o.put_frame(EVENT_ID, &octets![FATAL_TAG, "exit-after-panic", m.clone()]);
            }
            o.put_reply(SYNC_REPLY_ID, Ok(reply));
            o.put_releases();
            if panicked.is_some() || o.buf.len() >= FLUSH_AT {
                o.flush();
            }
        });
        if panicked.is_some() {
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
            sys::exit_now(PANIC_EXIT_CODE);
        }
        return;
    }
    // The reply is written inside the guard: a result moved out through
    // the unwind boundary costs more than the rest of an echo.
    caught(fd, || {
        let reply = handler(args);
        output(|o| o.put_reply(SYNC_REPLY_ID, reply.map_err(|m| ("error", m))))
    });
}

/// One call of a typed handler: its payload thawed, its reply frozen by the
/// handler's codec (a 4-byte `N` header preceded the request).
fn typed_call(fd: RawFd, h: &RawHandler, payload: bytes::Bytes, last: bool) {
    OUT.with_borrow_mut(|o| o.as_mut().unwrap().immediate = last);
    let payload = match unshare_raw(payload) {
        Ok(p) => p,
        Err(e) => fatal(
            fd,
            "protocol",
            format!("malformed request: {e}"),
            PROTOCOL_EXIT_CODE,
        ),
    };
    with_reply_buffer(|out| {
        let r = caught(fd, || h(payload, crate::wire::frame::LEN_HEADER, out));
        output(|o| {
            o.put_raw_reply(
                SYNC_REPLY_ID,
                r.map(|()| &out[..]).map_err(|m| ("error", m)),
            )
        });
    })
}

/// Runs a handler; a panic is reported to the parent and ends the worker.
fn caught<R>(fd: RawFd, f: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => fatal(fd, "panic", take_panic_message(), PANIC_EXIT_CODE),
    }
}

/// Queues output with `put`; writes it once `FLUSH_AT` is buffered.
fn output(put: impl FnOnce(&mut Out)) {
    OUT.with_borrow_mut(|o| {
        let o = o.as_mut().unwrap();
        put(o);
        o.put_releases();
        if o.buf.len() >= FLUSH_AT {
            o.flush();
        }
    });
}
