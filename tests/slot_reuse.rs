//! A peer's state slot (its passive-health words in the region) is handed
//! to another peer once every worker has moved past the generation that
//! dropped the first: a request still talking to the removed peer must then
//! never touch the new owner's health.

mod common;

use std::time::Duration;

use serde_json::json;

use common::backend::{put_domains, put_upstreams, to_backend};
use common::peers::{Mode, Peer};
use common::{Elb, HTTP_TIMEOUT, HttpConn, Response, TempDir};

const DOMAIN: &str = "slots.test";
/// Long enough that only the test decides when the slow request ends.
const CONFIG: &str = "[timeouts]\nupstream_read = 60\n";

fn get(elb: &Elb, path: &str) -> Response {
    let mut c = HttpConn::connect(elb.listen_addr(), HTTP_TIMEOUT).expect("connect to elb");
    c.request("GET", DOMAIN, path, &[("Connection", "close")], b"")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// A GET that must be served by `peer`. With one worker, it also proves
/// that the worker applied every generation published before it (a worker
/// applies what was published before it routes a request).
fn served_by(elb: &Elb, peer: &Peer, path: &str) {
    let r = get(elb, path);
    assert_eq!(
        (r.status, r.header("x-peer")),
        (200, Some(peer.name())),
        "GET {path}: {r:?}"
    );
}

#[test]
fn a_request_to_a_removed_peer_never_marks_the_peer_that_took_its_slot() {
    let dir = TempDir::new("slots");
    let config = dir.write("elb.toml", CONFIG);
    // One worker: a request it routes proves what it has applied.
    let elb = Elb::builder()
        .workers(1)
        .arg("--config")
        .arg(config.to_string_lossy().into_owned())
        .start();
    let admin = elb.admin_addr();
    let slow = Peer::start("slow", Mode::Hang);
    let stay = Peer::echo("stay");
    let new = Peer::echo("new");
    let params = "max_fails=1 fail_timeout=10";

    // A fresh region: the upstream's cursor takes slot 0, `slow` slot 1.
    put_upstreams(admin, &json!({"up": {slow.addr().to_string(): params}}));
    put_domains(admin, &json!({DOMAIN: to_backend("up")}));

    // The slow request: `slow` reads it and holds it unanswered.
    let mut held = HttpConn::connect(elb.listen_addr(), Duration::from_secs(30)).expect("connect");
    held.send_request("GET", DOMAIN, "/slow", &[("Connection", "close")], b"")
        .expect("send the slow request");
    assert!(
        slow.wait_requests(1, HTTP_TIMEOUT),
        "the slow peer never got the request"
    );

    // `slow` leaves the upstream (its slot retired); `stay` takes slot 2.
    put_upstreams(admin, &json!({"up": {stay.addr().to_string(): ""}}));
    served_by(&elb, &stay, "/after-removal");
    // Slot 1 is freed by a publish once the worker has applied a generation
    // after the one that dropped `slow`: publish (a domain change), let the
    // worker apply it, and again, until it certainly has.
    for i in 0..3 {
        put_domains(admin, &json!({format!("flush{i}.test"): to_backend("up")}));
        served_by(&elb, &stay, &format!("/flush{i}"));
    }
    // `new` replaces `stay`: the only free slot is slot 1, so `new` gets it
    // (`stay`'s slot is retired, not free yet).
    put_upstreams(admin, &json!({"up": {new.addr().to_string(): params}}));
    served_by(&elb, &new, "/new-in-place");

    // Now the slow request fails: `slow` closes without answering.
    drop(slow);
    match held.read_response() {
        Ok(r) => println!(
            "the slow request was answered {} ({:?})",
            r.status,
            r.header("x-peer")
        ),
        Err(e) => println!("the slow request got no answer: {e}"),
    }

    // `new` never failed: every request goes on to it.
    for i in 0..10 {
        let r = get(&elb, &format!("/later{i}"));
        assert_eq!(
            (r.status, r.header("x-peer")),
            (200, Some(new.name())),
            "GET /later{i} after the removed peer's request failed: the failure was counted \
             against the peer now in its slot ({r:?})"
        );
    }
}
