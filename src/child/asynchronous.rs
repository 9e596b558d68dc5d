//! The async backend: many calls at once in one worker, on one thread.
//!
//! Requests carry ids (`NN/a*`); each starts its handler as soon as it is
//! read (up to the concurrency limit), and each reply carries its
//! request's id, in whatever order the handlers finish. Replies and events
//! go into one output buffer in the order they are made, and one writer
//! task sends it, so the parent sees them in exactly that order.
//!
//! Bounds:
//! - at most `limit` calls run at once (default [`DEFAULT_CONCURRENCY`]);
//!   further requests stay unread in the socket, so a flood of requests
//!   pushes back on the parent instead of starting unbounded work;
//! - while [`OUT_HIGH`] bytes or more of output wait for a slow parent, no
//!   new call starts, so the output buffer holds at most `OUT_HIGH` plus
//!   what the calls already running produce.
//!
//! Failures: a handler that panics, returns an error, or drops its [`Done`]
//! without replying fails that call (an error note in an event frame, which
//! leaves the frame format unchanged) and the worker carries on. After the
//! parent shuts its side, the worker finishes every call it started,
//! writes every reply, then exits.

use super::done::Done;
use super::runtime;
use super::{capture_panics, Out, OUT, PROTOCOL_EXIT_CODE};
use crate::child::registry::Handler;
use crate::octets;
use crate::sys::exit_now;
use crate::wire::frame::{read_want, split_id_frame, EVENT_ID, ID_HEADER};
use crate::wire::Octets;
use crate::wire::{Decoded, FATAL_TAG};
use bytes::BytesMut;
use std::cell::Cell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

/// Calls one async worker runs at once unless
/// [`Options::concurrency`](crate::Options::concurrency) says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 1024;
/// Output waiting for the parent beyond which no new call starts.
pub const OUT_HIGH: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// Shared by the reader, the writer and every [`Done`]: counts and wake-ups.
pub(crate) struct State {
    in_flight: Cell<usize>,
    limit: usize,
    /// Bytes handed to the socket by the writer and not yet sent.
    writing: Cell<usize>,
    finishing: Cell<bool>,
    /// Output was queued (see [`State::output_queued`]).
    wake_writer: Notify,
    /// The writer has been woken and has not looked at the buffer since.
    writer_woken: Cell<bool>,
    /// A call finished with the limit reached, or the last one finished.
    slot: Notify,
    /// The writer sent a chunk.
    drained: Notify,
}

impl State {
    fn call_done(&self) {
        let n = self.in_flight.get() - 1;
        self.in_flight.set(n);
        if n + 1 == self.limit || n == 0 {
            self.slot.notify_one();
        }
        self.output_queued();
    }

    /// Wakes the writer once per batch of output, not once per frame.
    pub(crate) fn output_queued(&self) {
        if !self.writer_woken.replace(true) {
            self.wake_writer.notify_one();
        }
    }

    fn backlog(&self) -> usize {
        self.writing.get() + OUT.with_borrow(|o| o.as_ref().map_or(0, |o| o.buf.len()))
    }
}

impl super::Wake for State {
    fn output_queued(&self) {
        State::output_queued(self)
    }
    fn call_done(&self) {
        State::call_done(self)
    }
}

/// Serves requests on `sock` until the parent shuts its side and every
/// call is done; never returns.
/// `uring` asks for tokio-uring (the fallback still applies).
pub(crate) fn serve(sock: OwnedFd, handler: Handler, limit: usize, uring: bool) -> ! {
    capture_panics();
    let fd = sock.as_raw_fd();
    let st = Rc::new(State {
        in_flight: Cell::new(0),
        limit: limit.max(1),
        writing: Cell::new(0),
        finishing: Cell::new(false),
        wake_writer: Notify::new(),
        writer_woken: Cell::new(false),
        slot: Notify::new(),
        drained: Notify::new(),
    });
    OUT.with_borrow_mut(|o| {
        *o = Some(Out {
            fd,
            buf: Vec::with_capacity(READ_CHUNK),
            immediate: false,
            wake: Some(st.clone() as Rc<dyn super::Wake>),
            part: None,
            part_results: 0,
        })
    });
    crate::journal::worker::async_output();
    let code = match runtime::block_on(uring, run(sock, handler, st)) {
        Ok(code) => code,
        Err(e) => super::fatal(
            fd,
            "start",
            format!("cannot start the async runtime: {e}"),
            super::PANIC_EXIT_CODE,
        ),
    };
    // Every reply is with the kernel and the write side is shut; skip the
    // runtime's teardown (nothing is left to run).
    exit_now(code)
}

