//! The master's settings: defaults, overridden by `--config FILE`, then by
//! the environment, then by flags (SPEC 2). Every bad value is one
//! [`SettingsError`] naming where it came from; `main` prints it on one line
//! and exits 2.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use elb_workers::access::Cidr;
use serde::Deserialize;

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

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub upstream_read: Duration,
    pub client_header: Duration,
    pub client_body: Duration,
    pub keepalive: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub client_max_body_size: u64,
    pub max_header_size: u64,
}

/// `[admin_limits]`: what one admin client may cost the master.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdminLimits {
    /// A bigger admin body is answered 413 and read no further.
    pub max_body_size: u64,
    /// Admin connections served at once, per listener; more wait in its
    /// backlog.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamPolicy {
    pub tries: u32,
    pub failure_statuses: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub enable: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_fails: u32,
    pub ok_status: Vec<u16>,
    pub check_url: Option<String>,
}

/// Everything the master runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub etcd: Vec<String>,
    pub name: String,
    pub services_prefix: Option<String>,
    pub statsd: Option<String>,
    pub statsd_flush_interval: Duration,
    pub listen: Vec<SocketAddr>,
    pub admin: AdminAddr,
    pub admin_allow: Vec<Cidr>,
    pub admin_token: Option<String>,
    pub admin_limits: AdminLimits,
    pub workers: usize,
    pub shm_size: usize,
    pub shutdown_timeout: Duration,
    pub access_log: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub upstream: UpstreamPolicy,
    pub healthcheck: HealthCheck,
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
                Cidr {
                    addr: IpAddr::from([127, 0, 0, 0]),
                    prefix: 8,
                },
                Cidr {
                    addr: IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                    prefix: 128,
                },
            ],
            admin_token: None,
            admin_limits: AdminLimits {
                max_body_size: 64 << 20,
                max_connections: 64,
            },
            workers: cpus.min(elb_shm::MAX_WORKERS),
            shm_size: 64 << 20,
            shutdown_timeout: Duration::from_secs(10),
            access_log: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(5),
                upstream_read: Duration::from_secs(30),
                client_header: Duration::from_secs(60),
                client_body: Duration::from_secs(60),
                keepalive: Duration::from_secs(65),
            },
            limits: Limits {
                client_max_body_size: 50 << 20,
                max_header_size: 64 << 10,
            },
            upstream: UpstreamPolicy {
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
            },
        }
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Settings>),
    Help,
    Version,
}

pub const USAGE: &str = "\
elb: dynamic HTTP load balancer (routes and upstreams from etcd, applied live)

usage: elb [options]

  --etcd LIST             etcd endpoints, host:port[,host:port]   (ETCD, ETCD_HOST+ETCD_PORT; 127.0.0.1:2379)
  --name NAME             key prefix in etcd                      (ELBNAME; ELB)
  --statsd HOST:PORT      send metrics to statsd                  (STATSD; off)
  --listen ADDR           proxy listener, repeatable              (ELB_LISTEN, comma-separated; 0.0.0.0:8080)
  --admin ADDR            admin API, host:port or unix:PATH       (ELB_ADMIN; 127.0.0.1:8081)
  --workers N             worker processes                        (ELB_WORKERS; one per CPU)
  --shm-size SIZE         shared region, bytes or k/m/g           (ELB_SHM_SIZE; 64m)
  --services-prefix P     lua-resty-upstream-etcd layout prefix   (ELB_SERVICES_PREFIX; off)
  --shutdown-timeout S    graceful stop limit, seconds            (10)
  --access-log PATH       access log                              (off)
  --config FILE           TOML file with these and the tunables   (none)
  -h, --help              this text
  -V, --version           the version

Flags win over the environment, the environment over the file.
ELB_ADMIN_ALLOW (CIDRs, comma-separated) and ELB_ADMIN_TOKEN guard the admin API.
";

