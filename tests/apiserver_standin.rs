//! The Kubernetes apiserver stand-in (`common::apiserver`) against a real
//! client: `kubectl` lists and watches EndpointSlices over TLS with a bearer
//! token, and fails as against a real apiserver when the token or the CA is
//! wrong. The stand-in's own HTTPS client checks the raw watch protocol
//! (410 after compaction, bookmarks, timeouts).
//!
//! Needs `kubectl` on the PATH (Debian's `kubernetes-client` package), or the
//! path of one in `KUBECTL`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::apiserver::{ApiServer, TestCa, endpoint_slice, kubeconfig_yaml, watch_events};
use common::{Capture, TempDir, wait_until};
use serde_json::Value;

const TOKEN: &str = "standin-token-1234";

/// How long one kubectl run may take before the test calls it hung.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(20);

/// How long to wait for something a watch must see.
const SOON: Duration = Duration::from_secs(15);

fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
}

/// kubectl with a kubeconfig and a discovery cache of its own.
struct Kubectl {
    dir: TempDir,
    config: PathBuf,
}

struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// A kubectl still running; killed (by PID) and reaped on drop.
struct Running {
    child: Child,
    out: Capture,
    err: Capture,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kubectl {
    fn new(kubeconfig: &str) -> Kubectl {
        let dir = TempDir::new("kubectl");
        let config = dir.write("kubeconfig", kubeconfig);
        Kubectl { dir, config }
    }

    fn for_server(api: &ApiServer, token: &str) -> Kubectl {
        Kubectl::new(&api.kubeconfig(token))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_bin());
        cmd.arg("--kubeconfig")
            .arg(&self.config)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .arg("--request-timeout=10s")
            .args(args)
            .env_remove("KUBECONFIG")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        common::dies_with_the_test(&mut cmd);
        cmd
    }

    fn spawn(&self, args: &[&str]) -> Running {
        let mut child = self.command(args).spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install Debian's kubernetes-client package, or set KUBECTL)",
                kubectl_bin()
            )
        });
        let out = Capture::start(child.stdout.take().expect("stdout"));
        let err = Capture::start(child.stderr.take().expect("stderr"));
        Running { child, out, err }
    }

    fn run(&self, args: &[&str]) -> Ran {
        let started = Instant::now();
        let mut running = self.spawn(args);
        let mut status = None;
        wait_until(KUBECTL_TIMEOUT, || {
            status = running.child.try_wait().ok().flatten();
            status.is_some()
        });
        let Some(status) = status else {
            panic!(
                "kubectl {args:?} still running after {KUBECTL_TIMEOUT:?}; stderr:\n{}",
                running.err.text()
            );
        };
        running.out.wait_eof(Duration::from_secs(5));
        running.err.wait_eof(Duration::from_secs(5));
        println!("kubectl {args:?}: {status} in {:?}", started.elapsed());
        Ran {
            status,
            stdout: running.out.text(),
            stderr: running.err.text(),
        }
    }

    /// Runs kubectl, which must succeed, and parses its JSON output.
    fn json(&self, args: &[&str]) -> Value {
        let r = self.run(args);
        assert!(
            r.status.success(),
            "kubectl {args:?} failed: {}\nstderr:\n{}",
            r.status,
            r.stderr
        );
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("kubectl {args:?} printed no JSON ({e}):\n{}", r.stdout))
    }
}

