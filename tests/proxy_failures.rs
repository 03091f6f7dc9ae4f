//! SPEC 6, proxying when peers fail: passive health shared by every worker,
//! retries (which requests, how many, on which peers), 502 and 504, stale
//! pooled connections, and a graceful stop with a request in flight.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::peers::{DOMAIN, Mode, Peer, Proxy, pattern, worker_holding};
use common::{EVENTUALLY, HttpConn, Response, free_addr, wait_until};

const CONFIG: &str = "[timeouts]\nconnect = 1\nupstream_read = 2\n\n[upstream]\ntries = 3\n";
/// Client timeouts and waits: only against waiting forever.
const T: Duration = EVENTUALLY;

fn peer_name(r: &Response) -> &str {
    r.header("x-peer").unwrap_or("(elb)")
}

/// GETs on a kept-alive connection and on new ones; every one must be 200
/// from `live`.
fn gets_all_served_by(proxy: &Proxy, live: &Peer, n: usize, what: &str) {
    let mut kept = proxy.conn(T);
    for i in 0..n {
        let r = if i % 2 == 0 {
            kept.request("GET", DOMAIN, &format!("/k{i}"), &[], b"")
        } else {
            proxy.request("GET", &format!("/n{i}"), &[], b"")
        }
        .unwrap_or_else(|e| panic!("{what}: GET {i}: {e}"));
        assert_eq!(r.status, 200, "{what}: GET {i}: {r:?}");
        assert_eq!(peer_name(&r), live.name(), "{what}: GET {i}");
    }
}

#[test]
fn a_dead_peer_never_makes_a_get_fail_while_another_is_up() {
    let live = Peer::echo("live");
    let proxy = Proxy::start(CONFIG);
    // Connection refused: out after one failure.
    proxy.route_to(&[
        (free_addr(), "max_fails=1 fail_timeout=10"),
        (live.addr(), "max_fails=1 fail_timeout=10"),
    ]);
    gets_all_served_by(&proxy, &live, 50, "refusing peer, max_fails=1");

    // Never taken out (max_fails=0): a refusing peer and one that closes
    // every connection unanswered stay in the rotation, and each GET that
    // meets them is tried again.
    let door = Peer::start("door", Mode::CloseAll);
    proxy.route_to(&[
        (free_addr(), "max_fails=0"),
        (door.addr(), "max_fails=0"),
        (live.addr(), "max_fails=0"),
    ]);
    gets_all_served_by(&proxy, &live, 50, "failing peers, max_fails=0");
    assert!(
        door.dropped() >= 10,
        "the failing peer got only {} of 50 GETs: were they tried there at all?",
        door.dropped()
    );
}

/// Opens connections to elb until two of them are held by different
/// workers (seen in /proc); returns those two.
fn one_connection_per_worker(proxy: &Proxy) -> (HttpConn, HttpConn) {
    let workers = proxy.elb.wait_workers(2, T);
    let mut first: Option<(i32, HttpConn)> = None;
    for _ in 0..200 {
        let c = proxy.conn(T);
        let client = c.local_addr();
        let mut holder = None;
        wait_until(T, || {
            holder = worker_holding(&workers, proxy.addr(), client);
            holder.is_some()
        });
        let w = holder.unwrap_or_else(|| panic!("no worker of {workers:?} holds {client}"));
        match first.take() {
            None => first = Some((w, c)),
            Some((fw, fc)) if fw != w => return (fc, c),
            kept => first = kept,
        }
    }
    panic!("200 connections, all taken by one worker");
}

#[test]
fn one_failure_takes_a_peer_out_for_every_worker() {
    let bad = Peer::echo("bad");
    bad.set_status(500);
    let good = Peer::echo("good");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[
        (bad.addr(), "max_fails=1 fail_timeout=30"),
        (good.addr(), "max_fails=1 fail_timeout=30"),
    ]);
    let (mut first, mut second) = one_connection_per_worker(&proxy);
    // On one worker, until the round robin has sent a GET to the bad peer
    // (it is retried on the good one).
    for i in 0..4 {
        let r = first
            .request("GET", DOMAIN, &format!("/first{i}"), &[], b"")
            .expect("GET on the first worker");
        assert_eq!((r.status, peer_name(&r)), (200, "good"), "{r:?}");
        if bad.requests() > 0 {
            break;
        }
    }
    assert_eq!(
        bad.requests(),
        1,
        "the round robin never picked the bad peer"
    );
    // The other worker must not try it again, nor the first.
    for i in 0..20 {
        let (c, which) = if i % 2 == 0 {
            (&mut second, "other")
        } else {
            (&mut first, "same")
        };
        let r = c
            .request("GET", DOMAIN, &format!("/after{i}"), &[], b"")
            .unwrap_or_else(|e| panic!("GET {i} on the {which} worker: {e}"));
        assert_eq!((r.status, peer_name(&r)), (200, "good"), "{r:?}");
        assert_eq!(
            bad.requests(),
            1,
            "after one failure the peer got another request (GET {i}, {which} worker)"
        );
    }
}

