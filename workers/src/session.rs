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
//!
//! `LIFECYCLE.md` in this crate walks a request through these steps.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mio::Registry;
use mio::net::TcpStream;

use crate::args::WorkerArgs;
use crate::health;
use crate::http::chunked::ChunkedTracker;
use crate::http::{self, BodyKind, parse_request_into, parse_response};
use crate::pool::Pool;
use crate::route::{Picked, RouteCtx, Routed, Router};
use crate::upstream_conn::UpConn;

/// Bytes moved through a session per step and direction.
const CHUNK: usize = 64 << 10;
/// A response head from a peer larger than this is an invalid response.
const MAX_RESPONSE_HEAD: usize = 64 << 10;
/// A request is kept for a retry while head and body fit in this.
const REPLAY_LIMIT: usize = 64 << 10;

/// What the loop does with a session after `drive`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drive {
    Keep,
    Close,
}

/// Everything a session needs from its worker for one step.
pub(crate) struct Cx<'a> {
    pub router: &'a mut Router,
    pub config: &'a mut crate::view::Config,
    pub region: &'a elb_shm::Region,
    pub pool: &'a mut Pool,
    pub registry: &'a Registry,
    pub args: &'a WorkerArgs,
    pub admin_socket: &'a Path,
    pub now: Instant,
    /// This session's key in the worker's table.
    pub key: usize,
    /// The worker's read buffer: reads land here, then only the bytes read
    /// are appended where they belong (no zero-filling per read).
    pub scratch: &'a mut [u8],
    /// The header list of the last request head, for the next one.
    pub headers: &'a mut Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
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

    /// Moves the bytes at the start of `avail` that belong to this body to
    /// `out` (chunk data only, when `decode`); returns how many were used.
    fn relay(&mut self, avail: &[u8], out: &mut Vec<u8>, decode: bool) -> Result<usize, ()> {
        let n = match self {
            Body::Done => 0,
            Body::UntilClose => avail.len(),
            Body::Length(left) => {
                let n = avail
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                if *left == 0 {
                    *self = Body::Done;
                }
                n
            }
            Body::Chunked(t) => {
                let n = if decode {
                    t.decode(avail, out).map_err(|_| ())?
                } else {
                    t.advance(avail).map_err(|_| ())?
                };
                if t.is_done() {
                    *self = Body::Done;
                }
                if decode {
                    return Ok(n);
                }
                n
            }
        };
        out.extend_from_slice(&avail[..n]);
        Ok(n)
    }
}

/// The largest request body taken: the admin API's own limit for requests
/// handed to the master, the proxy's for the others.
fn body_limit(args: &WorkerArgs, admin: bool) -> u64 {
    if admin {
        args.limits.admin_max_body_size
    } else {
        args.limits.client_max_body_size
    }
}

/// Why a peer did not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Error,
    Timeout,
    /// Answered with a status in `failure_statuses`.
    Status,
}

// Sessions live in the worker's slab, so an inline exchange costs memory
// only per connection; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Waiting for a request head.
    Head,
    Exchange(Exchange),
    /// Answered; close once the answer is written.
    Closing,
}

struct Exchange {
    up: Option<UpConn>,
    /// The peer (none for the admin API).
    peer: Option<Picked>,
    /// The upstream the peer was picked from, to pick another on a retry.
    upstream: Option<std::rc::Rc<str>>,
    tried: Vec<SocketAddr>,
    tries_left: u32,
    /// GET and the like may be sent again after a peer saw them; POST,
    /// PATCH and LOCK only if no peer did.
    idempotent: bool,
    /// Head and body bytes for the peer. While `replayable`, everything sent
    /// stays here (`to_up_pos` marks what is written), so a retry resends it.
    to_up: Vec<u8>,
    to_up_pos: usize,
    replayable: bool,
    reached_peer: bool,
    req_body: Body,
    body_bytes: u64,
    up_in: Vec<u8>,
    resp: Option<Body>,
    /// The client speaks HTTP/1.0: chunked answers are decoded for it.
    decode_chunked: bool,
    head_request: bool,
    upgrade: bool,
    poolable: bool,
    client_keep: bool,
    /// A final answer's head went to the client.
    answered: bool,
}