/// Parses flags and the environment (and the file a flag or the environment
/// names) into settings.
pub fn from_args_and_env(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, SettingsError> {
    let flags = parse_flags(args)?;
    let mut flags = match flags {
        Flags::Help => return Ok(Command::Help),
        Flags::Version => return Ok(Command::Version),
        Flags::Values(v) => v,
    };
    let mut s = Settings::default();
    if let Some(path) = take(&mut flags, "--config") {
        apply_file(&mut s, &path.value)?;
    }
    apply_env(&mut s, &env)?;
    let mut listen = Vec::new();
    for (name, raw) in flags {
        if name == "--listen" {
            listen.push(parse_addr(&raw.origin, &raw.value)?);
        } else {
            apply_one(&mut s, name, &raw)?;
        }
    }
    if !listen.is_empty() {
        s.listen = listen;
    }
    Ok(Command::Run(Box::new(s)))
}

/// A raw value and where it came from, for error messages.
struct Raw {
    origin: String,
    value: String,
}

enum Flags {
    Help,
    Version,
    Values(Vec<(&'static str, Raw)>),
}

const FLAGS: &[&str] = &[
    "--etcd",
    "--name",
    "--statsd",
    "--listen",
    "--admin",
    "--workers",
    "--shm-size",
    "--services-prefix",
    "--shutdown-timeout",
    "--access-log",
    "--config",
];

fn parse_flags(args: impl IntoIterator<Item = String>) -> Result<Flags, SettingsError> {
    let mut out = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Flags::Help),
            "-V" | "--version" => return Ok(Flags::Version),
            _ => {}
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let Some(&flag) = FLAGS.iter().find(|f| **f == name) else {
            return Err(SettingsError::Usage(format!(
                "unknown argument '{arg}' (see elb --help)"
            )));
        };
        let value = match inline.or_else(|| it.next()) {
            Some(v) => v,
            None => return Err(SettingsError::Usage(format!("{flag} needs a value"))),
        };
        out.push((
            flag,
            Raw {
                origin: flag.to_string(),
                value,
            },
        ));
    }
    Ok(Flags::Values(out))
}

fn take(flags: &mut Vec<(&'static str, Raw)>, name: &str) -> Option<Raw> {
    let i = flags.iter().rposition(|(n, _)| *n == name)?;
    Some(flags.remove(i).1)
}

fn apply_env(s: &mut Settings, env: &impl Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
    let raw = |name: &str| {
        env(name).map(|value| Raw {
            origin: name.to_string(),
            value,
        })
    };
    if let (Some(host), Some(port)) = (env("ETCD_HOST"), env("ETCD_PORT")) {
        let r = Raw {
            origin: "ETCD_HOST/ETCD_PORT".into(),
            value: format!("{host}:{port}"),
        };
        apply_one(s, "--etcd", &r)?;
    }
    let pairs = [
        ("ETCD", "--etcd"),
        ("ELBNAME", "--name"),
        ("STATSD", "--statsd"),
        ("ELB_ADMIN", "--admin"),
        ("ELB_WORKERS", "--workers"),
        ("ELB_SHM_SIZE", "--shm-size"),
        ("ELB_SERVICES_PREFIX", "--services-prefix"),
    ];
    for (var, flag) in pairs {
        if let Some(r) = raw(var) {
            apply_one(s, flag, &r)?;
        }
    }
    if let Some(r) = raw("ELB_LISTEN") {
        s.listen = split_list(&r.value)
            .map(|a| parse_addr(&r.origin, a))
            .collect::<Result<_, _>>()?;
        if s.listen.is_empty() {
            return Err(invalid(&r.origin, "no address given"));
        }
    }
    if let Some(r) = raw("ELB_ADMIN_ALLOW") {
        s.admin_allow = split_list(&r.value)
            .map(|c| parse_cidr(&r.origin, c))
            .collect::<Result<_, _>>()?;
    }
    if let Some(r) = raw("ELB_ADMIN_TOKEN") {
        s.admin_token = non_empty(&r)?.map(str::to_string);
    }
    Ok(())
}

fn apply_one(s: &mut Settings, flag: &str, r: &Raw) -> Result<(), SettingsError> {
    let o = r.origin.as_str();
    let v = r.value.trim();
    match flag {
        "--etcd" => {
            s.etcd = split_list(v)
                .map(|e| parse_endpoint(o, e))
                .collect::<Result<_, _>>()?;
            if s.etcd.is_empty() {
                return Err(invalid(o, "no endpoint given"));
            }
        }
        "--name" => s.name = parse_name(o, v)?,
        "--statsd" => s.statsd = non_empty(r)?.map(|a| parse_host_port(o, a)).transpose()?,
        "--admin" => s.admin = parse_admin(o, v)?,
        "--workers" => s.workers = parse_workers(o, v)?,
        "--shm-size" => s.shm_size = parse_shm_size(o, v)?,
        "--services-prefix" => s.services_prefix = non_empty(r)?.map(str::to_string),
        "--shutdown-timeout" => s.shutdown_timeout = parse_seconds(o, v)?,
        "--access-log" => s.access_log = non_empty(r)?.map(PathBuf::from),
        other => return Err(SettingsError::Usage(format!("{other} is not a setting"))),
    }
    Ok(())
}

fn non_empty(r: &Raw) -> Result<Option<&str>, SettingsError> {
    let v = r.value.trim();
    Ok((!v.is_empty()).then_some(v))
}

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_addr(origin: &str, v: &str) -> Result<SocketAddr, SettingsError> {
    let v = v.trim();
    if let Ok(a) = v.parse() {
        return Ok(a);
    }
    let mut addrs = v
        .to_socket_addrs()
        .map_err(|_| invalid(origin, format!("'{v}' is not an address (host:port)")))?;
    addrs
        .next()
        .ok_or_else(|| invalid(origin, format!("'{v}' resolves to no address")))
}

fn parse_host_port(origin: &str, v: &str) -> Result<String, SettingsError> {
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| invalid(origin, format!("'{v}' is not host:port")))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(origin, format!("'{v}' is not host:port")));
    }
    Ok(v.to_string())
}

