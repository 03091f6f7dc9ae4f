//! The TOML file (`--config`): every key optional, an unknown key refused
//! naming it, times in seconds (integer or float), sizes in bytes or with
//! `k`, `m`, `g`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::sources::{FileKubernetes, FileSources, apply_kubernetes, apply_sources};
use super::values::{
    parse_addr, parse_admin, parse_endpoint, parse_host_port, parse_name, parse_network,
    parse_shm_size, parse_size, parse_workers, seconds, statuses,
};
use super::{Settings, SettingsError, invalid};

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
    logcheck: Option<FileLogCheck>,
    kubernetes: Option<FileKubernetes>,
    sources: Option<FileSources>,
    ratelimit: Option<FileRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRateLimit {
    zone_size: Option<SizeValue>,
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
    // Signed, so that a negative value is refused naming the key.
    max_connections: Option<i64>,
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
    // Signed, so that a negative value is refused naming the key.
    panic_threshold: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLogCheck {
    enable: Option<bool>,
    interval: Option<Num>,
    recover: Option<Num>,
}

pub(super) fn apply(s: &mut Settings, path: &str) -> Result<(), SettingsError> {
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
                .map(|c| parse_network(&o("admin_access.allow"), c))
                .collect::<Result<_, _>>()?;
        }
        s.admin_token = a.token.filter(|t| !t.is_empty()).or(s.admin_token.take());
    }
    if let Some(l) = f.admin_limits {
        if let Some(v) = l.max_body_size {
            s.limits.admin_max_body_size =
                parse_size(&o("admin_limits.max_body_size"), &size_text(v))?;
        }
        if let Some(n) = l.max_connections {
            s.admin_max_connections = match usize::try_from(n) {
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
        let set = |ms: &mut u64, n: Option<Num>, key: &str| -> Result<(), SettingsError> {
            if let Some(n) = n {
                *ms = millis(positive(&o(key), &n)?);
            }
            Ok(())
        };
        let to = &mut s.timeouts;
        set(&mut to.connect_ms, t.connect, "timeouts.connect")?;
        set(
            &mut to.upstream_read_ms,
            t.upstream_read,
            "timeouts.upstream_read",
        )?;
        set(
            &mut to.client_header_ms,
            t.client_header,
            "timeouts.client_header",
        )?;
        set(
            &mut to.client_body_ms,
            t.client_body,
            "timeouts.client_body",
        )?;
        set(&mut to.keepalive_ms, t.keepalive, "timeouts.keepalive")?;
    }
    if let Some(l) = f.limits {
        if let Some(v) = l.client_max_body_size {
            s.limits.client_max_body_size =
                parse_size(&o("limits.client_max_body_size"), &size_text(v))?;
        }
        if let Some(v) = l.max_header_size {
            let key = o("limits.max_header_size");
            let size = parse_size(&key, &size_text(v))?;
            if size < 1024 {
                return Err(invalid(&key, "must be at least 1k"));
            }
            s.limits.max_header_size =
                usize::try_from(size).map_err(|_| invalid(&key, "too large"))?;
        }
        if let Some(n) = l.max_connections {
            s.limits.max_connections =
                usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                    invalid(
                        &o("limits.max_connections"),
                        format!("'{n}' must be at least 1"),
                    )
                })?;
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
        if let Some(p) = h.panic_threshold {
            s.healthcheck.panic_threshold = match u32::try_from(p) {
                Ok(p) if p <= 100 => p,
                _ => {
                    return Err(invalid(
                        &o("healthcheck.panic_threshold"),
                        format!("'{p}' is not a percentage (0 to 100)"),
                    ));
                }
            };
        }
    }
    if let Some(z) = f.ratelimit.and_then(|r| r.zone_size) {
        let origin = o("ratelimit.zone_size");
        let bytes = parse_size(&origin, &size_text(z))?;
        // Whole pages; 64k at least, as a lua_shared_dict needs room.
        let bytes = usize::try_from(bytes)
            .ok()
            .filter(|b| *b >= elb_shm::MIN_DICT && *b <= 1 << 31)
            .ok_or_else(|| invalid(&origin, format!("'{bytes}' is not from 64k to 2g")))?;
        s.ratelimit_zone_size = Some(bytes.next_multiple_of(4096));
    }
    if let Some(k) = f.kubernetes {
        apply_kubernetes(s, k, &o)?;
    }
    if let Some(so) = f.sources {
        apply_sources(s, so, &o)?;
    }
    if let Some(l) = f.logcheck {
        if let Some(e) = l.enable {
            s.logcheck.enable = e;
        }
        if let Some(i) = l.interval {
            s.logcheck.interval = positive(&o("logcheck.interval"), &i)?;
        }
        if let Some(r) = l.recover {
            s.logcheck.recover = positive(&o("logcheck.recover"), &r)?;
        }
        // The original's bounds: decisions need a full 5 s window, and a
        // peer must stay out long enough to be worth taking out.
        if s.logcheck.interval < Duration::from_secs(5) {
            return Err(invalid(&o("logcheck.interval"), "must be at least 5"));
        }
        if s.logcheck.recover < s.logcheck.interval * 2 {
            return Err(invalid(
                &o("logcheck.recover"),
                "must be at least twice logcheck.interval",
            ));
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

/// Whole milliseconds, at least 1: a timeout set to a fraction of a
/// millisecond must not become "no time at all".
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
