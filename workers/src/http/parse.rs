//! Request-head parsing over a connection's read buffer, without copying:
//! the head records byte ranges of the buffer. Every rejection is decided
//! here, as a [`ParseError`] that knows its status code.

use std::ops::Range;

/// Header slots tried first, on the stack. The limit is the header
/// section's size: a head with more headers is parsed again with as many
/// slots as its size allows (the shortest header line is 4 bytes).
const MAX_HEADERS: usize = 128;
const MIN_HEADER_LINE: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("request header section too large")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("ambiguous request framing: {0}")]
    Framing(&'static str),
}

impl ParseError {
    /// The status to answer with; the connection is closed after it.
    pub fn status(self) -> u16 {
        match self {
            ParseError::TooLarge => 431,
            ParseError::Malformed(_) | ParseError::Framing(_) => 400,
        }
    }
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head; ranges index the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, including the blank line.
    pub len: usize,
    pub method: Range<usize>,
    /// Path and query as sent (origin form), or the absolute URI.
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub host: Option<Range<usize>>,
    pub user_agent: Option<Range<usize>>,
    pub body: BodyKind,
    /// Whether the client wants the connection kept after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub upgrade: bool,
    /// Every header as (name, value) ranges, in order.
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    /// The fields its `Connection` headers name.
    pub connection: ConnectionNames,
}

impl RequestHead {
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.method.clone()]
    }
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.target.clone()]
    }
}

fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Parses the head at the start of `buf`. `Ok(None)`: not complete yet (and
/// still under `max_size`).
pub fn parse_request(buf: &[u8], max_size: usize) -> Result<Option<RequestHead>, ParseError> {
    parse_request_into(buf, max_size, Vec::new())
}

/// As [`parse_request`], filling `headers` (cleared first) so that a caller
/// can hand the same vector back request after request.
pub fn parse_request_into(
    buf: &[u8],
    max_size: usize,
    mut headers: Vec<(Range<usize>, Range<usize>)>,
) -> Result<Option<RequestHead>, ParseError> {
    headers.clear();
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut many = Vec::new();
    let mut req = httparse::Request::new(&mut slots);
    let mut parsed = req.parse(buf);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        many.resize(max_size / MIN_HEADER_LINE + 1, httparse::EMPTY_HEADER);
        req = httparse::Request::new(&mut many);
        parsed = req.parse(buf);
    }
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) if n > max_size => return Err(ParseError::TooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_size => return Err(ParseError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooLarge),
        Err(httparse::Error::Version) => return Err(ParseError::Malformed("HTTP version")),
        Err(httparse::Error::Token) => return Err(ParseError::Malformed("method or header name")),
        Err(httparse::Error::HeaderName) => return Err(ParseError::Malformed("header name")),
        Err(httparse::Error::HeaderValue) => return Err(ParseError::Malformed("header value")),
        Err(_) => return Err(ParseError::Malformed("request line")),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ParseError::Malformed("request line"));
    };
    if !valid_target(method.as_bytes(), path.as_bytes()) {
        return Err(ParseError::Malformed("request target"));
    }
    let mut head = RequestHead {
        len,
        method: range_of(buf, method.as_bytes()),
        target: range_of(buf, path.as_bytes()),
        minor_version: minor,
        host: None,
        user_agent: None,
        body: BodyKind::None,
        keep_alive: minor >= 1,
        expect_continue: false,
        upgrade: false,
        headers,
        connection: ConnectionNames::default(),
    };
    let mut framing = Framing::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = trim(h.value);
        head.headers
            .push((range_of(buf, name), range_of(buf, value)));
        if framing.take(buf, name, value, minor, &mut head.keep_alive)? {
            continue;
        }
        if name.eq_ignore_ascii_case(b"host") {
            if head.host.is_some() {
                return Err(ParseError::Malformed("more than one Host"));
            }
            head.host = Some(range_of(buf, value));
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            head.user_agent = Some(range_of(buf, value));
        } else if name.eq_ignore_ascii_case(b"expect") {
            head.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            head.upgrade = true;
        }
    }
    let Framing {
        content_length,
        chunked,
        transfer_encoding,
        connection_upgrade,
        named,
    } = framing;
    head.connection = named;
    head.upgrade &= connection_upgrade && minor >= 1;
    head.body = match (transfer_encoding, content_length) {
        (true, Some(_)) => {
            return Err(ParseError::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        (true, None) if chunked && minor >= 1 => BodyKind::Chunked,
        (true, None) => {
            return Err(ParseError::Framing(
                "Transfer-Encoding without final chunked",
            ));
        }
        (false, Some(0)) | (false, None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    };
    if minor >= 1 && head.host.is_none() {
        return Err(ParseError::Malformed("HTTP/1.1 request without Host"));
    }
    Ok(Some(head))
}

/// Origin form (`/path`), absolute form (`http://host/path`), or `*` for
/// OPTIONS; ELB is no forward proxy, so CONNECT's authority form is refused.
fn valid_target(method: &[u8], target: &[u8]) -> bool {
    let starts = |prefix: &[u8]| {
        target.len() >= prefix.len() && target[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    target.starts_with(b"/")
        || (target == b"*" && method == b"OPTIONS")
        || starts(b"http://")
        || starts(b"https://")
}

/// What the headers say about framing and the connection, the same for a
/// request and a response.
#[derive(Default)]
struct Framing {
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// "chunked" is the final coding (only then does it frame the body).
    chunked: bool,
    connection_upgrade: bool,
    named: ConnectionNames,
}

/// At most this many fields may be named in a message's `Connection`
/// headers: each header line is compared with each name, so the names are
/// bounded to keep that linear in the head's size (real messages name one
/// or two).
const MAX_CONNECTION_NAMES: usize = 16;

/// The fields a message's `Connection` headers name (RFC 9110 7.6.1), as
/// ranges of the buffer it was parsed from, kept in the head itself so that
/// a proxied message allocates nothing for them. Options ELB acts on itself
/// (`close`, `upgrade`), names already in the hop-by-hop set, and the fields
/// ELB passes on as the message's own (see [`super::is_hop_by_hop`]) are not
/// kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionNames {
    names: [Range<usize>; MAX_CONNECTION_NAMES],
    len: usize,
}

impl ConnectionNames {
    /// Whether `name` is among the names (case-insensitive).
    pub fn contains(&self, buf: &[u8], name: &[u8]) -> bool {
        self.names[..self.len]
            .iter()
            .any(|r| buf[r.clone()].eq_ignore_ascii_case(name))
    }

    fn push(&mut self, name: Range<usize>) -> Result<(), ParseError> {
        let slot = self
            .names
            .get_mut(self.len)
            .ok_or(ParseError::Malformed("too many fields named in Connection"))?;
        *slot = name;
        self.len += 1;
        Ok(())
    }
}

impl Framing {
    /// Takes in a header if it is one of these; returns whether it was.
    fn take(
        &mut self,
        buf: &[u8],
        name: &[u8],
        value: &[u8],
        minor: u8,
        keep_alive: &mut bool,
    ) -> Result<bool, ParseError> {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value)?;
            if self.content_length.is_some_and(|c| c != n) {
                return Err(ParseError::Framing("differing Content-Length"));
            }
            self.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            self.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    *keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    *keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    self.connection_upgrade = true;
                } else if !token.is_empty() && super::nominable(token) {
                    self.named.push(range_of(buf, token))?;
                }
            }
        } else {
            return Ok(false);
        }
        Ok(true)
    }
}

