//! The one HTTP/1.x implementation of the project: the workers' proxy and
//! the master's admin API both parse and write with these modules.

pub mod chunked;
pub mod parse;
pub mod write;

pub use parse::{
    BodyKind, ConnectionNames, ParseError, RequestHead, ResponseHead, parse_request,
    parse_request_into, parse_response,
};

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [&[u8]; 5] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
];

/// Headers ELB passes on as the message's own even when a `Connection`
/// header names them: the body is relayed with its framing, so dropping
/// `Content-Length` from a request whose body still follows would have the
/// peer read that body as a next request (and a client an answer without
/// its end); `Host` is required of a request.
const NEVER_NAMED: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];

/// Whether a header of a message parsed from `buf` belongs to one
/// connection and is never passed from one side of the proxy to the other:
/// one of the hop-by-hop set, or one the message's `Connection` headers
/// name (`named`).
pub fn is_hop_by_hop(name: &[u8], buf: &[u8], named: &ConnectionNames) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) || named.contains(buf, name)
}

/// Whether a name in `Connection` is to be kept for [`is_hop_by_hop`]: not
/// one it drops anyway, nor one that must pass.
fn nominable(name: &[u8]) -> bool {
    !HOP_BY_HOP
        .iter()
        .chain(NEVER_NAMED.iter())
        .any(|h| name.eq_ignore_ascii_case(h))
}
