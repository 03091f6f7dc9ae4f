//! The log check (lua-resty-upstream-etcd's `logcheck`): from the last
//! five seconds of a peer's answers, counted by the workers in the region
//! (its request counters, `elb_shm::counters`), a peer with more than half
//! of them errors (a status of 400 or more, or no answer) goes out for
//! `recover`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Seconds of answers a decision looks at.
const WINDOW: usize = 5;

/// Log-check settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogCheckConfig {
    pub interval: Duration,
    pub recover: Duration,
}

/// One peer's recent answers and log-check state.
#[derive(Debug, Default)]
pub struct Answers {
    /// The counters as last read: (answers, errors).
    last: Option<(u64, u64)>,
    /// (answers, errors) per second, newest last.
    seconds: VecDeque<(u64, u64)>,
    /// Out until then.
    pub out_until: Option<Instant>,
}

impl Answers {
    /// Takes this second's reading of the peer's counters. Counts that
    /// went down belong to a new entry: they start a new baseline.
    pub fn sample(&mut self, reading: Option<(u64, u64)>) {
        let Some(now) = reading else { return };
        if let Some(before) = self.last
            && now.0 >= before.0
            && now.1 >= before.1
        {
            if self.seconds.len() == WINDOW {
                self.seconds.pop_front();
            }
            self.seconds.push_back((now.0 - before.0, now.1 - before.1));
        }
        self.last = Some(now);
    }

    /// More than half of the window's answers were errors.
    pub fn failing(&self) -> bool {
        let (all, errors) = self
            .seconds
            .iter()
            .fold((0, 0), |(a, e), &(da, de)| (a + da, e + de));
        all > 0 && errors * 2 > all
    }

    pub fn is_out(&self, now: Instant) -> bool {
        self.out_until.is_some_and(|t| now < t)
    }
}

/// Which of an upstream's peers go out now, given which are out already
/// and which are failing: none when the upstream has a single peer, or
/// when more than half of its peers would be out at once.
pub fn decide(peers: usize, already_out: usize, failing: &[usize]) -> &[usize] {
    if peers <= 1 || failing.is_empty() || (already_out + failing.len()) * 2 > peers {
        return &[];
    }
    failing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_half_errors_over_the_window() {
        let mut a = Answers::default();
        a.sample(Some((0, 0)));
        assert!(!a.failing(), "no answer is not failing");
        a.sample(Some((10, 6)));
        assert!(a.failing());
        a.sample(Some((30, 6)));
        assert!(!a.failing(), "6 of 30");
        // Six more seconds of clean answers push the errors out.
        for s in 1..=6 {
            a.sample(Some((30 + 10 * s, 6)));
        }
        assert!(!a.failing());
        // Counters handed out anew start a new baseline, no false alarm.
        let mut w = Answers::default();
        w.sample(Some((100, 3)));
        w.sample(Some((5, 5)));
        assert!(w.seconds.is_empty());
        w.sample(Some((15, 5)));
        assert!(!w.failing());
        assert_eq!(w.seconds.back(), Some(&(10, 0)));
    }

    #[test]
    fn single_peers_and_majorities_stay() {
        assert_eq!(decide(1, 0, &[0]), &[] as &[usize]);
        assert_eq!(decide(3, 0, &[2]), &[2]);
        assert_eq!(decide(3, 0, &[0, 2]), &[] as &[usize]);
        assert_eq!(decide(4, 1, &[3]), &[3]);
        assert_eq!(decide(4, 1, &[2, 3]), &[] as &[usize]);
        assert_eq!(decide(2, 0, &[1]), &[1]);
    }
}
