//! Peer health in the master: the active check (probes, once per
//! instance, whatever the number of workers), the log check, the panic
//! threshold and slow start. Workers keep passive health themselves; the
//! master's verdicts reach them through each peer's state slot
//! (`elb_workers::health`), and slow-start steps as new schedules.
//!
//! It runs on a thread of its own with its own single-threaded runtime:
//! the etcd thread may hold the store for a large load or wait on DNS,
//! and probes must keep their timing whatever it does; probes are I/O
//! only, so one thread carries thousands of them.

mod active;
mod logcheck;
mod probe;
pub(crate) mod ramp;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::sync::{Semaphore, mpsc};

use crate::settings::Settings;
use crate::store::{PeerStatus, Store};
use active::{Active, Verdict, spread};
use elb_shm::Region;
use elb_workers::health::{HealthSlot, OUT_BY_CHECK, OUT_BY_LOG, now_ms};
use logcheck::Answers;
use probe::probe;

pub use active::CheckConfig;
pub use logcheck::LogCheckConfig;

/// How often the thread looks at the peers: the slow-start step, and how
/// late a passive recovery or a log-check expiry can be seen.
const TICK: Duration = Duration::from_millis(250);
/// Probes in flight at once.
const MAX_PROBES: usize = 256;

/// What the health thread does.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `None`: no active check.
    pub check: Option<CheckConfig>,
    /// `None`: no log check.
    pub logcheck: Option<LogCheckConfig>,
    /// Percent of an upstream's primaries that must pass their checks for
    /// the checks to count; 0: always count.
    pub panic_threshold: u32,
}

impl Config {
    pub fn from_settings(settings: &Settings) -> Config {
        let h = &settings.healthcheck;
        Config {
            check: h.enable.then(|| CheckConfig {
                interval: h.interval,
                timeout: h.timeout,
                max_fails: h.max_fails,
                ok_status: h.ok_status.clone(),
                check_url: h.check_url.clone(),
            }),
            logcheck: settings.logcheck.enable.then_some(LogCheckConfig {
                interval: settings.logcheck.interval,
                recover: settings.logcheck.recover,
            }),
            panic_threshold: h.panic_threshold,
        }
    }
}

/// Starts the health thread. Call after the signals are blocked (the
/// thread inherits the mask).
pub fn start(
    config: Config,
    store: Arc<Mutex<Store>>,
    region: &'static Region,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("elb-health".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("health: cannot start the runtime: {e}");
                    return;
                }
            };
            rt.block_on(Monitor::new(config, store, region).run());
        })?;
    Ok(())
}

/// A probe's outcome, for the peer in slot `slot`, incarnation `incarnation`.
struct ProbeDone {
    slot: u32,
    incarnation: u32,
    result: Result<u16, probe::ProbeError>,
}

/// What the thread knows of one peer.
struct Tracked {
    incarnation: u32,
    upstream: String,
    name: String,
    addr: SocketAddr,
    /// The check URL probed, if any.
    check_url: Option<String>,
    primary: bool,
    /// The upstream's only primary: no slow start (as nginx).
    alone: bool,
    /// Not `down`, status "up".
    available: bool,
    weight: f64,
    slow_start: Duration,
    active: Option<Active>,
    answers: Answers,
    passive_out: bool,
    /// Out for any reason at the last tick (to start a ramp on return).
    out: bool,
    /// The verdict last written to the slot.
    written: u64,
    ramp_since: Option<Instant>,
    /// Seen in the store at the last sync.
    seen: bool,
}

impl Tracked {
    fn slot(&self, index: u32) -> HealthSlot {
        HealthSlot {
            index,
            incarnation: self.incarnation,
        }
    }
}

struct Monitor {
    config: Config,
    store: Arc<Mutex<Store>>,
    region: &'static Region,
    peers: HashMap<u32, Tracked>,
    done_tx: mpsc::UnboundedSender<ProbeDone>,
    done_rx: mpsc::UnboundedReceiver<ProbeDone>,
    probes: Arc<Semaphore>,
    last_sample: Instant,
    last_logcheck: Instant,
    /// Upstreams whose checks are ignored now (panic).
    panicking: BTreeSet<String>,
    /// Times an upstream went into panic, since start.
    panics: u64,
    /// Upstreams that had slow-start weights at the last tick.
    ramping: BTreeSet<String>,
}

