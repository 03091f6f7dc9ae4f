//! Scale: how long the release build takes from its start to serving the
//! 10,000 domains and 10,000 upstreams (40,000 keys) of tests/etcd_scale.rs,
//! loaded from etcd (goal: under 2 s). Built and run by `bench/scale`
//! (`cargo bench --bench scale`): it shares the data set, the etcd and the
//! elb harness with the tests (tests/common/).
//!
//! One etcd holds the data set; elb is started on it `--runs` times (3 by
//! default), each time a fresh master with 2 workers and the default region,
//! and timed from its start until the last domain is served by its own
//! upstream.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::scale::{self, DOMAINS, PEERS};

const GOAL: Duration = Duration::from_secs(2);
/// A run that has not served within this is reported as failed.
const DEADLINE: Duration = Duration::from_secs(60);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // Under `cargo test` (which passes the test harness's flags): a
        // debug build, timed for nothing.
        println!("scale: measured by bench/scale only");
        return;
    }
    let mut args = std::env::args().skip(1);
    let mut runs = 3usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--runs N (N > 0)")
            }
            other => {
                eprintln!("usage: bench/scale [--runs N] (not {other})");
                std::process::exit(2);
            }
        }
    }
    let etcd = Etcd::start();
    let backends = scale::backends();
    let t = Instant::now();
    let keys = scale::write(&etcd, &backends);
    println!(
        "scale: {keys} keys ({DOMAINS} domains, {DOMAINS} upstreams x {PEERS} peers) written to etcd in {:.0?}; elb {}",
        t.elapsed(),
        common::ELB
    );
    let mut times = Vec::with_capacity(runs);
    for run in 1..=runs {
        let (took, elb) = scale::start_elb(&etcd, &backends, DEADLINE);
        let line = scale::load_line(&elb);
        // elb's own figures: etcd read and store build, without the start.
        let loaded = line.split_once("connected; ").map_or("?", |(_, l)| l);
        let Some(took) = took else {
            println!(
                "  run {run}: not served within {DEADLINE:?}; elb stderr:\n{}",
                elb.stderr()
            );
            std::process::exit(1);
        };
        let counts = scale::counts(&elb);
        if counts != (Some(DOMAINS), Some(DOMAINS)) {
            println!(
                "  run {run}: admin API lists {counts:?} domains and upstreams, want {DOMAINS} each"
            );
            std::process::exit(1);
        }
        println!("  run {run}: served {took:.3?} after elb's start ({loaded})");
        times.push(took);
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "scale: median {median:.3?}, best {:.3?}, worst {:.3?} over {runs} runs: goal {GOAL:?} {}",
        times[0],
        times[times.len() - 1],
        if median < GOAL { "met" } else { "MISSED" }
    );
}
