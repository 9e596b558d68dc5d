//! Staged calls: the chunk items of small octets calls, written by their
//! callers as they join a waiting queue, so that a batch's chunk is cut
//! from one buffer rather than built from each job (see
//! [`Staging`]).

use crate::call::Payload;
use crate::error::{Error, Result};
use crate::wire::chunk;
use crate::wire::Octets;
use bytes::{Bytes, BytesMut};

/// Where a staged job's chunk item lies: bytes `end - len .. end` of
/// all the bytes ever staged in its pool (see [`Staging`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Staged {
    end: u64,
    pub(super) len: u32,
}

impl Staged {
    fn start(self) -> u64 {
        self.end - u64::from(self.len)
    }
}

/// The chunk items of small octets calls, written by their callers as
/// they join a waiting queue (see `Args::Staged`): exactly those of the
/// staged jobs in the queue, in queue order. Offsets count every byte
/// ever staged, so a job's place does not move as batches take bytes
/// from the front, and taking a batch's bytes needs only its last staged
/// job.
#[derive(Default)]
pub(crate) struct Staging {
    buf: BytesMut,
    /// The offset of `buf[0]`.
    base: u64,
}

impl Staging {
    /// Writes the chunk item of `args` (whose encoding is `n` bytes).
    pub(crate) fn stage(&mut self, args: &Octets, n: u32) -> Staged {
        let start = self.buf.len();
        chunk::put_item(args, u64::from(n), &mut self.buf);
        Staged {
            end: self.base + self.buf.len() as u64,
            len: (self.buf.len() - start) as u32,
        }
    }

    /// A staged job left the queue from its middle (cancelled): cuts its
    /// item out and moves the items of `later` jobs up.
    pub(crate) fn cut<'a>(&mut self, s: Staged, later: impl Iterator<Item = &'a mut Staged>) {
        let (start, end) = (
            (s.start() - self.base) as usize,
            (s.end - self.base) as usize,
        );
        let tail = self.buf.split_off(end);
        self.buf.truncate(start);
        self.buf.extend_from_slice(&tail);
        for t in later.filter(|t| t.end > s.end) {
            t.end -= u64::from(s.len);
        }
    }

    /// The bytes of jobs leaving the front of the queue, through their
    /// last staged one.
    /// `staged`: each job's place if it is staged, in queue order.
    pub(crate) fn take(
        &mut self,
        staged: impl DoubleEndedIterator<Item = Option<Staged>>,
    ) -> StagedBytes {
        let at = self.base;
        let last = if self.buf.is_empty() {
            None // nothing staged: no need to look at the jobs
        } else {
            staged.rev().find_map(|s| s.map(|s| s.end))
        };
        let bytes = match last {
            Some(end) => {
                self.base = end;
                self.buf.split_to((end - at) as usize).freeze()
            }
            None => Bytes::new(),
        };
        StagedBytes { at, bytes }
    }
}

/// The staged bytes a batch took, from offset `at`.
#[derive(Default)]
pub(crate) struct StagedBytes {
    at: u64,
    pub(super) bytes: Bytes,
}

impl StagedBytes {
    pub(super) fn range(&self, s: Staged) -> std::ops::Range<usize> {
        (s.start() - self.at) as usize..(s.end - self.at) as usize
    }

    /// A staged job's chunk item.
    pub(crate) fn item(&self, s: Staged) -> Bytes {
        self.bytes.slice(self.range(s))
    }
}

/// The arguments of a staged job (its chunk item) as a payload of their
/// own.
pub(crate) fn unstage(item: &Bytes) -> Result<Payload> {
    let bad = |e: crate::wire::WireError| Error::Protocol {
        pid: 0,
        detail: format!("a staged call could not be read back: {e}"),
    };
    let range = chunk::next_field(item, &mut 0).map_err(bad)?;
    Payload::new(Octets::decode_in(item, range).map_err(bad)?)
}
