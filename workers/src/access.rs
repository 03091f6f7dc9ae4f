//! Who may use the admin API over TCP: clients in the allowed networks, or
//! presenting the bearer token. The master's admin listener and the workers'
//! proxy listeners both decide with this.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` (or a bare address: one host).
    pub fn parse(v: &str) -> Option<Cidr> {
        let (addr, prefix) = match v.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (v, None),
        };
        let addr: IpAddr = addr.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Access {
    pub allow: Vec<Cidr>,
    pub token: Option<String>,
}

impl Access {
    /// Whether a TCP client at `ip`, sending `authorization`, may enter.
    pub fn admits(&self, ip: IpAddr, authorization: Option<&[u8]>) -> bool {
        if self.allow.iter().any(|c| c.contains(ip)) {
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

    #[test]
    fn cidrs_match_v4_v6_and_mapped() {
        let c = Cidr::parse("10.1.0.0/16").expect("cidr");
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.9.9")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("cidr")
                .contains(ip("192.0.2.1"))
        );
        assert!(Cidr::parse("::1").expect("cidr").contains(ip("::1")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nope").is_none());
    }

    #[test]
    fn the_token_admits_from_anywhere() {
        let a = Access {
            allow: vec![Cidr::parse("127.0.0.0/8").expect("cidr")],
            token: Some("s3cret".into()),
        };
        assert!(a.admits(ip("127.0.0.1"), None));
        assert!(!a.admits(ip("192.0.2.1"), None));
        assert!(!a.admits(ip("192.0.2.1"), Some(b"Bearer nope")));
        assert!(a.admits(ip("192.0.2.1"), Some(b"Bearer s3cret")));
    }
}
