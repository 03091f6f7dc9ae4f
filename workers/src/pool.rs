//! Idle keep-alive connections to peers, per peer address, per worker.
//! Idle connections are not registered with the loop; one that the peer
//! closed meanwhile is noticed by a peek when it is taken.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

/// Idle connections kept per peer (nginx's `keepalive` is per worker too).
const MAX_IDLE_PER_PEER: usize = 256;
/// An idle connection older than this is not reused (peers commonly close
/// idle connections after 60 s or more; nginx's keepalive_timeout is 60 s).
const MAX_IDLE: Duration = Duration::from_secs(50);
/// Under load connections are idle for microseconds: a peek (a syscall)
/// checks only those idle longer than this. One closed sooner is still
/// caught when used, and the request goes again on a fresh connection.
const PEEK_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct Pool {
    idle: HashMap<SocketAddr, Vec<(TcpStream, Instant)>>,
}

impl Pool {
    /// An idle connection to `addr` that still looks open, newest first.
    pub fn take(&mut self, addr: SocketAddr, now: Instant) -> Option<TcpStream> {
        let list = self.idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            let idle = now.duration_since(since);
            if idle > MAX_IDLE {
                continue;
            }
            if idle < PEEK_AFTER {
                return Some(stream);
            }
            let mut probe = [0u8; 1];
            match stream.peek(&mut probe) {
                // Nothing to read and not closed: usable.
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(stream),
                // Closed by the peer (0), or bytes nobody asked for: drop it.
                _ => continue,
            }
        }
        None
    }

    pub fn put(&mut self, addr: SocketAddr, stream: TcpStream, now: Instant) {
        let list = self.idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_PEER {
            list.remove(0);
        }
        list.push((stream, now));
    }
}
