//! `elb --probe`: whether the instance these settings describe is up, for
//! a container's `HEALTHCHECK` (the image has no curl). It asks the admin
//! API for `/__erulb__/status`, as an operator would, from the same
//! settings (file, environment, flags) the instance started with, so the
//! probe follows `ELB_ADMIN` wherever it points.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::settings::{AdminAddr, Settings};

/// Docker's health check waits 30 s by default; a probe that cannot get
/// an answer in this time reports the instance down well before that.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("admin API at {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("admin API at {addr} answered '{line}'")]
    Status { addr: String, line: String },
}

/// Ok when the admin API answers 200.
pub fn admin(s: &Settings) -> Result<(), ProbeError> {
    let addr = s.admin.to_string();
    let io_err = |source| ProbeError::Io {
        addr: addr.clone(),
        source,
    };
    let mut request = String::from("GET /__erulb__/status HTTP/1.0\r\nHost: elb\r\n");
    if let Some(token) = &s.admin_token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    let answer = match &s.admin {
        AdminAddr::Tcp(a) => {
            let c = TcpStream::connect_timeout(&reachable(*a), TIMEOUT).map_err(io_err)?;
            c.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
            c.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
            exchange(c, &request).map_err(io_err)?
        }
        AdminAddr::Unix(path) => {
            let c = UnixStream::connect(path).map_err(io_err)?;
            c.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
            c.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
            exchange(c, &request).map_err(io_err)?
        }
    };
    let line = answer.lines().next().unwrap_or_default();
    if line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(ProbeError::Status {
            addr,
            line: line.chars().take(80).collect(),
        })
    }
}

/// An admin API bound to every address is asked on loopback.
fn reachable(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, a.port()).into(),
        _ => a,
    }
}

/// Sends `request` and reads the head of the answer (its first 1 KiB).
fn exchange(mut c: impl Read + Write, request: &str) -> io::Result<String> {
    c.write_all(request.as_bytes())?;
    let mut buf = [0u8; 1024];
    let mut n = 0;
    while n < buf.len() {
        match c.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
