//! Propagation from etcd to routing: how long after etcd acknowledges a
//! write the first request is routed by it. Built and run by
//! `bench/propagation` (std only, compiled with rustc).
//!
//! It starts its own etcd (free loopback ports, data on tmpfs), two echo
//! backends and an elb, then makes N updates one after another, cycling
//! through three kinds, each a single put:
//!
//! * `rule`: a domain's rule set switches its backend (answer changes A↔B);
//! * `domain`: a new domain (404 → 200);
//! * `peer`: the only peer of an upstream goes down or up (200 ↔ 502).
//!
//! Writes go through etcd's JSON gateway (`POST /v3/kv/put`); the clock
//! starts when its answer (the acknowledgement) has been read. Then requests
//! are sent to elb back to back on a keep-alive connection; the clock stops
//! when the answer to the first request routed the new way has been read.
//!
//! With `--under-load SECONDS` it then measures a live change under full
//! load: `wrk` runs SECONDS against a loaded domain with no update, then
//! SECONDS again while `--rate` updates a second (100 by default) go
//! through etcd: the rule and peer flips above, timed the same way, and
//! between them rewrites of the loaded domain's own rule set and of its
//! peers' weights. It prints both runs' throughput and failed requests,
//! and the propagation under load.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NAME: &str = "ELBBENCHPROP";

fn main() {
    let mut elb_bin = "target/release/elb".to_string();
    let mut updates = 100usize;
    let mut workers = 2usize;
    let mut under_load: Option<u64> = None;
    let mut rate = 100u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--elb" => elb_bin = args.next().expect("--elb PATH"),
            "--updates" => {
                updates = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--updates N")
            }
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--workers N")
            }
            "--under-load" => {
                under_load = Some(
                    args.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--under-load SECONDS"),
                )
            }
            "--rate" => rate = args.next().and_then(|n| n.parse().ok()).expect("--rate N"),
            other => {
                eprintln!(
                    "usage: propagation [--elb PATH] [--updates N] [--workers N] [--under-load SECONDS [--rate N]] (not {other})"
                );
                std::process::exit(2);
            }
        }
    }
    let mut procs = Procs(Vec::new());
    let dir = tmp_dir();

    // etcd
    let (client, peer) = (free_port(), free_port());
    let etcd = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("bench=http://127.0.0.1:{peer}"),
        ])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    procs.0.push(etcd);
    let etcd_addr: SocketAddr = format!("127.0.0.1:{client}").parse().expect("addr");
    wait("etcd healthy", Duration::from_secs(20), || {
        Http::connect(etcd_addr)
            .and_then(|mut c| c.request("GET", "localhost", "/health", ""))
            .is_some_and(|(s, b)| s == 200 && b.contains("true"))
    });
    let mut etcd = Http::connect(etcd_addr).expect("connect to etcd");

    // Backends and the initial configuration.
    let a = backend("A");
    let b = backend("B");
    put(&mut etcd, &format!("/{NAME}/upstreams/ua/{a}"), "");
    put(&mut etcd, &format!("/{NAME}/upstreams/ub/{b}"), "");
    put(&mut etcd, &format!("/{NAME}/upstreams/uc/{a}"), "");
    put(
        &mut etcd,
        &format!("/{NAME}/rules/rule.bench"),
        &rules("ua"),
    );
    put(
        &mut etcd,
        &format!("/{NAME}/rules/peer.bench"),
        &rules("uc"),
    );

    // elb
    let (listen, admin) = (free_port(), free_port());
    let elb = Command::new(&elb_bin)
        .args(["--etcd", &format!("127.0.0.1:{client}"), "--name", NAME])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--workers", &workers.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {elb_bin}: {e}"));
    let elb_pid = elb.id();
    procs.0.push(elb);
    let elb_addr: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    wait("elb loaded", Duration::from_secs(20), || {
        Http::connect(elb_addr)
            .and_then(|mut c| c.request("GET", "rule.bench", "/", ""))
            .is_some_and(|(s, body)| s == 200 && body == "A")
    });

    let mut poll = Poller::new(elb_addr);
    let mut samples: Vec<(&str, Duration)> = Vec::with_capacity(updates);
    let mut rule_on_b = false;
    let mut peer_down = false;
    for i in 0..updates {
        let (kind, host, key, value, want): (&str, String, String, String, Want) = match i % 3 {
            0 => {
                rule_on_b = !rule_on_b;
                let (up, name) = if rule_on_b { ("ub", "B") } else { ("ua", "A") };
                (
                    "rule",
                    "rule.bench".into(),
                    format!("/{NAME}/rules/rule.bench"),
                    rules(up),
                    Want::Body(name),
                )
            }
            1 => (
                "domain",
                format!("d{i}.bench"),
                format!("/{NAME}/rules/d{i}.bench"),
                rules("ua"),
                Want::Body("A"),
            ),
            _ => {
                peer_down = !peer_down;
                (
                    "peer",
                    "peer.bench".into(),
                    format!("/{NAME}/upstreams/uc/{a}"),
                    if peer_down {
                        "down".into()
                    } else {
                        String::new()
                    },
                    Want::Status(if peer_down { 502 } else { 200 }),
                )
            }
        };
        let acked = put(&mut etcd, &key, &value);
        let deadline = acked + Duration::from_secs(5);
        let done = loop {
            let (status, body) = poll.get(&host);
            let now = Instant::now();
            if want.matches(status, &body) {
                break now;
            }
            assert!(
                now < deadline,
                "update {i} ({kind} {key}) not seen within 5 s"
            );
        };
        samples.push((kind, done - acked));
    }

    println!(
        "propagation over {updates} updates (etcd put acknowledged -> first request routed by it), elb {workers} workers:"
    );
    report("all", samples.iter().map(|(_, d)| *d).collect());
    for kind in ["rule", "domain", "peer"] {
        report(
            kind,
            samples
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, d)| *d)
                .collect(),
        );
    }
    if let Some(secs) = under_load {
        live_change(&mut etcd, elb_addr, elb_pid, [&a, &b], secs, rate);
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What one `wrk` run says.
struct Load {
    rps: f64,
    requests: u64,
    failed: u64,
}

fn wrk(elb: SocketAddr, secs: u64) -> Child {
    Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "-H", "Host: load.bench"])
        .arg(format!("http://{elb}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wrk (apt-get install wrk)")
}

