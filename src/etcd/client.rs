//! The etcd thread's task: connect, load, watch, reload on faults, dump.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, GetOptions, KvClient, Txn, TxnOp, WatchOptions, WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::keys::{Layout, prefix_end};
use super::view::{Event, Kv, Op, Outcome, Skipped, View, desired, plan_dump};
use super::{DumpError, DumpReport, DumpRequest};
use crate::store::{Changes, ResolvedPeers, Store, StoreError, all_addresses, resolve_peers};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Per unary request (a page of a load, a dump's txn).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings while a stream is open, as a backstop: etcd's servers
/// close a connection pinged more often than every 5 s
/// (`--grpc-keepalive-min-time`) with "too many pings".
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The watch asks etcd for a progress notice this often...
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// ...and counts as lost when nothing came on it for this long: a hung
/// etcd, or a connection gone without a reset.
const WATCH_SILENCE: Duration = Duration::from_secs(6);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Quick retries of one request on errors that another endpoint (or the
/// same one a moment later) may not give: a dead member in the balancer.
const QUICK_RETRIES: u32 = 3;
/// Keys per page of a load.
const PAGE: i64 = 2000;
/// Skipped values logged one by one per batch; the rest are counted.
const LOG_LIMIT: usize = 20;
/// Largest response accepted (a page, a watch response with big values).
const MAX_MESSAGE: usize = 256 << 20;

/// An error talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{}", describe(.0))]
    Client(#[from] etcd_client::Error),
    #[error("etcd answered without a response header")]
    NoHeader,
}

impl EtcdError {
    fn code(&self) -> Option<tonic::Code> {
        match self {
            EtcdError::Client(etcd_client::Error::GRpcStatus(s)) => Some(s.code()),
            _ => None,
        }
    }
}

/// A one-line description (tonic's own Display carries metadata).
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            if s.message().is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{:?}: {}", s.code(), s.message())
            }
        }
        other => other.to_string(),
    }
}

/// Worth retrying at once: the request may well succeed elsewhere or now.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

async fn retry<T>(
    mut call: impl AsyncFnMut() -> Result<T, etcd_client::Error>,
) -> Result<T, EtcdError> {
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && attempt < QUICK_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20) * attempt).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Capped exponential back-off with jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        // ±20 %, from the clock's low bits: enough to spread many masters.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        let factor = 0.8 + f64::from(nanos % 1000) / 1000.0 * 0.4;
        d.mul_f64(factor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Never reached yet.
    Unknown,
    Up,
    Down,
}