/// (name, addresses) of each item of a list, in order.
fn names_and_addresses(list: &Value) -> Vec<(String, Vec<String>)> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let addrs = item["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .map(|a| a.as_str().unwrap_or_default().to_string())
                .collect();
            (
                item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                addrs,
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    v.iter()
        .map(|(n, a)| (n.to_string(), a.iter().map(|s| s.to_string()).collect()))
        .collect()
}

fn seed(api: &ApiServer) {
    api.set_endpoint_slice(
        "default",
        endpoint_slice(
            "web-abc",
            "web",
            "http",
            8080,
            &[("10.0.0.1", true, false), ("10.0.0.2", false, false)],
        ),
    );
    api.set_endpoint_slice(
        "default",
        endpoint_slice("api-xyz", "api", "grpc", 9090, &[("10.0.1.1", true, false)]),
    );
    api.set_endpoint_slice(
        "other",
        endpoint_slice(
            "web-other",
            "web",
            "http",
            8080,
            &[("10.9.0.1", true, false)],
        ),
    );
}

#[test]
fn kubectl_lists_endpoint_slices() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let k = Kubectl::for_server(&api, TOKEN);

    let list = k.json(&["get", "endpointslices", "-n", "default", "-o", "json"]);
    assert_eq!(
        names_and_addresses(&list),
        pairs(&[
            ("api-xyz", &["10.0.1.1"]),
            ("web-abc", &["10.0.0.1", "10.0.0.2"])
        ]),
        "{list:#}"
    );
    let web = &list["items"][1];
    assert_eq!(web["kind"], "EndpointSlice");
    assert_eq!(web["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(web["metadata"]["namespace"], "default");
    assert_eq!(
        web["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(web["ports"][0]["port"], 8080);
    assert_eq!(web["endpoints"][1]["conditions"]["ready"], false);

    // All namespaces, a label selector, and pages of one item (continue).
    let all = k.json(&["get", "endpointslices", "-A", "-o", "json"]);
    assert_eq!(names_and_addresses(&all).len(), 3, "{all:#}");
    let selected = k.json(&[
        "get",
        "endpointslices",
        "-A",
        "-l",
        "kubernetes.io/service-name=web",
        "-o",
        "json",
    ]);
    assert_eq!(
        names_and_addresses(&selected),
        pairs(&[
            ("web-abc", &["10.0.0.1", "10.0.0.2"]),
            ("web-other", &["10.9.0.1"])
        ]),
    );
    let paged = k.json(&[
        "get",
        "endpointslices",
        "-A",
        "--chunk-size=1",
        "-o",
        "json",
    ]);
    assert_eq!(names_and_addresses(&paged), names_and_addresses(&all));

    // One named slice, and one that is not there.
    let one = k.json(&[
        "get",
        "endpointslice",
        "api-xyz",
        "-n",
        "default",
        "-o",
        "json",
    ]);
    assert_eq!(one["metadata"]["name"], "api-xyz");
    let missing = k.run(&["get", "endpointslice", "nope", "-n", "default"]);
    assert!(!missing.status.success());
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);

    let requests = api.requests();
    println!("requests: {requests:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r
                .starts_with("GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("continue=")),
        "{requests:#?}"
    );
}

#[test]
fn kubectl_watch_sees_a_slice_added_later() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let k = Kubectl::for_server(&api, TOKEN);

    let watch = k.spawn(&[
        "get",
        "endpointslices",
        "-n",
        "default",
        "--watch",
        "-o",
        "json",
    ]);
    // kubectl lists (printing what exists), then opens its watch.
    assert!(
        wait_until(SOON, || api.open_watches() == 1
            && watch.out.text().contains("api-xyz")),
        "kubectl did not list and watch; stdout:\n{}\nstderr:\n{}",
        watch.out.text(),
        watch.err.text()
    );
    api.set_endpoint_slice(
        "default",
        endpoint_slice(
            "web-new",
            "web",
            "http",
            8080,
            &[("10.0.0.77", true, false)],
        ),
    );
    api.set_endpoint_slice(
        "other",
        endpoint_slice(
            "elsewhere",
            "web",
            "http",
            8080,
            &[("10.9.9.9", true, false)],
        ),
    );
    assert!(
        wait_until(SOON, || {
            let out = watch.out.text();
            out.contains("web-new") && out.contains("10.0.0.77")
        }),
        "the watch did not show the new slice; stdout:\n{}\nstderr:\n{}",
        watch.out.text(),
        watch.err.text()
    );
    let out = watch.out.text();
    assert!(
        !out.contains("elsewhere"),
        "another namespace leaked in:\n{out}"
    );
    let watches: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.contains("watch=") && r.contains("resourceVersion="))
        .collect();
    assert!(!watches.is_empty(), "{:#?}", api.requests());
    println!("watch requests: {watches:#?}");
    drop(watch);
    assert!(
        wait_until(SOON, || api.open_watches() == 0),
        "the server kept the killed kubectl's watch open"
    );
}

#[test]
fn kubectl_with_a_wrong_token_is_unauthorized() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let k = Kubectl::for_server(&api, "not-the-token");
    let r = k.run(&["get", "endpointslices", "-n", "default", "-o", "json"]);
    assert!(!r.status.success(), "stdout:\n{}", r.stdout);
    // kubectl 1.20 says "(Unauthorized)", later ones "(the server has asked
    // for the client to provide credentials)", both after this.
    assert!(
        r.stderr.contains("You must be logged in to the server"),
        "stderr:\n{}",
        r.stderr
    );
    assert!(!r.stdout.contains("web-abc"));
    assert!(!api.requests().is_empty());
}

#[test]
fn kubectl_trusting_another_ca_rejects_the_certificate() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let other = TestCa::new("some-other-ca");
    let k = Kubectl::new(&kubeconfig_yaml(&api.url(), &other.pem(), TOKEN));
    let r = k.run(&["get", "endpointslices", "-n", "default", "-o", "json"]);
    assert!(!r.status.success(), "stdout:\n{}", r.stdout);
    assert!(
        r.stderr.contains("certificate signed by unknown authority"),
        "stderr:\n{}",
        r.stderr
    );
    // No request got through the handshake.
    assert!(api.requests().is_empty(), "{:#?}", api.requests());
}

