//! statsd (`--statsd`): Eru ELB's names per domain, with exact counts,
//! from the workers' counters in the region; a later flush sends nothing
//! twice.

mod common;

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use common::backend::{Backend, get, put_domains, put_upstreams, to_backend};
use common::{EVENTUALLY, Elb, wait_until};

/// Every line received so far.
fn listen() -> (String, Arc<Mutex<Vec<String>>>) {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let addr = udp.local_addr().expect("addr").to_string();
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&lines);
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        // Ends with the test process.
        loop {
            if let Ok(n) = udp.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(n <= 512, "a datagram of {n} bytes");
                if let Ok(mut l) = seen.lock() {
                    l.extend(text.lines().map(str::to_string));
                }
            }
        }
    });
    (addr, lines)
}

/// The sum of each count received (`name:value|c`), by name.
fn counts(lines: &Mutex<Vec<String>>) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for l in lines.lock().map(|l| l.clone()).unwrap_or_default() {
        if let Some((name, rest)) = l.split_once(':')
            && let Some(v) = rest.strip_suffix("|c")
        {
            *out.entry(name.to_string()).or_insert(0.0) += v.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    out
}

#[test]
fn each_domain_sends_its_total_statuses_and_cost_once() {
    let (addr, lines) = listen();
    let elb = Elb::builder()
        .workers(2)
        .args(["--statsd", &addr, "--name", "ELBT"])
        .start();
    let backend = Backend::start("a");
    put_upstreams(
        elb.admin_addr(),
        &json!({"web": {backend.host_port(): ""}, "gone": {backend.host_port(): "down"}}),
    );
    put_domains(
        elb.admin_addr(),
        &json!({"st.example.com": to_backend("web"), "bad.example.com": to_backend("gone")}),
    );
    for _ in 0..10 {
        assert_eq!(
            get(elb.listen_addr(), "st.example.com", "/", &[]).status,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            get(elb.listen_addr(), "bad.example.com", "/", &[]).status,
            502
        );
    }
    let want = [
        ("ELBT.st_example_com.total", 10.0),
        ("ELBT.st_example_com.status.200", 10.0),
        ("ELBT.bad_example_com.total", 3.0),
        ("ELBT.bad_example_com.status.502", 3.0),
    ];
    let all_in = || {
        let c = counts(&lines);
        want.iter().all(|(k, v)| c.get(*k) == Some(v))
    };
    assert!(wait_until(EVENTUALLY, all_in), "{:?}", counts(&lines));
    // More flushes come and go: nothing is sent twice.
    assert!(
        !wait_until(Duration::from_millis(2500), || !all_in()),
        "{:?}",
        counts(&lines)
    );
    let got = lines.lock().map(|l| l.clone()).unwrap_or_default();
    assert!(
        got.iter()
            .any(|l| l.starts_with("ELBT.st_example_com.cost:") && l.ends_with("|ms")),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|l| l.contains("ready_test")),
        "a host without a rule set was counted: {got:?}"
    );
}
