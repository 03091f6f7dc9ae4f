//! The master's model of the configuration: rule sets by domain, upstreams
//! by name. Every change is validated whole, written to the region's
//! configuration store and published in one generation, then the workers
//! are woken. The admin API and the etcd watcher both change it through
//! here, one at a time (the caller holds the store's mutex), with peers
//! already resolved ([`resolve_peers`], called before taking the mutex).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;
use serde_json::Value;

use crate::peers::PeerParams;
use crate::stats::RequestStats;
use elb_shm::Region;
use elb_shm::config::{ConfigError, ConfigWriter};
use elb_shm::counters::{Counts, Observed};
use elb_workers::health::HealthSlot;
use elb_workers::published::{DomainRecord, domain_key, upstream_key};
use elb_workers::rules::RuleSet;

mod counter_pool;
mod records;
mod resolve;
mod slot_pool;
mod sources;
mod staging;

use counter_pool::{CounterPool, Owner};
use records::{check_domain, check_upstream_name, record};
pub use resolve::{all_addresses, resolve_peers};
use slot_pool::{Held, SlotPool};
use sources::SourceLists;
pub use sources::{SourceKind, SourcePolicy};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("domain '{domain}': {reason}")]
    Domain { domain: String, reason: String },
    #[error("upstream '{upstream}': {reason}")]
    Upstream { upstream: String, reason: String },
    #[error("{0}")]
    Full(#[from] ConfigError),
    #[error("out of state slots: no state slot left for upstream peers; raise --shm-size")]
    NoStateSlot,
}

/// A peer as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub params: PeerParams,
    slot: Held,
    /// Joined while ELB runs (an existing upstream, or after the first
    /// load), so slow start applies to it.
    pub added_live: bool,
    /// The entry its answers count in, if the counters had room.
    counters: Option<u32>,
}

impl Peer {
    /// Where the peer's shared health lives.
    pub fn health_slot(&self) -> HealthSlot {
        HealthSlot {
            index: self.slot.index,
            incarnation: self.slot.incarnation.bits(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// By the name given (`localhost:8088`), in order.
    pub peers: BTreeMap<String, Peer>,
    cursor_slot: u32,
    /// The entry its response times count in, if the counters had room.
    response_times: Option<u32>,
    /// Peers in slow start, by name: the part of their weight in force, in
    /// thousandths ([`Store::set_ramps`]).
    ramps: BTreeMap<String, u32>,
}

/// An upstream's peers: name as given, parameters.
pub type PeerList = Vec<(String, PeerParams)>;

/// An upstream's peers resolved ([`resolve_peers`]): by name as given, the
/// address and parameters.
pub type ResolvedPeers = BTreeMap<String, (SocketAddr, PeerParams)>;

/// Changes for [`Store::apply_changes`]: `None` removes the item. `P` is an
/// upstream's peer list: as named in etcd ([`PeerList`]), or resolved
/// ([`ResolvedPeers`]) for the store, which never waits for DNS.
#[derive(Debug, Default)]
pub struct Changes<P = ResolvedPeers> {
    pub domains: Vec<(String, Option<Value>)>,
    /// A whole peer list per upstream (an empty list removes it).
    pub upstreams: Vec<(String, Option<P>)>,
}

/// What [`Store::apply_changes`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Items that changed.
    pub changed: usize,
    /// Items refused, each with why.
    pub errors: Vec<StoreError>,
}

pub struct Store {
    writer: ConfigWriter<'static>,
    region: &'static Region,
    wakes: Vec<Arc<EventFd>>,
    domains: BTreeMap<String, Value>,
    upstreams: BTreeMap<String, Upstream>,
    slots: SlotPool,
    /// True once the first load from etcd is in force: peers added after
    /// that start slowly.
    loaded: bool,
    /// What the health thread last found, by state slot (index).
    health: HashMap<u32, PeerStatus>,
    panics: u64,
    /// The request counters' entries, by domain, upstream and peer.
    counters: CounterPool,
    /// When the master started (the store is made at its start).
    started: Instant,
    /// What the etcd thread last said of etcd, for `/status`.
    etcd: SourceStatus,
    /// The last minute of requests, per peer and in all.
    stats: RequestStats,
    /// Each source's peer lists, which make the upstreams in force.
    sources: SourceLists,
    /// What the Kubernetes thread last said of the apiserver, when it runs.
    kubernetes: Option<SourceStatus>,
}

/// A configuration source's state, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SourceStatus {
    /// `connecting` (never reached yet), `up` or `down`.
    pub state: &'static str,
    pub endpoint: String,
    /// etcd: the revision the configuration is at (0 before the first
    /// load).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// Kubernetes: the last `resourceVersion` seen.
    #[serde(rename = "resourceVersion", skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    pub last_error: Option<String>,
}

impl Store {
    pub fn new(region: &'static Region, wakes: Vec<Arc<EventFd>>) -> Store {
        // One wake-up descriptor per worker.
        let counters = CounterPool::new(region, wakes.len());
        Store {
            writer: ConfigWriter::new(region),
            region,
            wakes,
            domains: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            slots: SlotPool::new(region.state_slots()),
            loaded: false,
            health: HashMap::new(),
            panics: 0,
            counters,
            started: Instant::now(),
            etcd: SourceStatus {
                state: "connecting",
                endpoint: String::new(),
                revision: Some(0),
                resource_version: None,
                last_error: None,
            },
            stats: RequestStats::default(),
            sources: SourceLists::default(),
            kubernetes: None,
        }
    }

