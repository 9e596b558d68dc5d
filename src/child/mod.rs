//! What runs in a worker: the backends, and the child-side API
//! ([`event`]). Depends on the wire module, never on the parent engine.

pub(crate) mod asynchronous;
pub(crate) mod done;
pub(crate) mod out;
pub(crate) mod panics;
pub(crate) mod registry;
pub(crate) mod runtime;
pub(crate) mod sync;

use crate::octets;
use crate::serial::Codec;
use crate::sys::{self, exit_now};
use crate::wire::chunk;
use crate::wire::frame::EVENT_ID;
use crate::wire::Octets;
use crate::wire::{arena_ref, WireError, FATAL_TAG, RETIRE_TAG};
use bytes::Bytes;
pub(crate) use out::{Out, Wake, FLUSH_AT, OUT};
pub(crate) use panics::{capture_panics, take_panic_message};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A chunk's results so far are sent at least this often (see
/// [`run_chunk`]).
const PART_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Exit code of a worker whose handler (or init function) panicked.
pub const PANIC_EXIT_CODE: i32 = 101;
/// Exit code of a worker that received a malformed request.
pub const PROTOCOL_EXIT_CODE: i32 = 3;

/// The strings a request stands for: its own, or for a shared request
/// (see [`arena_ref`]) views of the parent's arena.
pub(crate) fn unshare(args: Octets) -> Result<Octets, WireError> {
    if crate::arena::worker::mapped() && arena_ref::is_shared(&args) {
        arena_ref::decode(&args, crate::arena::worker::view)
    } else {
        Ok(args)
    }
}

/// A typed handler's request payload: a big one is read where it lies in
/// the parent's arena; octets sent to it in the shared form are encoded
/// back into plain octets, which it reads as its codec's bytes.
pub(crate) fn unshare_raw(payload: Bytes) -> Result<Bytes, WireError> {
    if !(crate::arena::worker::mapped() && arena_ref::starts_shared(&payload)) {
        return Ok(payload);
    }
    // The tag is there; a payload that still is not octets is the codec's.
    let Ok(args) = Octets::decode(payload.clone()) else {
        return Ok(payload);
    };
    match arena_ref::decode_frozen(&args, crate::arena::worker::view)? {
        Some(frozen) => Ok(frozen),
        None => Ok(unshare(args)?.to_bytes()),
    }
}

thread_local! {
    /// Where typed handlers freeze their replies, kept from call to call.
    static REPLY: std::cell::Cell<bytes::BytesMut> = std::cell::Cell::new(bytes::BytesMut::new());
}

/// Runs `f` with this thread's (emptied) reply buffer: a typed reply is
/// frozen there and queued from there, so no buffer is allocated per reply.
/// A panic in `f` leaves a fresh buffer for the next call.
pub(crate) fn with_reply_buffer<R>(f: impl FnOnce(&mut bytes::BytesMut) -> R) -> R {
    let mut out = REPLY.take();
    out.clear();
    let r = f(&mut out);
    REPLY.set(out);
    r
}

/// Sends an event to the parent's `on_event`: progress, logs, anything.
/// Events and replies reach the parent in exactly the order they were made.
///
/// In the async backend, call it on the worker's runtime thread (from a
/// handler or a task it spawned); other threads have no connection.
///
/// Returns false (and sends nothing) outside a worker, or if the event is
/// larger than a frame can carry.
///
/// ```
/// // In the parent process there is no worker connection:
/// assert!(!forkrpc::event(forkrpc::octets!["progress", "50%"]));
/// ```
pub fn event(args: Octets) -> bool {
    queue_event(|o| o.put_frame(EVENT_ID, &args))
}

/// Queues an event frame with `put`, then wakes the async writer, or
/// writes at once when no further request waits to be batched with it.
fn queue_event(put: impl FnOnce(&mut Out) -> bool) -> bool {
    OUT.with_borrow_mut(|o| match o {
        Some(o) => {
            // Results of a chunk's earlier items go first: the parent sees
            // replies and events in the order they were made.
            o.put_part();
            let ok = put(o);
            crate::journal::worker::sync_out(&o.buf);
            match &o.wake {
                Some(st) => st.output_queued(),
                None if o.immediate || o.buf.len() >= FLUSH_AT => o.flush(),
                None => {}
            }
            ok
        }
        None => false,
    })
}

/// Sends a typed event, frozen with `codec`, to the parent's
/// [`Options::on_event_with`](crate::Options::on_event_with). Same rules
/// as [`event`]; returns false if it could not be sent (or frozen).
///
/// ```
/// let progress = ("progress".to_owned(), 50);
/// assert!(!forkrpc::event_with(&forkrpc::serial::Json, &progress));
/// ```
pub fn event_with<T, C: Codec<T>>(codec: &C, value: &T) -> bool {
    let mut buf = bytes::BytesMut::new();
    if codec
        .freeze(value, &mut buf, crate::wire::frame::ID_HEADER)
        .is_err()
    {
        return false;
    }
    queue_event(|o| o.put_raw(EVENT_ID, &buf))
}

