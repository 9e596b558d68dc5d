//! The shared arena: where big byte strings of calls cross to workers
//! without going through the socket. The one place that maps shared memory.
//!
//! The parent keeps one memfd (created on first use, [`CAPACITY`] bytes of
//! address space, pages allocated as touched) mapped read-write. A byte
//! string of at least [`SHARE_MIN`] bytes in an octets call to a worker is
//! copied into a *region* of it on the caller's thread — the only copy on
//! its way — and the request names it by offset and length (see
//! [`wire::arena_ref`](crate::wire::arena_ref)). The worker maps the same memfd
//! read-only and reads the string in place. A reply that returns such a
//! string (an echo, a slice of an argument) names it the same way, so it
//! comes back without a copy either. Compare the socket: the kernel copies
//! a string into its buffers and out again, each way.
//!
//! Lifetimes. A region is written once, by the caller that allocates it,
//! before anyone else can see it; after that nobody writes it. The parent
//! counts who holds it: each `Bytes` of ours that points into it, and each
//! worker it was sent to, until that worker says it dropped every `Bytes`
//! of its own ([`wire::arena_ref`](crate::wire::arena_ref) release notes) or
//! ends. At zero the region is free to be handed out again.
//!
//! Trust. Workers get the memfd sealed against writes (`F_SEAL_FUTURE_WRITE`,
//! Linux 5.1; and against shrinking, which would make our reads fault):
//! they can neither change what we read nor truncate it, so a worker cannot
//! corrupt the parent's memory through the arena. What a worker names is
//! checked against the regions sent to *that* worker. A worker can read
//! every region of the arena, as it could read the parent's data had it
//! been sent to it: the arena is for workers of one program, and can be
//! turned off with `FORKRPC_ARENA=0`.
//!
//! Memory. Touched pages stay allocated for reuse (a fresh page costs more
//! than the copy itself on these machines) below [`RETAIN`] bytes; regions
//! freed above it are given back (`fallocate(PUNCH_HOLE)`). Regions are
//! placed lowest-address first, so one call at a time reuses the same
//! pages. A string that does not fit goes through the socket as usual.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

/// Byte strings at least this long are shared rather than sent. Echoes of
/// one string, one call at a time / 256 in flight, socket against arena:
/// 16 KiB 0.85 / 1.2-1.4 GB/s either way; 64 KiB 2.1-2.4 / 3.7 against
/// 2.1-3.9 / 7.1-7.3; 128 KiB 2.7-3.1 / 2.4-4.9 against 6.0-7.1 / 11.1.
pub(crate) const SHARE_MIN: usize = 64 * 1024;
/// Address space of the arena (pages are allocated only as used).
pub(crate) const CAPACITY: usize = 1 << 30;
/// Freed pages below this offset are kept for reuse.
pub(crate) const RETAIN: usize = 64 << 20;
const PAGE: usize = 4096;

/// The parent's arena.
pub(crate) struct Arena {
    fd: OwnedFd,
    base: usize,
    cap: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Free ranges, start → length; adjacent ones merged.
    free: BTreeMap<usize, usize>,
    /// Regions handed out, start → (length, holders).
    used: BTreeMap<usize, (usize, usize)>,
    /// Freed pages above `RETAIN` go back to the system; false once the
    /// kernel refused (they are then kept for reuse, as those below are).
    punch_holes: bool,
}

/// The parent's arena, made on first use; `None` when shared memory is
/// unavailable (no memfd or seals) or `FORKRPC_ARENA=0` turned it off
/// (`FORKRPC_ARENA=<bytes>` sets its capacity instead of [`CAPACITY`]).
pub(crate) fn arena() -> Option<&'static Arena> {
    ARENA
        .get_or_init(|| {
            let cap = match std::env::var("FORKRPC_ARENA") {
                Ok(v) => v.trim().parse::<usize>().unwrap_or_else(|_| {
                    eprintln!(
                        "forkrpc: FORKRPC_ARENA={v} is not a number of bytes; using {CAPACITY}"
                    );
                    CAPACITY
                }),
                Err(_) => CAPACITY,
            };
            if cap == 0 {
                return None;
            }
            Arena::new(cap.checked_next_multiple_of(PAGE)?)
                .inspect_err(|e| {
                    eprintln!("forkrpc: no shared arena ({e}); big strings go through the socket")
                })
                .ok()
        })
        .as_ref()
}

