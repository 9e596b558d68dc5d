//! What callers hand the driver thread (commands) and what it hands back
//! (bins of leftovers to free), with its sleep flag and wake-up eventfd.

use super::protocol::{ConnStats, Protocol};
use crate::call::leftovers::{self, Bin, Shelf};
use crate::call::Call;
use crate::error::ExitStatus;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) enum Command {
    Add {
        id: u64,
        fd: OwnedFd,
        pid: i32,
        proto: Box<dyn Protocol>,
        stats: Arc<ConnStats>,
    },
    Call {
        id: u64,
        call: Call,
    },
    /// Several calls for one connection, in order (a pool's batch).
    Calls {
        id: u64,
        calls: Vec<Call>,
    },
    Close {
        id: u64,
    },
    /// Take the calls framed in the outbox of connection `id`.
    Flush {
        id: u64,
    },
    Exited {
        pid: i32,
        status: ExitStatus,
    },
    /// Run this on the driver thread (a call's timeout completing it, so
    /// that its callback runs where callbacks run).
    Run(Box<dyn FnOnce() + Send>),
}

/// What callers hand the driver (commands) and what it hands back (bins
/// of leftovers), with its sleep flag and the eventfd that wakes it.
pub(crate) struct Mailbox {
    pub(super) queue: Mutex<Queue>,
    /// The queue's shelf holds bins (a hint for [`collect_leftovers`](super::collect_leftovers)).
    pub(super) bin_ready: AtomicBool,
    pub(super) sleeping: AtomicBool,
    pub(super) wake: OwnedFd,
}

/// What callers hand the driver, and what it hands back.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) commands: Vec<Command>,
    /// Spent arguments and callbacks for a caller to free.
    pub(super) shelf: Shelf,
    /// How many times someone took the shelf's bins.
    pub(super) collected: u64,
}

impl Mailbox {
    /// Takes the shelf's bins (under the lock).
    pub(super) fn take_bins(&self, q: &mut Queue) -> Option<Vec<Bin>> {
        let bins = q.shelf.take()?;
        q.collected += 1;
        self.bin_ready.store(false, Ordering::Relaxed);
        Some(bins)
    }

    /// Frees what `bins` hold on this thread (without the lock), then
    /// puts the bins back for reuse.
    pub(super) fn free_bins(&self, bins: Option<Vec<Bin>>) {
        if let Some(mut bins) = bins {
            leftovers::empty(&mut bins);
            self.queue.lock().unwrap().shelf.put_back(bins);
        }
    }
}
