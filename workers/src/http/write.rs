//! Writing response heads and small complete responses.

use super::{ResponseHead, is_hop_by_hop};

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Appends a status line with our version: `HTTP/1.1 <status> <reason>`.
/// `reason` must hold no line end (a parsed reason phrase holds none).
pub fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// Appends one header line.
pub fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a peer's answer head for the client, rebuilt from its parsed
/// parts and never copied: the parser takes a bare LF for a line end, which
/// the client might not, so raw bytes could carry a line the client reads
/// otherwise. `connection`: the `Connection` value for a final answer
/// (`upgrade` for a tunnel); none for an interim one. `decoded`: the body
/// goes to the client without its chunked framing.
pub fn client_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    connection: Option<&[u8]>,
    decoded: bool,
) {
    let tunnel = connection == Some(b"upgrade".as_slice());
    status_line(out, head.status, &buf[head.reason.clone()]);
    for (n, v) in &head.headers {
        let name = &buf[n.clone()];
        if is_hop_by_hop(name, buf, &head.connection)
            || (!tunnel && name.eq_ignore_ascii_case(b"upgrade"))
            || (decoded && name.eq_ignore_ascii_case(b"transfer-encoding"))
        {
            continue;
        }
        header(out, name, &buf[v.clone()]);
    }
    if let Some(value) = connection {
        header(out, b"Connection", value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a complete response with a body to `out`.
pub fn response(out: &mut Vec<u8>, status: u16, content_type: &str, body: &[u8], keep_alive: bool) {
    response_with(out, status, content_type, body, keep_alive, None);
}

/// As [`response`], with `Retry-After` (seconds) when given.
fn response_with(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    retry_after: Option<u64>,
) {
    use std::io::Write;
    status_line(out, status, reason(status).as_bytes());
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "Server: elb\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(secs) = retry_after {
        let _ = write!(out, "Retry-After: {secs}\r\n");
    }
    let _ = write!(
        out,
        "Connection: {}\r\n\r\n",
        if keep_alive { "keep-alive" } else { "close" },
    );
    out.extend_from_slice(body);
}

/// Appends the short error page ELB answers with for `status`.
/// Writes a plain-text answer naming the status; returns its body's length.
pub fn error_page(out: &mut Vec<u8>, status: u16, keep_alive: bool) -> usize {
    let body = format!("{status} {}\n", reason(status));
    response(out, status, "text/plain", body.as_bytes(), keep_alive);
    body.len()
}

/// Appends the 429 of a `limit` rule, with `Retry-After` (seconds); returns
/// its body's length.
pub fn too_many_requests(out: &mut Vec<u8>, retry_after: u64, keep_alive: bool) -> usize {
    const BODY: &[u8] = b"429 Too Many Requests\n";
    response_with(out, 429, "text/plain", BODY, keep_alive, Some(retry_after));
    BODY.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_page_parses_as_a_response() {
        let mut out = Vec::new();
        error_page(&mut out, 404, true);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("unparsable: {other:?}"),
        };
        assert_eq!(resp.code, Some(404));
        assert_eq!(&out[n..], b"404 Not Found\n");
    }
}
