//! SPEC 4 and `[admin_limits]` (SPEC 2): access to the admin API is decided
//! from the request head alone, admin bodies and admin connections are
//! capped, on `--admin` and on a proxy listener's `/__erulb__/` path.

mod common;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::backend::{admin_raw, answer};
use common::{Elb, HttpConn, Response, TempDir, server_unread_bytes};

const DOMAIN: &str = "/__erulb__/domain";
const UPSTREAM: &str = "/__erulb__/upstream";

/// What a refused client declares it will send.
const DECLARED: usize = 60_000_000;
/// How long a client waits for an answer that must come without its body;
/// generous for a loaded machine: only a broken build waits this long.
const ANSWER_DEADLINE: Duration = Duration::from_secs(15);

/// An elb whose allow list excludes 127.0.0.1: the tests' clients are
/// outside it, and only the token lets them in.
fn outsiders_elb(config: Option<&str>) -> (Elb, Option<TempDir>) {
    let mut b = Elb::builder()
        .workers(1)
        .env("ELB_ADMIN_ALLOW", "10.0.0.0/8")
        .env("ELB_ADMIN_TOKEN", "secret");
    let mut dir = None;
    if let Some(text) = config {
        let d = TempDir::new("admin-limits");
        let f = d.write("elb.toml", text);
        b = b.arg("--config").arg(f.to_str().expect("utf-8 path"));
        dir = Some(d);
    }
    (b.start(), dir)
}

fn put_head(extra: &str, length: usize) -> String {
    format!(
        "PUT {DOMAIN} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n{extra}\r\n"
    )
}

/// The first response on `c` (a 1xx counts).
fn first_response(c: &mut HttpConn, what: &str) -> Response {
    c.read_response()
        .unwrap_or_else(|e| panic!("{what}: no answer within {ANSWER_DEADLINE:?}: {e}"))
}

#[test]
fn a_refused_client_gets_403_without_100_continue_and_without_sending_its_body() {
    let (elb, _dir) = outsiders_elb(None);
    for addr in [elb.admin_addr(), elb.listen_addr()] {
        let mut c = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect");
        c.send(put_head("Expect: 100-continue\r\n", DECLARED).as_bytes())
            .expect("send the head");
        let r = first_response(&mut c, &format!("PUT head with Expect via {addr}"));
        assert_eq!(
            r.status,
            403,
            "via {addr}: a client outside ELB_ADMIN_ALLOW, without the token, sent a head \
             declaring {DECLARED} bytes with Expect: 100-continue and got {} {} first \
             (want 403, no 100 Continue): {}",
            r.status,
            r.reason,
            r.body_text()
        );
        assert!(
            c.closed_by_peer(),
            "via {addr}: the connection stayed open after the 403"
        );
    }
}

#[test]
fn a_refused_client_is_answered_after_a_few_kb_of_its_body() {
    let (elb, _dir) = outsiders_elb(None);
    let sent = 8 << 10;
    for addr in [elb.admin_addr(), elb.listen_addr()] {
        let mut c = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect");
        c.send(put_head("", DECLARED).as_bytes())
            .expect("send the head");
        c.send(&vec![b' '; sent]).expect("send the first bytes");
        let r = first_response(
            &mut c,
            &format!("via {addr}, after {sent} of {DECLARED} declared body bytes"),
        );
        assert_eq!(
            r.status,
            403,
            "via {addr}: after {sent} of {DECLARED} body bytes: {} {}",
            r.status,
            r.body_text()
        );
    }
}

/// VmHWM (peak resident set) of a process, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc/PID/status")
}

