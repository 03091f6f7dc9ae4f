//! SPEC 4, the admin API: its requests and answers, validation and
//! atomicity, and who may use it on the proxy listener.

mod common;

use std::net::SocketAddr;

use serde_json::{Value, json};

use common::backend::{
    AdminAnswer, Backend, Echo, admin, admin_get, admin_raw, answer, get, json_contains,
    put_domains, put_upstreams, to_backend,
};
use common::{Elb, HTTP_TIMEOUT, HttpConn};

const DOMAIN: &str = "/__erulb__/domain";
const UPSTREAM: &str = "/__erulb__/upstream";
const DUMP: &str = "/__erulb__/dump";

fn start() -> Elb {
    Elb::builder().workers(2).start()
}

/// The original README's rule set (with its upstream names).
fn readme_rules() -> Value {
    json!({
        "init": "r1",
        "rules": {
            "r1": {"type": "ua", "args": {"fail": "r3", "pattern": "httpie(\\S+)$", "succ": "r4"}},
            "r2": {"type": "backend", "args": {"servername": "upstrimg1"}},
            "r3": {"type": "backend", "args": {"servername": "upstream2"}},
            "r4": {"type": "path", "args": {"regex": true, "pattern": "^\\/blog\\/(\\S+)$", "succ": "r2", "fail": "r3", "rewrite": false}}
        }
    })
}

fn assert_json_answer(a: &AdminAnswer, what: &str) {
    let ct = a.content_type.as_deref().unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {:?}, expected application/json (body {})",
        a.content_type,
        a.text
    );
    assert!(
        !a.json.is_null(),
        "{what}: the body is not JSON: {:?}",
        a.text
    );
}

fn assert_ok(a: &AdminAnswer, what: &str) {
    assert_json_answer(a, what);
    assert_eq!(
        (a.status, &a.json),
        (200, &json!({"msg": "OK"})),
        "{what}: {}",
        a.text
    );
}

/// A 400 `{"error": "…"}` whose message names every one of `names`.
fn assert_refused(a: &AdminAnswer, what: &str, names: &[&str]) {
    assert_json_answer(a, what);
    assert_eq!(a.status, 400, "{what}: expected 400, got {}", a.text);
    let msg = a
        .json
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: no \"error\" string in {}", a.text));
    for n in names {
        assert!(
            msg.contains(n),
            "{what}: the error {msg:?} does not name {n:?}"
        );
    }
}

/// The peer entry named `name` in `GET /__erulb__/upstream`'s list for
/// `upstream`.
fn peer<'a>(ups: &'a Value, upstream: &str, name: &str) -> &'a Value {
    ups.get(upstream)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no upstream {upstream:?} in {ups}"))
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no peer named {name:?} in {upstream:?}: {ups}"))
}

