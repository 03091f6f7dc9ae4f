//! Scale: 10,000 domains, each with an upstream of 3 peers of its own
//! (40,000 keys), are loaded from etcd and every domain is routed to its
//! own upstream. How fast is bench/scale's business (goal: under 2 s with
//! the release build); here it is only printed.

mod common;

use std::time::{Duration, Instant};

use common::backend::{admin_get, json_contains, to_backend};
use common::etcd::{Etcd, expect_served};
use common::scale::{self, DOMAINS, PEERS, SERVE_DEADLINE};

#[test]
fn ten_thousand_domains_and_upstreams_from_etcd_are_all_served() {
    let etcd = Etcd::start();
    let backends = scale::backends();
    let t = Instant::now();
    let keys = scale::write(&etcd, &backends);
    eprintln!("{keys} keys written to etcd in {:.0?}", t.elapsed());

    let (took, elb) = scale::start_elb(&etcd, &backends, SERVE_DEADLINE);
    let Some(took) = took else {
        panic!(
            "d{}.test not served within {SERVE_DEADLINE:?}; stderr:\n{}",
            DOMAINS - 1,
            elb.stderr()
        );
    };
    eprintln!(
        "{DOMAINS} domains + {DOMAINS} upstreams x {PEERS} peers: served {took:.2?} after elb's start (debug build, default 64m region); {}",
        scale::load_line(&elb)
    );

    assert_eq!(
        scale::counts(&elb),
        (Some(DOMAINS), Some(DOMAINS)),
        "domains and upstreams listed by the admin API"
    );
    let domains = admin_get(elb.admin_addr(), "/__erulb__/domain");
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    // Every 97th domain, the first and the last: each is routed by its own
    // rule set to its own upstream, whose primary answers.
    let sample = (0..DOMAINS).step_by(97).chain([DOMAINS - 1]);
    for i in sample {
        let (host, up) = (scale::host(i), scale::upstream(i));
        assert!(
            json_contains(&domains[&host], &to_backend(&up)),
            "{host}'s rule set: {}",
            domains[&host]
        );
        let peers = ups[&up].as_array().map(Vec::as_slice).unwrap_or_default();
        assert_eq!(peers.len(), PEERS, "{up}'s peers: {}", ups[&up]);
        let primaries: Vec<&serde_json::Value> = peers
            .iter()
            .filter(|p| p["backup"] != serde_json::Value::Bool(true))
            .collect();
        assert_eq!(
            primaries.len(),
            1,
            "{up} has one primary and backups: {}",
            ups[&up]
        );
        let primary = scale::primary(&backends, i);
        expect_served(&elb, &host, primary, Duration::from_secs(30));
    }
}
