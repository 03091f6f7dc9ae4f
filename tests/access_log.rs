//! The access log (`--access-log`): one line per request in the `eru-lb`
//! format, written by every worker without mixing lines, and reopened on
//! SIGUSR1 so that a rotation loses nothing.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use regex::Regex;
use serde_json::json;

use common::backend::{Backend, get, put_domains, put_upstreams, to_backend};
use common::{EVENTUALLY, Elb, TempDir, wait_until};

/// One line, field by field (the quoted ones without their quotes).
const LINE: &str = r#"^(\S+) (\S+) \[(\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)" (\d+\.\d{3}) (\d+\.\d{3}|-) (.+) (\S+) (\S+) (\S+) (\S+)$"#;

/// The lines of the test's own requests (not the harness's readiness
/// check, for `ready.test`).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("ready.test "))
        .map(str::to_string)
        .collect()
}

fn start(dir: &TempDir, workers: usize) -> (Elb, PathBuf, Backend) {
    let path = dir.path().join("access.log");
    let elb = Elb::builder()
        .workers(workers)
        .arg("--access-log")
        .arg(path.to_str().expect("utf-8 path"))
        .start();
    let backend = Backend::start("a");
    put_upstreams(elb.admin_addr(), &json!({"web": {backend.host_port(): ""}}));
    put_domains(elb.admin_addr(), &json!({"log.test": to_backend("web")}));
    (elb, path, backend)
}

#[test]
fn a_line_has_every_field_right() {
    let dir = TempDir::new("access-log");
    let (elb, path, backend) = start(&dir, 2);
    let r = get(
        elb.listen_addr(),
        "log.test",
        "/a/b?x=1&y=2",
        &[
            ("Referer", "http://ref.test/page"),
            ("User-Agent", "probe \"quoted\""),
            ("X-Forwarded-For", "10.0.0.9"),
        ],
    );
    assert_eq!(r.status, 200);
    let missing = get(elb.listen_addr(), "nowhere.test", "/", &[]);
    assert_eq!(missing.status, 404);
    assert!(
        wait_until(EVENTUALLY, || lines(&path).len() >= 2),
        "log: {:?}",
        lines(&path)
    );
    let all = lines(&path);
    let re = Regex::new(LINE).expect("line pattern");
    let proxied = all
        .iter()
        .find(|l| l.starts_with("log.test "))
        .expect("the proxied request's line");
    let c = re
        .captures(proxied)
        .unwrap_or_else(|| panic!("not an eru-lb line: {proxied}"));
    let f = |i: usize| c.get(i).map_or("", |m| m.as_str());
    assert_eq!(f(1), "log.test");
    assert_eq!(f(2), "127.0.0.1");
    assert_eq!(f(4), "GET /a/b?x=1&y=2 HTTP/1.1");
    assert_eq!(f(5), "200");
    assert_eq!(f(6), r.body.len().to_string(), "body bytes sent");
    assert_eq!(f(7), "http://ref.test/page");
    assert_eq!(f(8), r"probe \x22quoted\x22");
    assert!(f(9).parse::<f64>().is_ok() && f(10).parse::<f64>().is_ok());
    assert!(
        f(10).parse::<f64>().unwrap_or(f64::MAX) <= f(9).parse::<f64>().unwrap_or(0.0),
        "the upstream took longer than the request: {proxied}"
    );
    assert_eq!(f(11), "10.0.0.9, 127.0.0.1");
    assert_eq!(f(12), "/a/b");
    assert_eq!(f(13), "x=1&y=2");
    assert_eq!(f(14), backend.host_port());
    assert_eq!(f(15), "200");

    let local = all
        .iter()
        .find(|l| l.starts_with("nowhere.test "))
        .expect("the 404's line");
    let c = re
        .captures(local)
        .unwrap_or_else(|| panic!("not an eru-lb line: {local}"));
    let f = |i: usize| c.get(i).map_or("", |m| m.as_str());
    assert_eq!(f(5), "404");
    assert_eq!(f(6), missing.body.len().to_string());
    assert_eq!(
        (f(7), f(10), f(13), f(14), f(15)),
        ("-", "-", "-", "-", "-")
    );
}

