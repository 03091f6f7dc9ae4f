//! SPEC 6, proxying, against clients that break the rules: malformed and
//! oversized heads, request-smuggling framings, bodies over the limit,
//! slowloris, clients that vanish mid-request, and seeded random bytes.
//! After each group the workers are the same processes and a normal request
//! still works.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::EVENTUALLY;
use common::peers::{
    DOMAIN, Peer, Proxy, Reply, Rng, chunked, first_reply, pattern, read_until_close, show,
};

/// Short client timeouts, so that what hangs is cut off within seconds;
/// `keepalive` far beyond [`EVENTUALLY`], so that a connection closed within
/// that was closed on purpose, not for idling.
const CONFIG: &str =
    "[timeouts]\nclient_header = 2\nclient_body = 2\nkeepalive = 600\nupstream_read = 5\n";
const CLIENT_HEADER: Duration = Duration::from_secs(2);

fn setup() -> (Peer, Proxy, Vec<i32>) {
    let peer = Peer::echo("echo");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[(peer.addr(), "max_fails=0")]);
    let workers = proxy.elb.wait_workers(2, EVENTUALLY);
    (peer, proxy, workers)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, EVENTUALLY).expect("connect to elb");
    s.set_write_timeout(Some(EVENTUALLY)).expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Sends `bytes` on a new connection; the answer must be one of `statuses`
/// followed by a close, or a close without a word.
fn refused_with(addr: SocketAddr, bytes: &[u8], statuses: &[u16], what: &str) {
    let timeout = EVENTUALLY;
    let mut s = connect(addr);
    // elb may close while we still write: that is a fine answer too.
    let _ = s.write_all(bytes);
    match first_reply(&mut s, timeout) {
        Reply::Status(status, got) => {
            assert!(
                statuses.contains(&status),
                "{what}: answered {status}, want one of {statuses:?}\nrequest: {}\nanswer: {}",
                show(bytes, 300),
                show(&got, 300)
            );
            assert!(
                read_until_close(&mut s, EVENTUALLY).is_ok(),
                "{what}: the connection stayed open after {status}\nrequest: {}",
                show(bytes, 300)
            );
        }
        Reply::Closed(got) => assert!(
            got.is_empty(),
            "{what}: not an HTTP answer: {}\nrequest: {}",
            show(&got, 300),
            show(bytes, 300)
        ),
        Reply::Silent(got) => panic!(
            "{what}: neither an answer nor a close within {timeout:?} (got {})\nrequest: {}",
            show(&got, 300),
            show(bytes, 300)
        ),
    }
}

