//! SPEC 6: a head is rebuilt, never copied, and what belongs to one
//! connection stays on it. A peer's status line and header lines reach the
//! client rebuilt from the parsed head, so a bare LF (which the parser
//! accepts as a line end) cannot splice a header into the status line; the
//! hop-by-hop fields, and every field a `Connection` header names, pass
//! neither to the peer nor to the client (RFC 9110 7.6.1), while keep-alive
//! and close mean what they meant.

mod common;

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::HttpConn;
use common::peers::{DOMAIN, Mode, Peer, Proxy, head_values, read_until_close, show, split_head};

const CONFIG: &str = "[timeouts]\nconnect = 2\nupstream_read = 10\n";
const TIMEOUT: Duration = Duration::from_secs(10);

fn proxy_to(peer: &Peer) -> Proxy {
    let proxy = Proxy::start(CONFIG);
    proxy.route_to(&[(peer.addr(), "")]);
    proxy
}

/// Everything the client receives for one `GET` sent with
/// `Connection: close`, up to elb's close.
fn get_until_close(proxy: &Proxy) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&proxy.addr(), TIMEOUT).expect("connect to elb");
    s.write_all(
        format!("GET /x HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send");
    read_until_close(&mut s, TIMEOUT)
        .unwrap_or_else(|b| panic!("not closed after Connection: close; got {}", show(&b, 600)))
}

/// Splits off the next head of `raw` and checks that every line of it ends
/// in CRLF: (head text, the rest).
fn crlf_head(raw: &[u8]) -> (String, &[u8]) {
    let (head, rest) =
        split_head(raw).unwrap_or_else(|| panic!("no complete head in {}", show(raw, 600)));
    let bytes = head.as_bytes();
    let bare_lf =
        (0..bytes.len()).find(|&i| bytes[i] == b'\n' && (i == 0 || bytes[i - 1] != b'\r'));
    assert!(
        bare_lf.is_none() && !head.contains("\r\r"),
        "a line not ended by CRLF reached the client: {}",
        show(bytes, 600)
    );
    (head, rest)
}

fn status_line(head: &str) -> &str {
    head.split("\r\n").next().unwrap_or_default()
}

/// Occurrences of `needle` in `head`, case-insensitive.
fn occurrences(head: &str, needle: &str) -> usize {
    head.to_ascii_lowercase()
        .matches(&needle.to_ascii_lowercase())
        .count()
}

#[test]
fn a_bare_lf_after_the_status_line_cannot_splice_a_header_into_it() {
    let peer = Peer::start(
        "raw",
        Mode::Raw(b"HTTP/1.1 200 OK\nX-Injected: yes\r\nContent-Length: 2\r\n\r\nok"),
    );
    let proxy = proxy_to(&peer);
    let got = get_until_close(&proxy);
    let (head, body) = crlf_head(&got);
    assert_eq!(
        status_line(&head),
        "HTTP/1.1 200 OK",
        "the status line the client got; head {}",
        show(head.as_bytes(), 600)
    );
    assert_eq!(
        occurrences(&head, "x-injected"),
        1,
        "X-Injected should arrive once, as a header: {head:?}"
    );
    assert_eq!(head_values(&head, "x-injected"), ["yes"], "{head:?}");
    assert_eq!(body, b"ok");
}

#[test]
fn bare_lfs_between_headers_and_in_an_interim_answer_are_not_passed_on() {
    let peer = Peer::start(
        "raw",
        Mode::Raw(
            b"HTTP/1.1 103 Early Hints\nLink: </s.css>; rel=preload\r\nX-Injected: yes\n\r\n\
              HTTP/1.1 200 OK\r\nX-A: 1\nX-Injected: yes\r\nContent-Length: 2\n\r\nok",
        ),
    );
    let proxy = proxy_to(&peer);
    let got = get_until_close(&proxy);
    let (early, rest) = crlf_head(&got);
    assert_eq!(status_line(&early), "HTTP/1.1 103 Early Hints", "{early:?}");
    assert_eq!(head_values(&early, "x-injected"), ["yes"], "{early:?}");
    assert_eq!(
        head_values(&early, "link"),
        ["</s.css>; rel=preload"],
        "{early:?}"
    );
    let (head, body) = crlf_head(rest);
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head:?}");
    assert_eq!(head_values(&head, "x-a"), ["1"], "{head:?}");
    assert_eq!(head_values(&head, "x-injected"), ["yes"], "{head:?}");
    assert_eq!(body, b"ok");
}

/// Fields the client's requests carry that must not reach the peer.
const CLIENT_ONLY: [&str; 7] = [
    "x-secret",
    "x-other",
    "x-third",
    "keep-alive",
    "te",
    "proxy-connection",
    "trailer",
];

