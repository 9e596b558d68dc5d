//! What calls leave behind on the driver thread, freed on a caller's thread.
//!
//! A call's arguments and its reply callback are allocated by the thread
//! that makes the call and used up on the driver thread. Freeing them there
//! is a cross-thread free, which in mimalloc (and glibc) touches the
//! allocating thread's pages: it cost the driver about as much as all the
//! rest of a pipelined echo call, and the driver is what bounds pipelined
//! throughput. So the driver drops spent arguments and callbacks into a
//! bin instead ([`keep`]); before it waits it puts the bin on a shelf
//! ([`Shelf::hand_over`]), and the next caller to queue a command takes
//! the shelf's bins and frees their contents on its own thread
//! ([`Shelf::take`], [`empty`]).
//!
//! What was made on the driver thread itself (a call issued from a reply
//! callback, as in a ping-pong) is freed there at once: that free is local,
//! and keeping it would only trade a warm block for a cold one.
//!
//! The bin holds at most what calls in flight held before they finished,
//! and never for long: a bin that no caller collects within [`IDLE_FREE`]
//! is freed by the driver after all.

use crate::call::payload::Payload;
use crate::error::Result;
use crate::wire::Octets;
use bytes::Bytes;
use smallbox::{space::S2, SmallBox};
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

/// A reply callback for decoded replies: kept inside the call when it
/// captures at most two words (a reference, an `Arc`, a sender), else
/// boxed. An inline one leaves nothing to free once it ran, and its bytes
/// travel to the driver with the call instead of in a block of the
/// caller's heap that the driver must fetch and the caller free.
pub(crate) type Callback = SmallBox<dyn Reply<Result<Octets>>, S2>;
/// A reply callback for undecoded replies (see [`Callback`]).
pub(crate) type RawCallback = SmallBox<dyn Reply<Result<Bytes>>, S2>;

/// Wraps `f` as a [`Callback`] or [`RawCallback`].
macro_rules! callback {
    ($f:expr) => {
        smallbox::smallbox!(Some($f))
    };
}
pub(crate) use callback;

/// Spent arguments and callbacks.
pub(crate) struct Bin {
    payloads: Vec<Payload>,
    callbacks: Vec<Callback>,
    raw: Vec<RawCallback>,
}

impl Bin {
    const fn new() -> Bin {
        Bin {
            payloads: Vec::new(),
            callbacks: Vec::new(),
            raw: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        self.payloads.len() + self.callbacks.len() + self.raw.len()
    }

    fn append(&mut self, other: &mut Bin) {
        self.payloads.append(&mut other.payloads);
        self.callbacks.append(&mut other.callbacks);
        self.raw.append(&mut other.raw);
    }

    /// Frees the contents, keeping the room.
    fn clear(&mut self) {
        self.payloads.clear();
        self.callbacks.clear();
        self.raw.clear();
    }

    /// Whether `other`'s items fit without growing past [`BIN_ITEMS`].
    fn fits(&self, other: &Bin) -> bool {
        self.payloads.len() + other.payloads.len() <= BIN_ITEMS
            && self.callbacks.len() + other.callbacks.len() <= BIN_ITEMS
            && self.raw.len() + other.raw.len() <= BIN_ITEMS
    }

    fn full(&self) -> bool {
        self.payloads.len() == BIN_ITEMS
            || self.callbacks.len() == BIN_ITEMS
            || self.raw.len() == BIN_ITEMS
    }

    /// Grown past [`BIN_ITEMS`]: not kept for reuse, so a burst does not
    /// pin its memory.
    fn roomy(&self) -> bool {
        [
            self.payloads.capacity(),
            self.callbacks.capacity(),
            self.raw.capacity(),
        ]
        .iter()
        .any(|&c| c > BIN_ITEMS)
    }
}

/// A bin of at most this many items joins the last shelved one.
const FEW: usize = 64;
/// A bin holds at most this many items of a kind: the driver then starts
/// another rather than grow one vector by doubling through a backlog of
/// calls (every doubling copies it, onto fresh pages).
const BIN_ITEMS: usize = 1024;
/// How many emptied bins are kept for reuse, on the shelf and on the
/// driver's side each (at most 2 MiB in all).
const SPARES: usize = 16;

/// Where the driver puts its bins and callers take them: kept under the
/// engine's queue lock. Emptied bins come back for reuse, so the driver
/// does not grow new vectors (on fresh pages) for every batch.
#[derive(Default)]
pub(crate) struct Shelf {
    full: Vec<Bin>,
    spare: Vec<Bin>,
}

impl Shelf {
    pub(crate) fn is_empty(&self) -> bool {
        self.full.is_empty()
    }

