//! The Kubernetes source against the apiserver stand-in
//! (`tests/common/apiserver.rs`: real HTTPS with a per-test CA, a bearer
//! token, list and watch of EndpointSlices with bookmarks, 410 after a
//! compaction, outages), with real backends, and real etcd for the two
//! sources.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};

use common::apiserver::{ApiServer, TestCa, endpoint_slice};
use common::backend::{Backend, admin_get, put_domains, to_backend};
use common::etcd::{Etcd, served_by};
use common::{EVENTUALLY, Elb, TempDir, wait_until};

const TOKEN: &str = "elb-test-token";

/// An elb whose `[kubernetes]` table points at `api` with these files, plus
/// `extra` TOML, and `args`.
fn elb_with(
    dir: &TempDir,
    api: &ApiServer,
    token: &Path,
    ca: &Path,
    extra: &str,
    args: &[&str],
) -> Elb {
    let toml = format!(
        "[kubernetes]\napiserver = \"{}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\nnamespaces = [\"default\"]\nport_name = \"http\"\n{extra}",
        api.url(),
        token.display(),
        ca.display()
    );
    let config = dir.write("elb.toml", &toml);
    let mut b = Elb::builder()
        .workers(2)
        .arg("--config")
        .arg(config.to_string_lossy());
    if !args.is_empty() {
        b = b.no_default_etcd().args(args.iter().copied());
    }
    b.start()
}

/// Backends that answered `host` in 40 requests.
fn serving(elb: &Elb, host: &str) -> BTreeSet<String> {
    (0..40)
        .filter_map(|_| served_by(elb.listen_addr(), host))
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Waits until exactly `want` serve `host`; fails showing what did.
fn expect_serving(elb: &Elb, host: &str, want: &[&str]) {
    let want = names(want);
    let mut seen = BTreeSet::new();
    assert!(
        wait_until(EVENTUALLY, || {
            seen = serving(elb, host);
            seen == want
        }),
        "{host}: want {want:?}, served by {seen:?}; status {}; stderr:\n{}",
        admin_get(elb.admin_addr(), "/__erulb__/status")["kubernetes"],
        elb.stderr()
    );
}

fn kube_status(elb: &Elb) -> Value {
    admin_get(elb.admin_addr(), "/__erulb__/status")["kubernetes"].clone()
}

fn slice_for(name: &str, b: &Backend, ready: bool, terminating: bool) -> Value {
    endpoint_slice(
        name,
        "web",
        "http",
        b.port(),
        &[("127.0.0.1", ready, terminating)],
    )
}

#[test]
fn services_become_upstreams_and_follow_their_endpoints() {
    let api = ApiServer::start(TOKEN);
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    api.set_endpoint_slice("default", slice_for("web-a", &a, true, false));
    let elb = elb_with(&dir, &api, &token, &ca, "", &[]);
    put_domains(elb.admin_addr(), &json!({"k.test": to_backend("web")}));
    expect_serving(&elb, "k.test", &["a"]);
    let status = kube_status(&elb);
    assert_eq!(status["state"], "up", "{status}");
    assert_eq!(status["endpoint"], api.url());
    assert!(
        status["resourceVersion"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{status}"
    );

    // A not-ready endpoint is a peer, out.
    api.set_endpoint_slice("default", slice_for("web-b", &b, false, false));
    assert!(wait_until(EVENTUALLY, || {
        admin_get(elb.admin_addr(), "/__erulb__/upstream")["web"]
            .as_array()
            .is_some_and(|ps| ps.len() == 2)
    }));
    let ups = admin_get(elb.admin_addr(), "/__erulb__/upstream");
    let pb = ups["web"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["addr"] == b.host_port()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (pb["healthy"].clone(), pb["status"].clone()),
        (json!(false), json!("not ready")),
        "{ups}"
    );
    // lua-resty-upstream-etcd's defaults.
    assert_eq!(
        (pb["weight"].clone(), pb["check_url"].clone()),
        (json!(100), json!("/health")),
        "{ups}"
    );
    assert_eq!(serving(&elb, "k.test"), names(&["a"]));

    // Ready: it takes traffic; a's slice deleted: only b.
    api.set_endpoint_slice("default", slice_for("web-b", &b, true, false));
    expect_serving(&elb, "k.test", &["a", "b"]);
    api.delete_endpoint_slice("default", "web-a");
    expect_serving(&elb, "k.test", &["b"]);
    // Terminating: drained, no new request; with nothing else, 502.
    api.set_endpoint_slice("default", slice_for("web-b", &b, true, true));
    assert!(wait_until(EVENTUALLY, || served_by(
        elb.listen_addr(),
        "k.test"
    )
    .is_none()));
    // The last slice gone: the upstream goes.
    api.delete_endpoint_slice("default", "web-b");
    assert!(wait_until(EVENTUALLY, || {
        admin_get(elb.admin_addr(), "/__erulb__/upstream")
            .get("web")
            .is_none()
    }));
}

#[test]
fn a_compaction_relists_and_an_outage_keeps_the_last_peers() {
    let api = ApiServer::start(TOKEN);
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    api.set_endpoint_slice("default", slice_for("web-a", &a, true, false));
    let elb = elb_with(&dir, &api, &token, &ca, "", &[]);
    put_domains(elb.admin_addr(), &json!({"k.test": to_backend("web")}));
    expect_serving(&elb, "k.test", &["a"]);

    // 410 Gone: the watch is cut with an ERROR event; a change made
    // meanwhile comes with the relist, and nothing is lost.
    let lists = |api: &ApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.contains("/endpointslices") && !r.contains("watch="))
            .count()
    };
    let before = lists(&api);
    api.compact();
    api.set_endpoint_slice("default", slice_for("web-b", &b, true, false));
    expect_serving(&elb, "k.test", &["a", "b"]);
    assert!(
        lists(&api) > before,
        "no list after the 410: {:?}",
        api.requests()
    );

    // The apiserver goes away: routing stays as it was.
    api.set_down(true);
    assert!(wait_until(EVENTUALLY, || kube_status(&elb)["state"] == "down"));
    assert_eq!(serving(&elb, "k.test"), names(&["a", "b"]));
    assert!(kube_status(&elb)["last_error"].is_string());
    // A change made while it was down arrives when it is back.
    api.set_endpoint_slice("default", slice_for("web-c", &c, true, false));
    api.delete_endpoint_slice("default", "web-a");
    api.set_down(false);
    expect_serving(&elb, "k.test", &["b", "c"]);
    assert!(wait_until(EVENTUALLY, || kube_status(&elb)["state"] == "up"));
}