fn hop_request(connection: &str) -> String {
    format!(
        "GET /hop HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: {connection}\r\nX-Secret: 1\r\n\
         x-OTHER: 2\r\nConnection:x-third\r\nX-Third: 3\r\nKeep-Alive: timeout=5\r\n\
         TE: trailers\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\nX-Kept: yes\r\n\r\n"
    )
}

#[test]
fn fields_named_in_the_clients_connection_do_not_reach_the_peer() {
    let peer = Peer::echo("a");
    let proxy = proxy_to(&peer);
    let mut c = proxy.conn(TIMEOUT);
    // Listed with odd case and spacing, over two Connection headers; the
    // connection is kept, as nothing says close.
    for _ in 0..2 {
        c.send(hop_request("X-Secret,  x-other ").as_bytes())
            .expect("send");
        let r = c.read_response().expect("an answer");
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    // `close` among the names still closes the client's connection.
    c.send(hop_request("x-secret, Close, x-other").as_bytes())
        .expect("send");
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    let after = c.read_response().map(|r| r.status);
    assert!(
        matches!(&after, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
        "elb should close after `Connection: x-secret, Close, x-other`: {after:?}"
    );

    let seen = peer.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        for name in CLIENT_ONLY {
            assert_eq!(
                s.header(name),
                None,
                "the peer received {name}; it got {:?}",
                s.headers
            );
        }
        assert_eq!(s.header("x-kept"), Some("yes"), "{:?}", s.headers);
        let connection: Vec<&str> = s
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(connection, ["keep-alive"], "{:?}", s.headers);
    }
}

#[test]
fn fields_named_in_the_peers_connection_do_not_reach_the_client() {
    let peer = Peer::start(
        "raw",
        Mode::Raw(
            b"HTTP/1.1 200 OK\r\nConnection: X-Peer-Secret, keep-alive\r\nX-Peer-Secret: s\r\n\
              Keep-Alive: timeout=5\r\nconnection: x-more\r\nX-MORE: m\r\nX-Kept: yes\r\n\
              Content-Length: 2\r\n\r\nok",
        ),
    );
    let proxy = proxy_to(&peer);
    let mut c = HttpConn::connect(proxy.addr(), TIMEOUT).expect("connect to elb");
    for i in 0..2 {
        let r = c
            .request("GET", DOMAIN, "/p", &[], b"")
            .unwrap_or_else(|e| panic!("answer {i} on a kept connection: {e}"));
        assert_eq!(r.status, 200);
        for name in ["x-peer-secret", "x-more", "keep-alive"] {
            assert_eq!(
                r.header(name),
                None,
                "the client received {name}; it got {:?}",
                r.headers
            );
        }
        assert_eq!(r.header("x-kept"), Some("yes"), "{:?}", r.headers);
        assert_eq!(
            r.header("connection"),
            Some("keep-alive"),
            "{:?}",
            r.headers
        );
        assert_eq!(r.body, b"ok");
    }
    // The peer's names did not make its connection unusable: it was pooled.
    assert_eq!(peer.connections(), 1, "peer connections for two requests");
}

#[test]
fn connection_cannot_take_away_a_requests_framing_or_host() {
    let peer = Peer::echo("a");
    let proxy = proxy_to(&peer);
    let mut c = proxy.conn(TIMEOUT);
    // Were Content-Length dropped, the peer would take the body for a
    // second request.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: d.test\r\n\r\n";
    c.send(
        format!(
            "POST /p HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: Content-Length, host, transfer-encoding\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .expect("send");
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = c
        .request("GET", DOMAIN, "/after", &[], b"")
        .expect("a request after");
    assert_eq!(r.header("x-target"), Some("/after"));
    let seen = peer.seen();
    let targets: Vec<&str> = seen.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(targets, ["/p", "/after"]);
    assert_eq!(seen[0].body_len, smuggled.len());
    assert_eq!(
        seen[0].header("host"),
        Some(DOMAIN),
        "{:?}",
        seen[0].headers
    );
}

#[test]
fn an_interim_answer_never_reaches_an_http_1_0_client() {
    let peer = Peer::start(
        "raw",
        Mode::Raw(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
    );
    let proxy = proxy_to(&peer);
    let mut s = TcpStream::connect_timeout(&proxy.addr(), TIMEOUT).expect("connect to elb");
    s.write_all(format!("GET /early HTTP/1.0\r\nHost: {DOMAIN}\r\n\r\n").as_bytes())
        .expect("send");
    let got = read_until_close(&mut s, TIMEOUT)
        .unwrap_or_else(|b| panic!("an HTTP/1.0 answer not closed; got {}", show(&b, 600)));
    let (head, body) = crlf_head(&got);
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head:?}");
    assert!(head_values(&head, "link").is_empty(), "{head:?}");
    assert_eq!(body, b"ok");
}
