//! Peer health: the master's active check (once per instance), the log
//! check, passive health, the panic threshold and slow start, against real
//! backends whose health the tests switch while ELB runs.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::backend::{admin_get, get, put_domains, put_upstreams, to_backend};
use common::etcd::{Etcd, elb_on, rules_to};
use common::health::HealthBackend;
use common::{Elb, TempDir, wait_until};

/// Probe interval, timeout and failures in a row used by most tests.
const INTERVAL: f64 = 0.5;
const TIMEOUT: f64 = 0.3;
const MAX_FAILS: u32 = 2;
/// Slack for a loaded machine on top of a bound the contract gives.
const SLACK: Duration = Duration::from_secs(3);

fn check_config(extra: &str) -> String {
    format!(
        "[healthcheck]\nenable = true\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\nmax_fails = {MAX_FAILS}\n{extra}"
    )
}

/// An elb with this TOML and `workers` workers; the file lives in `dir`.
fn elb_with(dir: &TempDir, toml: &str, workers: usize) -> Elb {
    let file = dir.write("elb.toml", toml);
    Elb::builder()
        .workers(workers)
        .arg("--config")
        .arg(file.to_str().expect("utf-8 path"))
        .start()
}

/// Upstream `name` with these peers (backend, value) and a domain `host`
/// routed to it.
fn route(elb: &Elb, name: &str, host: &str, peers: &[(&HealthBackend, Value)]) {
    let list: serde_json::Map<String, Value> = peers
        .iter()
        .map(|(b, v)| (b.host_port(), v.clone()))
        .collect();
    put_upstreams(elb.admin_addr(), &json!({ name: list }));
    put_domains(elb.admin_addr(), &json!({ host: to_backend(name) }));
}

/// The admin API's view of one peer, if the upstream has it (yet).
fn try_peer(elb: &Elb, upstream: &str, b: &HealthBackend) -> Option<Value> {
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    ups[upstream]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == b.host_port().as_str()))
        .cloned()
}

/// The admin API's view of one peer the upstream has.
fn peer(elb: &Elb, upstream: &str, b: &HealthBackend) -> Value {
    try_peer(elb, upstream, b).unwrap_or_else(|| panic!("no peer {} in {upstream}", b.host_port()))
}

fn out_reason(elb: &Elb, upstream: &str, b: &HealthBackend) -> Value {
    peer(elb, upstream, b)["out_reason"].clone()
}

/// Waits until the peer's `out_reason` is `want`; returns how long it took.
fn wait_reason(
    elb: &Elb,
    upstream: &str,
    b: &HealthBackend,
    want: Value,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    assert!(
        wait_until(within, || out_reason(elb, upstream, b) == want),
        "{} in {upstream}: out_reason {} after {within:?}, want {want}; peer {}",
        b.name(),
        out_reason(elb, upstream, b),
        peer(elb, upstream, b)
    );
    start.elapsed()
}

