//! A worker's crash journal: a small shared-memory region (one memfd per
//! worker, mapped by the parent and by the worker) where the worker keeps,
//! as it goes, what the parent needs should it die:
//!
//! - how many request frames it has started, and in a chunk request which
//!   item is running;
//! - a copy of the output it has not written to its socket yet (replies
//!   and events it buffered, in the stream's bytes), and of the results of
//!   the running chunk not yet framed.
//!
//! When the worker dies (a signal, `_exit`, the OOM killer: anything), the
//! parent reads it once the process is gone: replies and results computed
//! before the death are delivered, the one call that was running fails
//! with how the worker died, and calls the worker never started fail with
//! [`Error::NotStarted`](crate::Error::NotStarted), which a pool resends.
//!
//! The cost on the hot path is a few stores and a copy of each result's
//! bytes into memory both processes map. The worker writes the header
//! words with release stores after the bytes they describe; the parent
//! reads only after the worker has exited, when everything it wrote is
//! visible.
//!
//! Layout: a 64-byte header ([`Header`]), then [`OUT_CAP`] bytes mirroring
//! the worker's output buffer, then [`PART_CAP`] bytes mirroring the
//! running chunk's results. Output beyond the caps is not mirrored: the
//! journal says so (`broken`) and the parent falls back to failing the
//! calls whose replies it did not get. Pages are allocated as they are
//! touched.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of unsent output the journal can mirror (the sync worker flushes
/// at 256 KiB; a bigger buffered frame makes the journal `broken`).
pub(crate) const OUT_CAP: usize = 1 << 20;
/// Bytes of a chunk's unframed results it can mirror.
pub(crate) const PART_CAP: usize = 1 << 20;
const HEADER: usize = 128;
/// The output mirror's two regions (an async worker's writer sends from
/// one while its handlers add to the other), then the part mirror.
const OUT_REGION: [usize; 2] = [HEADER, HEADER + OUT_CAP];
const PART_REGION: usize = HEADER + 2 * OUT_CAP;
const SIZE: usize = PART_REGION + PART_CAP;

/// The journal's first bytes.
#[repr(C)]
struct Header {
    /// Request frames the worker has started.
    frames: AtomicU64,
    /// In the running chunk request: items started (the running one is
    /// `items - 1`); 0 outside a chunk.
    items: AtomicU64,
    /// Where the first region's first byte lies in the worker's output
    /// stream: bytes it had written to its socket before it. The parent,
    /// which counted the bytes it read, skips those it has.
    out_base: AtomicU64,
    /// Bytes of output in the first region (a sync worker's buffer, or
    /// what an async worker's writer is sending).
    out_len: AtomicU64,
    /// The chunk item whose result is the first in the part mirror.
    part_first: AtomicU64,
    /// Bytes of mirrored chunk results.
    part_len: AtomicU64,
    /// Bit 0: the output mirror cannot be trusted (too big, or a string
    /// was being written straight to the socket); bit 1: nor the part
    /// mirror (too big). Each clears when its mirror starts afresh.
    broken: AtomicU64,
    /// Which output region comes first (0 or 1): they swap as an async
    /// worker's writer takes its buffer.
    first: AtomicU64,
    /// Bytes of output in the other region (an async worker's buffer
    /// while its writer sends; 0 for a sync worker).
    tail_len: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER);

/// A mapping of a journal (parent or worker side).
pub(crate) struct Journal {
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory; the header is read and
// written through atomics, the mirrors by one writer (the worker's one
// thread) and read by the parent only after that writer is gone.
unsafe impl Send for Journal {}
// SAFETY: as above: `&Journal` only allows atomic header access and reads.
unsafe impl Sync for Journal {}

impl Journal {
    /// Makes a journal for a new worker: the parent's mapping and the
    /// memfd to pass to the worker.
    pub(crate) fn create() -> std::io::Result<(Journal, OwnedFd)> {
        let fd = crate::sys::memfd(c"forkrpc-journal", SIZE, false)?;
        let j = Journal::map(&fd)?;
        Ok((j, fd))
    }