#[test]
fn a_rotation_with_sigusr1_loses_and_splits_no_line() {
    let dir = TempDir::new("access-log");
    let (elb, path, _backend) = start(&dir, 2);
    let rotated = dir.path().join("access.log.1");
    let proxy: SocketAddr = elb.listen_addr();
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(move || {
            let mut n = 0usize;
            for i in 0..600 {
                assert_eq!(get(proxy, "log.test", &format!("/r{i}"), &[]).status, 200);
                n += 1;
            }
            n
        });
        // Rotate while requests flow, as logrotate's postrotate would.
        assert!(wait_until(EVENTUALLY, || lines(&path).len() >= 50));
        std::fs::rename(&path, &rotated).expect("rename");
        elb.signal(Signal::SIGUSR1);
        sender.join().expect("sender")
    });
    assert!(
        wait_until(EVENTUALLY, || lines(&path).len() + lines(&rotated).len()
            >= sent),
        "{} + {} lines for {sent} requests",
        lines(&rotated).len(),
        lines(&path).len()
    );
    // Lines settle: none more than sent, each whole and each request once.
    assert!(
        !wait_until(Duration::from_millis(1500), || {
            lines(&path).len() + lines(&rotated).len() > sent
        }),
        "{} + {} lines for {sent} requests: {:?}",
        lines(&rotated).len(),
        lines(&path).len(),
        &lines(&path)[..3.min(lines(&path).len())]
    );
    let re = Regex::new(LINE).expect("line pattern");
    let (old, new) = (lines(&rotated), lines(&path));
    assert!(!new.is_empty(), "nothing went to the new file");
    let mut seen = std::collections::HashSet::new();
    for l in old.iter().chain(&new) {
        assert!(re.is_match(l), "a split or mixed line: {l:?}");
        let path = l.split('"').nth(1).unwrap_or_default().to_string();
        assert!(seen.insert(path), "logged twice: {l}");
    }
    assert_eq!(seen.len(), sent);
    eprintln!(
        "{} lines before the rotation, {} after",
        old.len(),
        new.len()
    );
}

#[test]
fn a_client_that_leaves_before_the_answer_is_logged_499() {
    let dir = TempDir::new("access-log");
    let (elb, path, backend) = start(&dir, 1);
    {
        let mut c =
            common::HttpConn::connect(elb.listen_addr(), common::HTTP_TIMEOUT).expect("connect");
        // Half the body it declares, then gone.
        c.send(b"POST /upload HTTP/1.1\r\nHost: log.test\r\nContent-Length: 10\r\n\r\n12345")
            .expect("send");
        assert!(wait_until(EVENTUALLY, || backend.connections() >= 1));
    }
    assert!(
        wait_until(EVENTUALLY, || lines(&path)
            .iter()
            .any(|l| l.contains("/upload"))),
        "no line for the abandoned request"
    );
    let line = lines(&path)
        .into_iter()
        .find(|l| l.contains("/upload"))
        .unwrap_or_default();
    let c = Regex::new(LINE)
        .expect("line pattern")
        .captures(&line)
        .map(|c| (c[5].to_string(), c[14].to_string(), c[15].to_string()));
    assert_eq!(
        c,
        Some(("499".into(), backend.host_port(), "-".into())),
        "{line}"
    );
}

#[test]
fn a_client_that_leaves_while_the_peer_thinks_ends_the_exchange_at_once() {
    let dir = TempDir::new("access-log");
    let (elb, path, _backend) = start(&dir, 1);
    let slow = common::health::HealthBackend::start("slow");
    // Its `/health` accepts and never answers (for 30 s).
    slow.hang_health();
    put_upstreams(elb.admin_addr(), &json!({"slow": {slow.host_port(): ""}}));
    put_domains(elb.admin_addr(), &json!({"slow.test": to_backend("slow")}));
    let left = std::time::Instant::now();
    {
        let mut c =
            common::HttpConn::connect(elb.listen_addr(), common::HTTP_TIMEOUT).expect("connect");
        c.send(b"GET /health HTTP/1.1\r\nHost: slow.test\r\n\r\n")
            .expect("send");
        assert!(wait_until(EVENTUALLY, || slow.probes() == 1));
    }
    // Logged 499 long before the peer would have answered (30 s).
    assert!(
        wait_until(Duration::from_secs(10), || lines(&path)
            .iter()
            .any(|l| l.starts_with("slow.test "))),
        "no line for the abandoned request"
    );
    let line = lines(&path)
        .into_iter()
        .find(|l| l.starts_with("slow.test "))
        .unwrap_or_default();
    eprintln!("logged {:?} after the client left", left.elapsed());
    let c = Regex::new(LINE)
        .expect("line pattern")
        .captures(&line)
        .map(|c| (c[5].to_string(), c[14].to_string()));
    assert_eq!(c, Some(("499".into(), slow.host_port())), "{line}");
}
