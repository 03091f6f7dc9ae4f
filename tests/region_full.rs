//! SPEC 4: a change that does not fit the region is refused with
//! `507 {"error"}` naming what ran out (arena space, keys, state slots), and
//! nothing of it is applied, then or by any later change.

mod common;

use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use common::Elb;
use common::backend::{Backend, admin, admin_get, get, put_domains, put_upstreams, to_backend};

const DOMAIN: &str = "/__erulb__/domain";
const UPSTREAM: &str = "/__erulb__/upstream";

/// A valid rule set of about 100 KB: a chain of 25 path rules with
/// 4000-byte patterns (the longest allowed is 4096).
fn big_rules() -> Value {
    let mut rules: Map<String, Value> = (0..25)
        .map(|i| {
            let next = if i == 24 {
                "b".to_string()
            } else {
                format!("p{}", i + 1)
            };
            let args = json!({"pattern": "/".repeat(4000), "succ": "b", "fail": next});
            (format!("p{i}"), json!({"type": "path", "args": args}))
        })
        .collect();
    rules.insert(
        "b".into(),
        json!({"type": "backend", "args": {"servername": "up"}}),
    );
    json!({"init": "p0", "rules": rules})
}

/// After a refused change, an unrelated one goes through and is served;
/// none of `refused` (domain names) shows in GET or routes a request.
fn nothing_of(elb: &Elb, refused: &[String], what: &str, unrelated: &str) {
    let admin_addr = elb.admin_addr();
    put_domains(admin_addr, &json!({unrelated: to_backend("up")}));
    let served = |host: &str| get(elb.listen_addr(), host, "/", &[]).status;
    assert!(
        common::wait_until(common::HTTP_TIMEOUT, || served(unrelated) == 200),
        "{what}: the unrelated change {unrelated} is not served"
    );
    let domains = admin_get(admin_addr, DOMAIN);
    for d in refused {
        assert!(
            domains.get(d).is_none(),
            "{what}: {d} of the refused change is in GET {DOMAIN}"
        );
        assert_eq!(
            served(d),
            404,
            "{what}: {d} of the refused change routes requests"
        );
    }
}

fn assert_507(a: &common::backend::AdminAnswer, names: &str, what: &str) {
    assert_eq!(a.status, 507, "{what}: {}", a.text);
    let msg = a.json["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(names),
        "{what}: the error does not name {names}: {}",
        a.text
    );
}

#[test]
fn a_change_that_does_not_fit_changes_nothing_ever() {
    // The smallest region the settings accept: 1024 keys, 2048 state slots,
    // about 700 KB of arena.
    let elb = Elb::builder().workers(1).args(["--shm-size", "1m"]).start();
    let admin_addr = elb.admin_addr();
    let backend = Backend::start("b");
    let backend_addr: SocketAddr = backend.addr();
    put_upstreams(admin_addr, &json!({"up": {backend_addr.to_string(): ""}}));

    // Keys: one more domain than the directory holds, with a small one first.
    let many: Map<String, Value> = (0..1100)
        .map(|i| (format!("k{i:04}.test"), to_backend("up")))
        .collect();
    let refused: Vec<String> = many.keys().take(3).cloned().collect();
    let a = admin(admin_addr, "PUT", DOMAIN, Some(&Value::Object(many)));
    nothing_of(&elb, &refused, "keys", "after-keys.test");
    assert_507(&a, "keys", "1100 domains in a 1m region");

    // State slots: a small upstream with one far too large.
    let huge: Map<String, Value> = (0..2100)
        .map(|i| (format!("127.0.0.1:{}", 20000 + i), json!("")))
        .collect();
    let a = admin(
        admin_addr,
        "PUT",
        UPSTREAM,
        Some(&json!({"aaa": {backend_addr.to_string(): ""}, "zzz": huge})),
    );
    assert_507(&a, "state slots", "2100 peers in a 1m region");
    let ups = admin_get(admin_addr, UPSTREAM);
    assert!(
        ups.get("aaa").is_none() && ups.get("zzz").is_none(),
        "state slots: part of the refused change is in GET {UPSTREAM}: {ups}"
    );

    // Arena: fill it with 100 KB rule sets until a batch of a small domain
    // and a big one is refused.
    let mut refused = None;
    for i in 0..20 {
        let small = format!("part{i:02}.test");
        let batch =
            json!({small.clone(): to_backend("up"), format!("zbig{i:02}.test"): big_rules()});
        let a = admin(admin_addr, "PUT", DOMAIN, Some(&batch));
        if a.status != 200 {
            refused = Some((a, small));
            break;
        }
    }
    let (a, small) = refused.expect("the arena never filled");
    let refused = [small.replace("part", "zbig"), small];
    nothing_of(&elb, &refused, "arena", "after-arena.test");
    assert_507(&a, "arena", "a 100 KB rule set in a full arena");
    // A later upstream change publishes nothing of it either.
    put_upstreams(admin_addr, &json!({"up2": {backend_addr.to_string(): ""}}));
    nothing_of(
        &elb,
        &refused,
        "arena, then an upstream",
        "after-upstream.test",
    );
}
