//! State slots: eight atomic words each, for what every worker updates at
//! run time (an upstream's round-robin cursor, a peer's failure count and
//! out-until time). The master hands out slot numbers with the
//! configuration; workers only do atomic operations on them, so a worker
//! killed between two operations leaves nothing to repair.
//!
//! A slot is handed out again once every worker has applied a
//! configuration without its old owner, but a request may still hold the
//! old owner then (a slow exchange outlives many generations). So each
//! hand-out is an *incarnation*, and a word written by holders of a slot is
//! a [`TaggedWord`]: the incarnation in its top [`TAG_BITS`] bits, the value
//! below. The master's [`StateSlot::reset`] writes every word as (new
//! incarnation, 0); a holder's write is one compare-exchange that succeeds
//! only while the word still carries the holder's incarnation, so a stale
//! holder can never change the new owner's words (a separate "which
//! incarnation" word checked before a write would leave a window between
//! the check and the write).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Region;
use crate::atomic_mem::Mem;
use crate::layout::PEER_SIZE;

/// Words in one slot.
pub const WORDS: usize = PEER_SIZE / 8;

/// Bits of a tagged word that hold the incarnation (the top ones). A stale
/// holder could only be mistaken for the owner after 2^24 more hand-outs of
/// its slot while it still runs.
pub const TAG_BITS: u32 = 24;
/// Bits left for the value: milliseconds on CLOCK_MONOTONIC fit for 34
/// years of uptime.
const PAYLOAD_BITS: u32 = 64 - TAG_BITS;
/// The largest value a tagged word holds; larger ones are stored as this.
pub const PAYLOAD_MAX: u64 = (1 << PAYLOAD_BITS) - 1;

/// One hand-out of a slot; wraps within [`TAG_BITS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incarnation(u32);

impl Incarnation {
    /// From the number published with the configuration (bits past
    /// [`TAG_BITS`] are dropped).
    pub fn from_bits(bits: u32) -> Incarnation {
        Incarnation(bits & ((1 << TAG_BITS) - 1))
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// The incarnation after this one.
    pub fn next(self) -> Incarnation {
        Incarnation::from_bits(self.0.wrapping_add(1))
    }

    fn tag(self) -> u64 {
        u64::from(self.0) << PAYLOAD_BITS
    }
}

/// A view of one state slot.
#[derive(Clone, Copy)]
pub struct StateSlot<'r> {
    mem: Mem<'r>,
}

impl Region {
    /// Number of state slots in this region.
    pub fn state_slots(&self) -> usize {
        self.layout().peers_count
    }

    /// Slot `index`, or `None` past the last.
    pub fn state_slot(&self, index: usize) -> Option<StateSlot<'_>> {
        (index < self.layout().peers_count).then(|| StateSlot {
            mem: self
                .mem()
                .sub(self.layout().peers_off + index * PEER_SIZE, PEER_SIZE),
        })
    }
}

impl<'r> StateSlot<'r> {
    fn word(&self, i: usize) -> &'r AtomicU64 {
        let i = if i < WORDS { i } else { 0 };
        self.mem.u64(i * 8)
    }

    /// Word `i` (`< WORDS`; past the end, word 0) as a plain counter, for
    /// what is used only at pick time with the current configuration (the
    /// round-robin cursor), never by a request later. It starts from
    /// whatever [`Self::reset`] left: callers only care how it moves.
    pub fn counter(&self, i: usize) -> &'r AtomicU64 {
        self.word(i)
    }

    /// Word `i` (`< WORDS`; past the end, word 0) as incarnation
    /// `incarnation` of the slot sees it.
    pub fn tagged(&self, i: usize, incarnation: Incarnation) -> TaggedWord<'r> {
        TaggedWord {
            word: self.word(i),
            tag: incarnation.tag(),
        }
    }

    /// Hands the slot to `incarnation` (master, before publishing the new
    /// owner): every word becomes (`incarnation`, 0).
    pub fn reset(&self, incarnation: Incarnation) {
        for i in 0..WORDS {
            self.word(i).store(incarnation.tag(), Ordering::Relaxed);
        }
    }
}

/// A word of a state slot as one incarnation sees it: reads and writes
/// take effect only while the slot still belongs to that incarnation.
#[derive(Clone, Copy)]
pub struct TaggedWord<'r> {
    word: &'r AtomicU64,
    tag: u64,
}

impl TaggedWord<'_> {
    /// The value; `None` once the slot belongs to another incarnation.
    pub fn load(&self) -> Option<u64> {
        let w = self.word.load(Ordering::Relaxed);
        (w & !PAYLOAD_MAX == self.tag).then_some(w & PAYLOAD_MAX)
    }

    /// Replaces the value `v` by `f(v)` (capped at [`PAYLOAD_MAX`]) in one
    /// compare-exchange, repeated only when another holder of the same
    /// incarnation changed the word meanwhile. Returns the new value, or
    /// `None` (nothing written) once the slot belongs to another
    /// incarnation.
    pub fn update(&self, mut f: impl FnMut(u64) -> u64) -> Option<u64> {
        let mut new = 0;
        self.word
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                (w & !PAYLOAD_MAX == self.tag).then(|| {
                    new = f(w & PAYLOAD_MAX).min(PAYLOAD_MAX);
                    self.tag | new
                })
            })
            .ok()
            .map(|_| new)
    }

    /// Sets the value (see [`Self::update`]); false when the slot belongs
    /// to another incarnation.
    pub fn store(&self, v: u64) -> bool {
        self.update(|_| v).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_incarnation_neither_reads_nor_writes_the_new_owner() {
        let region = Region::create(1 << 20).expect("region");
        let slot = region.state_slot(2).expect("slot");
        let old = Incarnation::from_bits(7);
        slot.reset(old);
        let stale = slot.tagged(1, old);
        assert!(stale.store(42));
        assert_eq!(stale.update(|v| v + 1), Some(43));
        assert_eq!(stale.load(), Some(43));

        // The master hands the slot to the next incarnation.
        let new = old.next();
        slot.reset(new);
        let owner = slot.tagged(1, new);
        assert_eq!(owner.load(), Some(0));
        assert_eq!(stale.load(), None);
        assert!(!stale.store(99));
        assert_eq!(stale.update(|v| v + 1), None);
        assert_eq!(owner.load(), Some(0), "a stale write reached the new owner");
        assert!(owner.store(5));
        assert!(!stale.store(0));
        assert_eq!(owner.load(), Some(5));
        // Other words of the slot, likewise.
        assert_eq!(slot.tagged(0, old).load(), None);
        assert_eq!(slot.tagged(WORDS - 1, new).load(), Some(0));
    }

    #[test]
    fn values_are_capped_and_incarnations_wrap_within_the_tag() {
        let region = Region::create(1 << 20).expect("region");
        let slot = region.state_slot(0).expect("slot");
        let last = Incarnation::from_bits(u32::MAX);
        assert_eq!(last.bits(), (1 << TAG_BITS) - 1);
        slot.reset(last);
        let w = slot.tagged(0, last);
        assert_eq!(w.update(|_| u64::MAX), Some(PAYLOAD_MAX));
        // The cap keeps the value out of the tag.
        assert_eq!(w.load(), Some(PAYLOAD_MAX));
        assert_eq!(last.next(), Incarnation::from_bits(0));
        assert_eq!(slot.tagged(0, last.next()).load(), None);
    }
}
