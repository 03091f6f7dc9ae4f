//! Helpers shared by the integration tests: free ports, a guard around a
//! running `elb` (killed with its workers, by PID, whatever happens), polling
//! with deadlines, a small raw HTTP/1.1 client, and a look at `/proc`.
//!
//! Each test crate includes this with `mod common;` and uses part of it.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The binary under test.
pub const ELB: &str = env!("CARGO_BIN_EXE_elb");

/// How long a started `elb` may take to answer its first request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a test waits for something that must happen before it calls it
/// not happening at all. Only a bound against waiting forever: a debug build
/// on a loaded 2-core machine can be slow, and that must not fail a correct
/// build. Tests print how long things took; they never assert it.
pub const EVENTUALLY: Duration = Duration::from_secs(60);

// --- waiting -------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds (true) or `timeout` has passed
/// (false). The condition is checked once more at the deadline.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// --- ports ---------------------------------------------------------------

/// Ports are taken from below the kernel's ephemeral range (32768+ by
/// default), so that they never meet the source ports of the tests' own
/// client connections, starting at an offset derived from the PID so that
/// test binaries running at the same time on one machine start apart.
const PORT_LO: u32 = 12_000;
const PORT_HI: u32 = 32_000;

static PORT_COUNTER: AtomicU32 = AtomicU32::new(0);
static PORTS_GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that nothing listens on now and that this process
/// has not handed out before. (elb binds with SO_REUSEPORT, so two elbs given
/// the same port would both start and share connections: never reuse one.)
pub fn free_port() -> u16 {
    let span = PORT_HI - PORT_LO;
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = PORT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let port = (PORT_LO + (start + n) % span) as u16;
        let mut given = PORTS_GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        let given = given.get_or_insert_with(HashSet::new);
        if given.contains(&port) {
            continue;
        }
        // A plain bind (no SO_REUSEPORT/SO_REUSEADDR) fails if anything,
        // listening or not, holds the port on 127.0.0.1 or the wildcard.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port between {PORT_LO} and {PORT_HI}");
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

// --- processes -----------------------------------------------------------

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match process_state(pid) {
        Some(state) => state != 'Z' && state != 'X',
        None => false,
    }
}

/// The state letter of `/proc/PID/stat` (R, S, D, Z, …), if the process exists.
pub fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid …": comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// The parent PID of `pid`, from `/proc/PID/status`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The arguments of `pid` (argv[0] first), from `/proc/PID/cmdline`.
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// True when `pid` runs as an elb worker (argv `elb-worker worker`).
pub fn is_worker(pid: i32) -> bool {
    let args = cmdline(pid);
    args.len() >= 2 && args[0] == "elb-worker" && args[1] == "worker"
}

/// The live (non-zombie) children of `parent`, by scanning `/proc` (sorted).
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if parent_of(pid) == Some(parent) && pid_alive(pid) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Sends `sig` to `pid`; errors (no such process) are ignored.
pub fn signal(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

/// Collects what a child writes to one of its pipes, in a thread, so that it
/// can be shown at any time (and the child never blocks on a full pipe).
pub struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    eof: Arc<AtomicBool>,
}

impl Capture {
    pub fn start(mut from: impl Read + Send + 'static) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicBool::new(false));
        let (b, e) = (Arc::clone(&buf), Arc::clone(&eof));
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match from.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => b
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]),
                }
            }
            e.store(true, Ordering::Release);
        });
        Capture { buf, eof }
    }

    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until every writer has closed the pipe (the master and every
    /// worker, which inherit it), up to `timeout`; true if so.
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.eof.load(Ordering::Acquire))
    }
}

/// Environment variables elb reads; cleared for every run so that the
/// caller's environment cannot leak into a test.
const ELB_ENV: &[&str] = &[
    "ETCD",
    "ETCD_HOST",
    "ETCD_PORT",
    "ELBNAME",
    "STATSD",
    "ELB_LISTEN",
    "ELB_ADMIN",
    "ELB_WORKERS",
    "ELB_SHM_SIZE",
    "ELB_ADMIN_ALLOW",
    "ELB_ADMIN_TOKEN",
    "ELB_SERVICES_PREFIX",
    "RUST_LOG",
];

fn command(args: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(ELB);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in ELB_ENV {
        cmd.env_remove(k);
    }
    cmd.env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    dies_with_the_test(&mut cmd);
    cmd
}