fn parse_endpoint(origin: &str, v: &str) -> Result<String, SettingsError> {
    let bare = v.strip_prefix("http://").unwrap_or(v).trim_end_matches('/');
    if v.starts_with("https://") {
        return Err(invalid(
            origin,
            format!("'{v}': TLS to etcd is not supported"),
        ));
    }
    parse_host_port(origin, bare)
}

fn parse_name(origin: &str, v: &str) -> Result<String, SettingsError> {
    if v.is_empty() || v.contains('/') {
        return Err(invalid(
            origin,
            format!("'{v}' is not a name (non-empty, no '/')"),
        ));
    }
    Ok(v.to_string())
}

fn parse_admin(origin: &str, v: &str) -> Result<AdminAddr, SettingsError> {
    match v.strip_prefix("unix:") {
        Some("") => Err(invalid(origin, "unix: needs a path")),
        Some(path) => Ok(AdminAddr::Unix(PathBuf::from(path))),
        None => parse_addr(origin, v).map(AdminAddr::Tcp),
    }
}

fn parse_workers(origin: &str, v: &str) -> Result<usize, SettingsError> {
    match v.parse::<usize>() {
        Ok(n) if (1..=elb_shm::MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(invalid(
            origin,
            format!(
                "'{v}' is not a number of workers (1 to {})",
                elb_shm::MAX_WORKERS
            ),
        )),
    }
}

fn parse_shm_size(origin: &str, v: &str) -> Result<usize, SettingsError> {
    let n = parse_size(origin, v)?;
    if elb_shm::Layout::for_size(n as usize).is_none() {
        return Err(invalid(origin, format!("'{v}' is out of range (1m to 4g)")));
    }
    Ok(n as usize)
}

fn parse_size(origin: &str, v: &str) -> Result<u64, SettingsError> {
    let lower = v.trim().to_ascii_lowercase();
    let (digits, mult) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some(b'm') => (&lower[..lower.len() - 1], 1 << 20),
        Some(b'g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            invalid(
                origin,
                format!("'{v}' is not a size (bytes, or a number with k, m or g)"),
            )
        })
}

fn parse_seconds(origin: &str, v: &str) -> Result<Duration, SettingsError> {
    seconds(origin, v.parse::<f64>().ok())
        .map_err(|_| invalid(origin, format!("'{v}' is not a number of seconds")))
}

fn seconds(origin: &str, n: Option<f64>) -> Result<Duration, SettingsError> {
    match n {
        Some(f) if (0.0..1e9).contains(&f) => Ok(Duration::from_secs_f64(f)),
        _ => Err(invalid(origin, "not a number of seconds (0 or more)")),
    }
}

fn parse_cidr(origin: &str, v: &str) -> Result<Cidr, SettingsError> {
    Cidr::parse(v).ok_or_else(|| invalid(origin, format!("'{v}' is not a CIDR (address/prefix)")))
}

