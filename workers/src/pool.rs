//! Connections to peers: each is registered with the event loop once, when
//! it is opened, under a token of its own, and stays registered while it
//! moves between a session and the idle list. The table here says who owns
//! each token now, so taking or returning a keep-alive connection costs no
//! system call; closing the socket is what removes it from epoll.
//!
//! A readable event on an idle connection means the peer closed it (or
//! sent what nobody asked for): it leaves the pool at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mio::{Registry, Token};
use slab::Slab;

use crate::upstream_conn::UpConn;

/// Idle connections kept per peer (nginx's `keepalive` is per worker too).
pub(crate) const MAX_IDLE_PER_PEER: usize = 256;
/// An idle connection older than this is not reused (peers commonly close
/// idle connections after 60 s or more; nginx's keepalive_timeout is 60 s).
const MAX_IDLE: Duration = Duration::from_secs(50);
/// How often idle connections past [`MAX_IDLE`] are closed.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Who holds a peer connection.
enum Owner {
    Session(usize),
    Idle(SocketAddr),
}

pub(crate) struct Pool {
    base: usize,
    owners: Slab<Owner>,
    idle: HashMap<SocketAddr, Vec<(UpConn, Instant)>>,
    /// Idle connections closed to make room under [`MAX_IDLE_PER_PEER`],
    /// not yet taken by [`Pool::take_evicted`].
    evicted: u64,
}

impl Pool {
    /// Peer connection `i` has token `base + i`.
    pub fn new(base: usize) -> Pool {
        Pool {
            base,
            owners: Slab::new(),
            idle: HashMap::new(),
            evicted: 0,
        }
    }

    /// A connection to `addr` for session `key`: the newest idle one, or a
    /// new one.
    pub fn checkout(
        &mut self,
        addr: SocketAddr,
        key: usize,
        registry: &Registry,
        now: Instant,
    ) -> io::Result<UpConn> {
        while let Some((up, since)) = self.idle.get_mut(&addr).and_then(Vec::pop) {
            if now.duration_since(since) > MAX_IDLE {
                self.release(up);
                continue;
            }
            if let Some(owner) = self.owners.get_mut(up.id) {
                *owner = Owner::Session(key);
            }
            let mut up = up;
            up.reused = true;
            up.ready = true;
            return Ok(up);
        }
        self.fresh(addr, key, registry)
    }

    /// A new connection to `addr` for session `key`.
    pub fn fresh(
        &mut self,
        addr: SocketAddr,
        key: usize,
        registry: &Registry,
    ) -> io::Result<UpConn> {
        self.open(key, registry, |id| UpConn::connect(addr, id))
    }

    /// A connection to the master's admin socket for session `key`.
    pub fn admin(&mut self, path: &Path, key: usize, registry: &Registry) -> io::Result<UpConn> {
        self.open(key, registry, |id| UpConn::admin(path, id))
    }

    /// Takes a token, opens with it and registers; gives the token back on
    /// failure.
    fn open(
        &mut self,
        key: usize,
        registry: &Registry,
        connect: impl FnOnce(usize) -> io::Result<UpConn>,
    ) -> io::Result<UpConn> {
        let id = self.owners.insert(Owner::Session(key));
        let opened = connect(id).and_then(|mut up| {
            up.register(registry, Token(self.base + id))?;
            Ok(up)
        });
        if opened.is_err() {
            self.owners.remove(id);
        }
        opened
    }

    /// Closes the idle connections too old to be reused, so that a peer
    /// nobody asks any more does not keep them open for ever (called every
    /// [`TRIM_EVERY`] by the event loop). Each list is oldest first.
    pub fn trim(&mut self, now: Instant) {
        let mut stale = Vec::new();
        self.idle.retain(|_, list| {
            let old = list
                .iter()
                .take_while(|(_, since)| now.duration_since(*since) > MAX_IDLE)
                .count();
            stale.extend(list.drain(..old).map(|(up, _)| up));
            !list.is_empty()
        });
        for up in stale {
            self.release(up);
        }
    }

    /// Keeps a connection for reuse (it stays registered).
    pub fn checkin(&mut self, up: UpConn, now: Instant) {
        let Some(addr) = up.addr.filter(|_| up.is_tcp()) else {
            return self.release(up);
        };
        if let Some(owner) = self.owners.get_mut(up.id) {
            *owner = Owner::Idle(addr);
        }
        let list = self.idle.entry(addr).or_default();
        let evicted = (list.len() >= MAX_IDLE_PER_PEER).then(|| list.remove(0).0);
        list.push((up, now));
        if let Some(old) = evicted {
            self.evicted += 1;
            self.release(old);
        }
    }

