//! Slow start: a peer that joins while ELB runs, or comes back from being
//! out, takes its weight linearly from 1/S of it to all of it over its
//! `slow_start` S seconds (nginx Plus's `slow_start`). The master publishes
//! each step as a new schedule, so that every worker follows the same ramp
//! and a pick stays one atomic add.

use std::time::{Duration, Instant};

/// The part of its weight a ramping peer has, in thousandths.
pub const FULL: u32 = 1000;

/// The part of its weight, in thousandths, that a peer ramping since
/// `since` over `over` has at `now`; `None` once the ramp is over.
pub fn part(since: Instant, over: Duration, now: Instant) -> Option<u32> {
    let elapsed = now.saturating_duration_since(since);
    if over.is_zero() || elapsed >= over {
        return None;
    }
    let floor = 1.0 / over.as_secs_f64().max(1.0);
    let linear = elapsed.as_secs_f64() / over.as_secs_f64();
    // Below FULL: elapsed < over; at least 1.
    Some(((linear.max(floor) * f64::from(FULL)) as u32).clamp(1, FULL - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_from_one_sth_to_full() {
        let t = Instant::now();
        let s = Duration::from_secs(4);
        assert_eq!(part(t, s, t), Some(250));
        assert_eq!(part(t, s, t + Duration::from_millis(500)), Some(250));
        assert_eq!(part(t, s, t + Duration::from_secs(2)), Some(500));
        assert_eq!(part(t, s, t + Duration::from_secs(3)), Some(750));
        assert_eq!(part(t, s, t + s), None);
        assert_eq!(part(t, Duration::ZERO, t), None);
        // Long ramps start at a thousandth at least.
        assert_eq!(part(t, Duration::from_secs(3600), t), Some(1));
    }
}