/// `cmd`'s process gets SIGKILL when the thread that spawned it ends, so
/// a test process that dies without unwinding (killed, aborted) takes it
/// along: an `elb` master (and with it its workers), etcd, kubectl. The
/// signal is tied to the spawning thread, the test's, which outlives the
/// process's guard.
pub fn dies_with_the_test(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How an `elb` run that was expected to end, ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// Runs `elb` with `args` and extra `env` and waits for it to exit, up to
/// `timeout`. If it is still running then, it is killed (with its workers)
/// and the test fails, showing its stderr.
pub fn run_elb(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Finished {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut child = command(&args, &env).spawn().expect("spawn elb");
    let out = Capture::start(child.stdout.take().expect("stdout"));
    let err = Capture::start(child.stderr.take().expect("stderr"));
    let pid = child.id() as i32;
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        let workers = children_of(pid);
        let _ = child.kill();
        for w in &workers {
            signal(*w, Signal::SIGKILL);
        }
        let _ = child.wait();
        panic!(
            "elb {args:?} was still running after {timeout:?} (workers {workers:?}); stderr:\n{}",
            err.text()
        );
    };
    out.wait_eof(Duration::from_secs(2));
    err.wait_eof(Duration::from_secs(2));
    Finished {
        status,
        stdout: out.text(),
        stderr: err.text(),
    }
}

// --- a running elb ---------------------------------------------------------

/// How to start an `elb`. By default it gets a free `--listen` and a free
/// `--admin` address, and `--etcd` pointing at a free port where nothing
/// answers (so no etcd running on the machine can leak into a test).
#[derive(Clone)]
pub struct ElbBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen: bool,
    admin: bool,
    etcd: bool,
}

impl ElbBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn workers(self, n: usize) -> Self {
        self.arg("--workers").arg(n.to_string())
    }

    /// Do not add `--listen` (the test sets the listeners itself).
    pub fn no_default_listen(mut self) -> Self {
        self.listen = false;
        self
    }

    /// Do not add `--admin`.
    pub fn no_default_admin(mut self) -> Self {
        self.admin = false;
        self
    }

    /// Do not add `--etcd` (the test names its own etcd).
    pub fn no_default_etcd(mut self) -> Self {
        self.etcd = false;
        self
    }

    /// Starts elb without waiting for anything. The default flags come
    /// first, so a test's own `--admin` or `--etcd` wins over them (the last
    /// one counts); `--listen` adds up, hence [`Self::no_default_listen`].
    pub fn spawn(self) -> Elb {
        let mut args = Vec::new();
        let listen = self.listen.then(free_addr);
        let admin = self.admin.then(free_addr);
        if let Some(a) = listen {
            args.extend(["--listen".to_string(), a.to_string()]);
        }
        if let Some(a) = admin {
            args.extend(["--admin".to_string(), a.to_string()]);
        }
        if self.etcd {
            args.extend(["--etcd".to_string(), free_addr().to_string()]);
        }
        args.extend(self.args.iter().cloned());
        let mut child = command(&args, &self.env).spawn().expect("spawn elb");
        let stdout = Capture::start(child.stdout.take().expect("stdout"));
        let stderr = Capture::start(child.stderr.take().expect("stderr"));
        Elb {
            child,
            args,
            listen,
            admin,
            stdout,
            stderr,
            exit: None,
            seen_workers: Mutex::new(HashSet::new()),
        }
    }

    /// Starts elb and waits until its proxy listener answers HTTP
    /// ([`Elb::wait_ready`]; without a default `--listen`, until a worker
    /// runs). If an address it was given here turned out to
    /// be taken meanwhile (elb exits 1, "Address already in use"), tries
    /// again with new ones, a few times.
    pub fn start(self) -> Elb {
        let auto = self.listen || self.admin;
        let mut elb = self.clone().spawn();
        for _ in 0..3 {
            if !auto || !elb.exits_with_address_in_use() {
                break;
            }
            elb = self.clone().spawn();
        }
        elb.wait_ready();
        elb
    }
}

/// A running `elb` master. Dropping it kills the master and every worker by
/// PID (SIGKILL) and waits for them; if the test is failing, the captured
/// stderr is printed first.
pub struct Elb {
    child: Child,
    args: Vec<String>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    stdout: Capture,
    stderr: Capture,
    exit: Option<ExitStatus>,
    /// Every worker PID seen, to kill them all on drop.
    seen_workers: Mutex<HashSet<i32>>,
}

