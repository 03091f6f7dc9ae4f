//! Where things live in etcd (SPEC 3), and how a key and its value are read.
//!
//! * `/$NAME/rules/$domain`: a rule set, JSON, possibly URI-escaped by the
//!   old ELB's dump;
//! * `/$NAME/upstreams/$upstream/$host:$port`: one peer, a value that
//!   `parse_peer_value` reads (empty, nginx parameters, JSON, escaped), with
//!   nginx's defaults;
//! * with a services prefix P: `P$service/$host:$port`, lua-resty-upstream-
//!   etcd's JSON with its defaults; a value that is not JSON gives them all,
//!   with a warning, as the original did.

use serde_json::Value;

use crate::peers::{Origin, ParamError, PeerParams, parse_peer_from, percent_decode};

/// Which layout a peer came from. The order matters: when both name the
/// same peer of the same upstream, the `/$NAME/upstreams/` one wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Services,
    Elb,
}

/// A key, classified.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Domain(&'a str),
    Peer {
        source: Source,
        upstream: &'a str,
        peer: &'a str,
    },
    /// Under a watched prefix, but not in the layout (logged, skipped).
    Unknown,
}

/// The prefixes of one instance.
#[derive(Debug, Clone)]
pub struct Layout {
    pub rules: String,
    pub upstreams: String,
    pub services: Option<String>,
}

impl Layout {
    pub fn new(name: &str, services: Option<&str>) -> Layout {
        Layout {
            rules: format!("/{name}/rules/"),
            upstreams: format!("/{name}/upstreams/"),
            services: services.filter(|s| !s.is_empty()).map(str::to_string),
        }
    }

    /// The prefixes loaded and watched.
    pub fn prefixes(&self) -> Vec<&str> {
        let mut v = vec![self.rules.as_str(), self.upstreams.as_str()];
        if let Some(s) = &self.services {
            // A services prefix inside (or equal to) one of ours adds nothing.
            if !v.iter().any(|p| s.starts_with(p)) {
                v.push(s);
            }
        }
        v
    }

    /// The prefixes a dump replaces.
    pub fn dumped(&self) -> [&str; 2] {
        [&self.rules, &self.upstreams]
    }

    pub fn classify<'k>(&self, key: &'k [u8]) -> KeyKind<'k> {
        let Ok(key) = std::str::from_utf8(key) else {
            return KeyKind::Unknown;
        };
        if let Some(domain) = key.strip_prefix(self.rules.as_str()) {
            return if domain.is_empty() || domain.contains('/') {
                KeyKind::Unknown
            } else {
                KeyKind::Domain(domain)
            };
        }
        if let Some(rest) = key.strip_prefix(self.upstreams.as_str()) {
            return peer_key(Source::Elb, rest);
        }
        if let Some(rest) = self.services.as_deref().and_then(|p| key.strip_prefix(p)) {
            return peer_key(Source::Services, rest);
        }
        KeyKind::Unknown
    }

    pub fn domain_key(&self, domain: &str) -> String {
        format!("{}{domain}", self.rules)
    }

    pub fn peer_key(&self, upstream: &str, peer: &str) -> String {
        format!("{}{upstream}/{peer}", self.upstreams)
    }
}

fn peer_key(source: Source, rest: &str) -> KeyKind<'_> {
    match rest.split_once('/') {
        Some((upstream, peer))
            if !upstream.is_empty() && !peer.is_empty() && !peer.contains('/') =>
        {
            KeyKind::Peer {
                source,
                upstream,
                peer,
            }
        }
        _ => KeyKind::Unknown,
    }
}

/// Why a value was skipped.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValueError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("not a JSON rule set: {0}")]
    Rules(String),
    #[error("{0}")]
    Peer(#[from] crate::peers::ParamError),
}

/// A rule set: JSON, or JSON URI-escaped (decoded only when it does not
/// parse as it is and holds a `%XX`). Validation of the rules themselves is
/// the store's.
pub fn parse_rules(raw: &[u8]) -> Result<Value, ValueError> {
    let text = std::str::from_utf8(raw).map_err(|_| ValueError::NotUtf8)?;
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(v) => Ok(v),
        Err(first) => match percent_decode(text.trim()) {
            Some(decoded) => {
                serde_json::from_str(decoded.trim()).map_err(|e| ValueError::Rules(e.to_string()))
            }
            None => Err(ValueError::Rules(first.to_string())),
        },
    }
}

/// A peer's value under `source`'s layout, and, when it gave every default
/// in place of what it holds, why (for a warning).
pub fn parse_peer(
    source: Source,
    raw: &[u8],
) -> Result<(PeerParams, Option<ParamError>), ValueError> {
    let origin = match source {
        Source::Elb => Origin::Nginx,
        Source::Services => Origin::Resty,
    };
    match std::str::from_utf8(raw) {
        Ok(text) => Ok(parse_peer_from(origin, text)?),
        Err(_) if source == Source::Services => Ok((
            PeerParams::resty(),
            Some(ParamError::Json("not UTF-8".into())),
        )),
        Err(_) => Err(ValueError::NotUtf8),
    }
}