/// Sends `n` requests for `host`; returns their statuses.
fn send(elb: &Elb, host: &str, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| get(elb.listen_addr(), host, "/", &[]).status)
        .collect()
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[test]
fn a_failing_check_takes_a_peer_out_and_one_pass_brings_it_back() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 2);
    let (a, b) = (HealthBackend::start("a"), HealthBackend::start("b"));
    let check = json!({"weight": 1, "check_url": "/health"});
    route(&elb, "web", "web.test", &[(&a, check.clone()), (&b, check)]);
    assert!(send(&elb, "web.test", 10).iter().all(|&s| s == 200));
    assert!(a.requests() > 0 && b.requests() > 0);

    // 500: out within interval x (max_fails + 1), then no request.
    a.set_health(500);
    let bound = secs(INTERVAL * f64::from(MAX_FAILS + 1));
    let took = wait_reason(&elb, "web", &a, json!("check"), bound + SLACK);
    eprintln!("out after {took:?} (bound {bound:?})");
    assert!(took <= bound + SLACK, "out after {took:?}");
    let before = a.requests();
    assert!(send(&elb, "web.test", 20).iter().all(|&s| s == 200));
    assert_eq!(a.requests(), before, "a peer out by its check got requests");
    assert!(!peer(&elb, "web", &a)["healthy"].as_bool().unwrap_or(true));

    // One pass brings it back.
    a.set_health(200);
    wait_reason(&elb, "web", &a, Value::Null, secs(INTERVAL * 2.0) + SLACK);
    let before = a.requests();
    send(&elb, "web.test", 10);
    assert!(
        a.requests() > before,
        "a peer back from its check got nothing"
    );

    // 404 counts as healthy by default; 503 does not.
    a.set_health(404);
    let probes = a.probes();
    assert!(wait_until(secs(INTERVAL * 4.0) + SLACK, || a.probes()
        > probes + MAX_FAILS as usize));
    assert_eq!(
        out_reason(&elb, "web", &a),
        Value::Null,
        "404 took the peer out"
    );
    assert_eq!(peer(&elb, "web", &a)["fails"], 0);
    a.set_health(503);
    wait_reason(&elb, "web", &a, json!("check"), bound + SLACK);

    // Each transition logged once by the master, naming the peer: out
    // twice (500, 503), back once; still out and failing adds no line.
    let lines = |word: &str| {
        elb.stderr()
            .lines()
            .filter(|l| l.contains("health") && l.contains(&a.host_port()) && l.contains(word))
            .count()
    };
    assert!(
        wait_until(SLACK, || lines(" out") >= 2 && lines(" back") >= 1),
        "transitions not logged: {}",
        elb.stderr()
    );
    let probes = a.probes();
    assert!(wait_until(secs(INTERVAL * 4.0) + SLACK, || a.probes() >= probes + 2));
    assert_eq!(
        (lines(" out"), lines(" back")),
        (2, 1),
        "each transition once: {}",
        elb.stderr()
    );
}

#[test]
fn four_workers_make_one_probe_per_interval() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 4);
    let a = HealthBackend::start("a");
    route(
        &elb,
        "web",
        "web.test",
        &[(&a, json!({"check_url": "/health"}))],
    );
    assert!(wait_until(secs(INTERVAL * 2.0) + SLACK, || a.probes() >= 1));
    let (start, probes) = (Instant::now(), a.probes());
    let window = secs(INTERVAL * 8.0);
    assert!(!wait_until(window, || false));
    let seen = a.probes() - probes;
    let intervals = start.elapsed().as_secs_f64() / INTERVAL;
    eprintln!("{seen} probes in {intervals:.1} intervals");
    assert!(seen >= 1, "no probe in {intervals:.1} intervals");
    assert!(
        (seen as f64) <= intervals + 1.0,
        "{seen} probes in {intervals:.1} intervals: more than one per interval"
    );
    // What a probe looks like.
    let (_, head) = a.probe_log().pop().expect("a probe");
    assert!(head.starts_with("get /health http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("host: {}\r\n", a.host_port())),
        "{head}"
    );
    assert!(head.contains("user-agent: elb-healthcheck\r\n"), "{head}");
    assert!(head.contains("connection: close\r\n"), "{head}");
}

#[test]
fn a_hanging_peer_delays_no_other_probe_and_goes_out_after_its_timeout() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 2);
    let (hang, ok) = (HealthBackend::start("hang"), HealthBackend::start("ok"));
    let check = json!({"check_url": "/health"});
    route(
        &elb,
        "web",
        "web.test",
        &[(&hang, check.clone()), (&ok, check)],
    );
    hang.hang_health();
    let bound = secs((INTERVAL + TIMEOUT) * f64::from(MAX_FAILS + 1));
    wait_reason(&elb, "web", &hang, json!("check"), bound + SLACK);
    // Meanwhile, and while the hanging peer keeps being probed, the other
    // peer is probed on time.
    assert!(wait_until(secs(INTERVAL * 8.0) + SLACK, || ok.probes() >= 8));
    let log = ok.probe_log();
    let worst = log
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    eprintln!("worst gap between probes of the healthy peer: {worst:?}");
    assert!(
        worst <= secs(INTERVAL) + Duration::from_secs(1),
        "the healthy peer waited {worst:?} between probes"
    );
    assert_eq!(out_reason(&elb, "web", &ok), Value::Null);
}