pub(crate) struct Session {
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    client_eof: bool,
    /// Whether the client may have bytes to read: cleared by `WouldBlock` or
    /// by a short read (the socket was drained; new bytes bring a new event,
    /// as nginx relies on), set by a readable event, so spurious wake-ups
    /// cost no read syscall.
    client_ready: bool,
    /// The client's side reported its close (EPOLLRDHUP): read until the
    /// end even after a short read, as no further event will come.
    client_hup: bool,
    phase: Phase,
    /// Buffers of the last exchange, kept for the next one.
    spare: (Vec<u8>, Vec<u8>),
    /// When the head being read began: its deadline does not move with
    /// each byte (a client trickling bytes must not hold the connection).
    head_since: Option<Instant>,
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
            client_ready: true,
            client_hup: false,
            phase: Phase::Head,
            spare: (Vec::new(), Vec::new()),
            head_since: None,
            deadline,
            armed: None,
        }
    }

    fn upstream_mut(&mut self) -> Option<&mut UpConn> {
        match &mut self.phase {
            Phase::Exchange(x) => x.up.as_mut(),
            _ => None,
        }
    }

    /// The peer connection, to close it with the session.
    pub fn take_upstream(&mut self) -> Option<UpConn> {
        match &mut self.phase {
            Phase::Exchange(x) => x.up.take(),
            _ => None,
        }
    }

    /// Records a readable (or closed, or failed) event on one side;
    /// `closed`: the peer of that socket shut down its sending side.
    pub fn mark_readable(&mut self, upstream: bool, closed: bool) {
        if !upstream {
            self.client_ready = true;
            self.client_hup |= closed;
        } else if let Some(up) = self.upstream_mut() {
            up.ready = true;
            up.hup |= closed;
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
        let reading_head = matches!(self.phase, Phase::Head) && !self.inbuf.is_empty();
        self.head_since = if reading_head {
            Some(self.head_since.unwrap_or(cx.now))
        } else {
            None
        };
        self.deadline = self.head_since.unwrap_or(cx.now) + self.timeout(cx.args);
        Drive::Keep
    }

    /// The deadline passed: a peer that kept us waiting is a failure (504
    /// when no other peer can take the request); anything else closes.
    pub fn on_timeout(&mut self, cx: &mut Cx<'_>) -> Drive {
        let waiting_for_peer = match &self.phase {
            Phase::Exchange(x) => {
                !x.answered && x.req_body.is_done() && self.out_pos >= self.out.len()
            }
            _ => false,
        };
        if !waiting_for_peer {
            return Drive::Close;
        }
        match self.fail(cx, Failure::Timeout, "timed out") {
            Ok(_) => self.drive(cx),
            Err(()) => Drive::Close,
        }
    }

    fn timeout(&self, args: &WorkerArgs) -> Duration {
        let t = &args.timeouts;
        let sending = self.out_pos < self.out.len();
        let ms = match &self.phase {
            Phase::Head if self.is_idle() => t.keepalive_ms,
            Phase::Head | Phase::Closing => t.client_header_ms,
            Phase::Exchange(x) if x.up.as_ref().is_some_and(|u| !u.connected) => t.connect_ms,
            Phase::Exchange(x) if !x.req_body.is_done() || sending => t.client_body_ms,
            Phase::Exchange(x) if x.upgrade && x.answered => t.keepalive_ms,
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
    fn read_client(&mut self, limit: usize, scratch: &mut [u8]) -> Result<bool, ()> {
        let mut progress = false;
        while self.client_ready && !self.client_eof && self.inbuf.len() < limit {
            match read_into(&mut self.client, &mut self.inbuf, scratch) {
                Ok(0) => self.client_eof = true,
                Ok(n) => {
                    progress = true;
                    self.client_ready = n == scratch.len() || self.client_hup;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.client_ready = false,
                Err(_) => return Err(()),
            }
        }
        Ok(progress)
    }

    /// Answers here. Keeping the connection needs no unread request body.
    fn answer_local(&mut self, cx: &mut Cx<'_>, status: u16, keep: bool) {
        if let Phase::Exchange(x) = &mut self.phase
            && let Some(up) = x.up.take()
        {
            cx.pool.release(up);
        }
        http::write::error_page(&mut self.out, status, keep);
        self.phase = if keep { Phase::Head } else { Phase::Closing };
    }

    fn step_head(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let max_head = cx.args.limits.max_header_size;
        let mut progress = false;
        // A pipelined request may already be buffered; read only for more.
        let parsed = match parse_request_into(&self.inbuf, max_head, std::mem::take(cx.headers)) {
            Ok(None) => {
                progress |= self.read_client(max_head + 1, cx.scratch)?;
                parse_request_into(&self.inbuf, max_head, std::mem::take(cx.headers))
            }
            other => other,
        };
        let head = match parsed {
            Ok(Some(h)) => h,
            Ok(None) if self.client_eof => return Err(()),
            Ok(None) => return Ok(progress),
            Err(e) => {
                // Nothing of it reaches a peer; the connection is closed, so a
                // smuggled second request cannot follow.
                self.inbuf.clear();
                self.answer_local(cx, e.status(), false);
                return Ok(true);
            }
        };
        if let Some(slot) = cx.region.worker_slot(cx.args.index) {
            slot.count_request();
        }
        let has_body = head.body != BodyKind::None;
        let keep = head.keep_alive;
        let admin = crate::route::is_admin(head.target(&self.inbuf));
        let max_body = body_limit(cx.args, admin);
        let too_big = matches!(head.body, BodyKind::Length(n) if n > max_body);
        // At once, and without a 100 Continue first; an admin request only
        // once routing has checked its access (SPEC 4: a refused client
        // gets 403, whatever it declares), which picks no peer.
        if too_big && !admin {
            self.inbuf.clear();
            self.answer_local(cx, 413, false);
            return Ok(true);
        }
        cx.config.refresh();
        let rctx = RouteCtx {
            view: &cx.config.view,
            region: cx.region,
            access: &cx.args.admin_access,
            client: self.client_addr.ip(),
        };
        let (mut to_up, mut up_in) = std::mem::take(&mut self.spare);
        to_up.clear();
        up_in.clear();
        let routed = cx.router.route(&rctx, &self.inbuf, &head, &mut to_up);
        let method = head.method(&self.inbuf);
        let idempotent = !matches!(method, b"POST" | b"PATCH" | b"LOCK");
        let head_request = method == b"HEAD";
        let continue_first = head.expect_continue && has_body && head.minor_version >= 1;
        self.inbuf.drain(..head.len);
        let upgrade = head.upgrade;
        let decode_chunked = head.minor_version == 0;
        *cx.headers = head.headers;
        let (peer, upstream) = match routed {
            Routed::Status(status) => {
                // A body we will not read would be taken for the next request.
                self.answer_local(cx, status, keep && !has_body);
                return Ok(true);
            }
            Routed::Peer { peer, upstream } => (Some(peer), upstream),
            Routed::Admin if too_big => {
                self.inbuf.clear();
                self.answer_local(cx, 413, false);
                return Ok(true);
            }
            Routed::Admin => (None, None),
        };
        if continue_first {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        self.phase = Phase::Exchange(Exchange {
            up: None,
            peer,
            upstream,
            tried: Vec::new(),
            tries_left: cx.args.retry.tries.max(1),
            idempotent,
            to_up,
            to_up_pos: 0,
            replayable: true,
            reached_peer: false,
            req_body: Body::new(head.body),
            body_bytes: 0,
            up_in,
            resp: None,
            decode_chunked,
            head_request,
            upgrade,
            poolable: true,
            client_keep: keep,
            answered: false,
        });
        self.connect(cx)?;
        Ok(true)
    }

    /// Opens (or takes from the pool) a connection for the current peer; on
    /// failure moves on like any other peer failure.
    fn connect(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let Phase::Exchange(x) = &mut self.phase else {
            return Err(());
        };
        let conn = match x.peer {
            Some(p) => cx.pool.checkout(p.addr, cx.key, cx.registry, cx.now),
            None => cx.pool.admin(cx.admin_socket, cx.key, cx.registry),
        };
        match conn {
            Ok(c) => {
                x.up = Some(c);
                x.poolable = x.peer.is_some();
                Ok(true)
            }
            Err(e) => self.fail(cx, Failure::Error, &e.to_string()),
        }
    }

    fn step_exchange(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let mut progress = false;
        {
            let Phase::Exchange(x) = &mut self.phase else {
                return Ok(false);
            };
            let Some(up) = x.up.as_mut() else {
                return Ok(false);
            };
            match up.check_connected() {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(e) => return self.fail(cx, Failure::Error, &e.to_string()),
            }
        }
        progress |= self.send_request(cx)?;
        if !matches!(self.phase, Phase::Exchange(_)) {
            return Ok(true);
        }
        progress |= self.receive_response(cx)?;
        if let Phase::Exchange(x) = &self.phase
            && matches!(x.resp, Some(Body::Done))
            && x.req_body.is_done()
        {
            return self.finish(cx);
        }
        Ok(progress)
    }

    /// Writes what is queued for the peer, then more body from the client.
    fn send_request(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let mut progress = false;
        loop {
            let Phase::Exchange(x) = &mut self.phase else {
                return Ok(progress);
            };
            let Some(up) = x.up.as_mut() else {
                return Ok(progress);
            };
            while x.to_up_pos < x.to_up.len() {
                match up.write(&x.to_up[x.to_up_pos..]) {
                    Ok(0) => return self.peer_closed(cx, "closed the connection"),
                    Ok(n) => {
                        x.to_up_pos += n;
                        x.reached_peer = true;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.peer_closed(cx, &e.to_string()),
                }
            }
            if x.req_body.is_done() {
                return Ok(progress);
            }
            if self.inbuf.is_empty() {
                if self.client_eof {
                    return Err(());
                }
                if !self.client_ready {
                    return Ok(progress);
                }
                match read_into(&mut self.client, &mut self.inbuf, cx.scratch) {
                    Ok(0) => self.client_eof = true,
                    Ok(n) => self.client_ready = n == cx.scratch.len() || self.client_hup,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.client_ready = false;
                        return Ok(progress);
                    }
                    Err(_) => return Err(()),
                }
                continue;
            }
            if !x.replayable {
                x.to_up.clear();
                x.to_up_pos = 0;
            }
            let before = x.to_up.len();
            let Ok(n) = x.req_body.relay(&self.inbuf, &mut x.to_up, false) else {
                let answered = x.answered;
                return self.refuse(cx, answered, 400);
            };
            self.inbuf.drain(..n);
            x.body_bytes += n as u64;
            if x.replayable && x.to_up.len() > REPLAY_LIMIT {
                x.replayable = false;
            }
            progress |= x.to_up.len() > before;
            if x.body_bytes > body_limit(cx.args, x.peer.is_none()) {
                let answered = x.answered;
                return self.refuse(cx, answered, 413);
            }
        }
    }

    /// A bad request body: answer `status` unless an answer began; close.
    fn refuse(&mut self, cx: &mut Cx<'_>, answered: bool, status: u16) -> Result<bool, ()> {
        if answered {
            return Err(());
        }
        self.answer_local(cx, status, false);
        Ok(true)
    }

    /// Reads the peer's answer while the client's queue is short.
    fn receive_response(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let mut progress = false;
        while let Phase::Exchange(x) = &mut self.phase {
            if self.out.len() >= CHUNK || matches!(x.resp, Some(Body::Done)) {
                break;
            }
            let Some(up) = x.up.as_mut() else { break };
            if !up.ready {
                break;
            }
            match read_into(up, &mut x.up_in, cx.scratch) {
                Ok(0) => {
                    return match x.resp {
                        Some(Body::UntilClose) => {
                            x.resp = Some(Body::Done);
                            x.client_keep = false;
                            x.poolable = false;
                            if matches!(x.req_body, Body::UntilClose) {
                                x.req_body = Body::Done;
                            }
                            self.finish(cx)
                        }
                        None if x.up_in.is_empty() => self.peer_closed(cx, "closed the connection"),
                        None => self.fail(cx, Failure::Error, "sent an incomplete response"),
                        // Cut short: the client can only be told by a close.
                        Some(_) => Err(()),
                    };
                }
                Ok(n) => {
                    progress = true;
                    up.ready = n == cx.scratch.len() || up.hup;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    up.ready = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if x.answered {
                        return Err(());
                    }
                    return self.peer_closed(cx, &e.to_string());
                }
            }
            progress |= self.relay_response(cx)?;
        }
        progress |= self.relay_response(cx)?;
        Ok(progress)
    }

    /// Moves parsed response bytes from the peer's buffer to the client's.
    fn relay_response(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let mut progress = false;
        loop {
            let Phase::Exchange(x) = &mut self.phase else {
                return Ok(progress);
            };
            if x.up_in.is_empty() {
                return Ok(progress);
            }
            let Some(body) = &mut x.resp else {
                let parsed =
                    parse_response(&x.up_in, MAX_RESPONSE_HEAD, std::mem::take(cx.headers));
                let head = match parsed {
                    Ok(Some(h)) => h,
                    Ok(None) => return Ok(progress),
                    Err(_) => return self.fail(cx, Failure::Error, "sent an invalid response"),
                };
                progress = true;
                if (100..200).contains(&head.status) && head.status != 101 {
                    // ELB answered 100 Continue itself; other interim
                    // answers (103 Early Hints) go on, but never to an
                    // HTTP/1.0 client (RFC 9110 15.2), which could take
                    // one for the answer (`decode_chunked` marks 1.0).
                    if head.status != 100 && !x.decode_chunked {
                        write_client_head(&mut self.out, &x.up_in, &head, None, false);
                    }
                    x.up_in.drain(..head.len);
                    *cx.headers = head.headers;
                    continue;
                }
                if let Some(p) = x.peer
                    && let Some(slot) = p.health(cx.region)
                {
                    if cx.args.retry.failure_statuses.contains(&head.status) {
                        health::record_failure(
                            &slot,
                            health::now_ms(),
                            p.max_fails,
                            p.fail_timeout_ms,
                        );
                        if self.may_retry() {
                            return self.fail(
                                cx,
                                Failure::Status,
                                "answered with a failure status",
                            );
                        }
                    } else {
                        health::record_success(&slot);
                    }
                }
                let Phase::Exchange(x) = &mut self.phase else {
                    return Ok(progress);
                };
                x.answered = true;
                let tunnel = head.status == 101 && x.upgrade;
                let body = if tunnel {
                    x.req_body = Body::UntilClose;
                    Body::UntilClose
                } else if x.head_request || head.status == 204 || head.status == 304 {
                    Body::Done
                } else if head.until_close {
                    Body::UntilClose
                } else {
                    Body::new(head.body)
                };
                let chunked = matches!(body, Body::Chunked(_));
                x.decode_chunked &= chunked;
                // Only an answer whose end the client can see keeps the
                // client's connection.
                x.client_keep &= !matches!(body, Body::UntilClose) && !x.decode_chunked && !tunnel;
                x.poolable &= head.keep_alive && !tunnel;
                let connection: &[u8] = match (tunnel, x.client_keep) {
                    (true, _) => b"upgrade",
                    (false, true) => b"keep-alive",
                    (false, false) => b"close",
                };
                write_client_head(
                    &mut self.out,
                    &x.up_in,
                    &head,
                    Some(connection),
                    x.decode_chunked,
                );
                x.up_in.drain(..head.len);
                *cx.headers = head.headers;
                x.resp = Some(body);
                continue;
            };
            if body.is_done() {
                // Bytes past the end of the answer: the peer is confused.
                x.poolable = false;
                x.up_in.clear();
                return Ok(progress);
            }
            let n = body.relay(&x.up_in, &mut self.out, x.decode_chunked)?;
            x.up_in.drain(..n);
            progress |= n > 0;
            if n == 0 {
                return Ok(progress);
            }
        }
    }

    /// The exchange is over: pool the peer connection, go on with the client.
    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<bool, ()> {
        let Phase::Exchange(x) = std::mem::replace(&mut self.phase, Phase::Head) else {
            return Ok(false);
        };
        // Keep modest buffers for the next exchange; let big ones go.
        if x.to_up.capacity() <= CHUNK && x.up_in.capacity() <= 2 * CHUNK {
            self.spare = (x.to_up, x.up_in);
        }
        if let Some(up) = x.up {
            if x.poolable {
                cx.pool.checkin(up, cx.now);
            } else {
                cx.pool.release(up);
            }
        }
        if !x.client_keep || self.client_eof {
            self.phase = Phase::Closing;
        }
        Ok(true)
    }

    /// The peer closed or reset the connection. On a pooled connection
    /// before any answer, that is the peer having closed it while idle: not
    /// a failure, the request goes again on a fresh connection.
    fn peer_closed(&mut self, cx: &mut Cx<'_>, why: &str) -> Result<bool, ()> {
        if let Phase::Exchange(x) = &mut self.phase
            && x.up.as_ref().is_some_and(|u| u.reused)
            && !x.answered
            && x.replayable
            && x.up_in.is_empty()
        {
            if let Some(up) = x.up.take() {
                cx.pool.release(up);
            }
            x.to_up_pos = 0;
            if let Some(p) = x.peer
                && let Ok(c) = cx.pool.fresh(p.addr, cx.key, cx.registry)
            {
                x.up = Some(c);
                return Ok(true);
            }
        }
        self.fail(cx, Failure::Error, why)
    }

    fn may_retry(&self) -> bool {
        let Phase::Exchange(x) = &self.phase else {
            return false;
        };
        x.upstream.is_some()
            && x.tries_left > 1
            && !x.answered
            && x.replayable
            && (x.idempotent || !x.reached_peer)
    }

    /// A peer failed this request: count it for passive health, then try
    /// the next peer when allowed, else answer 502 (504 after a timeout).
    fn fail(&mut self, cx: &mut Cx<'_>, failure: Failure, why: &str) -> Result<bool, ()> {
        let retry = self.may_retry();
        let Phase::Exchange(x) = &mut self.phase else {
            return Err(());
        };
        if let Some(up) = x.up.take() {
            cx.pool.release(up);
        }
        if x.answered {
            return Err(());
        }
        let now = health::now_ms();
        if failure != Failure::Status
            && let Some(p) = x.peer
            && let Some(slot) = p.health(cx.region)
        {
            health::record_failure(&slot, now, p.max_fails, p.fail_timeout_ms);
        }
        let name = x
            .peer
            .map_or_else(|| "admin API".to_string(), |p| p.addr.to_string());
        log::warn!("peer {name}: {why}");
        if retry
            && let Some(current) = x.peer
            && let Some(up) = x
                .upstream
                .as_deref()
                .and_then(|n| cx.config.view.upstream(n.as_bytes()))
        {
            x.tried.push(current.addr);
            if let Some(next) = crate::route::pick(cx.region, up, &x.tried, now) {
                x.peer = Some(next);
                x.tries_left -= 1;
                x.to_up_pos = 0;
                x.reached_peer = false;
                x.up_in.clear();
                x.resp = None;
                return self.connect(cx);
            }
        }
        let status = if failure == Failure::Timeout {
            504
        } else {
            502
        };
        let keep = x.client_keep && x.req_body.is_done();
        self.answer_local(cx, status, keep);
        Ok(true)
    }
}

/// Reads once through `scratch` and appends what came to `buf`.
fn read_into(r: &mut impl Read, buf: &mut Vec<u8>, scratch: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(scratch) {
            Ok(n) => {
                buf.extend_from_slice(&scratch[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes a peer's answer head for the client, rebuilt from its parsed
/// parts and never copied: the parser takes a bare LF for a line end, which
/// the client might not, so raw bytes could carry a line the client reads
/// otherwise. `connection`: the `Connection` value for a final answer
/// (`upgrade` for a tunnel); none for an interim one. `decoded`: the body
/// goes to the client without its chunked framing.
fn write_client_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &http::ResponseHead,
    connection: Option<&[u8]>,
    decoded: bool,
) {
    let tunnel = connection == Some(b"upgrade".as_slice());
    http::write::status_line(out, head.status, &buf[head.reason.clone()]);
    for (n, v) in &head.headers {
        let name = &buf[n.clone()];
        if http::is_hop_by_hop(name, buf, &head.connection)
            || (!tunnel && name.eq_ignore_ascii_case(b"upgrade"))
            || (decoded && name.eq_ignore_ascii_case(b"transfer-encoding"))
        {
            continue;
        }
        http::write::header(out, name, &buf[v.clone()]);
    }
    if let Some(value) = connection {
        http::write::header(out, b"Connection", value);
    }
    out.extend_from_slice(b"\r\n");
}
