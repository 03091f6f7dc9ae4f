//! The master's settings: defaults, overridden by `--config FILE`, then by
//! the environment, then by flags. Every bad value is one
//! [`SettingsError`] naming where it came from; `main` prints it on one line
//! and exits 2.
//!
//! * `cli.rs`: flags and environment variables (`clap`);
//! * `file.rs`: the TOML file;
//! * `values.rs`: the parsers both use;
//! * here: the settings themselves, their defaults, and `--check`'s listing.

mod cli;
mod file;
mod sources;
mod values;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use elb_workers::args::{Limits, RetryPolicy, Timeouts};
use ipnet::IpNet;

use crate::store::SourcePolicy;
pub use sources::Kubernetes;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{origin}: {problem}")]
    Invalid { origin: String, problem: String },
    #[error("{0}")]
    Usage(String),
}

fn invalid(origin: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        origin: origin.to_string(),
        problem: problem.into(),
    }
}

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `[healthcheck]`: the active check.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub enable: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_fails: u32,
    pub ok_status: Vec<u16>,
    pub check_url: Option<String>,
    /// Percent; below it an upstream's checks are ignored. 0 = never.
    pub panic_threshold: u32,
}

/// `[logcheck]`: peers taken out by their error rate.
#[derive(Debug, Clone, PartialEq)]
pub struct LogCheck {
    pub enable: bool,
    pub interval: Duration,
    pub recover: Duration,
}

/// Everything the master runs with. Timeouts, limits and the retry policy
/// are the workers' own types: the master fills them in and passes them
/// down as they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub etcd: Vec<String>,
    pub name: String,
    pub services_prefix: Option<String>,
    pub statsd: Option<String>,
    pub statsd_flush_interval: Duration,
    pub listen: Vec<SocketAddr>,
    pub admin: AdminAddr,
    pub admin_allow: Vec<IpNet>,
    pub admin_token: Option<String>,
    /// Admin connections served at once, per listener; more wait in its
    /// backlog.
    pub admin_max_connections: usize,
    pub workers: usize,
    pub shm_size: usize,
    pub shutdown_timeout: Duration,
    pub access_log: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub upstream: RetryPolicy,
    pub healthcheck: HealthCheck,
    pub logcheck: LogCheck,
    /// `[ratelimit] zone_size`, when set ([`Settings::ratelimit_zone`]).
    pub ratelimit_zone_size: Option<usize>,
    /// The Kubernetes source, when `[kubernetes]` is present.
    pub kubernetes: Option<Kubernetes>,
    pub sources: SourcePolicy,
}

impl Settings {
    /// Bytes of the dictionary that holds the `limit` rules' buckets, in
    /// the region beside `shm_size`: as set, else 16m (or `shm_size`, when
    /// that is smaller).
    pub fn ratelimit_zone(&self) -> usize {
        self.ratelimit_zone_size
            .unwrap_or_else(|| (16 << 20).min(self.shm_size & !4095))
    }
}

impl Default for Settings {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Settings {
            etcd: vec!["127.0.0.1:2379".into()],
            name: "ELB".into(),
            services_prefix: None,
            statsd: None,
            statsd_flush_interval: Duration::from_secs(1),
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 8080))],
            admin: AdminAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8081))),
            admin_allow: vec![
                IpNet::V4(ipnet::Ipv4Net::new_assert(
                    std::net::Ipv4Addr::new(127, 0, 0, 0),
                    8,
                )),
                IpNet::from(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
            ],
            admin_token: None,
            admin_max_connections: 64,
            workers: cpus.min(elb_shm::MAX_WORKERS),
            shm_size: 64 << 20,
            shutdown_timeout: Duration::from_secs(10),
            access_log: None,
            timeouts: Timeouts {
                connect_ms: 5_000,
                upstream_read_ms: 30_000,
                client_header_ms: 60_000,
                client_body_ms: 60_000,
                keepalive_ms: 65_000,
            },
            limits: Limits {
                client_max_body_size: 50 << 20,
                max_header_size: 64 << 10,
                admin_max_body_size: 64 << 20,
                max_connections: 16_384,
            },
            upstream: RetryPolicy {
                tries: 3,
                failure_statuses: vec![500, 502, 503, 504],
            },
            healthcheck: HealthCheck {
                enable: false,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(3),
                max_fails: 3,
                ok_status: vec![200, 204, 301, 302, 401, 403, 404],
                check_url: None,
                panic_threshold: 0,
            },
            logcheck: LogCheck {
                enable: false,
                interval: Duration::from_secs(5),
                recover: Duration::from_secs(60),
            },
            ratelimit_zone_size: None,
            kubernetes: None,
            sources: SourcePolicy::default(),
        }
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Settings>),
    /// `--check`: print the settings and exit.
    Check(Box<Settings>),
    /// `--probe`: ask the admin API these settings name whether it is up.
    Probe(Box<Settings>),
    Help(String),
    Version(String),
}

