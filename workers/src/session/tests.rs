//! The session's state machine, driven by a real worker on loopback.

use std::sync::Mutex;
use std::thread::ThreadId;

/// States entered, by the thread whose worker entered them.
static TRACE: Mutex<Vec<(ThreadId, &'static str)>> = Mutex::new(Vec::new());

pub(super) fn trace(state: &'static str) {
    if let Ok(mut t) = TRACE.lock() {
        t.push((std::thread::current().id(), state));
    }
}

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::testing::{
    TestWorker, answer_each, args, ask, backend, closed, hang_up, proxy_to, read_head,
    refusing_addr,
};

/// The states `worker`'s thread entered so far, in order.
fn states(worker: &TestWorker) -> Vec<&'static str> {
    TRACE
        .lock()
        .map(|t| {
            t.iter()
                .filter(|(id, _)| *id == worker.thread_id)
                .map(|(_, s)| *s)
                .collect()
        })
        .unwrap_or_default()
}

const GET: &str = "GET /a?b=1 HTTP/1.1\r\nHost: app.test\r\n\r\n";

#[test]
fn a_request_is_proxied_and_its_answer_relayed() {
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let record = seen.clone();
    let peer = backend(move |mut conn| {
        let head = read_head(&mut conn);
        if let Ok(mut s) = record.lock() {
            *s = head;
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello");
    });
    let (worker, mut client) = proxy_to(args(), &[peer]);
    let answer = ask(&mut client, GET);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, b"hello");
    assert!(answer.head.contains("X-Up: 1\r\n"), "{}", answer.head);
    assert!(answer.head.contains("Connection: keep-alive\r\n"));
    let sent = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(sent.starts_with("GET /a?b=1 HTTP/1.1\r\n"), "{sent}");
    assert!(sent.contains("X-Real-IP: 127.0.0.1\r\n"), "{sent}");
    assert_eq!(
        states(&worker),
        [
            "connecting",
            "sending",
            "relaying",
            "draining",
            "reading_head"
        ]
    );
    drop(client);
    assert!(worker.stop(), "a graceful stop ends the loop without error");
}

#[test]
fn a_peer_that_closes_in_its_answer_head_is_a_502_and_the_client_is_kept() {
    let peer = backend(|mut conn| {
        read_head(&mut conn);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Le");
        hang_up(&conn);
    });
    let (worker, mut client) = proxy_to(args(), &[peer]);
    let answer = ask(&mut client, GET);
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(states(&worker), ["connecting", "sending", "reading_head"]);
    // The request had no body left unread: the connection goes on.
    assert_eq!(ask(&mut client, GET).status, 502);
}

#[test]
fn a_peer_that_closes_in_its_answer_body_cuts_the_client_off() {
    let peer = backend(|mut conn| {
        read_head(&mut conn);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        hang_up(&conn);
    });
    let (worker, mut client) = proxy_to(args(), &[peer]);
    client.write_all(GET.as_bytes()).expect("send");
    let mut got = Vec::new();
    let _ = client.read_to_end(&mut got);
    // The close is all that tells the client; what was queued for it
    // before may or may not have gone out first.
    let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: keep-alive\r\n\r\nabc";
    assert!(
        whole.starts_with(&got),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(states(&worker), ["connecting", "sending", "relaying"]);
}

#[test]
fn a_refused_connection_goes_to_the_next_peer() {
    let good = backend(|conn| answer_each(conn, "second"));
    // The first peer is picked first.
    let (worker, mut client) = proxy_to(args(), &[refusing_addr(), good]);
    let answer = ask(&mut client, GET);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, b"second");
    assert_eq!(
        states(&worker),
        [
            "connecting",
            "connecting",
            "sending",
            "relaying",
            "draining",
            "reading_head"
        ]
    );
}

#[test]
fn a_peer_that_closes_without_answering_a_post_is_not_retried() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let closing = backend(move |mut conn| {
        counted.fetch_add(1, Ordering::SeqCst);
        read_head(&mut conn);
        let mut body = [0u8; 2];
        let _ = conn.read_exact(&mut body);
        hang_up(&conn);
    });
    let good = backend(|conn| answer_each(conn, "second"));
    let (worker, mut client) = proxy_to(args(), &[closing, good]);
    let post = "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi";
    let answer = ask(&mut client, post);
    assert_eq!(answer.status, 502, "it reached the peer: {answer:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(states(&worker), ["connecting", "sending", "reading_head"]);
}

#[test]
fn a_declared_body_over_the_limit_is_a_413_before_any_peer() {
    let mut a = args();
    a.limits.client_max_body_size = 10;
    let (worker, mut client) = proxy_to(a, &[refusing_addr()]);
    let answer = ask(
        &mut client,
        "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 11\r\n\r\n",
    );
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(states(&worker), ["closing"]);
    assert!(closed(&mut client));
}

#[test]
fn a_chunked_body_that_grows_over_the_limit_is_a_413() {
    let peer = backend(|mut conn| {
        let _ = conn.read_to_end(&mut Vec::new());
    });
    let mut a = args();
    a.limits.client_max_body_size = 10;
    let (worker, mut client) = proxy_to(a, &[peer]);
    let answer = ask(
        &mut client,
        "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
    );
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(states(&worker), ["connecting", "sending", "closing"]);
    assert!(closed(&mut client));
}

#[test]
fn a_peer_that_keeps_the_answer_back_is_a_504() {
    let peer = backend(|mut conn| {
        read_head(&mut conn);
        // Holds the connection until the worker gives up on it.
        let _ = conn.read_to_end(&mut Vec::new());
    });
    let mut a = args();
    a.timeouts.upstream_read_ms = 200;
    let (worker, mut client) = proxy_to(a, &[peer]);
    let answer = ask(&mut client, GET);
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(states(&worker), ["connecting", "sending", "reading_head"]);
}

#[test]
fn an_upgrade_answered_with_101_becomes_a_tunnel() {
    let peer = backend(|mut conn| {
        read_head(&mut conn);
        let _ = conn.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        );
        let mut buf = [0u8; 4];
        if conn.read_exact(&mut buf).is_ok() {
            let _ = conn.write_all(&buf);
        }
    });
    let (worker, mut client) = proxy_to(args(), &[peer]);
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .expect("send");
    let head = read_head(&mut client);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Connection: upgrade\r\n"), "{head}");
    client.write_all(b"ping").expect("tunnel");
    let mut echo = [0u8; 4];
    client.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");
    // The peer closed after its echo: so does the tunnel.
    assert!(closed(&mut client));
    assert_eq!(
        states(&worker),
        ["connecting", "sending", "tunnel", "draining", "closing"]
    );
}

#[test]
fn an_unknown_host_is_answered_here_and_the_connection_kept() {
    let worker = TestWorker::start(args());
    let mut client = worker.connect();
    let answer = ask(&mut client, "GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n");
    assert_eq!(answer.status, 404);
    let answer = ask(&mut client, "GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n");
    assert_eq!(answer.status, 404);
}
