//! A small blocking HTTP server for the admin API: one thread per listener,
//! one per connection. Admin traffic is rare; what matters is that it is
//! correct and shares the workers' HTTP parser and writer.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use elb_workers::http::chunked::ChunkedTracker;
use elb_workers::http::{self, BodyKind, RequestHead, parse_request};

use elb_workers::access::Access;

use crate::settings::AdminAddr;
use crate::store::Store;

use super::api;

const MAX_HEAD: usize = 64 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// After a failed accept (out of descriptors, say), the pause before the
/// next: the connection stays in the backlog instead of the loop spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// A body is read into memory that grows with it: a declared length is
/// trusted for this much at most, so that 64 clients declaring the limit
/// reserve nothing they do not send.
const BODY_RESERVE: u64 = 1 << 20;

/// What admin clients may cost the master.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// A bigger body is answered 413 and read no further.
    pub max_body: u64,
    /// Connections served at once, per listener; more wait in its backlog.
    pub max_connections: usize,
    /// The whole head must arrive within this, counted from when it is
    /// awaited: a client dribbling a head cannot hold one of the
    /// listener's `max_connections` slots for longer.
    pub head_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what}: {source}")]
pub struct AdminBindError {
    what: String,
    #[source]
    source: io::Error,
}

/// Binds the admin listener and the private socket for workers, and serves
/// both on background threads.
pub fn serve(
    admin: &AdminAddr,
    private: &Path,
    store: Arc<Mutex<Store>>,
    access: Access,
    limits: AdminLimits,
) -> Result<(), AdminBindError> {
    let bind_err = |what: String| move |source| AdminBindError { what, source };
    let access = Arc::new(access);
    let conn = limits;
    // One budget per listener: a flood on --admin cannot hold up the
    // requests workers forward, nor the other way round.
    let slots = || Arc::new(Slots::new(limits.max_connections));
    match admin {
        AdminAddr::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(bind_err(addr.to_string()))?;
            let (store, slots) = (store.clone(), slots());
            spawn("elb-admin", move || {
                accept_tcp(l, &store, &access, &slots, conn);
            });
        }
        AdminAddr::Unix(path) => {
            let l = bind_unix(path).map_err(bind_err(format!("unix:{}", path.display())))?;
            let (store, slots) = (store.clone(), slots());
            spawn("elb-admin", move || accept_unix(l, &store, &slots, conn));
        }
    }
    let l = bind_unix(private).map_err(bind_err(format!("unix:{}", private.display())))?;
    let slots = slots();
    spawn("elb-admin-fwd", move || {
        accept_unix(l, &store, &slots, conn)
    });
    Ok(())
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    // A socket file left by an earlier run is replaced.
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        log::error!("cannot start {name}: {e}");
    }
}

/// Connections served at once on one listener. A listener takes a slot
/// before it accepts, so that clients beyond the limit wait in the kernel's
/// backlog (costing the master nothing) until a connection ends.
struct Slots {
    live: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// One taken slot; given back when the connection's thread ends.
struct Slot(Arc<Slots>);

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            live: Mutex::new(0),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    fn take(self: &Arc<Self>) -> Slot {
        // The counter stays right whatever thread panicked holding it.
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        while *live >= self.max {
            live = self
                .freed
                .wait(live)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *live += 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut live = self.0.live.lock().unwrap_or_else(PoisonError::into_inner);
        *live -= 1;
        self.0.freed.notify_one();
    }
}

fn accept_tcp(
    l: TcpListener,
    store: &Arc<Mutex<Store>>,
    access: &Arc<Access>,
    slots: &Arc<Slots>,
    limits: AdminLimits,
) {
    loop {
        let slot = slots.take();
        let (stream, peer) = match l.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(&e);
                continue;
            }
        };
        let (store, access) = (store.clone(), access.clone());
        spawn("elb-admin-conn", move || {
            let gate = Gate::Tcp {
                ip: peer.ip(),
                access: &access,
            };
            serve_conn(stream, &store, &gate, limits);
            drop(slot);
        });
    }
}

fn accept_unix(
    l: UnixListener,
    store: &Arc<Mutex<Store>>,
    slots: &Arc<Slots>,
    limits: AdminLimits,
) {
    loop {
        let slot = slots.take();
        let stream = match l.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(&e);
                continue;
            }
        };
        let store = store.clone();
        spawn("elb-admin-conn", move || {
            serve_conn(stream, &store, &Gate::Open, limits);
            drop(slot);
        });
    }
}

fn accept_failed(e: &io::Error) {
    if e.kind() != io::ErrorKind::Interrupted {
        log::warn!("admin accept: {e}");
        std::thread::sleep(ACCEPT_RETRY);
    }
}

enum Gate<'a> {
    /// A unix socket: guarded by its file mode (or, for the private one,
    /// by the worker that checked the client before forwarding).
    Open,
    Tcp {
        ip: IpAddr,
        access: &'a Access,
    },
}

