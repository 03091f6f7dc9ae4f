//! Bodies in both directions: the framing tracker that finds where a body
//! ends, the request body going to the peer as the client sends it, and
//! the peer's answer read while the client's queue is short.

use std::io::{self, Write};

use crate::args::WorkerArgs;
use crate::http::BodyKind;
use crate::http::chunked::ChunkedTracker;

use super::error::{ErrorKind, ProxyError};
use super::{CHUNK, Cx, Phase, Session, Step, read_into};

/// A request is kept for a retry while head and body fit in this.
const REPLAY_LIMIT: usize = 64 << 10;

/// How much of a body is still to come.
#[derive(Debug, Clone, Copy)]
pub(super) enum Body {
    Length(u64),
    Chunked(ChunkedTracker),
    /// Until the sender closes (a response without length, a tunnel).
    UntilClose,
    Done,
}

impl Body {
    pub fn new(kind: BodyKind) -> Body {
        match kind {
            BodyKind::None => Body::Done,
            BodyKind::Length(n) => Body::Length(n),
            BodyKind::Chunked => Body::Chunked(ChunkedTracker::default()),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }

    /// Moves the bytes at the start of `avail` that belong to this body to
    /// `out` (chunk data only, when `decode`); returns how many were used.
    pub fn relay(
        &mut self,
        avail: &[u8],
        out: &mut Vec<u8>,
        decode: bool,
    ) -> Result<usize, crate::http::chunked::ChunkError> {
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
                    t.decode(avail, out)?
                } else {
                    t.advance(avail)?
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
pub(super) fn body_limit(args: &WorkerArgs, admin: bool) -> u64 {
    if admin {
        args.limits.admin_max_body_size
    } else {
        args.limits.client_max_body_size
    }
}

impl Session {
    /// Writes what is queued for the peer, then more body from the client.
    pub(super) fn send_request(&mut self, cx: &mut Cx<'_>) -> Step {
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
                    Ok(0) => return self.peer_closed(cx, ErrorKind::PeerClosed.into()),
                    Ok(n) => {
                        x.to_up_pos += n;
                        x.retry.reached_peer = true;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return self
                            .peer_closed(cx, ProxyError::with_io(ErrorKind::PeerClosed, &e));
                    }
                }
            }
            if x.req_body.is_done() {
                return Ok(progress);
            }
            if self.inbuf.is_empty() {
                if self.client_eof {
                    return Err(ErrorKind::ClientGone.into());
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
                    Err(e) => return Err(ProxyError::with_io(ErrorKind::ClientGone, &e)),
                }
                continue;
            }
            if !x.retry.replayable {
                x.to_up.clear();
                x.to_up_pos = 0;
            }
            let before = x.to_up.len();
            let Ok(n) = x.req_body.relay(&self.inbuf, &mut x.to_up, false) else {
                return self.refuse(cx, ErrorKind::InvalidBody.into());
            };
            self.inbuf.drain(..n);
            x.body_bytes += n as u64;
            if x.retry.replayable && x.to_up.len() > REPLAY_LIMIT {
                x.retry.replayable = false;
            }
            progress |= x.to_up.len() > before;
            if x.body_bytes > body_limit(cx.args, x.peer.is_none()) {
                return self.refuse(cx, ErrorKind::BodyTooLarge.into());
            }
        }
    }

    /// A bad request body: answered with the error's status unless an
    /// answer began (then only a close can tell the client).
    fn refuse(&mut self, cx: &mut Cx<'_>, err: ProxyError) -> Step {
        if let Phase::Exchange(x) = &self.phase
            && x.answered()
        {
            return Err(err);
        }
        self.answer_local(cx, err.status(), false);
        Ok(true)
    }

    /// Reads the peer's answer while the client's queue is short.
    pub(super) fn receive_response(&mut self, cx: &mut Cx<'_>) -> Step {
        let mut progress = false;
        while let Phase::Exchange(x) = &mut self.phase {
            if self.out.len() >= CHUNK || x.answer_complete() {
                break;
            }
            let Some(up) = x.up.as_mut() else { break };
            if !up.ready {
                break;
            }
            match read_into(up, &mut x.up_in, cx.scratch) {
                Ok(0) => {
                    if x.peer_eof() {
                        return self.finish(cx);
                    }
                    if x.answered() {
                        // Cut short: the client can only be told by a close.
                        return Err(ErrorKind::PeerClosed.into());
                    }
                    if x.up_in.is_empty() {
                        return self.peer_closed(cx, ErrorKind::PeerClosed.into());
                    }
                    return self.fail(cx, ErrorKind::IncompleteResponse.into());
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
                    let err = ProxyError::with_io(ErrorKind::PeerClosed, &e);
                    if x.answered() {
                        return Err(err);
                    }
                    return self.peer_closed(cx, err);
                }
            }
            progress |= self.relay_response(cx)?;
        }
        progress |= self.relay_response(cx)?;
        Ok(progress)
    }

    /// Moves response bytes from the peer's buffer to the client's: the
    /// head first (`response_head.rs`), then the body through its tracker.
    fn relay_response(&mut self, cx: &mut Cx<'_>) -> Step {
        let mut progress = false;
        loop {
            let Phase::Exchange(x) = &mut self.phase else {
                return Ok(progress);
            };
            if x.up_in.is_empty() {
                return Ok(progress);
            }
            if !x.answered() {
                if !self.relay_head(cx)? {
                    return Ok(progress);
                }
                progress = true;
                continue;
            }
            let n = x
                .relay_answer(&mut self.out)
                .map_err(|_| ProxyError::from(ErrorKind::InvalidResponse))?;
            progress |= n > 0;
            if n == 0 {
                return Ok(progress);
            }
        }
    }
}