fn wrk_result(child: Child) -> Load {
    let out = child.wait_with_output().expect("wrk output");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
    };
    let rps = field("Requests/sec:").and_then(|v| v.trim().parse().ok());
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    let (Some(rps), Some(requests)) = (rps, requests) else {
        panic!("wrk said:\n{text}");
    };
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket: u64 = field("Socket errors:")
        .map(|v| {
            v.split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Load {
        rps,
        requests,
        failed: non_2xx + socket,
    }
}

/// `wrk` on load.bench for `secs` with no update, then again while `rate`
/// updates a second go through etcd.
fn live_change(
    etcd: &mut Http,
    elb: SocketAddr,
    master: u32,
    [a, b]: [&str; 2],
    secs: u64,
    rate: u32,
) {
    put(etcd, &format!("/{NAME}/upstreams/ul/{a}"), "");
    put(etcd, &format!("/{NAME}/upstreams/ul/{b}"), "");
    put(etcd, &format!("/{NAME}/rules/load.bench"), &rules("ul"));
    put(etcd, &format!("/{NAME}/rules/rule.bench"), &rules("ua"));
    put(etcd, &format!("/{NAME}/upstreams/uc/{a}"), "");
    let mut poll = Poller::new(elb);
    wait("load.bench routed", Duration::from_secs(5), || {
        poll.get("load.bench").0 == 200
    });
    let cpu0 = cpu_ticks(master);
    let quiet = wrk_result(wrk(elb, secs));
    let cpu1 = cpu_ticks(master);

    let mut child = wrk(elb, secs);
    let start = Instant::now();
    let (mut rule_on_b, mut peer_down) = (false, false);
    let mut samples = Vec::new();
    let mut puts = 0u64;
    while child.try_wait().expect("wrk").is_none() {
        let due = start + Duration::from_secs_f64(puts as f64 / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (host, key, value, want) = match puts % 4 {
            0 => {
                rule_on_b = !rule_on_b;
                let (up, name) = if rule_on_b { ("ub", "B") } else { ("ua", "A") };
                let key = format!("/{NAME}/rules/rule.bench");
                ("rule.bench", key, rules(up), Some(Want::Body(name)))
            }
            1 => {
                peer_down = !peer_down;
                let key = format!("/{NAME}/upstreams/uc/{a}");
                let value = if peer_down { "down" } else { "" }.to_string();
                let want = Want::Status(if peer_down { 502 } else { 200 });
                ("peer.bench", key, value, Some(want))
            }
            // The loaded domain's rule set, rewritten (an equivalent one
            // under another rule name), and its peers' weights changed.
            2 => {
                let key = format!("/{NAME}/rules/load.bench");
                let value = rules("ul").replace("\"b\"", &format!("\"b{}\"", puts % 8));
                ("load.bench", key, value, None)
            }
            _ => {
                let key = format!("/{NAME}/upstreams/ul/{a}");
                ("load.bench", key, format!("weight={}", 1 + puts % 3), None)
            }
        };
        let acked = put(etcd, &key, &value);
        puts += 1;
        let Some(want) = want else { continue };
        let deadline = acked + Duration::from_secs(5);
        let done = loop {
            let (status, body) = poll.get(host);
            let now = Instant::now();
            if want.matches(status, &body) {
                break now;
            }
            assert!(now < deadline, "{key} not seen within 5 s under load");
        };
        samples.push(done - acked);
    }
    let busy = wrk_result(child);
    let cpu2 = cpu_ticks(master);
    let took = start.elapsed().as_secs_f64();
    println!("live change under load (wrk -t2 -c64, {secs} s each, load.bench):");
    println!(
        "  no update:  {:>9.0} req/s  {} requests, {} failed",
        quiet.rps, quiet.requests, quiet.failed
    );
    println!(
        "  {} updates ({:.0}/s): {:>9.0} req/s  {} requests, {} failed  ({:.3} of the run without)",
        puts,
        puts as f64 / took,
        busy.rps,
        busy.requests,
        busy.failed,
        busy.rps / quiet.rps
    );
    // etcd, this program's puts and polls, and wrk share the machine with
    // elb: the CPU elb itself spent per request says what the updates cost
    // it, apart from what they cost the others.
    let per_request = |(m0, w0): (u64, u64), (m1, w1): (u64, u64), requests: u64| {
        let us = |t: u64| t as f64 * 1e6 / USER_HZ / requests as f64;
        (us(w1 - w0), us(m1 - m0))
    };
    let (qw, qm) = per_request(cpu0, cpu1, quiet.requests);
    let (bw, bm) = per_request(cpu1, cpu2, busy.requests);
    println!(
        "  elb's own CPU per request: workers {qw:.2} µs without updates, {bw:.2} µs with ({:.3}); master {qm:.2} µs, {bm:.2} µs",
        bw / qw
    );
    report("under load", samples);
}

/// User + system clock ticks of the master and of its workers.
fn cpu_ticks(master: u32) -> (u64, u64) {
    let ticks = |pid: &str| -> Option<(u64, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(") ")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((t, ppid))
    };
    let mut workers = 0;
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        if let Some((t, ppid)) = ticks(&name.to_string_lossy())
            && ppid == master
        {
            workers += t;
        }
    }
    let own = ticks(&master.to_string()).map_or(0, |(t, _)| t);
    (own, workers)
}

/// Clock ticks per second of /proc's times (USER_HZ: 100 on Linux,
/// whatever the kernel's own tick rate).
const USER_HZ: f64 = 100.0;

enum Want {
    Body(&'static str),
    Status(u16),
}

impl Want {
    fn matches(&self, status: u16, body: &str) -> bool {
        match self {
            Want::Body(b) => status == 200 && body == *b,
            Want::Status(s) => status == *s,
        }
    }
}

fn report(label: &str, mut d: Vec<Duration>) {
    if d.is_empty() {
        return;
    }
    d.sort();
    let pct = |p: f64| d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1];
    println!(
        "  {label:<7} n={:<4} p50 {:>8.3} ms   p99 {:>8.3} ms   max {:>8.3} ms",
        d.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        d[d.len() - 1].as_secs_f64() * 1e3
    );
}

fn rules(servername: &str) -> String {
    // One rule named "b"; live_change renames it to make an equivalent set.
    format!(
        r#"{{"init":"b","rules":{{"b":{{"type":"backend","args":{{"servername":"{servername}"}}}}}}}}"#
    )
}

/// Puts through etcd's JSON gateway; returns when the answer was read.
fn put(etcd: &mut Http, key: &str, value: &str) -> Instant {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        base64(key.as_bytes()),
        base64(value.as_bytes())
    );
    let (status, answer) = etcd
        .request("POST", "localhost", "/v3/kv/put", &body)
        .expect("etcd put");
    let acked = Instant::now();
    assert_eq!(status, 200, "etcd put {key}: {answer}");
    acked
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Requests to elb on a keep-alive connection (reconnecting when elb
/// closes it, as after some error answers).
struct Poller {
    addr: SocketAddr,
    conn: Option<Http>,
}

impl Poller {
    fn new(addr: SocketAddr) -> Poller {
        Poller { addr, conn: None }
    }

    fn get(&mut self, host: &str) -> (u16, String) {
        for _ in 0..3 {
            if self.conn.is_none() {
                self.conn = Http::connect(self.addr);
            }
            if let Some(c) = self.conn.as_mut()
                && let Some(r) = c.request("GET", host, "/", "")
            {
                if c.closed {
                    self.conn = None;
                }
                return r;
            }
            self.conn = None;
        }
        panic!("elb does not answer on {}", self.addr);
    }
}

/// A minimal HTTP/1.1 client connection (Content-Length or chunked bodies).
struct Http {
    r: BufReader<TcpStream>,
    w: TcpStream,
    closed: bool,
}

impl Http {
    fn connect(addr: SocketAddr) -> Option<Http> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_nodelay(true).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(Http {
            r: BufReader::new(s.try_clone().ok()?),
            w: s,
            closed: false,
        })
    }

    fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        body: &str,
    ) -> Option<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.w.write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        self.r.read_line(&mut line).ok()?;
        let status: u16 = line.split(' ').nth(1)?.parse().ok()?;
        let (mut len, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.r.read_line(&mut line).ok()?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':')?;
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => len = v.parse().ok()?,
                "transfer-encoding" => chunked = v.contains("chunked"),
                "connection" => self.closed = v.contains("close"),
                _ => {}
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.r.read_line(&mut line).ok()?;
                let n = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
                let mut chunk = vec![0; n + 2];
                self.r.read_exact(&mut chunk).ok()?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else {
            out.resize(len, 0);
            self.r.read_exact(&mut out).ok()?;
        }
        Some((status, String::from_utf8_lossy(&out).into_owned()))
    }
}

/// A keep-alive backend answering every request with its name.
fn backend(name: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut w = match s.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let mut r = BufReader::new(s);
                let mut line = String::new();
                loop {
                    let mut len = 0usize;
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.trim().eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn tmp_dir() -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("elb-propagation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children killed (by PID) and reaped on drop, even on a panic.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
