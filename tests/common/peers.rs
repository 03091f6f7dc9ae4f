//! Special-purpose test peers (the upstream servers behind elb) on std
//! threads, and the client-side bits the proxy tests share: starting an elb
//! routed to peers, body patterns and their sha256, chunked and WebSocket
//! framing, a seeded PRNG, raw reads, and which worker holds a connection.
//!
//! A [`Peer`] in [`Mode::Echo`] reads each request (a Content-Length or
//! chunked body, decoded and hashed), records it, and answers as these
//! request headers ask:
//!
//! | request header | effect |
//! |---|---|
//! | `X-Reply-Status: N` | status N (default 200; [`Peer::set_status`] wins over it) |
//! | `X-Reply-Bytes: N` | a body of [`pattern`]`(N)` |
//! | `X-Echo: 1` | the request body back |
//! | `X-Reply-Chunked: 1` | the body framed by [`chunked`] (extension, upper-case sizes, trailer) |
//! | `X-Set-Cookies: N` | N `Set-Cookie: cI=vI; Path=/` headers |
//! | `X-Reply-Delay-Ms: N` | N ms before answering |
//! | `X-Send-100: 1` | its own `100 Continue` before reading the body |
//! | `X-Close: 1` | `Connection: close`, then it closes |
//! | `X-Reply-Unframed: 1` | no length, no `Connection` header: the body ends with the connection |
//!
//! Every answer says what the peer saw: `X-Peer` (its name), `X-Method`,
//! `X-Target`, `X-Body-Len`, `X-Body-Sha256`, `X-Conn` (the number of the
//! connection it came on, from 1). Without `X-Reply-Bytes` or `X-Echo` the
//! body is `NAME METHOD TARGET\n`. HEAD gets the GET head (with its
//! Content-Length) and no body; 204 has no length and no body; 304 has the
//! GET's Content-Length and no body. A request with `Upgrade: websocket` is
//! answered `101`, followed at once (same write) by a text frame
//! `hello from NAME`; then every data frame is echoed, ping answered by
//! pong, close by close.
//!
//! Other modes: [`Mode::Hang`] (reads, never answers), [`Mode::CloseAll`]
//! (reads the request, closes without answering), [`Mode::CloseReused`]
//! (answers the first request of a connection; a later request on it is read
//! and the connection closed without an answer: a kept-alive connection that
//! the peer closed meanwhile), [`Mode::IdleClose`] (closes a connection idle
//! for that long after an answer), [`Mode::Garbage`] (reads the request,
//! answers with bytes that are not HTTP, closes), [`Mode::Raw`] (reads each
//! request and answers with exactly these bytes, keeping the connection).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::{Elb, HTTP_TIMEOUT, HttpConn, Response, TempDir};

/// How often a peer's blocked read looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A request head larger than this makes the peer drop the connection.
const MAX_HEAD: usize = 1 << 20;

/// The domain and upstream names [`Proxy::route_to`] sets up.
pub const DOMAIN: &str = "d.test";
pub const UPSTREAM: &str = "up";

/// How a [`Peer`] behaves; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Hang,
    CloseAll,
    CloseReused,
    IdleClose(Duration),
    Garbage,
    Raw(&'static [u8]),
}

/// A request as a peer received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub version: String,
    /// In order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body came chunked.
    pub chunked: bool,
    pub body_len: usize,
    pub body_sha256: String,
    /// The connection it came on (1 for the first the peer accepted).
    pub conn: usize,
}

impl Seen {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        super::header(&self.headers, name)
    }
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    dropped: AtomicUsize,
    idle_closed: AtomicUsize,
    cut_short: AtomicUsize,
    status: AtomicU16,
    stop: AtomicBool,
}