fn peer_names(ups: &Value, upstream: &str) -> Vec<String> {
    let mut v: Vec<String> = ups
        .get(upstream)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no upstream {upstream:?} in {ups}"))
        .iter()
        .map(|p| {
            p.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn domains_are_put_read_back_and_deleted() {
    let elb = start();
    let a = elb.admin_addr();
    let sets = json!({
        "127.0.0.1": readme_rules(),
        "www.example.test": to_backend("up1"),
    });
    let put = admin(a, "PUT", DOMAIN, Some(&sets));
    assert_ok(&put, "PUT domain");

    let got = admin(a, "GET", DOMAIN, None);
    assert_json_answer(&got, "GET domain");
    assert_eq!(got.status, 200, "GET domain: {}", got.text);
    for d in ["127.0.0.1", "www.example.test"] {
        assert!(
            json_contains(&got.json[d], &sets[d]),
            "GET domain gives back {d} as {}, set as {}",
            got.json[d],
            sets[d]
        );
    }
    // The README's rule set comes back with every field it was given.
    let r4 = &got.json["127.0.0.1"]["rules"]["r4"]["args"];
    assert_eq!(r4["regex"], json!(true), "{r4}");
    assert_eq!(r4["rewrite"], json!(false), "{r4}");
    assert_eq!(r4["pattern"], json!("^\\/blog\\/(\\S+)$"), "{r4}");

    // A PUT of one domain leaves the others alone, and replaces its own.
    put_domains(a, &json!({"www.example.test": to_backend("up2")}));
    let got = admin_get(a, DOMAIN);
    assert!(json_contains(&got["127.0.0.1"], &readme_rules()), "{got}");
    assert_eq!(
        got["www.example.test"]["rules"]["b"]["args"]["servername"],
        json!("up2"),
        "{got}"
    );

    let del = admin(a, "DELETE", DOMAIN, Some(&json!(["127.0.0.1"])));
    assert_ok(&del, "DELETE domain");
    let got = admin_get(a, DOMAIN);
    assert!(got.get("127.0.0.1").is_none(), "deleted, yet: {got}");
    assert!(got.get("www.example.test").is_some(), "{got}");

    // Deleting what is not there is no error.
    let del = admin(a, "DELETE", DOMAIN, Some(&json!(["never.test"])));
    assert_ok(&del, "DELETE of a missing domain");

    let del = admin(a, "DELETE", DOMAIN, Some(&json!(["www.example.test"])));
    assert_ok(&del, "DELETE domain");
    assert_eq!(admin_get(a, DOMAIN), json!({}));
}

#[test]
fn upstreams_are_put_read_back_replaced_and_deleted() {
    let elb = start();
    let a = elb.admin_addr();
    let (p1, p2, p3) = ("127.0.0.1:18088", "127.0.0.1:18089", "127.0.0.1:18090");
    // The README's example: an empty value takes the defaults.
    let put = admin(
        a,
        "PUT",
        UPSTREAM,
        Some(&json!({
            "up1": {p1: "", p2: "max_fails=2 weight=10 fail_timeout=30"},
            "up2": {p3: "weight=3"},
        })),
    );
    assert_ok(&put, "PUT upstream");

    let got = admin(a, "GET", UPSTREAM, None);
    assert_json_answer(&got, "GET upstream");
    assert_eq!(got.status, 200, "GET upstream: {}", got.text);
    let ups = got.json;
    assert_eq!(ups["up1"].as_array().map(Vec::len), Some(2), "{ups}");
    let e1 = peer(&ups, "up1", p1);
    for (k, v) in [
        ("addr", json!(p1)),
        ("name", json!(p1)),
        ("weight", json!(1)),
        ("max_fails", json!(1)),
        ("fail_timeout", json!(10)),
    ] {
        assert_eq!(e1.get(k), Some(&v), "default {k} of {e1}");
    }
    let e2 = peer(&ups, "up1", p2);
    for (k, v) in [
        ("addr", json!(p2)),
        ("name", json!(p2)),
        ("weight", json!(10)),
        ("max_fails", json!(2)),
        ("fail_timeout", json!(30)),
    ] {
        assert_eq!(e2.get(k), Some(&v), "{k} of {e2}");
    }
    assert_eq!(
        peer(&ups, "up2", p3).get("weight"),
        Some(&json!(3)),
        "{ups}"
    );

    // A PUT replaces the named upstream's peer list whole, and leaves the
    // others alone.
    put_upstreams(a, &json!({"up1": {p3: ""}}));
    let ups = admin_get(a, UPSTREAM);
    assert_eq!(peer_names(&ups, "up1"), vec![p3.to_string()], "{ups}");
    assert_eq!(peer_names(&ups, "up2"), vec![p3.to_string()], "{ups}");

    // DELETE: true per name that existed, 404 in place of true otherwise.
    let del = admin(a, "DELETE", UPSTREAM, Some(&json!(["up1", "nosuch"])));
    assert_json_answer(&del, "DELETE upstream");
    assert_eq!(
        (del.status, &del.json),
        (200, &json!({"up1": true, "nosuch": 404})),
        "DELETE upstream: {}",
        del.text
    );
    let ups = admin_get(a, UPSTREAM);
    assert!(ups.get("up1").is_none(), "deleted, yet: {ups}");
    assert!(ups.get("up2").is_some(), "{ups}");
}

#[test]
fn a_hostname_peer_keeps_its_name_and_is_resolved() {
    let elb = start();
    let a = elb.admin_addr();
    let backend = Backend::start("byname");
    let name = format!("localhost:{}", backend.port());
    put_upstreams(a, &json!({"named": {name.clone(): ""}}));
    let ups = admin_get(a, UPSTREAM);
    let e = peer(&ups, "named", &name);
    let addr: SocketAddr = e["addr"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("addr of {e} is not a resolved ip:port"));
    assert!(addr.ip().is_loopback(), "localhost resolved to {addr}");
    assert_eq!(addr.port(), backend.port(), "{e}");

    // And it is used: (only when localhost resolved to the backend's address)
    if addr == backend.addr() {
        put_domains(a, &json!({"named.test": to_backend("named")}));
        let r = get(elb.listen_addr(), "named.test", "/", &[]);
        assert_eq!(Echo::of(&r).name(), "byname");
    }
}

/// Several broken rule sets, each next to a valid one in the same PUT.
#[test]
fn a_put_with_one_invalid_domain_applies_nothing() {
    let elb = start();
    let a = elb.admin_addr();
    put_domains(a, &json!({"keep.test": to_backend("before")}));
    let before = admin_get(a, DOMAIN);

    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "succ names no rule",
            json!({"init": "r1", "rules": {
                "r1": {"type": "ua", "args": {"pattern": "x", "succ": "missing"}}}}),
            vec!["r1", "missing"],
        ),
        (
            "init names no rule",
            json!({"init": "nothere", "rules": {
                "r1": {"type": "backend", "args": {"servername": "u"}}}}),
            vec!["nothere"],
        ),
        (
            "a cycle",
            json!({"init": "r1", "rules": {
                "r1": {"type": "path", "args": {"pattern": "/a", "succ": "r2"}},
                "r2": {"type": "path", "args": {"pattern": "/b", "succ": "r1"}}}}),
            vec![],
        ),
        (
            "an unknown type",
            json!({"init": "r1", "rules": {
                "r1": {"type": "cookie", "args": {"pattern": "x"}}}}),
            vec!["r1", "cookie"],
        ),
        (
            "a pattern that does not compile",
            json!({"init": "r1", "rules": {
                "r1": {"type": "path", "args": {"pattern": "(", "regex": true, "succ": "b"}},
                "b": {"type": "backend", "args": {"servername": "u"}}}}),
            vec!["r1"],
        ),
        (
            "a backend without servername",
            json!({"init": "r1", "rules": {
                "r1": {"type": "backend", "args": {"path": "/x"}}}}),
            vec!["r1"],
        ),
        (
            "a non-string servername",
            json!({"init": "r1", "rules": {
                "r1": {"type": "backend", "args": {"servername": 8080}}}}),
            vec!["r1"],
        ),
        ("not an object", json!("r1"), vec![]),
    ];
    for (why, bad, names) in cases {
        let body = json!({
            "keep.test": to_backend("after"),
            "bad.test": bad,
            "new.test": to_backend("new"),
        });
        let r = admin(a, "PUT", DOMAIN, Some(&body));
        let mut names = names;
        names.push("bad.test");
        assert_refused(&r, &format!("PUT domain with {why}"), &names);
        assert_eq!(
            admin_get(a, DOMAIN),
            before,
            "a refused PUT ({why}) changed the rule sets"
        );
    }
}

#[test]
fn a_put_with_one_invalid_upstream_applies_nothing() {
    let elb = start();
    let a = elb.admin_addr();
    put_upstreams(a, &json!({"good": {"127.0.0.1:18001": ""}}));
    let before = admin_get(a, UPSTREAM);
    let cases: Vec<(&str, Value)> = vec![
        ("a bad parameter", json!({"127.0.0.1:18002": "weight=abc"})),
        ("a bad port", json!({"127.0.0.1:99999": ""})),
        ("no port", json!({"127.0.0.1": ""})),
        ("a non-string parameter", json!({"127.0.0.1:18002": 7})),
        ("not an object", json!(["127.0.0.1:18002"])),
    ];
    for (why, bad) in cases {
        let body = json!({
            "good": {"127.0.0.1:18003": "weight=2"},
            "bad": bad,
            "new": {"127.0.0.1:18004": ""},
        });
        let r = admin(a, "PUT", UPSTREAM, Some(&body));
        assert_refused(&r, &format!("PUT upstream with {why}"), &["bad"]);
        assert_eq!(
            admin_get(a, UPSTREAM),
            before,
            "a refused PUT ({why}) changed the upstreams"
        );
    }
}

#[test]
fn a_body_that_is_not_json_is_400() {
    let elb = start();
    let a = elb.admin_addr();
    for (method, path, body) in [
        ("PUT", DOMAIN, &b"not json"[..]),
        ("PUT", DOMAIN, b"{\"a.test\": "),
        ("PUT", DOMAIN, b"[\"a.test\"]"),
        ("PUT", UPSTREAM, b"{"),
        ("PUT", UPSTREAM, b"\"up\""),
        ("DELETE", DOMAIN, b"a.test"),
        ("DELETE", DOMAIN, b"{\"a.test\": 1}"),
        ("DELETE", UPSTREAM, b"up1,up2"),
        ("PUT", DOMAIN, b""),
    ] {
        let r = admin_raw(a, method, path, &[], body);
        assert_refused(
            &r,
            &format!("{method} {path} {:?}", String::from_utf8_lossy(body)),
            &[],
        );
    }
    assert_eq!(admin_get(a, DOMAIN), json!({}));
    assert_eq!(admin_get(a, UPSTREAM), json!({}));
}

#[test]
fn another_method_is_405_and_another_path_404() {
    let elb = start();
    for addr in [elb.admin_addr(), elb.listen_addr()] {
        for (method, path) in [
            ("POST", DOMAIN),
            ("PATCH", DOMAIN),
            ("POST", UPSTREAM),
            ("OPTIONS", UPSTREAM),
            ("GET", DUMP),
            ("DELETE", DUMP),
            ("POST", "/__erulb__/stats"),
            ("DELETE", "/__erulb__/"),
        ] {
            let body: &[u8] = if method == "GET" { b"" } else { b"{}" };
            let r = admin_raw(addr, method, path, &[], body);
            assert_eq!(r.status, 405, "{method} {path} via {addr}: {}", r.text);
            assert_json_answer(&r, &format!("{method} {path}"));
        }
        for path in [
            "/__erulb__/nothing",
            "/__erulb__/domains",
            "/__erulb__/stats/x",
        ] {
            let r = admin(addr, "GET", path, None);
            assert_eq!(r.status, 404, "GET {path} via {addr}: {}", r.text);
            assert_json_answer(&r, &format!("GET {path}"));
        }
    }
}

#[test]
fn admin_on_the_proxy_listener_is_open_to_loopback_by_default() {
    let elb = start();
    let (p, a) = (elb.listen_addr(), elb.admin_addr());
    let put = admin(
        p,
        "PUT",
        UPSTREAM,
        Some(&json!({"via": {"127.0.0.1:18005": ""}})),
    );
    assert_ok(&put, "PUT upstream on the proxy listener");
    // One store behind both listeners.
    let ups = admin_get(a, UPSTREAM);
    assert_eq!(peer_names(&ups, "via"), vec!["127.0.0.1:18005"], "{ups}");
    put_domains(a, &json!({"via.test": to_backend("via")}));
    let got = admin(p, "GET", DOMAIN, None);
    assert_json_answer(&got, "GET domain on the proxy listener");
    assert!(got.json.get("via.test").is_some(), "{}", got.text);

    // Several admin requests on one keep-alive connection (as a client
    // with a session does), whatever the Host.
    let mut c = HttpConn::connect(p, HTTP_TIMEOUT).expect("connect");
    let ct = [("Content-Type", "application/json")];
    let r = c
        .request("PUT", "elb.example", DOMAIN, &ct, br#"{"ka.test": {"init": "b", "rules": {"b": {"type": "backend", "args": {"servername": "via"}}}}}"#)
        .expect("PUT on a keep-alive connection");
    assert_ok(&answer(r), "PUT domain (keep-alive)");
    let r = c
        .request("GET", "elb.example", DOMAIN, &[], b"")
        .expect("GET on a keep-alive connection");
    let r = answer(r);
    assert!(r.json.get("ka.test").is_some(), "{}", r.text);
    let r = c
        .request("DELETE", "elb.example", DOMAIN, &ct, br#"["ka.test"]"#)
        .expect("DELETE on a keep-alive connection");
    assert_ok(&answer(r), "DELETE domain (keep-alive)");
    let r = c
        .request("GET", "elb.example", UPSTREAM, &[], b"")
        .expect("GET on a keep-alive connection");
    assert_eq!(r.status, 200);
}

#[test]
fn outside_the_allowed_networks_only_the_token_gets_in() {
    let elb = Elb::builder()
        .workers(2)
        .env("ELB_ADMIN_ALLOW", "10.0.0.0/8")
        .env("ELB_ADMIN_TOKEN", "secret")
        .start();
    // Both TCP listeners: the proxy's /__erulb__/ and --admin.
    for addr in [elb.listen_addr(), elb.admin_addr()] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("secret"),
            Some("Basic secret"),
        ] {
            let h: Vec<(&str, &str)> = auth.map(|v| ("Authorization", v)).into_iter().collect();
            let r = admin_raw(addr, "GET", UPSTREAM, &h, b"");
            assert_eq!(
                r.status, 403,
                "GET {UPSTREAM} via {addr} from 127.0.0.1 with Authorization {auth:?}, \
                 ELB_ADMIN_ALLOW=10.0.0.0/8: {}",
                r.text
            );
            let r = admin_raw(
                addr,
                "PUT",
                UPSTREAM,
                &h,
                br#"{"sneaky": {"127.0.0.1:18006": ""}}"#,
            );
            assert_eq!(r.status, 403, "PUT via {addr} with {auth:?}: {}", r.text);
        }
        let bearer = [("Authorization", "Bearer secret")];
        let r = admin_raw(addr, "GET", UPSTREAM, &bearer, b"");
        assert_eq!(r.status, 200, "GET via {addr} with the token: {}", r.text);
        assert!(
            r.json.get("sneaky").is_none(),
            "a refused PUT was applied: {}",
            r.text
        );
        let body = json!({"tok.test": to_backend("127.0.0.1:1")}).to_string();
        let r = admin_raw(addr, "PUT", DOMAIN, &bearer, body.as_bytes());
        assert_ok(&r, &format!("PUT domain via {addr} with the token"));
    }
    // Proxying is not gated.
    let r = get(elb.listen_addr(), "nobody.test", "/", &[]);
    assert_eq!(r.status, 404, "{}", r.body_text());
}

#[test]
fn dump_answers_503_until_etcd_is_there() {
    // The etcd work turns this into 200 {"msg":"OK"} (with an etcd to
    // write to); until then dump must fail loudly, not pretend.
    let elb = start();
    for addr in [elb.admin_addr(), elb.listen_addr()] {
        let r = admin_raw(addr, "PUT", DUMP, &[], b"");
        assert_eq!(r.status, 503, "PUT {DUMP} via {addr}: {}", r.text);
        assert_json_answer(&r, "PUT dump");
        assert!(
            r.json.get("error").and_then(Value::as_str).is_some(),
            "{}",
            r.text
        );
    }
}
