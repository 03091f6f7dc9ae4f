//! Binding the proxy listeners: for each address, one SO_REUSEPORT socket per
//! worker. The kernel spreads connections evenly over them, and the master
//! keeps every socket open, so connections queued on a crashed worker's
//! socket wait for its successor instead of being refused.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// `sockets[w][a]`: worker `w`'s socket for address `a`.
pub fn bind_all(addrs: &[SocketAddr], workers: usize) -> Result<Vec<Vec<Socket>>, ListenError> {
    let mut per_worker: Vec<Vec<Socket>> = (0..workers).map(|_| Vec::new()).collect();
    for &addr in addrs {
        // With port 0 the first bind picks the port; the others join it.
        let mut actual = addr;
        for sockets in per_worker.iter_mut() {
            let s = bind_one(actual).map_err(|source| ListenError { addr, source })?;
            if let Some(a) = s.local_addr().ok().and_then(|a| a.as_socket()) {
                actual = a;
            }
            sockets.push(s);
        }
    }
    Ok(per_worker)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s)
}