/// A test peer listening on 127.0.0.1; stopped on drop.
pub struct Peer {
    name: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Peer {
    pub fn start(name: &str, mode: Mode) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test peer");
        let addr = listener.local_addr().expect("peer address");
        let shared = Arc::new(Shared::default());
        let (s, n) = (Arc::clone(&shared), name.to_string());
        let accept = std::thread::Builder::new()
            .name(format!("peer-{name}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if s.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let id = s.connections.fetch_add(1, Ordering::AcqRel) + 1;
                    let (s, n) = (Arc::clone(&s), n.clone());
                    std::thread::spawn(move || {
                        let _ = serve(stream, id, &s, &n, mode);
                    });
                }
            })
            .expect("spawn a peer thread");
        Peer {
            name: name.to_string(),
            addr,
            shared,
            accept: Some(accept),
        }
    }

    pub fn echo(name: &str) -> Peer {
        Peer::start(name, Mode::Echo)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Answers every later request with `status` (0: as the request asks).
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Release);
    }

    /// Every request received so far (recorded before it is answered).
    pub fn seen(&self) -> Vec<Seen> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The number of requests received.
    pub fn requests(&self) -> usize {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The number of requests received with this method.
    pub fn count_method(&self, method: &str) -> usize {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s.method == method)
            .count()
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Requests read and not answered properly ([`Mode::CloseAll`],
    /// [`Mode::CloseReused`], [`Mode::Garbage`]).
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::Acquire)
    }

    /// Connections closed for idleness ([`Mode::IdleClose`]).
    pub fn idle_closed(&self) -> usize {
        self.shared.idle_closed.load(Ordering::Acquire)
    }

    /// Connections that ended in the middle of a request.
    pub fn cut_short(&self) -> usize {
        self.shared.cut_short.load(Ordering::Acquire)
    }

    /// Waits until `n` requests were received; true if so.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.requests() >= n)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wakes the blocked accept, which then sees the flag (if that
        // fails, the thread is left to end with the process).
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(t) = self.accept.take().filter(|_| woken) {
            let _ = t.join();
        }
    }
}

/// One accepted connection of a peer, with its read buffer.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: &'a Shared,
}

impl Conn<'_> {
    /// Reads once more into the buffer; 0 at EOF. Fails when the peer is
    /// stopped, or with `TimedOut` once `until` has passed.
    fn fill(&mut self, until: Option<Instant>) -> io::Result<usize> {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(io::Error::other("peer stopped"));
            }
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if until.is_some_and(|u| Instant::now() >= u) {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "idle"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn more(&mut self) -> io::Result<()> {
        if self.fill(None)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed mid-request",
            ));
        }
        Ok(())
    }

    fn take_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.more()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn take_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.more()?;
        }
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                while !self.take_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take_exact(size)?);
            if !self.take_line()?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }
}

