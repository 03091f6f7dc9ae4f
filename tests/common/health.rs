//! A backend whose health the test switches while it runs: `/health`
//! answers a chosen status, or hangs; every other path answers another
//! chosen status with the backend's name as the body. It counts both kinds
//! of request and keeps when each probe arrived. Dropping it stops it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a hanging `/health` holds its connection at most.
const HANG: Duration = Duration::from_secs(30);

struct Shared {
    name: String,
    health: AtomicU16,
    hang: AtomicBool,
    status: AtomicU16,
    requests: AtomicUsize,
    probes: Mutex<Vec<(Instant, String)>>,
    stop: AtomicBool,
}

pub struct HealthBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl HealthBackend {
    /// Starts a backend answering 200 to everything.
    pub fn start(name: &str) -> HealthBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind health backend");
        let addr = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared {
            name: name.to_string(),
            health: AtomicU16::new(200),
            hang: AtomicBool::new(false),
            status: AtomicU16::new(200),
            requests: AtomicUsize::new(0),
            probes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = Arc::clone(&s);
                        std::thread::spawn(move || serve(conn, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HealthBackend { addr, shared }
    }

    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The status `/health` answers from now on (and it stops hanging).
    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::Relaxed);
        self.shared.hang.store(false, Ordering::Relaxed);
    }

    /// `/health` accepts and never answers.
    pub fn hang_health(&self) {
        self.shared.hang.store(true, Ordering::Relaxed);
    }

    /// The status every other path answers from now on.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Relaxed);
    }

    /// Requests to paths other than `/health`.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// How many probes arrived.
    pub fn probes(&self) -> usize {
        self.probe_log().len()
    }

    /// When each probe arrived, with its head (lower-cased names).
    pub fn probe_log(&self) -> Vec<(Instant, String)> {
        self.shared
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for HealthBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, s: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::new(conn);
    loop {
        let mut head = String::new();
        // Read one head, line by line, until the empty line.
        loop {
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    let end = line == "\r\n" || line == "\n";
                    head.push_str(&line);
                    if end {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let lower = head.to_ascii_lowercase();
        let close = lower.contains("connection: close");
        let status = if path == "/health" {
            s.probes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Instant::now(), lower.clone()));
            if s.hang.load(Ordering::Relaxed) {
                let until = Instant::now() + HANG;
                while Instant::now() < until
                    && s.hang.load(Ordering::Relaxed)
                    && !s.stop.load(Ordering::Relaxed)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            s.health.load(Ordering::Relaxed)
        } else {
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.status.load(Ordering::Relaxed)
        };
        let body = s.name.as_bytes();
        let answer = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if out.write_all(answer.as_bytes()).is_err() || out.write_all(body).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}
