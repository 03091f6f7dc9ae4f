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

mod answers;
mod body;
mod error;
mod exchange;
mod record;
mod response_head;
mod retry;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mio::Registry;
use mio::net::TcpStream;

use crate::access_log::{AccessLog, Record};
use crate::args::WorkerArgs;
use crate::http::{self, BodyKind, parse_request_into};
use crate::pool::Pool;
use crate::route::{RouteCtx, Routed, Router};
use crate::upstream_conn::UpConn;

use body::{Body, body_limit};
use error::{ErrorKind, ProxyError};
use exchange::{Exchange, Request};
use retry::Retry;

/// Bytes moved through a session per step and direction.
const CHUNK: usize = 64 << 10;

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
    /// The access log, when there is one.
    pub log: Option<&'a mut AccessLog>,
    /// This session's key in the worker's table.
    pub key: usize,
    /// The worker's read buffer: reads land here, then only the bytes read
    /// are appended where they belong (no zero-filling per read).
    pub scratch: &'a mut [u8],
    /// The header list of the last request head, for the next one.
    pub headers: &'a mut Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// One step's outcome: whether anything moved, or why the connection is
/// to be closed at once.
type Step = Result<bool, ProxyError>;

/// Where a client connection stands; `Exchange` holds the exchange's own
/// state (`exchange.rs`).
// Sessions live in the worker's slab, so an inline exchange costs memory
// only per connection; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Waiting for a request head, or reading one.
    ReadingHead,
    Exchange(Exchange),
    /// Answered; close once the answer is written.
    Closing,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::ReadingHead => "reading_head",
            Phase::Exchange(x) => x.state().name(),
            Phase::Closing => "closing",
        }
    }
}

pub(crate) struct Session {
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    /// The client's address as text, for the headers sent upstream and the
    /// rate limiter's key: formatted once per connection.
    client_text: Vec<u8>,
    inbuf: Vec<u8>,
    /// `inbuf`'s length when its head was last found incomplete: parsing
    /// again is useless until more bytes arrive.
    head_tried: usize,
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
    /// The access log's record of the request in progress, and its copy
    /// of the head fields (`log.rs`); unused when there is no log.
    rec: Record,
    rec_text: Vec<u8>,
    /// The counters entry the request in progress counts in, until counted,
    /// and when its head arrived.
    counting: Option<u32>,
    started: Instant,
}

impl Session {
    pub fn new(client: TcpStream, client_addr: SocketAddr, deadline: Instant) -> Session {
        Session {
            client,
            client_addr,
            client_text: client_addr.ip().to_string().into_bytes(),
            inbuf: Vec::new(),
            head_tried: 0,
            out: Vec::new(),
            out_pos: 0,
            client_eof: false,
            client_ready: true,
            client_hup: false,
            phase: Phase::ReadingHead,
            spare: (Vec::new(), Vec::new()),
            head_since: None,
            deadline,
            armed: None,
            rec: Record::default(),
            rec_text: Vec::new(),
            counting: None,
            started: deadline,
        }
    }

    /// The one way the phase moves outside an exchange's own states.
    fn enter(&mut self, next: Phase) -> Phase {
        #[cfg(test)]
        tests::trace(next.name());
        std::mem::replace(&mut self.phase, next)
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
        matches!(self.phase, Phase::ReadingHead)
            && self.inbuf.is_empty()
            && self.out_pos >= self.out.len()
    }

    pub fn drive(&mut self, cx: &mut Cx<'_>) -> Drive {
        loop {
            let flushed = match self.flush_client() {
                Ok(p) => p,
                Err(e) => return self.close_for(e),
            };
            let stepped = match self.phase {
                Phase::ReadingHead => self.step_head(cx),
                Phase::Exchange(_) => self.step_exchange(cx),
                Phase::Closing if self.out_pos >= self.out.len() => return Drive::Close,
                Phase::Closing => Ok(false),
            };
            match stepped {
                Ok(p) if p || flushed => {}
                Ok(_) => break,
                Err(e) => return self.close_for(e),
            }
        }
        let reading_head = matches!(self.phase, Phase::ReadingHead) && !self.inbuf.is_empty();
        self.head_since = if reading_head {
            Some(self.head_since.unwrap_or(cx.now))
        } else {
            None
        };
        self.deadline = self.head_since.unwrap_or(cx.now) + self.timeout(cx.args);
        Drive::Keep
    }

    fn close_for(&self, e: ProxyError) -> Drive {
        log::debug!("client {}: {e} ({})", self.client_addr, self.phase.name());
        Drive::Close
    }

    /// The deadline passed: a peer that kept us waiting is a failure (504
    /// when no other peer can take the request); anything else closes.
    pub fn on_timeout(&mut self, cx: &mut Cx<'_>) -> Drive {
        let kind = match &self.phase {
            Phase::Exchange(x)
                if !x.answered() && x.req_body.is_done() && self.out_pos >= self.out.len() =>
            {
                if x.is_connecting() {
                    ErrorKind::ConnectTimeout
                } else {
                    ErrorKind::ReadTimeout
                }
            }
            _ => return Drive::Close,
        };
        match self.fail(cx, kind.into()) {
            Ok(_) => self.drive(cx),
            Err(_) => Drive::Close,
        }
    }

