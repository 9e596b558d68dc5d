//! The async backend's calls in flight, by request id.
//!
//! Ids go out in sequence (1 ..= 0xffffffff, then 1 again, skipping ids
//! still in use), so the calls in flight sit in a window of consecutive
//! ids: a ring indexed by id — no hashing, and replies that come back in
//! roughly the order of the calls touch memory in order. A call that stays
//! in flight while many later ones finish would hold the window open; once
//! the window is much longer than the calls in it, such old calls move to
//! a small map of stragglers, so memory stays proportional to the calls in
//! flight.

use crate::idmap::IdMap;
use std::collections::VecDeque;

/// Ids per cycle: 1 ..= u32::MAX (0 is the event id).
const CYCLE: u64 = u32::MAX as u64;

fn id_of(seq: u64) -> u32 {
    (seq % CYCLE) as u32 + 1
}

/// Values by request id (see the module docs).
pub(crate) struct Window<V> {
    /// Sequence number of `slots[0]`; `base + slots.len()` is the next.
    base: u64,
    slots: VecDeque<Option<V>>,
    /// Occupied slots.
    live: usize,
    /// Old entries moved out of the window: id -> (sequence, value).
    stragglers: IdMap<u32, (u64, V)>,
}

impl<V> Window<V> {
    /// A window whose first id is `id` (1 in use; others in tests).
    pub(crate) fn starting_at(id: u32) -> Self {
        let base = id.max(1) as u64 - 1;
        Window {
            base,
            slots: VecDeque::new(),
            live: 0,
            stragglers: IdMap::default(),
        }
    }

    /// Calls in flight.
    pub(crate) fn len(&self) -> usize {
        self.live + self.stragglers.len()
    }

    /// Stores `v` under the next free id and returns the id.
    pub(crate) fn insert(&mut self, v: V) -> u32 {
        loop {
            let seq = self.base + self.slots.len() as u64;
            let id = id_of(seq);
            if self.stragglers.contains_key(&id) {
                // Still in flight from a cycle ago: skip it.
                self.slots.push_back(None);
                continue;
            }
            self.slots.push_back(Some(v));
            self.live += 1;
            self.compact();
            return id;
        }
    }

    /// Takes the value of `id`, if it is in flight.
    pub(crate) fn remove(&mut self, id: u32) -> Option<V> {
        if id == 0 {
            return None;
        }
        let off = ((id as u64 - 1) + CYCLE - self.base % CYCLE) % CYCLE;
        if let Some(slot) = self.slots.get_mut(off as usize) {
            if let Some(v) = slot.take() {
                self.live -= 1;
                self.compact();
                return Some(v);
            }
        }
        self.stragglers.remove(&id).map(|(_, v)| v)
    }

    /// Everything in flight, oldest first, each with its place in the
    /// order the ids were handed out (0 = the first call), if that is
    /// known: while no id was ever skipped (less than one cycle of ids
    /// went out). The window is left empty.
    pub(crate) fn drain_in_order(&mut self) -> Vec<(Option<u64>, V)> {
        let known = self.base + (self.slots.len() as u64) < CYCLE;
        let first = self.base;
        let mut old: Vec<(u64, V)> = self.stragglers.drain().map(|(_, e)| e).collect();
        old.sort_by_key(|e| e.0);
        let mut all: Vec<(Option<u64>, V)> = old
            .into_iter()
            .map(|(seq, v)| (known.then_some(seq), v))
            .collect();
        self.base += self.slots.len() as u64;
        all.extend(
            self.slots
                .drain(..)
                .enumerate()
                .filter_map(|(i, v)| Some((known.then_some(first + i as u64), v?))),
        );
        self.live = 0;
        all
    }

    /// Everything in flight, oldest first; the window is left empty.
    pub(crate) fn drain(&mut self) -> Vec<V> {
        let mut old: Vec<(u64, V)> = self.stragglers.drain().map(|(_, e)| e).collect();
        old.sort_by_key(|e| e.0);
        let mut all: Vec<V> = old.into_iter().map(|e| e.1).collect();
        self.base += self.slots.len() as u64;
        all.extend(self.slots.drain(..).flatten());
        self.live = 0;
        all
    }

    /// Drops finished slots at the front; moves old entries out while the
    /// window is much longer than what it holds.
    fn compact(&mut self) {
        loop {
            while matches!(self.slots.front(), Some(None)) {
                self.slots.pop_front();
                self.base += 1;
            }
            if self.slots.len() <= 2 * self.live + 1024 {
                return;
            }
            if let Some(Some(v)) = self.slots.pop_front() {
                self.live -= 1;
                self.stragglers.insert(id_of(self.base), (self.base, v));
            }
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_calls_keep_their_place_in_the_order_sent() {
        let mut w = Window::starting_at(1);
        let ids: Vec<u32> = (0..5).map(|i| w.insert(i)).collect();
        w.remove(ids[1]);
        w.remove(ids[3]);
        assert_eq!(
            w.drain_in_order(),
            [(Some(0), 0), (Some(2), 2), (Some(4), 4)]
        );
    }

    #[test]
    fn ids_run_in_sequence_and_wrap_to_one() {
        let mut w = Window::starting_at(u32::MAX - 1);
        let ids: Vec<u32> = (0..4).map(|i| w.insert(i)).collect();
        assert_eq!(ids, [u32::MAX - 1, u32::MAX, 1, 2]);
        assert_eq!(w.remove(u32::MAX), Some(1));
        assert_eq!(w.remove(1), Some(2));
        assert_eq!(w.remove(1), None, "taken once");
        assert_eq!(w.remove(0), None);
        assert_eq!(w.len(), 2);
        assert_eq!(w.drain(), [0, 3], "oldest first");
        assert_eq!(w.len(), 0);
        assert_eq!(w.insert(9), 3, "ids go on after a drain");
    }

    #[test]
    fn a_long_lived_call_moves_out_and_its_id_is_skipped_a_cycle_later() {
        let mut w = Window::starting_at(1);
        assert_eq!(w.insert("old"), 1);
        for i in 0..5000u32 {
            let id = w.insert("x");
            assert_eq!(w.remove(id), Some("x"), "call {i}");
        }
        // The window did not grow with the 5000 finished calls.
        assert!(w.slots.len() <= 1025, "{}", w.slots.len());
        assert_eq!(w.stragglers.len(), 1);
        assert_eq!(w.len(), 1);
        // A cycle later, id 1 is still in use: it is skipped.
        let mut w2: Window<&str> = Window::starting_at(u32::MAX);
        w2.stragglers.insert(1, (0, "old"));
        assert_eq!(w2.insert("a"), u32::MAX);
        assert_eq!(w2.insert("b"), 2, "1 is in flight");
        assert_eq!(w2.remove(1), Some("old"));
        assert_eq!(w2.drain(), ["a", "b"]);
    }

    #[test]
    fn out_of_order_replies_find_their_calls() {
        let mut w = Window::starting_at(1);
        let ids: Vec<u32> = (0..100).map(|i| w.insert(i)).collect();
        for (i, &id) in ids.iter().enumerate().rev() {
            assert_eq!(w.remove(id), Some(i));
        }
        assert_eq!(w.len(), 0);
        assert!(w.slots.is_empty());
    }
}