/// What the shared arena holds now (see [`arena_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaStats {
    /// Strings (regions) in use: held by a `Bytes` of this process or not
    /// yet released by a worker.
    pub regions: usize,
    /// Bytes those regions take (whole pages).
    pub bytes: usize,
    /// Address space of the arena.
    pub capacity: usize,
}

/// What the parent's shared arena holds: big strings of calls to workers
/// are copied there once and read by the workers in place, and
/// replies that return them (an echo) come back without a copy. `None`
/// before the first worker starts, or without an arena
/// (`FORKRPC_ARENA=0`, or no memfd seals on this kernel).
///
/// ```no_run
/// let rpc = forkrpc::Fork::new()?.run(forkrpc::ECHO, forkrpc::Options::default())?;
/// let big = bytes::Bytes::from(vec![7u8; 16 << 20]);
/// let reply = rpc.call_blocking(forkrpc::octets![big])?;
/// assert!(forkrpc::in_shared_arena(&reply[0])); // came back by reference
/// assert!(forkrpc::arena_stats().unwrap().regions >= 1);
/// # Ok::<(), forkrpc::Error>(())
/// ```
pub fn arena_stats() -> Option<ArenaStats> {
    static_arena().map(|a| {
        let st = a.state();
        ArenaStats {
            regions: st.used.len(),
            bytes: st.used.values().map(|(size, _)| size).sum(),
            capacity: a.cap,
        }
    })
}

/// Whether `b` lies in the shared arena: in the parent, a string copied
/// there or a reply that came back by reference; in a worker, an
/// argument it reads in place.
pub fn in_shared_arena(b: &[u8]) -> bool {
    static_arena().is_some_and(|a| a.offset_of(b).is_some()) || worker::offset_of(b).is_some()
}

/// The arena if it was made already (never makes it).
fn static_arena() -> Option<&'static Arena> {
    ARENA.get().and_then(Option::as_ref)
}

static ARENA: OnceLock<Option<Arena>> = OnceLock::new();

impl Arena {
    fn new(cap: usize) -> std::io::Result<Arena> {
        let fd = crate::sys::memfd(c"forkrpc-arena", cap, true)?;
        // The memfd is `cap` long and cannot shrink once sealed below; the
        // mapping is never unmapped, so pointers into it stay valid for
        // the life of the process.
        let base = crate::sys::map_shared(&fd, cap)?;
        // Workers forked straight from this process (no `init()`) must not
        // inherit a writable mapping; without the advice, or the seals, a
        // worker could share our writable view: no arena then (strings go
        // through the socket).
        let ready =
            crate::sys::dont_fork(base, cap).and_then(|()| crate::sys::seal_size_and_writes(&fd));
        if let Err(e) = ready {
            // SAFETY: the mapping made above, not yet handed to anyone.
            unsafe { crate::sys::unmap(base, cap) };
            return Err(e);
        }
        Ok(Arena {
            fd,
            base: base as usize,
            cap,
            state: Mutex::new(State {
                free: BTreeMap::from([(0, cap)]),
                used: BTreeMap::new(),
                punch_holes: true,
            }),
        })
    }

    /// The memfd, for a worker to map (sealed: read-only for everyone but
    /// our own mapping).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The offset of `b` if it lies in the arena.
    pub(crate) fn offset_of(&self, b: &[u8]) -> Option<usize> {
        let p = b.as_ptr() as usize;
        (p >= self.base && p + b.len() <= self.base + self.cap).then(|| p - self.base)
    }

    /// A copy of `b` in a new region, held by the returned `Bytes`; `None`
    /// if the arena has no room for it.
    pub(crate) fn share(&'static self, b: &[u8]) -> Option<Bytes> {
        self.share_at(b, 0)
    }

    /// As [`Arena::share`], placing `b` `skip` bytes into its region (page
    /// aligned), e.g. where a frozen payload expects to start after its
    /// frame header.
    pub(crate) fn share_at(&'static self, b: &[u8], skip: usize) -> Option<Bytes> {
        let size = (skip + b.len()).checked_next_multiple_of(PAGE)?.max(PAGE);
        let start = {
            let mut st = self.state();
            let (&start, &len) = st.free.iter().find(|(_, &len)| len >= size)?;
            st.free.remove(&start);
            if len > size {
                st.free.insert(start + size, len - size);
            }
            st.used.insert(start, (size, 1));
            start
        };
        // SAFETY: `start..start + size` was free, so no `Bytes` of ours
        // and no worker holds it (a worker releases a region only once it
        // dropped its last view of it); `skip + b.len() <= size` keeps the
        // copy inside it and the mapping, and `b` cannot overlap it (a view
        // of the arena is never free).
        unsafe {
            std::ptr::copy_nonoverlapping(
                b.as_ptr(),
                (self.base + start + skip) as *mut u8,
                b.len(),
            )
        };
        Some(Bytes::from_owner(View {
            arena: self,
            region: start,
            offset: start + skip,
            len: b.len(),
        }))
    }

