//! SPEC 4, `PUT /__erulb__/dump`: the in-memory rules and upstreams replace
//! what is under `/$NAME/rules/` and `/$NAME/upstreams/`, so that a fresh
//! elb on the same etcd serves the same; and an elb following etcd while a
//! big dump is written never loses a domain or an upstream on the way.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use common::backend::{Backend, admin, admin_get, put_domains, put_upstreams, to_backend};
use common::etcd::{Etcd, elb_on, expect_served, expect_status, rules_to, status_of};
use common::wait_until;

/// Only against waiting forever: how long it took is printed where it matters.
const APPLIED: Duration = common::EVENTUALLY;

/// The fields of `GET /__erulb__/upstream` that come from configuration
/// (not run-time state), per upstream and peer name.
fn configured_upstreams(v: &Value) -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for (name, peers) in v.as_object().into_iter().flatten() {
        let mut m = BTreeMap::new();
        for p in peers.as_array().into_iter().flatten() {
            let mut fields = serde_json::Map::new();
            for k in [
                "addr",
                "weight",
                "max_fails",
                "fail_timeout",
                "backup",
                "down",
                "check_url",
                "slow_start",
                "status",
            ] {
                if let Some(x) = p.get(k) {
                    fields.insert(k.into(), x.clone());
                }
            }
            let peer = p["name"].as_str().unwrap_or_default().to_string();
            m.insert(peer, Value::Object(fields));
        }
        out.insert(name.clone(), m);
    }
    out
}

/// `PUT /__erulb__/dump`, waiting as long as elb may take (30 s).
fn dump(elb: &common::Elb) {
    let r = common::HttpConn::connect(elb.admin_addr(), Duration::from_secs(35))
        .and_then(|mut c| {
            c.request(
                "PUT",
                "localhost",
                "/__erulb__/dump",
                &[("Connection", "close")],
                b"",
            )
        })
        .expect("PUT /__erulb__/dump");
    let d = common::backend::answer(r);
    assert_eq!(
        (d.status, &d.json),
        (200, &json!({"msg": "OK"})),
        "dump: {}; stderr:\n{}",
        d.text,
        elb.stderr()
    );
}

#[test]
fn a_dump_is_what_a_fresh_elb_serves() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    // In etcd before: a domain and an upstream the API will delete, and an
    // old escaped value the dump rewrites.
    kv.put("/ELBT20/rules/stale.test", &rules_to("old"));
    kv.put(
        &format!("/ELBT20/upstreams/old/{}", a.host_port()),
        "max_fails%3D2%20weight%3D10",
    );
    kv.put("/ELBT20/rules/kept.test", &rules_to("old"));
    // Not ours: left alone.
    kv.put("/ELBT20/other/key", "untouched");
    kv.put("/ELBT200/rules/x.test", &rules_to("old"));
    let elb = elb_on(&etcd.endpoints(), "ELBT20").start();
    expect_served(&elb, "kept.test", "a", APPLIED);

    let api = elb.admin_addr();
    put_upstreams(
        api,
        &json!({
            "web": {
                a.host_port(): "weight=3 max_fails=2 fail_timeout=20",
                format!("localhost:{}", b.port()): {"weight": 2, "check_url": "/health", "slow_start": 10},
            },
            "spare": {b.host_port(): "backup"},
        }),
    );
    put_domains(
        api,
        &json!({
            "web.test": to_backend("web"),
            "Path.Test": {"init": "p", "rules": {
                "p": {"type": "path", "args": {"pattern": "^/blog/(\\S+)$", "regex": true, "rewrite": true, "succ": "w", "fail": "s"}},
                "w": {"type": "backend", "args": {"servername": "web", "expires": "30d"}},
                "s": {"type": "backend", "args": {"servername": "spare"}},
            }},
        }),
    );
    let del = admin(
        api,
        "DELETE",
        "/__erulb__/domain",
        Some(&json!(["stale.test"])),
    );
    assert_eq!(del.status, 200, "{}", del.text);
    dump(&elb);

    let rules: Vec<String> = kv
        .get_prefix("/ELBT20/rules/")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        rules,
        [
            "/ELBT20/rules/kept.test",
            "/ELBT20/rules/path.test",
            "/ELBT20/rules/web.test"
        ]
    );
    let peers: BTreeMap<String, String> = kv.get_prefix("/ELBT20/upstreams/").into_iter().collect();
    assert_eq!(
        peers
            .get(&format!("/ELBT20/upstreams/old/{}", a.host_port()))
            .map(String::as_str),
        Some("weight=10 max_fails=2")
    );
    assert_eq!(
        peers
            .get(&format!("/ELBT20/upstreams/web/{}", a.host_port()))
            .map(String::as_str),
        Some("weight=3 max_fails=2 fail_timeout=20")
    );
    let json_peer = peers
        .get(&format!("/ELBT20/upstreams/web/localhost:{}", b.port()))
        .expect("the peer is dumped under the name it was given");
    assert_eq!(
        serde_json::from_str::<Value>(json_peer).expect("a JSON value"),
        json!({"weight": 2, "check_url": "/health", "slow_start": 10})
    );
    assert_eq!(peers.len(), 4, "{peers:?}");
    assert_eq!(kv.get_prefix("/ELBT20/other/").len(), 1);
    assert_eq!(kv.get_prefix("/ELBT200/").len(), 1);

    // The watch brings the dumped keys back: nothing changes.
    let domains = admin_get(api, "/__erulb__/domain");
    let ups = admin_get(api, "/__erulb__/upstream");
    kv.put("/ELBT20/rules/marker.test", &rules_to("web"));
    expect_served(&elb, "marker.test", "a", APPLIED);
    let mut after = admin_get(api, "/__erulb__/domain");
    after.as_object_mut().map(|m| m.remove("marker.test"));
    assert_eq!(after, domains);
    assert_eq!(
        configured_upstreams(&admin_get(api, "/__erulb__/upstream")),
        configured_upstreams(&ups)
    );

    // A fresh elb on the same etcd serves the same.
    let fresh = elb_on(&etcd.endpoints(), "ELBT20").start();
    expect_served(&fresh, "marker.test", "a", APPLIED);
    let fresh_api = fresh.admin_addr();
    assert_eq!(
        admin_get(fresh_api, "/__erulb__/domain"),
        admin_get(api, "/__erulb__/domain")
    );
    assert_eq!(
        configured_upstreams(&admin_get(fresh_api, "/__erulb__/upstream")),
        configured_upstreams(&admin_get(api, "/__erulb__/upstream"))
    );
    expect_status(&fresh, "stale.test", 404, APPLIED);
    expect_served(&fresh, "path.test", "b", APPLIED);
    let r = common::backend::get(fresh.listen_addr(), "path.test", "/blog/x", &[]);
    assert_eq!(common::backend::Echo::of(&r).path(), "/x");
    // A second dump with nothing changed writes nothing.
    let rev = kv.revision();
    dump(&elb);
    assert_eq!(kv.revision(), rev, "an idle dump wrote to etcd");
}