fn serve(stream: TcpStream, id: usize, shared: &Shared, name: &str, mode: Mode) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let _ = stream.set_nodelay(true);
    let mut c = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    let mut answered = 0usize;
    loop {
        let idle = match mode {
            Mode::IdleClose(d) if answered > 0 => Some(Instant::now() + d),
            _ => None,
        };
        let head_end = loop {
            if let Some(i) = find(&c.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if c.buf.len() > MAX_HEAD {
                return Ok(());
            }
            match c.fill(if c.buf.is_empty() { idle } else { None }) {
                Ok(0) => {
                    if !c.buf.is_empty() {
                        shared.cut_short.fetch_add(1, Ordering::AcqRel);
                    }
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    // The FIN goes out before the count says so.
                    let _ = c.stream.shutdown(Shutdown::Both);
                    shared.idle_closed.fetch_add(1, Ordering::AcqRel);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        };
        let head = String::from_utf8_lossy(&c.buf[..head_end - 4]).into_owned();
        c.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or_default().splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let h = |n: &str| super::header(&headers, n);
        let chunked = h("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if h("x-send-100") == Some("1") {
            c.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = if chunked {
            c.read_chunked()
        } else if let Some(n) = h("content-length").and_then(|v| v.parse::<usize>().ok()) {
            c.take_exact(n)
        } else {
            Ok(Vec::new())
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                shared.cut_short.fetch_add(1, Ordering::AcqRel);
                return Err(e);
            }
        };
        let seen = Seen {
            method,
            target,
            version,
            headers: headers.clone(),
            chunked,
            body_len: body.len(),
            body_sha256: sha256_hex(&body),
            conn: id,
        };
        shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seen.clone());
        match mode {
            Mode::Hang => loop {
                c.buf.clear();
                if c.fill(None)? == 0 {
                    return Ok(());
                }
            },
            Mode::CloseAll => {
                let _ = c.stream.shutdown(Shutdown::Both);
                shared.dropped.fetch_add(1, Ordering::AcqRel);
                return Ok(());
            }
            Mode::Garbage => {
                c.stream
                    .write_all(b"HTTP/1.1 2OO NOT OK\r\nthis is not http\r\n\r\n")?;
                let _ = c.stream.shutdown(Shutdown::Write);
                shared.dropped.fetch_add(1, Ordering::AcqRel);
                return Ok(());
            }
            Mode::Raw(answer) => {
                c.stream.write_all(answer)?;
                answered += 1;
                continue;
            }
            Mode::CloseReused if answered > 0 => {
                let _ = c.stream.shutdown(Shutdown::Both);
                shared.dropped.fetch_add(1, Ordering::AcqRel);
                return Ok(());
            }
            _ => {}
        }
        if seen
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        {
            return websocket(&mut c, &seen, name);
        }
        let close = respond(&mut c, &seen, &body, name)?;
        answered += 1;
        if close {
            let _ = c.stream.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

/// Writes the answer to `seen`; true when the connection is to be closed.
fn respond(c: &mut Conn<'_>, seen: &Seen, body_in: &[u8], name: &str) -> io::Result<bool> {
    let h = |n: &str| seen.header(n);
    let num = |n: &str| h(n).and_then(|v| v.parse::<usize>().ok());
    if let Some(ms) = num("x-reply-delay-ms") {
        std::thread::sleep(Duration::from_millis(ms as u64));
    }
    let fixed = c.shared.status.load(Ordering::Acquire);
    let status = if fixed != 0 {
        fixed
    } else {
        h("x-reply-status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    };
    let body = if h("x-echo") == Some("1") {
        body_in.to_vec()
    } else if let Some(n) = num("x-reply-bytes") {
        pattern(n)
    } else {
        format!("{name} {} {}\n", seen.method, seen.target).into_bytes()
    };
    let chunked_reply = h("x-reply-chunked") == Some("1");
    let unframed = h("x-reply-unframed") == Some("1");
    let close = unframed
        || h("x-close") == Some("1")
        || h("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nX-Peer: {name}\r\nX-Method: {}\r\nX-Target: {}\r\nX-Body-Len: {}\r\nX-Body-Sha256: {}\r\nX-Conn: {}\r\n",
        reason(status),
        seen.method,
        seen.target,
        seen.body_len,
        seen.body_sha256,
        seen.conn
    );
    for i in 0..num("x-set-cookies").unwrap_or(0) {
        head.push_str(&format!("Set-Cookie: c{i}=v{i}; Path=/\r\n"));
    }
    if status == 204 || unframed {
    } else if chunked_reply {
        head.push_str("Transfer-Encoding: chunked\r\n");
    } else {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close && !unframed {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    let no_body = seen.method == "HEAD" || status == 204 || status == 304 || status < 200;
    if !no_body {
        if chunked_reply {
            out.extend(chunked(&body));
        } else {
            out.extend_from_slice(&body);
        }
    }
    c.stream.write_all(&out)?;
    Ok(close)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Whatever",
    }
}

fn websocket(c: &mut Conn<'_>, seen: &Seen, name: &str) -> io::Result<()> {
    let key = seen.header("sec-websocket-key").unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ws_accept(key)
    )
    .into_bytes();
    out.extend(ws_frame(
        WS_TEXT,
        format!("hello from {name}").as_bytes(),
        None,
    ));
    c.stream.write_all(&out)?;
    loop {
        let frame = loop {
            if let Some(f) = ws_parse(&c.buf) {
                break f;
            }
            if c.fill(None)? == 0 {
                return Ok(());
            }
        };
        c.buf.drain(..frame.len);
        match frame.opcode {
            WS_CLOSE => {
                c.stream
                    .write_all(&ws_frame(WS_CLOSE, &frame.payload, None))?;
                return Ok(());
            }
            WS_PING => c
                .stream
                .write_all(&ws_frame(WS_PONG, &frame.payload, None))?,
            op => c.stream.write_all(&ws_frame(op, &frame.payload, None))?,
        }
    }
}

// --- elb routed to peers -------------------------------------------------------

/// An elb with 2 workers started with a config file; dropping it kills elb
/// (then removes the file).
pub struct Proxy {
    pub elb: Elb,
    _dir: TempDir,
}

impl Proxy {
    /// Starts `elb --workers 2 --config FILE` with `config` (TOML) in FILE.
    pub fn start(config: &str) -> Proxy {
        let dir = TempDir::new("proxy");
        let path = dir.write("elb.toml", config);
        let elb = Elb::builder()
            .workers(2)
            .arg("--config")
            .arg(path.to_string_lossy().into_owned())
            .start();
        Proxy { elb, _dir: dir }
    }

    /// The proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.elb.listen_addr()
    }

    /// A request to the admin API; fails the test unless it is answered.
    pub fn admin(&self, method: &str, path: &str, body: &str) -> Response {
        let mut c = HttpConn::connect(self.elb.admin_addr(), HTTP_TIMEOUT).expect("connect admin");
        c.request(
            method,
            "127.0.0.1",
            path,
            &[
                ("Content-Type", "application/json"),
                ("Connection", "close"),
            ],
            body.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("admin {method} {path}: {e}"))
    }

    /// Sets upstream `name` to these peers (address, nginx parameters).
    pub fn set_upstream(&self, name: &str, peers: &[(SocketAddr, &str)]) {
        let list: serde_json::Map<String, serde_json::Value> = peers
            .iter()
            .map(|(a, p)| (a.to_string(), serde_json::Value::String(p.to_string())))
            .collect();
        let body = serde_json::json!({ name: list }).to_string();
        let r = self.admin("PUT", "/__erulb__/upstream", &body);
        assert_eq!(r.status, 200, "PUT upstream {body}: {}", r.body_text());
    }

    /// Routes `domain` to upstream `upstream` with a single backend rule.
    pub fn set_domain(&self, domain: &str, upstream: &str) {
        let body = serde_json::json!({
            domain: {"init": "go", "rules": {"go": {"type": "backend", "args": {"servername": upstream}}}}
        })
        .to_string();
        let r = self.admin("PUT", "/__erulb__/domain", &body);
        assert_eq!(r.status, 200, "PUT domain {body}: {}", r.body_text());
    }

    /// [`UPSTREAM`] = `peers`, and [`DOMAIN`] routed to it.
    pub fn route_to(&self, peers: &[(SocketAddr, &str)]) {
        self.set_upstream(UPSTREAM, peers);
        self.set_domain(DOMAIN, UPSTREAM);
    }

    /// A new client connection to the proxy listener.
    pub fn conn(&self, timeout: Duration) -> HttpConn {
        HttpConn::connect(self.addr(), timeout).expect("connect to elb")
    }

    /// `method path` for [`DOMAIN`] on a new connection (closed after).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut c = HttpConn::connect(self.addr(), HTTP_TIMEOUT)?;
        let mut h = headers.to_vec();
        h.push(("Connection", "close"));
        c.request(method, DOMAIN, path, &h, body)
    }

    /// Fails the test unless the workers are still `workers` and a normal
    /// request through elb gets 200 from `peer`.
    pub fn assert_healthy(&mut self, workers: &[i32], peer: &Peer, after: &str) {
        let now = self.elb.workers();
        assert!(
            self.elb.running(),
            "elb exited after {after}; stderr:\n{}",
            self.elb.stderr()
        );
        assert_eq!(now, workers, "worker PIDs changed after {after}");
        let r = self
            .request("GET", "/healthy", &[], b"")
            .unwrap_or_else(|e| panic!("a normal request after {after}: {e}"));
        assert_eq!(r.status, 200, "a normal request after {after}: {r:?}");
        assert_eq!(r.header("x-peer"), Some(peer.name()), "{r:?}");
    }
}

// --- bodies ------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*), for bodies and fuzzing.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// `n` deterministic pseudo-random bytes (the same for the same `n`).
pub fn pattern(n: usize) -> Vec<u8> {
    Rng::new(n as u64 + 7).bytes(n)
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `body` in chunked framing as the peers send it: sizes cycling through
/// 1, 7, 100, 4096, 65536, 12345; an extension on the first chunk; upper-case
/// hex after it; a trailer.
pub fn chunked(body: &[u8]) -> Vec<u8> {
    const SIZES: [usize; 6] = [1, 7, 100, 4096, 65536, 12345];
    let mut out = Vec::with_capacity(body.len() + 1024);
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = SIZES[i % SIZES.len()].min(rest.len());
        if i == 0 {
            out.extend_from_slice(format!("{n:x};ext=1\r\n").as_bytes());
        } else {
            out.extend_from_slice(format!("{n:X}\r\n").as_bytes());
        }
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
        i += 1;
    }
    out.extend_from_slice(b"0\r\nX-Trailer: done\r\n\r\n");
    out
}

// --- WebSocket -----------------------------------------------------------------

pub const WS_TEXT: u8 = 0x1;
pub const WS_BINARY: u8 = 0x2;
pub const WS_CLOSE: u8 = 0x8;
pub const WS_PING: u8 = 0x9;
pub const WS_PONG: u8 = 0xA;

/// One parsed WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    /// Bytes it took in the buffer.
    pub len: usize,
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    /// Unmasked.
    pub payload: Vec<u8>,
}

/// A final frame; masked (as a client sends) when `mask` is given.
pub fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// The frame at the start of `buf`, if it is complete.
pub fn ws_parse(buf: &[u8]) -> Option<WsFrame> {
    if buf.len() < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let mut len = u64::from(buf[1] & 0x7f);
    let mut i = 2;
    if len == 126 {
        len = u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?));
        i = 4;
    } else if len == 127 {
        len = u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?);
        i = 10;
    }
    let mask: Option<[u8; 4]> = if masked {
        let k = buf.get(i..i + 4)?.try_into().ok()?;
        i += 4;
        Some(k)
    } else {
        None
    };
    let len = usize::try_from(len).ok()?;
    let mut payload = buf.get(i..i.checked_add(len)?)?.to_vec();
    if let Some(k) = mask {
        for (j, b) in payload.iter_mut().enumerate() {
            *b ^= k[j % 4];
        }
    }
    Some(WsFrame {
        len: i + len,
        fin: buf[0] & 0x80 != 0,
        opcode: buf[0] & 0x0f,
        masked,
        payload,
    })
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn ws_accept(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64(&h.finalize())
}

pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// --- raw client side -------------------------------------------------------------

/// How a server answered raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A status line came (with all bytes read up to then).
    Status(u16, Vec<u8>),
    /// The connection was closed (EOF or reset) before a status line; the
    /// bytes that came before.
    Closed(Vec<u8>),
    /// Neither within the timeout; the bytes that came.
    Silent(Vec<u8>),
}