    /// The region `offset..offset + len` lies in, if one is handed out.
    pub(crate) fn region_of(&self, offset: usize, len: usize) -> Option<usize> {
        let st = self.state();
        let (&start, &(size, _)) = st.used.range(..=offset).next_back()?;
        (offset.checked_add(len)? <= start + size).then_some(start)
    }

    /// One more holder of `region` (which must be handed out).
    pub(crate) fn hold(&self, region: usize) {
        if let Some((_, n)) = self.state().used.get_mut(&region) {
            *n += 1;
        }
    }

    /// One holder fewer; the last frees the region.
    pub(crate) fn release(&self, region: usize) {
        let mut st = self.state();
        let Some((size, n)) = st.used.get_mut(&region) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        let size = *size;
        st.used.remove(&region);
        // Pages above RETAIN go back to the system. Under the lock: once
        // the range is on the free list, a caller may start writing it.
        let (from, to) = (region.max(RETAIN), region + size);
        if to > from && st.punch_holes {
            // Nobody holds the range. Refused (a filesystem without hole
            // punching): the pages stay allocated and are reused; stop
            // asking.
            st.punch_holes = crate::sys::punch_hole(&self.fd, from, to).is_ok();
        }
        let (mut start, mut len) = (region, size);
        if let Some((&s, &l)) = st.free.range(..start).next_back() {
            if s + l == start {
                st.free.remove(&s);
                (start, len) = (s, l + len);
            }
        }
        if let Some(l) = st.free.remove(&(start + len)) {
            len += l;
        }
        st.free.insert(start, len);
    }

    /// A view of `offset..offset + len` (arena offsets) of `region` for
    /// us, adding a holder; `None` unless `region` is in use and holds the
    /// whole range (what makes the view's slice sound).
    pub(crate) fn view(&'static self, region: usize, offset: usize, len: usize) -> Option<Bytes> {
        {
            let mut st = self.state();
            let (size, n) = st.used.get_mut(&region)?;
            let end = offset.checked_add(len)?;
            if offset < region || end > region + *size {
                return None;
            }
            *n += 1;
        }
        Some(Bytes::from_owner(View {
            arena: self,
            region,
            offset,
            len,
        }))
    }

    #[cfg(test)]
    fn regions(&self) -> usize {
        self.state().used.len()
    }
}

/// What a parent `Bytes` into the arena owns: one hold on its region.
struct View {
    arena: &'static Arena,
    region: usize,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `offset..offset + len` lies inside `region` (checked by
        // `Arena::view`, the only maker of a View), so inside the mapping,
        // and the view holds the region: nobody writes it while it lives.
        unsafe {
            std::slice::from_raw_parts((self.arena.base + self.offset) as *const u8, self.len)
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.arena.release(self.region);
    }
}

/// The worker's side: the parent's arena mapped read-only, and the offsets
/// of strings it received and has dropped since the last release note.
pub(crate) mod worker {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Mapped {
        base: usize,
        len: usize,
    }

    static MAPPED: OnceLock<Mapped> = OnceLock::new();
    static RELEASED: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    /// Set when `RELEASED` gets an offset: one load per request, no lock.
    static PENDING: AtomicBool = AtomicBool::new(false);

    /// Maps the arena `fd` read-only (once, as a worker starts).
    pub(crate) fn map(fd: OwnedFd) -> std::io::Result<()> {
        let len = nix::sys::stat::fstat(fd.as_raw_fd())?.st_size as usize;
        // The memfd is sealed against shrinking, so every page stays
        // backed; the mapping is never unmapped.
        let base = crate::sys::map_shared_read(&fd, len)?;
        let _ = MAPPED.set(Mapped {
            base: base as usize,
            len,
        });
        Ok(())
    }

    /// Whether this worker has the arena.
    pub(crate) fn mapped() -> bool {
        MAPPED.get().is_some()
    }

    /// A view of `offset..offset + len` of the arena, received from the
    /// parent; dropping its last clone queues its release. `None` if out
    /// of bounds or not mapped.
    pub(crate) fn view(offset: u64, len: u64) -> Option<Bytes> {
        let m = MAPPED.get()?;
        let end = offset.checked_add(len)?;
        if end > m.len as u64 {
            return None;
        }
        Some(Bytes::from_owner(Received {
            offset: offset as usize,
            len: len as usize,
        }))
    }