#[test]
fn garbage_gets_400_or_a_close_and_reaches_no_peer() {
    let (peer, mut proxy, workers) = setup();
    let addr = proxy.addr();
    let h = format!("Host: {DOMAIN}\r\n");
    let mut cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("random bytes", Rng::new(1).bytes(512), &[400]),
        (
            "HTTP/9.9",
            format!("GET / HTTP/9.9\r\n{h}\r\n").into_bytes(),
            &[400],
        ),
        (
            "HTTP/2.0 in an HTTP/1 head",
            format!("GET / HTTP/2.0\r\n{h}\r\n").into_bytes(),
            &[400],
        ),
        (
            "no version",
            format!("GET /\r\n{h}\r\n").into_bytes(),
            &[400],
        ),
        (
            "a header without colon",
            format!("GET / HTTP/1.1\r\n{h}NoColonHere\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "NUL in a header value",
            format!("GET / HTTP/1.1\r\n{h}X-A: a\0b\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "NUL in the request line",
            format!("GET /a\0b HTTP/1.1\r\n{h}\r\n").into_bytes(),
            &[400],
        ),
        (
            "bare CR in a header value",
            format!("GET / HTTP/1.1\r\n{h}X-A: a\rb\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "bare CR ending a header",
            format!("GET / HTTP/1.1\r\n{h}X-A: a\rX-B: b\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "a space before the colon",
            format!("GET / HTTP/1.1\r\nHost : {DOMAIN}\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "a space inside a header name",
            format!("GET / HTTP/1.1\r\n{h}X A: b\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "an obsolete line folding",
            format!("GET / HTTP/1.1\r\n{h}X-A: a\r\n b\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "HTTP/1.1 without Host",
            b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "two Host headers",
            format!("GET / HTTP/1.1\r\n{h}Host: other.test\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "a non-numeric Content-Length",
            format!("POST / HTTP/1.1\r\n{h}Content-Length: abc\r\n\r\n").into_bytes(),
            &[400],
        ),
        (
            "a control byte in the method",
            format!("G\x01T / HTTP/1.1\r\n{h}\r\n").into_bytes(),
            &[400],
        ),
    ];
    let mut huge = "G".repeat(70_000).into_bytes();
    huge.extend_from_slice(format!(" / HTTP/1.1\r\n{h}\r\n").as_bytes());
    // Past the 64 KiB head limit: too large, or malformed.
    cases.push(("a 70 KB method", huge, &[400, 414, 431]));
    for (what, bytes, statuses) in &cases {
        refused_with(addr, bytes, statuses, what);
    }
    assert_eq!(
        peer.requests(),
        0,
        "garbage reached the peer: {:?}",
        peer.seen()
    );
    proxy.assert_healthy(&workers, &peer, "garbage requests");
}

#[test]
fn a_bad_chunk_size_gets_400_and_a_close() {
    let (peer, mut proxy, workers) = setup();
    for body in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut bytes =
            format!("POST /c HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n")
                .into_bytes();
        bytes.extend_from_slice(body);
        refused_with(proxy.addr(), &bytes, &[400], "bad chunked framing");
    }
    proxy.assert_healthy(&workers, &peer, "bad chunk sizes");
}

#[test]
fn oversized_heads_get_431_and_large_legal_ones_pass() {
    let (peer, mut proxy, workers) = setup();
    let addr = proxy.addr();
    let big_one = format!(
        "GET / HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 << 10)
    );
    refused_with(addr, big_one.as_bytes(), &[431], "one 70 KiB header");
    let many: String = (0..2000)
        .map(|i| format!("X-Many-{i:04}: {:>24}\r\n", i))
        .collect();
    refused_with(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n{many}\r\n").as_bytes(),
        &[431],
        "2000 headers, 80 KB",
    );
    assert_eq!(peer.requests(), 0, "an oversized head reached the peer");

    // 100 headers pass, all of them.
    let hundred: Vec<(String, String)> = (0..100)
        .map(|i| (format!("X-H-{i}"), format!("value {i}")))
        .collect();
    let h: Vec<(&str, &str)> = hundred
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = proxy
        .request("GET", "/hundred", &h, b"")
        .expect("answer to 100 headers");
    assert_eq!(r.status, 200, "100 headers: {r:?}");
    let seen = peer.seen();
    let got = seen.last().expect("the peer saw it");
    let n = got
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("X-H-"))
        .count();
    assert_eq!(n, 100, "headers that reached the peer");

    // One 48 KiB cookie passes, whole.
    let cookie = format!("k={}", "c".repeat((48 << 10) - 2));
    let r = proxy
        .request("GET", "/cookie", &[("Cookie", &cookie)], b"")
        .expect("answer to a 48 KiB cookie");
    assert_eq!(r.status, 200, "48 KiB cookie: {r:?}");
    let seen = peer.seen();
    assert_eq!(
        seen.last().and_then(|s| s.header("cookie")),
        Some(cookie.as_str()),
        "the cookie did not reach the peer whole"
    );
    proxy.assert_healthy(&workers, &peer, "oversized heads");
}

/// SPEC 6: "the limit is on size": many small headers that add up to far
/// less than 64 KiB pass, however many they are.
#[test]
fn many_small_headers_under_the_size_limit_pass() {
    let (peer, proxy, _workers) = setup();
    let headers: Vec<(String, String)> = (0..300).map(|i| (format!("X-{i}"), "v".into())).collect();
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = proxy
        .request("GET", "/many", &h, b"")
        .expect("answer to 300 small headers");
    assert_eq!(
        r.status, 200,
        "300 headers of ~10 bytes (about 3 KB in all) were refused: {r:?}"
    );
    assert_eq!(peer.requests(), 1);
}

#[test]
fn smuggling_framings_get_400_a_close_and_reach_no_peer() {
    let (peer, mut proxy, workers) = setup();
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n".into(),
        ),
        (
            "Transfer-Encoding and Content-Length",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n".into(),
        ),
        (
            "two differing Content-Length",
            "Content-Length: 5\r\nContent-Length: 6\r\n".into(),
        ),
        ("a Content-Length list", "Content-Length: 5, 6\r\n".into()),
        (
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: xchunked\r\n".into(),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n".into(),
        ),
        (
            "Transfer-Encoding chunked then identity",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n".into(),
        ),
        ("Content-Length: +5", "Content-Length: +5\r\n".into()),
        ("Content-Length: -5", "Content-Length: -5\r\n".into()),
        ("Content-Length: 0x5", "Content-Length: 0x5\r\n".into()),
        (
            "a huge Content-Length",
            "Content-Length: 99999999999999999999999\r\n".into(),
        ),
    ];
    for (what, framing) in &cases {
        let bytes =
            format!("POST /s HTTP/1.1\r\nHost: {DOMAIN}\r\n{framing}\r\n0\r\n\r\n{smuggled}");
        refused_with(proxy.addr(), bytes.as_bytes(), &[400], what);
    }
    // HTTP/1.0 has no chunked framing.
    let bytes = format!(
        "POST /s HTTP/1.0\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    refused_with(
        proxy.addr(),
        bytes.as_bytes(),
        &[400],
        "Transfer-Encoding in HTTP/1.0",
    );
    assert_eq!(
        peer.requests(),
        0,
        "a smuggling attempt reached the peer: {:?}",
        peer.seen()
    );
    proxy.assert_healthy(&workers, &peer, "smuggling attempts");
}

#[test]
fn a_declared_60_mb_body_gets_413_before_the_body_without_100_continue() {
    let (peer, mut proxy, workers) = setup();
    let mut s = connect(proxy.addr());
    let head = format!(
        "POST /big HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 60000000\r\nExpect: 100-continue\r\n\r\n"
    );
    let started = Instant::now();
    s.write_all(head.as_bytes()).expect("send head");
    // No body is sent: an elb that waited for it would time it out
    // (client_body = 2 s) with another answer or a close.
    let reply = first_reply(&mut s, EVENTUALLY);
    let took = started.elapsed();
    eprintln!("a declared 60 MB body: {reply:?} after {took:?}");
    let Reply::Status(status, got) = reply else {
        panic!("no answer to a declared 60 MB body: {reply:?}");
    };
    assert_eq!(
        status,
        413,
        "first answer to a declared 60 MB body (after {took:?}): {}",
        show(&got, 300)
    );
    assert!(
        read_until_close(&mut s, EVENTUALLY).is_ok(),
        "the connection stayed open after 413"
    );
    // Without Expect: still 413 (the client may be cut off while sending).
    let mut s = connect(proxy.addr());
    let head = format!("PUT /big HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 60000000\r\n\r\n");
    s.write_all(head.as_bytes()).expect("send head");
    let _ = s.write_all(&pattern(100_000));
    match first_reply(&mut s, EVENTUALLY) {
        Reply::Status(413, _) | Reply::Closed(_) => {}
        other => panic!("a declared 60 MB body without Expect: {other:?}"),
    }
    assert_eq!(peer.requests(), 0, "the over-limit body reached the peer");
    proxy.assert_healthy(&workers, &peer, "over-limit bodies");
}

#[test]
fn a_body_over_client_max_body_size_gets_413() {
    let peer = Peer::echo("echo");
    let mut proxy = Proxy::start(&format!(
        "{CONFIG}\n[limits]\nclient_max_body_size = \"1m\"\n"
    ));
    proxy.route_to(&[(peer.addr(), "max_fails=0")]);
    let workers = proxy.elb.wait_workers(2, EVENTUALLY);
    // Declared: before the body (none is sent).
    let mut s = connect(proxy.addr());
    let head = format!("POST /big HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 1048577\r\n\r\n");
    s.write_all(head.as_bytes()).expect("send head");
    let reply = first_reply(&mut s, EVENTUALLY);
    assert!(
        matches!(reply, Reply::Status(413, _)),
        "a declared body of 1 MiB + 1 over a 1m limit: {reply:?}"
    );
    // Exactly the limit passes.
    let body = pattern(1 << 20);
    let r = proxy
        .request("POST", "/limit", &[], &body)
        .expect("answer to a body of exactly the limit");
    assert_eq!(r.status, 200, "{r:?}");
    // Chunked, found out while streaming: 413 if no answer began, and the
    // connection closed. The client sends in pieces and looks for an
    // answer after each.
    let mut s = connect(proxy.addr());
    s.write_all(
        format!("POST /chunked HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .expect("send head");
    let framed = chunked(&pattern(3 << 20));
    let mut reply = Reply::Silent(Vec::new());
    for piece in framed.chunks(32 << 10) {
        if s.write_all(piece).is_err() {
            break;
        }
        reply = first_reply(&mut s, Duration::from_millis(20));
        if !matches!(reply, Reply::Silent(ref got) if got.is_empty()) {
            break;
        }
    }
    if matches!(reply, Reply::Silent(ref got) if got.is_empty()) {
        reply = first_reply(&mut s, EVENTUALLY);
    }
    assert!(
        matches!(reply, Reply::Status(413, _)),
        "a chunked body over the 1m limit: {reply:?}"
    );
    assert!(
        read_until_close(&mut s, EVENTUALLY).is_ok(),
        "the connection stayed open after 413"
    );
    proxy.assert_healthy(&workers, &peer, "bodies over the limit");
}

struct Slow {
    stream: TcpStream,
    opened: Instant,
    closed: Option<Duration>,
    answer: Vec<u8>,
}

impl Slow {
    /// Looks (without waiting) whether elb closed the connection.
    fn check_closed(&mut self) {
        let mut b = [0u8; 1024];
        loop {
            match std::io::Read::read(&mut self.stream, &mut b) {
                Ok(0) => break,
                Ok(n) => self.answer.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        self.closed = Some(self.opened.elapsed());
    }
}

#[test]
fn slowloris_clients_are_cut_off_while_others_are_served() {
    let (peer, mut proxy, workers) = setup();
    let addr = proxy.addr();
    let mut slow: Vec<Slow> = (0..40)
        .map(|_| {
            let stream = connect(addr);
            let opened = Instant::now();
            let mut s = Slow {
                stream,
                opened,
                closed: None,
                answer: Vec::new(),
            };
            s.stream
                .write_all(b"GET /slow HTTP/1.1\r\n")
                .expect("send a request line");
            s.stream.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(Mutex::new((Duration::ZERO, 0usize)));
    let normal = {
        let (done, slowest) = (Arc::clone(&done), Arc::clone(&slowest));
        let proxy_addr = addr;
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !done.load(Ordering::Acquire) {
                let t = Instant::now();
                let mut c = common::HttpConn::connect(proxy_addr, EVENTUALLY).expect("connect");
                let r = c
                    .request("GET", DOMAIN, "/normal", &[("Connection", "close")], b"")
                    .expect("a normal request next to slowloris clients");
                assert_eq!(r.status, 200, "{r:?}");
                let took = t.elapsed();
                n += 1;
                let mut s = slowest.lock().unwrap_or_else(|e| e.into_inner());
                s.0 = s.0.max(took);
                s.1 = n;
            }
        })
    };
    // A header byte every 200 ms to every open connection, until elb has
    // closed them all. The header is 1000+ bytes: an elb that let each byte
    // restart the clock would keep them open for minutes (and keepalive is
    // 600 s), so a close within EVENTUALLY is client_header's.
    let header = format!("Host: {DOMAIN}\r\nX-Slow: {}", "a".repeat(1000));
    let header = header.as_bytes();
    let started = Instant::now();
    let mut i = 0;
    // Normal requests answered while every slowloris client was still open.
    let mut normals_beside = 0;
    while slow.iter().any(|s| s.closed.is_none()) && started.elapsed() < EVENTUALLY {
        for s in slow.iter_mut().filter(|s| s.closed.is_none()) {
            s.check_closed();
            if s.closed.is_none() && s.stream.write_all(&header[i..=i]).is_err() {
                s.closed = Some(s.opened.elapsed());
            }
        }
        if slow.iter().all(|s| s.closed.is_none()) {
            normals_beside = slowest.lock().unwrap_or_else(|e| e.into_inner()).1;
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    done.store(true, Ordering::Release);
    let normal = normal.join();
    let (slowest_normal, normals) = *slowest.lock().unwrap_or_else(|e| e.into_inner());
    let closed: Vec<Duration> = slow.iter().filter_map(|s| s.closed).collect();
    eprintln!(
        "{normals} normal requests answered ({normals_beside} while all 40 slowloris clients were open), slowest {slowest_normal:?}; slowloris clients closed after {:?} to {:?}",
        closed.iter().min(),
        closed.iter().max()
    );
    assert!(normal.is_ok(), "the normal client failed (see above)");
    assert!(
        normals_beside >= 1,
        "no normal request was answered while the slowloris clients were open ({normals} in all)"
    );
    let open = slow.iter().filter(|s| s.closed.is_none()).count();
    assert_eq!(
        open,
        0,
        "{open} of 40 slowloris clients still open after {:?} (client_header = 2 s; {i} bytes sent each)",
        started.elapsed()
    );
    // Not before client_header (less a margin for elb's coarse clock).
    for s in &slow {
        let at = s.closed.unwrap_or_default();
        assert!(
            at >= CLIENT_HEADER - Duration::from_millis(300),
            "a slowloris client was closed after {at:?}, before client_header = 2 s; it got {}",
            show(&s.answer, 200)
        );
    }
    proxy.assert_healthy(&workers, &peer, "slowloris");
}

#[test]
fn clients_that_vanish_mid_request_leave_elb_working() {
    let (peer, mut proxy, workers) = setup();
    let addr = proxy.addr();
    let d = DOMAIN;
    let big = pattern(5000);
    let mut half_chunked =
        format!("POST /v HTTP/1.1\r\nHost: {d}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    let framed = chunked(&big);
    half_chunked.extend_from_slice(&framed[..framed.len() / 2]);
    let mut half_body =
        format!("POST /v HTTP/1.1\r\nHost: {d}\r\nContent-Length: 5000\r\n\r\n").into_bytes();
    half_body.extend_from_slice(&big[..2500]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("half a head", b"GET /v HTTP/1.1\r\nHo".to_vec()),
        ("a head without its blank line", format!("GET /v HTTP/1.1\r\nHost: {d}\r\n").into_bytes()),
        ("half a body", half_body),
        ("half a chunked body", half_chunked),
        (
            "a head waiting for 100-continue",
            format!(
                "POST /v HTTP/1.1\r\nHost: {d}\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "a request whose 5 MiB answer is never read",
            format!("GET /v HTTP/1.1\r\nHost: {d}\r\nX-Reply-Bytes: 5242880\r\n\r\n").into_bytes(),
        ),
        (
            "a request answered after a delay",
            format!("GET /v HTTP/1.1\r\nHost: {d}\r\nX-Reply-Delay-Ms: 300\r\n\r\n").into_bytes(),
        ),
    ];
    for (what, bytes) in &cases {
        for reset in [false, true] {
            let mut s = connect(addr);
            s.write_all(bytes).expect("send");
            if reset {
                // An abortive close (RST) rather than a FIN.
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .expect("linger");
            }
            drop(s);
            let ok = proxy.request("GET", "/between", &[], b"");
            assert!(
                ok.as_ref().is_ok_and(|r| r.status == 200),
                "after a client vanished ({what}, reset {reset}): {ok:?}"
            );
        }
    }
    proxy.assert_healthy(&workers, &peer, "vanishing clients");
}

/// A valid request (one of a few) with one to three random edits.
fn mutated(rng: &mut Rng) -> Vec<u8> {
    let bases = [
        format!("GET /m?q=1 HTTP/1.1\r\nHost: {DOMAIN}\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n"),
        format!("POST /m HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 5\r\n\r\nhello"),
        format!(
            "PUT /m HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\n\r\n"
        ),
        format!("GET /m HTTP/1.0\r\nHost: {DOMAIN}\r\nConnection: keep-alive\r\n\r\n"),
    ];
    let mut b = bases[rng.below(bases.len() as u64) as usize]
        .clone()
        .into_bytes();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len() as u64) as usize;
        match rng.below(4) {
            0 => b[at] = rng.next_u64() as u8,
            1 => b.insert(at, rng.next_u64() as u8),
            2 => {
                b.remove(at);
            }
            _ => {
                let end = (at + 1 + rng.below(8) as usize).min(b.len());
                let piece = b[at..end].to_vec();
                b.splice(at..at, piece);
            }
        }
    }
    b
}

#[test]
fn seeded_random_bytes_get_a_status_line_or_a_close() {
    let seed: u64 = std::env::var("ELB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_607);
    let (peer, mut proxy, workers) = setup();
    let addr = proxy.addr();
    const CONNECTIONS: u64 = 300;
    const THREADS: u64 = 6;
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered_2xx = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let failures = Arc::clone(&failures);
            let answered_2xx = Arc::clone(&answered_2xx);
            let outcomes = Arc::clone(&outcomes);
            std::thread::spawn(move || {
                for k in (t..CONNECTIONS).step_by(THREADS as usize) {
                    // One failure is enough, and each can take EVENTUALLY.
                    if !failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_empty()
                    {
                        break;
                    }
                    let mut rng = Rng::new(seed ^ (k + 1).wrapping_mul(0x1000_0000_01b3));
                    let len = 1 + rng.below(4096) as usize;
                    let bytes = match rng.below(4) {
                        3 => mutated(&mut rng),
                        0 => rng.bytes(len),
                        1 => {
                            let mut b =
                                format!("GET /f HTTP/1.1\r\nHost: {DOMAIN}\r\n").into_bytes();
                            b.extend(rng.bytes(len));
                            b
                        }
                        _ => {
                            // Printable noise with line breaks, then a blank line.
                            let mut b: Vec<u8> = rng
                                .bytes(len)
                                .into_iter()
                                .map(|x| match x % 16 {
                                    0 => b'\n',
                                    1 => b'\r',
                                    2 => b':',
                                    3 => b' ',
                                    _ => 0x21 + x % 94,
                                })
                                .collect();
                            b.extend_from_slice(b"\r\n\r\n");
                            b
                        }
                    };
                    let mut s = connect(addr);
                    let _ = s.write_all(&bytes);
                    // A partial head is cut off after client_header.
                    let reply = first_reply(&mut s, EVENTUALLY);
                    // A random tail may end the head early (a lone LF ends a
                    // line, RFC 9112 2.2), making a valid request the peer
                    // answers: any status line is an answer.
                    let key = match &reply {
                        Reply::Status(status, _) => status.to_string(),
                        Reply::Closed(_) => "close".into(),
                        Reply::Silent(_) => "silent".into(),
                    };
                    *outcomes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(key)
                        .or_insert(0) += 1;
                    let bad = match &reply {
                        Reply::Status(status, _) => {
                            if (200..300).contains(status) {
                                answered_2xx.fetch_add(1, Ordering::AcqRel);
                            }
                            !(100..600).contains(status)
                        }
                        Reply::Closed(got) => !got.is_empty(),
                        Reply::Silent(_) => true,
                    };
                    if bad {
                        failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!(
                                "connection {k} (seed {seed}): {reply:?} to {}",
                                show(&bytes, 200)
                            ));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a fuzz thread panicked");
    }
    eprintln!(
        "fuzz (seed {seed}): {:?}",
        outcomes.lock().unwrap_or_else(|e| e.into_inner())
    );
    let failures = failures.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        failures.is_empty(),
        "{} fuzz connections (of {CONNECTIONS}; none more after a failure) got neither a status line nor a close:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Only what was answered by the peer reached it.
    assert_eq!(
        peer.requests(),
        answered_2xx.load(Ordering::Acquire),
        "fuzz requests that reached the peer: {:?}",
        peer.seen()
    );
    proxy.assert_healthy(&workers, &peer, "random bytes");
}
