//! The one HTTP/1.x implementation of the project: the workers' proxy and
//! the master's admin API both parse and write with these modules.

pub mod chunked;
pub mod parse;
pub mod write;

pub use parse::{
    BodyKind, ParseError, RequestHead, ResponseHead, parse_request, parse_request_into,
    parse_response,
};

/// Headers that describe one connection, not the message (RFC 9110 7.6.1):
/// never passed from one side of the proxy to the other.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 5] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}
