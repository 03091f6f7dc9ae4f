//! A small blocking HTTP server for the admin API: one thread per listener,
//! one per connection. Admin traffic is rare; what matters is that it is
//! correct and shares the workers' HTTP parser and writer.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elb_workers::http::{self, BodyKind, parse_request};

use elb_workers::access::Access;

use crate::settings::AdminAddr;
use crate::store::Store;

use super::api;

/// Largest admin request body accepted (a whole configuration fits).
const MAX_BODY: u64 = 64 << 20;
const MAX_HEAD: usize = 64 << 10;
const MAX_CONNECTIONS: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

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
) -> Result<(), AdminBindError> {
    let bind_err = |what: String| move |source| AdminBindError { what, source };
    let access = Arc::new(access);
    let live = Arc::new(AtomicUsize::new(0));
    match admin {
        AdminAddr::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(bind_err(addr.to_string()))?;
            let (store, access, live) = (store.clone(), access.clone(), live.clone());
            spawn("elb-admin", move || accept_tcp(l, store, access, live));
        }
        AdminAddr::Unix(path) => {
            let l = bind_unix(path).map_err(bind_err(format!("unix:{}", path.display())))?;
            let (store, live) = (store.clone(), live.clone());
            spawn("elb-admin", move || accept_unix(l, store, live));
        }
    }
    let l = bind_unix(private).map_err(bind_err(format!("unix:{}", private.display())))?;
    spawn("elb-admin-fwd", move || accept_unix(l, store, live));
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

fn accept_tcp(
    l: TcpListener,
    store: Arc<Mutex<Store>>,
    access: Arc<Access>,
    live: Arc<AtomicUsize>,
) {
    for conn in l.incoming() {
        let Ok(stream) = conn else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        if !admit(&live) {
            continue;
        }
        let (store, access, live) = (store.clone(), access.clone(), live.clone());
        spawn("elb-admin-conn", move || {
            let gate = Gate::Tcp {
                ip: peer.ip(),
                access: &access,
            };
            serve_conn(stream, &store, &gate);
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn accept_unix(l: UnixListener, store: Arc<Mutex<Store>>, live: Arc<AtomicUsize>) {
    for conn in l.incoming() {
        let Ok(stream) = conn else { continue };
        if !admit(&live) {
            continue;
        }
        let (store, live) = (store.clone(), live.clone());
        spawn("elb-admin-conn", move || {
            serve_conn(stream, &store, &Gate::Open);
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn admit(live: &AtomicUsize) -> bool {
    if live.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
        live.fetch_sub(1, Ordering::Relaxed);
        log::warn!("admin: too many connections, refusing one");
        return false;
    }
    true
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

trait Conn: Read + Write {
    fn set_timeouts(&self, d: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_timeouts(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// Serves requests on one connection until it closes or errs.
fn serve_conn(mut stream: impl Conn, store: &Mutex<Store>, gate: &Gate<'_>) {
    if stream.set_timeouts(IO_TIMEOUT).is_err() {
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out = Vec::new();
    loop {
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
            if !read_more(&mut stream, &mut buf) {
                return;
            }
        };
        let len = match head.body {
            BodyKind::None => 0,
            BodyKind::Length(n) if n <= MAX_BODY => n as usize,
            BodyKind::Length(_) => return reply_close(&mut stream, 413, "body too large"),
            BodyKind::Chunked => {
                return reply_close(&mut stream, 411, "send the body with Content-Length");
            }
        };
        if head.expect_continue && len > 0 && buf.len() < head.len + len {
            let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        while buf.len() < head.len + len {
            if !read_more(&mut stream, &mut buf) {
                return;
            }
        }
        let authorization = head
            .headers
            .iter()
            .find(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(b"authorization"))
            .map(|(_, v)| &buf[v.clone()]);
        let answer = match gate {
            Gate::Tcp { ip, access } if !access.admits(*ip, authorization) => api::Answer {
                status: 403,
                body: serde_json::json!({"error": "forbidden"}),
            },
            _ => api::handle(
                store,
                head.method(&buf),
                head.target(&buf),
                &buf[head.len..head.len + len],
            ),
        };
        out.clear();
        let body = answer.body.to_string();
        http::write::response(
            &mut out,
            answer.status,
            "application/json",
            body.as_bytes(),
            head.keep_alive,
        );
        if stream.write_all(&out).is_err() || !head.keep_alive {
            return;
        }
        buf.drain(..head.len + len);
    }
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