fn parse_length(v: &[u8]) -> Result<u64, ParseError> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Framing("invalid Content-Length"));
    }
    v.iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(ParseError::Framing("invalid Content-Length"))
}

/// The value without surrounding spaces and tabs.
pub fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, ParseError> {
        parse_request(s.as_bytes(), 64 << 10)
    }

    #[test]
    fn a_simple_get_is_parsed_in_place() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: Example.com\r\nUser-Agent: x\r\n\r\n";
        let h = parse(raw).expect("ok").expect("complete");
        assert_eq!(h.len, raw.len());
        assert_eq!(h.target(raw.as_bytes()), b"/a?b=1");
        assert_eq!(
            &raw.as_bytes()[h.host.clone().expect("host")],
            b"Example.com"
        );
        assert!(h.keep_alive);
        assert_eq!(h.body, BodyKind::None);
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_431() {
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "a".repeat(70_000));
        assert_eq!(parse(&big), Err(ParseError::TooLarge));
        let cookie = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nCookie: {}\r\n\r\n",
            "c".repeat(48 << 10)
        );
        assert!(parse(&cookie).expect("48k cookie passes").is_some());
        let many: String = (0..300).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(
            parse(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n"))
                .expect("300 small headers pass")
                .is_some()
        );
    }

    #[test]
    fn framing_ambiguities_are_refused() {
        let both =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse(both), Err(ParseError::Framing(_))));
        let two = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(parse(two), Err(ParseError::Framing(_))));
        let same = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            parse(same).expect("ok").expect("complete").body,
            BodyKind::Length(3)
        );
        let signed = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n";
        assert!(matches!(parse(signed), Err(ParseError::Framing(_))));
    }

    #[test]
    fn malformed_requests_are_400() {
        for raw in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "G\0T / HTTP/1.1\r\n\r\n",
            "GET img/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(parse(raw).map_err(ParseError::status), Err(400), "{raw:?}");
        }
        let h = parse("GET / HTTP/1.0\r\n\r\n")
            .expect("1.0 needs no Host")
            .expect("complete");
        assert!(!h.keep_alive);
    }

    #[test]
    fn connection_names_are_kept_except_options_and_framing() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-A ,, keep-alive\r\n\
                   connection:upgrade,x-b, Content-Length, HOST, te\r\n\r\n";
        let h = parse(raw).expect("ok").expect("complete");
        let buf = raw.as_bytes();
        for name in ["x-a", "X-B"] {
            assert!(h.connection.contains(buf, name.as_bytes()), "{name}");
        }
        for name in [
            "close",
            "keep-alive",
            "upgrade",
            "content-length",
            "host",
            "te",
        ] {
            assert!(!h.connection.contains(buf, name.as_bytes()), "{name}");
        }
        assert!(!h.keep_alive);
        let names: Vec<String> = (0..=MAX_CONNECTION_NAMES)
            .map(|i| format!("x-{i}"))
            .collect();
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: {}\r\n\r\n",
            names.join(",")
        );
        assert_eq!(parse(&many).map_err(ParseError::status), Err(400));
    }

    #[test]
    fn a_response_reason_is_what_the_parser_accepted_and_nothing_after() {
        let raw = b"HTTP/1.1 200 OK\nX-Injected: yes\r\nContent-Length: 0\r\n\r\n";
        let h = parse_response(raw, 1 << 16, Vec::new())
            .expect("ok")
            .expect("complete");
        assert_eq!(&raw[h.reason.clone()], b"OK");
        assert_eq!(h.headers.len(), 2);
        let obs = b"HTTP/1.1 404 Nicht gefunden \xfc\r\nContent-Length: 0\r\n\r\n";
        let h = parse_response(obs, 1 << 16, Vec::new())
            .expect("ok")
            .expect("complete");
        assert_eq!(h.reason, 0..0);
    }

    /// Found by the response_head fuzz target: "055" parsed as 55 and was
    /// rebuilt for the client as a two-digit status line.
    #[test]
    fn a_status_below_100_is_not_a_response() {
        for raw in [
            &b"HTTP/1.1 055 X\r\n\r\n"[..],
            b"HTTP/1.1 000\r\nConnect_on:\n\n",
        ] {
            assert_eq!(
                parse_response(raw, 1 << 16, Vec::new()),
                Err(ParseError::Malformed("status code"))
            );
        }
        let h = parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", 1 << 16, Vec::new())
            .expect("ok")
            .expect("complete");
        assert_eq!(h.status, 100);
    }
}

