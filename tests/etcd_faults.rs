//! SPEC 3, faults: etcd stopped, late, compacted, partly down, cut off
//! while written to, wiped. Through all of it elb serves the last known
//! configuration and ends up with every change applied.

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::backend::{Backend, admin_get};
use common::etcd::{Etcd, Kv, elb_on, expect_served, expect_status, rules_to, served_by};
use common::wait_until;

/// Only against waiting forever: how long it took is printed where it matters.
const APPLIED: Duration = common::EVENTUALLY;

/// Waits until elb's stderr holds `needle`.
fn wait_log(elb: &common::Elb, needle: &str, timeout: Duration) {
    assert!(
        wait_until(timeout, || elb.stderr().contains(needle)),
        "elb never logged {needle:?} within {timeout:?}; stderr:\n{}",
        elb.stderr()
    );
}

#[test]
fn etcd_stopped_then_restarted() {
    let mut etcd = Etcd::start();
    let a = Backend::start("a");
    let b = Backend::start("b");
    {
        let kv = etcd.kv();
        kv.put("/ELBT10/rules/a.test", &rules_to("ua"));
        kv.put(&format!("/ELBT10/upstreams/ua/{}", a.host_port()), "");
    }
    let elb = elb_on(&etcd.endpoints(), "ELBT10").start();
    expect_served(&elb, "a.test", "a", APPLIED);
    etcd.stop(0);
    wait_log(&elb, "serving the last known configuration", APPLIED);
    // Routing is unchanged while etcd is away (the client retries meanwhile).
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(
            served_by(elb.listen_addr(), "a.test").as_deref(),
            Some("a"),
            "stderr:\n{}",
            elb.stderr()
        );
    }
    // A dump now is refused, naming etcd.
    let d = common::backend::admin(elb.admin_addr(), "PUT", "/__erulb__/dump", None);
    assert_eq!(d.status, 503, "{}", d.text);
    assert!(
        d.json["error"].as_str().is_some_and(|e| e.contains("etcd")),
        "{}",
        d.text
    );

    etcd.start_member(0);
    let kv = etcd.kv();
    kv.put(&format!("/ELBT10/upstreams/ub/{}", b.host_port()), "");
    kv.put("/ELBT10/rules/b.test", &rules_to("ub"));
    let took = expect_served(&elb, "b.test", "b", APPLIED);
    eprintln!("a put after etcd's restart was applied {took:?} after its acknowledgement");
    wait_log(&elb, "reachable again", APPLIED);
    // Each change of state is logged once, not once per retry.
    let err = elb.stderr();
    assert_eq!(
        err.matches("serving the last known configuration").count(),
        1,
        "{err}"
    );
}

#[test]
fn elb_started_with_etcd_down_loads_once_it_answers() {
    let mut etcd = Etcd::start();
    let a = Backend::start("a");
    {
        let kv = etcd.kv();
        kv.put("/ELBT11/rules/a.test", &rules_to("ua"));
        kv.put(&format!("/ELBT11/upstreams/ua/{}", a.host_port()), "");
    }
    etcd.stop(0);
    let elb = elb_on(&etcd.endpoints(), "ELBT11").start();
    // Up without etcd: the admin API works and what it sets is served.
    common::backend::put_domains(
        elb.admin_addr(),
        &serde_json::json!({"admin.test": common::backend::to_backend(&a.host_port())}),
    );
    expect_served(&elb, "admin.test", "a", APPLIED);
    expect_status(&elb, "a.test", 404, APPLIED);

    etcd.start_member(0);
    let ready = Instant::now();
    expect_served(&elb, "a.test", "a", APPLIED);
    eprintln!("loaded {:?} after etcd became healthy", ready.elapsed());
    // What the admin API set stays (etcd had no such key).
    expect_served(&elb, "admin.test", "a", APPLIED);
}

#[test]
fn compaction_behind_the_watch_is_recovered() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    kv.put("/ELBT12/rules/a.test", &rules_to("ua"));
    kv.put("/ELBT12/rules/gone.test", &rules_to("ua"));
    kv.put(&format!("/ELBT12/upstreams/ua/{}", a.host_port()), "");
    let elb = elb_on(&etcd.endpoints(), "ELBT12").start();
    expect_served(&elb, "a.test", "a", APPLIED);
    expect_served(&elb, "gone.test", "a", APPLIED);

    // Freeze the master (its workers keep serving), so that its watch falls
    // behind: enough watched writes to fill the stream's buffers, the real
    // changes, then a compaction past all of them.
    elb.signal(Signal::SIGSTOP);
    let filler = "x".repeat(16 << 10);
    // One revision each: the watch gets one response per revision.
    for i in 0..400 {
        kv.put(&format!("/ELBT12/rules/junk/{i}"), &filler);
    }
    kv.put(&format!("/ELBT12/upstreams/ub/{}", b.host_port()), "");
    kv.put("/ELBT12/rules/new.test", &rules_to("ub"));
    kv.put("/ELBT12/rules/a.test", &rules_to("ub"));
    kv.delete("/ELBT12/rules/gone.test");
    kv.delete_prefix("/ELBT12/rules/junk/");
    let rev = kv.put("/ELBT12/rules/last.test", &rules_to("ua"));
    kv.compact(rev);
    // Still the old state while the master is frozen.
    assert_eq!(served_by(elb.listen_addr(), "a.test").as_deref(), Some("a"));
    elb.signal(Signal::SIGCONT);

    expect_served(&elb, "new.test", "b", APPLIED);
    expect_served(&elb, "a.test", "b", APPLIED);
    expect_served(&elb, "last.test", "a", APPLIED);
    expect_status(&elb, "gone.test", 404, APPLIED);
    let domains = admin_get(elb.admin_addr(), "/__erulb__/domain");
    let names: Vec<&String> = domains
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(names, ["a.test", "last.test", "new.test"], "{domains}");
    let err = elb.stderr();
    eprintln!(
        "recovered through {}",
        if err.contains("history compacted") {
            "the compaction path"
        } else {
            "the watch (no compaction seen by it)"
        }
    );
}

