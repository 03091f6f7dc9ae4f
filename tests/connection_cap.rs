//! `[limits] max_connections`: a worker at its cap leaves new connections
//! in the listen backlog (they are not refused, and no descriptor is
//! spent on them) and takes them up as its sessions end; the pause is
//! logged once and counted in `/metrics`. The pool of idle connections to
//! a peer is capped too: past it the oldest are closed, logged once and
//! counted.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::json;

use common::backend::{Backend, admin, put_domains, put_upstreams, to_backend};
use common::{EVENTUALLY, Elb, HTTP_TIMEOUT, HttpConn, TempDir, wait_until};

#[test]
fn a_worker_at_its_cap_leaves_new_clients_waiting_then_serves_them() {
    let dir = TempDir::new("cap");
    let config = dir.write("elb.toml", "[limits]\nmax_connections = 4\n");
    let elb = Elb::builder()
        .workers(1)
        .arg("--config")
        .arg(config.to_string_lossy())
        .start();
    let a = Backend::start("a");
    put_upstreams(elb.admin_addr(), &json!({"web": {a.host_port(): ""}}));
    put_domains(elb.admin_addr(), &json!({"cap.test": to_backend("web")}));
    // Four clients, each served once and kept open.
    let mut held: Vec<HttpConn> = (0..4)
        .map(|_| {
            let mut c = HttpConn::connect(elb.listen_addr(), HTTP_TIMEOUT).expect("connect");
            let r = c
                .request("GET", "cap.test", "/", &[], b"")
                .expect("request");
            assert_eq!(r.status, 200);
            c
        })
        .collect();
    // A fifth: the kernel completes its handshake (the backlog), the
    // worker does not take it.
    let mut fifth = TcpStream::connect(elb.listen_addr()).expect("connect");
    fifth
        .write_all(b"GET / HTTP/1.1\r\nHost: cap.test\r\nConnection: close\r\n\r\n")
        .expect("send");
    fifth
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let waited = fifth.read(&mut byte);
    assert!(
        waited.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "the fifth client was answered at the cap: {waited:?}"
    );
    // One client leaves: the fifth is taken up and answered.
    drop(held.pop());
    fifth.set_read_timeout(Some(HTTP_TIMEOUT)).expect("timeout");
    let mut answer = Vec::new();
    fifth.read_to_end(&mut answer).expect("answer");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        wait_until(EVENTUALLY, || elb
            .stderr()
            .contains("not accepting, at its cap of 4")),
        "{}",
        elb.stderr()
    );
    let metrics = admin(elb.admin_addr(), "GET", "/__erulb__/metrics", None).text;
    let pauses: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("elb_worker_accept_pauses_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(pauses >= 1.0, "{metrics}");
}

/// Idle connections ELB keeps per peer in a worker (`workers/src/pool.rs`).
const POOL_CAP: usize = 256;

/// A peer that answers each request on its connection only once `clients`
/// requests are open at once, so that each took a connection of its own.
fn peer_holding_until(clients: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let all_in = Arc::new(Barrier::new(clients));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let all_in = all_in.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                let mut r = BufReader::new(conn);
                let mut line = String::new();
                let mut first = true;
                // Heads only (GET): until the blank line, then answer.
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        if first {
                            all_in.wait();
                            first = false;
                        }
                        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if w.write_all(ok.as_bytes()).is_err() {
                            return;
                        }
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

#[test]
fn past_the_pool_cap_idle_peer_connections_are_closed_logged_once_and_counted() {
    let clients = POOL_CAP + 20;
    let elb = Elb::builder().workers(1).start();
    let peer = peer_holding_until(clients);
    put_upstreams(elb.admin_addr(), &json!({"web": {peer: ""}}));
    put_domains(elb.admin_addr(), &json!({"pool.test": to_backend("web")}));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let addr = elb.listen_addr();
            std::thread::spawn(move || {
                let mut c = HttpConn::connect(addr, EVENTUALLY).expect("connect");
                c.request("GET", "pool.test", "/", &[], b"")
                    .map(|r| r.status)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("client").expect("answer"), 200);
    }
    let evicted = || -> f64 {
        admin(elb.admin_addr(), "GET", "/__erulb__/metrics", None)
            .text
            .lines()
            .filter(|l| l.starts_with("elb_worker_pool_evictions_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Every connection went back to the pool; those past the cap closed.
    assert!(
        wait_until(EVENTUALLY, || evicted() == (clients - POOL_CAP) as f64),
        "evictions: {}",
        evicted()
    );
    let logged = elb
        .stderr()
        .matches("pool of idle connections is at its cap")
        .count();
    assert_eq!(logged, 1, "{}", elb.stderr());
}
