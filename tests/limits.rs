//! `limit` rules: nginx's `limit_req` in the rule graph, with one bucket
//! per (domain, rule, key) in the region's dictionary, shared by every
//! worker. Real elb, real backends, real sockets; etcd for the refusal of a
//! bad rule set through it.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::backend::{Backend, admin, admin_get, get, put_domains, put_upstreams};
use common::etcd::{Etcd, elb_on};
use common::{EVENTUALLY, Elb, wait_until};

/// `l.test`: the limit rule `l` with `args`, then `main` (backend a) or,
/// on `fail`, `cheap` (backend b).
fn limited(elb: &Elb, a: &Backend, b: &Backend, args: Value) {
    put_upstreams(
        elb.admin_addr(),
        &json!({"main": {a.host_port(): ""}, "cheap": {b.host_port(): ""}}),
    );
    put_domains(elb.admin_addr(), &json!({"l.test": rules(args)}));
}

fn rules(mut args: Value) -> Value {
    args["succ"] = json!("main");
    json!({"init": "l", "rules": {
        "l": {"type": "limit", "args": args},
        "main": {"type": "backend", "args": {"servername": "main"}},
        "cheap": {"type": "backend", "args": {"servername": "cheap"}}
    }})
}

/// Statuses of `n` requests, each on a connection of its own.
fn statuses(elb: &Elb, n: usize, headers: &[(&str, &str)]) -> Vec<(u16, Option<String>)> {
    (0..n)
        .map(|_| {
            let r = get(elb.listen_addr(), "l.test", "/", headers);
            let retry = r.header("retry-after").map(str::to_string);
            (r.status, retry)
        })
        .collect()
}

fn count(s: &[(u16, Option<String>)], status: u16) -> usize {
    s.iter().filter(|(st, _)| *st == status).count()
}

#[test]
fn the_rate_is_the_instances_not_each_workers() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    limited(
        &elb,
        &a,
        &b,
        json!({"rate": "5r/s", "burst": 0, "key": "remote_addr"}),
    );
    let start = Instant::now();
    let got = statuses(&elb, 30, &[]);
    let elapsed = start.elapsed().as_secs_f64();
    let passed = count(&got, 200);
    // One at once, then 5 a second: two buckets (one per worker) would
    // pass twice that.
    let allowed = 1 + (elapsed * 5.0).ceil() as usize;
    assert!(
        passed >= 1 && passed <= allowed,
        "{passed} passed in {elapsed:.3} s (at most {allowed})"
    );
    assert_eq!(passed + count(&got, 429), 30, "{got:?}");
    for (status, retry) in &got {
        if *status == 429 {
            let secs: u64 = retry
                .as_deref()
                .and_then(|r| r.parse().ok())
                .expect("Retry-After");
            assert!((1..=1).contains(&secs), "Retry-After {secs}");
        }
    }
    // Counted as rejections of that rule, in /metrics and /status.
    let status = admin_get(elb.admin_addr(), "/__erulb__/status");
    let rejected = status["limits"][0]["rejected"].as_u64();
    assert_eq!(rejected, Some((30 - passed) as u64), "{status}");
    assert_eq!(status["limits"][0]["rule"], "l");
    let metrics = admin(elb.admin_addr(), "GET", "/__erulb__/metrics", None).text;
    assert!(
        metrics.contains(&format!(
            "elb_limit_rejected_total{{domain=\"l.test\",rule=\"l\"}} {}",
            30 - passed
        )),
        "{metrics}"
    );
}

#[test]
fn a_burst_passes_at_once_then_429_or_the_fail_branch() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    limited(&elb, &a, &b, json!({"rate": "1r/m", "burst": 10}));
    let got = statuses(&elb, 12, &[]);
    assert_eq!(count(&got[..11], 200), 11, "{got:?}");
    assert_eq!(got[11].0, 429, "{got:?}");
    assert_eq!(got[11].1.as_deref(), Some("60"));

    // With `fail`: the excess goes to the cheaper backend, no 429.
    let mut args = json!({"rate": "1r/m", "burst": 1});
    args["fail"] = json!("cheap");
    put_domains(elb.admin_addr(), &json!({"l.test": rules(args)}));
    let before = b.requests();
    let got = statuses(&elb, 6, &[]);
    assert_eq!(count(&got, 429), 0, "{got:?}");
    assert_eq!(count(&got, 200), 6);
    assert!(
        b.requests() - before >= 4,
        "the excess reached b: {}",
        b.requests() - before
    );
}

#[test]
fn a_header_key_has_a_bucket_per_value_and_an_idle_bucket_refills() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    limited(
        &elb,
        &a,
        &b,
        json!({"rate": "2r/s", "key": "header:X-Api-Key"}),
    );
    let first = |key: Option<&str>| {
        let h: Vec<(&str, &str)> = key.map(|k| ("X-Api-Key", k)).into_iter().collect();
        statuses(&elb, 2, &h)
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>()
    };
    assert_eq!(first(Some("alpha")), [200, 429]);
    assert_eq!(
        first(Some("beta")),
        [200, 429],
        "another key, another bucket"
    );
    // Without the header: by the client's address, its own bucket.
    assert_eq!(first(None), [200, 429]);
    // Idle, the bucket drains: alpha passes again.
    let refused_at = Instant::now();
    assert!(wait_until(EVENTUALLY, || {
        get(elb.listen_addr(), "l.test", "/", &[("X-Api-Key", "alpha")]).status == 200
    }));
    assert!(refused_at.elapsed() >= Duration::from_millis(100));
}

