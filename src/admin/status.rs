//! `GET /__erulb__/status`: the instance at a glance: version, uptime, each
//! worker's counts from its slot in the region, the configuration's
//! generation and room, and etcd's state.

use serde::Serialize;

use super::api::Answer;
use crate::store::{SourceStatus, Store};

#[derive(Serialize)]
struct Status<'a> {
    version: &'static str,
    /// Seconds since the master started.
    uptime: f64,
    workers: Vec<Worker>,
    generation: u64,
    etcd: &'a SourceStatus,
    /// `null` unless `[kubernetes]` is set.
    kubernetes: Option<&'a SourceStatus>,
    region: Region,
    /// Every `limit` rule with the requests it refused.
    limits: Vec<LimitCount<'a>>,
    /// The dictionary that holds the `limit` rules' buckets.
    limit_zone: LimitZone,
}

#[derive(Serialize)]
struct LimitZone {
    size: usize,
    free: usize,
    /// Buckets dropped before they drained, to make room.
    evictions: u64,
    /// Times a process died holding its lock and the next one repaired it.
    repairs: u64,
    /// Every invariant of the zone holds (checked now, under its lock).
    consistent: bool,
}

#[derive(Serialize)]
struct LimitCount<'a> {
    domain: &'a str,
    rule: &'a str,
    rejected: u64,
}

#[derive(Serialize)]
struct Worker {
    pid: u32,
    /// Unix seconds.
    started: u64,
    requests: u64,
    active_connections: u64,
    /// Workers that ran in this slot before this one.
    restarts: u64,
}

/// The configuration arena, where rule sets and peer lists live.
#[derive(Serialize)]
struct Region {
    size: usize,
    used: usize,
    free: usize,
}

pub(super) fn answer(store: &Store) -> Answer {
    let region = store.region();
    let workers = (0..elb_shm::MAX_WORKERS)
        .filter_map(|i| region.worker_slot(i))
        .filter(|s| s.pid() != 0)
        .map(|s| Worker {
            pid: s.pid(),
            started: s.started(),
            requests: s.requests(),
            active_connections: s.connections(),
            restarts: s.restarts(),
        })
        .collect();
    let (used, free) = store.arena_usage();
    let status = Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime: store.uptime().as_millis() as f64 / 1000.0,
        workers,
        generation: store.generation(),
        etcd: store.etcd_status(),
        kubernetes: store.kubernetes_status(),
        limit_zone: {
            let dict = region.dict();
            LimitZone {
                size: dict.capacity(),
                free: dict.free_space(),
                evictions: elb_workers::limit::evictions(region),
                repairs: dict.repair_count(),
                consistent: dict.check_consistency().is_ok(),
            }
        },
        limits: store
            .limit_rules()
            .into_iter()
            .map(|(domain, rule)| LimitCount {
                domain,
                rule,
                rejected: elb_workers::limit::rejected(region, domain, rule),
            })
            .collect(),
        region: Region {
            size: region.layout().size,
            used,
            free,
        },
    };
    Answer::json(200, &status)
}
