//! A real HTTP/1.1 echo backend for the proxy tests, and a small client of
//! the admin API.
//!
//! [`Backend`] listens on `127.0.0.1:0` and serves each connection in a
//! thread of its own, with keep-alive. Every request is answered `200` with a
//! JSON body describing what arrived:
//!
//! ```json
//! {"name": "a", "method": "GET", "path": "/x?q=1", "version": "HTTP/1.1",
//!  "headers": {"host": "…"}, "header_list": [["host", "…"]],
//!  "body_len": 0, "body": "", "conn": 1, "seq": 1}
//! ```
//!
//! `headers` has lower-case names (the last value wins), `header_list` every
//! header in order (lower-case names), `conn` the number of the connection
//! (from 1) and `seq` of the request (from 1) at this backend. It counts
//! accepted connections and requests, so that tests can see keep-alive reuse.
//! Dropping it stops it: the accept loop, and every connection it holds.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{HTTP_TIMEOUT, HttpConn, Response};

/// Longest request head the backend reads.
const MAX_HEAD: usize = 256 << 10;

/// A running echo backend.
pub struct Backend {
    name: String,
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Clones of the open connections, to shut them down on drop.
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend that names itself `name` in its answers.
    pub fn start(name: &str) -> Backend {
        Backend::start_at(name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// As [`Backend::start`], on `addr` (to start one again where a stopped
    /// one was).
    pub fn start_at(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).expect("bind echo backend");
        let addr = listener.local_addr().expect("backend address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            name: name.to_string(),
            connections: Arc::clone(&connections),
            requests: Arc::clone(&requests),
            stop: Arc::clone(&stop),
            open: Arc::clone(&open),
        };
        let accept = std::thread::Builder::new()
            .name(format!("echo-{name}"))
            .spawn(move || accept_loop(listener, shared))
            .expect("spawn echo backend");
        Backend {
            name: name.to_string(),
            addr,
            connections,
            requests,
            stop,
            open,
            accept: Some(accept),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`, as a peer of an upstream or a direct servername.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests answered so far (counted before the answer is written).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

struct Shared {
    name: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

fn accept_loop(listener: TcpListener, shared: Shared) {
    let shared = Arc::new(shared);
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else { continue };
        let n = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(clone) = stream.try_clone() {
            shared
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(clone);
        }
        let shared = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name(format!("echo-{}-{n}", shared.name))
            .spawn(move || {
                let _ = serve(stream, n, &shared);
            });
    }
}

/// One parsed request.
struct Request {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn serve(stream: TcpStream, conn: usize, shared: &Shared) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(req) = read_request(&mut reader)? else {
            return Ok(());
        };
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let seq = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let connection = last(&req.headers, "connection").map(|v| v.to_ascii_lowercase());
        let keep = match connection.as_deref() {
            Some(v) if v.contains("close") => false,
            Some(v) if v.contains("keep-alive") => true,
            _ => req.version == "HTTP/1.1",
        };
        let mut map = Map::new();
        for (k, v) in &req.headers {
            map.insert(k.clone(), Value::String(v.clone()));
        }
        let list: Vec<Value> = req.headers.iter().map(|(k, v)| json!([k, v])).collect();
        let body = json!({
            "name": shared.name,
            "method": req.method,
            "path": req.target,
            "version": req.version,
            "headers": map,
            "header_list": list,
            "body_len": req.body.len(),
            "body": String::from_utf8_lossy(&req.body),
            "conn": conn,
            "seq": seq,
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Echo-Name: {}\r\nConnection: {}\r\n\r\n",
            body.len(),
            shared.name,
            if keep { "keep-alive" } else { "close" }
        );
        let mut out = head.into_bytes();
        if req.method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        writer.write_all(&out)?;
        writer.flush()?;
        if !keep {
            let _ = writer.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

fn last<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one line (without its CRLF); `None` at a clean end of stream.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take((*budget as u64).saturating_add(1))
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(invalid("request head too large"));
    }
    *budget -= n;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut budget = MAX_HEAD;
    // Empty lines before a request line are allowed (RFC 9112 2.2).
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("bad request line {line:?}")));
    };
    let mut headers = Vec::new();
    loop {
        let Some(l) = read_line(r, &mut budget)? else {
            return Err(invalid("end of stream in a request head"));
        };
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let chunked = last(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut line_budget = MAX_HEAD;
            let Some(size) = read_line(r, &mut line_budget)? else {
                return Err(invalid("end of stream in a chunked body"));
            };
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                let mut trailers = MAX_HEAD;
                while read_line(r, &mut trailers)?.is_some_and(|l| !l.is_empty()) {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = last(&headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| invalid(format!("bad Content-Length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        body,
    }))
}

// --- what a backend received ---------------------------------------------------

/// The JSON an echo backend answered: what it received.
#[derive(Debug, Clone)]
pub struct Echo(pub Value);

impl Echo {
    /// The echo in a response; fails the test, showing the response, if the
    /// response is not a 200 from an echo backend.
    pub fn of(r: &Response) -> Echo {
        assert_eq!(
            r.status,
            200,
            "expected an echo backend's 200, got {} {:?}: {}",
            r.status,
            r.headers,
            r.body_text()
        );
        let v: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("not an echo backend's JSON ({e}): {}", r.body_text()));
        assert!(v.get("name").is_some(), "not an echo backend's answer: {v}");
        Echo(v)
    }

    fn str_field(&self, k: &str) -> &str {
        self.0.get(k).and_then(Value::as_str).unwrap_or_default()
    }

    /// The name of the backend that answered.
    pub fn name(&self) -> &str {
        self.str_field("name")
    }

    pub fn method(&self) -> &str {
        self.str_field("method")
    }

    /// The request target as received, with its query.
    pub fn path(&self) -> &str {
        self.str_field("path")
    }

    pub fn version(&self) -> &str {
        self.str_field("version")
    }

    /// The last header of that name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0
            .get("headers")
            .and_then(|h| h.get(name.to_ascii_lowercase()))
            .and_then(Value::as_str)
    }

    /// Every header of that name (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.0
            .get("header_list")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter(|p| p.get(0).and_then(Value::as_str) == Some(name.as_str()))
                    .filter_map(|p| p.get(1).and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn body_len(&self) -> usize {
        self.0
            .get("body_len")
            .and_then(Value::as_u64)
            .unwrap_or_default() as usize
    }

    /// The body received, as text.
    pub fn body(&self) -> &str {
        self.str_field("body")
    }

    /// Which connection of the backend (from 1) carried the request.
    pub fn conn(&self) -> u64 {
        self.0
            .get("conn")
            .and_then(Value::as_u64)
            .unwrap_or_default()
    }
}

// --- requests through elb --------------------------------------------------------

/// `GET path` with `Host: host` and the extra headers, on a new connection
/// with `Connection: close`.
pub fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", host, path, headers, b"")
}

/// A request on a new connection with `Connection: close`; fails the test
/// on an I/O error (naming the request).
pub fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("Connection", "close"));
    HttpConn::connect(addr, HTTP_TIMEOUT)
        .and_then(|mut c| c.request(method, host, path, &h, body))
        .unwrap_or_else(|e| panic!("{method} {path} (Host: {host}) via {addr}: {e}"))
}

/// The name of the echo backend that answered `GET path` for `host` (with
/// a User-Agent when given).
pub fn routed_to(addr: SocketAddr, host: &str, path: &str, ua: Option<&str>) -> String {
    let headers: Vec<(&str, &str)> = ua.map(|u| ("User-Agent", u)).into_iter().collect();
    Echo::of(&get(addr, host, path, &headers))
        .name()
        .to_string()
}

// --- the admin API ---------------------------------------------------------------

/// An admin API answer.
#[derive(Debug, Clone)]
pub struct AdminAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` if it is not JSON; see `text`).
    pub json: Value,
    pub text: String,
}

/// Sends `method path` with a raw body (and extra headers) to an admin
/// endpoint on a new connection.
pub fn admin_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> AdminAnswer {
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if !body.is_empty() {
        h.push(("Content-Type", "application/json"));
    }
    let r = request(addr, method, "localhost", path, &h, body);
    answer(r)
}

/// The admin answer in a response.
pub fn answer(r: Response) -> AdminAnswer {
    AdminAnswer {
        status: r.status,
        content_type: r.header("content-type").map(str::to_string),
        json: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        text: r.body_text(),
    }
}

/// Sends `method path` with a JSON body (or none) to an admin endpoint.
pub fn admin(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> AdminAnswer {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    admin_raw(addr, method, path, &[], body.as_bytes())
}

/// `PUT /__erulb__/domain` with `sets`; fails the test unless it answers
/// `200 {"msg":"OK"}`.
pub fn put_domains(addr: SocketAddr, sets: &Value) {
    let a = admin(addr, "PUT", "/__erulb__/domain", Some(sets));
    assert_eq!(
        (a.status, &a.json),
        (200, &json!({"msg": "OK"})),
        "PUT /__erulb__/domain {sets}: {}",
        a.text
    );
}

/// `PUT /__erulb__/upstream` with `ups`; fails the test unless it answers
/// `200 {"msg":"OK"}`.
pub fn put_upstreams(addr: SocketAddr, ups: &Value) {
    let a = admin(addr, "PUT", "/__erulb__/upstream", Some(ups));
    assert_eq!(
        (a.status, &a.json),
        (200, &json!({"msg": "OK"})),
        "PUT /__erulb__/upstream {ups}: {}",
        a.text
    );
}

/// `GET path` on an admin endpoint; fails the test unless it answers 200.
pub fn admin_get(addr: SocketAddr, path: &str) -> Value {
    let a = admin(addr, "GET", path, None);
    assert_eq!(a.status, 200, "GET {path}: {}", a.text);
    a.json
}

/// A rule set whose `init` is a backend to `servername`.
pub fn to_backend(servername: &str) -> Value {
    json!({"init": "b", "rules": {"b": {"type": "backend", "args": {"servername": servername}}}})
}

/// True when every field of `want` is in `got` with the same value
/// (recursively for objects; arrays and scalars compare whole). `got` may
/// have more fields.
pub fn json_contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| g.get(k).is_some_and(|gv| json_contains(gv, wv))),
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| json_contains(a, b))
        }
        _ => got == want,
    }
}
