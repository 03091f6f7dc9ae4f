//! One client connection and the exchange in progress on it.
//!
//! `drive` makes every step it can — write what is queued, read what is
//! there, parse, route, connect, forward — until nothing moves. mio's events
//! are edge-triggered, so a side is read only until it would block or until
//! the buffer it feeds is full; in the latter case the write that empties
//! that buffer is in the same loop, which then reads again. Buffers in each
//! direction are bounded, so a body of any size streams in fixed memory.
//!
//! Requests on one connection are handled one after the other; pipelined
//! requests wait in the read buffer and are answered in order.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Registry, Token};

use crate::args::WorkerArgs;
use crate::http::chunked::ChunkedTracker;
use crate::http::{self, BodyKind, parse_request, parse_response};
use crate::pool::Pool;
use crate::route::{RouteCtx, Routed, Router};
use crate::upstream_conn::UpConn;

/// Bytes moved through a session per step and direction.
const CHUNK: usize = 64 << 10;
/// A response head from a peer larger than this is an invalid response.
const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// What the loop does with a session after `drive`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drive {
    Keep,
    Close,
}

/// Everything a session needs from its worker for one step.
pub(crate) struct Cx<'a> {
    pub router: &'a mut Router,
    pub view: &'a crate::view::View,
    pub region: &'a elb_shm::Region,
    pub pool: &'a mut Pool,
    pub registry: &'a Registry,
    pub args: &'a WorkerArgs,
    pub admin_socket: &'a Path,
    pub now: Instant,
    /// Token for this session's upstream connection.
    pub up_token: Token,
}

/// How much of a body is still to come.
#[derive(Debug, Clone, Copy)]
enum Body {
    Length(u64),
    Chunked(ChunkedTracker),
    /// Until the sender closes (a response without length, a tunnel).
    UntilClose,
    Done,
}

impl Body {
    fn new(kind: BodyKind) -> Body {
        match kind {
            BodyKind::None => Body::Done,
            BodyKind::Length(n) => Body::Length(n),
            BodyKind::Chunked => Body::Chunked(ChunkedTracker::default()),
        }
    }

    fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }

    /// How many bytes at the start of `avail` belong to this body.
    fn take(&mut self, avail: &[u8]) -> Result<usize, ()> {
        match self {
            Body::Done => Ok(0),
            Body::UntilClose => Ok(avail.len()),
            Body::Length(left) => {
                let n = avail
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Body::Done;
                }
                Ok(n)
            }
            Body::Chunked(t) => {
                let n = t.advance(avail).map_err(|_| ())?;
                if t.is_done() {
                    *self = Body::Done;
                }
                Ok(n)
            }
        }
    }
}

enum Phase {
    /// Waiting for a request head.
    Head,
    Exchange(Exchange),
    /// Answered; close once the answer is written.
    Closing,
}

struct Exchange {
    up: Option<UpConn>,
    /// Where to connect (none for the admin API).
    peer: Option<SocketAddr>,
    to_up: Vec<u8>,
    to_up_pos: usize,
    /// A copy of the request head, to send again on a fresh connection
    /// when a pooled one turns out closed.
    head: Vec<u8>,
    req_body: Body,
    body_sent: bool,
    up_in: Vec<u8>,
    resp: Option<Body>,
    head_request: bool,
    upgrade: bool,
    client_keep: bool,
    client_minor: u8,
    answered: bool,
}

pub(crate) struct Session {
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    client_eof: bool,
    phase: Phase,
    /// When this session times out, and the timer entry that will notice.
    pub deadline: Instant,
    pub armed: Option<Instant>,
}

impl Session {
    pub fn new(client: TcpStream, client_addr: SocketAddr, deadline: Instant) -> Session {
        Session {
            client,
            client_addr,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            client_eof: false,
            phase: Phase::Head,
            deadline,
            armed: None,
        }
    }

    /// The upstream connection, to deregister it when the session closes.
    pub fn upstream_mut(&mut self) -> Option<&mut UpConn> {
        match &mut self.phase {
            Phase::Exchange(x) => x.up.as_mut(),
            _ => None,
        }
    }