#[test]
fn a_peer_taken_out_comes_back_after_fail_timeout() {
    let bad = Peer::echo("bad");
    bad.set_status(503);
    let good = Peer::echo("good");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[
        (bad.addr(), "max_fails=1 fail_timeout=1"),
        (good.addr(), "max_fails=1 fail_timeout=1"),
    ]);
    let mut c = proxy.conn(T);
    // Taken before the GET that fails on the bad peer, so before it is out:
    // the time since then is at least the time it has been out.
    let mut out_at = Instant::now();
    for _ in 0..4 {
        out_at = Instant::now();
        let r = c.request("GET", DOMAIN, "/x", &[], b"").expect("GET");
        assert_eq!((r.status, peer_name(&r)), (200, "good"), "{r:?}");
        if bad.requests() > 0 {
            break;
        }
    }
    assert_eq!(
        bad.requests(),
        1,
        "the round robin never picked the bad peer"
    );
    bad.set_status(0);
    // Poll with GETs: while it is out the bad peer sees none; once
    // fail_timeout has passed it gets its share again.
    let back = wait_until(T, || {
        let r = c.request("GET", DOMAIN, "/poll", &[], b"").expect("GET");
        assert_eq!(r.status, 200, "{r:?}");
        bad.requests() > 1
    });
    let took = out_at.elapsed();
    eprintln!("the peer was used again {took:?} after the GET that took it out (fail_timeout=1)");
    assert!(
        back,
        "the peer was not used again within {took:?} (fail_timeout=1)"
    );
    // Not before fail_timeout (less a margin for elb's coarse clock).
    assert!(
        took >= Duration::from_millis(900),
        "the peer was used again after {took:?}, before fail_timeout=1 ran out"
    );
}

#[test]
fn a_get_answered_with_a_failure_status_is_retried_on_the_other_peer() {
    let bad = Peer::echo("bad");
    bad.set_status(500);
    let good = Peer::echo("good");
    let proxy = Proxy::start(CONFIG);
    // max_fails=0: the bad peer stays in the rotation, so that many
    // requests meet it.
    proxy.route_to(&[(bad.addr(), "max_fails=0"), (good.addr(), "max_fails=0")]);
    let mut c = proxy.conn(T);
    for method in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"] {
        let before = bad.count_method(method);
        for i in 0..4 {
            let r = c
                .request(method, DOMAIN, &format!("/r{i}"), &[], b"")
                .expect("answer");
            assert_eq!(
                (r.status, peer_name(&r)),
                (200, "good"),
                "{method} {i} was not retried: {r:?}"
            );
        }
        assert!(
            bad.count_method(method) > before,
            "no {method} reached the bad peer"
        );
    }
}

#[test]
fn a_post_patch_or_lock_that_reached_a_peer_is_not_retried() {
    let bad = Peer::echo("bad");
    bad.set_status(500);
    let good = Peer::echo("good");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[(bad.addr(), "max_fails=0"), (good.addr(), "max_fails=0")]);
    let mut c = proxy.conn(T);
    for method in ["POST", "PATCH", "LOCK"] {
        let mut hits = 0;
        for i in 0..8 {
            let (bad_before, good_before) = (bad.count_method(method), good.count_method(method));
            let r = c
                .request(method, DOMAIN, &format!("/w{i}"), &[], b"payload")
                .expect("answer");
            let (bad_after, good_after) = (bad.count_method(method), good.count_method(method));
            if bad_after > bad_before {
                hits += 1;
                assert_eq!(
                    (r.status, peer_name(&r)),
                    (500, "bad"),
                    "{method} that reached the bad peer: {r:?}"
                );
                assert_eq!(
                    good_after, good_before,
                    "a {method} that reached a peer was sent again to another"
                );
            } else {
                assert_eq!((r.status, peer_name(&r)), (200, "good"), "{r:?}");
            }
        }
        assert!(hits >= 2, "{method}: only {hits} of 8 reached the bad peer");
    }
}

