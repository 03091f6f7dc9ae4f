//! The active check's bookkeeping for one peer: when the next probe is
//! due, failures in a row, and the verdict (lua-resty-upstream-etcd's
//! `max_fails` failed probes in a row take a peer out, one pass brings it
//! back).

use std::time::{Duration, Instant, SystemTime};

/// Active-check settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_fails: u32,
    pub ok_status: Vec<u16>,
    /// Probed for peers whose value names no check URL; `None`: those are
    /// not probed.
    pub check_url: Option<String>,
}

/// One peer's active check.
#[derive(Debug)]
pub struct Active {
    pub fails: u32,
    pub out: bool,
    pub last_check: Option<SystemTime>,
    next: Instant,
    in_flight: bool,
}

/// What a probe result changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Same,
    WentOut,
    CameBack,
}

impl Active {
    /// A peer first seen at `now`; its probes are spread over the interval
    /// by `spread` (0..1) so that many peers do not fire at once.
    pub fn new(now: Instant, interval: Duration, spread: f64) -> Active {
        Active {
            fails: 0,
            out: false,
            last_check: None,
            next: now + interval.mul_f64(spread),
            in_flight: false,
        }
    }

    /// Whether a probe should start now; if so, the next one is planned.
    /// A probe still running is never doubled: a hanging peer is probed at
    /// most once per timeout.
    pub fn due(&mut self, now: Instant, interval: Duration) -> bool {
        if self.in_flight || now < self.next {
            return false;
        }
        self.next += interval;
        if self.next <= now {
            // Far behind (the thread was held up): plan from now.
            self.next = now + interval;
        }
        self.in_flight = true;
        true
    }

    /// Counts a probe's result.
    pub fn record(&mut self, passed: bool, max_fails: u32) -> Verdict {
        self.in_flight = false;
        self.last_check = Some(SystemTime::now());
        if passed {
            self.fails = 0;
            if self.out {
                self.out = false;
                return Verdict::CameBack;
            }
        } else {
            self.fails = self.fails.saturating_add(1);
            if !self.out && self.fails >= max_fails.max(1) {
                self.out = true;
                return Verdict::WentOut;
            }
        }
        Verdict::Same
    }
}

/// Where peers' probes fall within the interval: the golden-ratio
/// sequence over slot numbers spreads any set of them evenly.
pub fn spread(slot: u32) -> f64 {
    (f64::from(slot) * 0.618_033_988_75).fract()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_fails_in_a_row_take_a_peer_out_and_one_pass_brings_it_back() {
        let now = Instant::now();
        let mut a = Active::new(now, Duration::from_secs(1), 0.0);
        assert_eq!(a.record(false, 3), Verdict::Same);
        assert_eq!(a.record(true, 3), Verdict::Same);
        assert_eq!(a.record(false, 3), Verdict::Same);
        assert_eq!(a.record(false, 3), Verdict::Same);
        assert_eq!(a.record(false, 3), Verdict::WentOut);
        assert_eq!(a.record(false, 3), Verdict::Same);
        assert_eq!(a.fails, 4);
        assert_eq!(a.record(true, 3), Verdict::CameBack);
        assert!(!a.out && a.fails == 0 && a.last_check.is_some());
    }

    #[test]
    fn one_probe_at_a_time_on_the_interval() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let mut a = Active::new(now, second, 0.5);
        assert!(!a.due(now, second));
        assert!(a.due(now + second / 2, second));
        // Still running a second later: not doubled.
        assert!(!a.due(now + second * 2, second));
        a.record(true, 1);
        assert!(a.due(now + second * 2, second));
        assert!(!a.due(now + second * 2, second));
    }

    #[test]
    fn spread_stays_in_the_interval() {
        assert!((0..10_000).map(spread).all(|s| (0.0..1.0).contains(&s)));
    }
}
