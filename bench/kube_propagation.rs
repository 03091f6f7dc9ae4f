//! Propagation from the Kubernetes apiserver to routing: how long after an
//! EndpointSlice changes the first request is routed by it. Built and run
//! by `bench/kube_propagation` (`cargo bench --bench kube_propagation`),
//! release build, against the apiserver stand-in of the tests
//! (`tests/common/apiserver.rs`): real HTTPS, a real watch stream.
//!
//! The Service `web` has one slice whose only endpoint moves between two
//! backends, N times. The clock starts when the stand-in has taken the
//! change (it is in its store and on its way to open watches, as an
//! apiserver's acknowledgement of a write); requests go to elb back to back
//! on fresh connections, and the clock stops when the first answer from
//! the new backend has been read.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::apiserver::{ApiServer, endpoint_slice};
use common::backend::{Backend, put_domains, to_backend};
use common::etcd::served_by;
use common::{Elb, TempDir, wait_until};

const UPDATES: usize = 100;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("kube_propagation: measured by bench/kube_propagation only");
        return;
    }
    let api = ApiServer::start("bench-token");
    let dir = TempDir::new("kube-bench");
    let (token, ca) = api.write_files(dir.path());
    let backends = [Backend::start("a"), Backend::start("b")];
    let slice = |b: &Backend| {
        endpoint_slice(
            "web-1",
            "web",
            "http",
            b.port(),
            &[("127.0.0.1", true, false)],
        )
    };
    api.set_endpoint_slice("default", slice(&backends[0]));
    let config = dir.write(
        "elb.toml",
        &format!(
            "[kubernetes]\napiserver = \"{}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n",
            api.url(),
            token.display(),
            ca.display()
        ),
    );
    let elb = Elb::builder()
        .workers(2)
        .arg("--config")
        .arg(config.to_string_lossy())
        .start();
    put_domains(elb.admin_addr(), &json!({"k.bench": to_backend("web")}));
    assert!(wait_until(Duration::from_secs(30), || {
        served_by(elb.listen_addr(), "k.bench").as_deref() == Some("a")
    }));
    let mut times = Vec::with_capacity(UPDATES);
    for i in 0..UPDATES {
        let to = &backends[(i + 1) % 2];
        api.set_endpoint_slice("default", slice(to));
        let start = Instant::now();
        loop {
            if served_by(elb.listen_addr(), "k.bench").as_deref() == Some(to.name()) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "update {i} never routed"
            );
        }
        times.push(start.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "kube_propagation: {UPDATES} EndpointSlice changes, event to first routed request: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.50).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0
    );
}
