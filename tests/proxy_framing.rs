//! SPEC 6, proxying: message framing through elb, both ways. Bodies of any
//! size and framing arrive intact (checked by sha256 at the peer and at the
//! client), chunked answers are passed through verbatim to HTTP/1.1 clients
//! and decoded for HTTP/1.0 ones, pipelined requests are answered in order,
//! `Expect: 100-continue` yields exactly one `100`, bodiless answers (HEAD,
//! 204, 304) keep the connection usable, `Connection: close` is honoured
//! both ways, WebSocket is tunnelled, repeated headers are kept.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::HttpConn;
use common::peers::{
    DOMAIN, Peer, Proxy, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG, WS_TEXT, chunked, head_values,
    pattern, read_until_close, sha256_hex, show, split_head, ws_accept, ws_frame, ws_parse,
};

const CONFIG: &str = "[timeouts]\nconnect = 2\nupstream_read = 10\n";
const PEER_PARAMS: &str = "max_fails=1 fail_timeout=2";
/// Generous for bodies of megabytes through a debug build.
const BIG_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;

/// An elb routing [`DOMAIN`] to one echo peer.
fn one_peer() -> (Peer, Proxy) {
    let peer = Peer::echo("a");
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[(peer.addr(), PEER_PARAMS)]);
    (peer, proxy)
}

fn raw(proxy: &Proxy) -> TcpStream {
    let s = TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(3)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_write_timeout(Some(BIG_TIMEOUT)).expect("timeout");
    s
}

#[test]
fn a_5_mib_body_with_content_length_goes_intact_both_ways() {
    let (peer, proxy) = one_peer();
    let body = pattern(5 * MIB);
    let sha = sha256_hex(&body);
    let mut c = proxy.conn(BIG_TIMEOUT);
    let r = c
        .request("POST", DOMAIN, "/upload", &[("X-Echo", "1")], &body)
        .expect("answer to a 5 MiB POST");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.header("x-body-len"), Some(&*body.len().to_string()));
    assert_eq!(
        r.header("x-body-sha256"),
        Some(&*sha),
        "the peer got another body"
    );
    assert_eq!(r.body.len(), body.len(), "the echoed body's length");
    assert_eq!(sha256_hex(&r.body), sha, "the client got another body");

    // And a 5 MiB answer to a GET, on the same kept-alive connection.
    let r = c
        .request(
            "GET",
            DOMAIN,
            "/download",
            &[("X-Reply-Bytes", &(5 * MIB).to_string())],
            b"",
        )
        .expect("answer to a 5 MiB GET");
    assert_eq!(r.status, 200);
    assert_eq!(sha256_hex(&r.body), sha256_hex(&pattern(5 * MIB)));
    assert_eq!(peer.requests(), 2);
}

#[test]
fn a_chunked_5_mib_body_goes_intact_both_ways() {
    let (peer, proxy) = one_peer();
    let body = pattern(5 * MIB);
    let mut c = proxy.conn(BIG_TIMEOUT);
    let head = format!(
        "POST /chunked HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\nX-Reply-Bytes: {}\r\nX-Reply-Chunked: 1\r\n\r\n",
        5 * MIB
    );
    c.send(head.as_bytes()).expect("send head");
    // The client's own chunking, in pieces written one after the other.
    for piece in chunked(&body).chunks(300_000) {
        c.send(piece).expect("send body");
    }
    let r = c.read_response().expect("answer to a chunked POST");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let seen = peer.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, body.len(), "body length at the peer");
    assert_eq!(
        seen[0].body_sha256,
        sha256_hex(&body),
        "the peer got another body"
    );
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.body.len(), 5 * MIB);
    assert_eq!(sha256_hex(&r.body), sha256_hex(&body));
    // The connection is still good.
    let r = c
        .request("GET", DOMAIN, "/after", &[], b"")
        .expect("a request after");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-target"), Some("/after"));
}

