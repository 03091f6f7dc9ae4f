//! Why an exchange failed, as one value that decides everything that
//! follows from it: the status the client is answered with, whether the
//! request may go to another peer, whether the peer's passive health counts
//! it, and the short code the logs show. In the spirit of Pingora's error
//! (a kind, the side at fault, retryable); `Copy`, so a failure costs no
//! allocation on the hot path.

use std::fmt;
use std::io;

use crate::http::ParseError;

/// Which side of the proxy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The request head was refused by the parser (which knows its status).
    InvalidHead(ParseError),
    /// The request body's chunked framing is broken.
    InvalidBody,
    /// The request body is over its limit.
    BodyTooLarge,
    /// The client closed its connection, or writing to it failed.
    ClientGone,
    /// Routing found no peer: all down or out, or a `servername` that is
    /// neither an upstream nor an address.
    NoPeer,
    /// The peer refused the connection.
    ConnectRefused,
    /// Opening the connection failed otherwise.
    ConnectFailed,
    ConnectTimeout,
    /// Connected, but the answer did not come in time.
    ReadTimeout,
    /// The peer closed or reset the connection before answering.
    PeerClosed,
    /// The peer closed the connection in the middle of its answer's head.
    IncompleteResponse,
    /// The answer's head (or chunked framing) is not valid HTTP.
    InvalidResponse,
    /// The peer answered with one of `failure_statuses`.
    FailureStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProxyError {
    pub kind: ErrorKind,
    /// The system's error behind it, if one was.
    pub io: Option<io::ErrorKind>,
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> ProxyError {
        ProxyError { kind, io: None }
    }
}

impl ProxyError {
    /// A failed connect, refused or otherwise.
    pub fn connect(e: &io::Error) -> ProxyError {
        let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
            ErrorKind::ConnectRefused
        } else {
            ErrorKind::ConnectFailed
        };
        ProxyError::with_io(kind, e)
    }

    pub fn with_io(kind: ErrorKind, e: &io::Error) -> ProxyError {
        ProxyError {
            kind,
            io: Some(e.kind()),
        }
    }

    pub fn side(self) -> Side {
        match self.kind {
            ErrorKind::InvalidHead(_)
            | ErrorKind::InvalidBody
            | ErrorKind::BodyTooLarge
            | ErrorKind::ClientGone => Side::Client,
            _ => Side::Peer,
        }
    }

    /// The status the client is answered with, when no answer began.
    pub fn status(self) -> u16 {
        match self.kind {
            ErrorKind::InvalidHead(e) => e.status(),
            ErrorKind::InvalidBody => 400,
            ErrorKind::BodyTooLarge => 413,
            // Never sent: nginx's code for a client that went away, for
            // the logs.
            ErrorKind::ClientGone => 499,
            ErrorKind::ConnectTimeout | ErrorKind::ReadTimeout => 504,
            ErrorKind::NoPeer
            | ErrorKind::ConnectRefused
            | ErrorKind::ConnectFailed
            | ErrorKind::PeerClosed
            | ErrorKind::IncompleteResponse
            | ErrorKind::InvalidResponse
            | ErrorKind::FailureStatus => 502,
        }
    }

    /// Whether another peer may take the request (if the exchange allows
    /// it: see `Exchange::may_retry`). Routing found none to begin with
    /// when it is `NoPeer`.
    pub fn retryable(self) -> bool {
        self.side() == Side::Peer && self.kind != ErrorKind::NoPeer
    }

    /// Whether it counts against the peer's passive health: the failures
    /// that send a request elsewhere, as nginx's `max_fails` counts those
    /// of `proxy_next_upstream`.
    pub fn counts_against_peer(self) -> bool {
        self.retryable()
    }

    /// A stable short code for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidHead(_) => "invalid_head",
            ErrorKind::InvalidBody => "invalid_body",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::ClientGone => "client_gone",
            ErrorKind::NoPeer => "no_peer",
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectFailed => "connect_failed",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ReadTimeout => "read_timeout",
            ErrorKind::PeerClosed => "peer_closed",
            ErrorKind::IncompleteResponse => "incomplete_response",
            ErrorKind::InvalidResponse => "invalid_response",
            ErrorKind::FailureStatus => "failure_status",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        if let ErrorKind::InvalidHead(e) = self.kind {
            write!(f, " ({e})")?;
        }
        match self.io {
            Some(io) => write!(f, " ({io})"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_place_maps_each_kind_to_its_status_and_side() {
        let e = |k| ProxyError::from(k);
        assert_eq!(e(ErrorKind::ReadTimeout).status(), 504);
        assert_eq!(e(ErrorKind::ConnectTimeout).status(), 504);
        assert_eq!(e(ErrorKind::PeerClosed).status(), 502);
        assert_eq!(e(ErrorKind::NoPeer).status(), 502);
        assert_eq!(e(ErrorKind::BodyTooLarge).status(), 413);
        assert_eq!(e(ErrorKind::InvalidBody).status(), 400);
        assert_eq!(
            e(ErrorKind::InvalidHead(ParseError::TooLarge)).status(),
            431
        );
        assert!(e(ErrorKind::ConnectRefused).retryable());
        assert!(!e(ErrorKind::NoPeer).retryable());
        assert!(!e(ErrorKind::BodyTooLarge).retryable());
        assert_eq!(e(ErrorKind::ClientGone).side(), Side::Client);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ProxyError::connect(&refused).kind,
            ErrorKind::ConnectRefused
        );
        assert_eq!(
            ProxyError::connect(&refused).to_string(),
            "connect_refused (connection refused)"
        );
    }
}