#[test]
fn only_peers_with_a_check_url_are_probed_unless_a_default_is_set() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 2);
    let (plain, checked, alias) = (
        HealthBackend::start("plain"),
        HealthBackend::start("checked"),
        HealthBackend::start("alias"),
    );
    route(
        &elb,
        "web",
        "web.test",
        &[
            (&plain, json!("weight=1")),
            (&checked, json!({"check_url": "/health"})),
            (&alias, json!({"weight": 1, "checkurl": "/health"})),
        ],
    );
    assert!(
        wait_until(secs(INTERVAL * 4.0) + SLACK, || checked.probes() >= 3
            && alias.probes() >= 3),
        "probes: check_url {}, checkurl {}",
        checked.probes(),
        alias.probes()
    );
    assert_eq!(plain.probes(), 0, "a peer without check_url was probed");
    drop(elb);

    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config("check_url = \"/health\"\n"), 2);
    let plain = HealthBackend::start("plain");
    route(&elb, "web", "web.test", &[(&plain, json!("weight=1"))]);
    assert!(
        wait_until(secs(INTERVAL * 4.0) + SLACK, || plain.probes() >= 2),
        "the default check_url probed nothing"
    );
}

#[test]
fn the_log_check_takes_out_a_peer_that_mostly_fails_with_two_exceptions() {
    let dir = TempDir::new("health");
    let toml = "[logcheck]\nenable = true\ninterval = 5\nrecover = 10\n";
    let elb = elb_with(&dir, toml, 2);
    let no_passive = json!("max_fails=0");
    // One bad peer of three: out.
    let (good1, good2, bad) = (
        HealthBackend::start("good1"),
        HealthBackend::start("good2"),
        HealthBackend::start("bad"),
    );
    bad.set_status(500);
    route(
        &elb,
        "one",
        "one.test",
        &[
            (&good1, no_passive.clone()),
            (&good2, no_passive.clone()),
            (&bad, no_passive.clone()),
        ],
    );
    // A single peer that fails: kept.
    let alone = HealthBackend::start("alone");
    alone.set_status(500);
    route(
        &elb,
        "single",
        "single.test",
        &[(&alone, no_passive.clone())],
    );
    // Two bad peers of three: none goes out.
    let (fine, bad1, bad2) = (
        HealthBackend::start("fine"),
        HealthBackend::start("bad1"),
        HealthBackend::start("bad2"),
    );
    bad1.set_status(500);
    bad2.set_status(500);
    route(
        &elb,
        "most",
        "most.test",
        &[
            (&fine, no_passive.clone()),
            (&bad1, no_passive.clone()),
            (&bad2, no_passive),
        ],
    );

    let went_out = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || {
            send(&elb, "one.test", 6);
            send(&elb, "single.test", 3);
            send(&elb, "most.test", 6);
            out_reason(&elb, "one", &bad) == json!("log")
        }),
        "the bad peer never went out: {}",
        peer(&elb, "one", &bad)
    );
    eprintln!(
        "log check: the failing peer out after {:?}",
        went_out.elapsed()
    );
    let before = bad.requests();
    send(&elb, "one.test", 20);
    assert_eq!(
        bad.requests(),
        before,
        "a peer out by the log check got requests"
    );
    assert_eq!(out_reason(&elb, "single", &alone), Value::Null);
    let alone_before = alone.requests();
    send(&elb, "single.test", 3);
    assert!(
        alone.requests() > alone_before,
        "the single peer was taken out"
    );
    for b in [&fine, &bad1, &bad2] {
        assert_eq!(
            out_reason(&elb, "most", b),
            Value::Null,
            "{} went out",
            b.name()
        );
    }

    // Back after `recover`.
    bad.set_status(200);
    wait_reason(
        &elb,
        "one",
        &bad,
        Value::Null,
        Duration::from_secs(10) + SLACK * 2,
    );
    eprintln!("log check: out then back in {:?}", went_out.elapsed());
    let before = bad.requests();
    send(&elb, "one.test", 9);
    assert!(bad.requests() > before);
}