    /// Maps the journal `fd` read-write (the worker's side, or the
    /// parent's in `create`).
    pub(crate) fn map(fd: &OwnedFd) -> std::io::Result<Journal> {
        // The memfd is SIZE long and nobody shrinks it (only the parent and
        // this one worker hold it); the mapping is unmapped in Drop.
        let base = crate::sys::map_shared(fd, SIZE)?;
        Ok(Journal { base })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with HEADER bytes, page-aligned, which
        // a `Header` (seven u64 atomics) fits; shared memory is only ever
        // accessed through these atomics.
        unsafe { &*(self.base as *const Header) }
    }

    /// Writes `bytes` at `offset` of the region starting at `region`
    /// (of `cap` bytes); false if they do not fit.
    fn write(&self, region: usize, cap: usize, offset: usize, bytes: &[u8]) -> bool {
        if offset + bytes.len() > cap {
            return false;
        }
        // SAFETY: `region + offset + len <= region + cap`, inside the
        // mapping; only this (worker) thread writes the mirrors.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.add(region + offset),
                bytes.len(),
            )
        };
        true
    }

    /// Reads `len` bytes of the region at `region` (of `cap`), clamped.
    fn read(&self, region: usize, cap: usize, from: usize, len: usize) -> Vec<u8> {
        let (from, len) = (from.min(cap), len.min(cap));
        let n = len.saturating_sub(from);
        let mut v = vec![0u8; n];
        // SAFETY: `region + from + n <= region + cap`, inside the mapping;
        // the worker that wrote it has exited.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(region + from), v.as_mut_ptr(), n) };
        v
    }

    /// What a dead worker left (the parent's side, after it exited),
    /// `received` being the bytes the parent read from its socket in all.
    pub(crate) fn remains(&self, received: u64) -> Remains {
        let h = self.header();
        let broken = h.broken.load(Ordering::Acquire);
        let out_len = h.out_len.load(Ordering::Acquire) as usize;
        let out_base = h.out_base.load(Ordering::Acquire);
        let part_len = h.part_len.load(Ordering::Acquire) as usize;
        let first = (h.first.load(Ordering::Acquire) & 1) as usize;
        let tail_len = h.tail_len.load(Ordering::Acquire) as usize;
        // What the parent has of the mirrored bytes is skipped by count,
        // not by what the worker noted as written: it may die between a
        // write and its note.
        let out = (broken & OUT_BROKEN == 0)
            .then(|| {
                let mut out = self.read(OUT_REGION[first], OUT_CAP, 0, out_len);
                out.extend(self.read(OUT_REGION[1 - first], OUT_CAP, 0, tail_len));
                let skip = usize::try_from(received.checked_sub(out_base)?).ok()?;
                (skip <= out.len()).then(|| out.split_off(skip))
            })
            .flatten();
        Remains {
            frames: h.frames.load(Ordering::Acquire),
            items: h.items.load(Ordering::Acquire),
            out,
            part_first: h.part_first.load(Ordering::Acquire),
            part: (broken & PART_BROKEN == 0)
                .then(|| self.read(PART_REGION, PART_CAP, 0, part_len)),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing
        // borrows it past the Journal (reads copy out).
        unsafe { crate::sys::unmap(self.base.cast(), SIZE) };
    }
}

/// A dead worker's journal, read by the parent.
#[derive(Debug)]
pub(crate) struct Remains {
    /// Request frames it started.
    pub frames: u64,
    /// Items of the running chunk it started (0: not in a chunk).
    pub items: u64,
    /// Output it never wrote: the stream's continuation (None: unknown).
    pub out: Option<Vec<u8>>,
    /// The chunk item of the first result in `part`.
    pub part_first: u64,
    /// Results of the running chunk not yet framed (a results blob; None:
    /// unknown).
    pub part: Option<Vec<u8>>,
}