async fn run(sock: OwnedFd, handler: Handler, st: Rc<State>) -> i32 {
    let fd = sock.as_raw_fd();
    let stream = std::os::unix::net::UnixStream::from(sock);
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream));
    let stream = match stream {
        Ok(s) => s,
        Err(e) => super::fatal(
            fd,
            "start",
            format!("cannot register the socket with the runtime: {e}"),
            super::PANIC_EXIT_CODE,
        ),
    };
    let (mut rd, wr) = stream.into_split();
    let writer = tokio::task::spawn_local(write_loop(wr, st.clone()));
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut code = 0;
    'read: loop {
        let want = loop {
            let frame = match split_id_frame(&mut inbuf) {
                Decoded::Frame(f) => f,
                Decoded::Incomplete { needed } => break read_want(needed, &inbuf, READ_CHUNK),
            };
            let args = match (frame.id, &handler) {
                (0, _) => Err("request with id 0 (ids start at 1)".to_owned()),
                (_, Handler::Raw(_) | Handler::RawAsync(_)) => super::unshare_raw(frame.payload)
                    .map(Request::Raw)
                    .map_err(|e| format!("malformed request {}: {e}", frame.id)),
                (_, _) => Octets::decode(frame.payload)
                    .and_then(super::unshare)
                    .map(Request::Octets)
                    .map_err(|e| format!("malformed request {}: {e}", frame.id)),
            };
            let args = match args {
                Ok(a) => a,
                Err(msg) => {
                    OUT.with_borrow_mut(|o| {
                        let o = o.as_mut().unwrap();
                        o.put_frame(EVENT_ID, &octets![FATAL_TAG, "protocol", msg]);
                    });
                    code = PROTOCOL_EXIT_CODE;
                    break 'read;
                }
            };
            while st.in_flight.get() >= st.limit {
                st.slot.notified().await;
            }
            while st.backlog() >= OUT_HIGH {
                st.output_queued();
                st.drained.notified().await;
            }
            st.in_flight.set(st.in_flight.get() + 1);
            // Requests start in the order they were sent: the parent
            // learns from this count which ones never started.
            crate::journal::worker::request_started();
            start(&handler, Done::new(frame.id), args);
        };
        inbuf.reserve(want);
        match rd.read_buf(&mut inbuf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => exit_now(0), // the parent is gone
        }
    }
    if code == 0 {
        while st.in_flight.get() > 0 {
            st.slot.notified().await;
        }
    }
    st.finishing.set(true);
    st.writer_woken.set(false);
    st.output_queued();
    let _ = writer.await;
    code
}

/// A request as its handler takes it.
enum Request {
    Octets(Octets),
    /// A typed handler's payload (an 8-byte `NN` header preceded it).
    Raw(bytes::Bytes),
}

/// Starts one call. A panic in the handler drops its `Done`, which fails
/// the call; the worker carries on.
fn start(handler: &Handler, done: Done, req: Request) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match (handler, req) {
        (Handler::Async(h), Request::Octets(args)) => h(done, args),
        (Handler::Sync(h), Request::Octets(args)) => done.reply(h(args)),
        (Handler::Raw(h), Request::Raw(p)) => super::with_reply_buffer(|out| {
            let r = h(p, ID_HEADER, out);
            done.reply_raw(r.map(|()| &out[..]))
        }),
        (Handler::RawAsync(h), Request::Raw(p)) => h(done, p, ID_HEADER),
        _ => unreachable!("requests are decoded for their handler's kind"),
    }));
}

/// Sends the output buffer whenever something is queued; double-buffered,
/// so handlers keep appending while a chunk is on its way.
async fn write_loop(mut wr: OwnedWriteHalf, st: Rc<State>) {
    let mut chunk = Vec::with_capacity(READ_CHUNK);
    loop {
        // Cleared before looking: output queued from now on wakes us again.
        st.writer_woken.set(false);
        OUT.with_borrow_mut(|o| std::mem::swap(&mut o.as_mut().unwrap().buf, &mut chunk));
        if chunk.is_empty() {
            if st.finishing.get() {
                break;
            }
            st.wake_writer.notified().await;
            continue;
        }
        // The journal's mirror follows: what is being sent comes first.
        // (An empty swap changes nothing it holds.)
        crate::journal::worker::out_swapped(&chunk);
        st.writing.set(chunk.len());
        // The journal follows the write: should the worker die in the
        // middle, the parent knows where the stream stops.
        let mut sent = 0;
        while sent < chunk.len() {
            match wr.write(&chunk[sent..]).await {
                Ok(n) if n > 0 => {
                    sent += n;
                    crate::journal::worker::out_written(n);
                }
                // The parent is gone: nobody wants the results.
                _ => exit_now(0),
            }
        }
        st.writing.set(0);
        chunk.clear();
        st.drained.notify_one();
    }
    // Dropping the write half shuts the socket's write side: the parent
    // reads EOF after the last reply.
    drop(wr);
}
