//! Request statistics, as lua-resty-upstream-etcd's logger kept them: per
//! upstream and peer, per second, the count of each status and the sum of
//! response times, for the last [`KEEP`] seconds; and the instance's
//! requests per second. The workers only count, into the region; a thread
//! of the master reads their counters once a second ([`start`]) and keeps
//! what changed, which `/__erulb__/stats` and `/stats/tps` report.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use elb_shm::counters::Counts;
use serde::Serialize;

use crate::store::Store;

/// Seconds kept, and the largest `offset` a report covers.
pub const KEEP: u64 = 60;

/// One second of a peer's answers.
#[derive(Debug, Clone)]
struct Second {
    /// Unix seconds.
    at: u64,
    rtsum_ms: u64,
    codes: Vec<(u16, u64)>,
}

#[derive(Debug, Default)]
struct PeerSeconds {
    /// The peer's counters as last read.
    last: Counts,
    /// Seconds with answers, oldest first.
    seconds: VecDeque<Second>,
}

/// Every peer's recent seconds, and the instance's.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// By upstream, then peer name.
    peers: BTreeMap<String, BTreeMap<String, PeerSeconds>>,
    /// Requests of every domain: as last read, and per second.
    last_total: u64,
    totals: VecDeque<(u64, u64)>,
}

/// A peer's counters as read now: (upstream, peer name, counts).
pub type Reading = (String, String, Counts);

/// `GET /__erulb__/stats`: the original's report.
#[derive(Debug, Serialize, PartialEq)]
pub struct Report {
    pub name: String,
    pub ts_start: u64,
    pub ts_end: u64,
    pub statistics: Vec<PeerReport>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PeerReport {
    pub peer: String,
    /// Seconds, summed over the answers.
    pub rtsum: f64,
    pub stat: Vec<CodeCount>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct CodeCount {
    pub code: u16,
    pub count: u64,
}

impl RequestStats {
    /// Takes this second's readings: every peer that has counters, and the
    /// requests of every domain. Peers not read any more are forgotten.
    pub fn sample(&mut self, now: u64, readings: Vec<Reading>, total: u64) {
        let mut next: BTreeMap<String, BTreeMap<String, PeerSeconds>> = BTreeMap::new();
        for (upstream, peer, counts) in readings {
            let mut s = self
                .peers
                .get_mut(&upstream)
                .and_then(|u| u.remove(&peer))
                .unwrap_or_default();
            // Fewer than last time: the entry was handed out anew.
            let d = if counts.requests < s.last.requests {
                counts.clone()
            } else {
                counts.since(&s.last)
            };
            if d.requests > 0 {
                s.seconds.push_back(Second {
                    at: now,
                    rtsum_ms: d.cost_ms,
                    codes: d.codes,
                });
            }
            while s.seconds.front().is_some_and(|f| f.at + KEEP <= now) {
                s.seconds.pop_front();
            }
            s.last = counts;
            next.entry(upstream).or_default().insert(peer, s);
        }
        self.peers = next;
        self.totals
            .push_back((now, total.saturating_sub(self.last_total)));
        self.last_total = total;
        while self.totals.front().is_some_and(|f| f.0 + KEEP <= now) {
            self.totals.pop_front();
        }
    }

    /// The report of `upstream` (only `peer` when given, by its name as
    /// given) over the `offset` seconds up to `now`; no peer in it before
    /// the upstream's first sample.
    pub fn report(&self, upstream: &str, peer: Option<&str>, offset: u64, now: u64) -> Report {
        let offset = offset.clamp(1, KEEP);
        let statistics = self
            .peers
            .get(upstream)
            .into_iter()
            .flatten()
            .filter(|(name, _)| peer.is_none_or(|p| p == name.as_str()))
            .map(|(name, s)| {
                let mut rtsum_ms = 0;
                let mut codes: BTreeMap<u16, u64> = BTreeMap::new();
                for sec in s.seconds.iter().filter(|s| s.at + offset > now) {
                    rtsum_ms += sec.rtsum_ms;
                    for &(code, n) in &sec.codes {
                        *codes.entry(code).or_default() += n;
                    }
                }
                PeerReport {
                    peer: name.clone(),
                    rtsum: rtsum_ms as f64 / 1000.0,
                    stat: codes
                        .into_iter()
                        .map(|(code, count)| CodeCount { code, count })
                        .collect(),
                }
            })
            .collect();
        Report {
            name: upstream.to_string(),
            ts_start: now.saturating_sub(offset),
            ts_end: now,
            statistics,
        }
    }

    /// Requests per second of every domain over the `offset` seconds up to
    /// `now`.
    pub fn tps(&self, offset: u64, now: u64) -> f64 {
        let offset = offset.clamp(1, KEEP);
        let n: u64 = self
            .totals
            .iter()
            .filter(|(at, _)| at + offset > now)
            .map(|(_, n)| n)
            .sum();
        n as f64 / offset as f64
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts the thread that samples the counters every second.
pub fn start(store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("elb-stats".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                store
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .sample_stats(unix_now());
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, cost_ms: u64, codes: &[(u16, u64)]) -> Counts {
        Counts {
            requests,
            cost_ms,
            codes: codes.to_vec(),
            ..Counts::default()
        }
    }

    fn reading(peer: &str, c: Counts) -> Reading {
        ("web".into(), peer.into(), c)
    }

    #[test]
    fn seconds_add_up_over_the_offset_and_age_out() {
        let mut s = RequestStats::default();
        let t = 1_000;
        s.sample(t, vec![reading("a", counts(3, 30, &[(200, 3)]))], 3);
        s.sample(
            t + 1,
            vec![reading("a", counts(5, 50, &[(200, 4), (502, 1)]))],
            5,
        );
        let r = s.report("web", None, 60, t + 1);
        assert_eq!((r.ts_start, r.ts_end), (t + 1 - 60, t + 1));
        assert_eq!(r.statistics.len(), 1);
        let a = &r.statistics[0];
        assert_eq!(a.rtsum, 0.05);
        assert_eq!(
            a.stat,
            vec![
                CodeCount {
                    code: 200,
                    count: 4
                },
                CodeCount {
                    code: 502,
                    count: 1
                }
            ]
        );
        // The last second only.
        let last = s.report("web", Some("a"), 1, t + 1);
        assert_eq!(last.statistics[0].stat.len(), 2);
        assert_eq!(last.statistics[0].stat[0].count, 1);
        assert_eq!(s.tps(2, t + 1), 2.5);
        // Sixty seconds on, all of it has aged out.
        s.sample(
            t + 61,
            vec![reading("a", counts(5, 50, &[(200, 4), (502, 1)]))],
            5,
        );
        let old = s.report("web", None, 60, t + 61);
        assert!(old.statistics[0].stat.is_empty());
        assert_eq!(s.tps(60, t + 61), 0.0);
        assert!(s.report("other", None, 60, t + 61).statistics.is_empty());
    }

    #[test]
    fn an_entry_handed_out_anew_counts_from_zero() {
        let mut s = RequestStats::default();
        s.sample(10, vec![reading("a", counts(9, 0, &[(200, 9)]))], 9);
        s.sample(11, vec![reading("a", counts(2, 0, &[(404, 2)]))], 2);
        let r = s.report("web", None, 1, 11);
        assert_eq!(
            r.statistics[0].stat,
            vec![CodeCount {
                code: 404,
                count: 2
            }]
        );
        // A peer gone from the readings is forgotten.
        s.sample(12, Vec::new(), 2);
        assert!(s.report("web", None, 60, 12).statistics.is_empty());
    }
}
