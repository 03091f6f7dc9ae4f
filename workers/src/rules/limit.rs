//! The `limit` rule: nginx's `limit_req` (a leaky bucket with `nodelay`)
//! as one more filter of the graph.
//!
//! ```json
//! {"type": "limit", "args": {"rate": "100r/s", "burst": 20, "key": "remote_addr",
//!                            "succ": "…", "fail": "…"}}
//! ```
//!
//! Within the rate a request follows `succ`; over it, `fail`, or without
//! `fail` it is answered 429 with `Retry-After`. A bucket is one integer in
//! the region's dictionary, shared by every worker, so the instance allows
//! the rate once, not once per worker. It holds nginx's two numbers packed:
//! the excess over the rate in thousandths of a request, and when it was
//! last updated ([`Limit::admit`] is the arithmetic).

use serde_json::{Map, Value};

use super::RuleError;

/// Most requests per second (or minute) a rate may name.
const MAX_RATE: u64 = 1_000_000;
/// Largest burst.
// The excess, in thousandths, must fit the 23 bits the packed bucket leaves
// it: (8,000 + 1) × 1000 < 2^23.
const MAX_BURST: u64 = 8_000;
/// Bits of the packed bucket that hold the time of the last update.
const TIME_BITS: u32 = 40;
const TIME_MASK: i64 = (1 << TIME_BITS) - 1;

/// What a request is counted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client's address.
    RemoteAddr,
    /// The request's `Host`.
    Host,
    /// A request header's value (its name lower-cased); a request without
    /// it counts by its address.
    Header(String),
}

/// A compiled `limit` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The rule's name: with the domain and the key's value, it names the
    /// bucket.
    pub name: String,
    /// Millionths of a request per second, so that `1r/m` drains at its
    /// rate to the millisecond.
    rate: u64,
    /// Requests allowed at once beyond the rate.
    burst: u64,
    pub key: LimitKey,
}

/// What the bucket says of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Over the rate: a request would pass again in this many seconds
    /// (at least 1).
    Over {
        retry_after: u64,
    },
}

impl Limit {
    /// The bucket's next state and the verdict on one request at `now_ms`,
    /// given its state (`None`: a new or drained bucket). nginx's
    /// arithmetic: the excess drains at the rate and each request adds one
    /// (1000 thousandths); past `burst` the request is refused and the
    /// bucket is left as it was. The state is kept until it would have
    /// drained (its expiry).
    pub fn admit(&self, state: Option<i64>, now_ms: u64) -> (Option<(i64, u64)>, Verdict) {
        let (excess, last) = state.map_or((0, now_ms), |s| {
            ((s >> TIME_BITS) as u64, (s & TIME_MASK) as u64)
        });
        let elapsed = now_ms.saturating_sub(last);
        let drained = excess.saturating_sub(self.drains_in(elapsed));
        let next = drained + 1000;
        if next > self.burst * 1000 + 1000 {
            // nginx counts the request that just passes as in the bucket;
            // the wait is for the excess to drain below the burst.
            let over = next - self.burst * 1000 - 1000;
            return (
                None,
                Verdict::Over {
                    retry_after: self.time_to_drain(over).div_ceil(1000).max(1),
                },
            );
        }
        let packed = ((next as i64) << TIME_BITS) | (now_ms as i64 & TIME_MASK);
        // Until it has drained; at least a second, so a bucket is not
        // dropped between two close requests.
        let ttl_ms = self.time_to_drain(next).max(1000);
        (Some((packed, ttl_ms)), Verdict::Pass)
    }

    /// Thousandths of a request the bucket loses in `ms` milliseconds.
    fn drains_in(&self, ms: u64) -> u64 {
        let d = u128::from(self.rate) * u128::from(ms) / 1_000_000;
        u64::try_from(d).unwrap_or(u64::MAX)
    }

