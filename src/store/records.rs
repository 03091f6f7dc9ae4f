//! What the store writes for the workers (an upstream's record, with its
//! smooth-WRR schedules) and the checks names pass before anything is
//! written.

use crate::health::ramp;
use crate::schedule::smooth_wrr_schedule;
use elb_workers::published::{PeerRecord, UpstreamRecord};

use super::{ResolvedPeers, StoreError, Upstream};

/// Whether `up` has exactly these peers, addresses and parameters.
pub(super) fn same_peers(up: &Upstream, list: &ResolvedPeers) -> bool {
    up.peers.len() == list.len()
        && up
            .peers
            .iter()
            .zip(list)
            .all(|((n1, p), (n2, (addr, params)))| {
                n1 == n2 && p.addr == *addr && p.params == *params
            })
}

pub(super) fn record(up: &Upstream) -> Vec<u8> {
    let peers: Vec<PeerRecord> = up
        .peers
        .iter()
        .map(|(name, p)| PeerRecord {
            name: name.clone(),
            addr: p.addr,
            slot: p.slot.index,
            incarnation: p.slot.incarnation.bits(),
            max_fails: p.params.max_fails,
            fail_timeout_ms: p.params.fail_timeout_ms,
            available: p.params.is_available(),
            counters: p.counters,
        })
        .collect();
    // Weights are in thousandths (a fractional weight is exact), and a
    // ramping peer has its part of its weight, in thousandths of it; the
    // schedule builder divides by the common factor again.
    let weights = |backup: bool| -> Vec<u32> {
        up.peers
            .iter()
            .map(|(name, p)| {
                if p.params.backup != backup || !p.params.is_available() {
                    return 0;
                }
                let w = p.params.weight.milli();
                match up.ramps.get(name) {
                    Some(&part) => {
                        let ramped = u64::from(w) * u64::from(part) / u64::from(ramp::FULL);
                        u32::try_from(ramped).unwrap_or(w).max(1)
                    }
                    None => w,
                }
            })
            .collect()
    };
    let rec = UpstreamRecord {
        cursor_slot: up.cursor_slot,
        response_times: up.response_times,
        peers,
        schedule: smooth_wrr_schedule(&weights(false)),
        backup_schedule: smooth_wrr_schedule(&weights(true)),
    };
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(&rec).unwrap_or_default()
}

pub(super) fn check_domain(d: &str) -> Result<(), StoreError> {
    let ok = !d.is_empty()
        && d.len() <= 255
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'*'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Domain {
            domain: d.to_string(),
            reason: "not a host name".into(),
        })
    }
}

pub(super) fn check_upstream_name(n: &str) -> Result<(), StoreError> {
    let ok =
        !n.is_empty() && n.len() <= 255 && !n.bytes().any(|b| b.is_ascii_whitespace() || b == b'/');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Upstream {
            upstream: n.to_string(),
            reason: "not a name (1 to 255 bytes, no space or '/')".into(),
        })
    }
}
