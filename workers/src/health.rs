//! Passive health of a peer, shared by every worker through the peer's
//! state slot: `max_fails` failures within `fail_timeout` take the peer out
//! for `fail_timeout`. Plain atomic operations only: two workers failing at
//! once may both count, which errs on the side of taking a bad peer out.

use std::sync::atomic::Ordering;

use elb_shm::states::StateSlot;

const FAILS: usize = 0;
const WINDOW_START: usize = 1;
const OUT_UNTIL: usize = 2;

/// Milliseconds on CLOCK_MONOTONIC, the clock every process shares.
pub(crate) fn now_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

pub(crate) fn is_out(slot: &StateSlot<'_>, now: u64) -> bool {
    now < slot.word(OUT_UNTIL).load(Ordering::Relaxed)
}

/// Counts a failure; returns true when it took the peer out.
pub(crate) fn record_failure(
    slot: &StateSlot<'_>,
    now: u64,
    max_fails: u32,
    fail_timeout_ms: u64,
) -> bool {
    if max_fails == 0 {
        return false;
    }
    let start = slot.word(WINDOW_START).load(Ordering::Relaxed);
    let fails = if now.saturating_sub(start) >= fail_timeout_ms || start == 0 {
        slot.word(WINDOW_START).store(now.max(1), Ordering::Relaxed);
        slot.word(FAILS).store(1, Ordering::Relaxed);
        1
    } else {
        slot.word(FAILS).fetch_add(1, Ordering::Relaxed) + 1
    };
    if fails >= u64::from(max_fails) {
        slot.word(OUT_UNTIL)
            .store(now + fail_timeout_ms, Ordering::Relaxed);
        slot.word(FAILS).store(0, Ordering::Relaxed);
        slot.word(WINDOW_START).store(0, Ordering::Relaxed);
        return true;
    }
    false
}

/// A success forgets earlier failures (one load when there were none).
pub(crate) fn record_success(slot: &StateSlot<'_>) {
    if slot.word(FAILS).load(Ordering::Relaxed) != 0 {
        slot.word(FAILS).store(0, Ordering::Relaxed);
        slot.word(WINDOW_START).store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_fails_within_the_window_take_a_peer_out_for_fail_timeout() {
        let region = elb_shm::Region::create(1 << 20).expect("region");
        let slot = region.state_slot(3).expect("slot");
        let t = 1_000_000;
        assert!(!record_failure(&slot, t, 2, 10_000));
        assert!(!is_out(&slot, t));
        assert!(record_failure(&slot, t + 5, 2, 10_000));
        assert!(is_out(&slot, t + 9_999));
        assert!(!is_out(&slot, t + 10_005));
        // Failures further apart than the window do not add up.
        assert!(!record_failure(&slot, t + 20_000, 2, 10_000));
        assert!(!record_failure(&slot, t + 31_000, 2, 10_000));
        record_success(&slot);
        assert!(!record_failure(&slot, t + 31_001, 2, 10_000));
        // max_fails = 0: never out.
        let other = region.state_slot(4).expect("slot");
        assert!(!record_failure(&other, t, 0, 10_000));
        assert!(!is_out(&other, t));
    }
}
