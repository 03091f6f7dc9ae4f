//! SPEC 6, peer choice: smooth weighted round robin (nginx's algorithm) with
//! one cursor for all workers, `backup` and `down` peers, and pooled
//! keep-alive connections to peers.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use common::backend::{Backend, Echo, get, put_domains, put_upstreams, routed_to, to_backend};
use common::{Elb, HTTP_TIMEOUT, HttpConn};

fn start() -> Elb {
    Elb::builder().workers(2).start()
}

/// Sets upstream `name` to the given (backend, params) peers and a domain
/// `host` whose rule set goes to it.
fn upstream(elb: &Elb, name: &str, host: &str, peers: &[(&Backend, &str)]) {
    let list: Map<String, Value> = peers
        .iter()
        .map(|(b, params)| (b.host_port(), json!(params)))
        .collect();
    put_upstreams(elb.admin_addr(), &json!({ name: list }));
    put_domains(elb.admin_addr(), &json!({ host: to_backend(name) }));
}

/// The backends that answered `n` requests, sent one after the other from
/// one client, each on a new connection (so both workers serve them).
fn sequence(proxy: SocketAddr, host: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| routed_to(proxy, host, "/", None)).collect()
}

fn counts(seq: &[String]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for s in seq {
        *m.entry(s.as_str()).or_insert(0) += 1;
    }
    m
}

/// nginx's smooth weighted round robin (ngx_http_upstream_get_peer): one
/// full period of the peers it picks, for peers in this order.
fn nginx_period(peers: &[(&str, i64)]) -> Vec<String> {
    let total: i64 = peers.iter().map(|p| p.1).sum();
    let mut current = vec![0i64; peers.len()];
    let mut out = Vec::new();
    for _ in 0..total {
        let mut best: Option<usize> = None;
        for (i, (_, w)) in peers.iter().enumerate() {
            current[i] += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best.expect("at least one peer");
        current[b] -= total;
        out.push(peers[b].0.to_string());
    }
    out
}

fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first.clone());
            out.push(p);
        }
    }
    out
}

/// True when `seq` is nginx's sequence for these weights from some point of
/// its period on, for some order of the peers (the order of peers in an
/// upstream is not part of the contract; ties are broken by it).
fn is_nginx_sequence(seq: &[String], peers: &[(&str, i64)]) -> bool {
    permutations(peers).iter().any(|order| {
        let period = nginx_period(order);
        (0..period.len()).any(|start| {
            seq.iter()
                .enumerate()
                .all(|(i, s)| *s == period[(start + i) % period.len()])
        })
    })
}

#[test]
fn weights_1_to_3_are_exact_and_smooth() {
    let elb = start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    upstream(
        &elb,
        "wrr",
        "wrr.test",
        &[(&a, "weight=1"), (&b, "weight=3")],
    );
    let seq = sequence(elb.listen_addr(), "wrr.test", 400);
    let c = counts(&seq);
    assert_eq!(
        (c.get("a").copied(), c.get("b").copied()),
        (Some(100), Some(300)),
        "400 requests over weights 1:3"
    );
    // nginx's period for a:1, b:3 is b a b b (or a rotation of it): in every
    // window of 4 consecutive answers, exactly one is a.
    for (i, w) in seq.windows(4).enumerate() {
        let n = w.iter().filter(|s| *s == "a").count();
        assert_eq!(n, 1, "answers {i}..{}: {w:?} (whole: {seq:?})", i + 4);
    }
    assert!(
        is_nginx_sequence(&seq, &[("a", 1), ("b", 3)]),
        "not nginx's smooth sequence: {seq:?}"
    );
    assert_eq!(a.requests() + b.requests(), 400);
}

#[test]
fn weights_5_1_1_follow_nginx() {
    let elb = start();
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    upstream(
        &elb,
        "five",
        "five.test",
        &[(&a, "weight=5"), (&b, ""), (&c, "weight=1")],
    );
    let seq = sequence(elb.listen_addr(), "five.test", 70);
    let n = counts(&seq);
    assert_eq!(
        (n.get("a"), n.get("b"), n.get("c")),
        (Some(&50), Some(&10), Some(&10)),
        "{seq:?}"
    );
    // nginx's own example: a a b a c a a — never b and c back to back, never
    // more than two a in a row... exactly its sequence, up to peer order.
    assert!(
        is_nginx_sequence(&seq, &[("a", 5), ("b", 1), ("c", 1)]),
        "not nginx's smooth sequence: {seq:?}"
    );
}

