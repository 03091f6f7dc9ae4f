//! The access log: one line per request in Eru ELB's `eru-lb` format,
//!
//! ```text
//! $host $remote_addr [$time_local] "$request" $status $body_bytes_sent
//! "$http_referer" "$http_user_agent" $request_time $upstream_response_time
//! $proxy_add_x_forwarded_for $uri $args $upstream_addr $upstream_status
//! ```
//!
//! (one line; `-` for an empty value; times in seconds with three
//! decimals). Lines gather in a buffer that the worker writes in one
//! `write` when it passes [`FLUSH_AT`] bytes or once a second, so a request
//! never waits on the disk. The file is opened with `O_APPEND` and only
//! whole lines are written, so lines of several workers never mix. SIGUSR1
//! reopens it (log rotation).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Buffered bytes that make a write at once.
const FLUSH_AT: usize = 32 << 10;
/// The longest lines stay in the buffer.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct AccessLog {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    /// `$time_local` of the second `stamp_of`, rendered once per second.
    stamp: String,
    stamp_of: u64,
    /// When the buffer was last written out.
    pub flushed: Instant,
}

impl AccessLog {
    pub fn open(path: PathBuf) -> io::Result<AccessLog> {
        let file = open(&path)?;
        Ok(AccessLog {
            path,
            file: Some(file),
            buf: Vec::with_capacity(FLUSH_AT * 2),
            stamp: String::new(),
            stamp_of: u64::MAX,
            flushed: Instant::now(),
        })
    }

    pub fn has_lines(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes the buffered lines out. A failed write drops them (logged):
    /// a full disk must not grow the worker's memory.
    pub fn flush(&mut self) {
        self.flushed = Instant::now();
        if self.buf.is_empty() {
            return;
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(&self.buf)
        {
            log::warn!("access log {}: {e}", self.path.display());
        }
        self.buf.clear();
    }

    /// Writes what is buffered to the old file, then opens the path anew
    /// (after a rename by logrotate, a new file).
    pub fn reopen(&mut self) {
        self.flush();
        match open(&self.path) {
            Ok(f) => self.file = Some(f),
            Err(e) => log::warn!("access log {}: cannot reopen: {e}", self.path.display()),
        }
    }

    /// Appends the line of one finished request.
    pub fn write(&mut self, r: &Record, text: &[u8], client: SocketAddr, done: Instant) {
        self.refresh_stamp();
        let b = &mut self.buf;
        field(b, r.field(text, &r.host));
        b.push(b' ');
        let _ = write!(b, "{} [{}] \"", client.ip(), self.stamp);
        raw(b, r.field(text, &r.request));
        let _ = write!(b, "\" {} {} \"", r.status, r.body_bytes);
        field(b, r.field(text, &r.referer));
        b.extend_from_slice(b"\" \"");
        field(b, r.field(text, &r.user_agent));
        b.extend_from_slice(b"\" ");
        seconds(b, r.started.map(|s| done.saturating_duration_since(s)));
        b.push(b' ');
        seconds(b, r.upstream_time());
        b.push(b' ');
        let xff = r.field(text, &r.forwarded_for);
        if !xff.is_empty() {
            raw(b, xff);
            b.extend_from_slice(b", ");
        }
        let _ = write!(b, "{} ", client.ip());
        field(b, r.field(text, &r.uri));
        b.push(b' ');
        field(b, r.field(text, &r.args));
        b.push(b' ');
        match r.upstream_addr {
            Some(a) => {
                let _ = write!(b, "{a}");
            }
            None => b.push(b'-'),
        }
        b.push(b' ');
        match r.upstream_status {
            Some(s) => {
                let _ = write!(b, "{s}");
            }
            None => b.push(b'-'),
        }
        b.push(b'\n');
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    fn refresh_stamp(&mut self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now != self.stamp_of {
            self.stamp_of = now;
            self.stamp = time_local(now);
        }
    }
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// What the log line of one request needs, gathered as it goes: ranges
/// into the request's own copy of its head fields (`text`, kept by the
/// session), and what happened.
#[derive(Debug, Default, Clone)]
pub(crate) struct Record {
    pub host: Range<usize>,
    pub request: Range<usize>,
    pub referer: Range<usize>,
    pub user_agent: Range<usize>,
    pub forwarded_for: Range<usize>,
    pub uri: Range<usize>,
    pub args: Range<usize>,
    pub started: Option<Instant>,
    pub upstream_started: Option<Instant>,
    pub upstream_done: Option<Instant>,
    pub upstream_addr: Option<SocketAddr>,
    pub upstream_status: Option<u16>,
    pub status: u16,
    pub body_bytes: u64,
}

impl Record {
    fn field<'t>(&self, text: &'t [u8], r: &Range<usize>) -> &'t [u8] {
        text.get(r.clone()).unwrap_or_default()
    }

    fn upstream_time(&self) -> Option<Duration> {
        Some(
            self.upstream_done?
                .saturating_duration_since(self.upstream_started?),
        )
    }
}

/// A value, or `-` when empty; spaces and control bytes escaped so that a
/// field stays one field.
fn field(b: &mut Vec<u8>, v: &[u8]) {
    if v.is_empty() {
        b.push(b'-');
    } else {
        raw(b, v);
    }
}

/// A value as nginx logs it: `"`, `\`, control bytes and bytes above 0x7e
/// as `\xHH`, so a client cannot forge a line or a field.
fn raw(b: &mut Vec<u8>, v: &[u8]) {
    for &c in v {
        if c == b'"' || c == b'\\' || !(0x20..=0x7e).contains(&c) {
            let _ = write!(b, "\\x{c:02X}");
        } else {
            b.push(c);
        }
    }
}

/// Seconds with three decimals, or `-`.
fn seconds(b: &mut Vec<u8>, d: Option<Duration>) {
    match d {
        Some(d) => {
            let ms = d.as_millis();
            let _ = write!(b, "{}.{:03}", ms / 1000, ms % 1000);
        }
        None => b.push(b'-'),
    }
}

/// nginx's `$time_local` for a Unix time, in UTC: `04/Dec/2026:03:12:13 +0000`.
fn time_local(unix: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The calendar date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm, proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_time_local() {
        assert_eq!(time_local(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(time_local(1_796_353_933), "04/Dec/2026:03:12:13 +0000");
        assert_eq!(time_local(951_782_400), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn fields_cannot_forge_a_line() {
        let mut b = Vec::new();
        raw(&mut b, b"a\"b\\c\nd\xffe f");
        assert_eq!(b, b"a\\x22b\\x5Cc\\x0Ad\\xFFe f");
        let mut b = Vec::new();
        field(&mut b, b"");
        seconds(&mut b, Some(Duration::from_micros(1_234_567)));
        assert_eq!(b, b"-1.234");
    }
}
