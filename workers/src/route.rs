//! From a parsed request to where it goes: the domain's rule set, a peer
//! chosen by smooth WRR over the shared cursor, and the request head to send
//! it. Reads only the worker's view and the region's atomics; allocates
//! nothing once its buffers are warm.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use elb_shm::Region;

use crate::access::Access;
use crate::balance;
use crate::health::{HealthSlot, PeerHealth};
use crate::http::{self, RequestHead};
use crate::limit;
use crate::published::{PeerRecord, UpstreamRecord};
use crate::rules::{Decision, Limit, LimitKey, Scratch};
use crate::view::View;

const ADMIN_PREFIX: &[u8] = b"/__erulb__/";

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Answer here with this status.
    Status(u16),
    /// No peer can take it (every one down or out, or a `servername` that
    /// is neither an upstream nor an address).
    NoPeer,
    /// A `limit` rule refused it: 429, `Retry-After` in seconds.
    Limited { retry_after: u64 },
    /// Proxy to this peer; `upstream` names the upstream it was picked from
    /// (none for a direct `host:port`), to pick another on a retry.
    Peer {
        peer: Picked,
        upstream: Option<std::rc::Rc<str>>,
    },
    /// Hand to the master's admin API.
    Admin,
}

#[derive(Default)]
pub(crate) struct Router {
    scratch: Scratch,
    host: Vec<u8>,
    /// The counters entry of the domain the last request matched.
    counters: Option<u32>,
    /// The key of the `limit` bucket being checked.
    bucket: Vec<u8>,
}

/// What routing needs besides the request.
pub(crate) struct RouteCtx<'a> {
    pub view: &'a View,
    pub region: &'a Region,
    pub access: &'a Access,
    pub client: IpAddr,
    /// `client` as text, formatted once per connection.
    pub client_text: &'a [u8],
}

impl Router {
    /// The counters entry of the domain the last routed request matched.
    pub fn counters(&self) -> Option<u32> {
        self.counters
    }

    /// Routes the request whose head is `head` (ranges into `buf`), writing
    /// the head to send upstream into `out` when it is to be proxied.
    pub fn route(
        &mut self,
        ctx: &RouteCtx<'_>,
        buf: &[u8],
        head: &RequestHead,
        out: &mut Vec<u8>,
    ) -> Routed {
        self.counters = None;
        let (path, query) = split_target(head.target(buf));
        if is_admin_path(path) {
            let auth = header(buf, head, b"authorization");
            if !ctx.access.admits(ctx.client, auth) {
                return Routed::Status(403);
            }
            write_head(out, buf, head, path, query, &[], ctx.client_text);
            return Routed::Admin;
        }
        let Some(host) = head.host.clone() else {
            return Routed::Status(404);
        };
        self.host.clear();
        self.host
            .extend(buf[host].iter().map(u8::to_ascii_lowercase));
        let Some((rules, counters)) = ctx.view.rules_for(&self.host) else {
            return Routed::Status(404);
        };
        self.counters = counters;
        let ua = head.user_agent.clone().map(|r| &buf[r]);
        let (host, bucket) = (&self.host, &mut self.bucket);
        let mut limiter = |l: &Limit| {
            let key = match &l.key {
                LimitKey::RemoteAddr => None,
                LimitKey::Host => Some(host.as_slice()),
                LimitKey::Header(name) => header(buf, head, name.as_bytes()),
            };
            limit::check(ctx.region, bucket, host, l, key.unwrap_or(ctx.client_text))
        };
        match rules.route(path, ua, &mut self.scratch, &mut limiter) {
            Decision::Forbidden => Routed::Status(403),
            Decision::Limited { retry_after, .. } => Routed::Limited { retry_after },
            Decision::Backend {
                servername,
                headers,
                rewritten,
            } => {
                let target = match ctx.view.upstream_named(servername.as_bytes()) {
                    Some((name, up)) => match pick(ctx.region, up, &[], crate::health::now_ms()) {
                        Some(peer) => Routed::Peer {
                            peer,
                            upstream: Some(name.clone()),
                        },
                        None => return Routed::NoPeer,
                    },
                    None => match servername.parse::<SocketAddr>() {
                        Ok(addr) => Routed::Peer {
                            peer: Picked {
                                addr,
                                health: None,
                                max_fails: 0,
                                fail_timeout_ms: 0,
                                counters: None,
                                response_times: None,
                            },
                            upstream: None,
                        },
                        Err(_) => return Routed::NoPeer,
                    },
                };
                let path = if rewritten {
                    &self.scratch.path[..]
                } else {
                    path
                };
                write_head(out, buf, head, path, query, headers, ctx.client_text);
                target
            }
        }
    }
}

