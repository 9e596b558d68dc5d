//! Per-call timeouts of single sync RPC handles ([`Options::timeout`]):
//! one thread for the whole process sleeps until the earliest deadline
//! and, if that call is still unanswered, kills its worker with
//! [`Error::Timeout`] as the note its running call fails with. The crash
//! journal then tells the calls queued behind it that they never started.
//!
//! A sync worker answers in order, so "call `seq` of a connection is
//! answered" is "the connection's answered count reached `seq`": an entry
//! needs no cancelling when its call finishes in time.
//!
//! [`Options::timeout`]: crate::Options::timeout

use crate::engine::ConnStats;
use crate::error::Error;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

struct Entry {
    at: Instant,
    /// The call's number on its connection (1 = first).
    seq: u64,
    stats: Weak<ConnStats>,
    pid: i32,
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
    let w = watch();
    let e = Entry {
        at: Instant::now() + after,
        seq,
        stats,
        pid,
        after,
    };
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

/// The deadline of entry `e` passed: kill its worker if the call is still
/// unanswered.
fn expire(e: Entry) {
    let Some(stats) = e.stats.upgrade() else {
        return; // the handle is gone
    };
    if stats.ended.load(Ordering::Acquire) || stats.answered.load(Ordering::Relaxed) >= e.seq {
        return;
    }
    {
        let mut note = stats.note.lock().unwrap_or_else(|p| p.into_inner());
        if note.is_some() {
            return; // killed already, for another reason
        }
        *note = Some(Error::Timeout { after: e.after });
    }
    crate::process::kill(e.pid);
}