#[test]
fn a_chunked_answer_reaches_an_http_1_1_client_verbatim() {
    let (_peer, proxy) = one_peer();
    let body = pattern(200_000);
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "GET /c HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Reply-Chunked: 1\r\nX-Reply-Bytes: 200000\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("send");
    let got = read_until_close(&mut s, BIG_TIMEOUT)
        .unwrap_or_else(|b| panic!("not closed after Connection: close; got {}", show(&b, 300)));
    let (head, rest) = split_head(&got).unwrap_or_else(|| panic!("no head in {}", show(&got, 300)));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(
        head_values(&head, "transfer-encoding"),
        ["chunked"],
        "{head}"
    );
    assert!(
        head_values(&head, "content-length").is_empty(),
        "Content-Length next to chunked: {head}"
    );
    let want = chunked(&body);
    assert!(
        rest == want.as_slice(),
        "the chunked body was not passed through as the peer framed it: {} bytes, want {}; starts {}",
        rest.len(),
        want.len(),
        show(rest, 120)
    );

    // Two chunked answers in a row on a kept-alive connection.
    let mut c = proxy.conn(BIG_TIMEOUT);
    for n in [1usize, 70_000] {
        let r = c
            .request(
                "GET",
                DOMAIN,
                "/again",
                &[("X-Reply-Chunked", "1"), ("X-Reply-Bytes", &n.to_string())],
                b"",
            )
            .expect("chunked answer on a kept-alive connection");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, pattern(n));
    }
}