/// A peer chosen for a request, with what passive health needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Picked {
    pub addr: SocketAddr,
    /// Passive-health state (none for a direct `host:port`).
    pub health: Option<HealthSlot>,
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    /// Where its answers count, and its upstream's response times
    /// (`elb_shm::counters`); none for a direct `host:port`.
    pub counters: Option<u32>,
    pub response_times: Option<u32>,
}

impl Picked {
    /// The peer's health words, as the incarnation it was picked with sees
    /// them.
    pub fn health<'r>(&self, region: &'r Region) -> Option<PeerHealth<'r>> {
        self.health.and_then(|h| h.in_region(region))
    }
}

/// Smooth WRR over the primary peers, then the backups, with the cursors
/// shared by every worker in the upstream's state slot. Peers that are
/// down, out after failures, or in `exclude` (tried already) are skipped.
pub(crate) fn pick(
    region: &Region,
    up: &UpstreamRecord,
    exclude: &[SocketAddr],
    now_ms: u64,
) -> Option<Picked> {
    let cursor = region.state_slot(up.cursor_slot as usize)?;
    let usable = |i: usize| {
        up.peers.get(i).is_some_and(|p| {
            p.available
                && !exclude.contains(&p.addr)
                && health_slot(p)
                    .in_region(region)
                    .is_none_or(|h| !crate::health::is_out(&h, now_ms))
        })
    };
    let chosen = balance::pick(
        &up.schedule,
        || cursor.counter(0).fetch_add(1, Ordering::Relaxed),
        usable,
    )
    .or_else(|| {
        balance::pick(
            &up.backup_schedule,
            || cursor.counter(1).fetch_add(1, Ordering::Relaxed),
            usable,
        )
    })?;
    let peer = up.peers.get(chosen)?;
    Some(Picked {
        addr: peer.addr,
        health: Some(health_slot(peer)),
        max_fails: peer.max_fails,
        fail_timeout_ms: peer.fail_timeout_ms,
        counters: peer.counters,
        response_times: up.response_times,
    })
}

/// Whether a request for `target` is for the admin API (`/__erulb__/…`).
pub(crate) fn is_admin(target: &[u8]) -> bool {
    is_admin_path(split_target(target).0)
}

fn is_admin_path(path: &[u8]) -> bool {
    path.starts_with(ADMIN_PREFIX) || path == &ADMIN_PREFIX[..ADMIN_PREFIX.len() - 1]
}

fn health_slot(p: &PeerRecord) -> HealthSlot {
    HealthSlot {
        index: p.slot,
        incarnation: p.incarnation,
    }
}

/// Path and query (with its `?`) of an origin-form or absolute-form target.
pub(crate) fn split_target(target: &[u8]) -> (&[u8], &[u8]) {
    let origin = match target.windows(3).position(|w| w == b"://") {
        Some(i) if !target.starts_with(b"/") => {
            let rest = &target[i + 3..];
            rest.iter()
                .position(|b| *b == b'/' || *b == b'?')
                .map_or(&b"/"[..], |j| &rest[j..])
        }
        _ => target,
    };
    match origin.iter().position(|b| *b == b'?') {
        Some(q) => (&origin[..q], &origin[q..]),
        None => (origin, &[]),
    }
}

