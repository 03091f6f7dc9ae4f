//! The master's link to etcd (SPEC 3): loads the rules and upstreams at
//! start, follows every change with a watch, writes the in-memory state
//! back on a dump, and rides out etcd's faults while the last known
//! configuration keeps serving.
//!
//! One thread (`elb-etcd`) runs a single-threaded tokio runtime holding the
//! client, the [`view::View`] of what etcd holds, and the watch. It changes
//! the configuration only through the [`Store`]. The admin API reaches it
//! through [`dump`], a blocking call with a timeout.
//!
//! * Load: every key under the prefixes, paged, at one revision.
//! * Watch: from that revision + 1, one stream carrying a watch per prefix;
//!   the events of one response are applied in one store call, published
//!   at once; except a peer list naming a host, which is resolved on a
//!   blocking thread (up to 2 s, `store/resolve.rs`) and applied when it
//!   resolves, unless a later change of its upstream came meanwhile. The
//!   watch and the store's lock never wait for DNS.
//! * On a compaction ahead of the watch, a lost stream, or a revision that
//!   went back (etcd wiped or restored): load everything again and apply
//!   only the difference from the view, then watch again.
//! * Liveness: the watch asks for a progress notice every 2 s and counts as
//!   lost after 6 s without a word (a hung etcd, a silent partition).
//!   HTTP/2 pings stay 10 s apart: etcd closes, as "too many pings", a
//!   connection pinged more often than every 5 s.
//! * Every failure is retried with a capped back-off across all endpoints;
//!   each change of state (connected, lost, reloaded) is logged once.

mod client;
mod keys;
mod view;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::settings::Settings;
use crate::store::Store;

pub use keys::Layout;

/// How a dump went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpReport {
    pub puts: usize,
    pub deletes: usize,
    pub txns: usize,
}

/// Why a dump did not complete.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    #[error("no etcd client runs in this process")]
    NotRunning,
    #[error("another dump is in progress")]
    Busy,
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    #[error("etcd did not complete the dump within {0:?}")]
    Timeout(Duration),
    #[error("etcd refused the dump after {done} of {total} transactions: {reason}")]
    Failed {
        done: usize,
        total: usize,
        reason: String,
    },
}

impl DumpError {
    /// The admin API's status for it: 500 when etcd refused the writes,
    /// 503 when it could not be reached.
    pub fn status(&self) -> u16 {
        match self {
            DumpError::Failed { .. } => 500,
            _ => 503,
        }
    }
}

pub(crate) struct DumpRequest {
    reply: std::sync::mpsc::SyncSender<Result<DumpReport, DumpError>>,
    deadline: std::time::Instant,
    timeout: Duration,
}

static DUMPS: OnceLock<tokio::sync::mpsc::Sender<DumpRequest>> = OnceLock::new();

/// Starts the etcd thread. Call after the signals are blocked (the thread
/// inherits the mask).
pub fn start(settings: &Settings, store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    if DUMPS.set(tx).is_err() {
        return Err(std::io::Error::other("the etcd client is started already"));
    }
    let endpoints = settings.etcd.clone();
    let layout = Layout::new(&settings.name, settings.services_prefix.as_deref());
    std::thread::Builder::new()
        .name("elb-etcd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("etcd: cannot start the client's runtime: {e}");
                    return;
                }
            };
            rt.block_on(client::run(endpoints, layout, store, rx));
        })?;
    Ok(())
}

/// Writes the in-memory rules and upstreams to etcd, replacing what is
/// under `/$NAME/rules/` and `/$NAME/upstreams/`. Blocks up to `timeout`.
/// The caller must not hold the store's lock: the etcd thread takes it to
/// read the state it writes.
pub fn dump(timeout: Duration) -> Result<DumpReport, DumpError> {
    let tx = DUMPS.get().ok_or(DumpError::NotRunning)?;
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let req = DumpRequest {
        reply,
        deadline: std::time::Instant::now() + timeout,
        timeout,
    };
    tx.try_send(req).map_err(|e| match e {
        tokio::sync::mpsc::error::TrySendError::Full(_) => DumpError::Busy,
        tokio::sync::mpsc::error::TrySendError::Closed(_) => DumpError::NotRunning,
    })?;
    match answer.recv_timeout(timeout) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(DumpError::Timeout(timeout)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(DumpError::NotRunning),
    }
}