#[test]
fn another_ca_and_a_wrong_token_are_refused_and_shown() {
    let api = ApiServer::start(TOKEN);
    let dir = TempDir::new("k8s");
    let (token, _) = api.write_files(dir.path());
    let a = Backend::start("a");
    api.set_endpoint_slice("default", slice_for("web-a", &a, true, false));

    // A certificate from another CA: no connection, no peer.
    let other = dir.write("other-ca.crt", &TestCa::new("someone-else").pem());
    let elb = elb_with(&dir, &api, &token, &other, "", &[]);
    assert!(
        wait_until(EVENTUALLY, || kube_status(&elb)["state"] == "down"),
        "{}",
        kube_status(&elb)
    );
    let err = kube_status(&elb)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("tls") || err.contains("unknownissuer"),
        "{err}"
    );
    assert!(
        admin_get(elb.admin_addr(), "/__erulb__/upstream")
            .get("web")
            .is_none()
    );
    drop(elb);

    // The right CA, a wrong token: 401, said once in the log and in status.
    let dir2 = TempDir::new("k8s");
    let (_, ca) = api.write_files(dir2.path());
    let wrong = dir2.write("wrong-token", "not-the-token");
    let elb = elb_with(&dir2, &api, &wrong, &ca, "", &[]);
    assert!(
        wait_until(EVENTUALLY, || {
            kube_status(&elb)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("401"))
        }),
        "{}",
        kube_status(&elb)
    );
    assert!(
        elb.stderr().contains("401 Unauthorized"),
        "{}",
        elb.stderr()
    );
    assert!(
        admin_get(elb.admin_addr(), "/__erulb__/upstream")
            .get("web")
            .is_none()
    );
}

