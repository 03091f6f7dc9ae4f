//! `GET /__erulb__/metrics`: what `/status` and the upstream view show, in
//! the Prometheus text format, written by `prometheus-client` from typed
//! families (it writes `# HELP`, `# TYPE` and escapes label values).
//! Each scrape builds a registry from the current values.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};

use elb_shm::counters::{BOUNDS_MS, Observed};

use super::api::{Answer, error};
use crate::store::Store;

/// `prometheus-client` writes the OpenMetrics text format (`# EOF` at the
/// end, counters as `_total`), which Prometheus reads.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
    pid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    upstream: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainClassLabels {
    domain: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// A histogram whose buckets the workers counted already (the crate's own
/// `Histogram` only takes observations one by one).
#[derive(Debug, Default)]
struct Counted(Mutex<Observed>);

impl TypedMetric for Counted {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let o = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Per bucket, not cumulative: the encoder sums them into `le`
        // buckets, the last (`f64::MAX`) written `+Inf`.
        let buckets: Vec<(f64, u64)> = BOUNDS_MS
            .iter()
            .map(|&ms| ms as f64 / 1000.0)
            .chain(std::iter::once(f64::MAX))
            .zip(o.buckets)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(o.sum_ms as f64 / 1000.0, o.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    domain: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ArenaLabels {
    state: String,
}

pub(super) fn answer(store: &Store) -> Answer {
    let mut registry = Registry::with_prefix("elb");

    let requests = Family::<WorkerLabels, Counter>::default();
    let connections = Family::<WorkerLabels, Gauge>::default();
    let restarts = Family::<WorkerLabels, Counter>::default();
    let pauses = Family::<WorkerLabels, Counter>::default();
    let evictions = Family::<WorkerLabels, Counter>::default();
    let region = store.region();
    for i in 0..elb_shm::MAX_WORKERS {
        let Some(slot) = region.worker_slot(i).filter(|s| s.pid() != 0) else {
            continue;
        };
        let labels = WorkerLabels {
            worker: i.to_string(),
            pid: slot.pid().to_string(),
        };
        requests.get_or_create(&labels).inc_by(slot.requests());
        connections
            .get_or_create(&labels)
            .set(i64::try_from(slot.connections()).unwrap_or(i64::MAX));
        restarts.get_or_create(&labels).inc_by(slot.restarts());
        pauses.get_or_create(&labels).inc_by(slot.accept_pauses());
        evictions
            .get_or_create(&labels)
            .inc_by(slot.pool_evictions());
    }
    registry.register(
        "worker_requests",
        "Requests a worker has read since it started",
        requests,
    );
    registry.register(
        "worker_active_connections",
        "Client connections a worker holds now",
        connections,
    );
    registry.register(
        "worker_accept_pauses",
        "Times the worker stopped accepting: at [limits] max_connections, or out of descriptors",
        pauses,
    );
    registry.register(
        "worker_pool_evictions",
        "Idle peer connections closed because a peer's pool in the worker was at its cap",
        evictions,
    );
    registry.register(
        "worker_restarts",
        "Workers that ran in this slot before the current one",
        restarts,
    );

    let by_class = Family::<DomainClassLabels, Counter>::default();
    let seconds = Family::<DomainLabels, Counter<f64, AtomicU64>>::default();
    for (domain, counts) in store.domain_counts() {
        for (i, n) in counts.classes.iter().enumerate() {
            by_class
                .get_or_create(&DomainClassLabels {
                    domain: domain.to_string(),
                    class: format!("{}xx", i + 1),
                })
                .inc_by(*n);
        }
        seconds
            .get_or_create(&DomainLabels {
                domain: domain.to_string(),
            })
            .inc_by(counts.cost_ms as f64 / 1000.0);
    }
    registry.register(
        "domain_requests",
        "Requests for a domain, by the status class of their answers",
        by_class,
    );
    registry.register(
        "domain_request_seconds",
        "Time spent on a domain's requests, from head to answer, in all",
        seconds,
    );

    let response = Family::<UpstreamLabels, Counted>::default();
    for (name, up) in store.upstreams() {
        if let Some(observed) = store.response_times(up) {
            *response
                .get_or_create(&UpstreamLabels {
                    upstream: name.clone(),
                })
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = observed;
        }
    }
    registry.register(
        "upstream_response_seconds",
        "Time from sending a request to a peer of the upstream to the head of its answer (or its failure)",
        response,
    );

    let healthy = Family::<PeerLabels, Gauge>::default();
    let weight = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
    for (name, up) in store.upstreams() {
        for (peer_name, p) in &up.peers {
            let labels = PeerLabels {
                upstream: name.clone(),
                peer: peer_name.clone(),
            };
            let status = store.peer_status(p);
            let out = match status {
                Some(s) => s.out_reason.is_some(),
                None => !p.params.is_available(),
            };
            healthy.get_or_create(&labels).set(i64::from(!out));
            weight
                .get_or_create(&labels)
                .set(status.map_or(p.params.weight.as_f64(), |s| s.effective_weight));
        }
    }
    registry.register(
        "peer_healthy",
        "1 when the peer takes traffic, 0 when a signal has it out",
        healthy,
    );
    registry.register(
        "peer_effective_weight",
        "The weight the peer's schedule uses now (lower during slow start)",
        weight,
    );

    let generation = Gauge::<i64>::default();
    generation.set(i64::try_from(store.generation()).unwrap_or(i64::MAX));
    registry.register(
        "config_generation",
        "The configuration generation last published",
        generation,
    );
    let etcd = store.etcd_status();
    let etcd_up = Gauge::<i64>::default();
    etcd_up.set(i64::from(etcd.state == "up"));
    registry.register("etcd_up", "1 while etcd answers and is watched", etcd_up);
    let revision = Gauge::<i64>::default();
    revision.set(etcd.revision.unwrap_or(0));
    registry.register(
        "etcd_revision",
        "The etcd revision the configuration is at",
        revision,
    );
    if let Some(k) = store.kubernetes_status() {
        let up = Gauge::<i64>::default();
        up.set(i64::from(k.state == "up"));
        registry.register(
            "kubernetes_up",
            "1 while the apiserver answers and is watched (present only with [kubernetes])",
            up,
        );
    }
    let arena = Family::<ArenaLabels, Gauge>::default();
    let (used, free) = store.arena_usage();
    for (state, bytes) in [("used", used), ("free", free)] {
        arena
            .get_or_create(&ArenaLabels {
                state: state.into(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    registry.register(
        "config_arena_bytes",
        "Bytes of the shared region's configuration arena",
        arena,
    );

    let rejected = Family::<LimitLabels, Counter>::default();
    for (domain, rule) in store.limit_rules() {
        rejected
            .get_or_create(&LimitLabels {
                domain: domain.to_string(),
                rule: rule.to_string(),
            })
            .inc_by(elb_workers::limit::rejected(region, domain, rule));
    }
    registry.register(
        "limit_rejected",
        "Requests a limit rule refused (answered 429, or sent on its fail branch)",
        rejected,
    );
    let evicted = Counter::<u64>::default();
    evicted.inc_by(elb_workers::limit::evictions(region));
    registry.register(
        "limit_evictions",
        "Rate-limit buckets dropped before they drained, to make room in the zone",
        evicted,
    );

    let panics = Counter::<u64>::default();
    panics.inc_by(store.panics());
    registry.register(
        "health_panics",
        "Times an upstream's checks were set aside by the panic threshold",
        panics,
    );

    let mut text = String::new();
    match encode(&mut text, &registry) {
        Ok(()) => Answer::text(CONTENT_TYPE, text),
        Err(e) => error(500, e.to_string()),
    }
}
