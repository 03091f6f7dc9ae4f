//! `GET /__erulb__/stats` and `/stats/tps`: the per-peer, per-second
//! request statistics of lua-resty-upstream-etcd's logger, read from the
//! workers' counters in the region by the master once a second.

mod common;

use std::collections::BTreeMap;

use serde_json::{Value, json};

use common::backend::{admin, admin_get, get, put_domains, put_upstreams, to_backend};
use common::health::HealthBackend;
use common::{EVENTUALLY, Elb, wait_until};

/// A report's counts: peer → code → count.
fn codes(report: &Value) -> BTreeMap<String, BTreeMap<u64, u64>> {
    report["statistics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let stat = p["stat"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["code"].as_u64().unwrap_or(0),
                        s["count"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            (p["peer"].as_str().unwrap_or_default().to_string(), stat)
        })
        .collect()
}

#[test]
fn stats_count_each_peers_codes_exactly_and_tps_follows() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (HealthBackend::start("a"), HealthBackend::start("b"));
    a.set_status(200);
    b.set_status(404);
    put_upstreams(
        elb.admin_addr(),
        &json!({"web": {a.host_port(): "max_fails=0", b.host_port(): "max_fails=0"}}),
    );
    put_domains(elb.admin_addr(), &json!({"s.test": to_backend("web")}));
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        let status = get(elb.listen_addr(), "s.test", "/", &[]).status;
        *seen.entry(status).or_insert(0u64) += 1;
    }
    // The backends' own counts say what each peer answered.
    let (na, nb) = (a.requests() as u64, b.requests() as u64);
    assert_eq!(na + nb, 20);
    assert_eq!(seen.get(&200), Some(&na));
    assert_eq!(seen.get(&404), Some(&nb));
    let want: BTreeMap<String, BTreeMap<u64, u64>> = [
        (a.host_port(), [(200, na)].into_iter().collect()),
        (b.host_port(), [(404, nb)].into_iter().collect()),
    ]
    .into_iter()
    .collect();

    let mut report = Value::Null;
    assert!(
        wait_until(EVENTUALLY, || {
            report = admin_get(elb.admin_addr(), "/__erulb__/stats?upstream=web");
            codes(&report) == want
        }),
        "want {want:?}, got {report}"
    );
    assert_eq!(report["name"], "web");
    let (start, end) = (report["ts_start"].as_u64(), report["ts_end"].as_u64());
    assert_eq!(start.zip(end).map(|(s, e)| e - s), Some(60), "{report}");
    for p in report["statistics"].as_array().into_iter().flatten() {
        assert!(p["rtsum"].as_f64().is_some_and(|s| s >= 0.0), "{report}");
    }

    // One peer only, by its address; a later sample adds nothing twice.
    let one = admin_get(
        elb.admin_addr(),
        &format!(
            "/__erulb__/stats?upstream=web&peer={}&offset=60",
            a.host_port()
        ),
    );
    assert_eq!(
        codes(&one),
        [(a.host_port(), want[&a.host_port()].clone())]
            .into_iter()
            .collect()
    );
    let status = admin_get(elb.admin_addr(), "/__erulb__/status");
    let uptime = status["uptime"].as_f64().unwrap_or(0.0);
    assert!(wait_until(EVENTUALLY, || {
        admin_get(elb.admin_addr(), "/__erulb__/status")["uptime"]
            .as_f64()
            .is_some_and(|u| u > uptime + 2.0)
    }));
    assert_eq!(
        codes(&admin_get(
            elb.admin_addr(),
            "/__erulb__/stats?upstream=web"
        )),
        want
    );

    // Every request of the test falls in the last 60 seconds.
    let tps = admin_get(elb.admin_addr(), "/__erulb__/stats/tps?offset=60")["tps"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!((tps * 60.0 - 20.0).abs() < 0.01, "tps {tps}");

    // What is wrong is said.
    let no_name = admin(elb.admin_addr(), "GET", "/__erulb__/stats", None);
    assert_eq!(no_name.status, 400, "{}", no_name.text);
    let unknown = admin(
        elb.admin_addr(),
        "GET",
        "/__erulb__/stats?upstream=nope",
        None,
    );
    assert_eq!(unknown.status, 404, "{}", unknown.text);
    let bad = admin(
        elb.admin_addr(),
        "GET",
        "/__erulb__/stats?upstream=web&offset=soon",
        None,
    );
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert!(
        bad.json["error"]
            .as_str()
            .is_some_and(|e| e.contains("offset"))
    );
}

#[test]
fn a_peer_that_cannot_be_reached_counts_as_502() {
    let elb = Elb::builder().workers(1).start();
    // A port nothing listens on: connect is refused.
    let dead = common::free_addr();
    put_upstreams(
        elb.admin_addr(),
        &json!({"gone": {dead.to_string(): "max_fails=0"}}),
    );
    put_domains(elb.admin_addr(), &json!({"g.test": to_backend("gone")}));
    for _ in 0..3 {
        assert_eq!(get(elb.listen_addr(), "g.test", "/", &[]).status, 502);
    }
    let want: BTreeMap<String, BTreeMap<u64, u64>> =
        [(dead.to_string(), [(502, 3)].into_iter().collect())]
            .into_iter()
            .collect();
    let mut report = Value::Null;
    assert!(
        wait_until(EVENTUALLY, || {
            report = admin_get(elb.admin_addr(), "/__erulb__/stats?upstream=gone&offset=30");
            codes(&report) == want
        }),
        "{report}"
    );
}
