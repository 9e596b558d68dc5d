//! Bytes queued to go to one worker: the frames being built and the big
//! strings sent from where they lie. Built by the RPC layer (calls are
//! framed into it), drained by the engine (sends).

use super::SEND_IN_PLACE;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// Bytes waiting to go to one worker, in order: small writes are copied
/// into one buffer (one send for many frames); a large shared buffer (a
/// big argument) is queued as it is and sent from where it lies, with no
/// staging copy.
#[derive(Default)]
pub(crate) struct SendQueue {
    /// The frames being built (headers, small payloads).
    pub buf: BytesMut,
    /// Finished pieces, oldest first, before `buf`.
    ready: VecDeque<Bytes>,
}

/// Size of the segments frames are built in (see [`SendQueue::reserve`]).
pub(crate) const SEGMENT: usize = 64 * 1024;

impl SendQueue {
    /// Appends bytes that may be shared: big ones are queued in place.
    pub(crate) fn put_shared(&mut self, b: &Bytes) {
        if b.len() < SEND_IN_PLACE {
            self.buf.extend_from_slice(b);
            return;
        }
        if !self.buf.is_empty() {
            self.ready.push_back(self.buf.split().freeze());
        }
        self.ready.push_back(b.clone());
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.ready.is_empty()
    }

    /// Room for `n` more bytes of frames. Frames are built in segments of
    /// [`SEGMENT`] bytes: a full one is queued as it is and a new one
    /// begun, instead of growing one buffer by doubling through a backlog
    /// of calls (each doubling copies it, onto fresh pages).
    pub(crate) fn reserve(&mut self, n: usize) {
        if self.buf.capacity() - self.buf.len() >= n {
            return;
        }
        if !self.buf.is_empty() {
            self.ready.push_back(self.buf.split().freeze());
        }
        self.buf.reserve(n.max(SEGMENT));
    }

    /// Moves everything queued in `other` to the end of this queue.
    pub(crate) fn append(&mut self, other: &mut SendQueue) {
        if other.is_empty() {
            return;
        }
        if !self.buf.is_empty() {
            self.ready.push_back(self.buf.split().freeze());
        }
        self.ready.append(&mut other.ready);
        if !other.buf.is_empty() {
            self.ready.push_back(other.buf.split().freeze());
        }
    }

    /// The next piece to send if it is at most `max` bytes.
    pub(crate) fn next_small(&mut self, max: usize) -> Option<Bytes> {
        match self.ready.front() {
            Some(b) if b.len() <= max => self.ready.pop_front(),
            Some(_) => None,
            None if !self.buf.is_empty() && self.buf.len() <= max => {
                Some(self.buf.split().freeze())
            }
            None => None,
        }
    }

    /// The next piece to send, if any.
    pub(crate) fn next(&mut self) -> Option<Bytes> {
        self.ready
            .pop_front()
            .or_else(|| (!self.buf.is_empty()).then(|| self.buf.split().freeze()))
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.ready.clear();
    }
}

impl SendQueue {
    /// An empty queue whose frame buffer holds `n` bytes before it grows.
    pub(crate) fn with_capacity(n: usize) -> SendQueue {
        SendQueue {
            buf: BytesMut::with_capacity(n),
            ready: VecDeque::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Send-in-place (the fast path: a big string queued as it lies, a
        /// piece of its own) and its general twin (every byte copied into
        /// the frame buffer) send the same bytes in the same order, between
        /// and across segments; and a big string is sent from its own
        /// buffer, not a copy.
        #[test]
        fn in_place_sends_the_bytes_a_copy_would(
            pieces in proptest::collection::vec(
                prop_oneof![
                    (0usize..100).prop_map(|n| (n, false)),
                    (SEND_IN_PLACE - 1..SEND_IN_PLACE + 2).prop_map(|n| (n, true)),
                    (0usize..100).prop_map(|n| (n, true)),
                ],
                1..10,
            )
        ) {
            let (mut fast, mut copied, mut expect) = (SendQueue::default(), SendQueue::default(), Vec::new());
            let mut big = Vec::new();
            for (i, &(n, shared)) in pieces.iter().enumerate() {
                let b = Bytes::from(vec![i as u8; n]);
                expect.extend_from_slice(&b);
                if shared {
                    fast.put_shared(&b);
                    if n >= SEND_IN_PLACE {
                        big.push(b.as_ptr());
                    }
                } else {
                    fast.reserve(n);
                    fast.buf.extend_from_slice(&b);
                }
                copied.reserve(n);
                copied.buf.extend_from_slice(&b);
            }
            let (mut a, mut b, mut sent_from) = (Vec::new(), Vec::new(), Vec::new());
            while let Some(p) = fast.next() {
                sent_from.push(p.as_ptr());
                a.extend_from_slice(&p);
            }
            while let Some(p) = copied.next() {
                b.extend_from_slice(&p);
            }
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a, &expect);
            for p in big {
                prop_assert!(sent_from.contains(&p), "a big string was copied");
            }
        }
    }
}