impl Gate<'_> {
    fn admits(&self, buf: &[u8], head: &RequestHead) -> bool {
        match self {
            Gate::Open => true,
            Gate::Tcp { ip, access } => {
                let authorization = head
                    .headers
                    .iter()
                    .find(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(b"authorization"))
                    .map(|(_, v)| &buf[v.clone()]);
                access.admits(*ip, authorization)
            }
        }
    }
}

trait Conn: Read + Write {
    fn set_read_timeout(&self, d: Duration) -> io::Result<()>;
    fn set_write_timeout(&self, d: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_read_timeout(&self, d: Duration) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, Some(d))
    }
    fn set_write_timeout(&self, d: Duration) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, Some(d))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, d: Duration) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, Some(d))
    }
    fn set_write_timeout(&self, d: Duration) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, Some(d))
    }
}

/// Serves requests on one connection until it closes or errs.
fn serve_conn(mut stream: impl Conn, store: &Mutex<Store>, gate: &Gate<'_>, limits: AdminLimits) {
    if stream.set_write_timeout(IO_TIMEOUT).is_err() {
        return;
    }
    let max_body = limits.max_body;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out = Vec::new();
    loop {
        let head_deadline = Instant::now() + limits.head_timeout;
        let head = loop {
            match parse_request(&buf, MAX_HEAD) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => {
                    http::write::error_page(&mut out, e.status(), false);
                    let _ = stream.write_all(&out);
                    return;
                }
            }
            let left = head_deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.set_read_timeout(left).is_err() {
                return;
            }
            if !read_more(&mut stream, &mut buf) {
                return;
            }
        };
        if stream.set_read_timeout(IO_TIMEOUT).is_err() {
            return;
        }
        // SPEC 4: decided from the head alone, before any of the body is
        // read and without a 100 Continue; the unread body ends the
        // connection.
        if !gate.admits(&buf, &head) {
            return reply_close(&mut stream, 403, "forbidden");
        }
        if matches!(head.body, BodyKind::Length(n) if n > max_body) {
            return reply_close(&mut stream, 413, "body too large");
        }
        if head.expect_continue
            && head.body != BodyKind::None
            && buf.len() == head.len
            && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let body = match read_body(&mut stream, &mut buf, &head, max_body) {
            Ok(b) => b,
            Err(BodyError::TooLarge) => return reply_close(&mut stream, 413, "body too large"),
            Err(BodyError::Framing) => return reply_close(&mut stream, 400, "bad chunked body"),
            Err(BodyError::Closed) => return,
        };
        let answer = api::handle(store, head.method(&buf), head.target(&buf), &body);
        out.clear();
        http::write::response(
            &mut out,
            answer.status,
            answer.content_type,
            &answer.body,
            head.keep_alive,
        );
        if stream.write_all(&out).is_err() || !head.keep_alive {
            return;
        }
        buf.drain(..head.len);
    }
}

enum BodyError {
    TooLarge,
    Framing,
    Closed,
}

/// Reads the body that follows `head` (at the start of `buf`) into a vector
/// of its own, refusing it as soon as it would pass `max`. Leaves in `buf`
/// the head and whatever followed the body (a pipelined request), so that
/// `buf` never holds more than the head and one read.
fn read_body(
    stream: &mut impl Conn,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    max: u64,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    let mut framing = match head.body {
        BodyKind::None => return Ok(body),
        BodyKind::Length(n) => {
            // `n <= max` was checked; the rest is reserved as it comes.
            body.reserve(usize::try_from(n.min(BODY_RESERVE)).map_err(|_| BodyError::TooLarge)?);
            Framing::Length(n)
        }
        BodyKind::Chunked => Framing::Chunked(ChunkedTracker::default()),
    };
    loop {
        let avail = &buf[head.len..];
        let used = match &mut framing {
            Framing::Length(left) => {
                let n = avail
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                body.extend_from_slice(&avail[..n]);
                *left -= n as u64;
                n
            }
            Framing::Chunked(t) => t.decode(avail, &mut body).map_err(|_| BodyError::Framing)?,
        };
        if body.len() as u64 > max {
            return Err(BodyError::TooLarge);
        }
        let done = match &framing {
            Framing::Length(left) => *left == 0,
            Framing::Chunked(t) => t.is_done(),
        };
        if done {
            buf.drain(head.len..head.len + used);
            return Ok(body);
        }
        // All that was read belongs to the body and is in `body` now.
        buf.truncate(head.len);
        if !read_more(stream, buf) {
            return Err(BodyError::Closed);
        }
    }
}

enum Framing {
    Length(u64),
    Chunked(ChunkedTracker),
}

fn read_more(stream: &mut impl Conn, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 << 10];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn reply_close(stream: &mut impl Conn, status: u16, msg: &str) {
    let mut out = Vec::new();
    let body = serde_json::json!({ "error": msg }).to_string();
    http::write::response(&mut out, status, "application/json", body.as_bytes(), false);
    let _ = stream.write_all(&out);
}