#[test]
fn a_chunked_answer_is_decoded_for_an_http_1_0_client_then_closed() {
    let (_peer, proxy) = one_peer();
    for keep in ["", "Connection: keep-alive\r\n"] {
        let mut s = raw(&proxy);
        s.write_all(
            format!(
                "GET /old HTTP/1.0\r\nHost: {DOMAIN}\r\n{keep}X-Reply-Chunked: 1\r\nX-Reply-Bytes: 150000\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
        let got = read_until_close(&mut s, BIG_TIMEOUT).unwrap_or_else(|b| {
            panic!(
                "HTTP/1.0 ({keep:?}): the connection was not closed after a chunked answer; got {}",
                show(&b, 300)
            )
        });
        let (head, rest) =
            split_head(&got).unwrap_or_else(|| panic!("no head in {}", show(&got, 300)));
        assert!(head.contains(" 200 "), "{head}");
        assert!(
            head_values(&head, "transfer-encoding").is_empty(),
            "chunked framing sent to an HTTP/1.0 client: {head}"
        );
        assert!(
            rest == pattern(150_000).as_slice(),
            "HTTP/1.0 ({keep:?}): body of {} bytes is not the decoded data; starts {}",
            rest.len(),
            show(rest, 120)
        );
    }
}

#[test]
fn an_http_1_0_request_is_answered_and_closed_or_kept_alive_when_asked() {
    let (peer, proxy) = one_peer();
    let mut s = raw(&proxy);
    s.write_all(format!("GET /ten HTTP/1.0\r\nHost: {DOMAIN}\r\n\r\n").as_bytes())
        .expect("send");
    let got = read_until_close(&mut s, Duration::from_secs(5))
        .unwrap_or_else(|b| panic!("HTTP/1.0 connection not closed; got {}", show(&b, 300)));
    let (head, rest) = split_head(&got).unwrap_or_else(|| panic!("no head in {}", show(&got, 300)));
    assert!(head.starts_with("HTTP/1."), "{head}");
    assert!(head.contains(" 200 "), "{head}");
    assert_eq!(rest, b"a GET /ten\n");
    let seen = peer.seen();
    assert_eq!(seen.last().map(|s| s.target.as_str()), Some("/ten"));

    // HTTP/1.0 with keep-alive, and a length-framed answer: two requests on
    // one connection.
    let mut c = proxy.conn(Duration::from_secs(5));
    for path in ["/k1", "/k2"] {
        c.send(
            format!("GET {path} HTTP/1.0\r\nHost: {DOMAIN}\r\nConnection: keep-alive\r\n\r\n")
                .as_bytes(),
        )
        .expect("send");
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("HTTP/1.0 keep-alive, {path}: {e}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.body_text(), format!("a GET {path}\n"));
    }
}

#[test]
fn three_pipelined_requests_in_one_write_are_answered_in_order() {
    let (peer, proxy) = one_peer();
    let mut c = proxy.conn(Duration::from_secs(10));
    let post_body = pattern(3000);
    let mut bytes = format!(
        "GET /p1 HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Reply-Bytes: 40000\r\n\r\n\
         POST /p2 HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 3000\r\nX-Reply-Chunked: 1\r\nX-Reply-Bytes: 10\r\n\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(&post_body);
    bytes.extend_from_slice(
        format!("GET /p3 HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Reply-Bytes: 300000\r\n\r\n").as_bytes(),
    );
    c.send(&bytes).expect("send three requests at once");
    let want = [("/p1", 40_000usize), ("/p2", 10), ("/p3", 300_000)];
    for (path, n) in want {
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("answer for {path}: {e}"));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("x-target"), Some(path), "answers out of order");
        assert_eq!(r.body, pattern(n), "{path}: body");
    }
    let p2 = peer
        .seen()
        .into_iter()
        .find(|s| s.target == "/p2")
        .expect("the peer saw /p2");
    assert_eq!(p2.body_sha256, sha256_hex(&post_body));
}

/// A POST with `Expect: 100-continue`: the client waits for the 100, sends
/// the body, gets the answer, and nothing else (a second 100 would show up as
/// the answer to the next request).
fn expect_continue(peer_sends_100: bool) {
    let (peer, proxy) = one_peer();
    let mut c = proxy.conn(Duration::from_secs(5));
    let body = pattern(20_000);
    let mut head = format!(
        "POST /e HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n",
        body.len()
    );
    if peer_sends_100 {
        head.push_str("X-Send-100: 1\r\n");
    }
    head.push_str("\r\n");
    c.send(head.as_bytes()).expect("send head");
    let r = c.read_response().expect("an interim answer");
    assert_eq!(r.status, 100, "{r:?}");
    c.send(&body).expect("send body");
    let r = c.read_response().expect("the final answer");
    assert_eq!(r.status, 200, "peer sends 100: {peer_sends_100}: {r:?}");
    assert_eq!(r.header("x-body-sha256"), Some(&*sha256_hex(&body)));
    let r = c
        .request("GET", DOMAIN, "/next", &[], b"")
        .expect("next request");
    assert_eq!(
        (r.status, r.header("x-target")),
        (200, Some("/next")),
        "peer sends 100: {peer_sends_100}: {r:?}"
    );
    let seen = peer.seen();
    assert!(
        seen[0].header("expect").is_none(),
        "Expect was passed to the peer: {:?}",
        seen[0].headers
    );
}

#[test]
fn expect_100_continue_gets_exactly_one_100_when_the_peer_sends_none() {
    expect_continue(false);
}

#[test]
fn expect_100_continue_gets_exactly_one_100_when_the_peer_sends_its_own() {
    expect_continue(true);
}

#[test]
fn head_204_and_304_are_framed_right_and_the_connection_stays_usable() {
    let (_peer, proxy) = one_peer();
    let mut c = proxy.conn(Duration::from_secs(5));
    let r = c
        .request("HEAD", DOMAIN, "/h", &[("X-Reply-Bytes", "5000")], b"")
        .expect("HEAD");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("5000"), "{r:?}");
    let r = c
        .request(
            "HEAD",
            DOMAIN,
            "/hc",
            &[("X-Reply-Bytes", "5000"), ("X-Reply-Chunked", "1")],
            b"",
        )
        .expect("HEAD of a chunked answer");
    assert_eq!(r.status, 200);
    let r = c
        .request("GET", DOMAIN, "/204", &[("X-Reply-Status", "204")], b"")
        .expect("204");
    assert_eq!(r.status, 204);
    let r = c
        .request(
            "GET",
            DOMAIN,
            "/304",
            &[("X-Reply-Status", "304"), ("X-Reply-Bytes", "777")],
            b"",
        )
        .expect("304");
    assert_eq!(r.status, 304);
    // Had any of them left bytes behind, this answer would be garbled.
    let r = c
        .request("GET", DOMAIN, "/last", &[("X-Reply-Bytes", "777")], b"")
        .expect("a GET after HEAD, 204 and 304");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-target"), Some("/last"));
    assert_eq!(r.body, pattern(777));
    // And nothing more is waiting on the connection.
    c.stream()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let extra = std::io::Read::read(&mut c.stream(), &mut b);
    assert!(
        matches!(&extra, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "stray bytes or a close after the answers: {extra:?} {b:?}"
    );
}

#[test]
fn connection_close_from_the_client_closes_after_the_answer() {
    let (_peer, proxy) = one_peer();
    let mut c = proxy.conn(Duration::from_secs(5));
    let r = c
        .request(
            "GET",
            DOMAIN,
            "/bye",
            &[("Connection", "close"), ("X-Reply-Bytes", "100000")],
            b"",
        )
        .expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, pattern(100_000));
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{:?}",
        r.headers
    );
    assert!(
        c.closed_by_peer(),
        "the connection stayed open after Connection: close"
    );
}

