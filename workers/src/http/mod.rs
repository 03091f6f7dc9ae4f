//! The one HTTP/1.x implementation of the project: the workers' proxy and
//! the master's admin API both parse and write with these modules.

pub mod chunked;
pub mod parse;
pub mod write;

pub use parse::{
    BodyKind, ParseError, RequestHead, ResponseHead, parse_request, parse_request_into,
    parse_response,
};
