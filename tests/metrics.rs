//! `GET /__erulb__/metrics`: the OpenMetrics text that `prometheus-client`
//! writes, checked by the Prometheus project's own parser (Debian's
//! `python3-prometheus-client`, which `scripts/test` installs), with exact
//! values after known traffic.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use common::backend::{Backend, admin, get, put_domains, put_upstreams, to_backend};
use common::{EVENTUALLY, Elb, wait_until};

/// Debian's interpreter, which has the parser whatever else is on PATH.
const PYTHON: &str = "/usr/bin/python3";

/// The parser's reading: every sample as (family, sample name, labels, value).
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    if not fam.documentation:
        raise SystemExit("no HELP for " + fam.name)
    for s in fam.samples:
        out.append([fam.name, fam.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// Scrapes and parses; fails the test when the parser refuses the text.
fn scrape(elb: &Elb) -> Vec<Value> {
    let a = admin(elb.admin_addr(), "GET", "/__erulb__/metrics", None);
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let mut child = Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Prometheus parser");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(a.text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the parser refused the metrics: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.text
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("parser JSON")
}

/// The values of a family's samples named `sample`, by one label's value.
fn values(samples: &[Value], sample: &str, label: &str) -> HashMap<String, f64> {
    samples
        .iter()
        .filter(|s| s[2] == sample)
        .map(|s| {
            (
                s[3][label].as_str().unwrap_or_default().to_string(),
                s[4].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

#[test]
fn metrics_parse_and_count_exactly() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    put_upstreams(
        elb.admin_addr(),
        &json!({"web": {a.host_port(): "weight=3", b.host_port(): "down"}}),
    );
    put_domains(elb.admin_addr(), &json!({"m.test": to_backend("web")}));

    let before: f64 = values(&scrape(&elb), "elb_worker_requests_total", "worker")
        .values()
        .sum();
    for _ in 0..30 {
        assert_eq!(get(elb.listen_addr(), "m.test", "/", &[]).status, 200);
    }
    let mut samples = Vec::new();
    assert!(
        wait_until(EVENTUALLY, || {
            samples = scrape(&elb);
            let now: f64 = values(&samples, "elb_worker_requests_total", "worker")
                .values()
                .sum();
            now == before + 30.0
        }),
        "{samples:?}"
    );
    let workers = values(&samples, "elb_worker_requests_total", "worker");
    assert_eq!(workers.len(), 2, "{samples:?}");
    // Two peers, a few connections each: no pool reached its cap.
    let evictions = values(&samples, "elb_worker_pool_evictions_total", "worker");
    assert_eq!(evictions.len(), 2, "{samples:?}");
    assert!(evictions.values().all(|&n| n == 0.0), "{samples:?}");

    let healthy = values(&samples, "elb_peer_healthy", "peer");
    assert_eq!(healthy.get(&a.host_port()), Some(&1.0), "{samples:?}");
    assert_eq!(healthy.get(&b.host_port()), Some(&0.0), "{samples:?}");
    let weight = values(&samples, "elb_peer_effective_weight", "peer");
    assert_eq!(weight.get(&a.host_port()), Some(&3.0), "{samples:?}");

    let generation = values(&samples, "elb_config_generation", "");
    assert!(generation.values().all(|&g| g >= 2.0), "{samples:?}");
    let etcd = values(&samples, "elb_etcd_up", "");
    assert_eq!(etcd.values().copied().collect::<Vec<_>>(), vec![0.0]);
    let arena = values(&samples, "elb_config_arena_bytes", "state");
    assert!(arena["used"] > 0.0 && arena["free"] > 0.0, "{samples:?}");
    // Every family is typed.
    assert!(samples.iter().all(|s| s[1].is_string()), "{samples:?}");

    // Each of the 30 answers is in the upstream's response-time histogram,
    // in buckets that only grow up to `+Inf`.
    let count = values(&samples, "elb_upstream_response_seconds_count", "upstream");
    assert_eq!(count.get("web"), Some(&30.0), "{samples:?}");
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s[2] == "elb_upstream_response_seconds_bucket" && s[3]["upstream"] == "web")
        .map(|s| {
            let le = s[3]["le"].as_str().unwrap_or_default();
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            (bound, s[4].as_f64().unwrap_or(f64::NAN))
        })
        .collect();
    assert_eq!(buckets.len(), 14, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, 30.0)));
}

#[test]
fn domain_counts_are_exact_and_survive_a_killed_worker() {
    let elb = Elb::builder().workers(2).start();
    let backend = Backend::start("a");
    put_upstreams(elb.admin_addr(), &json!({"web": {backend.host_port(): ""}}));
    put_domains(elb.admin_addr(), &json!({"d.test": to_backend("web")}));
    for _ in 0..12 {
        assert_eq!(get(elb.listen_addr(), "d.test", "/", &[]).status, 200);
    }
    let class = |samples: &[Value], c: &str| {
        samples
            .iter()
            .filter(|s| {
                s[2] == "elb_domain_requests_total"
                    && s[3]["domain"] == "d.test"
                    && s[3]["class"] == c
            })
            .filter_map(|s| s[4].as_f64())
            .sum::<f64>()
    };
    assert!(
        wait_until(EVENTUALLY, || class(&scrape(&elb), "2xx") == 12.0),
        "{:?}",
        scrape(&elb)
    );
    assert_eq!(class(&scrape(&elb), "5xx"), 0.0);
    // The worker that served the most: what it counted must survive it.
    let status = common::backend::admin_get(elb.admin_addr(), "/__erulb__/status");
    let victim = status["workers"]
        .as_array()
        .and_then(|ws| ws.iter().max_by_key(|w| w["requests"].as_u64()))
        .filter(|w| w["requests"].as_u64() > Some(1))
        .and_then(|w| w["pid"].as_i64())
        .expect("a worker that served requests") as i32;
    common::signal(victim, nix::sys::signal::Signal::SIGKILL);
    assert!(wait_until(EVENTUALLY, || {
        let w = elb.workers();
        w.len() == 2 && !w.contains(&victim)
    }));
    // What the dead worker counted is still there; the new one adds on.
    assert_eq!(class(&scrape(&elb), "2xx"), 12.0);
    for _ in 0..3 {
        assert_eq!(get(elb.listen_addr(), "d.test", "/", &[]).status, 200);
    }
    assert!(wait_until(EVENTUALLY, || class(&scrape(&elb), "2xx") == 15.0));
}