    /// Idle between requests: may be closed by a graceful stop.
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Head) && self.inbuf.is_empty() && self.out_pos >= self.out.len()
    }

    pub fn drive(&mut self, cx: &mut Cx<'_>) -> Drive {
        loop {
            let mut progress = match self.flush_client() {
                Ok(p) => p,
                Err(()) => return Drive::Close,
            };
            let step = match self.phase {
                Phase::Head => self.step_head(cx),
                Phase::Exchange(_) => self.step_exchange(cx),
                Phase::Closing => {
                    if self.out_pos >= self.out.len() {
                        return Drive::Close;
                    }
                    Ok(false)
                }
            };
            match step {
                Ok(p) => progress |= p,
                Err(()) => return Drive::Close,
            }
            if !progress {
                break;
            }
        }
        self.deadline = cx.now + self.timeout(cx.args);
        Drive::Keep
    }

    /// The deadline passed: answer 504 if a peer kept us waiting, else close.
    pub fn on_timeout(&mut self, cx: &mut Cx<'_>) -> Drive {
        if let Phase::Exchange(x) = &mut self.phase
            && !x.answered
            && x.req_body.is_done()
        {
            if let Some(mut up) = x.up.take() {
                let _ = cx.registry.deregister(&mut up);
            }
            self.answer_local(504, false);
            return self.drive(cx);
        }
        Drive::Close
    }

    fn timeout(&self, args: &WorkerArgs) -> Duration {
        let t = &args.timeouts;
        let ms = match &self.phase {
            Phase::Head if self.is_idle() => t.keepalive_ms,
            Phase::Head | Phase::Closing => t.client_header_ms,
            Phase::Exchange(x) if x.up.as_ref().is_some_and(|u| !u.connected) => t.connect_ms,
            Phase::Exchange(x) if !x.req_body.is_done() => t.client_body_ms,
            Phase::Exchange(_) => t.upstream_read_ms,
        };
        Duration::from_millis(ms)
    }

    fn flush_client(&mut self) -> Result<bool, ()> {
        let mut progress = false;
        while self.out_pos < self.out.len() {
            match self.client.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.out_pos += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(progress)
    }

    /// Reads from the client while `inbuf` holds less than `limit`.
    fn read_client(&mut self, limit: usize) -> Result<bool, ()> {
        let mut progress = false;
        while !self.client_eof && self.inbuf.len() < limit {
            match read_into(&mut self.client, &mut self.inbuf, CHUNK) {
                Ok(0) => self.client_eof = true,
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(()),
            }
        }
        Ok(progress)
    }

    fn answer_local(&mut self, status: u16, keep: bool) {
        http::write::error_page(&mut self.out, status, keep);
        self.phase = if keep { Phase::Head } else { Phase::Closing };
    }

    fn step_head(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let max_head = cx.args.limits.max_header_size;
        let mut progress = false;
        // A pipelined request may already be buffered; read only for more.
        let parsed = match parse_request(&self.inbuf, max_head) {
            Ok(None) => {
                progress |= self.read_client(max_head + 1)?;
                parse_request(&self.inbuf, max_head)
            }
            other => other,
        };
        let head = match parsed {
            Ok(Some(h)) => h,
            Ok(None) => {
                if self.client_eof {
                    return Err(());
                }
                return Ok(progress);
            }
            Err(e) => {
                self.inbuf.clear();
                self.answer_local(e.status(), false);
                return Ok(true);
            }
        };
        if let Some(slot) = cx.region.worker_slot(cx.args.index) {
            slot.count_request();
        }
        if let BodyKind::Length(n) = head.body
            && n > cx.args.limits.client_max_body_size
        {
            self.inbuf.clear();
            self.answer_local(413, false);
            return Ok(true);
        }
        let rctx = RouteCtx {
            view: cx.view,
            region: cx.region,
            access: &cx.args.admin_access,
            client: self.client_addr.ip(),
        };
        let mut to_up = Vec::with_capacity(head.len + 128);
        let routed = cx.router.route(&rctx, &self.inbuf, &head, &mut to_up);
        let has_body = head.body != BodyKind::None;
        let keep = head.keep_alive;
        let x = Exchange {
            up: None,
            peer: None,
            head: Vec::new(),
            to_up,
            to_up_pos: 0,
            req_body: Body::new(head.body),
            body_sent: false,
            up_in: Vec::new(),
            resp: None,
            head_request: head.method(&self.inbuf) == b"HEAD",
            upgrade: head.upgrade,
            client_keep: keep,
            client_minor: head.minor_version,
            answered: false,
        };
        self.inbuf.drain(..head.len);
        let mut x = x;
        let connected = match routed {
            Routed::Status(status) => {
                // A body we will not read would be taken for the next request.
                self.answer_local(status, keep && !has_body);
                return Ok(true);
            }
            Routed::Peer { addr, .. } => {
                x.peer = Some(addr);
                match cx.pool.take(addr, cx.now) {
                    Some(s) => Ok(UpConn::pooled(addr, s)),
                    None => UpConn::connect(addr),
                }
            }
            Routed::Admin => UpConn::admin(cx.admin_socket),
        };
        let mut up = match connected {
            Ok(u) => u,
            Err(e) => {
                log::warn!("connect to {}: {e}", peer_name(x.peer));
                self.answer_local(502, keep && !has_body);
                return Ok(true);
            }
        };
        if up.register(cx.registry, cx.up_token).is_err() {
            self.answer_local(502, false);
            return Ok(true);
        }
        if up.reused {
            x.head = x.to_up.clone();
        }
        x.up = Some(up);
        self.phase = Phase::Exchange(x);
        Ok(true)
    }

    fn step_exchange(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let Phase::Exchange(x) = &mut self.phase else {
            return Ok(false);
        };
        let mut progress = false;
        let Some(up) = x.up.as_mut() else {
            return Ok(false);
        };
        match up.check_connected() {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => return self.upstream_failed(cx, &e.to_string()),
        }
        // Request: queued bytes, then more body from the client.
        loop {
            while x.to_up_pos < x.to_up.len() {
                match up.write(&x.to_up[x.to_up_pos..]) {
                    Ok(0) => return self.upstream_failed(cx, "peer closed the connection"),
                    Ok(n) => {
                        x.to_up_pos += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.upstream_failed(cx, &e.to_string()),
                }
            }
            if x.to_up_pos < x.to_up.len() || x.req_body.is_done() {
                break;
            }
            x.to_up.clear();
            x.to_up_pos = 0;
            if self.inbuf.is_empty() {
                if self.client_eof {
                    if matches!(x.req_body, Body::UntilClose) {
                        x.req_body = Body::Done;
                        break;
                    }
                    return Err(());
                }
                match read_into(&mut self.client, &mut self.inbuf, CHUNK) {
                    Ok(0) => self.client_eof = true,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(()),
                }
                continue;
            }
            let n = x.req_body.take(&self.inbuf).map_err(|()| ())?;
            x.to_up.extend_from_slice(&self.inbuf[..n]);
            self.inbuf.drain(..n);
            x.body_sent |= n > 0;
            progress |= n > 0;
        }
        // Response: read while the client's queue is short.
        loop {
            let Phase::Exchange(x) = &mut self.phase else {
                break;
            };
            if self.out.len() >= CHUNK || matches!(x.resp, Some(Body::Done)) {
                break;
            }
            let Some(up) = x.up.as_mut() else { break };
            match read_into(up, &mut x.up_in, CHUNK) {
                Ok(0) => {
                    return match x.resp {
                        Some(Body::UntilClose) => {
                            x.resp = Some(Body::Done);
                            x.client_keep = false;
                            self.finish(cx)
                        }
                        None if x.up_in.is_empty() => {
                            self.upstream_failed(cx, "peer closed the connection")
                        }
                        // Cut short: the client cannot be told but by a close.
                        _ => Err(()),
                    };
                }
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return if x.answered {
                        Err(())
                    } else {
                        self.upstream_failed(cx, &e.to_string())
                    };
                }
            }
            progress |= self.relay_response()?;
        }
        progress |= self.relay_response()?;
        if let Phase::Exchange(x) = &self.phase
            && matches!(x.resp, Some(Body::Done))
            && x.req_body.is_done()
        {
            return self.finish(cx);
        }
        Ok(progress)
    }

    /// Moves parsed response bytes from the peer's buffer to the client's.
    fn relay_response(&mut self) -> Result<bool, ()> {
        let Phase::Exchange(x) = &mut self.phase else {
            return Ok(false);
        };
        let mut progress = false;
        while !x.up_in.is_empty() {
            match &mut x.resp {
                None => {
                    let head = match parse_response(&x.up_in, MAX_RESPONSE_HEAD) {
                        Ok(Some(h)) => h,
                        Ok(None) => return Ok(progress),
                        Err(_) if !x.answered => {
                            x.up = None;
                            self.answer_local(502, false);
                            return Ok(true);
                        }
                        Err(_) => return Err(()),
                    };
                    x.answered = true;
                    progress = true;
                    if (100..200).contains(&head.status) && head.status != 101 {
                        // An interim answer (100 Continue): pass it on as is.
                        self.out.extend_from_slice(&x.up_in[..head.len]);
                        x.up_in.drain(..head.len);
                        continue;
                    }
                    let tunnel = head.status == 101 && x.upgrade;
                    let body = if tunnel {
                        x.req_body = Body::UntilClose;
                        Body::UntilClose
                    } else if x.head_request
                        || head.status == 204
                        || head.status == 304
                        || head.status < 200
                    {
                        Body::Done
                    } else if head.until_close {
                        Body::UntilClose
                    } else {
                        Body::new(head.body)
                    };
                    // Only a response whose end the client can see keeps the
                    // client connection; chunked needs an HTTP/1.1 client.
                    let delimited = !matches!(body, Body::UntilClose)
                        && (head.body != BodyKind::Chunked || x.client_minor >= 1);
                    x.client_keep &= delimited && !tunnel;
                    write_client_head(&mut self.out, &x.up_in, &head, x.client_keep, tunnel);
                    x.up_in.drain(..head.len);
                    if !head.keep_alive || tunnel {
                        // The peer closes after this answer: not poolable.
                        x.peer = None;
                    }
                    x.resp = Some(body);
                }
                Some(body) => {
                    if body.is_done() {
                        // Bytes after the end of the response: the peer is
                        // confused; do not reuse its connection.
                        x.peer = None;
                        x.up_in.clear();
                        return Ok(progress);
                    }
                    let n = body.take(&x.up_in)?;
                    self.out.extend_from_slice(&x.up_in[..n]);
                    x.up_in.drain(..n);
                    progress |= n > 0;
                }
            }
        }
        Ok(progress)
    }

    /// The exchange is over: pool the peer connection, go on with the client.
    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let Phase::Exchange(x) = std::mem::replace(&mut self.phase, Phase::Head) else {
            return Ok(false);
        };
        if let Some(mut up) = x.up {
            let _ = cx.registry.deregister(&mut up);
            if let (Some(addr), crate::upstream_conn::Stream::Tcp(s)) =
                (x.peer.and(up.addr), up.stream)
            {
                cx.pool.put(addr, s, cx.now);
            }
        }
        if !x.client_keep || self.client_eof {
            self.phase = Phase::Closing;
        }
        Ok(true)
    }

    /// A peer failed before answering: try a fresh connection when a pooled
    /// one had been closed by the peer, else answer 502.
    fn upstream_failed(&mut self, cx: &mut Cx<'_>, why: &str) -> Result<bool, ()> {
        let Phase::Exchange(x) = &mut self.phase else {
            return Err(());
        };
        let Some(mut up) = x.up.take() else {
            return Err(());
        };
        let _ = cx.registry.deregister(&mut up);
        if x.answered {
            return Err(());
        }
        if up.reused
            && !x.body_sent
            && let Some(addr) = x.peer
            && let Ok(mut fresh) = UpConn::connect(addr)
            && fresh.register(cx.registry, cx.up_token).is_ok()
        {
            x.to_up = std::mem::take(&mut x.head);
            x.to_up_pos = 0;
            x.up_in.clear();
            x.up = Some(fresh);
            return Ok(true);
        }
        log::warn!("peer {}: {why}", peer_name(x.peer));
        let keep = x.client_keep && x.req_body.is_done() && !x.body_sent;
        self.answer_local(502, keep);
        Ok(true)
    }
}

