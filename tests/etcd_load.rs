//! SPEC 3 against a real etcd: what is in etcd at start is served, every
//! put and delete while running takes effect, values in every form load,
//! invalid ones are skipped, and the services-prefix layout merges in.

mod common;

use std::time::Duration;

use serde_json::json;

use common::backend::{Backend, admin_get};
use common::etcd::{Etcd, elb_on, expect_served, expect_status, rules_to, served_by};
use common::wait_until;

/// The goal for a change to take effect is 10 ms (bench/propagation); the
/// tests wait only against waiting forever.
const APPLIED: Duration = common::EVENTUALLY;

#[test]
fn loads_at_start_then_follows_puts_and_deletes() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    kv.put("/ELBT1/rules/a.test", &rules_to("ua"));
    kv.put(&format!("/ELBT1/upstreams/ua/{}", a.host_port()), "");
    let elb = elb_on(&etcd.endpoints(), "ELBT1").start();
    expect_served(&elb, "a.test", "a", APPLIED);
    // Host matching is case-insensitive, whatever the case of the key.
    expect_served(&elb, "A.Test", "a", APPLIED);

    // A new domain and upstream while running.
    kv.put(
        &format!("/ELBT1/upstreams/ub/{}", b.host_port()),
        "weight=2",
    );
    kv.put("/ELBT1/rules/b.test", &rules_to("ub"));
    expect_served(&elb, "b.test", "b", APPLIED);

    // A peer replaced: the upstream's list is rebuilt from etcd.
    kv.put(&format!("/ELBT1/upstreams/ua/{}", b.host_port()), "");
    kv.delete(&format!("/ELBT1/upstreams/ua/{}", a.host_port()));
    expect_served(&elb, "a.test", "b", APPLIED);
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    assert_eq!(ups["ua"].as_array().map(Vec::len), Some(1), "{ups}");
    assert_eq!(ups["ub"][0]["weight"], 2, "{ups}");

    // A rule set changed, then deleted: 404.
    kv.put("/ELBT1/rules/b.test", &rules_to("ua"));
    kv.put(&format!("/ELBT1/upstreams/ua/{}", a.host_port()), "");
    kv.delete(&format!("/ELBT1/upstreams/ua/{}", b.host_port()));
    expect_served(&elb, "b.test", "a", APPLIED);
    kv.delete("/ELBT1/rules/b.test");
    expect_status(&elb, "b.test", 404, APPLIED);

    // Every peer of an upstream deleted: the upstream is gone (502).
    kv.delete_prefix("/ELBT1/upstreams/ua/");
    expect_status(&elb, "a.test", 502, APPLIED);
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    assert!(ups.get("ua").is_none(), "{ups}");
}