#[test]
fn kubectl_sees_forbidden_and_an_outage() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let k = Kubectl::for_server(&api, TOKEN);
    let args = ["get", "endpointslices", "-n", "default", "-o", "json"];

    api.set_forbidden(true);
    let r = k.run(&args);
    assert!(!r.status.success());
    assert!(
        r.stderr.contains("Forbidden") || r.stderr.contains("forbidden"),
        "{}",
        r.stderr
    );
    api.set_forbidden(false);

    api.set_down(true);
    let seen = api.requests().len();
    let r = k.run(&args);
    assert!(!r.status.success(), "stdout:\n{}", r.stdout);
    assert!(r.stderr.contains("refused"), "{}", r.stderr);
    assert_eq!(
        api.requests().len(),
        seen,
        "a request got through while down"
    );

    api.set_down(false);
    let list = k.json(&args);
    assert_eq!(names_and_addresses(&list).len(), 2);
}

#[test]
fn kubectl_reads_endpoints_when_slices_are_not_served() {
    let api = ApiServer::start(TOKEN);
    api.set_endpoint_slice(
        "default",
        endpoint_slice(
            "web-1",
            "web",
            "http",
            8080,
            &[
                ("10.0.0.1", true, false),
                ("10.0.0.2", false, false),
                ("10.0.0.3", true, true),
            ],
        ),
    );
    api.set_endpoint_slice(
        "default",
        endpoint_slice("web-2", "web", "http", 8080, &[("10.0.0.4", true, false)]),
    );
    api.without_endpoint_slices();
    let k = Kubectl::for_server(&api, TOKEN);

    let r = k.run(&["get", "endpointslices", "-n", "default", "-o", "json"]);
    assert!(!r.status.success(), "stdout:\n{}", r.stdout);
    assert!(
        r.stderr.contains("doesn't have a resource type"),
        "{}",
        r.stderr
    );

    let list = k.json(&["get", "endpoints", "-n", "default", "-o", "json"]);
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{list:#}");
    let ep = &items[0];
    assert_eq!(ep["kind"], "Endpoints");
    assert_eq!(ep["metadata"]["name"], "web");
    let subset = &ep["subsets"][0];
    let ips = |field: &str| -> Vec<&str> {
        subset[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["ip"].as_str())
            .collect()
    };
    assert_eq!(ips("addresses"), ["10.0.0.1", "10.0.0.4"], "{ep:#}");
    assert_eq!(ips("notReadyAddresses"), ["10.0.0.2"], "{ep:#}");
    assert_eq!(subset["ports"][0]["port"], 8080);

    // Deleting the service's last slices deletes its Endpoints.
    api.delete_endpoint_slice("default", "web-1");
    api.delete_endpoint_slice("default", "web-2");
    let list = k.json(&["get", "endpoints", "-n", "default", "-o", "json"]);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list:#}");
}

#[test]
fn watch_from_a_compacted_version_gets_410() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

    // Before compaction, a watch from version 1 replays every change (and
    // ends after its timeout).
    let r = api
        .get(
            TOKEN,
            &format!("{path}?watch=1&resourceVersion=1&timeoutSeconds=1"),
        )
        .expect("watch");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let events = watch_events(&r.body);
    let added: Vec<&str> = events
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(added, ["web-abc", "api-xyz"], "{events:#?}");

    // A watch open across the compaction ends with an ERROR 410.
    let current = api.resource_version();
    let open = std::thread::scope(|s| {
        let h = s.spawn(|| {
            api.get(
                TOKEN,
                &format!("{path}?watch=true&resourceVersion={current}"),
            )
        });
        assert!(
            wait_until(SOON, || api.open_watches() == 1),
            "the watch did not open"
        );
        api.compact();
        h.join().expect("watch thread").expect("watch")
    });
    let events = watch_events(&open.body);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);

    // After compaction: a watch from an old version gets one ERROR 410 event.
    let r = api
        .get(TOKEN, &format!("{path}?watch=1&resourceVersion=1"))
        .expect("watch");
    assert_eq!(r.status, 200);
    let events = watch_events(&r.body);
    println!("{events:#?}");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["type"], "ERROR");
    let st = &events[0]["object"];
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["reason"], "Expired");
    assert_eq!(st["code"], 410);

    // An exact list at an old version is 410 Gone; the latest list is fine.
    let r = api
        .get(
            TOKEN,
            &format!("{path}?resourceVersion=2&resourceVersionMatch=Exact"),
        )
        .expect("list");
    assert_eq!(r.status, 410, "{}", r.body_text());
    let r = api.get(TOKEN, path).expect("list");
    assert_eq!(r.status, 200);
    let list: Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(list["kind"], "EndpointSliceList");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
}