#[test]
fn backup_takes_traffic_only_while_every_primary_is_out_and_down_gets_nothing() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 2);
    let (primary, backup, down) = (
        HealthBackend::start("primary"),
        HealthBackend::start("backup"),
        HealthBackend::start("down"),
    );
    route(
        &elb,
        "web",
        "web.test",
        &[
            (&primary, json!({"check_url": "/health"})),
            (&backup, json!({"backup": true})),
            (&down, json!({"status": "down"})),
        ],
    );
    send(&elb, "web.test", 10);
    assert!(primary.requests() >= 10);
    assert_eq!((backup.requests(), down.requests()), (0, 0));
    assert_eq!(out_reason(&elb, "web", &down), json!("down"));

    primary.set_health(500);
    wait_reason(
        &elb,
        "web",
        &primary,
        json!("check"),
        secs(INTERVAL * 3.0) + SLACK,
    );
    assert!(send(&elb, "web.test", 10).iter().all(|&s| s == 200));
    assert_eq!(backup.requests(), 10, "the backup did not take over");

    primary.set_health(200);
    wait_reason(
        &elb,
        "web",
        &primary,
        Value::Null,
        secs(INTERVAL * 2.0) + SLACK,
    );
    let before = primary.requests();
    send(&elb, "web.test", 10);
    assert_eq!(primary.requests(), before + 10);
    assert_eq!((backup.requests(), down.requests()), (10, 0));
}

/// The share of `n` requests sent over `over` that `b` answered.
fn share(
    elb: &Elb,
    host: &str,
    b: &HealthBackend,
    total: &[&HealthBackend],
    over: Duration,
) -> f64 {
    let count = |bs: &[&HealthBackend]| bs.iter().map(|b| b.requests()).sum::<usize>();
    let (mine, all) = (b.requests(), count(total));
    let end = Instant::now() + over;
    while Instant::now() < end {
        send(elb, host, 4);
    }
    let (mine, all) = (b.requests() - mine, count(total) - all);
    mine as f64 / all.max(1) as f64
}

#[test]
fn slow_start_ramps_a_new_peer_and_a_recovered_one() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let dir = TempDir::new("health");
    let file = dir.write("elb.toml", &check_config(""));
    let (old, new) = (HealthBackend::start("old"), HealthBackend::start("new"));
    kv.put("/ELBH/rules/ramp.test", &rules_to("ramp"));
    kv.put(
        &format!("/ELBH/upstreams/ramp/{}", old.host_port()),
        "weight=1",
    );
    let elb = elb_on(&etcd.endpoints(), "ELBH")
        .arg("--config")
        .arg(file.to_str().expect("utf-8 path"))
        .start();
    assert!(wait_until(common::EVENTUALLY, || {
        get(elb.listen_addr(), "ramp.test", "/", &[]).status == 200
    }));
    // Added while running: from about 1/4 of its weight to all of it in 4 s.
    kv.put(
        &format!("/ELBH/upstreams/ramp/{}", new.host_port()),
        r#"{"weight":1,"slow_start":4,"check_url":"/health"}"#,
    );
    assert!(wait_until(common::EVENTUALLY, || new.requests() > 0 || {
        send(&elb, "ramp.test", 2);
        false
    }));
    let both = [&old, &new];
    let first = share(&elb, "ramp.test", &new, &both, Duration::from_secs(1));
    assert!(!wait_until(Duration::from_secs(3), || false));
    let settled = share(&elb, "ramp.test", &new, &both, Duration::from_secs(1));
    eprintln!("new peer's share: {first:.2} in its first second, {settled:.2} after 4 s");
    assert!(first < 0.3, "first second share {first:.2}");
    assert!(
        (0.4..=0.6).contains(&settled),
        "share after the ramp {settled:.2}"
    );
    let weight = peer(&elb, "ramp", &new)["effective_weight"].as_f64();
    assert_eq!(weight, Some(1.0));

    // Out by its check, then back: the ramp again.
    new.set_health(500);
    wait_reason(
        &elb,
        "ramp",
        &new,
        json!("check"),
        secs(INTERVAL * 3.0) + SLACK,
    );
    new.set_health(200);
    wait_reason(
        &elb,
        "ramp",
        &new,
        Value::Null,
        secs(INTERVAL * 2.0) + SLACK,
    );
    let again = share(&elb, "ramp.test", &new, &both, Duration::from_secs(1));
    eprintln!("after recovering: {again:.2} in its first second");
    assert!(again < 0.3, "first second after recovery {again:.2}");
}