    /// Driver side: puts this thread's bins on the shelf (if they hold
    /// anything), takes a spare one in place of the current one, and spares
    /// for the bins that fill up before the next hand-over.
    pub(crate) fn hand_over(&mut self) {
        LOCAL.with_borrow_mut(|mine| {
            self.full.append(&mut mine.filled);
            if !mine.bin.is_empty() {
                // A few items (a ping-pong's one call per loop) join the
                // last shelved bin: no new bin per loop, and this one keeps
                // its room.
                match self
                    .full
                    .last_mut()
                    .filter(|l| mine.bin.len() <= FEW && l.fits(&mine.bin))
                {
                    Some(last) => last.append(&mut mine.bin),
                    None => {
                        let spare = (mine.spare.pop())
                            .or_else(|| self.spare.pop())
                            .unwrap_or_default();
                        self.full.push(std::mem::replace(&mut mine.bin, spare));
                    }
                }
            }
            let room = SPARES
                .saturating_sub(mine.spare.len())
                .min(self.spare.len());
            let from = self.spare.len() - room;
            mine.spare.extend(self.spare.drain(from..));
        })
    }

    /// Takes the full bins; free them with [`empty`] once the lock is
    /// released, then give them back with [`Shelf::put_back`].
    pub(crate) fn take(&mut self) -> Option<Vec<Bin>> {
        (!self.full.is_empty()).then(|| std::mem::take(&mut self.full))
    }

    /// Keeps a few emptied bins of modest size for the driver to reuse.
    pub(crate) fn put_back(&mut self, bins: Vec<Bin>) {
        let room = SPARES.saturating_sub(self.spare.len());
        self.spare
            .extend(bins.into_iter().filter(|b| !b.roomy()).take(room));
    }
}

/// Frees what `bins` hold, here, keeping the bins.
pub(crate) fn empty(bins: &mut [Bin]) {
    bins.iter_mut().for_each(Bin::clear);
}

/// The driver thread's leftovers since its last hand-over.
struct Local {
    /// The bin being filled.
    bin: Bin,
    /// Bins filled up since the last hand-over.
    filled: Vec<Bin>,
    /// Emptied bins to fill next.
    spare: Vec<Bin>,
}

thread_local! {
    static LOCAL: RefCell<Local> = const {
        RefCell::new(Local {
            bin: Bin::new(),
            filled: Vec::new(),
            spare: Vec::new(),
        })
    };
}

/// Something a call leaves behind.
pub(crate) enum Spent {
    Payload(Payload),
    Callback(Callback),
    Raw(RawCallback),
}

/// Keeps `s` for a caller to free if this is a driver thread and `s` was
/// made elsewhere; else drops it here (where it was made, or on a thread
/// that may as well free it).
pub(crate) fn keep(s: Spent, made_on_driver: bool) {
    if made_on_driver || !crate::driver_thread::on_driver_thread() {
        return;
    }
    match &s {
        Spent::Callback(c) if !c.is_heap() => return,
        Spent::Raw(c) if !c.is_heap() => return,
        _ => {}
    }
    LOCAL.with_borrow_mut(|l| l.put(s))
}

impl Local {
    fn put(&mut self, s: Spent) {
        if self.bin.full() {
            let next = self.spare.pop().unwrap_or_default();
            let full = std::mem::replace(&mut self.bin, next);
            self.filled.push(full);
        }
        let b = &mut self.bin;
        match s {
            Spent::Payload(p) => b.payloads.push(p),
            Spent::Callback(c) => b.callbacks.push(c),
            Spent::Raw(c) => b.raw.push(c),
        }
    }
}

impl Default for Bin {
    fn default() -> Self {
        Bin::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A callback that was never run, holding a counter of drops.
    fn unrun(drops: &Arc<AtomicUsize>) -> Callback {
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Boxed (a callback held inline is not kept): three words.
        let c = (Counted(drops.clone()), [0usize; 2]);
        let f: Callback = callback!(move |_: Result<Octets>| drop(c));
        assert!(f.is_heap());
        f
    }

    fn fill(n: usize, drops: &Arc<AtomicUsize>) {
        LOCAL.with_borrow_mut(|l| l.bin.callbacks.extend((0..n).map(|_| unrun(drops))));
    }

    #[test]
    fn shelf_hands_over_frees_on_empty_and_reuses_bins() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut shelf = Shelf::default();
        shelf.hand_over();
        assert!(shelf.is_empty(), "an empty bin is not shelved");
        fill(3, &drops);
        shelf.hand_over();
        fill(2, &drops);
        shelf.hand_over();
        fill(FEW + 1, &drops);
        shelf.hand_over();
        let mut bins = shelf.take().expect("bins shelved");
        assert_eq!(
            bins.len(),
            2,
            "a few items join the last bin, many get their own"
        );
        assert_eq!(bins[0].len(), 5);
        assert!(shelf.take().is_none());
        assert_eq!(
            drops.load(Ordering::Relaxed),
            0,
            "nothing freed before empty"
        );
        empty(&mut bins);
        assert_eq!(drops.load(Ordering::Relaxed), FEW + 6);
        let room = bins.iter().map(|b| b.callbacks.capacity()).min().unwrap();
        assert!(room >= 5);
        shelf.put_back(bins);
        // A full bin is shelved and an emptied spare, with its room, takes
        // its place.
        fill(FEW + 1, &drops);
        shelf.hand_over();
        assert!(LOCAL.with_borrow(|l| l.bin.callbacks.capacity()) >= room);
        assert_eq!(shelf.spare.len(), 0, "the other spare went to the driver");
        assert_eq!(LOCAL.with_borrow(|l| l.spare.len()), 1);
        let mut bins = shelf.take().unwrap();
        empty(&mut bins);
        assert_eq!(drops.load(Ordering::Relaxed), 2 * FEW + 7);
    }

