//! One request's exchange with a peer (or the admin API): where it stands,
//! as a state that only the transitions below move, and what it carries.
//!
//! ```text
//! Connecting ──connected──▶ Sending ──final head──▶ Relaying ──end──▶ Draining
//!     ▲                        │  └──101 to an upgrade──▶ Tunnel ──close──▶ Draining
//!     └──────retry / resend────┘
//! ```
//!
//! The exchange ends (`Session::finish`) once it is `Draining` and the
//! request's body is in too.

use std::time::Instant;

use crate::http::chunked::ChunkError;
use crate::route::Picked;
use crate::upstream_conn::UpConn;

use super::body::Body;
use super::retry::Retry;

#[derive(Debug, Clone, Copy)]
pub(super) enum State {
    /// A connection to the peer is opening (or was taken from the pool).
    Connecting,
    /// The request goes to the peer; no final answer head yet.
    Sending,
    /// The answer's head went to the client; its body follows.
    Relaying(Body),
    /// A `101` to an upgrade: bytes flow both ways until a side closes.
    Tunnel,
    /// The answer is complete; the request's body may still be coming.
    Draining,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Sending => "sending",
            State::Relaying(_) => "relaying",
            State::Tunnel => "tunnel",
            State::Draining => "draining",
        }
    }
}

/// What the request says of itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    /// GET and the like may be sent again after a peer saw them; POST,
    /// PATCH and LOCK only if no peer did.
    pub idempotent: bool,
    pub head_method: bool,
    /// Asks for an upgrade (`Connection: upgrade`).
    pub upgrade: bool,
    /// An HTTP/1.0 client: chunked answers are decoded for it, interim
    /// answers are not sent to it.
    pub http10: bool,
}

pub(super) struct Exchange {
    state: State,
    pub up: Option<UpConn>,
    /// The peer (none for the admin API).
    pub peer: Option<Picked>,
    pub request: Request,
    pub retry: Retry,
    /// Head and body bytes for the peer. While the request is replayable,
    /// everything sent stays here (`to_up_pos` marks what is written), so
    /// a retry resends it.
    pub to_up: Vec<u8>,
    pub to_up_pos: usize,
    pub req_body: Body,
    pub body_bytes: u64,
    /// Bytes from the peer not yet relayed.
    pub up_in: Vec<u8>,
    /// The answer goes to the client without its chunked framing.
    pub decode_chunked: bool,
    /// The peer connection may go back to the pool afterwards.
    pub poolable: bool,
    /// The client's connection stays open afterwards.
    pub client_keep: bool,
    /// Answer body bytes queued for the client (the access log's
    /// `$body_bytes_sent`).
    pub sent_body: u64,
    /// When the attempt on the current peer began (its response time).
    pub attempt_started: Option<Instant>,
}

impl Exchange {
    pub fn new(
        peer: Option<Picked>,
        request: Request,
        retry: Retry,
        to_up: Vec<u8>,
        up_in: Vec<u8>,
        req_body: Body,
        client_keep: bool,
    ) -> Exchange {
        Exchange {
            state: State::Connecting,
            up: None,
            peer,
            request,
            retry,
            to_up,
            to_up_pos: 0,
            req_body,
            body_bytes: 0,
            up_in,
            decode_chunked: request.http10,
            poolable: true,
            client_keep,
            sent_body: 0,
            attempt_started: None,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// A final answer's head went to the client.
    pub fn answered(&self) -> bool {
        matches!(
            self.state,
            State::Relaying(_) | State::Tunnel | State::Draining
        )
    }

    pub fn is_connecting(&self) -> bool {
        matches!(self.state, State::Connecting)
    }

    /// The whole answer was relayed.
    pub fn answer_complete(&self) -> bool {
        matches!(self.state, State::Draining)
    }

    /// Answer and request are both over.
    pub fn is_complete(&self) -> bool {
        self.answer_complete() && self.req_body.is_done()
    }

    fn enter(&mut self, next: State) {
        trace(&next);
        self.state = next;
    }

    /// `Connecting` → `Sending`.
    pub fn connected(&mut self) {
        if self.is_connecting() {
            self.enter(State::Sending);
        }
    }

    /// Back to `Connecting` on a fresh connection to the same peer (a
    /// pooled one was found closed): the request is sent again whole.
    pub fn reconnect(&mut self, up: UpConn) {
        self.up = Some(up);
        self.to_up_pos = 0;
        self.up_in.clear();
        self.enter(State::Connecting);
    }

    /// Back to `Connecting` for another peer, which has seen nothing of the
    /// request; the caller opens the connection.
    pub fn next_peer(&mut self, peer: Picked) {
        self.peer = Some(peer);
        self.retry.tries_left -= 1;
        self.retry.reached_peer = false;
        self.to_up_pos = 0;
        self.up_in.clear();
        self.enter(State::Connecting);
    }

    /// `Sending` → `Relaying`, or `Draining` when the answer has no body.
    pub fn answer(&mut self, body: Body) {
        if body.is_done() {
            self.enter(State::Draining);
        } else {
            self.enter(State::Relaying(body));
        }
    }

    /// `Sending` → `Tunnel`: the client's bytes, too, now run until close.
    pub fn tunnel(&mut self) {
        self.req_body = Body::UntilClose;
        self.enter(State::Tunnel);
    }

    /// The peer closed its side. An answer delimited by that close is
    /// complete (`Draining`), and so is a tunnel; returns false when the
    /// answer was cut short.
    pub fn peer_eof(&mut self) -> bool {
        match self.state {
            State::Relaying(Body::UntilClose) | State::Tunnel => {
                self.client_keep = false;
                self.poolable = false;
                if matches!(self.req_body, Body::UntilClose) {
                    self.req_body = Body::Done;
                }
                self.enter(State::Draining);
                true
            }
            _ => false,
        }
    }

    /// Moves answer body bytes from `up_in` to `out`; returns how many were
    /// taken. Bytes past the end of the answer mean a confused peer: they
    /// are dropped and the connection is not reused.
    pub fn relay_answer(&mut self, out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let queued = out.len();
        let n = match &mut self.state {
            State::Relaying(body) => body.relay(&self.up_in, out, self.decode_chunked)?,
            State::Tunnel => Body::UntilClose.relay(&self.up_in, out, false)?,
            State::Draining => {
                self.poolable = false;
                self.up_in.clear();
                return Ok(0);
            }
            State::Connecting | State::Sending => return Ok(0),
        };
        self.up_in.drain(..n);
        self.sent_body += (out.len() - queued) as u64;
        if let State::Relaying(body) = &self.state
            && body.is_done()
        {
            self.enter(State::Draining);
        }
        Ok(n)
    }
}

/// Records each state entered, for the tests of the state machine.
fn trace(state: &State) {
    #[cfg(test)]
    super::tests::trace(state.name());
    #[cfg(not(test))]
    let _ = state;
}