#[test]
fn two_sources_merge_or_fall_back() {
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let api = ApiServer::start(TOKEN);
    let (e1, k1) = (Backend::start("etcd-peer"), Backend::start("k8s-peer"));
    kv.put("/ELBK/rules/m.test", &to_backend("web").to_string());
    kv.put(&format!("/ELBK/upstreams/web/{}", e1.host_port()), "");
    api.set_endpoint_slice("default", slice_for("web-k", &k1, true, false));
    let endpoints = etcd.endpoints();
    let args = ["--etcd", endpoints.as_str(), "--name", "ELBK"];

    // merge = true (the default): both sources' peers together.
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let elb = elb_with(&dir, &api, &token, &ca, "", &args);
    expect_serving(&elb, "m.test", &["etcd-peer", "k8s-peer"]);
    drop(elb);

    // merge = false, first = etcd: etcd's while it has any, else
    // Kubernetes', switching live.
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let elb = elb_with(
        &dir,
        &api,
        &token,
        &ca,
        "[sources]\nmerge = false\nfirst = \"etcd\"\n",
        &args,
    );
    expect_serving(&elb, "m.test", &["etcd-peer"]);
    kv.delete(&format!("/ELBK/upstreams/web/{}", e1.host_port()));
    expect_serving(&elb, "m.test", &["k8s-peer"]);
    kv.put(&format!("/ELBK/upstreams/web/{}", e1.host_port()), "");
    expect_serving(&elb, "m.test", &["etcd-peer"]);
    drop(elb);

    // first = kubernetes.
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let elb = elb_with(
        &dir,
        &api,
        &token,
        &ca,
        "[sources]\nmerge = false\nfirst = \"kubernetes\"\n",
        &args,
    );
    expect_serving(&elb, "m.test", &["k8s-peer"]);
    api.delete_endpoint_slice("default", "web-k");
    expect_serving(&elb, "m.test", &["etcd-peer"]);
    // A dump writes etcd's peers only.
    api.set_endpoint_slice("default", slice_for("web-k", &k1, true, false));
    expect_serving(&elb, "m.test", &["k8s-peer"]);
    let d = common::backend::admin(elb.admin_addr(), "PUT", "/__erulb__/dump", None);
    assert_eq!(d.status, 200, "{}", d.text);
    let keys: Vec<String> = kv
        .get_prefix("/ELBK/upstreams/")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        vec![format!("/ELBK/upstreams/web/{}", e1.host_port())]
    );
}

#[test]
fn without_the_endpointslice_api_core_endpoints_are_watched() {
    let api = ApiServer::start(TOKEN);
    api.without_endpoint_slices();
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    api.set_endpoint_slice("default", slice_for("web-a", &a, true, false));
    let elb = elb_with(&dir, &api, &token, &ca, "", &[]);
    put_domains(elb.admin_addr(), &json!({"k.test": to_backend("web")}));
    expect_serving(&elb, "k.test", &["a"]);
    api.set_endpoint_slice("default", slice_for("web-b", &b, true, false));
    expect_serving(&elb, "k.test", &["a", "b"]);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("/api/v1/namespaces/default/endpoints")),
        "{:?}",
        api.requests()
    );
    assert!(elb.stderr().contains("watching core/v1 Endpoints"));
}

#[test]
fn a_forbidden_watch_is_shown_and_the_last_peers_stay() {
    let api = ApiServer::start(TOKEN);
    let dir = TempDir::new("k8s");
    let (token, ca) = api.write_files(dir.path());
    let a = Backend::start("a");
    api.set_endpoint_slice("default", slice_for("web-a", &a, true, false));
    let elb = elb_with(&dir, &api, &token, &ca, "", &[]);
    put_domains(elb.admin_addr(), &json!({"k.test": to_backend("web")}));
    expect_serving(&elb, "k.test", &["a"]);
    // RBAC taken away: the next list is refused with 403. Cutting the
    // watch (a compaction) makes the source list again.
    api.set_forbidden(true);
    api.compact();
    assert!(
        wait_until(EVENTUALLY, || {
            kube_status(&elb)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("403"))
        }),
        "{}",
        kube_status(&elb)
    );
    assert!(elb.stderr().contains("403 Forbidden"), "{}", elb.stderr());
    assert_eq!(serving(&elb, "k.test"), names(&["a"]));
    api.set_forbidden(false);
    assert!(wait_until(EVENTUALLY, || kube_status(&elb)["state"] == "up"));
}
