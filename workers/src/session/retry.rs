//! Connecting to a peer, and what happens when one fails a request: passive
//! health counts it, and the request goes to the next peer when that is
//! safe, or is answered with the error's status.

use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::health;
use crate::route::Picked;

use super::error::ProxyError;
use super::exchange::Exchange;
use super::{Cx, Phase, Session, Step};

/// What decides whether a request may be sent again.
pub(super) struct Retry {
    /// The upstream the peer was picked from, to pick another (none for a
    /// direct `host:port` and the admin API).
    pub upstream: Option<Rc<str>>,
    pub tried: Vec<SocketAddr>,
    pub tries_left: u32,
    /// Everything sent so far is still in the send buffer.
    pub replayable: bool,
    /// Some of the request went to the current peer.
    pub reached_peer: bool,
}

impl Retry {
    pub fn new(upstream: Option<Rc<str>>, tries: u32) -> Retry {
        Retry {
            upstream,
            tried: Vec::new(),
            tries_left: tries.max(1),
            replayable: true,
            reached_peer: false,
        }
    }
}

impl Exchange {
    /// Whether another peer may take the request: no byte of an answer
    /// went to the client, the request can be sent again whole, and it is
    /// idempotent or never reached the peer.
    pub fn may_retry(&self) -> bool {
        self.retry.upstream.is_some()
            && self.retry.tries_left > 1
            && !self.answered()
            && self.retry.replayable
            && (self.request.idempotent || !self.retry.reached_peer)
    }
}

/// A peer as the logs name it.
struct PeerName(Option<Picked>);

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => p.addr.fmt(f),
            None => f.write_str("admin API"),
        }
    }
}

impl Session {
    /// Opens (or takes from the pool) a connection for the current peer; on
    /// failure moves on like any other peer failure.
    pub(super) fn connect(&mut self, cx: &mut Cx<'_>) -> Step {
        let Phase::Exchange(x) = &mut self.phase else {
            return Ok(false);
        };
        if self.rec.upstream_started.is_none() {
            self.rec.upstream_started = Some(cx.now);
        }
        x.attempt_started = Some(cx.now);
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
            Err(e) => self.fail(cx, ProxyError::connect(&e)),
        }
    }

    /// The peer closed or reset the connection. On a pooled connection
    /// before any answer, that is the peer having closed it while idle: not
    /// a failure, the request goes again on a fresh connection.
    pub(super) fn peer_closed(&mut self, cx: &mut Cx<'_>, err: ProxyError) -> Step {
        if let Phase::Exchange(x) = &mut self.phase
            && x.up.as_ref().is_some_and(|u| u.reused)
            && !x.answered()
            && x.retry.replayable
            && x.up_in.is_empty()
        {
            if let Some(up) = x.up.take() {
                cx.pool.release(up);
            }
            if let Some(p) = x.peer
                && let Ok(c) = cx.pool.fresh(p.addr, cx.key, cx.registry)
            {
                x.reconnect(c);
                return Ok(true);
            }
        }
        self.fail(cx, err)
    }

    /// A peer failed this request: count it for passive health, then try
    /// the next peer when allowed, else answer with the error's status.
    /// Once an answer began, only closing can tell the client.
    pub(super) fn fail(&mut self, cx: &mut Cx<'_>, err: ProxyError) -> Step {
        let Phase::Exchange(x) = &mut self.phase else {
            return Err(err);
        };
        let retry = err.retryable() && x.may_retry();
        if let Some(up) = x.up.take() {
            cx.pool.release(up);
        }
        if x.answered() {
            return Err(err);
        }
        let now = health::now_ms();
        if err.counts_against_peer()
            && let Some(p) = x.peer
        {
            if let Some(slot) = p.health(cx.region) {
                health::record_failure(&slot, now, p.max_fails, p.fail_timeout_ms);
            }
            super::answers::count(cx, &p, err.status(), x.attempt_started);
        }
        log::warn!("peer {}: {err}", PeerName(x.peer));
        if retry
            && let Some(current) = x.peer
            && let Some(up) = x
                .retry
                .upstream
                .as_deref()
                .and_then(|n| cx.config.view.upstream(n.as_bytes()))
        {
            x.retry.tried.push(current.addr);
            if let Some(next) = crate::route::pick(cx.region, up, &x.retry.tried, now) {
                x.next_peer(next);
                return self.connect(cx);
            }
        }
        let keep = x.client_keep && x.req_body.is_done();
        self.answer_local(cx, err.status(), keep);
        Ok(true)
    }
}