// --- the TOML file -----------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn as_f64(&self) -> f64 {
        match *self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Vec<String>>,
    admin: Option<String>,
    workers: Option<u64>,
    shm_size: Option<SizeValue>,
    shutdown_timeout: Option<Num>,
    access_log: Option<String>,
    etcd: Option<FileEtcd>,
    admin_access: Option<FileAdminAccess>,
    admin_limits: Option<FileAdminLimits>,
    statsd: Option<FileStatsd>,
    timeouts: Option<FileTimeouts>,
    limits: Option<FileLimits>,
    upstream: Option<FileUpstream>,
    healthcheck: Option<FileHealthCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEtcd {
    endpoints: Option<Vec<String>>,
    name: Option<String>,
    services_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdminAccess {
    allow: Option<Vec<String>>,
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdminLimits {
    max_body_size: Option<SizeValue>,
    // Signed, so that a negative value is refused naming the key.
    max_connections: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStatsd {
    address: Option<String>,
    flush_interval: Option<Num>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    connect: Option<Num>,
    upstream_read: Option<Num>,
    client_header: Option<Num>,
    client_body: Option<Num>,
    keepalive: Option<Num>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    client_max_body_size: Option<SizeValue>,
    max_header_size: Option<SizeValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    tries: Option<u32>,
    failure_statuses: Option<Vec<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealthCheck {
    enable: Option<bool>,
    interval: Option<Num>,
    timeout: Option<Num>,
    max_fails: Option<u32>,
    ok_status: Option<Vec<u16>>,
    check_url: Option<String>,
}

fn apply_file(s: &mut Settings, path: &str) -> Result<(), SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("--config", format!("cannot read '{path}': {e}")))?;
    let f: File = toml::from_str(&text).map_err(|e| {
        // toml's message spans several lines; keep the first, which names
        // the key (e.g. "unknown field `lisen`").
        let msg = e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_string();
        let at = e
            .span()
            .map(|sp| {
                format!(
                    " (line {})",
                    text[..sp.start.min(text.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default();
        invalid(path, format!("{msg}{at}"))
    })?;
    let o = |key: &str| format!("{key} in {path}");
    if let Some(l) = f.listen {
        s.listen = l
            .iter()
            .map(|a| parse_addr(&o("listen"), a))
            .collect::<Result<_, _>>()?;
    }
    if let Some(a) = f.admin {
        s.admin = parse_admin(&o("admin"), &a)?;
    }
    if let Some(w) = f.workers {
        s.workers = parse_workers(&o("workers"), &w.to_string())?;
    }
    if let Some(sz) = f.shm_size {
        s.shm_size = parse_shm_size(&o("shm_size"), &size_text(sz))?;
    }
    if let Some(t) = f.shutdown_timeout {
        s.shutdown_timeout = seconds(&o("shutdown_timeout"), Some(t.as_f64()))?;
    }
    if let Some(p) = f.access_log {
        s.access_log = Some(PathBuf::from(p));
    }
    if let Some(e) = f.etcd {
        if let Some(eps) = e.endpoints {
            s.etcd = eps
                .iter()
                .map(|x| parse_endpoint(&o("etcd.endpoints"), x))
                .collect::<Result<_, _>>()?;
        }
        if let Some(n) = e.name {
            s.name = parse_name(&o("etcd.name"), &n)?;
        }
        if let Some(p) = e.services_prefix {
            s.services_prefix = Some(p);
        }
    }
    if let Some(a) = f.admin_access {
        if let Some(allow) = a.allow {
            s.admin_allow = allow
                .iter()
                .map(|c| parse_cidr(&o("admin_access.allow"), c))
                .collect::<Result<_, _>>()?;
        }
        s.admin_token = a.token.filter(|t| !t.is_empty()).or(s.admin_token.take());
    }
    if let Some(l) = f.admin_limits {
        if let Some(v) = l.max_body_size {
            s.admin_limits.max_body_size =
                parse_size(&o("admin_limits.max_body_size"), &size_text(v))?;
        }
        if let Some(n) = l.max_connections {
            s.admin_limits.max_connections = match usize::try_from(n) {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(invalid(
                        &o("admin_limits.max_connections"),
                        format!("'{n}' must be at least 1"),
                    ));
                }
            };
        }
    }
    if let Some(st) = f.statsd {
        if let Some(a) = st.address {
            s.statsd = Some(parse_host_port(&o("statsd.address"), &a)?);
        }
        if let Some(i) = st.flush_interval {
            s.statsd_flush_interval = positive(&o("statsd.flush_interval"), &i)?;
        }
    }
    if let Some(t) = f.timeouts {
        let set = |d: &mut Duration, n: Option<Num>, key: &str| -> Result<(), SettingsError> {
            if let Some(n) = n {
                *d = positive(&o(key), &n)?;
            }
            Ok(())
        };
        set(&mut s.timeouts.connect, t.connect, "timeouts.connect")?;
        set(
            &mut s.timeouts.upstream_read,
            t.upstream_read,
            "timeouts.upstream_read",
        )?;
        set(
            &mut s.timeouts.client_header,
            t.client_header,
            "timeouts.client_header",
        )?;
        set(
            &mut s.timeouts.client_body,
            t.client_body,
            "timeouts.client_body",
        )?;
        set(&mut s.timeouts.keepalive, t.keepalive, "timeouts.keepalive")?;
    }
    if let Some(l) = f.limits {
        if let Some(v) = l.client_max_body_size {
            s.limits.client_max_body_size =
                parse_size(&o("limits.client_max_body_size"), &size_text(v))?;
        }
        if let Some(v) = l.max_header_size {
            s.limits.max_header_size = parse_size(&o("limits.max_header_size"), &size_text(v))?;
            if s.limits.max_header_size < 1024 {
                return Err(invalid(&o("limits.max_header_size"), "must be at least 1k"));
            }
        }
    }
    if let Some(u) = f.upstream {
        if let Some(t) = u.tries {
            if t == 0 {
                return Err(invalid(&o("upstream.tries"), "must be at least 1"));
            }
            s.upstream.tries = t;
        }
        if let Some(fs) = u.failure_statuses {
            s.upstream.failure_statuses = statuses(&o("upstream.failure_statuses"), fs)?;
        }
    }
    if let Some(h) = f.healthcheck {
        if let Some(e) = h.enable {
            s.healthcheck.enable = e;
        }
        if let Some(i) = h.interval {
            s.healthcheck.interval = positive(&o("healthcheck.interval"), &i)?;
        }
        if let Some(t) = h.timeout {
            s.healthcheck.timeout = positive(&o("healthcheck.timeout"), &t)?;
        }
        if let Some(m) = h.max_fails {
            s.healthcheck.max_fails = m;
        }
        if let Some(st) = h.ok_status {
            s.healthcheck.ok_status = statuses(&o("healthcheck.ok_status"), st)?;
        }
        if let Some(u) = h.check_url {
            if !u.starts_with('/') {
                return Err(invalid(
                    &o("healthcheck.check_url"),
                    format!("'{u}' must start with /"),
                ));
            }
            s.healthcheck.check_url = Some(u);
        }
    }
    Ok(())
}

fn size_text(v: SizeValue) -> String {
    match v {
        SizeValue::Bytes(b) => b.to_string(),
        SizeValue::Text(t) => t,
    }
}

fn positive(origin: &str, n: &Num) -> Result<Duration, SettingsError> {
    let d = seconds(origin, Some(n.as_f64()))?;
    if d.is_zero() {
        return Err(invalid(origin, "must be more than 0"));
    }
    Ok(d)
}

fn statuses(origin: &str, v: Vec<u16>) -> Result<Vec<u16>, SettingsError> {
    if let Some(bad) = v.iter().find(|s| !(100..=599).contains(*s)) {
        return Err(invalid(origin, format!("{bad} is not an HTTP status")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match from_args_and_env(args.iter().map(|s| s.to_string()), |k| env.get(k).cloned())? {
            Command::Run(s) => Ok(*s),
            other => panic!("expected settings, got {other:?}"),
        }
    }

    fn message(r: Result<Settings, SettingsError>) -> String {
        r.expect_err("should be refused").to_string()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let s = run(&[], &[]).expect("defaults");
        assert_eq!(s.etcd, vec!["127.0.0.1:2379"]);
        assert_eq!(s.name, "ELB");
        assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().expect("addr")]);
        assert_eq!(
            s.admin,
            AdminAddr::Tcp("127.0.0.1:8081".parse().expect("addr"))
        );
        assert_eq!(s.shm_size, 64 << 20);
        assert_eq!(s.timeouts.keepalive, Duration::from_secs(65));
        assert_eq!(s.limits.client_max_body_size, 50 << 20);
        assert_eq!(s.upstream.tries, 3);
        assert_eq!(
            s.admin_limits,
            AdminLimits {
                max_body_size: 64 << 20,
                max_connections: 64
            }
        );
    }

    #[test]
    fn admin_limits_are_read_from_the_file_and_checked() {
        let dir = std::env::temp_dir().join(format!("elb-admin-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("elb.toml");
        let f = file.to_str().expect("utf8");
        let with = |text: &str| {
            std::fs::write(&file, text).expect("write");
            run(&["--config", f], &[])
        };
        let s = with("[admin_limits]\nmax_body_size = \"1k\"\nmax_connections = 2\n").expect("ok");
        assert_eq!(
            s.admin_limits,
            AdminLimits {
                max_body_size: 1024,
                max_connections: 2
            }
        );
        let s = with("[admin_limits]\nmax_body_size = 5000\n").expect("ok");
        assert_eq!(s.admin_limits.max_body_size, 5000);
        assert_eq!(s.admin_limits.max_connections, 64);
        for (text, key) in [
            (
                "[admin_limits]\nmax_body_size = \"lots\"\n",
                "admin_limits.max_body_size",
            ),
            (
                "[admin_limits]\nmax_connections = 0\n",
                "admin_limits.max_connections",
            ),
            (
                "[admin_limits]\nmax_connections = -3\n",
                "admin_limits.max_connections",
            ),
            ("[admin_limits]\nmax_conections = 3\n", "max_conections"),
        ] {
            let m = message(with(text));
            assert!(m.contains(key), "{text:?}: {m}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn flags_win_over_env_and_env_over_file() {
        let dir = std::env::temp_dir().join(format!("elb-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("elb.toml");
        std::fs::write(
            &file,
            "workers = 3\nshm_size = \"8m\"\n[etcd]\nname = \"FILE\"\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf8");
        let s = run(&["--config", f], &[("ELBNAME", "ENV")]).expect("ok");
        assert_eq!(
            (s.workers, s.shm_size, s.name.as_str()),
            (3, 8 << 20, "ENV")
        );
        let s = run(
            &["--config", f, "--workers=5", "--name", "FLAG"],
            &[("ELB_WORKERS", "4")],
        )
        .expect("ok");
        assert_eq!((s.workers, s.name.as_str()), (5, "FLAG"));
        std::fs::write(&file, "lisen = [\"x\"]\n").expect("write");
        assert!(message(run(&["--config", f], &[])).contains("lisen"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_original_env_names_are_read() {
        let s = run(
            &[],
            &[
                ("ETCD", "http://10.0.0.1:2379, 10.0.0.2:2379"),
                ("STATSD", "127.0.0.1:8125"),
            ],
        )
        .expect("ok");
        assert_eq!(s.etcd, vec!["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(s.statsd.as_deref(), Some("127.0.0.1:8125"));
        let s = run(&[], &[("ETCD_HOST", "10.0.0.3"), ("ETCD_PORT", "4001")]).expect("ok");
        assert_eq!(s.etcd, vec!["10.0.0.3:4001"]);
    }

    #[test]
    fn bad_values_name_their_setting() {
        assert!(message(run(&[], &[("ELB_WORKERS", "lots")])).starts_with("ELB_WORKERS: "));
        assert!(message(run(&[], &[("ELB_WORKERS", "0")])).contains("ELB_WORKERS"));
        assert!(message(run(&[], &[("ELB_LISTEN", "nowhere")])).starts_with("ELB_LISTEN: "));
        assert!(message(run(&["--shm-size", "12q"], &[])).starts_with("--shm-size: "));
        assert!(message(run(&["--admin", "unix:"], &[])).starts_with("--admin: "));
        assert!(
            message(run(&[], &[("ELB_ADMIN_ALLOW", "10.0.0.0/33")])).contains("ELB_ADMIN_ALLOW")
        );
        assert!(message(run(&["--bogus"], &[])).contains("--bogus"));
    }
}