/// The cursor is shared: concurrent clients on both workers together get
/// the exact spread.
#[test]
fn the_spread_is_exact_across_workers_and_concurrent_clients() {
    let elb = start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    upstream(
        &elb,
        "conc",
        "conc.test",
        &[(&a, "weight=1"), (&b, "weight=3")],
    );
    let proxy = elb.listen_addr();
    let per_client = 100;
    let all: Vec<String> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|_| s.spawn(move || sequence(proxy, "conc.test", per_client)))
            .collect();
        clients
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    let c = counts(&all);
    assert_eq!(
        (c.get("a").copied(), c.get("b").copied()),
        (Some(100), Some(300)),
        "400 concurrent requests over weights 1:3"
    );
}

#[test]
fn backup_peers_serve_only_when_no_primary_is_available() {
    let elb = start();
    let (p1, p2, bk) = (
        Backend::start("p1"),
        Backend::start("p2"),
        Backend::start("bk"),
    );
    upstream(
        &elb,
        "bu",
        "bu.test",
        &[(&p1, ""), (&p2, ""), (&bk, "backup")],
    );
    let seq = sequence(elb.listen_addr(), "bu.test", 40);
    let c = counts(&seq);
    assert_eq!(
        c.get("bk"),
        None,
        "the backup served with primaries up: {seq:?}"
    );
    assert_eq!(
        (c.get("p1"), c.get("p2")),
        (Some(&20), Some(&20)),
        "{seq:?}"
    );

    // One primary down: the other one serves, still not the backup.
    upstream(
        &elb,
        "bu",
        "bu.test",
        &[(&p1, "down"), (&p2, ""), (&bk, "backup")],
    );
    let seq = sequence(elb.listen_addr(), "bu.test", 20);
    assert_eq!(counts(&seq).get("p2"), Some(&20), "{seq:?}");

    // Every primary down: only the backup.
    upstream(
        &elb,
        "bu",
        "bu.test",
        &[(&p1, "down"), (&p2, "weight=3 down"), (&bk, "backup")],
    );
    let seq = sequence(elb.listen_addr(), "bu.test", 20);
    assert_eq!(counts(&seq).get("bk"), Some(&20), "{seq:?}");

    // Primaries back: the backup gets nothing again.
    let before = bk.requests();
    upstream(
        &elb,
        "bu",
        "bu.test",
        &[(&p1, ""), (&p2, ""), (&bk, "backup")],
    );
    let seq = sequence(elb.listen_addr(), "bu.test", 20);
    assert_eq!(counts(&seq).get("bk"), None, "{seq:?}");
    assert_eq!(bk.requests(), before);

    // Nothing available at all: 502.
    upstream(
        &elb,
        "bu",
        "bu.test",
        &[(&p1, "down"), (&bk, "backup down")],
    );
    let r = get(elb.listen_addr(), "bu.test", "/", &[]);
    assert_eq!(r.status, 502, "{}", r.body_text());
}

#[test]
fn a_down_peer_never_gets_traffic() {
    let elb = start();
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    upstream(
        &elb,
        "dn",
        "dn.test",
        &[(&a, ""), (&b, "weight=5 down"), (&c, "weight=2")],
    );
    let seq = sequence(elb.listen_addr(), "dn.test", 60);
    let n = counts(&seq);
    assert_eq!(
        (n.get("a"), n.get("b"), n.get("c")),
        (Some(&20), None, Some(&40)),
        "{seq:?}"
    );
    assert_eq!(b.connections(), 0, "a down peer was connected to");
}

#[test]
fn peer_connections_are_kept_alive_and_reused() {
    let elb = start();
    let one = Backend::start("one");
    upstream(&elb, "ka", "ka.test", &[(&one, "")]);
    // 200 requests over one client keep-alive connection.
    let mut c = HttpConn::connect(elb.listen_addr(), HTTP_TIMEOUT).expect("connect");
    for i in 0..200 {
        let r = c
            .request("GET", "ka.test", &format!("/{i}"), &[], b"")
            .unwrap_or_else(|e| panic!("request {i} on the kept connection: {e}"));
        assert_eq!(Echo::of(&r).path(), format!("/{i}"));
    }
    assert_eq!(one.requests(), 200);
    assert!(
        one.connections() <= 10,
        "200 requests on one client connection took {} connections to the peer",
        one.connections()
    );

    // New client connections, on both workers: the pools still serve.
    let two = Backend::start("two");
    upstream(&elb, "ka2", "ka2.test", &[(&two, "")]);
    let seq = sequence(elb.listen_addr(), "ka2.test", 100);
    assert!(seq.iter().all(|s| s == "two"));
    assert_eq!(two.requests(), 100);
    assert!(
        two.connections() <= 10,
        "100 requests on new client connections took {} connections to the peer",
        two.connections()
    );
}