impl Elb {
    pub fn builder() -> ElbBuilder {
        ElbBuilder {
            args: Vec::new(),
            env: Vec::new(),
            listen: true,
            admin: true,
            etcd: true,
        }
    }

    /// The master's PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The command line it was started with (without the binary).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The `--listen` address given by the builder.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .expect("elb was started without a default --listen")
    }

    /// The `--admin` address given by the builder.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .expect("elb was started without a default --admin")
    }

    /// Every live child of the master (sorted PIDs), worker or not.
    pub fn children(&self) -> Vec<i32> {
        let c = children_of(self.pid());
        self.remember(&c);
        c
    }

    /// The live children of the master that run as workers (`elb-worker`).
    pub fn workers(&self) -> Vec<i32> {
        let w: Vec<i32> = children_of(self.pid())
            .into_iter()
            .filter(|&p| is_worker(p))
            .collect();
        self.remember(&w);
        w
    }

    fn remember(&self, pids: &[i32]) {
        let mut seen = self.seen_workers.lock().unwrap_or_else(|e| e.into_inner());
        seen.extend(pids.iter().copied());
    }

    /// Waits until exactly `n` workers run; returns them, or fails the test.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> Vec<i32> {
        let mut w = Vec::new();
        if wait_until(timeout, || {
            w = self.workers();
            w.len() == n
        }) {
            return w;
        }
        panic!(
            "expected {n} workers within {timeout:?}, found {:?} (children {:?}); stderr:\n{}",
            w,
            self.children(),
            self.stderr()
        );
    }

    /// What the master and the workers wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// What the master wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        signal(self.pid(), sig);
    }

    /// The master's exit status, if it has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// True while the master has not exited.
    pub fn running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits up to `timeout` for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.try_exit();
            status.is_some()
        });
        status
    }

    fn exits_with_address_in_use(&mut self) -> bool {
        // A bind failure comes before the first worker starts, within a few
        // milliseconds; a started elb has workers or answers soon.
        let mut in_use = false;
        wait_until(READY_TIMEOUT, || {
            if let Some(status) = self.try_exit() {
                self.stderr.wait_eof(Duration::from_secs(1));
                in_use =
                    status.code() == Some(1) && self.stderr().contains("Address already in use");
                return true;
            }
            !self.workers().is_empty()
        });
        in_use
    }

    /// Waits until a request to the proxy listener gets any HTTP answer;
    /// fails the test (with elb's stderr) if elb exits or the deadline
    /// passes first.
    pub fn wait_ready(&mut self) {
        let Some(addr) = self.listen else {
            // Listeners of the test's own: at least wait for a worker.
            let ok = wait_until(READY_TIMEOUT, || {
                self.try_exit().is_some() || !self.workers().is_empty()
            });
            let exit = self.try_exit();
            assert!(
                ok && exit.is_none(),
                "elb {:?} did not start a worker (exit: {exit:?}); stderr:\n{}",
                self.args,
                self.stderr()
            );
            return;
        };
        let mut last = None;
        let ok = wait_until(READY_TIMEOUT, || {
            if self.try_exit().is_some() {
                return true;
            }
            match http_get_timeout(addr, "ready.test", "/", Duration::from_millis(500)) {
                Ok(_) => true,
                Err(e) => {
                    last = Some(e);
                    false
                }
            }
        });
        if let Some(status) = self.try_exit() {
            self.stderr.wait_eof(Duration::from_secs(1));
            panic!(
                "elb {:?} exited ({status}) before it was ready; stderr:\n{}",
                self.args,
                self.stderr()
            );
        }
        assert!(
            ok,
            "elb {:?} did not answer on {addr} within {READY_TIMEOUT:?} (last error: {last:?}); stderr:\n{}",
            self.args,
            self.stderr()
        );
    }

    /// Kills the master and every worker (SIGKILL) and waits for them.
    pub fn kill_all(&mut self) {
        // Of the PIDs seen earlier, only those still running as workers: a
        // PID seen long ago may belong to someone else by now. The master's
        // present children are killed whatever they run (one may be between
        // fork and exec). The master goes first, so that it restarts none.
        let seen = self
            .seen_workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut pids: Vec<i32> = seen.into_iter().filter(|&p| is_worker(p)).collect();
        if self.try_exit().is_none() {
            pids.extend(children_of(self.pid()));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for &p in &pids {
            signal(p, Signal::SIGKILL);
        }
        let left = !wait_until(Duration::from_secs(3), || {
            pids.iter().all(|&p| !pid_alive(p))
        });
        if left && !std::thread::panicking() {
            panic!("workers {pids:?} survived SIGKILL");
        }
    }
}

