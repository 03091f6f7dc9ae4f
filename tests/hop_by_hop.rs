//! SPEC 6: a head is rebuilt, never copied. A peer's status line and header
//! lines reach the client rebuilt from the parsed head, so a bare LF (which
//! the parser accepts as a line end) cannot splice a header into the status
//! line.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

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
