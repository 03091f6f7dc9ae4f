//! `GET /__erulb__/status`: version, uptime, each worker's counts, the
//! configuration's generation and room, and etcd's state.

mod common;

use serde_json::{Value, json};

use common::backend::{Backend, admin_get, get, put_domains, put_upstreams, to_backend};
use common::etcd::{Etcd, elb_on, rules_to};
use common::{EVENTUALLY, Elb, HTTP_TIMEOUT, HttpConn, free_addr, run_elb, wait_until};

fn status(elb: &Elb) -> Value {
    admin_get(elb.admin_addr(), "/__erulb__/status")
}

fn total(s: &Value, field: &str) -> u64 {
    s["workers"]
        .as_array()
        .map_or(0, |ws| ws.iter().filter_map(|w| w[field].as_u64()).sum())
}

#[test]
fn status_counts_each_workers_requests_and_connections_exactly() {
    let elb = Elb::builder().workers(2).start();
    let backend = Backend::start("a");
    put_upstreams(elb.admin_addr(), &json!({"web": {backend.host_port(): ""}}));
    put_domains(elb.admin_addr(), &json!({"status.test": to_backend("web")}));

    let s = status(&elb);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "{s}");
    assert!(s["uptime"].as_f64().is_some_and(|u| u >= 0.0), "{s}");
    let mut pids: Vec<u64> = s["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["pid"].as_u64()).collect())
        .unwrap_or_default();
    pids.sort_unstable();
    let mut want: Vec<u64> = elb.workers().iter().map(|&p| p as u64).collect();
    want.sort_unstable();
    assert_eq!(pids, want, "{s}");
    for w in s["workers"].as_array().into_iter().flatten() {
        assert_eq!(w["restarts"], 0, "{s}");
        assert!(
            w["started"].as_u64().is_some_and(|t| t > 1_700_000_000),
            "{s}"
        );
    }
    assert!(s["generation"].as_u64().is_some_and(|g| g >= 1), "{s}");
    let region = &s["region"];
    let (used, free, size) = (
        region["used"].as_u64().unwrap_or(0),
        region["free"].as_u64().unwrap_or(0),
        region["size"].as_u64().unwrap_or(0),
    );
    assert!(used > 0 && free > 0 && used + free < size, "{s}");

    // A known number of requests, each on its own connection.
    let before = total(&s, "requests");
    for _ in 0..25 {
        assert_eq!(get(elb.listen_addr(), "status.test", "/", &[]).status, 200);
    }
    assert!(
        wait_until(EVENTUALLY, || total(&status(&elb), "requests")
            == before + 25),
        "requests: {} then {}",
        before,
        total(&status(&elb), "requests")
    );

    // Connections held open show as active, and go when closed.
    let conns: Vec<HttpConn> = (0..3)
        .map(|_| HttpConn::connect(elb.listen_addr(), HTTP_TIMEOUT).expect("connect"))
        .collect();
    assert!(
        wait_until(EVENTUALLY, || total(&status(&elb), "active_connections")
            == 3),
        "{}",
        status(&elb)
    );
    drop(conns);
    assert!(wait_until(EVENTUALLY, || {
        total(&status(&elb), "active_connections") == 0
    }));

    // A generation per change.
    let g = status(&elb)["generation"].as_u64().unwrap_or(0);
    put_domains(elb.admin_addr(), &json!({"other.test": to_backend("web")}));
    assert!(status(&elb)["generation"].as_u64().unwrap_or(0) > g);

    // etcd is nowhere: down, with why.
    assert!(
        wait_until(EVENTUALLY, || status(&elb)["etcd"]["state"] == "down"),
        "{}",
        status(&elb)
    );
    assert!(status(&elb)["etcd"]["last_error"].is_string());
}

#[test]
fn status_shows_etcd_up_at_its_revision_and_a_restarted_worker() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let backend = Backend::start("a");
    kv.put("/ELBS/rules/s.test", &rules_to("s"));
    let rev = kv.put(&format!("/ELBS/upstreams/s/{}", backend.host_port()), "");
    let elb = elb_on(&etcd.endpoints(), "ELBS").start();
    assert!(
        wait_until(EVENTUALLY, || {
            let s = status(&elb);
            s["etcd"]["state"] == "up" && s["etcd"]["revision"].as_i64() >= Some(rev)
        }),
        "{}",
        status(&elb)
    );
    assert_eq!(status(&elb)["etcd"]["endpoint"], etcd.endpoints().as_str());

    let victim = elb.workers()[0];
    common::signal(victim, nix::sys::signal::Signal::SIGKILL);
    assert!(
        wait_until(EVENTUALLY, || {
            status(&elb)["workers"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["restarts"] == 1))
        }),
        "{}",
        status(&elb)
    );
}

/// `elb --probe` with `env`: its exit code and what it said on stderr.
fn probe(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let f = run_elb(&["--probe"], env, EVENTUALLY);
    (f.code(), f.stderr)
}

#[test]
fn probe_exits_0_while_the_admin_api_answers_and_1_when_it_does_not() {
    let elb = Elb::builder()
        .env("ELB_ADMIN_ALLOW", "10.0.0.0/8")
        .env("ELB_ADMIN_TOKEN", "secret")
        .start();
    let admin = elb.admin_addr().to_string();
    // The container's health check: the same settings as the instance.
    let (code, err) = probe(&[("ELB_ADMIN", &admin), ("ELB_ADMIN_TOKEN", "secret")]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(err.is_empty(), "stderr: {err}");
    // An admin API bound to every address is asked on loopback.
    let all = format!("0.0.0.0:{}", elb.admin_addr().port());
    let (code, err) = probe(&[("ELB_ADMIN", &all), ("ELB_ADMIN_TOKEN", "secret")]);
    assert_eq!(code, Some(0), "stderr: {err}");
    // Refused (403 without the token) is not up.
    let (code, err) = probe(&[("ELB_ADMIN", &admin)]);
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.contains("answered 'HTTP/1.1 403"), "stderr: {err}");
    // Nothing listening is not up either, and says where it asked.
    let nobody = free_addr().to_string();
    let (code, err) = probe(&[("ELB_ADMIN", &nobody)]);
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(
        err.contains(&format!("elb: probe: admin API at {nobody}")),
        "stderr: {err}"
    );
}
