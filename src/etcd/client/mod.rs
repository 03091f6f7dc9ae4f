//! The etcd thread's task: connect, load, and apply what was loaded; the
//! watch, the dump and the error handling each have their own file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

mod dump;
mod retry;
mod watch;

use super::keys::{Layout, prefix_end};
use super::view::{Kv, Outcome, Skipped, View};
use super::{DumpError, DumpRequest};
use crate::store::{
    Changes, ResolvedPeers, SourceStatus, Store, StoreError, all_addresses, resolve_peers,
};
use retry::{Backoff, EtcdError, describe, retry};
use watch::WatchEnd;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Per unary request (a page of a load, a dump's txn).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings while a stream is open, as a backstop: etcd's servers
/// close a connection pinged more often than every 5 s
/// (`--grpc-keepalive-min-time`) with "too many pings".
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per page of a load.
const PAGE: i64 = 2000;
/// Skipped values logged one by one per batch; the rest are counted.
const LOG_LIMIT: usize = 20;
/// Largest response accepted (a page, a watch response with big values).
const MAX_MESSAGE: usize = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Never reached yet.
    Unknown,
    Up,
    Down,
}

struct Task {
    client: Client,
    endpoints: String,
    view: View,
    store: Arc<Mutex<Store>>,
    requests: mpsc::Receiver<DumpRequest>,
    health: Health,
    last_error: String,
    /// The revision the view is at (0 before the first load).
    revision: i64,
    backoff: Backoff,
    /// Peer lists waiting for DNS, each resolved on a blocking thread so
    /// that the watch, and the store's lock, never wait for a resolver:
    /// (upstream, change number, result).
    resolving: JoinSet<(String, u64, Result<ResolvedPeers, StoreError>)>,
    /// The number of the latest change of each upstream waiting for DNS;
    /// any later change of the upstream removes it, so a late answer never
    /// overrides what came after it.
    latest: HashMap<String, u64>,
    /// Numbers every upstream change, for `latest`.
    changes_seen: u64,
}