    fn timeout(&self, args: &WorkerArgs) -> Duration {
        let t = &args.timeouts;
        let sending = self.out_pos < self.out.len();
        let ms = match &self.phase {
            Phase::ReadingHead if self.is_idle() => t.keepalive_ms,
            Phase::ReadingHead | Phase::Closing => t.client_header_ms,
            Phase::Exchange(x) if x.is_connecting() => t.connect_ms,
            Phase::Exchange(x) if !x.req_body.is_done() || sending => t.client_body_ms,
            Phase::Exchange(x) if x.request.upgrade && x.answered() => t.keepalive_ms,
            Phase::Exchange(_) => t.upstream_read_ms,
        };
        Duration::from_millis(ms)
    }

    fn flush_client(&mut self) -> Step {
        let mut progress = false;
        while self.out_pos < self.out.len() {
            match self.client.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(ErrorKind::ClientGone.into()),
                Ok(n) => {
                    self.out_pos += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProxyError::with_io(ErrorKind::ClientGone, &e)),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(progress)
    }

    /// Reads from the client while `inbuf` holds less than `limit`.
    fn read_client(&mut self, limit: usize, scratch: &mut [u8]) -> Step {
        let mut progress = false;
        while self.client_ready && !self.client_eof && self.inbuf.len() < limit {
            match read_into(&mut self.client, &mut self.inbuf, scratch) {
                Ok(0) => self.client_eof = true,
                Ok(n) => {
                    progress = true;
                    self.client_ready = n == scratch.len() || self.client_hup;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.client_ready = false,
                Err(e) => return Err(ProxyError::with_io(ErrorKind::ClientGone, &e)),
            }
        }
        Ok(progress)
    }

    /// Answers here. Keeping the connection needs no unread request body.
    fn answer_local(&mut self, cx: &mut Cx<'_>, status: u16, keep: bool) {
        self.answer_with(cx, status, keep, |out| {
            http::write::error_page(out, status, keep)
        });
    }

    /// Answers here with what `page` writes (it returns the body's length).
    fn answer_with(
        &mut self,
        cx: &mut Cx<'_>,
        status: u16,
        keep: bool,
        page: impl FnOnce(&mut Vec<u8>) -> usize,
    ) {
        if let Phase::Exchange(x) = &mut self.phase {
            if let Some(up) = x.up.take() {
                cx.pool.release(up);
            }
            // The peer that failed, for the access log.
            if let Some(p) = x.peer {
                self.rec.upstream_addr = Some(p.addr);
                self.rec.upstream_done = Some(cx.now);
            }
        }
        self.count(cx.region, cx.args, status, cx.now);
        let body = page(&mut self.out);
        self.rec.body_bytes = body as u64;
        self.end_record(cx.log.as_deref_mut(), status, cx.now);
        self.enter(if keep {
            Phase::ReadingHead
        } else {
            Phase::Closing
        });
    }

    /// Refuses a request before anything of it went on; the connection is
    /// closed, so nothing of it can be taken for a next request.
    fn refuse_head(&mut self, cx: &mut Cx<'_>, err: ProxyError) -> Step {
        self.inbuf.clear();
        self.answer_local(cx, err.status(), false);
        Ok(true)
    }

    fn step_head(&mut self, cx: &mut Cx<'_>) -> Step {
        let max_head = cx.args.limits.max_header_size;
        let mut progress = false;
        // A pipelined request may already be buffered; read only for more.
        // A head is parsed only when bytes came since it was last found
        // incomplete (an empty buffer never is).
        let fresh = |s: &Self| s.inbuf.len() != s.head_tried;
        let parsed = if fresh(self) {
            parse_request_into(&self.inbuf, max_head, std::mem::take(cx.headers))
        } else {
            Ok(None)
        };
        let parsed = match parsed {
            Ok(None) => {
                progress |= self.read_client(max_head + 1, cx.scratch)?;
                if fresh(self) {
                    parse_request_into(&self.inbuf, max_head, std::mem::take(cx.headers))
                } else {
                    Ok(None)
                }
            }
            other => other,
        };
        self.head_tried = match &parsed {
            Ok(None) => self.inbuf.len(),
            _ => 0,
        };
        let head = match parsed {
            Ok(Some(h)) => h,
            Ok(None) if self.client_eof => return Err(ErrorKind::ClientGone.into()),
            Ok(None) => return Ok(progress),
            // Nothing of it reaches a peer, and no smuggled second request
            // can follow.
            Err(e) => return self.refuse_head(cx, ErrorKind::InvalidHead(e).into()),
        };
        if let Some(slot) = cx.region.worker_slot(cx.args.index) {
            slot.count_request();
        }
        if cx.log.is_some() {
            self.start_record(&head, cx.now);
        }
        let has_body = head.body != BodyKind::None;
        let keep = head.keep_alive;
        let admin = crate::route::is_admin(head.target(&self.inbuf));
        let too_big = matches!(head.body, BodyKind::Length(n) if n > body_limit(cx.args, admin));
        // At once, and without a 100 Continue first; an admin request only
        // once routing has checked its access (SPEC 4: a refused client
        // gets 403, whatever it declares), which picks no peer.
        if too_big && !admin {
            return self.refuse_head(cx, ErrorKind::BodyTooLarge.into());
        }
        cx.config.refresh();
        let rctx = RouteCtx {
            view: &cx.config.view,
            region: cx.region,
            access: &cx.args.admin_access,
            client: self.client_addr.ip(),
            client_text: &self.client_text,
        };
        let (mut to_up, mut up_in) = std::mem::take(&mut self.spare);
        to_up.clear();
        up_in.clear();
        let routed = cx.router.route(&rctx, &self.inbuf, &head, &mut to_up);
        self.counting = cx.router.counters();
        self.started = cx.now;
        let method = head.method(&self.inbuf);
        let request = Request {
            idempotent: !matches!(method, b"POST" | b"PATCH" | b"LOCK"),
            head_method: method == b"HEAD",
            upgrade: head.upgrade,
            http10: head.minor_version == 0,
        };
        let continue_first = head.expect_continue && has_body && head.minor_version >= 1;
        self.inbuf.drain(..head.len);
        let req_body = Body::new(head.body);
        *cx.headers = head.headers;
        let (peer, upstream) = match routed {
            Routed::Status(status) => {
                // A body we will not read would be taken for the next request.
                self.answer_local(cx, status, keep && !has_body);
                return Ok(true);
            }
            Routed::NoPeer => {
                let err = ProxyError::from(ErrorKind::NoPeer);
                self.answer_local(cx, err.status(), keep && !has_body);
                return Ok(true);
            }
            Routed::Limited { retry_after } => {
                let keep = keep && !has_body;
                self.answer_with(cx, 429, keep, |out| {
                    http::write::too_many_requests(out, retry_after, keep)
                });
                return Ok(true);
            }
            Routed::Peer { peer, upstream } => (Some(peer), upstream),
            Routed::Admin if too_big => {
                return self.refuse_head(cx, ErrorKind::BodyTooLarge.into());
            }
            Routed::Admin => (None, None),
        };
        if continue_first {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let retry = Retry::new(upstream, cx.args.retry.tries);
        let x = Exchange::new(peer, request, retry, to_up, up_in, req_body, keep);
        self.enter(Phase::Exchange(x));
        self.connect(cx)?;
        Ok(true)
    }

    fn step_exchange(&mut self, cx: &mut Cx<'_>) -> Step {
        if self.client_left(cx)? {
            return Err(ErrorKind::ClientGone.into());
        }
        {
            let Phase::Exchange(x) = &mut self.phase else {
                return Ok(false);
            };
            let Some(up) = x.up.as_mut() else {
                return Ok(false);
            };
            match up.check_connected() {
                Ok(true) => x.connected(),
                Ok(false) => return Ok(false),
                Err(e) => return self.fail(cx, ProxyError::connect(&e)),
            }
        }
        let mut progress = self.send_request(cx)?;
        if !matches!(self.phase, Phase::Exchange(_)) {
            return Ok(true);
        }
        progress |= self.receive_response(cx)?;
        if let Phase::Exchange(x) = &self.phase
            && x.is_complete()
        {
            return self.finish(cx);
        }
        Ok(progress)
    }

    /// Whether the client went away while its request waits for the peer's
    /// answer (as nginx, which then stops the exchange and logs 499; a
    /// half-close counts too). Checked only once the client's side reported
    /// its close, so a waiting exchange costs no read; what a pipelining
    /// client sent meanwhile is kept for its next request.
    fn client_left(&mut self, cx: &mut Cx<'_>) -> Result<bool, ProxyError> {
        let Phase::Exchange(x) = &self.phase else {
            return Ok(false);
        };
        if !self.client_hup || x.answered() || !x.req_body.is_done() || x.request.upgrade {
            return Ok(false);
        }
        self.read_client(cx.args.limits.max_header_size + 1, cx.scratch)?;
        Ok(self.client_eof)
    }

    /// The exchange is over: pool the peer connection, go on with the client.
    fn finish(&mut self, cx: &mut Cx<'_>) -> Step {
        let Phase::Exchange(x) = &self.phase else {
            return Ok(false);
        };
        let next = if x.client_keep && !self.client_eof {
            Phase::ReadingHead
        } else {
            Phase::Closing
        };
        let Phase::Exchange(x) = self.enter(next) else {
            return Ok(false);
        };
        let status = self.rec.upstream_status.unwrap_or(0);
        self.count(cx.region, cx.args, status, cx.now);
        if cx.log.is_some() {
            self.rec.upstream_done = Some(cx.now);
            self.rec.upstream_addr = x.peer.map(|p| p.addr);
            self.rec.body_bytes = x.sent_body;
            let status = self.rec.upstream_status.unwrap_or(0);
            self.end_record(cx.log.as_deref_mut(), status, cx.now);
        }
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