#[test]
fn a_bad_limit_is_refused_and_nothing_applied() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let good = rules(json!({"rate": "100r/s", "burst": 1000}));
    kv.put("/ELBL/rules/l.test", &good.to_string());
    kv.put(&format!("/ELBL/upstreams/main/{}", a.host_port()), "");
    kv.put(&format!("/ELBL/upstreams/cheap/{}", b.host_port()), "");
    let elb = elb_on(&etcd.endpoints(), "ELBL").start();
    assert!(wait_until(EVENTUALLY, || get(
        elb.listen_addr(),
        "l.test",
        "/",
        &[]
    )
    .status
        == 200));
    for (args, key) in [
        (json!({"rate": "10r/h"}), "rate"),
        (json!({"rate": "10r/s", "burst": -1}), "burst"),
        (json!({"rate": "10r/s", "key": "cookie"}), "key"),
    ] {
        let r = admin(
            elb.admin_addr(),
            "PUT",
            "/__erulb__/domain",
            Some(&json!({"l.test": rules(args.clone())})),
        );
        assert_eq!(r.status, 400, "{}", r.text);
        assert!(
            r.json["error"].as_str().is_some_and(|e| e.contains(key)),
            "{}",
            r.text
        );
        // The same through etcd: skipped, with a log line; the rule set in
        // force stays.
        kv.put("/ELBL/rules/l.test", &rules(args).to_string());
    }
    assert!(
        wait_until(EVENTUALLY, || elb
            .stderr()
            .matches("/ELBL/rules/l.test")
            .count()
            >= 3),
        "{}",
        elb.stderr()
    );
    assert_eq!(
        admin_get(elb.admin_addr(), "/__erulb__/domain")["l.test"],
        good
    );
    assert_eq!(get(elb.listen_addr(), "l.test", "/", &[]).status, 200);
}

#[test]
fn a_worker_killed_while_limiting_leaves_the_zone_consistent() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    limited(
        &elb,
        &a,
        &b,
        json!({"rate": "10r/s", "burst": 50, "key": "header:X-K"}),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = elb.listen_addr();
    let loops: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("k{t}-{}", i % 50);
                    // A worker killed under the request resets it: go on.
                    let _ =
                        common::HttpConn::connect(addr, common::HTTP_TIMEOUT).and_then(|mut c| {
                            c.request(
                                "GET",
                                "l.test",
                                "/",
                                &[("X-K", &key), ("Connection", "close")],
                                b"",
                            )
                        });
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        let victim = *elb.workers().first().expect("a worker");
        common::signal(victim, nix::sys::signal::Signal::SIGKILL);
        assert!(wait_until(EVENTUALLY, || {
            let w = elb.workers();
            w.len() == 2 && !w.contains(&victim)
        }));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        let _ = l.join();
    }
    let zone = admin_get(elb.admin_addr(), "/__erulb__/status")["limit_zone"].clone();
    assert_eq!(zone["consistent"], true, "{zone}");
    // And it still limits: a fresh key, burst 50 then 429.
    let got: BTreeMap<u16, usize> = statuses(&elb, 60, &[("X-K", "fresh")]).into_iter().fold(
        BTreeMap::new(),
        |mut m, (s, _)| {
            *m.entry(s).or_default() += 1;
            m
        },
    );
    assert!(got.get(&429).is_some_and(|n| *n >= 1), "{got:?}");
    assert!(
        got.get(&200).is_some_and(|n| (51..=59).contains(n)),
        "{got:?}"
    );
}

#[test]
fn a_small_zone_evicts_idle_buckets_and_keeps_the_hot_one_limited() {
    let dir = common::TempDir::new("limits");
    let config = dir.write("elb.toml", "[ratelimit]\nzone_size = \"64k\"\n");
    let elb = Elb::builder()
        .workers(2)
        .arg("--config")
        .arg(config.to_string_lossy())
        .start();
    let workers = elb.workers();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    limited(&elb, &a, &b, json!({"rate": "1r/m", "key": "header:X-K"}));
    let mut hot = Vec::new();
    for i in 0..2000 {
        if i % 10 == 0 {
            hot.push(get(elb.listen_addr(), "l.test", "/", &[("X-K", "hot")]).status);
        } else {
            let key = format!("cold-{i}");
            // A fresh key passes: its bucket is new.
            assert_eq!(
                get(elb.listen_addr(), "l.test", "/", &[("X-K", &key)]).status,
                200
            );
        }
    }
    // The hot key passed once, then was refused every time: its bucket,
    // used often, was never the least recently used.
    assert_eq!(hot[0], 200);
    assert!(hot[1..].iter().all(|s| *s == 429), "{hot:?}");
    let zone = admin_get(elb.admin_addr(), "/__erulb__/status")["limit_zone"].clone();
    assert!(
        zone["size"].as_u64().is_some_and(|s| s < 64 << 10),
        "{zone}"
    );
    assert!(zone["evictions"].as_u64().is_some_and(|e| e > 0), "{zone}");
    assert_eq!(zone["consistent"], true);
    assert_eq!(elb.workers(), workers, "no worker died");
}

#[test]
fn a_huge_key_is_still_limited() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    limited(&elb, &a, &b, json!({"rate": "1r/m", "key": "header:X-K"}));
    let huge = "k".repeat(60_000);
    let got = statuses(&elb, 3, &[("X-K", &huge)]);
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [200, 429, 429]
    );
}