    /// Milliseconds to lose `excess` thousandths of a request.
    fn time_to_drain(&self, excess: u64) -> u64 {
        let ms = (u128::from(excess) * 1_000_000).div_ceil(u128::from(self.rate.max(1)));
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// The rule's own fields from its `args`.
    pub(super) fn compile(name: &str, args: &Map<String, Value>) -> Result<Limit, RuleError> {
        let bad = |key: &'static str, why: String| RuleError::BadLimit {
            rule: name.to_owned(),
            key,
            why,
        };
        let rate_text = args
            .get("rate")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("rate", "missing, or not a string such as \"100r/s\"".into()))?;
        let rate = parse_rate(rate_text).ok_or_else(|| {
            bad(
                "rate",
                format!("'{rate_text}' is not N r/s or N r/m (1 to {MAX_RATE})"),
            )
        })?;
        let burst = match args.get("burst") {
            None => 0,
            Some(v) => v.as_u64().filter(|b| *b <= MAX_BURST).ok_or_else(|| {
                bad(
                    "burst",
                    format!("{v} is not a whole number from 0 to {MAX_BURST}"),
                )
            })?,
        };
        let key = match args.get("key").map(|k| k.as_str()) {
            None | Some(Some("remote_addr")) => LimitKey::RemoteAddr,
            Some(Some("host")) => LimitKey::Host,
            Some(Some(k)) => match k.strip_prefix("header:") {
                Some(h)
                    if !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b':') =>
                {
                    LimitKey::Header(h.to_ascii_lowercase())
                }
                _ => {
                    return Err(bad(
                        "key",
                        format!("'{k}' is not remote_addr, host or header:NAME"),
                    ));
                }
            },
            Some(None) => return Err(bad("key", "must be a string".into())),
        };
        Ok(Limit {
            name: name.to_owned(),
            rate,
            burst,
            key,
        })
    }
}

/// `100r/s` or `6000r/m` in millionths of a request per second.
fn parse_rate(text: &str) -> Option<u64> {
    let (n, per_minute) = match text.strip_suffix("r/s") {
        Some(n) => (n, false),
        None => (text.strip_suffix("r/m")?, true),
    };
    let n: u64 = n.parse().ok().filter(|n| (1..=MAX_RATE).contains(n))?;
    Some(if per_minute {
        (n * 1_000_000).div_ceil(60)
    } else {
        n * 1_000_000
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: &str, burst: u64) -> Limit {
        let args = serde_json::json!({"rate": rate, "burst": burst});
        Limit::compile("l", args.as_object().expect("object")).expect("limit")
    }

    /// Requests at `times` (ms); which passed.
    fn run(l: &Limit, times: &[u64]) -> Vec<bool> {
        let mut state = None;
        times
            .iter()
            .map(|&t| {
                let (next, v) = l.admit(state, t);
                if let Some((s, _)) = next {
                    state = Some(s);
                }
                v == Verdict::Pass
            })
            .collect()
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate() {
        let l = limit("5r/s", 0);
        // Five at once: only the first; then one per 200 ms.
        assert_eq!(
            run(&l, &[1000, 1000, 1000, 1000, 1000]),
            [true, false, false, false, false]
        );
        assert_eq!(
            run(&l, &[1000, 1100, 1200, 1400, 1600]),
            [true, false, true, true, true]
        );
        let b = limit("1r/s", 10);
        let at_once: Vec<u64> = vec![5000; 12];
        let passed = run(&b, &at_once);
        assert_eq!(
            passed.iter().filter(|p| **p).count(),
            11,
            "burst 10: 11 at once"
        );
        // The refusal says when to come back.
        let (_, v) = b.admit(Some(((11_000i64) << TIME_BITS) | 5000), 5000);
        assert_eq!(v, Verdict::Over { retry_after: 1 });
        let slow = limit("6r/m", 0);
        let (_, v) = slow.admit(Some((1000i64 << TIME_BITS) | 5000), 5000);
        assert_eq!(v, Verdict::Over { retry_after: 10 });
    }

    #[test]
    fn an_idle_bucket_refills_and_expires_when_drained() {
        let l = limit("10r/s", 2);
        assert_eq!(run(&l, &[0, 0, 0, 0]), [true, true, true, false]);
        assert_eq!(
            run(&l, &[0, 0, 0, 300, 300, 300, 301]),
            [true, true, true, true, true, true, false]
        );
        let (next, _) = l.admit(None, 0);
        assert_eq!(next.map(|(_, ttl)| ttl), Some(1000));
    }

    #[test]
    fn rates_bursts_and_keys_are_checked() {
        assert_eq!(parse_rate("100r/s"), Some(100_000_000));
        assert_eq!(parse_rate("60r/m"), Some(1_000_000));
        assert_eq!(parse_rate("1r/m"), Some(16_667));
        for bad in ["", "r/s", "0r/s", "-1r/s", "10r/h", "1.5r/s", "10 r/s"] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
        let compile =
            |args: serde_json::Value| Limit::compile("l", args.as_object().expect("object"));
        assert!(compile(serde_json::json!({"rate": "1r/s", "burst": -1})).is_err());
        assert!(compile(serde_json::json!({"rate": "1r/s", "key": "cookie"})).is_err());
        assert!(compile(serde_json::json!({"rate": "1r/s", "key": "header:"})).is_err());
        assert!(compile(serde_json::json!({"burst": 1})).is_err());
        assert_eq!(
            compile(serde_json::json!({"rate": "1r/s", "key": "header:X-Api-Key"})).map(|l| l.key),
            Ok(LimitKey::Header("x-api-key".into()))
        );
    }
}