    /// How etcd's and Kubernetes' peers combine (`[sources]`).
    pub fn set_source_policy(&mut self, policy: SourcePolicy) {
        self.sources.policy = policy;
    }

    pub fn kubernetes_status(&self) -> Option<&SourceStatus> {
        self.kubernetes.as_ref()
    }

    pub fn set_kubernetes_status(&mut self, status: SourceStatus) {
        self.kubernetes = Some(status);
    }

    /// The upstreams as etcd and the admin API gave them, without
    /// Kubernetes' peers: what a dump writes.
    pub fn etcd_upstreams(&self) -> Vec<(String, PeerList)> {
        self.sources.etcd_lists()
    }

    pub fn region(&self) -> &'static Region {
        self.region
    }

    /// A domain's record for the workers, with the counters entry its
    /// requests count in (taken now when it has none).
    fn domain_record(&mut self, domain: &str, rules: &Value) -> Vec<u8> {
        let rec = DomainRecord {
            counters: self
                .counters
                .entry(self.region, Owner::Domain(domain.to_string())),
            rules: rules.clone(),
        };
        // A JSON value with a number beside it always serialises.
        serde_json::to_vec(&rec).unwrap_or_default()
    }

    /// Each domain's request counts, summed over the workers.
    pub fn domain_counts(&self) -> Vec<(&str, Counts)> {
        self.counters.domains(self.region)
    }

    /// A peer's answers (status codes, response times), summed over the
    /// workers; `None` when the counters had no room for it.
    pub fn peer_counts(&self, peer: &Peer) -> Option<Counts> {
        peer.counters.map(|e| self.counters.counts(self.region, e))
    }

    /// Reads every peer's counters and the domains' requests into the
    /// request statistics, as of `now` (Unix seconds).
    pub fn sample_stats(&mut self, now: u64) {
        let mut readings = Vec::new();
        for (name, up) in &self.upstreams {
            for (peer_name, p) in &up.peers {
                if let Some(c) = self.peer_counts(p) {
                    readings.push((name.clone(), peer_name.clone(), c));
                }
            }
        }
        let total = self.domain_counts().iter().map(|(_, c)| c.requests).sum();
        self.stats.sample(now, readings, total);
    }

    /// The request statistics.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// An upstream's response times, summed over the workers.
    pub fn response_times(&self, up: &Upstream) -> Option<Observed> {
        up.response_times
            .map(|e| self.counters.observed(self.region, e))
    }

    /// How long the master has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The generation last published.
    pub fn generation(&self) -> u64 {
        self.writer.generation()
    }

    /// The configuration arena: (bytes used, bytes free).
    pub fn arena_usage(&self) -> (usize, usize) {
        let free = self.writer.arena_free();
        (self.region.layout().arena_len.saturating_sub(free), free)
    }

    pub fn etcd_status(&self) -> &SourceStatus {
        &self.etcd
    }

    pub fn set_etcd_status(&mut self, status: SourceStatus) {
        self.etcd = status;
    }

    /// The first load is in force: peers added from now on start slowly.
    pub fn mark_loaded(&mut self) {
        self.loaded = true;
    }

    /// The health thread's findings about a peer, when it has any.
    pub fn peer_status(&self, peer: &Peer) -> Option<&PeerStatus> {
        self.health
            .get(&peer.slot.index)
            .filter(|s| s.incarnation == peer.slot.incarnation.bits())
    }

    /// Replaces the health thread's findings, and its count of panics.
    pub fn set_peer_status(&mut self, health: HashMap<u32, PeerStatus>, panics: u64) {
        self.health = health;
        self.panics = panics;
    }