/// Sends a head declaring [`DECLARED`] bytes, then streams the body until
/// the server stops taking it, while reading the answer. Returns the status
/// and how many body bytes were written.
fn stream_refused_body(addr: SocketAddr) -> (u16, usize) {
    // Long enough for the unfixed master to swallow every byte.
    let mut c = HttpConn::connect(addr, Duration::from_secs(120)).expect("connect");
    c.send(put_head("", DECLARED).as_bytes())
        .expect("send the head");
    let mut w = c.stream().try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 << 10];
        let mut sent = 0;
        while sent < DECLARED {
            let n = chunk.len().min(DECLARED - sent);
            if w.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n;
        }
        sent
    });
    let status = c.read_response().map_or(0, |r| r.status);
    // The answer is in: stop sending (a writer still blocked gets an error).
    let _ = c.stream().shutdown(std::net::Shutdown::Both);
    (status, writer.join().expect("writer"))
}

#[test]
fn refused_bodies_do_not_grow_the_master() {
    let (elb, _dir) = outsiders_elb(None);
    let addr = elb.admin_addr();
    let before = peak_rss(elb.pid());
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || stream_refused_body(addr)))
        .collect();
    let results: Vec<(u16, usize)> = clients
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect();
    let after = peak_rss(elb.pid());
    let grown = after.saturating_sub(before);
    eprintln!(
        "master peak RSS {} kB -> {} kB (+{} kB); body bytes written per client: {:?}",
        before >> 10,
        after >> 10,
        grown >> 10,
        results.iter().map(|r| r.1).collect::<Vec<_>>()
    );
    for (status, sent) in &results {
        assert_eq!(
            *status, 403,
            "a refused client got {status} after {sent} bytes"
        );
    }
    assert!(
        grown < 32 << 20,
        "8 refused clients declaring {DECLARED} bytes each raised the master's peak RSS by \
         {} MB ({} kB -> {} kB)",
        grown >> 20,
        before >> 10,
        after >> 10
    );
}

