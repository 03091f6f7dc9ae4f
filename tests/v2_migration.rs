//! Coming from the originals: both wrote etcd's v2 store (`etcdctl set`).
//! The documented move (docs/operations.md) is etcd 3.4's offline
//! `ETCDCTL_API=3 etcdctl migrate` on a stopped member's data directory;
//! this runs it end to end on Debian's etcd 3.4 and has ELB serve the keys.

mod common;

use std::process::Command;

use common::backend::{Backend, admin_get};
use common::etcd::{Etcd, elb_on, expect_served, rules_to};

fn etcdctl(api: &str, args: &[&str]) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", api)
        .args(args)
        .output()
        .expect("run etcdctl (etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn keys_set_through_the_v2_api_are_served_after_etcdctl_migrate() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let mut etcd = Etcd::new(1);
    etcd.set_extra_args(&["--enable-v2"]);
    etcd.start_all();
    let v2 = format!("http://{}", etcd.endpoint(0));
    // As Eru ELB and lua-resty-upstream-etcd wrote them.
    etcdctl(
        "2",
        &[
            "--endpoints",
            &v2,
            "set",
            "/ELBV2/rules/m.test",
            &rules_to("web"),
        ],
    );
    etcdctl(
        "2",
        &[
            "--endpoints",
            &v2,
            "set",
            &format!("/ELBV2/upstreams/web/{}", a.host_port()),
            "weight=2",
        ],
    );
    etcdctl(
        "2",
        &[
            "--endpoints",
            &v2,
            "set",
            &format!("/v1/elbv2/services/web/{}", b.host_port()),
            r#"{"weight":1}"#,
        ],
    );

    // The move: stop the member, migrate its data, start it with v3 only.
    etcd.stop(0);
    let data = etcd.data_dir(0);
    etcdctl("3", &["migrate", "--data-dir", &data.to_string_lossy()]);
    etcd.set_extra_args(&[]);
    etcd.start_member(0);

    let elb = elb_on(&etcd.endpoints(), "ELBV2")
        .args(["--services-prefix", "/v1/elbv2/services/"])
        .start();
    expect_served(&elb, "m.test", "a", common::EVENTUALLY);
    expect_served(&elb, "m.test", "b", common::EVENTUALLY);
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    let weights: std::collections::BTreeMap<String, serde_json::Value> = ups["web"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["weight"].clone(),
            )
        })
        .collect();
    let want = [
        (a.host_port(), serde_json::json!(2)),
        (b.host_port(), serde_json::json!(1)),
    ]
    .into_iter()
    .collect();
    assert_eq!(weights, want, "{ups}");
}
