//! The scale data set, shared by the test that proves it is served
//! (tests/etcd_scale.rs) and the benchmark that times its load with the
//! release build (bench/scale.rs): 10,000 domains, each routed to an
//! upstream of its own with 3 peers (40,000 keys).
//!
//! Every upstream lists the same 3 backends, but `d{i}.test`'s upstream
//! `u{i}` has backend `i % 3` as its primary and the others as backups, so
//! the backend that answers shows that the domain's own upstream served it.

use std::time::{Duration, Instant};

use super::backend::{Backend, admin_get, to_backend};
use super::etcd::{Etcd, elb_on, served_by};
use super::{Elb, wait_until};

pub const DOMAINS: usize = 10_000;
pub const PEERS: usize = 3;
/// The `--name` the data set is written under.
pub const NAME: &str = "ELBSCALE";

/// How long a loaded debug build may take to serve the data set before the
/// test calls it not served at all (a quiet box needs well under 2 s).
pub const SERVE_DEADLINE: Duration = Duration::from_secs(120);

pub fn host(i: usize) -> String {
    format!("d{i}.test")
}

pub fn upstream(i: usize) -> String {
    format!("u{i}")
}

/// The name of the backend that serves `host(i)`.
pub fn primary(backends: &[Backend], i: usize) -> &str {
    backends[i % backends.len()].name()
}

/// `PEERS` echo backends, named `b0`, `b1`, ….
pub fn backends() -> Vec<Backend> {
    (0..PEERS)
        .map(|i| Backend::start(&format!("b{i}")))
        .collect()
}

/// Writes the data set to `etcd`; returns the number of keys.
pub fn write(etcd: &Etcd, backends: &[Backend]) -> usize {
    let mut items = Vec::with_capacity(DOMAINS * (backends.len() + 1));
    for i in 0..DOMAINS {
        items.push((
            format!("/{NAME}/rules/{}", host(i)),
            to_backend(&upstream(i)).to_string(),
        ));
        for (j, b) in backends.iter().enumerate() {
            let value = if j == i % backends.len() {
                "weight=2"
            } else {
                "backup"
            };
            items.push((
                format!("/{NAME}/upstreams/{}/{}", upstream(i), b.host_port()),
                value.to_string(),
            ));
        }
    }
    etcd.kv().put_many(&items);
    items.len()
}

/// Starts elb (2 workers, default region) on `etcd` holding the data set
/// and waits until it serves the last domain. Everything is published in
/// one generation, so the last domain served means all are. Returns how
/// long that took from elb's start (`None`: not within `deadline`), and elb.
pub fn start_elb(etcd: &Etcd, backends: &[Backend], deadline: Duration) -> (Option<Duration>, Elb) {
    let started = Instant::now();
    let elb = elb_on(&etcd.endpoints(), NAME).spawn();
    let last = DOMAINS - 1;
    let served = wait_until(deadline, || {
        served_by(elb.listen_addr(), &host(last)).as_deref() == Some(primary(backends, last))
    });
    (served.then(|| started.elapsed()), elb)
}

/// elb's own line about the load ("connected; loaded N keys … in T").
pub fn load_line(elb: &Elb) -> String {
    elb.stderr()
        .lines()
        .find(|l| l.contains("connected; loaded"))
        .unwrap_or_default()
        .to_string()
}

/// The number of domains and of upstreams elb's admin API lists.
pub fn counts(elb: &Elb) -> (Option<usize>, Option<usize>) {
    let len = |path| {
        admin_get(elb.admin_addr(), path)
            .as_object()
            .map(serde_json::Map::len)
    };
    (len("/__erulb__/domain"), len("/__erulb__/upstream"))
}
