//! Chaos under load: steady requests from client threads while, at random
//! (the seed is printed; `CHAOS_SEED=N` replays it), a worker is
//! SIGKILLed, a peer is stopped and started again, etcd is compacted,
//! stopped and started again, the admin API takes changes, and 50 changes a
//! second go through etcd. Every failed request is accounted for: the only
//! ones allowed are those on a connection of a worker that was just killed
//! (in flight, or sent on its connection before the client saw it die),
//! and an answer cut short because its peer was stopped after the answer
//! had begun (which no proxy can retry). A peer stopped before answering,
//! a lost etcd and every change must cost no request.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use common::backend::{Backend, admin};
use common::etcd::{Etcd, elb_on, rules_to};
use common::{EVENTUALLY, HTTP_TIMEOUT, HttpConn, wait_until};

const CHAOS: Duration = Duration::from_secs(40);
const CLIENTS: usize = 4;
/// A failure this soon after a worker was killed is one of its requests.
const KILL_WINDOW: Duration = Duration::from_secs(1);
/// An i/o failure this soon after a peer stopped is an answer it cut short.
const PEER_WINDOW: Duration = Duration::from_millis(500);

/// xorshift64*: enough randomness to pick actions, replayable by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One failed request: when, and what the client saw.
#[derive(Debug, Clone)]
struct Failure {
    at: Instant,
    what: String,
}

/// Requests for `host` on keep-alive connections until `stop`, counting
/// successes and keeping every failure.
fn client(
    addr: SocketAddr,
    host: &str,
    stop: &AtomicBool,
    ok: &AtomicU64,
    failures: &Mutex<Vec<Failure>>,
) {
    let mut conn: Option<HttpConn> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.take() {
            Some(c) => c,
            None => match HttpConn::connect(addr, HTTP_TIMEOUT) {
                Ok(c) => c,
                Err(e) => {
                    record(failures, format!("connect: {e}"));
                    continue;
                }
            },
        };
        let mut c = c;
        match c.request("GET", host, "/", &[], b"") {
            Ok(r) if r.status == 200 => {
                ok.fetch_add(1, Ordering::Relaxed);
                conn = Some(c);
            }
            Ok(r) => record(failures, format!("status {}: {}", r.status, r.body_text())),
            Err(e) => record(failures, format!("i/o: {e}")),
        }
    }
}

fn record(failures: &Mutex<Vec<Failure>>, what: String) {
    failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Failure {
            at: Instant::now(),
            what,
        });
}

#[test]
fn requests_survive_killed_workers_stopped_peers_and_a_flapping_etcd() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("chaos seed: {seed} (CHAOS_SEED={seed} replays it)");
    let mut rng = Rng(seed);

    let mut etcd = Etcd::start();
    let kv = etcd.kv();
    // Three peers; at most one is stopped at a time.
    let mut peers: Vec<(String, SocketAddr, Option<Backend>)> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let b = Backend::start(n);
            (n.to_string(), b.addr(), Some(b))
        })
        .collect();
    kv.put("/ELBC/rules/chaos.test", &rules_to("web"));
    for (_, addr, _) in &peers {
        kv.put(&format!("/ELBC/upstreams/web/{addr}"), "max_fails=0");
    }
    let elb = elb_on(&etcd.endpoints(), "ELBC").start();
    assert!(wait_until(EVENTUALLY, || {
        common::etcd::served_by(elb.listen_addr(), "chaos.test").is_some()
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let etcd_up = Arc::new(AtomicBool::new(true));
    let mut threads = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let addr = elb.listen_addr();
        threads.push(std::thread::spawn(move || {
            client(addr, "chaos.test", &stop, &ok, &failures)
        }));
    }
    // 50 changes a second through etcd (while it is up), to other names.
    {
        let (stop, etcd_up) = (stop.clone(), etcd_up.clone());
        let endpoints = etcd.endpoints();
        threads.push(std::thread::spawn(move || {
            let kv = common::etcd::Kv::connect(&endpoints);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if etcd_up.load(Ordering::Relaxed) {
                    kv.put(
                        &format!("/ELBC/rules/churn-{}.test", i % 20),
                        &rules_to("web"),
                    );
                    kv.put(
                        &format!("/ELBC/upstreams/churn/127.0.0.1:{}", 20_000 + i % 10),
                        &format!("weight={}", 1 + i % 5),
                    );
                    i += 1;
                }
                std::thread::sleep(Duration::from_millis(40));
            }
        }));
    }
    // The admin API takes changes too.
    {
        let stop = stop.clone();
        let admin_addr = elb.admin_addr();
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({format!("admin-{}.test", i % 10): {"init": "b", "rules": {
                    "b": {"type": "backend", "args": {"servername": "web"}}}}});
                let r = admin(admin_addr, "PUT", "/__erulb__/domain", Some(&body));
                assert_eq!(r.status, 200, "{}", r.text);
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    let mut kills: Vec<Instant> = Vec::new();
    let mut peer_stops: Vec<Instant> = Vec::new();
    let mut etcd_flaps = 0;
    let start = Instant::now();
    while start.elapsed() < CHAOS {
        std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
        match rng.below(3) {
            0 => {
                let workers = elb.workers();
                if workers.len() == 2 {
                    let victim = workers[rng.below(2) as usize];
                    kills.push(Instant::now());
                    common::signal(victim, nix::sys::signal::Signal::SIGKILL);
                }
            }
            1 => {
                let i = rng.below(3) as usize;
                let (name, addr, backend) = &mut peers[i];
                peer_stops.push(Instant::now());
                drop(backend.take());
                std::thread::sleep(Duration::from_millis(200 + rng.below(600)));
                *backend = Some(Backend::start_at(name, *addr));
            }
            _ => {
                let rev = kv.revision();
                kv.compact(rev);
                etcd_up.store(false, Ordering::Relaxed);
                etcd.stop(0);
                std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
                etcd.start_member(0);
                etcd_up.store(true, Ordering::Relaxed);
                etcd_flaps += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a load thread panicked");
    }

    let failures = failures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let after = |events: &[Instant], f: &Failure, window: Duration| {
        f.what.starts_with("i/o")
            && events
                .iter()
                .any(|e| f.at >= *e && f.at.duration_since(*e) <= window)
    };
    let (on_killed, rest): (Vec<&Failure>, Vec<&Failure>) =
        failures.iter().partition(|f| after(&kills, f, KILL_WINDOW));
    let (cut_short, unexplained): (Vec<&Failure>, Vec<&Failure>) = rest
        .into_iter()
        .partition(|f| after(&peer_stops, f, PEER_WINDOW));
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "chaos: {ok} requests answered 200; {} workers killed, {} peer stops, {etcd_flaps} etcd stops; {} failed on a killed worker's connections, {} cut short by a stopped peer, {} unexplained",
        kills.len(),
        peer_stops.len(),
        on_killed.len(),
        cut_short.len(),
        unexplained.len()
    );
    assert!(ok > 1000, "too little load to mean anything: {ok}");
    assert!(
        unexplained.is_empty(),
        "failures not explained by a killed worker (seed {seed}): {unexplained:#?}"
    );
    // Afterwards: every worker up, routing as configured.
    assert!(wait_until(EVENTUALLY, || elb.workers().len() == 2));
    assert!(wait_until(EVENTUALLY, || {
        common::etcd::served_by(elb.listen_addr(), "chaos.test").is_some()
    }));
}