/// The end of the key range of everything that starts with `prefix`
/// (etcd's `clientv3.GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): to the end of keys.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Weight;

    #[test]
    fn keys_are_classified() {
        let l = Layout::new("ELB", Some("/v1/svc/"));
        assert_eq!(l.classify(b"/ELB/rules/a.com"), KeyKind::Domain("a.com"));
        assert_eq!(l.classify(b"/ELB/rules/"), KeyKind::Unknown);
        assert_eq!(l.classify(b"/ELB/rules/a/b"), KeyKind::Unknown);
        assert_eq!(
            l.classify(b"/ELB/upstreams/web/127.0.0.1:80"),
            KeyKind::Peer {
                source: Source::Elb,
                upstream: "web",
                peer: "127.0.0.1:80"
            }
        );
        assert_eq!(l.classify(b"/ELB/upstreams/web"), KeyKind::Unknown);
        assert_eq!(l.classify(b"/ELB/upstreams/web/"), KeyKind::Unknown);
        assert_eq!(
            l.classify(b"/v1/svc/api/10.0.0.1:8080"),
            KeyKind::Peer {
                source: Source::Services,
                upstream: "api",
                peer: "10.0.0.1:8080"
            }
        );
        assert_eq!(l.classify(b"/OTHER/rules/a"), KeyKind::Unknown);
        assert_eq!(
            l.prefixes(),
            vec!["/ELB/rules/", "/ELB/upstreams/", "/v1/svc/"]
        );
        let inner = Layout::new("ELB", Some("/ELB/upstreams/"));
        assert_eq!(inner.prefixes().len(), 2);
    }

    #[test]
    fn rules_plain_and_escaped() {
        let plain = br#"{"init":"a","rules":{"a":{"type":"backend","args":{"servername":"up"}}}}"#;
        let v = parse_rules(plain).expect("plain");
        let escaped = "%7B%22init%22%3A%22a%22%2C%22rules%22%3A%7B%22a%22%3A%7B%22type%22%3A%22backend%22%2C%22args%22%3A%7B%22servername%22%3A%22up%22%7D%7D%7D%7D";
        assert_eq!(parse_rules(escaped.as_bytes()).expect("escaped"), v);
        // A % inside a valid JSON string is left alone.
        let pct = br#"{"init":"a","rules":{"a":{"type":"path","args":{"pattern":"/%41"}}}}"#;
        assert_eq!(
            parse_rules(pct).expect("pct")["rules"]["a"]["args"]["pattern"],
            "/%41"
        );
        assert!(parse_rules(b"{nope").is_err());
        assert!(parse_rules(b"%7Bnope").is_err());
        assert_eq!(parse_rules(b"\xff"), Err(ValueError::NotUtf8));
    }

    #[test]
    fn peers_in_every_form() {
        let elb = |raw: &[u8]| parse_peer(Source::Elb, raw).map(|(p, _)| p);
        assert_eq!(elb(b"").expect("empty"), PeerParams::default());
        assert_eq!(elb(b"weight=3").expect("nginx").weight, Weight::whole(3));
        assert_eq!(
            elb(b"max_fails%3D2%20weight%3D10").expect("esc").weight,
            Weight::whole(10)
        );
        let j = elb(br#"{"weight":5,"status":"down"}"#).expect("json");
        assert!(!j.is_available());
        assert!(elb(b"bogus=1").is_err());
    }

    #[test]
    fn services_values_take_the_originals_defaults() {
        let svc = |raw: &[u8]| parse_peer(Source::Services, raw);
        // Missing fields: lua-resty-upstream-etcd's defaults.
        let (p, warning) = svc(br#"{"weight":2.5}"#).expect("json");
        assert_eq!(warning, None);
        assert_eq!(p.weight, Weight::parse("2.5").expect("2.5"));
        assert_eq!(p.check_url.as_deref(), Some("/health"));
        assert_eq!((p.slow_start_s, p.status.as_str()), (30, "up"));
        let (p, _) = svc(b"{}").expect("empty object");
        assert_eq!(p, PeerParams::resty());
        assert_eq!(p.weight, Weight::whole(100));
        // Not JSON (nginx form, empty, garbage, not UTF-8): every default,
        // with a warning.
        for raw in [&b"weight=3"[..], b"", b"}{", b"\xff"] {
            let (p, warning) = svc(raw).expect("defaults");
            assert_eq!(p, PeerParams::resty());
            assert!(warning.is_some(), "{raw:?}");
        }
        // A JSON object with a bad field is still refused.
        assert!(svc(br#"{"weight":-1}"#).is_err());
    }

    #[test]
    fn decoding_and_ranges() {
        assert_eq!(percent_decode("abc"), None);
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%41%"), Some("A%".into()));
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
