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

/// `elb --check` with `args` and `env`: exits 0 at once, having printed
/// the effective settings, one `key = value` per line; returns them.
fn check(args: &[&str], env: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    let mut all = vec!["--check"];
    all.extend(args);
    let f = run_elb(&all, env, EXIT_TIMEOUT);
    assert_eq!(
        f.code(),
        Some(0),
        "elb {all:?} with {env:?}: {}; stderr:\n{}",
        f.status,
        f.stderr
    );
    assert!(f.stderr.is_empty(), "stderr:\n{}", f.stderr);
    f.stdout
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(" = ").expect("key = value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn check_prints_the_effective_settings_flags_over_env_over_file_over_defaults() {
    let dir = TempDir::new("settings");
    let file = dir.write(
        "elb.toml",
        "workers = 1\nshm_size = \"8m\"\n[etcd]\nname = \"FILE\"\n[timeouts]\nconnect = 7\n",
    );
    let path = file.to_str().expect("utf-8 path");
    let s = check(
        &["--config", path, "--workers", "3"],
        &[("ELB_WORKERS", "2"), ("ELBNAME", "ENV")],
    );
    assert_eq!(s["workers"], "3", "a flag wins over env and file");
    assert_eq!(s["etcd.name"], "ENV", "env wins over the file");
    assert_eq!(
        s["shm_size"],
        (8 << 20).to_string(),
        "the file over defaults"
    );
    assert_eq!(s["timeouts.connect"], "7");
    assert_eq!(s["timeouts.upstream_read"], "30", "a default");
    let s = check(&["--config", path], &[("ELB_WORKERS", "2")]);
    assert_eq!(s["workers"], "2");
    let s = check(&["--config", path], &[]);
    assert_eq!(s["workers"], "1");
}

#[test]
fn check_reads_the_original_environment_names() {
    let s = check(
        &[],
        &[
            ("ETCD", "http://10.0.0.1:2379, 10.0.0.2:2379"),
            ("STATSD", "127.0.0.1:8125"),
        ],
    );
    assert_eq!(s["etcd.endpoints"], "10.0.0.1:2379, 10.0.0.2:2379");
    assert_eq!(s["statsd.address"], "127.0.0.1:8125");
    let s = check(&[], &[("ETCD_HOST", "10.0.0.3"), ("ETCD_PORT", "4001")]);
    assert_eq!(s["etcd.endpoints"], "10.0.0.3:4001");
    let s = check(&[], &[("ELB_ADMIN_ALLOW", "10.0.0.0/8, ::1")]);
    assert_eq!(s["admin_access.allow"], "10.0.0.0/8, ::1/128");
}

#[test]
fn check_refuses_bad_values_with_exit_2_naming_them() {
    refused(&["--check"], &[("ELB_WORKERS", "lots")], "ELB_WORKERS");
    refused(
        &["--check"],
        &[("ELB_ADMIN_ALLOW", "10.0.0.0/33")],
        "ELB_ADMIN_ALLOW",
    );
    refused(&["--check", "--admin", "unix:"], &[], "--admin");
    refused(&["--check", "--shm-size", "12q"], &[], "--shm-size");
}

#[test]
fn check_binds_nothing() {
    // Both ports held: a real start would exit 1 naming the address.
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (p, a) = (
        proxy.local_addr().expect("addr").to_string(),
        admin.local_addr().expect("addr").to_string(),
    );
    let s = check(&["--listen", &p, "--admin", &a], &[]);
    assert_eq!(s["listen"], p);
    assert_eq!(s["admin"], a);
}

#[test]
fn kubernetes_and_sources_are_checked_naming_the_key() {
    let dir = TempDir::new("settings");
    let outside = [("KUBERNETES_SERVICE_HOST", "")];
    let cases = [
        ("[kubernetes]\n", "kubernetes.apiserver"),
        (
            "[kubernetes]\napiserver = \"http://10.0.0.1\"\n",
            "kubernetes.apiserver",
        ),
        (
            "[kubernetes]\napiserver = \"https://10.0.0.1\"\nnamespaces = [\"Not_A_Name\"]\n",
            "kubernetes.namespaces",
        ),
        ("[sources]\nfirst = \"consul\"\n", "sources.first"),
        (
            "[kubernetes]\napiserver = \"https://10.0.0.1\"\nwatch = 1\n",
            "watch",
        ),
    ];
    for (toml, key) in cases {
        let f = dir.write("elb.toml", toml);
        refused(
            &["--check", "--config", &f.to_string_lossy()],
            &outside,
            key,
        );
    }
}