/// Asks the pool this worker belongs to for retirement: it sends the worker
/// no new jobs, the worker finishes the ones it has, then exits and is
/// replaced as the pool's rules say (AnyEvent::Fork::Pool's `retire`).
/// Outside a pool worker it is an ordinary event; outside a worker it
/// does nothing and returns false.
///
/// ```
/// assert!(!forkrpc::retire()); // not in a worker
/// ```
pub fn retire() -> bool {
    event(octets![RETIRE_TAG])
}

/// Runs a chunk request (see [`CHUNK_TAG`](crate::wire::CHUNK_TAG)) item
/// by item and returns the chunk reply. A panic stops the chunk: that item
/// reports it, later ones are not run, and its message is returned so the
/// sync backend can exit after sending the reply. Results done so far go
/// out as a part before any event, and every [`PART_EVERY`] while the
/// chunk runs.
pub(crate) fn run_chunk(
    fd: RawFd,
    req: &Octets,
    handler: &crate::child::registry::SyncHandler,
) -> (Octets, Option<String>) {
    let n = match chunk::check(req) {
        Ok(n) => n,
        Err(e) => fatal(
            fd,
            "protocol",
            format!("malformed chunk request: {e}"),
            PROTOCOL_EXIT_CODE,
        ),
    };
    let blob = &req[1];
    // An echo's results take what its requests took, plus a status byte.
    let room = blob.len() + n;
    // The results wait in `OUT` so that an event from a handler can send
    // those of earlier items before itself (see `queue_event`). Each call
    // of `with_part` writes one item's result.
    let with_part = |f: &mut dyn FnMut(&mut chunk::ReplyWriter)| {
        OUT.with_borrow_mut(|o| {
            if let Some(o) = o.as_mut() {
                o.part_results += 1;
                f(o.part
                    .get_or_insert_with(|| chunk::ReplyWriter::with_capacity(room)))
            }
        });
    };
    OUT.with_borrow_mut(|o| {
        if let Some(o) = o.as_mut() {
            o.part_results = 0;
        }
    });
    let mut panicked: Option<String> = None;
    let mut sent_at = sys::coarse_now();
    let mut pos = 0;
    while pos < blob.len() {
        // Checked above: neither can fail.
        let Ok(range) = chunk::next_field(blob, &mut pos) else {
            break;
        };
        if panicked.is_some() {
            with_part(&mut |p| p.not_run());
            continue;
        }
        // Should the worker die in this item, the parent learns which
        // one (the results so far number the items before it), and gets
        // the results before it.
        OUT.with_borrow(|o| {
            if let Some(o) = o {
                let part = o.part.as_ref().map_or(&[][..], |p| p.bytes());
                crate::journal::worker::item_started(o.part_results, &o.buf, part);
            }
        });
        // The item is decoded, run and its result written inside the
        // guard: nothing the size of a result moves through the unwind
        // boundary (those moves were the worker's main cost per item).
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let Ok(args) = Octets::decode_in(blob, range) else {
                return with_part(&mut |p| p.error("malformed arguments"));
            };
            match handler(args) {
                Ok(r) => with_part(&mut |p| p.reply(&r)),
                Err(m) => with_part(&mut |p| p.error(&m)),
            }
        }));
        if ran.is_err() {
            let m = take_panic_message();
            with_part(&mut |p| p.panic(&m));
            panicked = Some(m);
            continue;
        }
        // Results of slow calls go out as they come, not all at the end.
        let now = sys::coarse_now();
        if now.saturating_sub(sent_at) >= PART_EVERY {
            sent_at = now;
            OUT.with_borrow_mut(|o| {
                if let Some(o) = o.as_mut() {
                    if o.put_part() {
                        o.flush();
                    }
                }
            });
        }
    }
    let out = OUT
        .with_borrow_mut(|o| o.as_mut().and_then(|o| o.part.take()))
        .unwrap_or_default();
    (out.finish(), panicked)
}

/// Reports a fatal condition to the parent as a tagged event, then exits.
pub(crate) fn fatal(fd: RawFd, kind: &str, message: String, code: i32) -> ! {
    // The async backend's socket is non-blocking; this last write blocks.
    if let Ok(flags) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL) {
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags));
    }
    OUT.with_borrow_mut(|o| {
        let mut out = o.take().unwrap_or(Out {
            fd,
            buf: Vec::new(),
            immediate: true,
            wake: None,
            part: None,
            part_results: 0,
        });
        out.put_frame(EVENT_ID, &octets![FATAL_TAG, kind.to_owned(), message]);
        out.flush();
    });
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
    exit_now(code)
}

/// Runs an init function; a panic is reported and ends the worker.
pub(crate) fn run_init(fd: RawFd, f: impl FnOnce()) {
    capture_panics();
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        fatal(fd, "init-panic", take_panic_message(), PANIC_EXIT_CODE);
    }
}

/// The bench baseline's child: echoes bytes back, no framing, one read and
/// one write per batch.
pub(crate) fn raw_echo(sock: OwnedFd) -> i32 {
    let fd = sock.as_raw_fd();
    let mut buf = bytes::BytesMut::with_capacity(256 * 1024);
    loop {
        buf.clear();
        match sys::read_into(fd, &mut buf, 256 * 1024) {
            Ok(0) | Err(_) => return 0,
            Ok(_) => {
                if sys::send_all(fd, &buf).is_err() {
                    return 0;
                }
            }
        }
    }
}
