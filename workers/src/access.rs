//! Who may use the admin API over TCP: clients in the allowed networks, or
//! presenting the bearer token. The master's admin listener and the workers'
//! proxy listeners both decide with this.

use std::net::IpAddr;

use ipnet::IpNet;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub token: Option<String>,
}

impl Access {
    /// Whether a TCP client at `ip`, sending `authorization`, may enter.
    pub fn admits(&self, ip: IpAddr, authorization: Option<&[u8]>) -> bool {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return true;
        }
        match (&self.token, authorization) {
            (Some(t), Some(a)) => a
                .strip_prefix(b"Bearer ")
                .is_some_and(|given| constant_time_eq(given, t.as_bytes())),
            _ => false,
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("network")
    }

    #[test]
    fn networks_match_v4_v6_and_mapped() {
        let a = Access {
            allow: vec![net("10.1.0.0/16"), net("::1/128")],
            token: None,
        };
        assert!(a.admits(ip("10.1.2.3"), None));
        assert!(!a.admits(ip("10.2.0.1"), None));
        assert!(a.admits(ip("::ffff:10.1.9.9"), None));
        assert!(a.admits(ip("::1"), None));
        let all = Access {
            allow: vec![net("0.0.0.0/0")],
            token: None,
        };
        assert!(all.admits(ip("192.0.2.1"), None));
    }

    #[test]
    fn the_token_admits_from_anywhere() {
        let a = Access {
            allow: vec![net("127.0.0.0/8")],
            token: Some("s3cret".into()),
        };
        assert!(a.admits(ip("127.0.0.1"), None));
        assert!(!a.admits(ip("192.0.2.1"), None));
        assert!(!a.admits(ip("192.0.2.1"), Some(b"Bearer nope")));
        assert!(a.admits(ip("192.0.2.1"), Some(b"Bearer s3cret")));
    }
}
