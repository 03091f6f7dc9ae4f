//! What the master publishes in the region for the workers: the key of each
//! entry and the record of an upstream. Both sides use these definitions, so
//! the format lives in one place.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

const DOMAIN_PREFIX: &[u8] = b"d:";
const UPSTREAM_PREFIX: &[u8] = b"u:";

/// A key of the configuration store, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Key<'a> {
    /// A domain's rule set (JSON as set), by lower-cased domain.
    Domain(&'a [u8]),
    /// An upstream's [`UpstreamRecord`] (JSON), by name.
    Upstream(&'a [u8]),
}

pub fn domain_key(domain: &str) -> Vec<u8> {
    [DOMAIN_PREFIX, domain.to_ascii_lowercase().as_bytes()].concat()
}

pub fn upstream_key(name: &str) -> Vec<u8> {
    [UPSTREAM_PREFIX, name.as_bytes()].concat()
}

pub fn parse_key(key: &[u8]) -> Option<Key<'_>> {
    if let Some(d) = key.strip_prefix(DOMAIN_PREFIX) {
        Some(Key::Domain(d))
    } else {
        key.strip_prefix(UPSTREAM_PREFIX).map(Key::Upstream)
    }
}

/// A domain as workers use it: its rule set (JSON as set) and the entry of
/// the request counters (`elb_shm::counters`) its requests count in; none
/// when the zone is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub counters: Option<u32>,
    pub rules: serde_json::Value,
}

/// An upstream as workers use it: peers with resolved addresses, the
/// state slot of each, and the precomputed smooth-WRR schedules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamRecord {
    /// State slot holding the shared round-robin cursor (word 0) and the
    /// backup cursor (word 1). Plain counters, without an incarnation: a
    /// worker moves them only while it picks, with the configuration it
    /// applied last, which still names this slot for this upstream (the
    /// master reuses a slot only after every worker applied a later
    /// generation); no request uses them afterwards.
    pub cursor_slot: u32,
    /// The request counters' entry its response times count in
    /// (`elb_shm::counters::Histogram`); none when the zone is full.
    pub response_times: Option<u32>,
    pub peers: Vec<PeerRecord>,
    /// Indices into `peers`: one period of smooth WRR over primary peers.
    pub schedule: Vec<u16>,
    /// Likewise over backup peers, used when no primary is available.
    pub backup_schedule: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The address as given (`localhost:8088`).
    pub name: String,
    pub addr: SocketAddr,
    /// State slot of this peer (passive-health words) ...
    pub slot: u32,
    /// ... and the incarnation of that slot this peer owns: a request keeps
    /// both for its whole exchange, and outlives the peer's ownership when
    /// the peer is removed meanwhile.
    pub incarnation: u32,
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    /// False for `down` peers and a `status` other than "up".
    pub available: bool,
    /// The request counters' entry its answers count in (status codes and
    /// response times, for the log check and `/__erulb__/stats`); none
    /// when the zone is full.
    pub counters: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_domains_are_case_folded() {
        let k = domain_key("Example.COM");
        assert_eq!(parse_key(&k), Some(Key::Domain(b"example.com".as_slice())));
        let u = upstream_key("web");
        assert_eq!(parse_key(&u), Some(Key::Upstream(b"web".as_slice())));
        assert_eq!(parse_key(b"x:y"), None);
    }
}
