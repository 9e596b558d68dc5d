//! Per-call timeouts of single RPC handles ([`Options::timeout`]): one
//! thread for the whole process sleeps until the earliest deadline.
//!
//! - Sync workers: if that call is still unanswered, its worker is killed
//!   with [`Error::Timeout`] as the note its running call fails with (a
//!   sync worker runs one call at a time: nothing else would stop it). The
//!   crash journal then tells the calls queued behind it that they never
//!   started.
//! - Async workers: the call's waiter sits in a slot shared with its
//!   reply; at the deadline the driver thread takes it and fails it with
//!   `Timeout`, and a late reply finds the slot empty and is dropped. The
//!   worker and its other calls carry on.
//!
//! A sync worker answers in order, so "call `seq` of a connection is
//! answered" is "the connection's answered count reached `seq`": an entry
//! needs no cancelling when its call finishes in time.
//!
//! [`Options::timeout`]: crate::Options::timeout

use crate::call::Waiter;
use crate::engine::{Command, ConnStats, Engine};
use crate::error::Error;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// A waiter an async call's reply and its timeout race for.
type SlotInner = Mutex<Option<Waiter>>;
type Slot = Arc<SlotInner>;

enum Target {
    /// Sync: call `seq` of the connection (1 = first) of worker `pid`.
    Seq {
        seq: u64,
        stats: Weak<ConnStats>,
        pid: i32,
    },
    /// Async: the call's waiter, completed on `engine`'s driver thread.
    Slot {
        slot: Weak<SlotInner>,
        engine: &'static Engine,
    },
}

struct Entry {
    at: Instant,
    target: Target,
    after: Duration,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.at.cmp(&o.at)
    }
}

struct Watch {
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    cond: Condvar,
}

fn watch() -> &'static Watch {
    static W: OnceLock<&'static Watch> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watch = Box::leak(Box::new(Watch {
            heap: Mutex::new(BinaryHeap::new()),
            cond: Condvar::new(),
        }));
        // If the thread cannot start, deadlines are not enforced; calls
        // still complete (the process is in trouble anyway).
        let _ = std::thread::Builder::new()
            .name("forkrpc-deadlines".into())
            .spawn(move || run(w));
        w
    })
}

/// Call `seq` of the connection `stats` (worker `pid`) must be answered
/// within `after` from now, or its worker is killed.
pub(crate) fn watch_call(stats: Weak<ConnStats>, pid: i32, seq: u64, after: Duration) {
    push(Entry {
        at: Instant::now() + after,
        target: Target::Seq { seq, stats, pid },
        after,
    })
}

/// An async call's waiter, put in a slot its reply takes it from; at
/// `after` from now, if it is still there, it fails with `Timeout`.
pub(crate) fn timed(done: Waiter, engine: &'static Engine, after: Duration) -> Waiter {
    let raw = done.wants_raw();
    let slot: Slot = Arc::new(Mutex::new(Some(done)));
    push(Entry {
        at: Instant::now() + after,
        target: Target::Slot {
            slot: Arc::downgrade(&slot),
            engine,
        },
        after,
    });
    Waiter::relay(raw, move |r| {
        let w = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = w {
            w.complete_outcome(r)
        }
    })
}

fn push(e: Entry) {
    let w = watch();
    let mut h = w.heap.lock().unwrap_or_else(|p| p.into_inner());
    let earliest = h.peek().is_none_or(|Reverse(f)| e.at < f.at);
    h.push(Reverse(e));
    drop(h);
    if earliest {
        w.cond.notify_one();
    }
}

fn run(w: &'static Watch) {
    let mut h = w.heap.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let now = Instant::now();
        match h.peek() {
            None => h = w.cond.wait(h).unwrap_or_else(|p| p.into_inner()),
            Some(Reverse(e)) if e.at > now => {
                let d = e.at - now;
                h = w
                    .cond
                    .wait_timeout(h, d)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(_) => {
                let Reverse(e) = h.pop().unwrap();
                drop(h);
                expire(e);
                h = w.heap.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// The deadline of entry `e` passed: if its call is still unanswered,
/// kill its worker (sync) or fail it (async).
fn expire(e: Entry) {
    let (seq, stats, pid) = match e.target {
        Target::Seq { seq, stats, pid } => (seq, stats, pid),
        Target::Slot { slot, engine } => {
            if slot.upgrade().is_some() {
                let after = e.after;
                engine.push(Command::Run(Box::new(move || {
                    let Some(slot) = slot.upgrade() else { return };
                    let w = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(w) = w {
                        w.complete(Err(Error::Timeout { after }))
                    }
                })));
            }
            return;
        }
    };
    let Some(stats) = stats.upgrade() else {
        return; // the handle is gone
    };
    if stats.ended.load(Ordering::Acquire) || stats.answered.load(Ordering::Relaxed) >= seq {
        return;
    }
    {
        let mut note = stats.note.lock().unwrap_or_else(|p| p.into_inner());
        if note.is_some() {
            return; // killed already, for another reason
        }
        *note = Some(Error::Timeout { after: e.after });
    }
    crate::process::kill(pid);
}