const OUT_BROKEN: u64 = 1;
const PART_BROKEN: u64 = 2;

impl Header {
    fn set_broken(&self, bit: u64, on: bool) {
        let b = self.broken.load(Ordering::Relaxed);
        let b = if on { b | bit } else { b & !bit };
        self.broken.store(b, Ordering::Release);
    }
}

/// The worker's side: what it keeps in its journal (no-ops without one).
pub(crate) mod worker {
    use super::*;
    use std::cell::RefCell;

    /// The journal and how far its mirrors go, in one thread-local: the
    /// hot path (a chunk item) touches it once.
    struct Mirror {
        j: Journal,
        /// An async worker: its buffer is mirrored in the second output
        /// region, behind what its writer sends (see [`out_swapped`]).
        tail: bool,
        /// Which output region comes first.
        first: usize,
        /// The buffer's mirror overflowed since it last started afresh.
        tail_broken: bool,
        /// Bytes of the output buffer mirrored so far.
        out: usize,
        /// Bytes written to the socket in all.
        written: u64,
        /// Bytes of the chunk results mirrored so far.
        part: usize,
        /// The chunk fields of the header were written since the last
        /// request started (a plain request leaves them alone: nothing to
        /// reset).
        chunk: bool,
    }

    thread_local! {
        static MIRROR: RefCell<Option<Mirror>> = const { RefCell::new(None) };
    }

    /// Maps the journal `fd` (once, as a worker starts).
    pub(crate) fn map(fd: OwnedFd) -> std::io::Result<()> {
        let j = Journal::map(&fd)?;
        MIRROR.with_borrow_mut(|m| {
            *m = Some(Mirror {
                j,
                tail: false,
                first: 0,
                tail_broken: false,
                out: 0,
                written: 0,
                part: 0,
                chunk: false,
            })
        });
        Ok(())
    }

    #[inline]
    fn with(f: impl FnOnce(&mut Mirror)) {
        MIRROR.with_borrow_mut(|m| {
            if let Some(m) = m {
                f(m)
            }
        })
    }

    impl Mirror {
        fn header(&self) -> &Header {
            self.j.header()
        }

        /// Mirrors what `out` gained since the last call.
        #[inline]
        fn sync_out(&mut self, out: &[u8]) {
            if out.len() <= self.out {
                return;
            }
            let region = OUT_REGION[self.first ^ self.tail as usize];
            if self.j.write(region, OUT_CAP, self.out, &out[self.out..]) {
                self.out = out.len();
                let len = match self.tail {
                    true => &self.header().tail_len,
                    false => &self.header().out_len,
                };
                len.store(out.len() as u64, Ordering::Release);
            } else {
                self.tail_broken = true;
                self.header().set_broken(OUT_BROKEN, true);
            }
        }
    }

    /// Mirrors what `out` (the output buffer) gained since the last call.
    pub(crate) fn sync_out(out: &[u8]) {
        with(|m| m.sync_out(out))
    }

    /// `n` more bytes of output reached the socket.
    pub(crate) fn out_written(n: usize) {
        with(|m| m.written += n as u64)
    }

    /// The output buffer was written out whole and emptied.
    pub(crate) fn out_flushed() {
        with(|m| {
            let h = m.header();
            h.out_len.store(0, Ordering::Release);
            h.out_base.store(m.written, Ordering::Release);
            // A fresh buffer: whatever broke the mirror is gone.
            h.set_broken(OUT_BROKEN, false);
            m.tail_broken = false;
            m.out = 0;
        })
    }

    /// This worker is async: its writer sends the buffer it takes while
    /// handlers fill a fresh one, mirrored in the other region.
    pub(crate) fn async_output() {
        with(|m| m.tail = true)
    }