/// A parsed response head from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    /// The reason phrase: only bytes the parser accepted (tab, space,
    /// visible ASCII), never a line end; empty if the peer sent none.
    pub reason: Range<usize>,
    pub minor_version: u8,
    /// Framing, before the request method and status are taken into account.
    pub body: BodyKind,
    /// Whether the peer sent no length: the body runs to the connection's end.
    pub until_close: bool,
    pub keep_alive: bool,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    /// The fields its `Connection` headers name.
    pub connection: ConnectionNames,
}

/// Parses a peer's response head at the start of `buf`, filling `headers`
/// (cleared first) so that a caller can hand the same vector back answer
/// after answer.
pub fn parse_response(
    buf: &[u8],
    max_size: usize,
    mut headers: Vec<(Range<usize>, Range<usize>)>,
) -> Result<Option<ResponseHead>, ParseError> {
    headers.clear();
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_size => n,
        Ok(httparse::Status::Partial) if buf.len() < max_size => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooLarge),
        Err(_) => return Err(ParseError::Malformed("response")),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(ParseError::Malformed("status line"));
    };
    // Three digits, the first a class (RFC 9112 4): "055" parses as 55,
    // which rebuilt for the client would be a two-digit status line. nginx
    // refuses a leading 0 the same way.
    if status < 100 {
        return Err(ParseError::Malformed("status code"));
    }
    // The parser gives a static "" for a reason with obs-text: not in `buf`.
    let reason = match resp.reason {
        Some(r) if !r.is_empty() => range_of(buf, r.as_bytes()),
        _ => 0..0,
    };
    let mut head = ResponseHead {
        len,
        status,
        reason,
        minor_version: minor,
        body: BodyKind::None,
        until_close: false,
        keep_alive: minor >= 1,
        headers,
        connection: ConnectionNames::default(),
    };
    let mut framing = Framing::default();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = trim(h.value);
        head.headers
            .push((range_of(buf, name), range_of(buf, value)));
        framing.take(buf, name, value, minor, &mut head.keep_alive)?;
    }
    let Framing {
        content_length,
        chunked,
        named,
        ..
    } = framing;
    head.connection = named;
    // Transfer-Encoding wins over Content-Length (RFC 9112 6.3), and such a
    // connection is not reused.
    head.body = if chunked {
        if content_length.is_some() {
            head.keep_alive = false;
        }
        BodyKind::Chunked
    } else if let Some(n) = content_length {
        BodyKind::Length(n)
    } else {
        head.until_close = true;
        head.keep_alive = false;
        BodyKind::None
    };
    Ok(Some(head))
}
