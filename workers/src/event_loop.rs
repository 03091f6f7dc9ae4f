//! The worker's event loop: listeners, client connections, the master's
//! wake-up eventfd and the signalfd, all in one `mio::Poll`.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use slab::Slab;

use crate::args::WorkerArgs;
use crate::conn::{ClientConn, Limits, Next};
use crate::inherit::Inherited;
use crate::timers::Timers;
use crate::view::View;
use elb_shm::config::ConfigReader;

const WAKE: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Listener `i` has token `i`; connection `k` of the slab has `CONN_BASE + k`.
const CONN_BASE: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("event loop: {0}")]
    Io(#[from] io::Error),
}

pub(crate) struct Worker {
    args: WorkerArgs,
    poll: Poll,
    listeners: Vec<TcpListener>,
    conns: Slab<ClientConn>,
    timers: Timers,
    inherited: Inherited,
    view: View,
    reader: ConfigReader<'static>,
    applied: u64,
    /// Set on SIGTERM/SIGINT: no new connections, exit once idle.
    draining_until: Option<Instant>,
}

impl Worker {
    pub fn new(args: WorkerArgs, mut inherited: Inherited) -> Result<Worker, LoopError> {
        let poll = Poll::new()?;
        let listeners: Vec<TcpListener> = inherited
            .listeners
            .drain(..)
            .map(TcpListener::from_std)
            .collect();
        for (i, l) in listeners.iter().enumerate() {
            poll.registry().register(
                &mut SourceFd(&l.as_raw_fd()),
                Token(i),
                Interest::READABLE,
            )?;
        }
        poll.registry().register(
            &mut SourceFd(&inherited.wake.as_raw_fd()),
            WAKE,
            Interest::READABLE,
        )?;
        poll.registry().register(
            &mut SourceFd(&inherited.signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        Ok(Worker {
            args,
            poll,
            listeners,
            conns: Slab::new(),
            timers: Timers::default(),
            reader: ConfigReader::new(inherited.region),
            inherited,
            view: View::default(),
            applied: 0,
            draining_until: None,
        })
    }

    pub fn run(mut self) -> Result<(), LoopError> {
        if let Some(slot) = self.inherited.region.worker_slot(self.args.index) {
            slot.set_pid(std::process::id());
        }
        self.follow_config();
        log::info!(
            "worker {} (pid {}) serving, configuration generation {}",
            self.args.index,
            std::process::id(),
            self.applied
        );
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = self.timers.timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            // Before any request in this batch of events is looked at, so
            // that a request sent after a publication is routed by it.
            self.follow_config();
            for ev in events.iter() {
                match ev.token() {
                    WAKE => self.drain_wake(),
                    SIGNALS => {
                        if self.on_signals() {
                            return Ok(());
                        }
                    }
                    Token(i) if i < CONN_BASE => self.accept(i),
                    Token(t) => self.on_conn_event(t - CONN_BASE),
                }
            }
            self.expire_timers(Instant::now());
            if let Some(until) = self.draining_until {
                let idle: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.is_idle())
                    .map(|(k, _)| k)
                    .collect();
                for k in idle {
                    self.close(k);
                }
                if self.conns.is_empty() || Instant::now() >= until {
                    log::info!("worker {} stopped", self.args.index);
                    return Ok(());
                }
            }
        }
    }

    fn follow_config(&mut self) {
        if !self.reader.is_stale() {
            return;
        }
        let view = &mut self.view;
        self.applied = self.reader.poll(|c| view.apply(c));
        if let Some(slot) = self.inherited.region.worker_slot(self.args.index) {
            slot.set_applied(self.applied);
        }
        log::debug!(
            "worker {}: generation {} ({} keys)",
            self.args.index,
            self.applied,
            self.view.len()
        );
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 8];
        // The counter's value does not matter, only that it was written.
        let _ = nix::unistd::read(&self.inherited.wake, &mut buf);
    }

    /// Handles pending signals; returns true to exit at once.
    fn on_signals(&mut self) -> bool {
        while let Ok(Some(info)) = self.inherited.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGQUIT) => return true,
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
            let Some(listener) = self.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let deadline = Instant::now() + self.header_timeout();
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let mut conn = ClientConn::new(stream, peer);
                    if self
                        .poll
                        .registry()
                        .register(&mut conn.stream, Token(CONN_BASE + key), Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    conn.timer = self.timers.arm(key, deadline);
                    entry.insert(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Out of descriptors or a connection reset while queued:
                // leave the rest in the backlog for the next turn.
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.args.timeouts.client_header_ms)
    }

    fn on_conn_event(&mut self, key: usize) {
        let limits = Limits {
            max_header_size: self.args.limits.max_header_size,
        };
        let view = &self.view;
        let slot = self.inherited.region.worker_slot(self.args.index);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut answer = |_buf: &[u8], _head: &crate::http::RequestHead| {
            if let Some(s) = &slot {
                s.count_request();
            }
            // No routing yet: every domain is unknown.
            let _ = view;
            404
        };
        let next = conn.on_readable(&limits, &mut answer);
        let next = if next == Next::Read {
            conn.flush()
        } else {
            next
        };
        self.after(key, next);
    }

    fn after(&mut self, key: usize, next: Next) {
        let timeout = match next {
            Next::Close => return self.close(key),
            Next::Read => {
                let Some(conn) = self.conns.get(key) else {
                    return;
                };
                if conn.is_idle() {
                    Duration::from_millis(self.args.timeouts.keepalive_ms)
                } else {
                    self.header_timeout()
                }
            }
            Next::Write => Duration::from_millis(self.args.timeouts.client_body_ms),
        };
        let interest = if next == Next::Write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let stamp = self.timers.arm(key, Instant::now() + timeout);
        let registry = self.poll.registry();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.timer = stamp;
        if registry
            .reregister(&mut conn.stream, Token(CONN_BASE + key), interest)
            .is_err()
        {
            self.close(key);
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        while let Some((key, stamp)) = self.timers.expired(now) {
            if self.conns.get(key).is_some_and(|c| c.timer == stamp) {
                self.close(key);
            }
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }
}
