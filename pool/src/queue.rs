//! The scheduler's FIFO of jobs, kept in blocks so that a batch leaves it
//! as whole blocks: sending 1,000 queued jobs moves a few block handles
//! (and copies at most one block's worth), instead of copying each job
//! out. The driver does that under the pool's lock, with callers waiting
//! on it to queue more.

use crate::ids::JobId;
use std::collections::VecDeque;

/// Jobs per block: big enough that a batch is mostly whole blocks, small
/// enough that splitting one (the copy a batch may still make) is short.
const BLOCK: usize = 64;

type Block<J> = VecDeque<(JobId, J)>;

fn block<J>() -> Block<J> {
    VecDeque::with_capacity(BLOCK)
}

/// Jobs in order, in blocks of at most [`BLOCK`]; none is empty.
#[derive(Debug)]
pub(crate) struct Queue<J> {
    blocks: VecDeque<Block<J>>,
    len: usize,
}

impl<J> Queue<J> {
    pub(crate) fn new() -> Self {
        Queue {
            blocks: VecDeque::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub(crate) fn push_back(&mut self, job: (JobId, J)) {
        match self.blocks.back_mut() {
            Some(b) if b.len() < BLOCK => b.push_back(job),
            _ => self.push_block(job),
        }
        self.len += 1;
    }

    #[cold]
    #[inline(never)]
    fn push_block(&mut self, job: (JobId, J)) {
        let mut b = block();
        b.push_back(job);
        self.blocks.push_back(b);
    }

    pub(crate) fn push_front(&mut self, job: (JobId, J)) {
        match self.blocks.front_mut() {
            Some(b) if b.len() < BLOCK => b.push_front(job),
            _ => {
                let mut b = block();
                b.push_front(job);
                self.blocks.push_front(b);
            }
        }
        self.len += 1;
    }

    /// The first `n` jobs (all of them if fewer).
    pub(crate) fn take(&mut self, n: usize) -> Jobs<J> {
        let mut out = Jobs::default();
        while out.len < n {
            let Some(front) = self.blocks.front_mut() else {
                break;
            };
            let want = n - out.len;
            let b = if front.len() <= want {
                self.blocks.pop_front().expect("a front block")
            } else {
                front.drain(..want).collect()
            };
            out.len += b.len();
            out.blocks.push_back(b);
        }
        self.len -= out.len;
        out
    }

    /// Removes the newest job with this id.
    pub(crate) fn remove(&mut self, id: JobId) -> Option<J> {
        let (bi, i) = self
            .blocks
            .iter()
            .enumerate()
            .rev()
            .find_map(|(bi, b)| b.iter().rposition(|(j, _)| *j == id).map(|i| (bi, i)))?;
        let b = &mut self.blocks[bi];
        let (_, job) = b.remove(i)?;
        if b.is_empty() {
            self.blocks.remove(bi);
        }
        self.len -= 1;
        Some(job)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(JobId, J)> + Clone + '_ {
        self.blocks.iter().flatten()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut (JobId, J)> + '_ {
        self.blocks.iter_mut().flatten()
    }

    /// The newest job.
    pub(crate) fn back(&self) -> Option<&(JobId, J)> {
        self.blocks.back()?.back()
    }
}

/// The jobs of one batch (see [`Action::Send`](crate::Action::Send)),
/// oldest first.
///
/// ```
/// use forkrpc_pool::Jobs;
///
/// let jobs: Jobs<&str> = vec![(0, "a"), (1, "b")].into();
/// assert_eq!(jobs.len(), 2);
/// assert_eq!(jobs.iter().map(|j| j.1).collect::<String>(), "ab");
/// assert_eq!(jobs.into_iter().map(|j| j.0).collect::<Vec<_>>(), [0, 1]);
/// ```
#[derive(Clone)]
pub struct Jobs<J> {
    blocks: VecDeque<Block<J>>,
    len: usize,
}

impl<J> Default for Jobs<J> {
    fn default() -> Self {
        Jobs {
            blocks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<J> Jobs<J> {
    /// How many.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The jobs by reference, in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &(JobId, J)> + Clone + '_ {
        self.blocks.iter().flatten()
    }
}

impl<J> From<Vec<(JobId, J)>> for Jobs<J> {
    fn from(v: Vec<(JobId, J)>) -> Self {
        v.into_iter().collect()
    }
}

impl<J> FromIterator<(JobId, J)> for Jobs<J> {
    fn from_iter<I: IntoIterator<Item = (JobId, J)>>(it: I) -> Self {
        let mut q = Queue::new();
        for j in it {
            q.push_back(j);
        }
        Jobs {
            blocks: q.blocks,
            len: q.len,
        }
    }
}

impl<J: PartialEq> PartialEq for Jobs<J> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<J: Eq> Eq for Jobs<J> {}

impl<J: std::fmt::Debug> std::fmt::Debug for Jobs<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<J> IntoIterator for Jobs<J> {
    type Item = (JobId, J);
    type IntoIter = IntoIter<J>;

    fn into_iter(mut self) -> IntoIter<J> {
        IntoIter {
            cur: self.blocks.pop_front().unwrap_or_default(),
            rest: self.blocks,
        }
    }
}

/// The jobs of a [`Jobs`], by value, in order.
pub struct IntoIter<J> {
    cur: Block<J>,
    rest: VecDeque<Block<J>>,
}

impl<J> IntoIter<J> {
    /// The job `k` places after the next one (`0`: the next), if there is
    /// one within the next block: lets a consumer prefetch a few ahead.
    pub fn ahead(&self, k: usize) -> Option<&(JobId, J)> {
        match self.cur.get(k) {
            Some(j) => Some(j),
            None => self.rest.front()?.get(k - self.cur.len()),
        }
    }
}

impl<J> Iterator for IntoIter<J> {
    type Item = (JobId, J);

    #[inline]
    fn next(&mut self) -> Option<(JobId, J)> {
        loop {
            if let Some(j) = self.cur.pop_front() {
                return Some(j);
            }
            self.cur = self.rest.pop_front()?;
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.cur.len() + self.rest.iter().map(VecDeque::len).sum::<usize>();
        (n, Some(n))
    }
}

impl<J> ExactSizeIterator for IntoIter<J> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(n: u64) -> Queue<u64> {
        let mut q = Queue::new();
        for i in 0..n {
            q.push_back((i, i * 10));
        }
        q
    }

    fn ids<'a>(it: impl Iterator<Item = &'a (JobId, u64)>) -> Vec<JobId> {
        it.map(|j| j.0).collect()
    }

    #[test]
    fn take_hands_over_whole_blocks_and_splits_one() {
        let mut q = queue(3 * BLOCK as u64 + 5);
        let first = q.take(BLOCK + 3);
        assert_eq!(first.len(), BLOCK + 3);
        assert_eq!(first.blocks.len(), 2, "one whole block, one split off");
        assert_eq!(ids(first.iter()), (0..BLOCK as u64 + 3).collect::<Vec<_>>());
        assert_eq!(q.len(), 2 * BLOCK + 2);
        assert_eq!(
            ids(q.iter()),
            (BLOCK as u64 + 3..3 * BLOCK as u64 + 5).collect::<Vec<_>>()
        );
        let rest = q.take(usize::MAX);
        assert_eq!(rest.len(), 2 * BLOCK + 2);
        assert!(q.is_empty());
        assert_eq!(q.iter().count(), 0);
        let values: Vec<u64> = rest.into_iter().map(|j| j.1).collect();
        assert_eq!(values[0], (BLOCK as u64 + 3) * 10);
        assert_eq!(values.len(), 2 * BLOCK + 2);
    }

    #[test]
    fn push_front_goes_before_everything() {
        let mut q = queue(BLOCK as u64); // one full block
        q.push_front((100, 0));
        q.push_front((101, 0));
        let got = ids(q.iter());
        assert_eq!(&got[..3], [101, 100, 0]);
        assert_eq!(got.len(), BLOCK + 2);
        assert_eq!(q.len(), BLOCK + 2);
    }

    #[test]
    fn remove_takes_the_newest_match_and_drops_empty_blocks() {
        let mut q = queue(BLOCK as u64 + 1);
        q.push_back((3, 7)); // a second job 3, in the last block
        assert_eq!(q.remove(3), Some(7));
        assert_eq!(q.remove(BLOCK as u64), Some(BLOCK as u64 * 10));
        assert_eq!(q.blocks.len(), 1, "the emptied block is gone");
        assert_eq!(q.remove(3), Some(30));
        assert_eq!(q.remove(3), None);
        assert_eq!(q.len(), BLOCK - 1);
        assert_eq!(q.take(usize::MAX).len(), BLOCK - 1);
    }

    #[test]
    fn into_iter_looks_ahead_across_blocks() {
        let mut q = queue(BLOCK as u64 + 4);
        let mut it = q.take(BLOCK + 4).into_iter();
        for _ in 0..BLOCK - 2 {
            it.next();
        }
        assert_eq!(it.ahead(0).map(|j| j.0), Some(BLOCK as u64 - 2));
        assert_eq!(it.ahead(5).map(|j| j.0), Some(BLOCK as u64 + 3));
        assert_eq!(it.ahead(6), None);
        assert_eq!(it.len(), 6);
        assert_eq!(
            it.map(|j| j.0).collect::<Vec<_>>(),
            (BLOCK as u64 - 2..BLOCK as u64 + 4).collect::<Vec<_>>()
        );
    }

    #[test]
    fn jobs_compare_by_content_not_by_blocks() {
        let mut q = queue(BLOCK as u64 + 2);
        q.take(1);
        let split = q.take(BLOCK + 1); // blocks of BLOCK - 1 and 2
        let whole: Jobs<u64> = (1..BLOCK as u64 + 2).map(|i| (i, i * 10)).collect();
        assert_eq!(split, whole);
        assert_ne!(split, Jobs::from(vec![(1, 10)]));
    }
}
