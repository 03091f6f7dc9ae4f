//! SPEC 2, configuration: bad values are refused with one line naming the
//! setting (exit 2), a listener that cannot be bound exits 1 naming the
//! address, and flags win over the environment, the environment over the
//! file.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{Elb, TempDir, free_addr, free_port, run_elb};

/// A refused start is immediate; this only bounds a test that goes wrong.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs elb with `args` and `env` (plus free listen, admin and etcd
/// addresses unless `own_listen`, so that an elb that wrongly starts takes no
/// port in use) and checks it exits 2 with exactly one stderr line, starting
/// `elb: ` and naming `setting`. Returns the line.
fn refused(args: &[&str], env: &[(&str, &str)], setting: &str) -> String {
    refused_with(args, env, setting, false)
}

fn refused_with(args: &[&str], env: &[(&str, &str)], setting: &str, own_listen: bool) -> String {
    let (listen, admin, etcd) = (
        free_addr().to_string(),
        free_addr().to_string(),
        free_addr().to_string(),
    );
    let mut all: Vec<&str> = Vec::new();
    if !own_listen {
        all.extend(["--listen", &listen]);
    }
    all.extend(["--admin", &admin, "--etcd", &etcd]);
    all.extend(args);
    let f = run_elb(&all, env, EXIT_TIMEOUT);
    let lines = f.stderr_lines();
    assert_eq!(
        f.code(),
        Some(2),
        "elb {all:?} with {env:?}: exit status {} (want 2); stderr:\n{}",
        f.status,
        f.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "elb {all:?} with {env:?}: want one stderr line, got:\n{}",
        f.stderr
    );
    let line = lines[0].to_string();
    assert!(
        line.starts_with("elb: "),
        "the line does not start with 'elb: ': {line:?}"
    );
    assert!(
        line.contains(setting),
        "the line does not name {setting}: {line:?}"
    );
    assert!(f.stdout.is_empty(), "stdout: {:?}", f.stdout);
    eprintln!("{env:?} {args:?} -> {line}");
    line
}

#[test]
fn a_bad_elb_workers_is_refused_naming_it() {
    for v in ["abc", "0", "999"] {
        let line = refused(&[], &[("ELB_WORKERS", v)], "ELB_WORKERS");
        assert!(
            line.contains(v),
            "the line does not quote the value {v:?}: {line:?}"
        );
    }
}

#[test]
fn a_bad_workers_flag_is_refused_naming_it() {
    refused(&["--workers", "-1"], &[], "--workers");
    refused(&["--workers"], &[], "--workers");
}

#[test]
fn a_bad_elb_listen_is_refused_naming_it() {
    for v in ["nowhere", "127.0.0.1:99999", "127.0.0.1"] {
        let line = refused_with(&[], &[("ELB_LISTEN", v)], "ELB_LISTEN", true);
        assert!(
            line.contains(v),
            "the line does not quote the value {v:?}: {line:?}"
        );
    }
    refused_with(&["--listen", "nowhere"], &[], "--listen", true);
}

#[test]
fn a_bad_shm_size_is_refused_naming_it() {
    for v in ["12q", "lots", "1k", "-5m"] {
        refused(&["--shm-size", v], &[], "--shm-size");
    }
    refused(&[], &[("ELB_SHM_SIZE", "12q")], "ELB_SHM_SIZE");
}

#[test]
fn an_unknown_flag_is_refused_naming_it() {
    refused(&["--bogus"], &[], "--bogus");
    refused(&["--bogus=3"], &[], "--bogus");
}

#[test]
fn an_unknown_key_in_the_config_file_is_refused_naming_it() {
    let dir = TempDir::new("settings");
    let top = dir.write("top.toml", "workers = 1\nlisen = [\"127.0.0.1:1\"]\n");
    refused(
        &["--config", top.to_str().expect("utf-8 path")],
        &[],
        "lisen",
    );
    let nested = dir.write("nested.toml", "[timeouts]\nconnect = 5\nconect = 5\n");
    refused(
        &["--config", nested.to_str().expect("utf-8 path")],
        &[],
        "conect",
    );
}