    /// Times an upstream's checks were set aside by the panic threshold.
    pub fn panics(&self) -> u64 {
        self.panics
    }

    /// Puts slow-start weights in force (per upstream, thousandths of each
    /// named peer's weight; the others at full weight) by writing those
    /// upstreams' schedules anew, published together. Upstreams whose
    /// weights did not change are not written; one that does not fit keeps
    /// its schedule, and the error is returned after the others are in.
    pub fn set_ramps(
        &mut self,
        ramps: Vec<(String, BTreeMap<String, u32>)>,
    ) -> Result<(), StoreError> {
        let mut written = false;
        let mut failed = Ok(());
        for (name, r) in ramps {
            let Some(up) = self.upstreams.get_mut(&name) else {
                continue;
            };
            if up.ramps == r {
                continue;
            }
            let old = std::mem::replace(&mut up.ramps, r);
            let rec = record(up);
            match self.writer.put(&upstream_key(&name), &rec) {
                Ok(()) => written = true,
                Err(e) => {
                    if let Some(up) = self.upstreams.get_mut(&name) {
                        up.ramps = old;
                    }
                    failed = Err(e.into());
                }
            }
        }
        if written {
            self.publish();
        }
        failed
    }

    pub fn domains(&self) -> &BTreeMap<String, Value> {
        &self.domains
    }

