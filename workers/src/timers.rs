//! Deadlines for sessions. mio has no timers: the loop asks this heap how
//! long it may sleep. A session keeps its true deadline itself and has at
//! most a few entries here: an entry that fires early is re-armed at the
//! session's current deadline, so moving a deadline later costs nothing.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Timers {
    pub fn arm(&mut self, key: usize, at: Instant) {
        self.heap.push(Reverse((at, key)));
    }

    /// How long the loop may sleep before the earliest entry.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// Pops the next entry that is due, as `(key, the time it was armed for)`.
    pub fn expired(&mut self, now: Instant) -> Option<(usize, Instant)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => {
                self.heap.pop().map(|Reverse((at, key))| (key, at))
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
        let late = now + Duration::from_millis(20);
        let early = now + Duration::from_millis(10);
        t.arm(1, late);
        t.arm(2, early);
        assert_eq!(t.timeout(now), Some(Duration::from_millis(10)));
        assert_eq!(t.expired(now), None);
        let later = now + Duration::from_millis(30);
        assert_eq!(t.expired(later), Some((2, early)));
        assert_eq!(t.expired(later), Some((1, late)));
        assert_eq!(t.expired(later), None);
    }
}