    /// An async worker's writer took the output buffer to send it
    /// (`chunk`; the buffer is empty again): the regions swap, no bytes
    /// move. [`out_written`] then counts the chunk's bytes sent.
    pub(crate) fn out_swapped(chunk: &[u8]) {
        with(|m| {
            m.sync_out(chunk); // anything added without a sync
            let h = m.j.header();
            // Unknown while the header changes (only a kill from outside
            // can land here: the worker's one thread is here).
            h.set_broken(OUT_BROKEN, true);
            m.first ^= 1;
            h.first.store(m.first as u64, Ordering::Release);
            // Every earlier chunk was written whole.
            h.out_base.store(m.written, Ordering::Release);
            h.out_len.store(chunk.len() as u64, Ordering::Release);
            h.tail_len.store(0, Ordering::Release);
            m.out = 0;
            // The chunk is whole if its mirror never overflowed; the fresh
            // buffer is empty.
            h.set_broken(OUT_BROKEN, std::mem::take(&mut m.tail_broken));
        })
    }

    /// A string goes straight to the socket (the output buffer was just
    /// flushed): the stream is between frames only once it went.
    pub(crate) fn direct_write_started() {
        with(|m| m.header().set_broken(OUT_BROKEN, true))
    }

    /// The string went, `n` bytes: the (empty) buffer starts after it.
    pub(crate) fn direct_write_done(n: usize) {
        with(|m| {
            m.written += n as u64;
            let h = m.j.header();
            h.out_len.store(0, Ordering::Release);
            h.out_base.store(m.written, Ordering::Release);
            m.out = 0;
            h.set_broken(OUT_BROKEN, false);
        })
    }

    /// An async worker starts a request (its output is mirrored by
    /// [`sync_out`] after each reply and event, [`out_swapped`] and
    /// [`out_written`] as its writer sends).
    pub(crate) fn request_started() {
        with(|m| {
            let h = m.header();
            h.frames
                .store(h.frames.load(Ordering::Relaxed) + 1, Ordering::Release);
        })
    }

    /// A request frame starts (`out`: the output buffer so far).
    pub(crate) fn frame_started(out: &[u8]) {
        with(|m| {
            m.sync_out(out);
            let h = m.j.header();
            if std::mem::take(&mut m.chunk) {
                m.part = 0;
                h.items.store(0, Ordering::Release);
                h.part_len.store(0, Ordering::Release);
                h.part_first.store(0, Ordering::Release);
                h.set_broken(PART_BROKEN, false);
            }
            h.frames
                .store(h.frames.load(Ordering::Relaxed) + 1, Ordering::Release);
        })
    }

    /// Item `i` of the running chunk starts; `out` and `part` are the
    /// output buffer and the chunk's unframed results so far.
    #[inline]
    pub(crate) fn item_started(i: u64, out: &[u8], part: &[u8]) {
        with(|m| {
            m.chunk = true;
            m.sync_out(out);
            if part.len() > m.part {
                if m.j.write(PART_REGION, PART_CAP, m.part, &part[m.part..]) {
                    m.part = part.len();
                    m.header()
                        .part_len
                        .store(part.len() as u64, Ordering::Release);
                } else {
                    m.header().set_broken(PART_BROKEN, true);
                }
            }
            m.header().items.store(i + 1, Ordering::Release);
        })
    }