pub(crate) fn header<'b>(buf: &'b [u8], head: &RequestHead, name: &[u8]) -> Option<&'b [u8]> {
    head.headers
        .iter()
        .find(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(name))
        .map(|(_, v)| &buf[v.clone()])
}

/// Headers not passed upstream: those of the client's connection (the
/// hop-by-hop set and what its `Connection` names), and those ELB sets
/// itself (it answers `Expect: 100-continue` itself, as nginx does; an
/// upgrade is written anew).
fn skipped(buf: &[u8], head: &RequestHead, name: &[u8]) -> bool {
    const OWN: [&[u8]; 5] = [
        b"expect",
        b"upgrade",
        b"x-real-ip",
        b"remote-host",
        b"x-forwarded-for",
    ];
    http::is_hop_by_hop(name, buf, &head.connection)
        || OWN.iter().any(|s| name.eq_ignore_ascii_case(s))
}

/// Writes the request head to send upstream.
fn write_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    path: &[u8],
    query: &[u8],
    extra: &[(String, String)],
    client: &[u8],
) {
    out.extend_from_slice(head.method(buf));
    out.push(b' ');
    out.extend_from_slice(path);
    out.extend_from_slice(query);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: Option<&[u8]> = None;
    for (n, v) in &head.headers {
        let name = &buf[n.clone()];
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            // Several such headers are one list (RFC 9110 5.3); keep the last
            // list whole and append to it, as nginx's
            // $proxy_add_x_forwarded_for does with the combined value.
            forwarded_for = Some(&buf[v.clone()]);
        }
        if !skipped(buf, head, name) {
            http::write::header(out, name, &buf[v.clone()]);
        }
    }
    http::write::header(out, b"X-Real-IP", client);
    http::write::header(out, b"REMOTE-HOST", client);
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(xff) = forwarded_for.filter(|x| !x.is_empty()) {
        out.extend_from_slice(xff);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client);
    out.extend_from_slice(b"\r\n");
    for (name, value) in extra {
        http::write::header(out, name.as_bytes(), value.as_bytes());
    }
    if head.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        if let Some(u) = header(buf, head, b"upgrade") {
            out.extend_from_slice(b"Upgrade: ");
            out.extend_from_slice(u);
            out.extend_from_slice(b"\r\n");
        }
    } else {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_request;

    #[test]
    fn targets_split_into_path_and_query() {
        assert_eq!(split_target(b"/a/b?x=1"), (&b"/a/b"[..], &b"?x=1"[..]));
        assert_eq!(split_target(b"/"), (&b"/"[..], &b""[..]));
        assert_eq!(split_target(b"http://h:80/p?q"), (&b"/p"[..], &b"?q"[..]));
        assert_eq!(split_target(b"http://h"), (&b"/"[..], &b""[..]));
    }

    #[test]
    fn the_upstream_head_keeps_host_and_adds_the_client() {
        let raw = b"GET /old?q=1 HTTP/1.1\r\nHost: Example.com\r\nConnection: close\r\nX-Forwarded-For: 10.0.0.9\r\nX-Real-IP: spoofed\r\n\r\n";
        let head = parse_request(raw, 1 << 16).expect("ok").expect("complete");
        let mut out = Vec::new();
        let extra = vec![("expires".to_string(), "30d".to_string())];
        write_head(&mut out, raw, &head, b"/new", b"?q=1", &extra, b"192.0.2.7");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.starts_with("GET /new?q=1 HTTP/1.1\r\nHost: Example.com\r\n"),
            "{text}"
        );
        assert!(text.contains("X-Real-IP: 192.0.2.7\r\n"));
        assert!(!text.contains("spoofed"));
        assert!(text.contains("REMOTE-HOST: 192.0.2.7\r\n"));
        assert!(text.contains("X-Forwarded-For: 10.0.0.9, 192.0.2.7\r\n"));
        assert!(text.contains("expires: 30d\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n"));
        assert!(!text.contains("Connection: close"));
    }
}
