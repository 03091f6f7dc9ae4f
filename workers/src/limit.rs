//! The buckets of `limit` rules (`rules::Limit`), in the region's
//! dictionary: one integer per (domain, rule, key), read and written in one
//! hold of the dictionary's lock, so every worker counts into the same
//! bucket. A request meets the lock only when its walk reaches a `limit`
//! rule. Rejections are counted in the dictionary too, per domain and rule,
//! for the master's `/metrics` and `/status`.

use std::time::Duration;

use elb_shm::Region;
use elb_shm::dict::Value;

use crate::rules::{Limit, Verdict};

/// Longest key value kept as it is in a bucket's name.
const MAX_KEY_BYTES: usize = 256;

// Keys of the dictionary that are not buckets start with 0x01, which no
// domain name does.
const REJECTED: &[u8] = b"\x01rejected\x00";
const EVICTIONS: &[u8] = b"\x01evictions";

/// The verdict of `l`'s bucket for a request of `domain` keyed by `key`.
/// `bucket` is the caller's buffer for the dictionary key. A dictionary
/// that cannot answer (it never should) lets the request pass: a limit is
/// not worth an outage.
pub(crate) fn check(
    region: &Region,
    bucket: &mut Vec<u8>,
    domain: &[u8],
    l: &Limit,
    key: &[u8],
) -> Verdict {
    bucket.clear();
    bucket.extend_from_slice(domain);
    bucket.push(0);
    bucket.extend_from_slice(l.name.as_bytes());
    bucket.push(0);
    if key.len() <= MAX_KEY_BYTES {
        bucket.extend_from_slice(key);
    } else {
        // A long value (a header can be 64k) is named by its hash, so that
        // every bucket fits the dictionary and no client escapes its limit
        // by sending a huge key. `DefaultHasher::new` has fixed keys: every
        // worker names the same bucket.
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hasher::write(&mut h, key);
        bucket.extend_from_slice(b"#");
        bucket.extend_from_slice(&std::hash::Hasher::finish(&h).to_be_bytes());
    }
    let dict = region.dict();
    let answer = dict.update_int(bucket, |state, now| {
        let (next, verdict) = l.admit(state, now);
        let store = next.map(|(s, ttl_ms)| (s, Some(Duration::from_millis(ttl_ms))));
        (store, verdict)
    });
    match answer {
        Ok((verdict, outcome)) => {
            if outcome.forcible {
                let _ = dict.incr(EVICTIONS, 1, Some(0), None);
            }
            if let Verdict::Over { .. } = verdict {
                rejected_key(bucket, domain, l.name.as_bytes());
                let _ = dict.incr(bucket, 1, Some(0), None);
            }
            verdict
        }
        Err(e) => {
            log::debug!("limit {}: the dictionary refused the bucket: {e}", l.name);
            Verdict::Pass
        }
    }
}

/// Requests the `limit` rule `rule` of `domain` refused, in all workers.
pub fn rejected(region: &Region, domain: &str, rule: &str) -> u64 {
    let mut key = Vec::new();
    rejected_key(&mut key, domain.as_bytes(), rule.as_bytes());
    counter(region, &key)
}

/// The dictionary key of a rule's rejection count, into `buf`.
fn rejected_key(buf: &mut Vec<u8>, domain: &[u8], rule: &[u8]) {
    buf.clear();
    buf.extend_from_slice(REJECTED);
    buf.extend_from_slice(domain);
    buf.push(0);
    buf.extend_from_slice(rule);
}

/// Buckets evicted while they had not drained, to make room.
pub fn evictions(region: &Region) -> u64 {
    counter(region, EVICTIONS)
}

fn counter(region: &Region, key: &[u8]) -> u64 {
    match region.dict().get(key) {
        Ok(Some((Value::Int(n), _))) => u64::try_from(n).unwrap_or(0),
        _ => 0,
    }
}