#[test]
fn the_panic_threshold_keeps_a_site_up_when_every_check_fails() {
    for (threshold, want) in [(50, 200), (0, 502)] {
        let dir = TempDir::new("health");
        let elb = elb_with(
            &dir,
            &check_config(&format!("panic_threshold = {threshold}\n")),
            2,
        );
        let (a, b) = (HealthBackend::start("a"), HealthBackend::start("b"));
        let check = json!({"check_url": "/health"});
        route(&elb, "web", "web.test", &[(&a, check.clone()), (&b, check)]);
        a.set_health(500);
        b.set_health(500);
        // Both fail their checks (each probed max_fails times at least).
        assert!(wait_until(secs(INTERVAL * 4.0) + SLACK, || {
            a.probes() > MAX_FAILS as usize && b.probes() > MAX_FAILS as usize
        }));
        assert!(
            wait_until(secs(INTERVAL * 2.0) + SLACK, || send(&elb, "web.test", 1)
                [0]
                == want),
            "panic_threshold {threshold}: not {want}"
        );
        let statuses = send(&elb, "web.test", 6);
        assert!(
            statuses.iter().all(|&s| s == want),
            "panic_threshold {threshold}: {statuses:?}"
        );
        let metrics =
            common::backend::admin(elb.admin_addr(), "GET", "/__erulb__/metrics", None).text;
        let counted = format!("elb_health_panics_total {}", u8::from(threshold > 0));
        assert!(
            metrics.lines().any(|l| l == counted),
            "want {counted}:\n{metrics}"
        );
        if threshold > 0 {
            assert!(
                elb.stderr().contains("in panic"),
                "the panic was not logged"
            );
        }
    }
}

#[test]
fn a_peer_kept_across_an_upstream_change_keeps_its_health() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 2);
    let (a, b, c) = (
        HealthBackend::start("a"),
        HealthBackend::start("b"),
        HealthBackend::start("c"),
    );
    let check = json!({"check_url": "/health"});
    route(
        &elb,
        "web",
        "web.test",
        &[(&a, check.clone()), (&b, check.clone())],
    );
    a.set_health(500);
    wait_reason(
        &elb,
        "web",
        &a,
        json!("check"),
        secs(INTERVAL * 3.0) + SLACK,
    );
    let fails = peer(&elb, "web", &a)["fails"].as_u64().unwrap_or(0);
    route(
        &elb,
        "web",
        "web.test",
        &[(&a, check.clone()), (&b, check.clone()), (&c, check)],
    );
    // Right after the change: still out, its count kept.
    let p = peer(&elb, "web", &a);
    assert_eq!(p["out_reason"], json!("check"), "{p}");
    assert!(p["fails"].as_u64().unwrap_or(0) >= fails, "{p}");
    let before = a.requests();
    send(&elb, "web.test", 12);
    assert_eq!(a.requests(), before);
}

