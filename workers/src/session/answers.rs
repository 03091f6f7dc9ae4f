//! A peer's answer (or its failure to give one), counted once where the
//! master reads it: the peer's counters entry (status and response time,
//! for the log check and `/__erulb__/stats`) and its upstream's
//! response-time histogram (`/__erulb__/metrics`).

use std::time::Instant;

use crate::route::Picked;

use super::Cx;

/// Counts `status` for `peer`, whose attempt began at `since` (now when
/// it never began). The time is
/// to the answer's head (or the failure): what the peer itself took.
pub(super) fn count(cx: &Cx<'_>, peer: &Picked, status: u16, since: Option<Instant>) {
    let ms = u64::try_from(
        cx.now
            .saturating_duration_since(since.unwrap_or(cx.now))
            .as_millis(),
    )
    .unwrap_or(u64::MAX);
    let (index, workers) = (cx.args.index, cx.args.workers);
    if let Some(c) = peer
        .counters
        .and_then(|e| cx.region.counters(index, workers, e as usize))
    {
        c.count(status, ms);
    }
    if let Some(h) = peer
        .response_times
        .and_then(|e| cx.region.histogram(index, workers, e as usize))
    {
        h.observe(ms);
    }
}
