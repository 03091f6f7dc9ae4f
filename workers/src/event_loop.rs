//! The worker's event loop: listeners, sessions (a client connection and,
//! during an exchange, its peer connection), the master's wake-up eventfd
//! and the signalfd, all in one `mio::Poll`.
//!
//! A worker is built from [`Resources`]: the master's child adopts them
//! (`inherit.rs`), a test makes them itself (`testing.rs`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use slab::Slab;

use crate::access_log::{self, AccessLog};
use crate::args::WorkerArgs;
use crate::pool::{self, Pool};
use crate::route::Router;
use crate::session::{Cx, Drive, Session};
use crate::timers::Timers;
use crate::view::Config;

const WAKE: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Listener `i` has token `i`; session `k`'s client has `CONN_BASE + k`;
/// peer connection `i` has `PEER_BASE + i` (see `pool.rs`).
const CONN_BASE: usize = 1 << 16;
const PEER_BASE: usize = 1 << 40;
/// Bytes read from a socket at once.
const READ_SIZE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("event loop: {0}")]
    Io(#[from] io::Error),
    #[error("signals: {0}")]
    Signals(nix::Error),
}

/// What a worker serves with.
pub(crate) struct Resources {
    /// Mapped for the life of the process.
    pub region: &'static elb_shm::Region,
    pub listeners: Vec<std::net::TcpListener>,
    /// The eventfd the master writes after each publication.
    pub wake: OwnedFd,
}

pub(crate) struct Worker {
    args: WorkerArgs,
    poll: Poll,
    listeners: Vec<TcpListener>,
    sessions: Slab<Session>,
    timers: Timers,
    region: &'static elb_shm::Region,
    wake: OwnedFd,
    signals: SignalFd,
    config: Config,
    router: Router,
    pool: Pool,
    scratch: Vec<u8>,
    headers: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    /// Set on SIGTERM/SIGINT: no new connections, exit once idle.
    draining_until: Option<Instant>,
    /// Not accepting: at the connection cap, or out of descriptors.
    accept_paused: bool,
    /// The per-peer pool cap was hit (logged once per worker).
    pool_cap_logged: bool,
    /// Out of descriptors: when to try accepting again.
    accept_retry: Option<Instant>,
    /// When the pool's stale idle connections are closed next.
    next_trim: Instant,
    log: Option<AccessLog>,
}