    /// Every `limit` rule in force: (domain, rule name).
    pub fn limit_rules(&self) -> Vec<(&str, &str)> {
        self.domains
            .iter()
            .flat_map(|(d, set)| {
                set["rules"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, r)| r["type"] == "limit")
                    .map(move |(name, _)| (d.as_str(), name.as_str()))
            })
            .collect()
    }

    pub fn upstreams(&self) -> &BTreeMap<String, Upstream> {
        &self.upstreams
    }

    /// Sets rule sets; all are validated before any is applied.
    pub fn set_domains(&mut self, sets: Vec<(String, Value)>) -> Result<(), StoreError> {
        for (domain, rules) in &sets {
            check_domain(domain)?;
            RuleSet::from_json(rules).map_err(|e| StoreError::Domain {
                domain: domain.clone(),
                reason: e.to_string(),
            })?;
        }
        let sets: Vec<(String, Value)> = sets
            .into_iter()
            .map(|(d, r)| (d.to_ascii_lowercase(), r))
            .collect();
        let records: Vec<(Vec<u8>, Vec<u8>)> = sets
            .iter()
            .map(|(d, r)| (domain_key(d), self.domain_record(d, r)))
            .collect();
        let items: Vec<(&[u8], &[u8])> = records
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        // All or nothing: a refused batch leaves nothing staged.
        if let Err(e) = self.writer.put_all(&items) {
            for (d, _) in &sets {
                if !self.domains.contains_key(d) {
                    self.counters.release(&Owner::Domain(d.clone()));
                }
            }
            return Err(e.into());
        }
        self.domains.extend(sets);
        self.publish();
        Ok(())
    }

    /// Removes rule sets; returns, per name, whether it existed.
    pub fn delete_domains(&mut self, domains: &[String]) -> Vec<bool> {
        let found = domains
            .iter()
            .map(|d| {
                let d = d.to_ascii_lowercase();
                self.writer.delete(&domain_key(&d));
                self.counters.release(&Owner::Domain(d.clone()));
                self.domains.remove(&d).is_some()
            })
            .collect();
        self.publish();
        found
    }

    /// Replaces the peer lists of the named upstreams (resolved by
    /// [`resolve_peers`]); every name is checked before anything is applied.
    pub fn set_upstreams(
        &mut self,
        resolved: Vec<(String, ResolvedPeers)>,
    ) -> Result<(), StoreError> {
        for (name, _) in &resolved {
            check_upstream_name(name)?;
        }
        let needed: usize = resolved
            .iter()
            .map(|(n, l)| l.len() + usize::from(!self.upstreams.contains_key(n)))
            .sum();
        if needed > self.slots.available() {
            return Err(StoreError::NoStateSlot);
        }
        let mut staged = Vec::with_capacity(resolved.len());
        let given = resolved.clone();
        for (name, list) in resolved {
            // Kubernetes' peers of the same name stay, as the policy says.
            let list = self
                .sources
                .effective_with(SourceKind::Etcd, &name, Some(&list))
                .unwrap_or(list);
            match self.stage_upstream(name, list) {
                Ok(s) => staged.push(s),
                Err(e) => {
                    self.unstage(staged);
                    return Err(e);
                }
            }
        }
        let records: Vec<(Vec<u8>, Vec<u8>)> = staged
            .iter()
            .map(|s| (upstream_key(&s.name), record(&s.up)))
            .collect();
        let items: Vec<(&[u8], &[u8])> = records
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let generation = self.writer.generation();
        if let Err(e) = self.writer.put_all(&items) {
            self.unstage(staged);
            return Err(e.into());
        }
        for s in staged {
            self.keep(s, generation);
        }
        for (name, list) in given {
            self.sources.set(SourceKind::Etcd, &name, Some(list));
        }
        self.publish();
        Ok(())
    }

    /// Removes upstreams; returns, per name, whether it existed.
    pub fn delete_upstreams(&mut self, names: &[String]) -> Vec<bool> {
        let found = names
            .iter()
            .map(|n| {
                let existed = self.upstreams.contains_key(n);
                // Kubernetes' peers of that name, if any, stay in force.
                self.apply_source(SourceKind::Etcd, n.clone(), None, &mut Applied::default());
                existed
            })
            .collect();
        self.publish();
        found
    }

    /// Applies peer lists from Kubernetes (a `None` or empty list: it has
    /// none for that name), combined with etcd's by the source policy.
    pub fn apply_kubernetes(&mut self, lists: Vec<(String, Option<ResolvedPeers>)>) -> Applied {
        let mut out = Applied::default();
        for (name, list) in lists {
            self.apply_source(SourceKind::Kubernetes, name, list, &mut out);
        }
        if out.changed > 0 {
            self.publish();
        }
        out
    }

    /// Applies changes from etcd: each item on its own, so that an invalid
    /// one (a rule set that does not compile, no room left) is refused
    /// alone while the others apply. An item equal
    /// to what is in force already is skipped. Everything that changed is
    /// published in one generation; nothing is published when nothing
    /// changed.
    pub fn apply_changes(&mut self, changes: Changes) -> Applied {
        let mut out = Applied::default();
        for (domain, rules) in changes.domains {
            let lower = domain.to_ascii_lowercase();
            match rules {
                None => {
                    if self.domains.remove(&lower).is_some() {
                        self.writer.delete(&domain_key(&lower));
                        self.counters.release(&Owner::Domain(lower.clone()));
                        out.changed += 1;
                    }
                }
                Some(rules) => {
                    if self.domains.get(&lower) == Some(&rules) {
                        continue;
                    }
                    let valid = check_domain(&domain).and_then(|()| {
                        RuleSet::from_json(&rules)
                            .map(drop)
                            .map_err(|e| StoreError::Domain {
                                domain: domain.clone(),
                                reason: e.to_string(),
                            })
                    });
                    let written = valid.and_then(|()| {
                        let record = self.domain_record(&lower, &rules);
                        let put = self.writer.put(&domain_key(&lower), &record);
                        if put.is_err() && !self.domains.contains_key(&lower) {
                            self.counters.release(&Owner::Domain(lower.clone()));
                        }
                        put.map_err(StoreError::from)
                    });
                    match written {
                        Ok(()) => {
                            self.domains.insert(lower, rules);
                            out.changed += 1;
                        }
                        Err(e) => out.errors.push(e),
                    }
                }
            }
        }
        for (name, list) in changes.upstreams {
            if let Err(e) = check_upstream_name(&name) {
                out.errors.push(e);
                continue;
            }
            self.apply_source(SourceKind::Etcd, name, list, &mut out);
        }
        if out.changed > 0 {
            self.publish();
        }
        out
    }

    fn publish(&mut self) {
        let generation = self.writer.publish();
        for w in &self.wakes {
            // A full counter (never in practice) still wakes the worker.
            let _ = nix::unistd::write(w.as_fd(), &1u64.to_ne_bytes());
        }
        // Slots retired before every live worker applied a later generation
        // may still be written by a worker's old view: free them only after.
        let oldest = (0..elb_shm::MAX_WORKERS)
            .filter_map(|i| self.region.worker_slot(i))
            .filter(|s| s.pid() != 0)
            .map(|s| s.applied())
            .min()
            .unwrap_or(generation);
        self.slots.release_before(oldest);
    }
}

/// A peer's health as the health thread last found it, for the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    /// The incarnation of the slot this is about.
    pub incarnation: u32,
    /// Why the peer is out (`"check"`, `"log"`, `"passive"`, `"down"`), or
    /// `None` while it takes traffic.
    pub out_reason: Option<&'static str>,
    /// The weight the schedule uses now (lower during slow start).
    pub effective_weight: f64,
    /// Failed probes in a row.
    pub fails: u32,
    /// When the last probe finished, in seconds since the Unix epoch.
    pub last_check: Option<f64>,
}