    #[test]
    fn small_callbacks_are_held_inline_and_never_kept() {
        let drops = Arc::new(AtomicUsize::new(0));
        let d = drops.clone();
        let mut small: Callback = callback!(move |_: Result<Octets>| {
            d.fetch_add(1, Ordering::Relaxed);
        });
        assert!(!small.is_heap(), "an Arc's worth of captures stays inline");
        small.reply(Ok(Octets::new()));
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        let big = unrun(&drops);
        crate::driver_thread::ON_DRIVER.set(true);
        keep(Spent::Callback(small), false);
        keep(Spent::Callback(big), false);
        crate::driver_thread::ON_DRIVER.set(false);
        LOCAL.with_borrow_mut(|l| {
            assert_eq!(
                l.bin.callbacks.len(),
                1,
                "only the boxed one waits for a caller"
            );
            assert!(l.bin.callbacks[0].is_heap());
            l.bin.clear();
        });
        assert_eq!(drops.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn roomy_bins_and_extra_spares_are_let_go() {
        let mut shelf = Shelf::default();
        let mut roomy = Bin::new();
        roomy.callbacks.reserve(BIN_ITEMS + 1);
        let mut bins = vec![roomy];
        bins.extend((0..SPARES + 2).map(|_| Bin::new()));
        shelf.put_back(bins);
        assert_eq!(shelf.spare.len(), SPARES);
        assert!(shelf.spare.iter().all(|b| !b.roomy()));
    }

    #[test]
    fn a_backlog_fills_bins_of_bounded_size() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut shelf = Shelf::default();
        let n = 2 * BIN_ITEMS + 100;
        LOCAL.with_borrow_mut(|l| {
            for _ in 0..n {
                l.put(Spent::Callback(unrun(&drops)));
            }
            assert_eq!(l.filled.len(), 2);
            assert_eq!(l.bin.len(), 100);
        });
        shelf.hand_over();
        let mut bins = shelf.take().unwrap();
        assert_eq!(
            bins.iter().map(Bin::len).collect::<Vec<_>>(),
            [BIN_ITEMS, BIN_ITEMS, 100]
        );
        assert!(bins.iter().all(|b| b.callbacks.capacity() <= BIN_ITEMS));
        empty(&mut bins);
        assert_eq!(drops.load(Ordering::Relaxed), n);
        // Emptied, they come back: the driver fills them next, no new ones.
        shelf.put_back(bins);
        shelf.hand_over();
        LOCAL.with_borrow_mut(|l| {
            assert_eq!(l.spare.len(), 3);
            for _ in 0..n {
                l.put(Spent::Callback(unrun(&drops)));
            }
            assert_eq!(l.spare.len(), 1, "two spares filled, one taken as the bin");
            assert!(l.filled.iter().all(|b| b.callbacks.capacity() == BIN_ITEMS));
        });
    }
}