#[test]
fn connection_close_from_the_peer_is_honoured_and_others_are_pooled() {
    let (peer, proxy) = one_peer();
    let mut c = proxy.conn(Duration::from_secs(5));
    let conn_of = |r: &common::Response| {
        r.header("x-conn")
            .and_then(|v| v.parse::<usize>().ok())
            .expect("X-Conn")
    };
    let r1 = c
        .request("GET", DOMAIN, "/1", &[], b"")
        .expect("first request");
    let r2 = c
        .request("GET", DOMAIN, "/2", &[], b"")
        .expect("second request");
    assert_eq!(
        conn_of(&r1),
        conn_of(&r2),
        "the peer connection was not reused"
    );
    let r3 = c
        .request("GET", DOMAIN, "/3", &[("X-Close", "1")], b"")
        .expect("an answer with Connection: close");
    assert_eq!(r3.status, 200);
    assert_ne!(
        r3.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "the peer's Connection: close was passed to the client"
    );
    let r4 = c
        .request("GET", DOMAIN, "/4", &[], b"")
        .expect("a request after the peer closed its connection");
    assert_eq!(r4.status, 200);
    assert_ne!(
        conn_of(&r3),
        conn_of(&r4),
        "a connection the peer closed was used again"
    );
    assert_eq!(peer.dropped(), 0);
}

/// Reads what is there (waiting up to 200 ms) into `buf`; false at a close.
fn ws_fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = vec![0u8; 65536];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    match std::io::Read::read(s, &mut chunk) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            true
        }
        Err(e) => panic!("reading from the tunnel: {e}"),
    }
}

fn ws_read(s: &mut TcpStream, buf: &mut Vec<u8>) -> common::peers::WsFrame {
    let deadline = std::time::Instant::now() + common::EVENTUALLY;
    loop {
        if let Some(f) = ws_parse(buf) {
            buf.drain(..f.len);
            return f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no complete WebSocket frame within {:?}; have {}",
            common::EVENTUALLY,
            show(buf, 200)
        );
        assert!(
            ws_fill(s, buf),
            "closed while waiting for a frame; have {}",
            show(buf, 200)
        );
    }
}