/// Reads from `stream` until a complete status line, a close, or `timeout`.
pub fn first_reply(stream: &mut TcpStream, timeout: Duration) -> Reply {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = find(&got, b"\r\n") {
            let line = String::from_utf8_lossy(&got[..i]).into_owned();
            let mut parts = line.split(' ');
            let version = parts.next().unwrap_or_default();
            let status = parts.next().and_then(|s| s.parse().ok());
            if let (true, Some(status)) = (version.starts_with("HTTP/1."), status) {
                return Reply::Status(status, got);
            }
            return Reply::Closed(got);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Reply::Silent(got);
        }
        let _ = stream.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match stream.read(&mut chunk) {
            Ok(0) => return Reply::Closed(got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Reply::Closed(got),
        }
    }
}

/// Reads until the server closes (EOF or reset); `Err(bytes so far)` if it
/// has not within `timeout`.
pub fn read_until_close(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(got);
        }
        let _ = stream.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Ok(got),
        }
    }
}

/// Splits a raw response at the end of its head: (head text, the rest).
pub fn split_head(raw: &[u8]) -> Option<(String, &[u8])> {
    let i = find(raw, b"\r\n\r\n")?;
    Some((
        String::from_utf8_lossy(&raw[..i]).into_owned(),
        &raw[i + 4..],
    ))
}

/// The values of every header `name` in a head's text (case-insensitive).
pub fn head_values(head: &str, name: &str) -> Vec<String> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// Shows bytes for a failure message: text as text, the rest escaped, cut
/// to `max` bytes.
pub fn show(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let mut s: String = cut.escape_ascii().to_string();
    if bytes.len() > max {
        s.push_str(&format!("… ({} bytes)", bytes.len()));
    }
    s
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// --- which worker ------------------------------------------------------------------

/// The worker (of `workers`) that holds the server side of the TCP
/// connection `client` → `server`, found through `/proc/net/tcp` and the
/// workers' descriptor tables.
pub fn worker_holding(workers: &[i32], server: SocketAddr, client: SocketAddr) -> Option<i32> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let inode = text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9
            && port(f[1]) == Some(server.port())
            && port(f[2]) == Some(client.port())
            && f[9] != "0")
            .then(|| f[9].to_string())
    })?;
    let target = format!("socket:[{inode}]");
    workers.iter().copied().find(|w| {
        std::fs::read_dir(format!("/proc/{w}/fd")).is_ok_and(|d| {
            d.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(target.as_str()))
            })
        })
    })
}