#[test]
fn a_cluster_with_a_member_down_still_delivers() {
    let mut etcd = Etcd::cluster(3);
    let a = Backend::start("a");
    let b = Backend::start("b");
    {
        let kv = etcd.kv();
        kv.put("/ELBT13/rules/a.test", &rules_to("ua"));
        kv.put(&format!("/ELBT13/upstreams/ua/{}", a.host_port()), "");
        kv.put(&format!("/ELBT13/upstreams/ub/{}", b.host_port()), "");
    }
    let elb = elb_on(&etcd.endpoints(), "ELBT13").start();
    expect_served(&elb, "a.test", "a", APPLIED);
    for down in [0, 1] {
        etcd.stop(down);
        let up = (down + 2) % 3;
        let kv = Kv::connect(&etcd.endpoint(up));
        let host = format!("m{down}.test");
        kv.put(&format!("/ELBT13/rules/{host}"), &rules_to("ub"));
        let took = expect_served(&elb, &host, "b", APPLIED);
        eprintln!("member {down} down: applied in {took:?}");
        etcd.start_member(down);
    }
}

#[test]
fn writes_during_start_and_during_a_cut_watch_all_arrive() {
    const N: usize = 150;
    let mut etcd = Etcd::start();
    let a = Backend::start("a");
    etcd.kv()
        .put(&format!("/ELBT14/upstreams/ua/{}", a.host_port()), "");
    let endpoints = etcd.endpoints();
    // A writer that puts domain after domain, retrying while etcd is away.
    let writer = std::thread::spawn(move || {
        let kv = Kv::connect(&endpoints);
        for i in 0..N {
            kv.put(&format!("/ELBT14/rules/d{i}.test"), &rules_to("ua"));
            if i % 10 == 9 {
                kv.delete(&format!("/ELBT14/rules/d{}.test", i - 9));
            }
        }
    });
    let elb = elb_on(&etcd.endpoints(), "ELBT14").start();
    // Cut the watch mid-way: restart etcd while the writer goes on.
    assert!(wait_until(APPLIED, || elb.stderr().contains("connected")));
    etcd.restart_all();
    writer.join().expect("writer");
    let want: Vec<String> = (0..N)
        .filter(|i| i % 10 != 0)
        .map(|i| format!("d{i}.test"))
        .collect();
    let mut got = Vec::new();
    let ok = wait_until(APPLIED, || {
        let domains = admin_get(elb.admin_addr(), "/__erulb__/domain");
        got = domains
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        got.sort();
        let mut w = want.clone();
        w.sort();
        got == w
    });
    assert!(ok, "domains in elb: {got:?}; stderr:\n{}", elb.stderr());
    expect_served(&elb, &format!("d{}.test", N - 1), "a", APPLIED);
}

#[test]
fn etcd_wiped_and_restarted_with_new_data() {
    let mut etcd = Etcd::start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    {
        let kv = etcd.kv();
        // Push the revision up, so that the new etcd's is lower.
        for i in 0..30 {
            kv.put(&format!("/ELBT15/other/{i}"), "x");
        }
        kv.put("/ELBT15/rules/old.test", &rules_to("ua"));
        kv.put(&format!("/ELBT15/upstreams/ua/{}", a.host_port()), "");
    }
    let elb = elb_on(&etcd.endpoints(), "ELBT15").start();
    expect_served(&elb, "old.test", "a", APPLIED);
    etcd.wipe();
    let kv = etcd.kv();
    kv.put(&format!("/ELBT15/upstreams/ub/{}", b.host_port()), "");
    kv.put("/ELBT15/rules/new.test", &rules_to("ub"));
    expect_served(&elb, "new.test", "b", APPLIED);
    expect_status(&elb, "old.test", 404, APPLIED);
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    assert!(ups.get("ua").is_none() && ups.get("ub").is_some(), "{ups}");
}
