//! State slots: eight atomic words each, for what every worker updates at
//! run time (an upstream's round-robin cursor, a peer's failure count and
//! out-until time). The master hands out slot numbers with the
//! configuration; workers only do atomic operations on them, so a worker
//! killed between two operations leaves nothing to repair.

use std::sync::atomic::AtomicU64;

use crate::Region;
use crate::atomic_mem::u64_at;
use crate::layout::PEER_SIZE;

/// Words in one slot.
pub const WORDS: usize = PEER_SIZE / 8;

/// A view of one state slot.
#[derive(Clone, Copy)]
pub struct StateSlot<'r> {
    base: *mut u8,
    _region: std::marker::PhantomData<&'r Region>,
}

impl Region {
    /// Number of state slots in this region.
    pub fn state_slots(&self) -> usize {
        self.layout().peers_count
    }

    /// Slot `index`, or `None` past the last.
    pub fn state_slot(&self, index: usize) -> Option<StateSlot<'_>> {
        (index < self.layout().peers_count).then(|| StateSlot {
            // SAFETY: the slot lies inside the peers zone of this mapping.
            base: unsafe { self.base().add(self.layout().peers_off + index * PEER_SIZE) },
            _region: std::marker::PhantomData,
        })
    }
}

impl StateSlot<'_> {
    /// Word `i` (`< WORDS`) of the slot; words past the end read as word 0.
    pub fn word(&self, i: usize) -> &AtomicU64 {
        let i = if i < WORDS { i } else { 0 };
        // SAFETY: the slot is PEER_SIZE bytes inside the mapping, which
        // outlives this view; i * 8 < PEER_SIZE and is 8-aligned.
        unsafe { u64_at(self.base, i * 8) }
    }

    /// Zeroes the slot (master, before handing it out again).
    pub fn clear(&self) {
        for i in 0..WORDS {
            self.word(i).store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