#[test]
fn watch_sends_bookmarks_and_ends_at_its_timeout() {
    let api = ApiServer::start(TOKEN);
    seed(&api);
    let rv = api.resource_version();
    let path = format!(
        "/apis/discovery.k8s.io/v1/endpointslices?watch=1&resourceVersion={rv}\
         &allowWatchBookmarks=true&timeoutSeconds=3&labelSelector=kubernetes.io%2Fservice-name%3Dweb"
    );
    let started = Instant::now();
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| api.get(TOKEN, &path));
        assert!(
            wait_until(SOON, || api.open_watches() == 1),
            "the watch did not open"
        );
        // A web slice changes, is deleted; an api slice changes (filtered out).
        api.set_endpoint_slice(
            "default",
            endpoint_slice("web-abc", "web", "http", 8080, &[("10.0.0.1", true, false)]),
        );
        api.set_endpoint_slice(
            "default",
            endpoint_slice("api-xyz", "api", "grpc", 9090, &[("10.0.1.2", true, false)]),
        );
        api.delete_endpoint_slice("other", "web-other");
        h.join().expect("watch thread").expect("watch")
    });
    let took = started.elapsed();
    println!("watch with timeoutSeconds=3 ended after {took:?}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    let events = watch_events(&r.body);
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default(),
                e["object"]["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("MODIFIED", "web-abc"), ("DELETED", "web-other")],
        "{events:#?}"
    );
    let bookmarks: Vec<&Value> = events.iter().filter(|e| e["type"] == "BOOKMARK").collect();
    assert!(bookmarks.len() >= 2, "{events:#?}");
    let last = bookmarks.last().expect("a bookmark");
    assert_eq!(last["object"]["kind"], "EndpointSlice");
    assert_eq!(
        last["object"]["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );
    // Each event's resourceVersion is newer than the one before.
    let rvs: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .expect("resourceVersion")
        })
        .collect();
    assert!(
        rvs.windows(2).all(|w| w[0] < w[1]) && rvs[0] > rv,
        "{rvs:?}"
    );
}

#[test]
fn requests_without_the_token_get_a_401_status() {
    let api = ApiServer::start(TOKEN);
    let r = api.get("wrong", "/api").expect("GET /api");
    assert_eq!(r.status, 401);
    let st: Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(
        st,
        serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                           "message":"Unauthorized","reason":"Unauthorized","code":401})
    );
    let r = api.get(TOKEN, "/openapi/v2").expect("GET /openapi/v2");
    assert_eq!(r.status, 404);
    let r = api.get(TOKEN, "/version").expect("GET /version");
    assert_eq!(r.status, 200);
    assert!(r.body_text().contains("v1.28.0"));

    // The files a pod would mount.
    let dir = TempDir::new("apiserver-files");
    let (token, ca) = api.write_files(dir.path());
    assert_eq!(std::fs::read_to_string(token).expect("token"), TOKEN);
    assert!(
        std::fs::read_to_string(ca)
            .expect("ca")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
}
