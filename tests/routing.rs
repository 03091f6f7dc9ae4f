//! SPEC 5, rules, and the request headers of SPEC 6: real requests through
//! elb to echo backends.

mod common;

use std::net::SocketAddr;

use serde_json::{Value, json};

use common::backend::{
    Backend, Echo, get, put_domains, put_upstreams, request, routed_to, to_backend,
};
use common::{Elb, HTTP_TIMEOUT, HttpConn};

/// An elb with two workers and echo backends `a`, `b` and `c`, each also
/// the single peer of an upstream of its name (`up_a`, …).
struct Fixture {
    elb: Elb,
    a: Backend,
    b: Backend,
    c: Backend,
}

impl Fixture {
    fn new() -> Fixture {
        let elb = Elb::builder().workers(2).start();
        let (a, b, c) = (
            Backend::start("a"),
            Backend::start("b"),
            Backend::start("c"),
        );
        put_upstreams(
            elb.admin_addr(),
            &json!({
                "up_a": {a.host_port(): ""},
                "up_b": {b.host_port(): ""},
                "up_c": {c.host_port(): ""},
            }),
        );
        Fixture { elb, a, b, c }
    }

    fn proxy(&self) -> SocketAddr {
        self.elb.listen_addr()
    }

    fn set(&self, domain: &str, rules: Value) {
        put_domains(self.elb.admin_addr(), &json!({ domain: rules }));
    }

    /// Which backend answered `GET path` for `host`.
    fn to(&self, host: &str, path: &str, ua: Option<&str>) -> String {
        routed_to(self.proxy(), host, path, ua)
    }

