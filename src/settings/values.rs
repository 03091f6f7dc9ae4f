//! Parsers of single values, shared by the command line, the environment
//! and the file. Each error names where the value came from (`origin`: a
//! flag, a variable, or a key in a file).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::{AdminAddr, SettingsError, invalid};

/// `None` for an empty (or blank) value: the setting is off.
pub(super) fn non_empty(v: &str) -> Option<&str> {
    let v = v.trim();
    (!v.is_empty()).then_some(v)
}

pub(super) fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

pub(super) fn parse_addr(origin: &str, v: &str) -> Result<SocketAddr, SettingsError> {
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

pub(super) fn parse_host_port(origin: &str, v: &str) -> Result<String, SettingsError> {
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| invalid(origin, format!("'{v}' is not host:port")))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(origin, format!("'{v}' is not host:port")));
    }
    Ok(v.to_string())
}

pub(super) fn parse_endpoint(origin: &str, v: &str) -> Result<String, SettingsError> {
    let bare = v.strip_prefix("http://").unwrap_or(v).trim_end_matches('/');
    if v.starts_with("https://") {
        return Err(invalid(
            origin,
            format!("'{v}': TLS to etcd is not supported"),
        ));
    }
    parse_host_port(origin, bare)
}

pub(super) fn parse_name(origin: &str, v: &str) -> Result<String, SettingsError> {
    if v.is_empty() || v.contains('/') {
        return Err(invalid(
            origin,
            format!("'{v}' is not a name (non-empty, no '/')"),
        ));
    }
    Ok(v.to_string())
}

pub(super) fn parse_admin(origin: &str, v: &str) -> Result<AdminAddr, SettingsError> {
    match v.strip_prefix("unix:") {
        Some("") => Err(invalid(origin, "unix: needs a path")),
        Some(path) => Ok(AdminAddr::Unix(PathBuf::from(path))),
        None => parse_addr(origin, v).map(AdminAddr::Tcp),
    }
}

pub(super) fn parse_workers(origin: &str, v: &str) -> Result<usize, SettingsError> {
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

pub(super) fn parse_shm_size(origin: &str, v: &str) -> Result<usize, SettingsError> {
    let n = parse_size(origin, v)?;
    if elb_shm::Layout::for_size(n as usize).is_none() {
        return Err(invalid(
            origin,
            format!(
                "'{v}' is out of range (1m to 4g less one byte; 4095m is the largest whole number of MiB)"
            ),
        ));
    }
    Ok(n as usize)
}

pub(super) fn parse_size(origin: &str, v: &str) -> Result<u64, SettingsError> {
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

pub(super) fn parse_seconds(origin: &str, v: &str) -> Result<Duration, SettingsError> {
    seconds(origin, v.parse::<f64>().ok())
        .map_err(|_| invalid(origin, format!("'{v}' is not a number of seconds")))
}

pub(super) fn seconds(origin: &str, n: Option<f64>) -> Result<Duration, SettingsError> {
    match n {
        Some(f) if (0.0..1e9).contains(&f) => Ok(Duration::from_secs_f64(f)),
        _ => Err(invalid(origin, "not a number of seconds (0 or more)")),
    }
}

/// A network `address/prefix`, or a bare address (one host).
pub(super) fn parse_network(origin: &str, v: &str) -> Result<IpNet, SettingsError> {
    let v = v.trim();
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| invalid(origin, format!("'{v}' is not a CIDR (address/prefix)")))
}

pub(super) fn statuses(origin: &str, v: Vec<u16>) -> Result<Vec<u16>, SettingsError> {
    if let Some(bad) = v.iter().find(|s| !(100..=599).contains(*s)) {
        return Err(invalid(origin, format!("{bad} is not an HTTP status")));
    }
    Ok(v)
}