#[test]
fn a_big_dump_never_makes_a_domain_vanish() {
    const DOMAINS: usize = 300;
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    // 300 domains on 300 upstreams, each with one peer (a).
    let mut items = Vec::new();
    for i in 0..DOMAINS {
        items.push((
            format!("/ELBT21/rules/d{i}.test"),
            rules_to(&format!("u{i}")),
        ));
        items.push((
            format!("/ELBT21/upstreams/u{i}/{}", a.host_port()),
            String::new(),
        ));
    }
    kv.put_many(&items);
    // The writer, and an observer that follows etcd.
    let writer = elb_on(&etcd.endpoints(), "ELBT21").start();
    let observer = elb_on(&etcd.endpoints(), "ELBT21").start();
    for elb in [&writer, &observer] {
        expect_served(elb, &format!("d{}.test", DOMAINS - 1), "a", APPLIED);
    }
    // Through the API: every upstream moves to another peer (a new key, and
    // the old one to delete), the first 50 domains are deleted, 50 added.
    let ups: serde_json::Map<String, Value> = (0..DOMAINS)
        .map(|i| {
            (
                format!("u{i}"),
                json!({format!("localhost:{}", b.port()): "weight=2"}),
            )
        })
        .collect();
    put_upstreams(writer.admin_addr(), &Value::Object(ups));
    let gone: Vec<String> = (0..50).map(|i| format!("d{i}.test")).collect();
    let d = admin(
        writer.admin_addr(),
        "DELETE",
        "/__erulb__/domain",
        Some(&json!(gone)),
    );
    assert_eq!(d.status, 200);
    let added: serde_json::Map<String, Value> = (DOMAINS..DOMAINS + 50)
        .map(|i| {
            (
                format!("d{i}.test"),
                to_backend(&format!("u{}", i - DOMAINS)),
            )
        })
        .collect();
    put_domains(writer.admin_addr(), &Value::Object(added));

    // Poll the observer's kept domains while the dump goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let polled = Arc::new(AtomicUsize::new(0));
    let poller = {
        let (stop, failures, polled) = (stop.clone(), failures.clone(), polled.clone());
        let addr = observer.listen_addr();
        std::thread::spawn(move || {
            let mut i = 50;
            while !stop.load(Ordering::Relaxed) {
                let host = format!("d{i}.test");
                // Only an answer counts: a timeout on a loaded machine
                // says nothing about the routes.
                let s = status_of(addr, &host);
                if s.is_some_and(|s| s != 200) {
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{host}: {s:?}"));
                }
                polled.fetch_add(1, Ordering::Relaxed);
                i = if i + 1 == DOMAINS { 50 } else { i + 1 };
            }
        })
    };
    dump(&writer);
    // The observer converges: every upstream on b only, the 50 new domains
    // in, the 50 deleted ones out.
    let converged = wait_until(APPLIED, || {
        let ups = admin_get(observer.admin_addr(), "/__erulb__/upstream");
        let domains = admin_get(observer.admin_addr(), "/__erulb__/domain");
        let on_b = ups.as_object().is_some_and(|m| {
            m.len() == DOMAINS
                && m.values().all(|p| {
                    p.as_array().is_some_and(|p| {
                        p.len() == 1 && p[0]["name"] == format!("localhost:{}", b.port()).as_str()
                    })
                })
        });
        on_b && domains.as_object().map(serde_json::Map::len) == Some(DOMAINS)
            && domains.get("d0.test").is_none()
            && domains.get(format!("d{}.test", DOMAINS + 49)).is_some()
    });
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    assert!(
        converged,
        "the observer did not converge; stderr:\n{}",
        observer.stderr()
    );
    let failures = failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the dump: {:?}",
        failures.len(),
        polled.load(Ordering::Relaxed),
        &failures[..failures.len().min(10)]
    );
    expect_served(&observer, "d299.test", "b", APPLIED);
    expect_status(&observer, "d0.test", 404, APPLIED);
    let err = writer.stderr();
    assert!(err.contains("dump written"), "{err}");
    eprintln!(
        "{} requests during the dump, none failed; {}",
        polled.load(Ordering::Relaxed),
        err.lines()
            .find(|l| l.contains("dump written"))
            .unwrap_or_default()
    );
}