    /// How many idle connections the cap closed since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Closes a connection (closing the socket also takes it out of epoll).
    pub fn release(&mut self, up: UpConn) {
        self.owners.try_remove(up.id);
        drop(up);
    }

    /// An event for `token`: the session to drive, if a session owns it.
    /// An idle connection that turns readable (the peer closed it, or sent
    /// what nobody asked for) is closed; a writable edge (the peer's ACK
    /// freeing send space after the last request) means nothing.
    pub fn on_event(&mut self, token: usize, readable: bool) -> Option<usize> {
        let id = token.checked_sub(self.base)?;
        match self.owners.get(id)? {
            Owner::Session(key) => Some(*key),
            Owner::Idle(_) if !readable => None,
            &Owner::Idle(addr) => {
                let list = self.idle.get_mut(&addr)?;
                let at = list.iter().position(|(up, _)| up.id == id)?;
                let (up, _) = list.swap_remove(at);
                self.release(up);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::testing::{
        TestWorker, answer_each, args, ask, backend, hang_up, proxy_to, read_head,
    };

    const GET: &str = "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n";

    fn counting(
        serve: impl Fn(std::net::TcpStream) + Send + 'static,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let addr = backend(move |conn| {
            counter.fetch_add(1, Ordering::SeqCst);
            serve(conn);
        });
        (addr, accepted)
    }

    #[test]
    fn idle_connections_past_their_age_are_closed() {
        use std::io::Read;
        use std::time::{Duration, Instant};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let poll = mio::Poll::new().expect("poll");
        let mut pool = super::Pool::new(1000);
        let now = Instant::now();
        let old = pool.fresh(addr, 0, poll.registry()).expect("connect");
        let young = pool.fresh(addr, 1, poll.registry()).expect("connect");
        let (mut first, _) = listener.accept().expect("accept");
        let (mut second, _) = listener.accept().expect("accept");
        pool.checkin(old, now);
        pool.checkin(young, now + Duration::from_secs(40));
        pool.trim(now + super::MAX_IDLE + Duration::from_secs(1));
        // The old one is closed: its peer reads the end; the young one stays.
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(first.read(&mut [0u8; 8]).expect("read"), 0);
        assert_eq!(pool.idle.get(&addr).map(Vec::len), Some(1));
        second.set_nonblocking(true).expect("nonblocking");
        assert!(
            second.read(&mut [0u8; 8]).is_err(),
            "the young one stays open"
        );
    }

    #[test]
    fn past_the_cap_per_peer_the_oldest_idle_connection_is_closed_and_counted() {
        use std::time::Instant;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let poll = mio::Poll::new().expect("poll");
        let mut pool = super::Pool::new(1000);
        let now = Instant::now();
        for key in 0..=super::MAX_IDLE_PER_PEER {
            let up = pool.fresh(addr, key, poll.registry()).expect("connect");
            pool.checkin(up, now);
        }
        assert_eq!(
            pool.idle.get(&addr).map(Vec::len),
            Some(super::MAX_IDLE_PER_PEER)
        );
        assert_eq!(pool.take_evicted(), 1);
        assert_eq!(pool.take_evicted(), 0, "taken once");
    }

    #[test]
    fn a_peer_connection_serves_the_next_request_from_the_pool() {
        let (peer, accepted) = counting(|conn| answer_each(conn, "ok"));
        let mut worker = TestWorker::start(args());
        worker.route("app.test", "web", &[peer]);
        // Two clients one after the other: the second request takes the
        // connection the first left idle.
        for _ in 0..2 {
            let mut client = worker.connect();
            assert_eq!(ask(&mut client, GET).status, 200);
            assert_eq!(ask(&mut client, GET).status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_pooled_connection_the_peer_closed_is_replaced_without_a_failure() {
        let (peer, accepted) = counting(|mut conn| {
            read_head(&mut conn);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            // Closes what the worker keeps as a keep-alive connection.
            hang_up(&conn);
        });
        let (_worker, mut client) = proxy_to(args(), &[peer]);
        for _ in 0..3 {
            let answer = ask(&mut client, GET);
            assert_eq!(answer.status, 200, "{answer:?}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