#[test]
fn a_post_that_reached_no_peer_is_retried() {
    let good = Peer::echo("good");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[(free_addr(), "max_fails=0"), (good.addr(), "max_fails=0")]);
    let mut c = proxy.conn(T);
    for i in 0..10 {
        let body = pattern(1000 + i);
        let r = c.request("POST", DOMAIN, "/p", &[], &body).expect("answer");
        assert_eq!(
            (r.status, peer_name(&r)),
            (200, "good"),
            "POST {i} with the other peer refusing connections: {r:?}"
        );
    }
    assert_eq!(good.count_method("POST"), 10);
}

#[test]
fn an_invalid_answer_is_a_failure_tried_elsewhere_or_502() {
    let garbage = Peer::start("garbage", Mode::Garbage);
    let good = Peer::echo("good");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[
        (garbage.addr(), "max_fails=0"),
        (good.addr(), "max_fails=0"),
    ]);
    let mut c = proxy.conn(T);
    for i in 0..6 {
        let r = c
            .request("GET", DOMAIN, &format!("/g{i}"), &[], b"")
            .expect("answer");
        assert_eq!((r.status, peer_name(&r)), (200, "good"), "{r:?}");
    }
    assert!(garbage.dropped() >= 2, "the invalid peer was not tried");
    // Alone, it gets the client a 502.
    proxy.route_to(&[(garbage.addr(), "max_fails=0")]);
    let r = proxy.request("GET", "/alone", &[], b"").expect("answer");
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        !r.body_text().contains("not http"),
        "the invalid answer was passed on: {r:?}"
    );
}

#[test]
fn with_every_peer_out_the_answer_is_502_without_a_try() {
    let a = Peer::echo("a");
    let b = Peer::echo("b");
    a.set_status(500);
    b.set_status(500);
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[
        (a.addr(), "max_fails=1 fail_timeout=30"),
        (b.addr(), "max_fails=1 fail_timeout=30"),
    ]);
    // Both fail this GET, and both are out.
    let r = proxy.request("GET", "/first", &[], b"").expect("answer");
    assert!(matches!(r.status, 500 | 502), "{r:?}");
    assert_eq!(
        (a.requests(), b.requests()),
        (1, 1),
        "the GET was not tried on both peers"
    );
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        let r = proxy
            .request("GET", &format!("/then{i}"), &[], b"")
            .expect("answer");
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 502, "no live peer: {r:?}");
    }
    eprintln!("502 with every peer out: slowest answer {slowest:?}");
    assert_eq!(
        (a.requests(), b.requests()),
        (1, 1),
        "a peer that is out was tried"
    );
}

#[test]
fn at_most_3_tries() {
    let peers: Vec<Peer> = (0..4)
        .map(|i| {
            let p = Peer::echo(&format!("p{i}"));
            p.set_status(502);
            p
        })
        .collect();
    let proxy = Proxy::start(CONFIG);
    let list: Vec<(SocketAddr, &str)> = peers.iter().map(|p| (p.addr(), "max_fails=0")).collect();
    proxy.route_to(&list);
    let counts = || peers.iter().map(Peer::requests).collect::<Vec<_>>();
    let mut c = proxy.conn(T);
    for i in 0..3 {
        let before = counts();
        let r = c
            .request("GET", DOMAIN, &format!("/t{i}"), &[], b"")
            .expect("answer");
        assert_eq!(r.status, 502, "{r:?}");
        let after = counts();
        let hit: Vec<usize> = (0..4).filter(|&k| after[k] != before[k]).collect();
        let total: usize = after.iter().sum::<usize>() - before.iter().sum::<usize>();
        assert_eq!(
            total, 3,
            "GET {i}: {total} tries (before {before:?}, after {after:?})"
        );
        assert_eq!(
            hit.len(),
            3,
            "GET {i}: a peer was tried twice (before {before:?}, after {after:?})"
        );
    }
}

