//! [`Done`], the reply callback of an async call, and [`IntoReply`], what
//! a handler may return: both queue the reply in the worker's output.

use super::out::OUT;
use super::panics::take_panic_message;
use crate::wire::Octets;
use std::marker::PhantomData;
use std::rc::Rc;

/// What a handler may return: the reply, or an error for this call.
///
/// ```
/// use forkrpc::{octets, IntoReply};
/// assert_eq!(octets!["x"].into_reply(), Ok(octets!["x"]));
/// let failed: Result<forkrpc::Octets, std::io::Error> =
///     Err(std::io::Error::other("disk full"));
/// assert_eq!(failed.into_reply(), Err("disk full".to_owned()));
/// ```
pub trait IntoReply {
    /// The reply, or the error message.
    fn into_reply(self) -> Result<Octets, String>;
}

impl IntoReply for Octets {
    fn into_reply(self) -> Result<Octets, String> {
        Ok(self)
    }
}

impl<E: std::fmt::Display> IntoReply for Result<Octets, E> {
    fn into_reply(self) -> Result<Octets, String> {
        self.map_err(|e| e.to_string())
    }
}

/// The reply callback of one async call (`$done` in Perl).
///
/// Call [`Done::reply`] once, now or later (from a task on the worker's
/// runtime): the reply goes to the parent and the call counts as finished.
/// It cannot leave the worker's thread (it is not `Send`). Dropping it
/// without replying fails the call with
/// [`Error::Handler`](crate::Error::Handler), or with
/// [`Error::HandlerPanicked`](crate::Error::HandlerPanicked) when the drop
/// comes from a panic. A handler that keeps it forever keeps the call, and
/// so the worker, alive: [`Rpc::pending`](crate::Rpc::pending) in the
/// parent shows such calls.
pub struct Done {
    id: u32,
    _local: PhantomData<Rc<()>>,
}

impl Done {
    pub(crate) fn new(id: u32) -> Done {
        Done {
            id,
            _local: PhantomData,
        }
    }

    /// Sends the reply (or, for an `Err`, fails the call with that message).
    pub fn reply(self, reply: impl IntoReply) {
        let id = self.id;
        std::mem::forget(self);
        complete(id, reply.into_reply().map_err(|m| ("error", m)));
    }

    /// Sends a frozen reply (typed handlers), or fails the call.
    pub(crate) fn reply_raw(self, reply: Result<&[u8], String>) {
        let id = self.id;
        std::mem::forget(self);
        OUT.with(|cell| {
            let Ok(mut o) = cell.try_borrow_mut() else {
                return;
            };
            let Some(o) = o.as_mut() else { return };
            o.put_raw_reply(id, reply.map_err(|m| ("error", m)));
            o.put_releases();
            // Mirrored before the handler goes on: should it crash next,
            // this reply still reaches the parent.
            crate::journal::worker::sync_out(&o.buf);
            if let Some(st) = o.wake.clone() {
                st.call_done();
            }
        })
    }

    /// Fails the call with [`Error::Handler`](crate::Error::Handler).
    pub fn fail(self, message: impl std::fmt::Display) {
        self.reply(Err::<Octets, _>(message))
    }

    /// The request's id on the wire.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        let err = if std::thread::panicking() {
            ("panic", take_panic_message())
        } else {
            (
                "dropped",
                "the handler dropped its done callback without replying".to_owned(),
            )
        };
        complete(self.id, Err(err));
    }
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Done({})", self.id)
    }
}

/// Queues the reply (or error note) of call `id` and counts the call done.
fn complete(id: u32, r: Result<Octets, (&str, String)>) {
    OUT.with(|cell| {
        // A drop during a panic inside `event` finds the buffer borrowed:
        // the note is lost then, but nothing aborts.
        let Ok(mut o) = cell.try_borrow_mut() else {
            return;
        };
        let Some(o) = o.as_mut() else { return };
        o.put_reply(id, r);
        o.put_releases();
        // Mirrored before the handler goes on: should it crash next, this
        // reply still reaches the parent.
        crate::journal::worker::sync_out(&o.buf);
        if let Some(st) = o.wake.clone() {
            st.call_done();
        }
    })
}