    /// The chunk's results so far, those of its first `results` items,
    /// were framed as a part into `out`: the output mirror gets the frame
    /// first, then the part mirror restarts (a death between the two
    /// leaves results in both, which the parent tells apart by item).
    pub(crate) fn part_taken(out: &[u8], results: u64) {
        with(|m| {
            m.sync_out(out);
            m.part = 0;
            let h = m.header();
            h.part_first.store(results, Ordering::Release);
            h.part_len.store(0, Ordering::Release);
            h.set_broken(PART_BROKEN, false);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_reads_what_the_worker_left() {
        let (parent, fd) = Journal::create().unwrap();
        worker::map(fd).unwrap();
        let mut out = b"frame-1".to_vec();
        worker::frame_started(&out);
        out.extend_from_slice(b"frame-2");
        worker::out_written(3); // a flush got this far
        worker::item_started(0, &out, b"");
        worker::item_started(1, &out, b"r\x01\x00");
        worker::part_taken(&out, 2);
        worker::item_started(2, &out, b"r\x01\x00");
        let r = parent.remains(3);
        assert_eq!((r.frames, r.items, r.part_first), (1, 3, 2));
        assert_eq!(r.out.as_deref(), Some(&b"me-1frame-2"[..]));
        assert_eq!(r.part.as_deref(), Some(&b"r\x01\x00"[..]));
        // The parent read more than the worker noted (it died between a
        // write and its note): what the parent has is skipped all the same.
        assert_eq!(parent.remains(7).out.as_deref(), Some(&b"frame-2"[..]));
        assert_eq!(parent.remains(14).out.as_deref(), Some(&b""[..]));
        assert_eq!(parent.remains(15).out, None, "more than it wrote");
        // A part too big to mirror makes it unknown until it restarts,
        // whatever the output mirror does meanwhile.
        worker::item_started(3, &out, &vec![b'x'; PART_CAP + 1]);
        worker::out_written(11);
        worker::out_flushed();
        assert_eq!(parent.remains(14).part, None);
        worker::part_taken(&[], 4);
        assert_eq!(parent.remains(14).part.as_deref(), Some(&b""[..]));
        worker::out_flushed();
        worker::direct_write_started();
        assert_eq!(parent.remains(14).out, None, "mid-string: unknown");
        worker::direct_write_done(100);
        let mut out = b"frame-3".to_vec();
        worker::sync_out(&out);
        assert_eq!(parent.remains(114).out.as_deref(), Some(&b"frame-3"[..]));
        out.clear();
        worker::out_written(7);
        worker::out_flushed();
        assert_eq!(parent.remains(121).out.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn an_async_writers_chunk_comes_before_the_buffer() {
        let (parent, fd) = Journal::create().unwrap();
        worker::map(fd).unwrap();
        worker::async_output();
        let out = |received: u64| parent.remains(received).out;
        let mut buf = b"r1".to_vec();
        worker::sync_out(&buf);
        assert_eq!(out(0).as_deref(), Some(&b"r1"[..]));
        // The writer takes the buffer; r2 is made while r1 is sent.
        let chunk = std::mem::take(&mut buf);
        worker::out_swapped(&chunk);
        buf.extend_from_slice(b"r2");
        worker::sync_out(&buf);
        worker::out_written(1);
        assert_eq!(out(1).as_deref(), Some(&b"1r2"[..]));
        worker::out_written(1);
        buf.extend_from_slice(b"r3");
        worker::sync_out(&buf);
        assert_eq!(out(2).as_deref(), Some(&b"r2r3"[..]));
        // Bytes added without a sync are mirrored as the writer takes them.
        buf.extend_from_slice(b"r4");
        let chunk = std::mem::take(&mut buf);
        worker::out_swapped(&chunk);
        assert_eq!(out(2).as_deref(), Some(&b"r2r3r4"[..]));
        // Sent, but it died before noting it: the parent's count decides.
        assert_eq!(out(8).as_deref(), Some(&b""[..]));
        // A buffer too big to mirror: unknown until a chunk fits again.
        worker::out_written(6);
        worker::sync_out(&vec![b'x'; OUT_CAP + 1]);
        assert_eq!(out(8), None);
        worker::out_swapped(&vec![b'x'; OUT_CAP + 1]);
        assert_eq!(out(8), None, "the chunk sent is not whole");
        worker::out_written(OUT_CAP + 1);
        worker::sync_out(b"r5");
        worker::out_swapped(b"r5");
        assert_eq!(out(8 + OUT_CAP as u64 + 1).as_deref(), Some(&b"r5"[..]));
    }
}