#[test]
fn a_websocket_is_tunnelled_both_ways() {
    let (_peer, proxy) = one_peer();
    let mut s = raw(&proxy);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: {DOMAIN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("send the upgrade");
    let mut buf = Vec::new();
    // The head, then whatever came with it (the peer's greeting).
    let deadline = std::time::Instant::now() + common::EVENTUALLY;
    let head = loop {
        if let Some((head, rest)) = split_head(&buf) {
            let consumed = buf.len() - rest.len();
            buf.drain(..consumed);
            break head;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 101 head within {:?}; got {}",
            common::EVENTUALLY,
            show(&buf, 300)
        );
        assert!(
            ws_fill(&mut s, &mut buf),
            "closed before the 101; got {}",
            show(&buf, 300)
        );
    };
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "not switched to WebSocket: {head}"
    );
    assert_eq!(
        head_values(&head, "sec-websocket-accept"),
        [ws_accept(key)],
        "{head}"
    );
    assert!(
        head_values(&head, "upgrade")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("websocket")),
        "{head}"
    );
    let hello = ws_read(&mut s, &mut buf);
    assert_eq!(
        (hello.opcode, hello.payload.as_slice()),
        (WS_TEXT, &b"hello from a"[..])
    );
    let messages: Vec<(u8, Vec<u8>)> = vec![
        (WS_TEXT, b"one".to_vec()),
        (WS_BINARY, pattern(125)),
        (WS_BINARY, pattern(126)),
        (WS_TEXT, "x".repeat(65_535).into_bytes()),
        (WS_BINARY, pattern(200_000)),
        (WS_PING, b"are you there".to_vec()),
    ];
    // Two sent at once, then one at a time.
    let mut both = ws_frame(messages[0].0, &messages[0].1, Some([1, 2, 3, 4]));
    both.extend(ws_frame(messages[1].0, &messages[1].1, Some([9, 8, 7, 6])));
    s.write_all(&both).expect("send two frames");
    for (op, payload) in &messages[..2] {
        let f = ws_read(&mut s, &mut buf);
        assert_eq!((f.opcode, &f.payload), (*op, payload));
        assert!(!f.masked, "a server frame arrived masked");
    }
    for (i, (op, payload)) in messages[2..].iter().enumerate() {
        s.write_all(&ws_frame(*op, payload, Some([i as u8, 0x5a, 0xa5, 0x11])))
            .expect("send a frame");
        let f = ws_read(&mut s, &mut buf);
        let want = if *op == WS_PING { WS_PONG } else { *op };
        assert_eq!(f.opcode, want, "message {}", i + 2);
        assert!(f.payload == *payload, "message {}: payload differs", i + 2);
    }
    s.write_all(&ws_frame(WS_CLOSE, &[0x03, 0xe8], Some([7, 7, 7, 7])))
        .expect("send close");
    let f = ws_read(&mut s, &mut buf);
    assert_eq!(f.opcode, WS_CLOSE);
    // The peer closed its side: elb ends the tunnel.
    assert!(
        read_until_close(&mut s, Duration::from_secs(5)).is_ok(),
        "the tunnel stayed open after the peer closed"
    );
}

#[test]
fn repeated_set_cookie_headers_arrive_as_sent() {
    let (_peer, proxy) = one_peer();
    let r = proxy
        .request("GET", "/cookies", &[("X-Set-Cookies", "3")], b"")
        .expect("answer");
    assert_eq!(r.status, 200);
    let cookies: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        cookies,
        ["c0=v0; Path=/", "c1=v1; Path=/", "c2=v2; Path=/"],
        "{:?}",
        r.headers
    );
}

/// The client's request reaches the peer with the same bytes whatever the
/// mix of framing: a chunked request from an HTTP/1.1 client gets through
/// even in small pieces written apart (each piece a separate segment).
#[test]
fn a_chunked_request_sent_in_small_pieces_arrives_intact() {
    let (peer, proxy) = one_peer();
    let mut c = HttpConn::connect(proxy.addr(), Duration::from_secs(5)).expect("connect");
    let body = pattern(10_000);
    c.send(
        format!("PUT /bits HTTP/1.1\r\nHost: {DOMAIN}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .expect("send head");
    let framed = chunked(&body);
    for piece in framed.chunks(997) {
        c.send(piece).expect("send a piece");
    }
    let r = c.read_response().expect("answer");
    assert_eq!(r.status, 200);
    let seen = peer.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_sha256, sha256_hex(&body));
    assert!(seen[0].chunked, "the body reached the peer unchunked");
}

#[test]
fn an_answer_without_length_runs_to_the_peers_close_then_the_client_is_closed() {
    let (_peer, proxy) = one_peer();
    let mut c = proxy.conn(Duration::from_secs(5));
    let r = c
        .request(
            "GET",
            DOMAIN,
            "/unframed",
            &[("X-Reply-Bytes", "100000"), ("X-Reply-Unframed", "1")],
            b"",
        )
        .expect("answer");
    assert_eq!(r.status, 200);
    // Read to the close: all of it, and the close came.
    assert_eq!(r.body.len(), 100_000);
    assert!(r.body == pattern(100_000), "the body differs");
}
