//! Expiry times: absolute `CLOCK_MONOTONIC` milliseconds, the same clock in
//! every process of the machine (so an item set by one worker expires at
//! the same moment for all), 0 meaning never.

use std::time::Duration;

pub(super) fn now_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000,
        // Cannot happen on Linux; 1 keeps "expired" meaningful.
        Err(_) => 1,
    }
}

pub(super) fn expiry(now: u64, exptime: Option<Duration>) -> u64 {
    match exptime {
        None => 0,
        Some(d) if d.is_zero() => 0,
        Some(d) => {
            let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
            now.saturating_add(ms)
        }
    }
}

pub(super) fn is_expired(expires: u64, now: u64) -> bool {
    expires != 0 && expires <= now
}
