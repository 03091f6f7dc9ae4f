//! Probe load: the active check at 10,000 peers. 100 backends on loopback,
//! 100 upstreams each naming all of them (10,000 peers, each probed on its
//! own), `interval = 5`: the probes per second the backends see, and the CPU
//! the master and the workers spend meanwhile. Built and run by
//! `bench/probes` (`cargo bench --bench probes`), release build.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use common::backend::put_upstreams;
use common::health::HealthBackend;
use common::{Elb, TempDir, wait_until};

const BACKENDS: usize = 100;
const UPSTREAMS: usize = 100;
const INTERVAL: u64 = 5;
/// Measured after the first full interval, for this long.
const WINDOW: Duration = Duration::from_secs(20);

/// User + system CPU time of a process, from /proc (clock ticks of 10 ms).
fn cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("probes: measured by bench/probes only");
        return;
    }
    let backends: Vec<HealthBackend> = (0..BACKENDS)
        .map(|i| HealthBackend::start(&format!("b{i}")))
        .collect();
    let dir = TempDir::new("probes");
    let config = dir.write(
        "elb.toml",
        &format!("[healthcheck]\nenable = true\ninterval = {INTERVAL}\ntimeout = 3\ncheck_url = \"/health\"\n"),
    );
    let elb = Elb::builder()
        .workers(2)
        .arg("--config")
        .arg(config.to_str().expect("utf-8 path"))
        .start();
    let peers: Map<String, Value> = backends
        .iter()
        .map(|b| (b.host_port(), json!("")))
        .collect();
    for u in 0..UPSTREAMS {
        put_upstreams(
            elb.admin_addr(),
            &json!({ format!("up{u}"): peers.clone() }),
        );
    }
    let total = || backends.iter().map(HealthBackend::probes).sum::<usize>();
    let peers_n = BACKENDS * UPSTREAMS;
    // Every peer probed once: the schedule is running.
    assert!(
        wait_until(Duration::from_secs(INTERVAL * 4), || total() >= peers_n),
        "only {} probes for {peers_n} peers",
        total()
    );
    let workers = elb.workers();
    let (p0, m0) = (total(), cpu(elb.pid()));
    let w0: Duration = workers.iter().map(|&w| cpu(w)).sum();
    let t0 = Instant::now();
    std::thread::sleep(WINDOW);
    let secs = t0.elapsed().as_secs_f64();
    let probes = (total() - p0) as f64 / secs;
    let master = (cpu(elb.pid()) - m0).as_secs_f64() / secs * 100.0;
    let w: Duration = workers.iter().map(|&w| cpu(w)).sum();
    let workers_cpu = (w - w0).as_secs_f64() / secs * 100.0;
    println!(
        "probes: {peers_n} peers, interval {INTERVAL} s: {probes:.0} probes/s (expected {:.0}); master CPU {master:.1}% of one core, workers {workers_cpu:.1}%",
        peers_n as f64 / INTERVAL as f64
    );
}