/// Reads flags (`args`, without the program name), the environment, and
/// the file a flag or the environment names, into settings.
pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Command, SettingsError> {
    let parsed = match cli::parse(args)? {
        cli::Request::Help(text) => return Ok(Command::Help(text)),
        cli::Request::Version(text) => return Ok(Command::Version(text)),
        cli::Request::Settings(p) => p,
    };
    let mut s = Settings::default();
    if let Some(path) = parsed.config() {
        file::apply(&mut s, path)?;
    }
    parsed.apply(&mut s)?;
    // The zone may take at most half of the region it is added to.
    if let Some(z) = s.ratelimit_zone_size.filter(|z| *z > s.shm_size) {
        return Err(invalid(
            "ratelimit.zone_size",
            format!("{z} bytes is more than shm_size ({} bytes)", s.shm_size),
        ));
    }
    Ok(if parsed.check() {
        Command::Check(Box::new(s))
    } else if parsed.probe() {
        Command::Probe(Box::new(s))
    } else {
        Command::Run(Box::new(s))
    })
}

/// `--check`'s listing: one `key = value` per line, keys as in the file.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: Duration| d.as_secs_f64();
        let ms = |m: u64| m as f64 / 1000.0;
        let list = |v: &[String]| v.join(", ");
        let off = |v: &Option<String>| v.clone().unwrap_or_else(|| "off".into());
        let listen: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        let allow: Vec<String> = self.admin_allow.iter().map(ToString::to_string).collect();
        let statuses = |v: &[u16]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "etcd.endpoints = {}", list(&self.etcd))?;
        writeln!(f, "etcd.name = {}", self.name)?;
        writeln!(f, "etcd.services_prefix = {}", off(&self.services_prefix))?;
        writeln!(f, "listen = {}", list(&listen))?;
        writeln!(f, "admin = {}", self.admin)?;
        writeln!(f, "admin_access.allow = {}", list(&allow))?;
        let token = if self.admin_token.is_some() {
            "set"
        } else {
            "off"
        };
        writeln!(f, "admin_access.token = {token}")?;
        writeln!(
            f,
            "admin_limits.max_body_size = {}",
            self.limits.admin_max_body_size
        )?;
        writeln!(
            f,
            "admin_limits.max_connections = {}",
            self.admin_max_connections
        )?;
        writeln!(f, "workers = {}", self.workers)?;
        writeln!(f, "shm_size = {}", self.shm_size)?;
        writeln!(f, "shutdown_timeout = {}", secs(self.shutdown_timeout))?;
        let log = self.access_log.as_ref().map(|p| p.display().to_string());
        writeln!(f, "access_log = {}", off(&log))?;
        writeln!(f, "statsd.address = {}", off(&self.statsd))?;
        writeln!(
            f,
            "statsd.flush_interval = {}",
            secs(self.statsd_flush_interval)
        )?;
        let t = &self.timeouts;
        writeln!(f, "timeouts.connect = {}", ms(t.connect_ms))?;
        writeln!(f, "timeouts.upstream_read = {}", ms(t.upstream_read_ms))?;
        writeln!(f, "timeouts.client_header = {}", ms(t.client_header_ms))?;
        writeln!(f, "timeouts.client_body = {}", ms(t.client_body_ms))?;
        writeln!(f, "timeouts.keepalive = {}", ms(t.keepalive_ms))?;
        writeln!(
            f,
            "limits.client_max_body_size = {}",
            self.limits.client_max_body_size
        )?;
        writeln!(
            f,
            "limits.max_header_size = {}",
            self.limits.max_header_size
        )?;
        writeln!(
            f,
            "limits.max_connections = {}",
            self.limits.max_connections
        )?;
        writeln!(f, "upstream.tries = {}", self.upstream.tries)?;
        writeln!(
            f,
            "upstream.failure_statuses = {}",
            statuses(&self.upstream.failure_statuses)
        )?;
        let h = &self.healthcheck;
        writeln!(f, "healthcheck.enable = {}", h.enable)?;
        writeln!(f, "healthcheck.interval = {}", secs(h.interval))?;
        writeln!(f, "healthcheck.timeout = {}", secs(h.timeout))?;
        writeln!(f, "healthcheck.max_fails = {}", h.max_fails)?;
        writeln!(f, "healthcheck.ok_status = {}", statuses(&h.ok_status))?;
        writeln!(f, "healthcheck.check_url = {}", off(&h.check_url))?;
        writeln!(f, "healthcheck.panic_threshold = {}", h.panic_threshold)?;
        let l = &self.logcheck;
        writeln!(f, "logcheck.enable = {}", l.enable)?;
        writeln!(f, "logcheck.interval = {}", secs(l.interval))?;
        writeln!(f, "logcheck.recover = {}", secs(l.recover))?;
        writeln!(f, "ratelimit.zone_size = {}", self.ratelimit_zone())?;
        sources::describe(self.kubernetes.as_ref(), &self.sources, f)
    }
}

#[cfg(test)]
mod tests;