/// Sends `body` chunked in 256-byte chunks, with the token, and returns
/// the first answer (a 1xx counts).
fn put_chunked(addr: SocketAddr, body: &[u8]) -> Response {
    let mut c = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect");
    let mut req = format!(
        "PUT {DOMAIN} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer secret\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for part in body.chunks(256) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The server may stop reading at the limit and close: what it answered
    // before that is what counts.
    let _ = c.send(&req);
    first_response(
        &mut c,
        &format!("chunked PUT of {} bytes via {addr}", body.len()),
    )
}

/// A valid `PUT /__erulb__/domain` body of at least `len` bytes.
fn domains_body(len: usize) -> Vec<u8> {
    let mut sets = serde_json::Map::new();
    let mut i = 0;
    while serde_json::to_vec(&sets).expect("json").len() < len {
        sets.insert(
            format!("d{i}.limits.test"),
            serde_json::json!({"init": "b", "rules": {"b": {"type": "backend", "args": {"servername": "u"}}}}),
        );
        i += 1;
    }
    serde_json::to_vec(&sets).expect("json")
}

#[test]
fn an_admin_body_over_max_body_size_is_413() {
    let (elb, _dir) = outsiders_elb(Some("[admin_limits]\nmax_body_size = \"1k\"\n"));
    let bearer = [("Authorization", "Bearer secret")];
    for addr in [elb.admin_addr(), elb.listen_addr()] {
        // Under the limit: served, whole or chunked.
        let small = domains_body(300);
        assert!(small.len() < 1024);
        let r = admin_raw(addr, "PUT", DOMAIN, &bearer, &small);
        assert_eq!(
            r.status,
            200,
            "PUT of {} bytes via {addr}: {}",
            small.len(),
            r.text
        );
        let r = answer(put_chunked(addr, &small));
        assert_eq!(
            r.status,
            200,
            "chunked PUT of {} bytes via {addr}: {}",
            small.len(),
            r.text
        );

        // Declared over the limit: 413 at once, no 100 Continue.
        let mut c = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect");
        c.send(
            put_head(
                "Authorization: Bearer secret\r\nExpect: 100-continue\r\n",
                2048,
            )
            .as_bytes(),
        )
        .expect("send the head");
        let r = first_response(&mut c, &format!("PUT head of 2048 bytes via {addr}"));
        assert_eq!(
            r.status,
            413,
            "via {addr}: a head declaring 2048 bytes (max_body_size 1k), with the token and \
             Expect: 100-continue, got {} {} first: {}",
            r.status,
            r.reason,
            r.body_text()
        );

        // Chunked past the limit: 413.
        let big = domains_body(4096);
        let r = answer(put_chunked(addr, &big));
        assert_eq!(
            r.status,
            413,
            "chunked PUT of {} bytes via {addr} (max_body_size 1k): {}",
            big.len(),
            r.text
        );
    }
}

#[test]
fn connections_over_max_connections_wait_until_one_ends() {
    let (elb, _dir) = outsiders_elb(Some("[admin_limits]\nmax_connections = 2\n"));
    let addr = elb.admin_addr();
    let get = |c: &mut HttpConn, who: &str| -> Response {
        c.request(
            "GET",
            "localhost",
            UPSTREAM,
            &[("Authorization", "Bearer secret")],
            b"",
        )
        .unwrap_or_else(|e| panic!("GET on {who}: {e}"))
    };
    let mut first = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect 1");
    let mut second = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect 2");
    assert_eq!(get(&mut first, "the first connection").status, 200);
    assert_eq!(get(&mut second, "the second connection").status, 200);
    let mut third = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect 3");
    third
        .send_request(
            "GET",
            "localhost",
            UPSTREAM,
            &[("Authorization", "Bearer secret")],
            b"",
        )
        .expect("send on the third connection");
    // The two open connections are served after the third asked...
    assert_eq!(get(&mut first, "the first connection").status, 200);
    assert_eq!(get(&mut second, "the second connection").status, 200);
    // ...and the third is not: its request is still unread, nothing came.
    let unread = server_unread_bytes(addr, third.local_addr());
    assert!(
        unread.is_some_and(|n| n > 0),
        "with max_connections = 2 and two connections open, a third one's request was read \
         by the master (unread bytes on its side: {unread:?})"
    );
    third.stream().set_nonblocking(true).expect("nonblocking");
    let mut b = [0u8; 1];
    let peeked = third.stream().peek(&mut b);
    assert!(
        matches!(&peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "the third connection got something while two were open: {peeked:?}"
    );
    third.stream().set_nonblocking(false).expect("blocking");
    drop(first);
    // Its read timeout is the deadline.
    let r = third
        .read_response()
        .expect("the third connection was not served after the first closed");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(get(&mut second, "the second connection").status, 200);
}

#[test]
fn a_client_dribbling_its_head_cannot_hold_an_admin_connection_slot() {
    let (elb, _dir) = outsiders_elb(Some(
        "[admin_limits]\nmax_connections = 1\n[timeouts]\nclient_header = 1\n",
    ));
    let addr = elb.admin_addr();
    // One byte of a head every 100 ms, for at most 30 s: each read succeeds,
    // so only a deadline on the whole head lets the slot go.
    let mut slow = std::net::TcpStream::connect(addr).expect("connect the slow client");
    let dribbler = std::thread::spawn(move || {
        let head = format!("GET {UPSTREAM} HTTP/1.1\r\nHost: localhost\r\nX-Pad: ");
        let bytes = head.bytes().chain(std::iter::repeat(b'a'));
        for b in bytes.take(300) {
            if slow.write_all(&[b]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    let mut c = HttpConn::connect(addr, ANSWER_DEADLINE).expect("connect");
    let r = c
        .request(
            "GET",
            "localhost",
            UPSTREAM,
            &[("Authorization", "Bearer secret")],
            b"",
        )
        .expect(
            "with max_connections = 1, a client dribbling its head kept the only slot \
             past client_header",
        );
    assert_eq!(r.status, 200, "{}", r.body_text());
    let cut_off = dribbler.join().expect("dribbler");
    assert!(cut_off, "the dribbling client was never disconnected");
}
