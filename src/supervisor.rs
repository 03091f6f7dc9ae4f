//! The master's main thread: creates the region and the listeners, starts
//! the workers, restarts any that die, and stops them on a signal.
//!
//! Signals are read from a signalfd (blocked before any thread exists, so
//! every later thread inherits the mask and none runs a handler). Workers
//! are spawned from this thread only: the parent-death signal that takes
//! them down with the master is tied to the thread that forked them.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use elb_shm::Region;
use elb_workers::WorkerArgs;
use elb_workers::access::Access;

use crate::admin::AdminLimits;
use crate::settings::{AdminAddr, Settings};
use crate::store::Store;
use crate::{admin, etcd, health, kubernetes, listeners, spawn, stats, statsd_sender};

/// A worker that dies sooner than this after its start counts as crashing.
const QUICK_EXIT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct Slot {
    pid: Option<Pid>,
    started: Instant,
    /// Consecutive quick exits.
    crashes: u32,
    /// Workers started in this slot so far.
    starts: u64,
    start_at: Option<Instant>,
    wake: Arc<EventFd>,
    listeners: Vec<OwnedFd>,
}

/// Runs the master until it is stopped; returns the exit code.
pub fn run(settings: Settings) -> i32 {
    let signals = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            log::error!("signals: {e}");
            return 1;
        }
    };
    // The limit rules' zone comes on top of --shm-size.
    let zone = settings.ratelimit_zone();
    let region: &'static Region = match Region::create_with_dict(settings.shm_size + zone, zone) {
        Ok(r) => Box::leak(Box::new(r)),
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    let sockets = match listeners::bind_all(&settings.listen, settings.workers) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("elb: {e}");
            return 1;
        }
    };
    let mut slots = Vec::with_capacity(settings.workers);
    for socks in sockets {
        let wake = match EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        ) {
            Ok(w) => w,
            Err(e) => {
                log::error!("eventfd: {e}");
                return 1;
            }
        };
        slots.push(Slot {
            pid: None,
            started: Instant::now(),
            crashes: 0,
            starts: 0,
            start_at: Some(Instant::now()),
            wake: Arc::new(wake),
            listeners: socks.into_iter().map(OwnedFd::from).collect(),
        });
    }
    let exe = match spawn::Executable::open() {
        Ok(e) => e,
        Err(e) => {
            log::error!("cannot open this binary (/proc/self/exe) to start workers: {e}");
            return 1;
        }
    };
    let private = match private_dir() {
        Ok(d) => d,
        Err(e) => {
            log::error!("cannot create a private directory: {e}");
            return 1;
        }
    };
    let store = Arc::new(Mutex::new(Store::new(
        region,
        slots.iter().map(|s| s.wake.clone()).collect(),
    )));
    let access = Access {
        allow: settings.admin_allow.clone(),
        token: settings.admin_token.clone(),
    };
    let admin_socket = private.join("admin.sock");
    if let Err(e) = admin::serve(
        &settings.admin,
        &admin_socket,
        store.clone(),
        access,
        AdminLimits {
            max_body: settings.limits.admin_max_body_size,
            max_connections: settings.admin_max_connections,
            head_timeout: Duration::from_millis(settings.timeouts.client_header_ms),
        },
    ) {
        eprintln!("elb: {e}");
        let _ = std::fs::remove_dir_all(&private);
        return 1;
    }
    // Like the admin threads, started after the signals are blocked.
    if let Err(e) = health::start(
        health::Config::from_settings(&settings),
        store.clone(),
        region,
    ) {
        log::error!("cannot start the health thread: {e}");
        let _ = std::fs::remove_dir_all(&private);
        return 1;
    }
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .set_source_policy(settings.sources);
    if let Some(k) = &settings.kubernetes
        && let Err(e) = kubernetes::start(k.clone(), store.clone())
    {
        log::error!("cannot start the Kubernetes source: {e}");
        let _ = std::fs::remove_dir_all(&private);
        return 1;
    }
    if let Err(e) = stats::start(store.clone()) {
        log::error!("cannot start the statistics thread: {e}");
        let _ = std::fs::remove_dir_all(&private);
        return 1;
    }
    if let Some(address) = &settings.statsd
        && let Err(e) = statsd_sender::start(
            address,
            &settings.name,
            settings.statsd_flush_interval,
            store.clone(),
        )
    {
        log::error!("cannot start the statsd sender: {e}");
        let _ = std::fs::remove_dir_all(&private);
        return 1;
    }
    if let Err(e) = etcd::start(&settings, store) {
        log::error!("cannot start the etcd client: {e}");
        let _ = std::fs::remove_dir_all(&private);
        return 1;
    }
    let addrs: Vec<String> = settings.listen.iter().map(ToString::to_string).collect();
    log::info!(
        "listening on {} with {} workers, region {} MiB",
        addrs.join(", "),
        settings.workers,
        settings.shm_size >> 20
    );
    let admin = match &settings.admin {
        AdminAddr::Tcp(a) => a.to_string(),
        AdminAddr::Unix(p) => format!("unix:{}", p.display()),
    };
    log::info!("admin API on {admin}");
    let code = Supervisor {
        settings,
        region,
        slots,
        signals,
        admin_socket,
        exe,
    }
    .run();
    let _ = std::fs::remove_dir_all(&private);
    code
}