    /// The offset of `b` in the arena, if it lies there.
    pub(crate) fn offset_of(b: &[u8]) -> Option<u64> {
        let m = MAPPED.get()?;
        let p = b.as_ptr() as usize;
        (p >= m.base && p + b.len() <= m.base + m.len).then(|| (p - m.base) as u64)
    }

    /// Offsets released since the last call, if any.
    pub(crate) fn take_released() -> Option<Vec<u64>> {
        if !PENDING.load(Ordering::Relaxed) {
            return None;
        }
        let mut r = RELEASED.lock().unwrap_or_else(|p| p.into_inner());
        PENDING.store(false, Ordering::Relaxed);
        Some(std::mem::take(&mut *r)).filter(|v| !v.is_empty())
    }

    struct Received {
        offset: usize,
        len: usize,
    }

    impl AsRef<[u8]> for Received {
        fn as_ref(&self) -> &[u8] {
            let m = MAPPED.get().expect("a received view implies the mapping");
            // SAFETY: bounds checked in `view`; the parent writes a region
            // only while no worker holds it, and we hold it until this view
            // is dropped and its release sent.
            unsafe { std::slice::from_raw_parts((m.base + self.offset) as *const u8, self.len) }
        }
    }

    impl Drop for Received {
        fn drop(&mut self) {
            let mut r = RELEASED.lock().unwrap_or_else(|p| p.into_inner());
            r.push(self.offset as u64);
            PENDING.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked(cap: usize) -> &'static Arena {
        Box::leak(Box::new(Arena::new(cap).expect("memfd with seals")))
    }

    /// docs/arena.md: "default 1 GiB of address space", "touched pages
    /// below 64 MiB are kept for reuse".
    #[test]
    fn sizes_are_the_documented_ones() {
        assert_eq!(CAPACITY, 1 << 30);
        assert_eq!(RETAIN, 64 << 20);
    }

    #[test]
    fn a_shared_string_reads_back_and_frees_its_region() {
        let a = leaked(16 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let b = a.share(&data).unwrap();
        assert_eq!(&b[..], &data[..]);
        assert_eq!(a.offset_of(&b), Some(0));
        assert_eq!(a.regions(), 1);
        let tail = b.slice(1000..);
        drop(b);
        assert_eq!(a.regions(), 1, "a slice still holds the region");
        assert_eq!(&tail[..], &data[1000..]);
        drop(tail);
        assert_eq!(a.regions(), 0);
    }

    #[test]
    fn regions_go_lowest_first_and_merge_when_freed() {
        let a = leaked(4 << 20);
        let x = a.share(&[1u8; 5000]).unwrap(); // two pages
        let y = a.share(&[2u8; 100]).unwrap(); // one page
        let z = a.share(&[3u8; 4096]).unwrap();
        assert_eq!(
            [a.offset_of(&x), a.offset_of(&y), a.offset_of(&z)],
            [Some(0), Some(8192), Some(12288)]
        );
        drop(y);
        drop(x);
        // 0..12288 is free again, merged: a three-page string fits there.
        let w = a.share(&[4u8; 12288]).unwrap();
        assert_eq!(a.offset_of(&w), Some(0));
        assert_eq!((w[0], w[12287], z[0]), (4, 4, 3));
        // Full: no room for 4 MiB more.
        assert!(a.share(&vec![0u8; 4 << 20]).is_none());
    }

    #[test]
    fn a_worker_hold_keeps_a_region_after_our_views_are_gone() {
        let a = leaked(4 << 20);
        let b = a.share(&[7u8; 10_000]).unwrap();
        let region = a.region_of(a.offset_of(&b).unwrap(), b.len()).unwrap();
        a.hold(region); // sent to a worker
        drop(b);
        assert_eq!(a.regions(), 1);
        // A view must lie inside a region in use.
        assert!(a.view(region, region, 1 << 20).is_none(), "past its region");
        assert!(a.view(region + 1, region + 1, 1).is_none(), "not a region");
        let back = a.view(region, 100, 50).unwrap(); // its reply names part of it
        a.release(region); // the worker's release note
        assert_eq!(&back[..], &[7u8; 50][..]);
        assert_eq!(a.region_of(100, 50), Some(region));
        assert_eq!(a.region_of(100, 9000), Some(region));
        assert_eq!(a.region_of(100, 20_000), None, "past the region's end");
        drop(back);
        assert_eq!(a.regions(), 0);
    }
}