impl Worker {
    /// Registers everything with a new poll. SIGTERM, SIGINT and SIGQUIT
    /// are blocked in the calling thread, which must be the one that runs
    /// the loop: they arrive as events of the loop instead of handlers.
    pub fn new(args: WorkerArgs, res: Resources) -> Result<Worker, LoopError> {
        let poll = Poll::new()?;
        let mut listeners = Vec::with_capacity(res.listeners.len());
        for (i, l) in res.listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            poll.registry().register(
                &mut SourceFd(&l.as_raw_fd()),
                Token(i),
                Interest::READABLE,
            )?;
            listeners.push(TcpListener::from_std(l));
        }
        let signals = signal_fd()?;
        poll.registry().register(
            &mut SourceFd(&res.wake.as_raw_fd()),
            WAKE,
            Interest::READABLE,
        )?;
        poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        let index = args.index;
        // A log that cannot be opened costs the log, not the traffic.
        let log = args.access_log.clone().and_then(|path| {
            AccessLog::open(path.clone())
                .map_err(|e| log::error!("access log {}: {e}", path.display()))
                .ok()
        });
        Ok(Worker {
            args,
            poll,
            listeners,
            sessions: Slab::new(),
            timers: Timers::default(),
            config: Config::new(res.region, index),
            region: res.region,
            wake: res.wake,
            signals,
            router: Router::default(),
            pool: Pool::new(PEER_BASE),
            scratch: vec![0; READ_SIZE],
            headers: Vec::new(),
            draining_until: None,
            accept_paused: false,
            pool_cap_logged: false,
            accept_retry: None,
            next_trim: Instant::now() + pool::TRIM_EVERY,
            log,
        })
    }

    pub fn run(mut self) -> Result<(), LoopError> {
        if let Some(slot) = self.region.worker_slot(self.args.index) {
            slot.set_pid(std::process::id());
        }
        self.config.refresh();
        log::info!(
            "worker {} (pid {}) serving, configuration generation {}",
            self.args.index,
            std::process::id(),
            self.config.applied()
        );
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let retry = self.accept_retry.map(|r| r.saturating_duration_since(now));
            let trim = Some(self.next_trim.saturating_duration_since(now));
            let timeout = [self.timers.timeout(now), self.log_due(now), retry, trim]
                .into_iter()
                .flatten()
                .min();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            // Promptly, even with no request (sessions refresh it too,
            // before routing each request).
            self.config.refresh();
            let now = Instant::now();
            if self.accept_retry.is_some_and(|r| now >= r) {
                self.resume_accept();
            }
            if now >= self.next_trim {
                self.pool.trim(now);
                self.next_trim = now + pool::TRIM_EVERY;
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKE => self.drain_wake(),
                    SIGNALS => {
                        if self.on_signals() {
                            self.flush_log();
                            return Ok(());
                        }
                    }
                    Token(i) if i < CONN_BASE => self.accept(i),
                    Token(t) => {
                        let peer = t >= PEER_BASE;
                        let closed = ev.is_read_closed() || ev.is_error();
                        let readable = ev.is_readable() || closed;
                        let key = if peer {
                            // None: an idle pooled connection (closed if it
                            // turned readable).
                            let Some(key) = self.pool.on_event(t, readable) else {
                                continue;
                            };
                            key
                        } else {
                            t - CONN_BASE
                        };
                        if readable && let Some(s) = self.sessions.get_mut(key) {
                            s.mark_readable(peer, closed);
                        }
                        self.drive(key, false);
                    }
                }
            }
            self.expire_timers(Instant::now());
            let evicted = self.pool.take_evicted();
            if evicted > 0 {
                self.count_pool_evictions(evicted);
            }
            if let Some(log) = &mut self.log
                && log.has_lines()
                && log.flushed.elapsed() >= access_log::FLUSH_EVERY
            {
                log.flush();
            }
            if let Some(until) = self.draining_until {
                let idle: Vec<usize> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.is_idle())
                    .map(|(k, _)| k)
                    .collect();
                for k in idle {
                    self.close(k);
                }
                if self.sessions.is_empty() || Instant::now() >= until {
                    log::info!("worker {} stopped", self.args.index);
                    self.flush_log();
                    return Ok(());
                }
            }
        }
    }

    /// How long until the buffered log lines are due, if there are any.
    fn log_due(&self, now: Instant) -> Option<Duration> {
        let log = self.log.as_ref().filter(|l| l.has_lines())?;
        Some((log.flushed + access_log::FLUSH_EVERY).saturating_duration_since(now))
    }

    /// Stops taking connections: logged once per pause, counted in the
    /// worker's slot (`/metrics`).
    fn pause_accept(&mut self, why: std::fmt::Arguments<'_>) {
        if !self.accept_paused {
            self.accept_paused = true;
            log::warn!(
                "worker {}: not accepting, {why}; new connections wait in the backlog",
                self.args.index
            );
            if let Some(slot) = self.region.worker_slot(self.args.index) {
                slot.count_accept_pause();
            }
        }
    }

    /// Takes connections again from every listener's backlog.
    fn resume_accept(&mut self) {
        self.accept_paused = false;
        self.accept_retry = None;
        for i in 0..self.listeners.len() {
            self.accept(i);
            if self.accept_paused {
                return;
            }
        }
    }

    /// Idle peer connections closed at the pool's cap: logged the first
    /// time, counted in the worker's slot (`/metrics`).
    fn count_pool_evictions(&mut self, n: u64) {
        if !self.pool_cap_logged {
            self.pool_cap_logged = true;
            log::warn!(
                "worker {}: a peer's pool of idle connections is at its cap of {}; the oldest are closed (elb_worker_pool_evictions_total)",
                self.args.index,
                pool::MAX_IDLE_PER_PEER
            );
        }
        if let Some(slot) = self.region.worker_slot(self.args.index) {
            slot.count_pool_evictions(n);
        }
    }

    /// The client connections held, in this worker's slot (for `/status`).
    fn count_connections(&self) {
        if let Some(slot) = self.region.worker_slot(self.args.index) {
            slot.set_connections(self.sessions.len() as u64);
        }
    }

    fn flush_log(&mut self) {
        if let Some(log) = &mut self.log {
            log.flush();
        }
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 8];
        // The counter's value does not matter, only that it was written.
        let _ = nix::unistd::read(&self.wake, &mut buf);
    }

    /// Handles pending signals; returns true to exit at once.
    fn on_signals(&mut self) -> bool {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGQUIT) => return true,
                Ok(Signal::SIGUSR1) => {
                    if let Some(log) = &mut self.log {
                        log.reopen();
                    }
                }
                Ok(Signal::SIGTERM | Signal::SIGINT) if self.draining_until.is_none() => {
                    self.draining_until =
                        Some(Instant::now() + Duration::from_millis(self.args.shutdown_timeout_ms));
                    for l in self.listeners.drain(..) {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&l.as_raw_fd()));
                    }
                }
                _ => {}
            }
        }
        false
    }

    fn accept(&mut self, i: usize) {
        loop {
            let cap = self.args.limits.max_connections;
            if self.sessions.len() >= cap {
                // Leave the rest in the listen backlog: `close` takes them
                // up as sessions end.
                self.pause_accept(format_args!("at its cap of {cap} client connections"));
                return;
            }
            let Some(listener) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let deadline =
                        Instant::now() + Duration::from_millis(self.args.timeouts.client_header_ms);
                    let entry = self.sessions.vacant_entry();
                    let key = entry.key();
                    let mut session = Session::new(stream, peer, deadline);
                    let token = Token(CONN_BASE + key);
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut session.client,
                            token,
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    session.armed = Some(deadline);
                    self.timers.arm(key, deadline);
                    entry.insert(session);
                    self.count_connections();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Out of descriptors: leave the rest in the backlog, and try
                // again when a session ends or after a while (no busy loop:
                // the listener stays readable and edge-triggered).
                Err(e) if is_out_of_fds(&e) => {
                    self.pause_accept(format_args!("out of descriptors ({e})"));
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
                // A connection reset while queued: the next one.
                Err(e) => log::debug!("accept: {e}"),
            }
        }
    }

    fn drive(&mut self, key: usize, timed_out: bool) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let mut cx = Cx {
            router: &mut self.router,
            config: &mut self.config,
            region: self.region,
            pool: &mut self.pool,
            registry: self.poll.registry(),
            args: &self.args,
            admin_socket: &self.args.admin_socket,
            now: Instant::now(),
            log: self.log.as_mut(),
            key,
            scratch: &mut self.scratch,
            headers: &mut self.headers,
        };
        let next = if timed_out {
            session.on_timeout(&mut cx)
        } else {
            session.drive(&mut cx)
        };
        match next {
            Drive::Close => self.close(key),
            Drive::Keep => {
                if session.armed.is_none_or(|at| session.deadline < at) {
                    session.armed = Some(session.deadline);
                    self.timers.arm(key, session.deadline);
                }
            }
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        while let Some((key, at)) = self.timers.expired(now) {
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if session.armed != Some(at) {
                continue;
            }
            session.armed = None;
            if session.deadline <= now {
                self.drive(key, true);
            } else {
                session.armed = Some(session.deadline);
                self.timers.arm(key, session.deadline);
            }
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut session) = self.sessions.try_remove(key) {
            session.end_unfinished(self.log.as_mut(), self.region, &self.args, Instant::now());
            if let Some(up) = session.take_upstream() {
                self.pool.release(up);
            }
            drop(session);
            self.count_connections();
            if self.accept_paused {
                self.resume_accept();
            }
        }
        // Dropping the session closes the client socket, which also takes
        // it out of epoll: no deregistering call is needed.
    }
}

