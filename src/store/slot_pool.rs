//! The region's state slots, handed out by the master to upstreams (their
//! round-robin cursors) and peers (their health words).

use elb_shm::Region;
use elb_shm::states::Incarnation;

/// A state slot as handed out: which, and which hand-out of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Held {
    pub index: u32,
    pub incarnation: Incarnation,
}

/// State slots handed out by the master; a retired slot is reused only
/// once every worker has moved past the generation that dropped it. A
/// request may hold a peer longer than that: each hand-out is a new
/// incarnation of the slot, and a holder of an older one can no longer
/// change the slot (see `elb_shm::states`).
pub(super) struct SlotPool {
    free: Vec<u32>,
    next: u32,
    limit: u32,
    retired: Vec<(u32, u64)>,
    /// The last incarnation of each slot handed out so far, by index.
    incarnations: Vec<Incarnation>,
}

impl SlotPool {
    pub fn new(limit: usize) -> SlotPool {
        SlotPool {
            free: Vec::new(),
            next: 0,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            retired: Vec::new(),
            incarnations: Vec::new(),
        }
    }

    pub fn available(&self) -> usize {
        self.free.len() + (self.limit - self.next) as usize
    }

    /// A free slot (the last retired one first), as its next incarnation,
    /// every word of it reset to that incarnation.
    pub fn take(&mut self, region: &Region) -> Option<Held> {
        let index = self.free.pop().or_else(|| {
            (self.next < self.limit).then(|| {
                self.next += 1;
                self.incarnations.push(Incarnation::default());
                self.next - 1
            })
        })?;
        let incarnation = self.incarnations.get_mut(index as usize).map(|i| {
            *i = i.next();
            *i
        })?;
        if let Some(s) = region.state_slot(index as usize) {
            s.reset(incarnation);
        }
        Some(Held { index, incarnation })
    }

    /// Slots taken for a change that was refused: never handed out.
    pub fn give_back(&mut self, slots: Vec<u32>) {
        self.free.extend(slots);
    }

    /// `slot` is unused from the generation after `generation` on.
    pub fn retire(&mut self, slot: u32, generation: u64) {
        self.retired.push((slot, generation + 1));
    }

    pub fn release_before(&mut self, applied_by_all: u64) {
        let (ready, wait): (Vec<_>, Vec<_>) = self
            .retired
            .drain(..)
            .partition(|(_, g)| *g <= applied_by_all);
        self.retired = wait;
        self.free.extend(ready.into_iter().map(|(s, _)| s));
    }
}
