//! What the master tells a worker at start: which inherited descriptors are
//! what, and the tunables the data plane needs. Passed as JSON in one
//! environment variable so that the command line stays readable in `ps`.

use serde::{Deserialize, Serialize};

/// The environment variable that carries [`WorkerArgs`].
pub const ENV: &str = "ELB_WORKER_ARGS";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerArgs {
    /// This worker's slot in the region.
    pub index: usize,
    /// Workers in all: they share the request counters' zone.
    #[serde(default = "one")]
    pub workers: usize,
    /// The master's PID: a worker whose parent is another has been orphaned.
    pub master_pid: u32,
    /// Descriptor of the shared region (memfd).
    pub shm_fd: i32,
    /// Descriptor of the eventfd the master writes after each publication.
    pub wake_fd: i32,
    /// Descriptor of the binary the master executed this worker through;
    /// the worker closes it.
    pub exe_fd: i32,
    /// Descriptors of this worker's listening sockets.
    pub listen_fds: Vec<i32>,
    /// Who may reach the admin API through the proxy listeners.
    pub admin_access: crate::access::Access,
    /// The master's private socket for forwarded admin requests.
    pub admin_socket: std::path::PathBuf,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    /// Graceful stop: how long in-flight requests may take, in ms.
    pub shutdown_timeout_ms: u64,
    /// The access log's file; none: no access log.
    #[serde(default)]
    pub access_log: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Limits {
    /// Bodies of proxied requests.
    pub client_max_body_size: u64,
    pub max_header_size: usize,
    /// Bodies of `/__erulb__/` requests, handed to the master
    /// (`[admin_limits] max_body_size`).
    pub admin_max_body_size: u64,
    /// Client connections one worker holds at once; more wait in the
    /// listen backlog (`[limits] max_connections`).
    pub max_connections: usize,
}

/// When a request goes to another peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetryPolicy {
    /// Peers tried at most per request.
    pub tries: u32,
    /// Answers that count as the peer failing.
    pub failure_statuses: Vec<u16>,
}

/// Timeouts in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeouts {
    pub connect_ms: u64,
    pub upstream_read_ms: u64,
    pub client_header_ms: u64,
    pub client_body_ms: u64,
    pub keepalive_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("{ENV} is not set: this subcommand is started by the elb master only")]
    Missing,
    #[error("{ENV} is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
}

fn one() -> usize {
    1
}

impl WorkerArgs {
    pub fn to_env(&self) -> String {
        // Serialising plain numbers and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_env() -> Result<WorkerArgs, ArgsError> {
        let raw = std::env::var(ENV).map_err(|_| ArgsError::Missing)?;
        Ok(serde_json::from_str(&raw)?)
    }
}