    /// What the backend received for `GET path`.
    fn echo(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Echo {
        Echo::of(&get(self.proxy(), host, path, headers))
    }

    fn status(&self, host: &str, path: &str, ua: Option<&str>) -> u16 {
        let headers: Vec<(&str, &str)> = ua.map(|u| ("User-Agent", u)).into_iter().collect();
        get(self.proxy(), host, path, &headers).status
    }
}

fn backend(servername: &str) -> Value {
    json!({"type": "backend", "args": {"servername": servername}})
}

/// `init` → a `ty` rule with `args` (+ succ → up_a, fail → up_b).
fn filter(ty: &str, args: Value) -> Value {
    let mut args = args;
    args["succ"] = json!("to_a");
    args["fail"] = json!("to_b");
    json!({"init": "f", "rules": {
        "f": {"type": ty, "args": args},
        "to_a": backend("up_a"),
        "to_b": backend("up_b"),
    }})
}

#[test]
fn ua_rule_matches_the_lower_cased_user_agent() {
    let f = Fixture::new();
    f.set("ua.test", filter("ua", json!({"pattern": "httpie(\\S+)$"})));
    for (ua, want) in [
        (Some("HTTPie/0.9.9"), "a"),
        (Some("httpie/1.0"), "a"),
        (Some("Mozilla HTTPie/2"), "a"),
        (Some("HTTPie"), "b"),
        (Some("curl/7.88"), "b"),
        (Some(""), "b"),
        (None, "b"),
    ] {
        assert_eq!(f.to("ua.test", "/", ua), want, "User-Agent {ua:?}");
    }
    // A pattern with an upper-case letter never matches the lower-cased UA.
    f.set("upper.test", filter("ua", json!({"pattern": "HTTPie"})));
    for ua in ["HTTPie/0.9.9", "httpie/0.9.9", "HTTPIE"] {
        assert_eq!(f.to("upper.test", "/", Some(ua)), "b", "User-Agent {ua:?}");
    }
    // The backend still gets the User-Agent as sent.
    let e = f.echo("ua.test", "/", &[("User-Agent", "HTTPie/0.9.9")]);
    assert_eq!(e.header("user-agent"), Some("HTTPie/0.9.9"));
}

#[test]
fn path_prefix_rule() {
    let f = Fixture::new();
    f.set("prefix.test", filter("path", json!({"pattern": "/blog"})));
    for (path, want) in [
        ("/blog", "a"),
        ("/blog/2017/x", "a"),
        ("/blogger", "a"),
        ("/blog?x=1", "a"),
        ("/", "b"),
        ("/about", "b"),
        ("/x/blog", "b"),
        ("/about?/blog", "b"),
        ("/BLOG", "b"),
    ] {
        assert_eq!(f.to("prefix.test", path, None), want, "path {path:?}");
    }
    // "regex": false is the same as no regex; the pattern is no regex then.
    f.set(
        "literal.test",
        filter("path", json!({"pattern": "/a.b", "regex": false})),
    );
    assert_eq!(f.to("literal.test", "/a.b/c", None), "a");
    assert_eq!(f.to("literal.test", "/axb/c", None), "b");
    // No rewrite: the backend sees the target as sent.
    let e = f.echo("prefix.test", "/blog/2017/x?q=1&r=2", &[]);
    assert_eq!((e.name(), e.path()), ("a", "/blog/2017/x?q=1&r=2"));
}

#[test]
fn path_regex_rule() {
    let f = Fixture::new();
    f.set(
        "regex.test",
        filter("path", json!({"pattern": "\\.(png|jpg)$", "regex": true})),
    );
    for (path, want) in [
        ("/a/b.png", "a"),
        ("/b.jpg?size=2", "a"),
        ("/a.pngx", "b"),
        ("/a.gif", "b"),
        ("/?x=.png", "b"),
    ] {
        assert_eq!(f.to("regex.test", path, None), want, "path {path:?}");
    }
    // Unanchored: a match anywhere in the path.
    f.set(
        "contains.test",
        filter(
            "path",
            json!({"pattern": "im[g]", "regex": true, "rewrite": false}),
        ),
    );
    assert_eq!(f.to("contains.test", "/static/img/1.png", None), "a");
    assert_eq!(f.to("contains.test", "/static/pic/1.png", None), "b");
    // Used as written: no case folding of the path.
    assert_eq!(f.to("contains.test", "/static/IMG/1.png", None), "b");
    let e = f.echo("contains.test", "/static/img/1.png?v=3", &[]);
    assert_eq!(e.path(), "/static/img/1.png?v=3", "no rewrite asked");
}

#[test]
fn rewrite_sends_the_first_capture() {
    let f = Fixture::new();
    let rw = |pattern: &str| {
        filter(
            "path",
            json!({"pattern": pattern, "regex": true, "rewrite": true}),
        )
    };
    f.set("blog.test", rw("^\\/blog\\/(\\S+)$"));
    f.set("old.test", rw("^/old(/.*)$"));
    f.set("nocap.test", rw("^/static"));
    f.set("optional.test", rw("^/p(/x)?"));
    for (host, path, want) in [
        // A leading `/` is added to the capture; the query is kept.
        ("blog.test", "/blog/post/1", "/post/1"),
        ("blog.test", "/blog/post/1?x=1&y", "/post/1?x=1&y"),
        // A capture that starts with `/` gets no second one.
        ("old.test", "/old/a/b?q", "/a/b?q"),
        // No capture group: `/`.
        ("nocap.test", "/static/x/y", "/"),
        ("nocap.test", "/static/x?q=2", "/?q=2"),
        // A group that took no part in the match: `/`.
        ("optional.test", "/p", "/"),
        ("optional.test", "/p/x/tail", "/x"),
    ] {
        let e = f.echo(host, path, &[]);
        assert_eq!(
            (e.name(), e.path()),
            ("a", want),
            "{host}{path} should reach a as {want}"
        );
    }
    // No match: the fail branch, with the path untouched.
    let e = f.echo("blog.test", "/blog/", &[]);
    assert_eq!((e.name(), e.path()), ("b", "/blog/"));
    let e = f.echo("old.test", "/older?q", &[]);
    assert_eq!((e.name(), e.path()), ("b", "/older?q"));
}

#[test]
fn a_walk_without_succ_or_fail_is_403() {
    let f = Fixture::new();
    f.set(
        "nofail.test",
        json!({"init": "p", "rules": {
            "p": {"type": "path", "args": {"pattern": "/in", "succ": "to_a"}},
            "to_a": backend("up_a"),
        }}),
    );
    f.set(
        "nosucc.test",
        json!({"init": "u", "rules": {
            "u": {"type": "ua", "args": {"pattern": "bot", "fail": "to_a"}},
            "to_a": backend("up_a"),
        }}),
    );
    assert_eq!(f.to("nofail.test", "/in/x", None), "a");
    assert_eq!(f.status("nofail.test", "/out", None), 403);
    assert_eq!(f.to("nosucc.test", "/", Some("browser")), "a");
    assert_eq!(f.to("nosucc.test", "/", None), "a");
    assert_eq!(f.status("nosucc.test", "/", Some("Googlebot/2.1")), 403);
    assert_eq!(f.a.requests(), 3, "a 403 reached a backend");
    assert_eq!(f.b.requests() + f.c.requests(), 0);
}

#[test]
fn backend_args_are_sent_as_headers() {
    let f = Fixture::new();
    f.set(
        "static.test",
        json!({"init": "s", "rules": {"s": {"type": "backend", "args": {
            "servername": "up_c",
            "path": "/data/static",
            "expires": "30d",
        }}}}),
    );
    let e = f.echo("static.test", "/img/1.png", &[]);
    assert_eq!(e.name(), "c");
    assert_eq!(e.header("path"), Some("/data/static"), "{:?}", e.0);
    assert_eq!(e.header("expires"), Some("30d"), "{:?}", e.0);
    assert_eq!(e.path(), "/img/1.png");
    assert!(e.header("servername").is_none(), "{:?}", e.0);
}

#[test]
fn a_host_port_servername_goes_direct() {
    let f = Fixture::new();
    f.set("direct.test", to_backend(&f.c.host_port()));
    let e = f.echo("direct.test", "/d?x", &[]);
    assert_eq!((e.name(), e.path()), ("c", "/d?x"));
}

#[test]
fn an_unknown_upstream_is_502_until_it_is_set() {
    let f = Fixture::new();
    f.set("later.test", to_backend("up_later"));
    let r = get(f.proxy(), "later.test", "/", &[]);
    assert_eq!(r.status, 502, "{}", r.body_text());
    // Rules may be set before their upstream.
    put_upstreams(
        f.elb.admin_addr(),
        &json!({"up_later": {f.b.host_port(): ""}}),
    );
    assert_eq!(f.to("later.test", "/", None), "b");
}

#[test]
fn an_unknown_domain_is_404() {
    let f = Fixture::new();
    f.set("known.test", to_backend("up_a"));
    for host in [
        "unknown.test",
        "known.test.evil",
        "sub.known.test",
        "known",
        "127.0.0.1",
    ] {
        let r = get(f.proxy(), host, "/", &[]);
        assert_eq!(r.status, 404, "Host {host}: {}", r.body_text());
    }
    assert_eq!(f.a.requests(), 0);
    assert_eq!(f.to("known.test", "/", None), "a");
}

#[test]
fn the_host_matches_case_insensitively_and_without_its_port() {
    let f = Fixture::new();
    f.set("case.test", to_backend("up_a"));
    f.set("UPPER.Test", to_backend("up_b"));
    f.set("port.test", to_backend("up_a"));
    f.set("port.test:8080", to_backend("up_c"));
    for (host, want) in [
        ("case.test", "a"),
        ("CASE.Test", "a"),
        ("case.test:8080", "a"),
        ("Case.TEST:80", "a"),
        ("upper.test", "b"),
        ("UPPER.TEST:1234", "b"),
        // Exactly first, then without the port.
        ("port.test:8080", "c"),
        ("PORT.test:8080", "c"),
        ("port.test:9090", "a"),
        ("port.test", "a"),
    ] {
        let e = f.echo(host, "/", &[]);
        assert_eq!(e.name(), want, "Host {host}");
        // The upstream gets Host as the client sent it.
        assert_eq!(e.header_all("host"), vec![host], "Host {host}");
    }
}

#[test]
fn the_upstream_learns_the_client_address() {
    let f = Fixture::new();
    f.set("hdr.test", to_backend("up_a"));
    let e = f.echo("Hdr.Test:8080", "/h", &[("X-Custom", "kept")]);
    assert_eq!(e.header_all("host"), vec!["Hdr.Test:8080"]);
    assert_eq!(e.header_all("x-real-ip"), vec!["127.0.0.1"], "{:?}", e.0);
    assert_eq!(e.header_all("remote-host"), vec!["127.0.0.1"], "{:?}", e.0);
    assert_eq!(
        e.header_all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "{:?}",
        e.0
    );
    assert_eq!(e.header("x-custom"), Some("kept"));

    // An X-Forwarded-For from the client is appended to; spoofed
    // X-Real-IP and REMOTE-HOST are replaced.
    let e = f.echo(
        "hdr.test",
        "/h",
        &[
            ("X-Forwarded-For", "203.0.113.9, 10.1.2.3"),
            ("X-Real-IP", "198.51.100.1"),
            ("Remote-Host", "198.51.100.2"),
        ],
    );
    assert_eq!(
        e.header_all("x-forwarded-for"),
        vec!["203.0.113.9, 10.1.2.3, 127.0.0.1"],
        "{:?}",
        e.0
    );
    assert_eq!(e.header_all("x-real-ip"), vec!["127.0.0.1"], "{:?}", e.0);
    assert_eq!(e.header_all("remote-host"), vec!["127.0.0.1"], "{:?}", e.0);

    // A request body arrives whole, and the method as sent.
    let body = vec![b'x'; 10_000];
    let r = request(f.proxy(), "POST", "hdr.test", "/upload?a=1", &[], &body);
    let e = Echo::of(&r);
    assert_eq!(
        (e.method(), e.path(), e.body_len()),
        ("POST", "/upload?a=1", 10_000)
    );
}

/// SPEC 4: once the API has answered, every later request, on any
/// connection and any worker, sees the change.
#[test]
fn a_rule_change_is_seen_by_the_very_next_request() {
    let f = Fixture::new();
    let admin = f.elb.admin_addr();
    let ups = ["up_a", "up_b"];
    // Keep-alive connections opened before the changes, on both workers
    // (likely), must see them too.
    let mut kept: Vec<HttpConn> = (0..4)
        .map(|_| HttpConn::connect(f.proxy(), HTTP_TIMEOUT).expect("connect"))
        .collect();
    for i in 0..20 {
        let up = ups[i % 2];
        let want = &up[3..];
        // Alternately through the admin listener and the proxy listener.
        let via = if i % 4 < 2 { admin } else { f.proxy() };
        put_domains(via, &json!({"flip.test": to_backend(up)}));
        assert_eq!(
            f.to("flip.test", "/", None),
            want,
            "change {i} (to {up}, via {via}) not seen by the next request"
        );
        let c = &mut kept[i % 4];
        let r = c
            .request("GET", "flip.test", "/", &[], b"")
            .expect("request on a kept connection");
        assert_eq!(
            Echo::of(&r).name(),
            want,
            "change {i} not seen on a connection opened before it"
        );
    }
    // Deleting is a change as well.
    let del = common::backend::admin(
        admin,
        "DELETE",
        "/__erulb__/domain",
        Some(&json!(["flip.test"])),
    );
    assert_eq!(del.status, 200, "{}", del.text);
    assert_eq!(f.status("flip.test", "/", None), 404);
    // And so is an upstream's peer list.
    put_domains(admin, &json!({"peer.test": to_backend("up_x")}));
    for (i, b) in [&f.a, &f.b, &f.c, &f.a].iter().enumerate() {
        put_upstreams(admin, &json!({"up_x": {b.host_port(): ""}}));
        assert_eq!(
            f.to("peer.test", "/", None),
            b.name(),
            "peer change {i} not seen by the next request"
        );
    }
}

/// SPEC 4: once the API has answered, every later request sees the change,
/// also one sent on a kept-alive connection right after the previous answer.
/// (A worker used to refresh its view once per batch of events, so a request
/// read in the same pass as the previous response could be routed by the
/// configuration from before the admin answer.)
#[test]
fn a_kept_alive_client_sees_each_upstream_change_at_its_next_request() {
    let f = Fixture::new();
    let admin = f.elb.admin_addr();
    put_domains(admin, &json!({"hop.test": to_backend("up_hop")}));
    let mut conn = HttpConn::connect(f.proxy(), HTTP_TIMEOUT).expect("connect");
    for i in 0..300 {
        let b = if i % 2 == 0 { &f.a } else { &f.b };
        put_upstreams(admin, &json!({"up_hop": {b.host_port(): ""}}));
        let r = conn
            .request("GET", "hop.test", &format!("/x{i}"), &[], b"")
            .expect("request on the kept connection");
        assert_eq!(
            Echo::of(&r).name(),
            b.name(),
            "change {i} not seen by the next request"
        );
    }
}

/// SPEC 6: a malformed request is answered 400 and nothing goes to a peer.
/// A request-target that is neither a path (origin-form) nor an absolute URI
/// (RFC 9112 3.2; `*` only with OPTIONS) is malformed; nginx answers 400.
#[test]
fn a_target_that_is_not_a_path_is_400() {
    let f = Fixture::new();
    f.set("t.test", to_backend("up_a"));
    for target in ["img/x?q", "^/img/(.*)$", "x"] {
        let r = get(f.proxy(), "t.test", target, &[]);
        assert_eq!(
            r.status,
            400,
            "GET {target} HTTP/1.1 (Host: t.test) answered {} {}",
            r.status,
            r.body_text()
        );
    }
    assert_eq!(f.a.requests(), 0, "a malformed request reached the peer");
    // The well-formed ones still go through.
    assert_eq!(f.to("t.test", "/img/x?q", None), "a");
    let e = f.echo("t.test", "http://t.test/abs?q=1", &[]);
    assert_eq!((e.name(), e.path()), ("a", "/abs?q=1"));
}