impl Drop for Elb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- elb {:?} (pid {}) stderr ----\n{}---- end of elb stderr ----",
                self.args,
                self.pid(),
                self.stderr()
            );
        }
        self.kill_all();
    }
}

// --- files -----------------------------------------------------------------

static TEMP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A directory under the system's temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("elb-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// --- HTTP --------------------------------------------------------------------

/// The default timeout of the HTTP helpers (connect, each read and write).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// In the order received; names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response head (without its blank line), its body still empty.
    pub fn head(head: &str) -> io::Result<Response> {
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_string();
        if !version.starts_with("HTTP/") {
            return Err(bad(format!("bad status line {status_line:?}")));
        }
        let mut headers = Vec::new();
        for l in lines {
            let (k, v) = l
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {l:?}")))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
        })
    }
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The first header of that name (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One client connection, with a read buffer so that keep-alive and
/// pipelined responses can be read one after the other.
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    /// Connects with `timeout`, which also becomes the read and write timeout.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local addr")
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends a request: `Host`, the extra headers, and `Content-Length` when
    /// there is a body.
    pub fn send_request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes)
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        self.send_request(method, host, path, headers, body)?;
        self.read_response_for(method)
    }

    /// Reads one response to a request that was not HEAD.
    pub fn read_response(&mut self) -> io::Result<Response> {
        self.read_response_for("GET")
    }

    /// Reads one response (a 1xx too: call again for the final one); the
    /// body is framed by chunked encoding, Content-Length or the end of the
    /// connection, and absent after HEAD, 1xx, 204 and 304.
    pub fn read_response_for(&mut self, method: &str) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a complete response head ({} bytes)",
                        self.buf.len()
                    ),
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut r = Response::head(&head)?;
        let status = r.status;
        let no_body =
            method.eq_ignore_ascii_case("HEAD") || status < 200 || status == 204 || status == 304;
        r.body = if no_body {
            Vec::new()
        } else if header(&r.headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked()?
        } else if let Some(len) = header(&r.headers, "content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
            self.take_exact(len)?
        } else {
            while self.fill()? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(r)
    }

    /// True if the peer has closed the connection (EOF or reset) within the
    /// read timeout, with nothing more to read.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body cut short: {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn take_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "chunked body cut short",
                ));
            }
        }
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.take_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take_exact(size)?);
            if !self.take_line()?.is_empty() {
                return Err(bad("chunk not followed by CRLF".into()));
            }
        }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// (status, headers, body) of a response.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// `GET path` with `Host: host` and `Connection: close` on a new connection,
/// with [`HTTP_TIMEOUT`]: (status, headers, body).
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> io::Result<Answer> {
    http_get_timeout(addr, host, path, HTTP_TIMEOUT)
}

/// [`http_get`] with another timeout (connect, and each read and write).
pub fn http_get_timeout(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> io::Result<Answer> {
    let mut c = HttpConn::connect(addr, timeout)?;
    let r = c.request("GET", host, path, &[("Connection", "close")], b"")?;
    Ok((r.status, r.headers, r.body))
}

// --- TCP state ----------------------------------------------------------------

/// Bytes received on the server side of the loopback connection
/// `client` → `server` that the server process has not read yet (its
/// receive queue, from `/proc/net/tcp` or `/proc/net/tcp6`), if such a
/// socket exists. Zero means the server has read all that was sent.
pub fn server_unread_bytes(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port(f[1]) == Some(server.port()) && port(f[2]) == Some(client.port()) {
                return f[4]
                    .split(':')
                    .nth(1)
                    .and_then(|q| u64::from_str_radix(q, 16).ok());
            }
        }
    }
    None
}

/// True if a new TCP connection to `addr` is refused (nothing listens).
pub fn connection_refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

pub mod apiserver;
pub mod backend;
pub mod etcd;
pub mod health;
pub mod python;
pub mod scale;

pub mod peers;