#[test]
fn a_hung_peer_gives_504_after_upstream_read() {
    let hung = Peer::start("hung", Mode::Hang);
    let proxy = Proxy::start("[timeouts]\nconnect = 1\nupstream_read = 1\n");
    proxy.route_to(&[(hung.addr(), "max_fails=1 fail_timeout=1")]);
    let mut c = proxy.conn(T);
    let started = Instant::now();
    let r = c
        .request("GET", DOMAIN, "/slow", &[("Connection", "close")], b"")
        .expect("an answer");
    let took = started.elapsed();
    eprintln!("504 after {took:?} with upstream_read = 1");
    assert_eq!(r.status, 504, "{r:?}");
    // Not before upstream_read (less a margin for elb's coarse clock).
    assert!(
        took >= Duration::from_millis(900),
        "504 after {took:?}, before upstream_read = 1 ran out"
    );
    assert_eq!(hung.requests(), 1);

    // With a live peer beside it, a GET that meets a hung peer goes on
    // there. (Another hung peer: the first is out for its fail_timeout.)
    let hung2 = Peer::start("hung2", Mode::Hang);
    let live = Peer::echo("live");
    proxy.route_to(&[(hung2.addr(), "max_fails=0"), (live.addr(), "max_fails=0")]);
    let mut c = proxy.conn(T);
    for i in 0..2 {
        let r = c
            .request("GET", DOMAIN, &format!("/h{i}"), &[], b"")
            .expect("answer");
        assert_eq!((r.status, peer_name(&r)), (200, "live"), "{r:?}");
    }
    // One or both GETs met it first (retries move the shared cursor too).
    assert!(hung2.requests() >= 1, "the hung peer was never tried");
}

#[test]
fn a_stale_pooled_connection_is_no_error_even_with_a_single_peer() {
    // The peer answers the first request of a connection and closes when a
    // second one comes on it: every reuse of a pooled connection meets a
    // connection the peer has closed.
    let peer = Peer::start("stale", Mode::CloseReused);
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[(peer.addr(), "max_fails=1 fail_timeout=10")]);
    let mut c = proxy.conn(T);
    for i in 0..10 {
        let r = c
            .request("GET", DOMAIN, &format!("/s{i}"), &[], b"")
            .unwrap_or_else(|e| panic!("GET {i}: {e}"));
        assert_eq!((r.status, peer_name(&r)), (200, "stale"), "GET {i}: {r:?}");
    }
    assert!(
        peer.dropped() >= 1,
        "no pooled connection was reused: the test proved nothing"
    );
    // Not a failure: the peer is still in.
    let r = proxy.request("GET", "/still", &[], b"").expect("answer");
    assert_eq!(r.status, 200, "{r:?}");

    // A peer that closes connections idle for 150 ms. (A new client
    // connection after the change of upstream: this test is not about how
    // soon a kept-alive one sees it.)
    let idle = Peer::start("idle", Mode::IdleClose(Duration::from_millis(150)));
    proxy.route_to(&[(idle.addr(), "max_fails=1 fail_timeout=10")]);
    let mut c = proxy.conn(T);
    for i in 0..3 {
        let r = c
            .request("GET", DOMAIN, &format!("/i{i}"), &[], b"")
            .unwrap_or_else(|e| panic!("GET {i}: {e}"));
        assert_eq!((r.status, peer_name(&r)), (200, "idle"), "GET {i}: {r:?}");
        assert!(
            wait_until(T, || idle.idle_closed() > i),
            "the peer did not close its idle connection"
        );
    }
    let r = c.request("GET", DOMAIN, "/last", &[], b"").expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn sigterm_lets_a_request_at_a_slow_peer_finish_then_exits_0() {
    let slow = Peer::echo("slow");
    let mut proxy = Proxy::start("[timeouts]\nupstream_read = 5\n");
    proxy.route_to(&[(slow.addr(), "")]);
    let workers = proxy.elb.wait_workers(2, T);
    let mut c = proxy.conn(T);
    c.send_request(
        "GET",
        DOMAIN,
        "/slow",
        &[("X-Reply-Delay-Ms", "1000"), ("X-Reply-Bytes", "300000")],
        b"",
    )
    .expect("send");
    assert!(
        slow.wait_requests(1, T),
        "the request did not reach the peer"
    );
    let sent = Instant::now();
    proxy.elb.signal(Signal::SIGTERM);
    let r = c
        .read_response()
        .expect("the in-flight request is answered after SIGTERM");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body == pattern(300_000), "the answer was cut or garbled");
    let status = proxy.elb.wait_exit(T);
    let took = sent.elapsed();
    eprintln!("SIGTERM: elb exited ({status:?}) after {took:?}");
    let status = status.unwrap_or_else(|| panic!("elb still runs {took:?} after SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(
        wait_until(T, || workers.iter().all(|&w| !common::pid_alive(w))),
        "workers left after SIGTERM"
    );
}