/// A directory only this user can enter, for the private admin socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("elb-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn block_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

enum Stop {
    Graceful,
    Now,
}

struct Supervisor {
    settings: Settings,
    region: &'static Region,
    slots: Vec<Slot>,
    signals: SignalFd,
    admin_socket: PathBuf,
    exe: spawn::Executable,
}

impl Supervisor {
    fn run(mut self) -> i32 {
        let stop = loop {
            self.start_due();
            let timeout = self.next_start_in();
            if let Some(stop) = self.wait_signals(timeout) {
                break stop;
            }
        };
        self.stop(stop);
        if let AdminAddr::Unix(path) = &self.settings.admin {
            let _ = std::fs::remove_file(path);
        }
        0
    }

    /// The descriptors worker `index` inherits, in the order its
    /// [`WorkerArgs`] names them.
    fn inherited(&self, index: usize) -> Vec<BorrowedFd<'_>> {
        let slot = &self.slots[index];
        let mut fds = vec![self.region.fd(), slot.wake.as_fd(), self.exe.fd()];
        fds.extend(slot.listeners.iter().map(AsFd::as_fd));
        fds
    }

    fn worker_args(&self, index: usize) -> WorkerArgs {
        let s = &self.settings;
        let slot = &self.slots[index];
        let ms = |d: Duration| d.as_millis() as u64;
        WorkerArgs {
            index,
            workers: s.workers,
            master_pid: std::process::id(),
            shm_fd: self.region.fd().as_raw_fd(),
            wake_fd: slot.wake.as_fd().as_raw_fd(),
            exe_fd: self.exe.fd().as_raw_fd(),
            listen_fds: slot.listeners.iter().map(AsRawFd::as_raw_fd).collect(),
            admin_access: Access {
                allow: s.admin_allow.clone(),
                token: s.admin_token.clone(),
            },
            admin_socket: self.admin_socket.clone(),
            limits: s.limits.clone(),
            timeouts: s.timeouts.clone(),
            retry: s.upstream.clone(),
            shutdown_timeout_ms: ms(s.shutdown_timeout),
            access_log: s.access_log.clone(),
        }
    }

    fn start_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if self.slots[i].pid.is_some() || self.slots[i].start_at.is_none_or(|t| t > now) {
                continue;
            }
            let args = self.worker_args(i);
            if let Some(slot) = self.region.worker_slot(i) {
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                slot.reset(0, unix, self.slots[i].starts);
            }
            let spawned = spawn::worker(&self.exe, &args, &self.inherited(i));
            let slot = &mut self.slots[i];
            match spawned {
                Ok(pid) => {
                    slot.starts += 1;
                    slot.pid = Some(pid);
                    slot.started = now;
                    slot.start_at = None;
                    log::debug!("worker {i} started, pid {pid}");
                }
                Err(e) => {
                    slot.crashes += 1;
                    let delay = backoff(slot.crashes);
                    log::error!("cannot start worker {i}: {e}; retrying in {delay:?}");
                    slot.start_at = Some(now + delay);
                }
            }
        }
    }

    fn next_start_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.slots
            .iter()
            .filter(|s| s.pid.is_none())
            .filter_map(|s| s.start_at)
            .min()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Waits for signals up to `timeout`; returns a stop request if one came.
    fn wait_signals(&mut self, timeout: Option<Duration>) -> Option<Stop> {
        let timeout = match timeout {
            Some(d) => {
                PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => log::warn!("poll: {e}"),
        }
        let mut stop = None;
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                // As nginx: every worker reopens the access log (rotation).
                Ok(Signal::SIGUSR1) => {
                    for pid in self.slots.iter().filter_map(|s| s.pid) {
                        let _ = kill(pid, Signal::SIGUSR1);
                    }
                }
                Ok(Signal::SIGTERM | Signal::SIGINT) => stop = stop.or(Some(Stop::Graceful)),
                Ok(Signal::SIGQUIT) => stop = Some(Stop::Now),
                Ok(Signal::SIGHUP) => {
                    log::info!("SIGHUP ignored: configuration changes need no signal")
                }
                _ => {}
            }
        }
        stop
    }

    /// Collects every exited child and schedules its replacement.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exit code {code}")),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("signal {sig}")),
                _ => continue,
            };
            let Some(i) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
                continue;
            };
            let slot = &mut self.slots[i];
            slot.pid = None;
            let lived = slot.started.elapsed();
            slot.crashes = if lived < QUICK_EXIT {
                slot.crashes + 1
            } else {
                0
            };
            let delay = backoff(slot.crashes);
            slot.start_at = Some(Instant::now() + delay);
            if delay.is_zero() {
                log::warn!("worker {i} (pid {pid}) ended by {how} after {lived:.1?}; restarting");
            } else {
                log::error!(
                    "worker {i} (pid {pid}) ended by {how} after {lived:.1?}, {} quick exits in a row; restarting in {delay:?}",
                    slot.crashes
                );
            }
        }
    }

    fn stop(&mut self, how: Stop) {
        // Closing the master's copies of the listeners first: once the
        // workers drop theirs, new connections are refused.
        for slot in &mut self.slots {
            slot.listeners.clear();
        }
        let (signal, grace) = match how {
            Stop::Graceful => (
                Signal::SIGTERM,
                self.settings.shutdown_timeout + Duration::from_secs(1),
            ),
            Stop::Now => (Signal::SIGQUIT, Duration::from_millis(500)),
        };
        log::info!("stopping workers ({signal})");
        for slot in &self.slots {
            if let Some(pid) = slot.pid {
                let _ = kill(pid, signal);
            }
        }
        let deadline = Instant::now() + grace;
        while self.slots.iter().any(|s| s.pid.is_some()) && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(left.as_millis().min(1000) as i32)
                    .unwrap_or(PollTimeout::ZERO),
            );
            while let Ok(Some(_)) = self.signals.read_signal() {}
            self.reap_all();
        }
        for slot in &self.slots {
            if let Some(pid) = slot.pid {
                log::warn!("worker pid {pid} did not stop in time; killing it");
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
        log::info!("stopped");
    }

    /// Reaps without scheduling restarts (while stopping).
    fn reap_all(&mut self) {
        while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            let Some(pid) = status.pid() else { return };
            for slot in &mut self.slots {
                if slot.pid == Some(pid) {
                    slot.pid = None;
                }
            }
        }
    }
}

/// Delay before restarting a worker after `crashes` quick exits in a row:
/// at once for the first, then doubling from 100 ms up to 5 s.
fn backoff(crashes: u32) -> Duration {
    match crashes {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(100) * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_and_is_capped() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