#[test]
fn json_peer_status_takes_a_peer_out() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let key = |be: &Backend| format!("/ELBT2/upstreams/web/{}", be.host_port());
    kv.put("/ELBT2/rules/j.test", &rules_to("web"));
    kv.put(&key(&a), r#"{"weight":1,"status":"up"}"#);
    kv.put(&key(&b), r#"{"weight":1,"status":"down"}"#);
    let elb = elb_on(&etcd.endpoints(), "ELBT2").start();
    expect_served(&elb, "j.test", "a", APPLIED);
    for _ in 0..10 {
        assert_eq!(served_by(elb.listen_addr(), "j.test").as_deref(), Some("a"));
    }
    kv.put(&key(&a), r#"{"weight":1,"status":"down"}"#);
    kv.put(
        &key(&b),
        r#"{"weight":1,"check_url":"/health","status":"up"}"#,
    );
    expect_served(&elb, "j.test", "b", APPLIED);
    for _ in 0..10 {
        assert_eq!(served_by(elb.listen_addr(), "j.test").as_deref(), Some("b"));
    }
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    let peers = ups["web"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 2, "{ups}");
    assert!(
        peers
            .iter()
            .any(|p| p["status"] == "down" && p["name"] == a.host_port().as_str()),
        "{ups}"
    );
}

#[test]
fn escaped_values_load_and_invalid_ones_are_skipped() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let escaped_rules = "%7B%22init%22%3A%22b%22%2C%22rules%22%3A%7B%22b%22%3A%7B%22type%22%3A%22backend%22%2C%22args%22%3A%7B%22servername%22%3A%22old%22%7D%7D%7D%7D";
    kv.put("/ELBT3/rules/escaped.test", escaped_rules);
    kv.put(
        &format!("/ELBT3/upstreams/old/{}", a.host_port()),
        "max_fails%3D2%20weight%3D10",
    );
    kv.put("/ELBT3/rules/ok.test", &rules_to("mixed"));
    kv.put(&format!("/ELBT3/upstreams/mixed/{}", b.host_port()), "");
    // Invalid: not JSON; a rule naming no rule; an unknown parameter; a
    // peer that is not an address.
    kv.put("/ELBT3/rules/notjson.test", "{nope");
    kv.put(
        "/ELBT3/rules/dangling.test",
        r#"{"init":"x","rules":{"x":{"type":"ua","args":{"pattern":"a","succ":"nowhere"}}}}"#,
    );
    kv.put(
        &format!("/ELBT3/upstreams/mixed/{}", a.host_port()),
        "bogus=1",
    );
    kv.put("/ELBT3/upstreams/mixed/not-an-address", "");
    let elb = elb_on(&etcd.endpoints(), "ELBT3").start();
    expect_served(&elb, "escaped.test", "a", APPLIED);
    expect_served(&elb, "ok.test", "b", APPLIED);
    for _ in 0..6 {
        // Only the valid peer of "mixed" is in.
        assert_eq!(
            served_by(elb.listen_addr(), "ok.test").as_deref(),
            Some("b")
        );
    }
    expect_status(&elb, "notjson.test", 404, APPLIED);
    expect_status(&elb, "dangling.test", 404, APPLIED);
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    assert_eq!(ups["old"][0]["weight"], 10, "{ups}");
    assert_eq!(ups["old"][0]["max_fails"], 2, "{ups}");
    assert_eq!(ups["mixed"].as_array().map(Vec::len), Some(1), "{ups}");
    // stderr is collected by a thread: wait for the lines, with a deadline.
    for key in [
        "/ELBT3/rules/notjson.test",
        "/ELBT3/rules/dangling.test",
        &format!("/ELBT3/upstreams/mixed/{}", a.host_port()),
    ] {
        let logged = wait_until(APPLIED, || elb.stderr().contains(key));
        assert!(logged, "no log line names {key}:\n{}", elb.stderr());
    }

    // An invalid value for a domain in force: the previous rule set stays.
    kv.put("/ELBT3/rules/ok.test", "{still not json");
    kv.put("/ELBT3/rules/marker.test", &rules_to("old"));
    expect_served(&elb, "marker.test", "a", APPLIED);
    assert_eq!(
        served_by(elb.listen_addr(), "ok.test").as_deref(),
        Some("b")
    );
    let domains = admin_get(elb.admin_addr(), "/__erulb__/domain");
    assert_eq!(
        domains["ok.test"],
        serde_json::from_str::<serde_json::Value>(&rules_to("mixed")).expect("json")
    );
}

#[test]
fn services_prefix_layout_merges_with_same_named_upstreams() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let svc = "/v1/elbt4/services/";
    kv.put(&format!("{svc}web/{}", a.host_port()), r#"{"weight":1}"#);
    kv.put(
        &format!("/ELBT4/upstreams/web/{}", b.host_port()),
        "weight=1",
    );
    kv.put("/ELBT4/rules/s.test", &rules_to("web"));
    kv.put("/ELBT4/rules/api.test", &rules_to("api"));
    let elb = elb_on(&etcd.endpoints(), "ELBT4")
        .args(["--services-prefix", svc])
        .start();
    let mut seen = std::collections::BTreeSet::new();
    assert!(
        wait_until(APPLIED, || {
            if let Some(n) = served_by(elb.listen_addr(), "s.test") {
                seen.insert(n);
            }
            seen.len() == 2
        }),
        "both layouts' peers should serve s.test, saw {seen:?}; stderr:\n{}",
        elb.stderr()
    );
    // A services-only upstream, added while running, with the README's
    // `checkurl` spelling.
    kv.put(
        &format!("{svc}api/{}", c.host_port()),
        r#"{"weight":2,"checkurl":"/ping","slow_start":5}"#,
    );
    expect_served(&elb, "api.test", "c", APPLIED);
    // Taken out through the services layout: only the other peer remains.
    kv.put(
        &format!("{svc}web/{}", a.host_port()),
        r#"{"status":"down"}"#,
    );
    let ups_ok = wait_until(APPLIED, || {
        let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
        ups["web"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["status"] == "down"))
    });
    assert!(ups_ok);
    for _ in 0..6 {
        assert_eq!(served_by(elb.listen_addr(), "s.test").as_deref(), Some("b"));
    }
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    assert_eq!(ups["api"][0]["check_url"], "/ping", "{ups}");
    assert_eq!(ups["api"][0]["weight"], 2, "{ups}");
    // Deleting the services peers leaves the /NAME/ ones.
    kv.delete_prefix(&format!("{svc}web/"));
    let gone = wait_until(APPLIED, || {
        admin_get(elb.admin_addr(), "/__erulb__/upstream")["web"]
            .as_array()
            .map(Vec::len)
            == Some(1)
    });
    assert!(
        gone,
        "{}",
        json!(admin_get(elb.admin_addr(), "/__erulb__/upstream"))
    );
    expect_served(&elb, "s.test", "b", APPLIED);
}