fn peer_name(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "admin".to_string(), |a| a.to_string())
}

/// Reads once into the spare room at the end of `buf` (growing it by up to
/// `chunk`); returns the bytes read.
fn read_into(r: &mut impl Read, buf: &mut Vec<u8>, chunk: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + chunk, 0);
    let res = loop {
        match r.read(&mut buf[start..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    buf.truncate(start + *res.as_ref().unwrap_or(&0));
    res
}

/// Headers of a response that concern only the peer's connection.
fn hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 5] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn write_client_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &http::ResponseHead,
    keep: bool,
    tunnel: bool,
) {
    // The status line with our version: the reason phrase is kept.
    let line_end = buf.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    let after_version = buf[..line_end]
        .iter()
        .position(|b| *b == b' ')
        .unwrap_or(line_end);
    out.extend_from_slice(b"HTTP/1.1");
    out.extend_from_slice(&buf[after_version..line_end]);
    out.extend_from_slice(b"\r\n");
    for (n, v) in &head.headers {
        let name = &buf[n.clone()];
        if hop_by_hop(name) || (!tunnel && name.eq_ignore_ascii_case(b"upgrade")) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&buf[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(match (tunnel, keep) {
        (true, _) => b"Connection: upgrade\r\n\r\n".as_slice(),
        (false, true) => b"Connection: keep-alive\r\n\r\n",
        (false, false) => b"Connection: close\r\n\r\n",
    });
}