#[test]
fn a_bad_value_in_the_config_file_is_refused_naming_it() {
    let dir = TempDir::new("settings");
    let f = dir.write("elb.toml", "workers = 0\n");
    let line = refused(
        &["--config", f.to_str().expect("utf-8 path")],
        &[],
        "workers",
    );
    assert!(
        line.contains("elb.toml"),
        "the line does not name the file: {line:?}"
    );
    for (text, key) in [
        (
            "[admin_limits]\nmax_body_size = \"lots\"\n",
            "admin_limits.max_body_size",
        ),
        (
            "[admin_limits]\nmax_connections = 0\n",
            "admin_limits.max_connections",
        ),
    ] {
        let f = dir.write("limits.toml", text);
        refused(&["--config", f.to_str().expect("utf-8 path")], &[], key);
    }
    let missing = dir.path().join("missing.toml");
    refused(
        &["--config", missing.to_str().expect("utf-8 path")],
        &[],
        "missing.toml",
    );
}

#[test]
fn a_port_in_use_exits_1_naming_the_address() {
    // A plain listener (no SO_REUSEPORT) makes elb's bind fail.
    let (held, addr) = loop {
        let port = free_port();
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            break (l, format!("127.0.0.1:{port}"));
        }
    };
    let (admin, etcd) = (free_addr().to_string(), free_addr().to_string());
    let f = run_elb(
        &[
            "--workers",
            "1",
            "--listen",
            &addr,
            "--admin",
            &admin,
            "--etcd",
            &etcd,
        ],
        &[],
        EXIT_TIMEOUT,
    );
    drop(held);
    assert_eq!(
        f.code(),
        Some(1),
        "exit status {} (want 1); stderr:\n{}",
        f.status,
        f.stderr
    );
    let line = f
        .stderr_lines()
        .into_iter()
        .find(|l| l.contains(&addr))
        .unwrap_or_else(|| panic!("no stderr line names {addr}:\n{}", f.stderr));
    eprintln!("{line}");
    assert!(line.starts_with("elb: "), "{line:?}");
    assert!(
        line.contains("in use"),
        "the line does not say why: {line:?}"
    );
}

#[test]
fn help_prints_usage_and_exits_zero() {
    for flag in ["--help", "-h"] {
        let f = run_elb(&[flag], &[], EXIT_TIMEOUT);
        assert_eq!(
            f.code(),
            Some(0),
            "elb {flag}: {}; stderr:\n{}",
            f.status,
            f.stderr
        );
        assert!(
            f.stdout.contains("usage"),
            "elb {flag} stdout:\n{}",
            f.stdout
        );
        for opt in ["--workers", "--listen", "--config", "--shutdown-timeout"] {
            assert!(
                f.stdout.contains(opt),
                "elb {flag} does not mention {opt}:\n{}",
                f.stdout
            );
        }
        assert!(f.stderr.is_empty(), "elb {flag} stderr:\n{}", f.stderr);
    }
}

#[test]
fn version_prints_the_version_and_exits_zero() {
    for flag in ["--version", "-V"] {
        let f = run_elb(&[flag], &[], EXIT_TIMEOUT);
        assert_eq!(
            f.code(),
            Some(0),
            "elb {flag}: {}; stderr:\n{}",
            f.status,
            f.stderr
        );
        assert_eq!(f.stdout, format!("elb {}\n", env!("CARGO_PKG_VERSION")));
        assert!(f.stderr.is_empty(), "elb {flag} stderr:\n{}", f.stderr);
    }
}

/// Starts elb with a config file saying `workers = 1`, plus `env` and
/// `flags`, and checks it runs `want` workers.
fn workers_from(dir: &TempDir, env: Option<&str>, flag: Option<&str>, want: usize) {
    let file = dir.write("elb.toml", "workers = 1\n");
    let mut b = Elb::builder()
        .arg("--config")
        .arg(file.to_str().expect("utf-8 path"));
    if let Some(n) = env {
        b = b.env("ELB_WORKERS", n);
    }
    if let Some(n) = flag {
        b = b.arg("--workers").arg(n);
    }
    let elb = b.start();
    let workers = elb.wait_workers(want, common::EVENTUALLY);
    assert_eq!(elb.children(), workers, "children other than workers");
}

#[test]
fn a_flag_wins_over_env_and_file() {
    workers_from(&TempDir::new("settings"), Some("2"), Some("3"), 3);
}

#[test]
fn env_wins_over_the_file() {
    workers_from(&TempDir::new("settings"), Some("2"), None, 2);
}

#[test]
fn the_file_alone_is_read() {
    workers_from(&TempDir::new("settings"), None, None, 1);
}