impl Monitor {
    fn new(config: Config, store: Arc<Mutex<Store>>, region: &'static Region) -> Monitor {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        Monitor {
            config,
            store,
            region,
            peers: HashMap::new(),
            done_tx,
            done_rx,
            probes: Arc::new(Semaphore::new(MAX_PROBES)),
            last_sample: now,
            last_logcheck: now,
            panicking: BTreeSet::new(),
            panics: 0,
            ramping: BTreeSet::new(),
        }
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(done) = self.done_rx.recv() => self.probed(done),
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.sync(now);
        self.start_probes(now);
        if now.duration_since(self.last_sample) >= Duration::from_secs(1) {
            self.last_sample = now;
            self.sample();
        }
        if let Some(lc) = self.config.logcheck
            && now.duration_since(self.last_logcheck) >= lc.interval
        {
            self.last_logcheck = now;
            self.log_check(now, lc.recover);
        }
        self.verdicts(now);
        self.publish(now);
    }

    /// Follows the store: new peers tracked, removed ones forgotten, kept
    /// ones (same slot, same incarnation) keep everything.
    fn sync(&mut self, now: Instant) {
        let store = Arc::clone(&self.store);
        let store = store.lock().unwrap_or_else(PoisonError::into_inner);
        for t in self.peers.values_mut() {
            t.seen = false;
        }
        for (upstream, up) in store.upstreams() {
            let alone = up.peers.values().filter(|p| !p.params.backup).count() <= 1;
            for (name, peer) in &up.peers {
                let slot = peer.health_slot();
                // The URL as configured; made into a path only when it
                // changes, so that a tick allocates nothing for known peers.
                let raw_url = self
                    .config
                    .check
                    .as_ref()
                    .and_then(|c| peer.params.check_url.as_deref().or(c.check_url.as_deref()));
                let tracked = self
                    .peers
                    .get_mut(&slot.index)
                    .filter(|t| t.incarnation == slot.incarnation);
                match tracked {
                    Some(t) => {
                        t.seen = true;
                        t.primary = !peer.params.backup;
                        t.alone = alone;
                        t.available = peer.params.is_available();
                        t.weight = peer.params.weight.as_f64();
                        t.slow_start = Duration::from_secs(u64::from(peer.params.slow_start_s));
                        if !same_url(t.check_url.as_deref(), raw_url) {
                            t.check_url = raw_url.map(url_path);
                        }
                        if t.check_url.is_none() {
                            t.active = None;
                        } else if t.active.is_none()
                            && let Some(c) = &self.config.check
                        {
                            t.active = Some(Active::new(now, c.interval, spread(slot.index)));
                        }
                    }
                    None => {
                        let check_url = raw_url.map(url_path);
                        let active = match (&self.config.check, &check_url) {
                            (Some(c), Some(_)) => {
                                Some(Active::new(now, c.interval, spread(slot.index)))
                            }
                            _ => None,
                        };
                        let ramp = peer.added_live && !alone && peer.params.slow_start_s > 0;
                        self.peers.insert(
                            slot.index,
                            Tracked {
                                incarnation: slot.incarnation,
                                upstream: upstream.clone(),
                                name: name.clone(),
                                addr: peer.addr,
                                check_url,
                                primary: !peer.params.backup,
                                alone,
                                available: peer.params.is_available(),
                                weight: peer.params.weight.as_f64(),
                                slow_start: Duration::from_secs(u64::from(
                                    peer.params.slow_start_s,
                                )),
                                active,
                                answers: Answers::default(),
                                passive_out: false,
                                out: false,
                                written: 0,
                                ramp_since: ramp.then_some(now),
                                seen: true,
                            },
                        );
                    }
                }
            }
        }
        self.peers.retain(|_, t| t.seen);
    }

    fn start_probes(&mut self, now: Instant) {
        let Some(check) = &self.config.check else {
            return;
        };
        for (&slot, t) in &mut self.peers {
            let (Some(active), Some(url)) = (&mut t.active, &t.check_url) else {
                continue;
            };
            if !active.due(now, check.interval) {
                continue;
            }
            let done = self.done_tx.clone();
            let limit = Arc::clone(&self.probes);
            let (addr, host, url, timeout) = (t.addr, t.name.clone(), url.clone(), check.timeout);
            let incarnation = t.incarnation;
            tokio::spawn(async move {
                // The semaphore is never closed.
                let Ok(_permit) = limit.acquire_owned().await else {
                    return;
                };
                let result = probe(addr, &host, &url, timeout).await;
                let _ = done.send(ProbeDone {
                    slot,
                    incarnation,
                    result,
                });
            });
        }
    }

    fn probed(&mut self, done: ProbeDone) {
        let Some(check) = &self.config.check else {
            return;
        };
        let Some(t) = self
            .peers
            .get_mut(&done.slot)
            .filter(|t| t.incarnation == done.incarnation)
        else {
            return;
        };
        let Some(active) = &mut t.active else {
            return;
        };
        let passed = matches!(&done.result, Ok(s) if check.ok_status.contains(s));
        match active.record(passed, check.max_fails) {
            Verdict::WentOut => {
                let why = match &done.result {
                    Ok(s) => format!("status {s}"),
                    Err(e) => e.to_string(),
                };
                log::warn!(
                    "health: peer {} of {} out: {} failed checks in a row (last: {why})",
                    t.name,
                    t.upstream,
                    active.fails
                );
            }
            Verdict::CameBack => {
                log::info!(
                    "health: peer {} of {} back: its check passed",
                    t.name,
                    t.upstream
                );
            }
            Verdict::Same => {}
        }
    }

    /// Reads each peer's answers and errors from the workers' counters:
    /// the numbers `/__erulb__/stats` reports.
    fn sample(&mut self) {
        let store = Arc::clone(&self.store);
        let store = store.lock().unwrap_or_else(PoisonError::into_inner);
        for (&index, t) in &mut self.peers {
            let reading = store
                .upstreams()
                .get(&t.upstream)
                .and_then(|u| u.peers.get(&t.name))
                .filter(|p| p.health_slot() == t.slot(index))
                .and_then(|p| store.peer_counts(p))
                .map(|c| (c.requests, c.classes[3] + c.classes[4]));
            t.answers.sample(reading);
        }
    }

    fn log_check(&mut self, now: Instant, recover: Duration) {
        let mut by_upstream: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (&index, t) in &self.peers {
            by_upstream
                .entry(t.upstream.as_str())
                .or_default()
                .push(index);
        }
        let mut going: Vec<u32> = Vec::new();
        for slots in by_upstream.values() {
            let already = slots
                .iter()
                .filter(|s| self.peers[s].answers.is_out(now))
                .count();
            let failing: Vec<usize> = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    let a = &self.peers[s].answers;
                    !a.is_out(now) && a.failing()
                })
                .map(|(i, _)| i)
                .collect();
            going.extend(
                logcheck::decide(slots.len(), already, &failing)
                    .iter()
                    .map(|&i| slots[i]),
            );
        }
        for slot in going {
            if let Some(t) = self.peers.get_mut(&slot) {
                t.answers.out_until = Some(now + recover);
                log::warn!(
                    "health: peer {} of {} out for {recover:?}: more than half of its answers in the last 5 s were errors",
                    t.name,
                    t.upstream
                );
            }
        }
    }

    /// Combines the signals, applies the panic threshold, and writes each
    /// peer's verdict where the workers read it.
    fn verdicts(&mut self, now: Instant) {
        let now_ms = now_ms();
        for t in self.peers.values_mut() {
            if t.answers.out_until.is_some() && !t.answers.is_out(now) {
                t.answers.out_until = None;
                log::info!(
                    "health: peer {} of {} back after the log check's recover time",
                    t.name,
                    t.upstream
                );
            }
        }
        // Per upstream: primaries available, and those passing the checks.
        let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for t in self.peers.values().filter(|t| t.primary && t.available) {
            let c = counts.entry(t.upstream.as_str()).or_default();
            c.0 += 1;
            if !checked_out(t, now) {
                c.1 += 1;
            }
        }
        let threshold = self.config.panic_threshold;
        for (upstream, &(primaries, passing)) in &counts {
            let panic =
                threshold > 0 && primaries > 0 && passing * 100 < threshold as usize * primaries;
            let was = self.panicking.contains(*upstream);
            if panic && !was {
                self.panics += 1;
                log::warn!(
                    "health: upstream {upstream} in panic: {passing} of {primaries} primaries pass their checks, under {threshold}%; ignoring the checks (panic {} since start)",
                    self.panics
                );
                self.panicking.insert(upstream.to_string());
            } else if !panic && was {
                log::info!(
                    "health: upstream {upstream} out of panic: {passing} of {primaries} primaries pass"
                );
                self.panicking.remove(*upstream);
            }
        }
        self.panicking.retain(|u| counts.contains_key(u.as_str()));
        for (&index, t) in &mut self.peers {
            let mut verdict = 0;
            if !self.panicking.contains(&t.upstream) {
                if t.active.as_ref().is_some_and(|a| a.out) {
                    verdict |= OUT_BY_CHECK;
                }
                if t.answers.is_out(now) {
                    verdict |= OUT_BY_LOG;
                }
            }
            let health = t.slot(index).in_region(self.region);
            if verdict != t.written && health.as_ref().is_some_and(|h| h.set_checked_out(verdict)) {
                t.written = verdict;
            }
            let passive = health.is_some_and(|h| h.passively_out(now_ms));
            if passive != t.passive_out {
                t.passive_out = passive;
                if passive {
                    log::warn!(
                        "health: peer {} of {} out: passive failures",
                        t.name,
                        t.upstream
                    );
                } else {
                    log::info!(
                        "health: peer {} of {} back after fail_timeout",
                        t.name,
                        t.upstream
                    );
                }
            }
            let out = !t.available || t.written != 0 || t.passive_out;
            if t.out && !out && !t.slow_start.is_zero() {
                t.ramp_since = Some(now);
            }
            if out {
                t.ramp_since = None;
            }
            t.out = out;
        }
    }

    /// Slow-start weights into the schedules, and every peer's state into
    /// the store for the admin API.
    fn publish(&mut self, now: Instant) {
        let mut ramps: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        let mut parts: HashMap<u32, u32> = HashMap::new();
        for (&index, t) in &mut self.peers {
            let Some(since) = t.ramp_since else { continue };
            match ramp::part(since, t.slow_start, now).filter(|_| !t.alone) {
                Some(part) => {
                    parts.insert(index, part);
                    ramps
                        .entry(t.upstream.clone())
                        .or_default()
                        .insert(t.name.clone(), part);
                }
                None => t.ramp_since = None,
            }
        }
        let mut status = HashMap::with_capacity(self.peers.len());
        for (&index, t) in &self.peers {
            let reason = if !t.available {
                Some("down")
            } else if t.written & OUT_BY_CHECK != 0 {
                Some("check")
            } else if t.written & OUT_BY_LOG != 0 {
                Some("log")
            } else if t.passive_out {
                Some("passive")
            } else {
                None
            };
            let part = parts.get(&index).copied().unwrap_or(ramp::FULL);
            status.insert(
                index,
                PeerStatus {
                    incarnation: t.incarnation,
                    out_reason: reason,
                    effective_weight: t.weight * f64::from(part) / f64::from(ramp::FULL),
                    fails: t.active.as_ref().map_or(0, |a| a.fails),
                    last_check: t
                        .active
                        .as_ref()
                        .and_then(|a| a.last_check)
                        .and_then(|c| c.duration_since(UNIX_EPOCH).ok())
                        .map(|d| (d.as_millis() as f64) / 1000.0),
                },
            );
        }
        // Upstreams that ramped at the last tick and no longer do go back
        // to their plain weights.
        let mut changes: Vec<(String, BTreeMap<String, u32>)> = self
            .ramping
            .iter()
            .filter(|u| !ramps.contains_key(*u))
            .map(|u| (u.clone(), BTreeMap::new()))
            .collect();
        self.ramping = ramps.keys().cloned().collect();
        changes.extend(ramps);
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if !changes.is_empty()
            && let Err(e) = store.set_ramps(changes)
        {
            log::warn!("health: cannot publish slow-start weights: {e}");
        }
        store.set_peer_status(status, self.panics);
    }
}

/// A check URL as a request path: a leading `/` added when it lacks one.
fn url_path(url: &str) -> String {
    if url.starts_with('/') {
        url.to_string()
    } else {
        format!("/{url}")
    }
}

/// Whether `path` is what [`url_path`] makes of `raw`.
fn same_url(path: Option<&str>, raw: Option<&str>) -> bool {
    match (path, raw) {
        (None, None) => true,
        (Some(p), Some(r)) => p == r || p.strip_prefix('/') == Some(r),
        _ => false,
    }
}

/// Out by the active or the log check (before the panic threshold).
fn checked_out(t: &Tracked, now: Instant) -> bool {
    t.active.as_ref().is_some_and(|a| a.out) || t.answers.is_out(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_urls_are_paths() {
        assert_eq!(url_path("/health"), "/health");
        assert_eq!(url_path("health"), "/health");
        assert!(same_url(Some("/health"), Some("health")));
        assert!(same_url(Some("/health"), Some("/health")));
        assert!(!same_url(Some("/health"), Some("/status")));
        assert!(!same_url(None, Some("/health")));
        assert!(same_url(None, None));
    }
}
