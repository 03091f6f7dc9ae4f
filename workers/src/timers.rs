//! Deadlines for connections. mio has no timers: the loop asks this heap how
//! long it may sleep. A connection re-arming its deadline leaves the old
//! entry behind; entries whose stamp no longer matches are skipped.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_stamp: u64,
}

impl Timers {
    /// Arms a deadline for `key`; returns the stamp that identifies it.
    pub fn arm(&mut self, key: usize, at: Instant) -> u64 {
        self.next_stamp += 1;
        self.heap.push(Reverse((at, key, self.next_stamp)));
        self.next_stamp
    }

    /// How long the loop may sleep before the earliest deadline.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _, _))| at.saturating_duration_since(now))
    }

    /// Pops the next deadline that has passed, as `(key, stamp)`.
    pub fn expired(&mut self, now: Instant) -> Option<(usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => {
                self.heap.pop().map(|Reverse((_, key, stamp))| (key, stamp))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_come_out_in_order() {
        let mut t = Timers::default();
        let now = Instant::now();
        let late = t.arm(1, now + Duration::from_millis(20));
        let early = t.arm(2, now + Duration::from_millis(10));
        assert_eq!(t.timeout(now), Some(Duration::from_millis(10)));
        assert_eq!(t.expired(now), None);
        let later = now + Duration::from_millis(30);
        assert_eq!(t.expired(later), Some((2, early)));
        assert_eq!(t.expired(later), Some((1, late)));
        assert_eq!(t.expired(later), None);
    }
}
