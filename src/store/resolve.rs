//! Peers named by host name are resolved when they are set, as the
//! original did, off the store's lock and within a bound time.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::peers::split_host_port;

use super::{PeerList, ResolvedPeers, StoreError};

/// How long [`resolve_peers`] waits for the system's resolver (its own
/// timeouts, from `/etc/resolv.conf`, are 5 s per try by default): a peer
/// whose name does not resolve within this time counts as not resolving,
/// and the change that named it is refused.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether every peer is an `ip:port` (resolving them waits for nothing).
pub fn all_addresses(peers: &PeerList) -> bool {
    peers.iter().all(|(peer, _)| {
        split_host_port(peer).is_ok_and(|(host, _)| host.parse::<IpAddr>().is_ok())
    })
}

/// Resolves every peer of `upstream` now, as the original did when a peer
/// was set. Call it without the store's lock: a host name waits for the
/// system's resolver, on a helper thread, up to [`RESOLVE_TIMEOUT`] (the
/// thread is left to finish alone after that). Fails, naming the peer, when
/// any does not resolve: the caller keeps the upstream's old list.
pub fn resolve_peers(upstream: &str, peers: PeerList) -> Result<ResolvedPeers, StoreError> {
    let failed = |reason: String| StoreError::Upstream {
        upstream: upstream.to_string(),
        reason,
    };
    let mut out = ResolvedPeers::new();
    let mut named = Vec::new();
    for (peer, params) in peers {
        let (host, port) = split_host_port(&peer).map_err(|e| failed(e.to_string()))?;
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                out.insert(peer, (SocketAddr::new(ip, port), params));
            }
            Err(_) => named.push((host.to_string(), port, peer, params)),
        }
    }
    if named.is_empty() {
        return Ok(out);
    }
    let deadline = Instant::now() + RESOLVE_TIMEOUT;
    let pending: Vec<String> = named.iter().map(|(_, _, peer, _)| peer.clone()).collect();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("elb-resolve".into())
        .spawn(move || {
            for (host, port, peer, params) in named {
                let addr = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| format!("cannot resolve '{peer}': {e}"))
                    .and_then(|mut a| {
                        a.next()
                            .ok_or_else(|| format!("'{peer}' resolves to no address"))
                    });
                // Gone: the caller gave up waiting.
                if tx.send((peer, addr, params)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| failed(format!("cannot start a resolver thread: {e}")))?;
    for waiting in pending {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((peer, Ok(addr), params)) => {
                out.insert(peer, (addr, params));
            }
            Ok((_, Err(reason), _)) => return Err(failed(reason)),
            Err(_) => {
                return Err(failed(format!(
                    "'{waiting}' did not resolve within {RESOLVE_TIMEOUT:?}"
                )));
            }
        }
    }
    Ok(out)
}