/// Why a watch ended.
enum WatchEnd {
    Compacted(i64),
    Rewound { from: i64, to: i64 },
    Lost(String),
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
        last_error: "not connected yet".into(),
        revision: 0,
        backoff,
        resolving: JoinSet::new(),
        latest: HashMap::new(),
        changes_seen: 0,
    };
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
                        .try_send(Err(DumpError::Unavailable(self.last_error.clone())));
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
            let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
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

    /// Follows changes from the view's revision + 1 until something ends
    /// the watch; serves dumps meanwhile.
    async fn watch(&mut self) -> WatchEnd {
        let prefixes = self.prefixes();
        let from = self.revision + 1;
        let options = |p: &str| {
            WatchOptions::new()
                .with_range(prefix_end(p.as_bytes()))
                .with_start_revision(from)
                .with_prev_key()
        };
        let mut wc = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let first = prefixes[0].clone();
        let mut stream =
            match retry(async || wc.watch(first.clone(), Some(options(&first))).await).await {
                Ok(s) => s,
                Err(e) => return WatchEnd::Lost(e.to_string()),
            };
        for p in &prefixes[1..] {
            if let Err(e) = stream.watch(p.clone(), Some(options(p))).await {
                return WatchEnd::Lost(describe(&e));
            }
        }
        let (mut sender, mut responses) = stream.split();
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                msg = responses.message() => {
                    heard = Instant::now();
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return WatchEnd::Lost("the stream ended".into()),
                        Err(e) => return WatchEnd::Lost(describe(&e)),
                    };
                    if let Some(end) = self.on_response(resp) {
                        return end;
                    }
                }
                Some(done) = self.resolving.join_next(), if !self.resolving.is_empty() => {
                    self.resolved(done);
                }
                Some(req) = self.requests.recv() => {
                    self.dump(req).await;
                    // The stream was not read meanwhile.
                    heard = Instant::now();
                }
                _ = progress.tick() => {
                    if heard.elapsed() > WATCH_SILENCE {
                        return WatchEnd::Lost(format!(
                            "no answer on the watch for {:.0?}",
                            heard.elapsed()
                        ));
                    }
                    if let Err(e) = sender.request_progress().await {
                        return WatchEnd::Lost(describe(&e));
                    }
                }
            }
        }
    }

    fn on_response(&mut self, resp: WatchResponse) -> Option<WatchEnd> {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Some(WatchEnd::Compacted(resp.compact_revision()));
            }
            return Some(WatchEnd::Lost(format!(
                "canceled by etcd: {}",
                resp.cancel_reason()
            )));
        }
        if let Some(h) = resp.header()
            && h.revision() < self.revision
        {
            return Some(WatchEnd::Rewound {
                from: self.revision,
                to: h.revision(),
            });
        }
        if resp.created() {
            // Watching again: the next fault starts from a short back-off.
            self.backoff.reset();
        }
        if resp.events().is_empty() {
            return None;
        }
        let mut events = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            // Read the raw type: the crate's accessor panics on an unknown one.
            match ev.0.r#type {
                0 => events.push(Event::Put(Kv {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                })),
                1 => events.push(Event::Delete {
                    key: kv.key().to_vec(),
                    revision: kv.mod_revision(),
                }),
                t => log::warn!(
                    "etcd: ignoring an event of unknown type {t} on {}",
                    String::from_utf8_lossy(kv.key())
                ),
            }
        }
        let outcome = self.view.apply(events);
        self.apply(outcome);
        None
    }

    async fn dump(&mut self, req: DumpRequest) {
        if Instant::now() > req.deadline {
            // The caller has given up already: write nothing.
            return;
        }
        let started = Instant::now();
        let result = self.write_dump(req.deadline, req.timeout).await;
        match &result {
            Ok(r) => log::info!(
                "etcd: dump written: {} puts, {} deletes in {} transactions, {:.0?}",
                r.puts,
                r.deletes,
                r.txns,
                started.elapsed()
            ),
            Err(e) => log::warn!("etcd: dump failed: {e}"),
        }
        let _ = req.reply.try_send(result);
    }

    async fn write_dump(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<DumpReport, DumpError> {
        let layout = self.view.layout().clone();
        // The state to write, read here: no watch event is applied between
        // this read and the writes.
        let (domains, upstreams) = {
            let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
            let domains: Vec<_> = store
                .domains()
                .iter()
                .map(|(d, r)| (d.clone(), r.clone()))
                .collect();
            let upstreams: Vec<_> = store
                .upstreams()
                .iter()
                .map(|(n, up)| {
                    let peers = up
                        .peers
                        .iter()
                        .map(|(p, peer)| (p.clone(), peer.params.clone()))
                        .collect::<Vec<_>>();
                    (n.clone(), peers)
                })
                .collect();
            (domains, upstreams)
        };
        let want = desired(&layout, &domains, &upstreams);
        let (listing, _) = self
            .fetch(&layout.dumped())
            .await
            .map_err(|e| DumpError::Unavailable(e.to_string()))?;
        let current: HashMap<Vec<u8>, Vec<u8>> =
            listing.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let plan = plan_dump(&current, &want);
        let total = plan.len();
        let mut report = DumpReport {
            puts: 0,
            deletes: 0,
            txns: 0,
        };
        let mut written: Vec<(Op, i64)> = Vec::new();
        let mut kv = self.kv();
        let mut failure = None;
        for (i, batch) in plan.into_iter().enumerate() {
            if Instant::now() > deadline {
                failure = Some(DumpError::Timeout(timeout));
                break;
            }
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|op| match op {
                    Op::Put(k, v) => TxnOp::put(k.clone(), v.clone(), None),
                    Op::Delete(k) => TxnOp::delete(k.clone(), None),
                })
                .collect();
            let txn = Txn::new().and_then(ops);
            let revision = match retry(async || kv.txn(txn.clone()).await).await {
                Ok(resp) => resp.header().map(|h| h.revision()),
                Err(e) => {
                    failure = Some(DumpError::Failed {
                        done: i,
                        total,
                        reason: e.to_string(),
                    });
                    break;
                }
            };
            report.txns += 1;
            for op in batch {
                match op {
                    Op::Put(..) => report.puts += 1,
                    Op::Delete(_) => report.deletes += 1,
                }
                // Without a revision the echo is applied as any event (the
                // store skips values it holds already).
                if let Some(r) = revision {
                    written.push((op, r));
                }
            }
        }
        self.view.record_dump(&written);
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
