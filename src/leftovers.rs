//! What calls leave behind on the driver thread, freed on a caller's thread.
//!
//! A call's arguments and its reply callback are allocated by the thread
//! that makes the call and used up on the driver thread. Freeing them there
//! is a cross-thread free, which in mimalloc (and glibc) touches the
//! allocating thread's pages: it cost the driver about as much as all the
//! rest of a pipelined echo call, and the driver is what bounds pipelined
//! throughput. So the driver drops spent arguments and callbacks into a
//! bin instead ([`keep`]); once per loop it hands the bin over
//! ([`Bin::hand_over`]), and the next caller to queue a command takes it
//! and frees it on its own thread ([`Bin::collect`]).
//!
//! The bin holds at most what calls in flight held before they finished,
//! and never for long: a bin that no caller collects within [`IDLE_FREE`]
//! is freed by the driver after all.

use crate::error::Result;
use crate::rpc::Payload;
use crate::Octets;
use bytes::Bytes;
use std::cell::RefCell;
use std::time::Duration;

/// A bin left uncollected this long is freed by the driver.
pub(crate) const IDLE_FREE: Duration = Duration::from_millis(50);

/// A reply callback that can be run through `&mut` (so its box outlives the
/// call and can be freed elsewhere); it runs at most once.
pub(crate) trait Reply<T>: Send {
    fn reply(&mut self, r: T);
}

impl<T, F: FnOnce(T) + Send> Reply<T> for Option<F> {
    fn reply(&mut self, r: T) {
        if let Some(f) = self.take() {
            f(r)
        }
    }
}

/// A boxed reply callback for decoded replies.
pub(crate) type Callback = Box<dyn Reply<Result<Octets>>>;
/// A boxed reply callback for undecoded replies.
pub(crate) type RawCallback = Box<dyn Reply<Result<Bytes>>>;

/// Spent arguments and callbacks.
#[derive(Default)]
pub(crate) struct Bin {
    payloads: Vec<Payload>,
    callbacks: Vec<Callback>,
    raw: Vec<RawCallback>,
}

impl Bin {
    pub(crate) fn is_empty(&self) -> bool {
        self.payloads.is_empty() && self.callbacks.is_empty() && self.raw.is_empty()
    }

    fn append(&mut self, other: &mut Bin) {
        self.payloads.append(&mut other.payloads);
        self.callbacks.append(&mut other.callbacks);
        self.raw.append(&mut other.raw);
    }

    /// Driver side: moves this thread's leftovers into `shared` (the bin
    /// callers collect from).
    pub(crate) fn hand_over(shared: &mut Bin) {
        LOCAL.with_borrow_mut(|mine| {
            if shared.is_empty() {
                std::mem::swap(shared, mine);
            } else {
                shared.append(mine);
            }
        })
    }

    /// Caller side: takes the shared bin, to be dropped once the lock
    /// guarding it is released.
    pub(crate) fn collect(shared: &mut Bin) -> Option<Bin> {
        (!shared.is_empty()).then(|| std::mem::take(shared))
    }
}

thread_local! {
    /// The driver thread's leftovers since its last hand-over.
    static LOCAL: RefCell<Bin> = RefCell::new(Bin::default());
}

/// Something a call leaves behind.
pub(crate) enum Spent {
    Payload(Payload),
    Callback(Callback),
    Raw(RawCallback),
}

/// Keeps `s` for a caller to free if this is a driver thread; else drops
/// it here (the thread that allocated it, or one that may as well).
pub(crate) fn keep(s: Spent) {
    if !crate::engine::on_driver_thread() {
        return;
    }
    LOCAL.with_borrow_mut(|b| match s {
        Spent::Payload(p) => b.payloads.push(p),
        Spent::Callback(c) => b.callbacks.push(c),
        Spent::Raw(c) => b.raw.push(c),
    })
}
