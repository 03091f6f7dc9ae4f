//! A peer's health, shared by every worker and the master through the
//! peer's state slot:
//!
//! * passive health, written by workers: `max_fails` failures within
//!   `fail_timeout` take the peer out for `fail_timeout`. Plain atomic
//!   operations only: two workers failing at once may both count, which errs
//!   on the side of taking a bad peer out;
//! * the master's verdict ([`PeerHealth::set_checked_out`]): nonzero while
//!   the active check or the log check has the peer out. The log check
//!   reads the peer's request counters (`elb_shm::counters`), not a word
//!   here.
//!
//! Every word is read and written as the incarnation of the slot that the
//! request's peer record names ([`HealthSlot`]): a request still held by a
//! peer that has since been removed, its slot handed to another peer, finds
//! its incarnation gone and changes nothing.

use elb_shm::Region;
use elb_shm::states::{Incarnation, TaggedWord};

const FAILS: usize = 0;
const WINDOW_START: usize = 1;
const OUT_UNTIL: usize = 2;
const CHECKED_OUT: usize = 3;

/// What the master's checks say, as stored in [`CHECKED_OUT`].
pub const OUT_BY_CHECK: u64 = 1;
pub const OUT_BY_LOG: u64 = 2;

/// Milliseconds on CLOCK_MONOTONIC, the clock every process shares.
pub fn now_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Where a peer's health lives: its state slot and the incarnation of the
/// slot the peer was published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSlot {
    pub index: u32,
    pub incarnation: u32,
}

impl HealthSlot {
    /// The words, or `None` when the slot lies outside the region.
    pub fn in_region(self, region: &Region) -> Option<PeerHealth<'_>> {
        let slot = region.state_slot(self.index as usize)?;
        let inc = Incarnation::from_bits(self.incarnation);
        Some(PeerHealth {
            fails: slot.tagged(FAILS, inc),
            window_start: slot.tagged(WINDOW_START, inc),
            out_until: slot.tagged(OUT_UNTIL, inc),
            checked_out: slot.tagged(CHECKED_OUT, inc),
        })
    }
}

/// A peer's health words, as one incarnation of its slot sees them.
pub struct PeerHealth<'r> {
    fails: TaggedWord<'r>,
    window_start: TaggedWord<'r>,
    out_until: TaggedWord<'r>,
    checked_out: TaggedWord<'r>,
}

impl PeerHealth<'_> {
    /// Whether passive health has the peer out at `now`.
    pub fn passively_out(&self, now: u64) -> bool {
        self.out_until.load().is_some_and(|until| now < until)
    }

    /// Failures counted in the current passive window.
    pub fn passive_fails(&self) -> u64 {
        self.fails.load().unwrap_or(0)
    }

    /// The master's verdict: [`OUT_BY_CHECK`] and/or [`OUT_BY_LOG`], or 0.
    /// False when the slot belongs to another incarnation.
    pub fn set_checked_out(&self, reasons: u64) -> bool {
        self.checked_out.store(reasons)
    }
}

/// Two loads. A slot that now belongs to another incarnation is not out
/// (pick-time callers hold the current incarnation anyway).
pub(crate) fn is_out(h: &PeerHealth<'_>, now: u64) -> bool {
    h.passively_out(now) || h.checked_out.load().is_some_and(|v| v != 0)
}

/// Counts a failure; returns true when it took the peer out. Nothing is
/// written once the slot belongs to another incarnation.
pub(crate) fn record_failure(
    h: &PeerHealth<'_>,
    now: u64,
    max_fails: u32,
    fail_timeout_ms: u64,
) -> bool {
    if max_fails == 0 {
        return false;
    }
    let Some(start) = h.window_start.load() else {
        return false;
    };
    let fails = if now.saturating_sub(start) >= fail_timeout_ms || start == 0 {
        if !h.window_start.store(now.max(1)) || !h.fails.store(1) {
            return false;
        }
        1
    } else {
        match h.fails.update(|f| f + 1) {
            Some(f) => f,
            None => return false,
        }
    };
    if fails >= u64::from(max_fails) && h.out_until.store(now + fail_timeout_ms) {
        h.fails.store(0);
        h.window_start.store(0);
        return true;
    }
    false
}

/// A success forgets earlier failures (one load when there were none).
pub(crate) fn record_success(h: &PeerHealth<'_>) {
    if h.fails.load().is_some_and(|f| f != 0) && h.fails.store(0) {
        h.window_start.store(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(region: &Region, index: u32, incarnation: u32) -> PeerHealth<'_> {
        HealthSlot { index, incarnation }
            .in_region(region)
            .expect("slot")
    }

    #[test]
    fn max_fails_within_the_window_take_a_peer_out_for_fail_timeout() {
        let region = Region::create(1 << 20).expect("region");
        let slot = health(&region, 3, 0);
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
        let other = health(&region, 4, 0);
        assert!(!record_failure(&other, t, 0, 10_000));
        assert!(!is_out(&other, t));
    }

    #[test]
    fn a_holder_of_an_earlier_incarnation_changes_nothing() {
        let region = Region::create(1 << 20).expect("region");
        let state = region.state_slot(5).expect("slot");
        let t = 1_000_000;
        state.reset(Incarnation::from_bits(1));
        let stale = health(&region, 5, 1);
        assert!(!record_failure(&stale, t, 2, 10_000), "one of two");
        // The slot goes to another peer; the old holder fails again.
        state.reset(Incarnation::from_bits(2));
        let owner = health(&region, 5, 2);
        assert!(!record_failure(&stale, t + 1, 1, 10_000));
        assert!(!is_out(&owner, t + 2));
        assert!(!is_out(&stale, t + 2));
        record_success(&stale);
        // The owner's own count starts from nothing: one of two is not out.
        assert!(!record_failure(&owner, t + 3, 2, 10_000));
        assert!(!is_out(&owner, t + 4));
        assert!(record_failure(&owner, t + 5, 2, 10_000));
        assert!(is_out(&owner, t + 6));
        // A stale success does not forget the owner's failures either.
        assert!(!record_failure(&owner, t + 20_000, 2, 10_000));
        record_success(&stale);
        assert!(record_failure(&owner, t + 20_001, 2, 10_000));
    }

    #[test]
    fn the_masters_verdict_takes_a_peer_out() {
        let region = Region::create(1 << 20).expect("region");
        region
            .state_slot(6)
            .expect("slot")
            .reset(Incarnation::from_bits(3));
        let h = health(&region, 6, 3);
        let t = 1_000_000;
        assert!(!is_out(&h, t));
        assert!(h.set_checked_out(OUT_BY_LOG));
        assert!(is_out(&h, t));
        assert!(h.set_checked_out(0));
        assert!(!is_out(&h, t));
        // Another incarnation can neither write it nor see it.
        let stale = health(&region, 6, 2);
        assert!(!stale.set_checked_out(OUT_BY_CHECK));
        assert!(!is_out(&h, t));
        assert!(!is_out(&stale, t));
    }
}
