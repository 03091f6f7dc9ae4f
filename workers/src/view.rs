//! The worker's own view of the published configuration: rule sets compiled
//! and upstream records decoded once per change, then read per request
//! without touching the region or allocating.

use std::collections::HashMap;
use std::rc::Rc;

use elb_shm::Region;
use elb_shm::config::{Change, ConfigReader};

use crate::published::{DomainRecord, Key, UpstreamRecord, parse_key};
use crate::rules::RuleSet;

/// The view and what keeps it current.
pub(crate) struct Config {
    reader: ConfigReader<'static>,
    pub view: View,
    region: &'static Region,
    worker: usize,
}

impl Config {
    pub fn new(region: &'static Region, worker: usize) -> Config {
        Config {
            reader: ConfigReader::new(region),
            view: View::default(),
            region,
            worker,
        }
    }

    /// Applies what the master published since the last call: one atomic
    /// load when nothing was. Called before each request is routed, so a
    /// request sent after an admin answer is routed by the new state.
    pub fn refresh(&mut self) {
        if !self.reader.is_stale() {
            return;
        }
        let view = &mut self.view;
        let applied = self.reader.poll(|c| view.apply(c));
        if let Some(slot) = self.region.worker_slot(self.worker) {
            slot.set_applied(applied);
        }
        log::debug!(
            "worker {}: generation {applied} ({} keys)",
            self.worker,
            self.view.len()
        );
    }

    pub fn applied(&self) -> u64 {
        self.reader.applied()
    }
}

#[derive(Default)]
pub(crate) struct View {
    /// By lower-cased domain: the compiled rules and the counters entry.
    domains: HashMap<Box<[u8]>, (RuleSet, Option<u32>)>,
    /// By name; the name is kept shared so that a request can hold it (for
    /// a retry) without allocating.
    upstreams: HashMap<Box<[u8]>, (Rc<str>, UpstreamRecord)>,
}

impl View {
    pub fn apply(&mut self, change: Change<'_>) {
        match change {
            Change::Reset => {
                self.domains.clear();
                self.upstreams.clear();
            }
            Change::Put { key, value } => match parse_key(key) {
                Some(Key::Domain(d)) => match serde_json::from_slice::<DomainRecord>(value)
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        RuleSet::from_json(&r.rules)
                            .map(|rules| (rules, r.counters))
                            .map_err(|e| e.to_string())
                    }) {
                    Ok(entry) => {
                        self.domains.insert(d.into(), entry);
                    }
                    // The master validated it; a failure here is a bug to report,
                    // and the previous rule set stays.
                    Err(e) => log::error!("rule set of {}: {e}", String::from_utf8_lossy(d)),
                },
                Some(Key::Upstream(n)) => match serde_json::from_slice::<UpstreamRecord>(value) {
                    Ok(rec) => {
                        let name: Rc<str> = String::from_utf8_lossy(n).into();
                        self.upstreams.insert(n.into(), (name, rec));
                    }
                    Err(e) => log::error!("upstream {}: {e}", String::from_utf8_lossy(n)),
                },
                None => {}
            },
            Change::Delete { key } => match parse_key(key) {
                Some(Key::Domain(d)) => {
                    self.domains.remove(d);
                }
                Some(Key::Upstream(n)) => {
                    self.upstreams.remove(n);
                }
                None => {}
            },
        }
    }

    /// The rule set for a lower-cased host (exact, then without its port),
    /// and the entry its requests count in.
    pub fn rules_for(&self, host: &[u8]) -> Option<(&RuleSet, Option<u32>)> {
        self.domains
            .get(host)
            .or_else(|| {
                let without_port = strip_port(host)?;
                self.domains.get(without_port)
            })
            .map(|(rules, counters)| (rules, *counters))
    }

    pub fn upstream(&self, name: &[u8]) -> Option<&UpstreamRecord> {
        self.upstreams.get(name).map(|(_, rec)| rec)
    }

    /// The upstream and its shared name.
    pub fn upstream_named(&self, name: &[u8]) -> Option<(&Rc<str>, &UpstreamRecord)> {
        self.upstreams.get(name).map(|(n, rec)| (n, rec))
    }

    pub fn len(&self) -> usize {
        self.domains.len() + self.upstreams.len()
    }
}

/// `host:port` → `host` (`[v6]:port` → `[v6]`); `None` when there is no port.
fn strip_port(host: &[u8]) -> Option<&[u8]> {
    let colon = host.iter().rposition(|b| *b == b':')?;
    let (h, port) = (&host[..colon], &host[colon + 1..]);
    let ok = !port.is_empty()
        && port.iter().all(u8::is_ascii_digit)
        && (!h.starts_with(b"[") || h.ends_with(b"]"));
    ok.then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_only_when_there_is_one() {
        assert_eq!(strip_port(b"example.com:8080"), Some(&b"example.com"[..]));
        assert_eq!(strip_port(b"example.com"), None);
        assert_eq!(strip_port(b"[::1]:80"), Some(&b"[::1]"[..]));
        assert_eq!(strip_port(b"[::1]"), None);
        assert_eq!(strip_port(b"a:b"), None);
    }
}