pub(super) async fn run(
    endpoints: Vec<String>,
    layout: Layout,
    store: Arc<Mutex<Store>>,
    requests: mpsc::Receiver<DumpRequest>,
) {
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE_TIMEOUT)
        .with_keep_alive_while_idle(false)
        .with_require_leader(true);
    let mut backoff = Backoff::new();
    let mut logged = false;
    // Connecting is lazy (it fails only on endpoints that are not URLs).
    let client = loop {
        match Client::connect(&endpoints, Some(options.clone())).await {
            Ok(c) => break c,
            Err(e) => {
                if !logged {
                    log::error!(
                        "etcd: cannot set up a client for {endpoints:?}: {}",
                        describe(&e)
                    );
                    logged = true;
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
    };
    let mut task = Task {
        client,
        endpoints: endpoints.join(","),
        view: View::new(layout),
        store,
        requests,
        health: Health::Unknown,
        last_error: String::new(),
        revision: 0,
        backoff,
        resolving: JoinSet::new(),
        latest: HashMap::new(),
        changes_seen: 0,
    };
    task.report();
    task.run().await;
}

impl Task {
    async fn run(&mut self) {
        loop {
            if let Err(e) = self.load().await {
                self.lost(&e.to_string());
                self.pause().await;
                continue;
            }
            match self.watch().await {
                WatchEnd::Compacted(rev) => log::info!(
                    "etcd: history compacted up to revision {rev}, past the watch; reloading"
                ),
                WatchEnd::Rewound { from, to } => log::warn!(
                    "etcd: revision went back from {from} to {to} (etcd wiped or restored); reloading"
                ),
                WatchEnd::Lost(e) => {
                    self.lost(&format!("watch lost ({e})"));
                    // A stream that breaks at once again and again (etcd
                    // up but refusing watches) must not spin.
                    self.pause().await;
                }
            }
        }
    }

    /// Tells the store how etcd stands, for `/status`.
    fn report(&self) {
        let status = SourceStatus {
            state: match self.health {
                Health::Unknown => "connecting",
                Health::Up => "up",
                Health::Down => "down",
            },
            endpoint: self.endpoints.clone(),
            revision: Some(self.revision),
            resource_version: None,
            last_error: (!self.last_error.is_empty()).then(|| self.last_error.clone()),
        };
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_etcd_status(status);
    }

    /// Notes a failure; logs it only when etcd was not already known down.
    fn lost(&mut self, why: &str) {
        self.last_error = why.to_string();
        if self.health != Health::Down {
            log::warn!(
                "etcd ({}): {why}; serving the last known configuration, retrying",
                self.endpoints
            );
            self.health = Health::Down;
        } else {
            log::debug!("etcd: {why}");
        }
        self.report();
    }

    /// Waits out the back-off, answering dumps meanwhile (etcd is down).
    async fn pause(&mut self) {
        let sleep = tokio::time::sleep(self.backoff.next());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return,
                Some(done) = self.resolving.join_next(), if !self.resolving.is_empty() => {
                    self.resolved(done);
                }
                Some(req) = self.requests.recv() => {
                    let _ = req
                        .reply
                        .try_send(Err(DumpError::Unavailable(if self.last_error.is_empty() {
                            "not connected yet".into()
                        } else {
                            self.last_error.clone()
                        })));
                }
            }
        }
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// Everything under `prefixes` at one revision: (listing, revision).
    async fn fetch(&self, prefixes: &[&str]) -> Result<(Vec<Kv>, i64), EtcdError> {
        let mut attempts = 0;
        loop {
            match self.fetch_once(prefixes).await {
                // Compacted between two pages: start again at a newer one.
                Err(e) if e.code() == Some(tonic::Code::OutOfRange) && attempts < 3 => {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    async fn fetch_once(&self, prefixes: &[&str]) -> Result<(Vec<Kv>, i64), EtcdError> {
        let mut kv = self.kv();
        let mut revision = 0;
        let mut out = Vec::new();
        for prefix in prefixes {
            let end = prefix_end(prefix.as_bytes());
            let mut start = prefix.as_bytes().to_vec();
            loop {
                let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if revision > 0 {
                    opts = opts.with_revision(revision);
                }
                let mut resp =
                    retry(async || kv.get(start.clone(), Some(opts.clone())).await).await?;
                let header = resp.header().ok_or(EtcdError::NoHeader)?.revision();
                if revision == 0 {
                    revision = header;
                }
                let more = resp.more();
                let kvs = resp.take_kvs();
                let last = kvs.last().map(|k| k.key().to_vec());
                out.extend(kvs.into_iter().map(|k| {
                    let mod_revision = k.mod_revision();
                    let (key, value) = k.into_key_value();
                    Kv {
                        key,
                        value,
                        mod_revision,
                    }
                }));
                match last {
                    Some(mut next) if more => {
                        next.push(0);
                        start = next;
                    }
                    _ => break,
                }
            }
        }
        Ok((out, revision))
    }

    /// The watched prefixes, owned (so that `self` stays free to borrow).
    fn prefixes(&self) -> Vec<String> {
        self.view
            .layout()
            .prefixes()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Loads everything and applies the difference from the view.
    async fn load(&mut self) -> Result<(), EtcdError> {
        let started = Instant::now();
        let prefixes = self.prefixes();
        let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let (listing, revision) = self.fetch(&refs).await?;
        let fetched = started.elapsed();
        let keys = listing.len();
        let outcome = self.view.resync(listing);
        let changed = outcome.keys_changed;
        self.apply(outcome);
        let first = self.revision == 0;
        self.revision = revision;
        let (domains, upstreams) = {
            let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
            // Peers of the first load start at full weight; later ones slowly.
            store.mark_loaded();
            (store.domains().len(), store.upstreams().len())
        };
        let took = started.elapsed();
        match (self.health, first) {
            (_, true) => log::info!(
                "etcd ({}): connected; loaded {keys} keys at revision {revision} in {took:.0?} (read in {fetched:.0?}); serving {domains} domains and {upstreams} upstreams",
                self.endpoints
            ),
            (Health::Down, false) => log::info!(
                "etcd ({}): reachable again; reloaded at revision {revision}: {changed} keys changed",
                self.endpoints
            ),
            _ => log::info!("etcd: reloaded at revision {revision}: {changed} keys changed"),
        }
        self.health = Health::Up;
        self.report();
        Ok(())
    }

    /// Hands the view's changes to the store; logs what was skipped (the
    /// first [`LOG_LIMIT`] of one batch, then a count). Peer lists that name
    /// a host wait for DNS apart ([`Self::resolved`]), so that the rest of
    /// the batch, and later batches, apply at once.
    fn apply(&mut self, outcome: Outcome) {
        let mut now = Changes {
            domains: outcome.changes.domains,
            upstreams: Vec::new(),
        };
        let mut errors = Vec::new();
        for (name, peers) in outcome.changes.upstreams {
            self.changes_seen += 1;
            match peers {
                Some(peers) if !all_addresses(&peers) => {
                    self.latest.insert(name.clone(), self.changes_seen);
                    let n = self.changes_seen;
                    self.resolving.spawn_blocking(move || {
                        let r = resolve_peers(&name, peers);
                        (name, n, r)
                    });
                }
                peers => {
                    self.latest.remove(&name);
                    // Addresses only: resolving waits for nothing.
                    match peers.map(|p| resolve_peers(&name, p)).transpose() {
                        Ok(resolved) => now.upstreams.push((name, resolved)),
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
        self.apply_resolved(&outcome.skipped, now, errors);
    }

    /// A peer list has resolved, or not: applies it unless a later change
    /// of its upstream came meanwhile; when it did not resolve, the
    /// upstream keeps the peers it had.
    fn resolved(
        &mut self,
        done: Result<(String, u64, Result<ResolvedPeers, StoreError>), tokio::task::JoinError>,
    ) {
        let (name, n, result) = match done {
            Ok(d) => d,
            Err(e) => {
                log::error!("etcd: a peer resolution did not finish: {e}");
                return;
            }
        };
        if self.latest.get(&name) != Some(&n) {
            return;
        }
        self.latest.remove(&name);
        let (changes, errors) = match result {
            Ok(peers) => (
                Changes {
                    domains: Vec::new(),
                    upstreams: vec![(name, Some(peers))],
                },
                Vec::new(),
            ),
            Err(e) => (Changes::default(), vec![e]),
        };
        self.apply_resolved(&[], changes, errors);
    }

    /// Applies resolved changes in one store call, and logs what was
    /// skipped or refused.
    fn apply_resolved(
        &mut self,
        skipped: &[Skipped],
        changes: Changes,
        mut errors: Vec<StoreError>,
    ) {
        let mut refused = 0usize;
        let mut note = |line: std::fmt::Arguments<'_>| {
            refused += 1;
            if refused <= LOG_LIMIT {
                log::warn!("etcd: {line}");
            }
        };
        for s in skipped {
            note(format_args!("skipping {}: {}", s.key, s.error));
        }
        if !changes.domains.is_empty() || !changes.upstreams.is_empty() {
            let applied = self
                .store
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .apply_changes(changes);
            errors.extend(applied.errors);
        }
        let layout = self.view.layout();
        for e in errors {
            match e {
                StoreError::Domain { domain, reason } => note(format_args!(
                    "skipping {}: {reason}",
                    layout.domain_key(&domain)
                )),
                // The upstream keeps the peers it had.
                StoreError::Upstream { upstream, reason } => {
                    note(format_args!("upstream {upstream} left unchanged: {reason}"))
                }
                other => note(format_args!("cannot apply a change: {other}")),
            }
        }
        if refused > LOG_LIMIT {
            log::warn!(
                "etcd: {} more values skipped in this batch",
                refused - LOG_LIMIT
            );
        }
    }
}
