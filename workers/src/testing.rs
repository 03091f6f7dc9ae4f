//! A worker inside a unit test: what the master hands a re-executed child
//! (a region, listeners, the wake-up eventfd), made here with the same
//! APIs (`Region::create`, the shm crate's `ConfigWriter`, the records of
//! `published.rs`), and the worker's loop on a thread of its own, stopped
//! by a real signal. Backends are plain threads on loopback: no mocks.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use elb_shm::Region;
use elb_shm::config::ConfigWriter;
use nix::sys::eventfd::EventFd;
use nix::sys::pthread::{Pthread, pthread_kill, pthread_self};
use nix::sys::signal::Signal;

use crate::access::Access;
use crate::args::{Limits, RetryPolicy, Timeouts, WorkerArgs};
use crate::event_loop::{Resources, Worker};
use crate::published::{DomainRecord, PeerRecord, UpstreamRecord, domain_key, upstream_key};

const REGION_SIZE: usize = 4 << 20;
/// How long a test waits for any one answer before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// The tunables of a worker as the master's defaults set them.
pub(crate) fn args() -> WorkerArgs {
    WorkerArgs {
        index: 0,
        workers: 1,
        master_pid: std::process::id(),
        shm_fd: -1,
        wake_fd: -1,
        exe_fd: -1,
        listen_fds: Vec::new(),
        admin_access: Access {
            allow: Vec::new(),
            token: None,
        },
        admin_socket: "/nonexistent/elb-admin.sock".into(),
        limits: Limits {
            client_max_body_size: 1 << 20,
            max_header_size: 8 << 10,
            admin_max_body_size: 1 << 20,
            max_connections: 1024,
        },
        timeouts: Timeouts {
            connect_ms: 5_000,
            upstream_read_ms: 5_000,
            client_header_ms: 5_000,
            client_body_ms: 5_000,
            keepalive_ms: 5_000,
        },
        retry: RetryPolicy {
            tries: 2,
            failure_statuses: vec![502, 503, 504],
        },
        shutdown_timeout_ms: 5_000,
        access_log: None,
    }
}

/// A worker serving on 127.0.0.1, with the master's side of its region.
pub(crate) struct TestWorker {
    pub addr: SocketAddr,
    /// The worker's thread, whose states `session::tests` traces.
    pub thread_id: ThreadId,
    writer: ConfigWriter<'static>,
    wake: EventFd,
    next_slot: u32,
    pthread: Pthread,
    thread: Option<JoinHandle<bool>>,
}

impl TestWorker {
    pub fn start(args: WorkerArgs) -> TestWorker {
        // Mapped for the life of the test process, as a worker's is.
        let region: &'static Region =
            Box::leak(Box::new(Region::create(REGION_SIZE).expect("region")));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local address");
        let wake = EventFd::new().expect("eventfd");
        let wake_fd = nix::unistd::dup(&wake).expect("dup");
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let res = Resources {
                region,
                listeners: vec![listener],
                wake: wake_fd,
            };
            // Built on this thread: it blocks the stop signals here.
            let worker = Worker::new(args, res).expect("worker");
            let _ = tx.send(pthread_self());
            worker.run().is_ok()
        });
        let thread_id = thread.thread().id();
        let pthread = rx.recv_timeout(PATIENCE).expect("worker started");
        TestWorker {
            addr,
            thread_id,
            writer: ConfigWriter::new(region),
            wake,
            next_slot: 0,
            pthread,
            thread: Some(thread),
        }
    }

    /// Publishes upstream `name` over `peers` (equal weights, in order, the
    /// first picked first) and domain `host` routing everything to it,
    /// then wakes the worker as the master does.
    pub fn route(&mut self, host: &str, name: &str, peers: &[SocketAddr]) {
        let cursor_slot = self.slot();
        let peers = peers
            .iter()
            .map(|&addr| PeerRecord {
                name: addr.to_string(),
                addr,
                slot: self.slot(),
                incarnation: 0,
                max_fails: 0,
                fail_timeout_ms: 10_000,
                available: true,
                counters: None,
            })
            .collect::<Vec<_>>();
        let record = UpstreamRecord {
            cursor_slot,
            response_times: None,
            schedule: (0..peers.len() as u16).collect(),
            backup_schedule: Vec::new(),
            peers,
        };
        let domain = DomainRecord {
            counters: Some(0),
            rules: serde_json::json!({"init": "r1", "rules": {
                "r1": {"type": "backend", "args": {"servername": name}}
            }}),
        };
        let record = serde_json::to_vec(&record).expect("record");
        let domain = serde_json::to_vec(&domain).expect("domain record");
        self.writer
            .put_all(&[(&upstream_key(name), &record), (&domain_key(host), &domain)])
            .expect("configuration fits");
        self.writer.publish();
        self.wake.write(1).expect("wake");
    }

    fn slot(&mut self) -> u32 {
        self.next_slot += 1;
        self.next_slot
    }

    /// A client connection to the worker.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        s
    }

    /// Stops the worker as the master does on a graceful stop (SIGTERM):
    /// true if its loop ended without error.
    pub fn stop(mut self) -> bool {
        self.signal(Signal::SIGTERM)
    }

    fn signal(&mut self, signal: Signal) -> bool {
        let Some(thread) = self.thread.take() else {
            return false;
        };
        // The thread is not joined yet, so its id still names it; the
        // signal is blocked there and read from its signalfd.
        pthread_kill(self.pthread, signal).expect("signal the worker thread");
        thread.join().unwrap_or(false)
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.signal(Signal::SIGQUIT);
    }
}

/// A worker routing every request for `app.test` to `peers`, and a
/// client connected to it.
pub(crate) fn proxy_to(args: WorkerArgs, peers: &[SocketAddr]) -> (TestWorker, TcpStream) {
    let mut worker = TestWorker::start(args);
    worker.route("app.test", "web", peers);
    let client = worker.connect();
    (worker, client)
}

/// A backend on 127.0.0.1 that runs `serve` on each connection it
/// accepts, one after the other, on a thread of its own.
pub(crate) fn backend(serve: impl Fn(TcpStream) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(PATIENCE));
            serve(conn);
        }
    });
    addr
}

/// An address nothing listens on: connecting is refused.
pub(crate) fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address")
}

/// Reads one request head (and no body) from `conn`; empty at its end.
pub(crate) fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An answer as the client saw it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// Sends `request` and reads one answer with a `Content-Length` (every
/// answer ELB makes itself has one), or up to the close.
pub(crate) fn ask(client: &mut TcpStream, request: &str) -> Answer {
    client.write_all(request.as_bytes()).expect("send");
    read_answer(client)
}

fn read_answer(client: &mut TcpStream) -> Answer {
    let head = read_head(client);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            client.read_exact(&mut body).expect("body");
        }
        None => {
            let _ = client.read_to_end(&mut body);
        }
    }
    Answer { status, head, body }
}

/// Whether the worker closed `client` (reads its end).
pub(crate) fn closed(client: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).is_ok() && rest.is_empty()
}

/// Answers every request on a connection with `status` and `body`.
pub(crate) fn answer_each(mut conn: TcpStream, body: &str) {
    loop {
        if read_head(&mut conn).is_empty() {
            return;
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Closes both ways, so the other side sees the end at once.
pub(crate) fn hang_up(conn: &TcpStream) {
    let _ = conn.shutdown(Shutdown::Both);
}