#[test]
fn services_values_take_the_originals_defaults_and_float_weights() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let svc = "/v1/elbt9/services/";
    // Both in place before ELB starts: peers of the first load start at
    // full weight, not in slow start (the original's default is 30 s).
    kv.put(&format!("{svc}web/{}", a.host_port()), r#"{"weight":1.5}"#);
    kv.put(&format!("{svc}web/{}", b.host_port()), r#"{"weight":1}"#);
    // Not JSON: every default of the original, with a warning.
    kv.put(&format!("{svc}other/{}", c.host_port()), "weight=3");
    kv.put("/ELBT9/rules/f.test", &rules_to("web"));
    let elb = elb_on(&etcd.endpoints(), "ELBT9")
        .args(["--services-prefix", svc])
        .start();
    expect_served(&elb, "f.test", "a", APPLIED);
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    let peer = |up: &str, b: &Backend| {
        ups[up]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == b.host_port()))
            .cloned()
            .unwrap_or_default()
    };
    let pa = peer("web", &a);
    assert_eq!(pa["weight"], json!(1.5), "{ups}");
    assert_eq!(pa["check_url"], "/health", "{ups}");
    assert_eq!(pa["slow_start"], 30, "{ups}");
    assert_eq!(pa["status"], "up", "{ups}");
    assert_eq!(peer("web", &b)["weight"], 1, "{ups}");
    let pc = peer("other", &c);
    assert_eq!(
        (pc["weight"].clone(), pc["check_url"].clone()),
        (json!(100), json!("/health")),
        "{ups}"
    );
    assert!(
        elb.stderr()
            .contains("every lua-resty-upstream-etcd default applies"),
        "{}",
        elb.stderr()
    );

    // 1.5 against 1: 3 of every 5 requests, exactly, across both workers.
    let (mut na, mut nb) = (0, 0);
    for _ in 0..500 {
        match served_by(elb.listen_addr(), "f.test").as_deref() {
            Some("a") => na += 1,
            Some("b") => nb += 1,
            other => panic!("answered by {other:?}"),
        }
    }
    let share = f64::from(na) / f64::from(na + nb);
    assert!((share - 0.6).abs() < 0.006, "a took {na} and b {nb}");
}