/// SIGTERM, SIGINT, SIGQUIT and SIGUSR1 (reopen the access log), blocked
/// in this thread, as a descriptor.
fn signal_fd() -> Result<SignalFd, LoopError> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ] {
        mask.add(s);
    }
    mask.thread_block().map_err(LoopError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(LoopError::Signals)
}

/// Wait before accepting again after running out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// `accept` failed for want of descriptors or memory, not for the
/// connection's sake.
fn is_out_of_fds(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use crate::testing::{args, ask, backend, proxy_to, read_head};

    #[test]
    fn sigterm_closes_the_listeners_and_lets_the_exchange_in_progress_end() {
        let (heard, request_in) = mpsc::channel();
        let (answer_now, go) = mpsc::channel::<()>();
        let go = std::sync::Mutex::new(go);
        let peer = backend(move |mut conn| {
            read_head(&mut conn);
            let _ = heard.send(());
            if let Ok(go) = go.lock() {
                let _ = go.recv();
            }
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate");
        });
        let (worker, mut client) = proxy_to(args(), &[peer]);
        let addr = worker.addr;
        let asking = std::thread::spawn(move || {
            ask(&mut client, "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        });
        request_in
            .recv_timeout(Duration::from_secs(10))
            .expect("the request reached the peer");
        let stopping = std::thread::spawn(move || worker.stop());
        // Draining: the listener is closed, so new connections are refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_ok() {
            assert!(Instant::now() < deadline, "the listener stays open");
            std::thread::yield_now();
        }
        let _ = answer_now.send(());
        let answer = asking.join().expect("client");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, b"late");
        assert_eq!(stopping.join().ok(), Some(true), "the loop ended cleanly");
    }
}
