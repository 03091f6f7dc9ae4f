//! One active check: `GET check_url` to a peer, answered with a status or
//! failed, all within the check's timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of an answer read to find its status line.
const MAX_HEAD: usize = 4096;

/// Why a probe got no status.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Io(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer closed the connection before a status line")]
    Closed,
    #[error("not an HTTP status line")]
    Invalid,
}

/// Sends the probe and returns the answer's status.
pub async fn probe(
    addr: SocketAddr,
    host: &str,
    url: &str,
    timeout: Duration,
) -> Result<u16, ProbeError> {
    tokio::time::timeout(timeout, exchange(addr, host, url))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn exchange(addr: SocketAddr, host: &str, url: &str) -> Result<u16, ProbeError> {
    let mut conn = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    let request = format!(
        "GET {url} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: elb-healthcheck\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut buf = Vec::with_capacity(512);
    loop {
        if let Some(status) = status_line(&buf)? {
            return Ok(status);
        }
        if buf.len() >= MAX_HEAD {
            return Err(ProbeError::Invalid);
        }
        let mut chunk = [0u8; 512];
        let n = conn.read(&mut chunk).await.map_err(ProbeError::Io)?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The status of a complete status line at the start of `buf`, `None`
/// while the line is not complete.
fn status_line(buf: &[u8]) -> Result<Option<u16>, ProbeError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = &buf[..end];
    let rest = line
        .strip_prefix(b"HTTP/1.")
        .filter(|r| r.len() >= 5 && r[0].is_ascii_digit() && r[1] == b' ')
        .ok_or(ProbeError::Invalid)?;
    let digits = &rest[2..5];
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProbeError::Invalid);
    }
    let status = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    Ok(Some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            status_line(b"HTTP/1.1 200 OK\r\n").ok().flatten(),
            Some(200)
        );
        assert_eq!(status_line(b"HTTP/1.0 503\r\n").ok().flatten(), Some(503));
        assert_eq!(status_line(b"HTTP/1.1 20").ok().flatten(), None);
        assert!(status_line(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(status_line(b"HTTP/1.1 2x0 OK\r\n").is_err());
    }
}
