//! The `host:port` part of a peer's key.

use super::ParamError;

/// in brackets (`"[::1]:80"`) and returned without them (`"::1"`), ready for
/// `(host, port)` resolution. The port is decimal, 1..=65535. The host is
/// non-empty and made of ASCII letters, digits, `.`, `-` and `_` (a name or
/// an IPv4 address; no spaces, slashes, or other punctuation).
pub fn split_host_port(addr: &str) -> Result<(&str, u16), ParamError> {
    let err = |why: &'static str| ParamError::Address {
        addr: addr.to_string(),
        why,
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| err("missing ']'"))?;
        let port = after.strip_prefix(':').ok_or_else(|| err("missing port"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err("invalid IPv6 address"));
        }
        (h, port)
    } else {
        let (h, port) = addr.rsplit_once(':').ok_or_else(|| err("missing port"))?;
        if h.contains(':') {
            return Err(err("IPv6 address must be in brackets"));
        }
        if h.is_empty() {
            return Err(err("empty host"));
        }
        if !h
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
        {
            return Err(err("invalid character in host"));
        }
        (h, port)
    };
    if port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) {
        return Err(err("invalid port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host, p)),
        _ => Err(err("port out of range 1..=65535")),
    }
}