#[test]
fn the_admin_api_shows_each_peers_health() {
    let dir = TempDir::new("health");
    let elb = elb_with(&dir, &check_config(""), 2);
    let a = HealthBackend::start("a");
    route(
        &elb,
        "web",
        "web.test",
        &[(&a, json!({"weight": 3, "check_url": "/health"}))],
    );
    assert!(wait_until(secs(INTERVAL * 3.0) + SLACK, || {
        peer(&elb, "web", &a)["last_check"].is_f64()
    }));
    let p = peer(&elb, "web", &a);
    assert_eq!(p["healthy"], json!(true), "{p}");
    assert_eq!(p["out_reason"], Value::Null, "{p}");
    assert_eq!(p["effective_weight"].as_f64(), Some(3.0), "{p}");
    assert_eq!(p["fails"], json!(0), "{p}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last = p["last_check"].as_f64().unwrap_or(0.0);
    assert!((now - last).abs() < 60.0, "last_check {last}, now {now}");
    // The original's fields stay.
    for field in [
        "addr",
        "name",
        "weight",
        "max_fails",
        "fail_timeout",
        "backup",
        "down",
        "status",
        "check_url",
    ] {
        assert!(p.get(field).is_some(), "{field} missing: {p}");
    }
}

#[test]
fn a_peer_rewritten_in_etcd_keeps_its_health() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let dir = TempDir::new("health");
    let file = dir.write("elb.toml", &check_config(""));
    let (a, b) = (HealthBackend::start("a"), HealthBackend::start("b"));
    let key = |x: &HealthBackend| format!("/ELBK/upstreams/web/{}", x.host_port());
    kv.put("/ELBK/rules/web.test", &rules_to("web"));
    kv.put(&key(&a), r#"{"weight":1,"check_url":"/health"}"#);
    kv.put(&key(&b), r#"{"weight":1,"check_url":"/health"}"#);
    let elb = elb_on(&etcd.endpoints(), "ELBK")
        .arg("--config")
        .arg(file.to_str().expect("utf-8 path"))
        .start();
    assert!(wait_until(common::EVENTUALLY, || {
        get(elb.listen_addr(), "web.test", "/", &[]).status == 200
    }));
    a.set_health(500);
    wait_reason(
        &elb,
        "web",
        &a,
        json!("check"),
        secs(INTERVAL * 3.0) + SLACK,
    );
    // Enough failures in a row that a reset count could not catch up
    // before the first look after the rewrite.
    let deep = u64::from(MAX_FAILS) + 3;
    assert!(wait_until(secs(INTERVAL * 6.0) + SLACK, || {
        peer(&elb, "web", &a)["fails"].as_u64().unwrap_or(0) >= deep
    }));
    kv.put(&key(&a), r#"{"weight":2,"check_url":"/health"}"#);
    let mut seen = Value::Null;
    assert!(
        wait_until(common::EVENTUALLY, || {
            seen = peer(&elb, "web", &a);
            seen["weight"] == 2
        }),
        "the rewrite never showed: {seen}"
    );
    assert_eq!(seen["out_reason"], json!("check"), "{seen}");
    assert!(seen["fails"].as_u64().unwrap_or(0) >= deep, "{seen}");
    let before = a.requests();
    assert!(send(&elb, "web.test", 12).iter().all(|&s| s == 200));
    assert_eq!(a.requests(), before, "the rewritten peer got requests");
}

#[test]
fn peers_of_the_first_load_and_an_only_peer_start_at_full_weight() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let dir = TempDir::new("health");
    let file = dir.write("elb.toml", &check_config(""));
    let slow = r#"{"weight":2,"slow_start":30,"check_url":"/health"}"#;
    let key = |up: &str, x: &HealthBackend| format!("/ELBF/upstreams/{up}/{}", x.host_port());
    let (a, b) = (HealthBackend::start("a"), HealthBackend::start("b"));
    kv.put("/ELBF/rules/first.test", &rules_to("first"));
    kv.put(&key("first", &a), slow);
    kv.put(&key("first", &b), slow);
    let elb = elb_on(&etcd.endpoints(), "ELBF")
        .arg("--config")
        .arg(file.to_str().expect("utf-8 path"))
        .start();
    // The weight the schedule uses once the master tracks the peer (it
    // has probed it), and while it keeps doing so.
    let probed_weight = |up: &str, x: &HealthBackend| {
        let mut p = Value::Null;
        assert!(
            wait_until(common::EVENTUALLY, || {
                // An etcd put reaches the store a moment later.
                p = try_peer(&elb, up, x).unwrap_or(Value::Null);
                p["last_check"].is_f64()
            }),
            "{} of {up} never probed: {p}",
            x.name()
        );
        p["effective_weight"].as_f64()
    };
    assert_eq!(probed_weight("first", &a), Some(2.0));
    assert_eq!(probed_weight("first", &b), Some(2.0));

    // A new upstream's only peer, added while running: full weight too.
    let solo = HealthBackend::start("solo");
    kv.put("/ELBF/rules/solo.test", &rules_to("solo"));
    kv.put(&key("solo", &solo), slow);
    assert_eq!(probed_weight("solo", &solo), Some(2.0));

    // The same value on a peer joining "first" ramps: its weight starts
    // low (about 2/30 and still under half of it for 15 s).
    let late = HealthBackend::start("late");
    kv.put(&key("first", &late), slow);
    let w = probed_weight("first", &late).unwrap_or(2.0);
    assert!(w < 1.0, "a peer added live with slow_start 30: weight {w}");
    for x in [&a, &b] {
        let p = peer(&elb, "first", x);
        assert_eq!(p["effective_weight"].as_f64(), Some(2.0), "{p}");
    }
}

/// The controllable backend itself, without ELB: statuses switch, requests
/// are counted and logged, `/health` hangs until released, and dropping it
/// closes its port.
#[test]
fn the_health_backend_does_what_the_tests_tell_it() {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let b = HealthBackend::start("self");
    let addr: std::net::SocketAddr = b.host_port().parse().expect("address");
    let status = |path: &str| get(addr, "x.test", path, &[]).status;

    assert_eq!((status("/health"), status("/")), (200, 200));
    let r = get(addr, "x.test", "/any", &[]);
    assert_eq!(r.body, b"self");
    b.set_health(500);
    b.set_status(503);
    assert_eq!((status("/health"), status("/")), (500, 503));
    b.set_health(404);
    assert_eq!(status("/health"), 404);
    assert_eq!((b.probes(), b.requests()), (3, 3));
    let log = b.probe_log();
    assert!(log.windows(2).all(|w| w[0].0 <= w[1].0));
    assert!(
        log[0].1.starts_with("get /health http/1.1\r\n"),
        "{}",
        log[0].1
    );
    assert!(log[0].1.contains("host: x.test\r\n"), "{}", log[0].1);

    // Keep-alive: two requests on one connection, both answered.
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut both = String::new();
    conn.read_to_string(&mut both).expect("read until close");
    assert_eq!(both.matches("HTTP/1.1 503 ").count(), 2, "{both}");
    assert_eq!(b.requests(), 5);

    // A hanging /health: counted, no answer, until released.
    b.hang_health();
    let mut hung = TcpStream::connect(addr).expect("connect");
    hung.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    hung.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut byte = [0u8; 1];
    let err = hung
        .read(&mut byte)
        .expect_err("a hanging /health answered");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    assert_eq!(b.probes(), 4);
    // Other paths still answer while /health hangs.
    assert_eq!(status("/"), 503);
    b.set_health(200);
    assert_eq!(status("/health"), 200);
    // The hung connection is closed without an answer once released.
    hung.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    hung.read_to_end(&mut rest).expect("closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    drop(b);
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_err()),
        "a dropped backend still accepts"
    );
}
