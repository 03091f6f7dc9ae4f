//! Flags and the file. What comes from the environment is tested on the
//! real binary (`tests/settings.rs`), since clap reads the process's own.

use super::values::parse_network;
use super::*;

fn run(args: &[&str]) -> Result<Settings, SettingsError> {
    match from_args(args.iter().map(|s| s.to_string()))? {
        Command::Run(s) => Ok(*s),
        other => panic!("expected settings, got {other:?}"),
    }
}

fn message(r: Result<Settings, SettingsError>) -> String {
    r.expect_err("should be refused").to_string()
}

/// A file in a directory of its own, removed on drop.
struct File(std::path::PathBuf);

impl File {
    fn new(label: &str) -> File {
        let dir = std::env::temp_dir().join(format!("elb-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        File(dir.join("elb.toml"))
    }

    fn with(&self, text: &str) -> &str {
        std::fs::write(&self.0, text).expect("write");
        self.0.to_str().expect("utf8")
    }
}

impl Drop for File {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            std::fs::remove_dir_all(dir).ok();
        }
    }
}

#[test]
fn defaults_follow_the_spec() {
    let s = run(&[]).expect("defaults");
    assert_eq!(s.etcd, vec!["127.0.0.1:2379"]);
    assert_eq!(s.name, "ELB");
    assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().expect("addr")]);
    assert_eq!(
        s.admin,
        AdminAddr::Tcp("127.0.0.1:8081".parse().expect("addr"))
    );
    assert_eq!(s.shm_size, 64 << 20);
    assert_eq!(s.timeouts.keepalive_ms, 65_000);
    assert_eq!(s.limits.client_max_body_size, 50 << 20);
    assert_eq!(s.upstream.tries, 3);
    assert_eq!(s.limits.admin_max_body_size, 64 << 20);
    assert_eq!(s.admin_max_connections, 64);
    assert_eq!(s.healthcheck.panic_threshold, 0);
    assert!(!s.logcheck.enable);
}

#[test]
fn admin_limits_are_read_from_the_file_and_checked() {
    let file = File::new("admin-limits");
    let s = run(&[
        "--config",
        file.with("[admin_limits]\nmax_body_size = \"1k\"\nmax_connections = 2\n"),
    ])
    .expect("ok");
    assert_eq!(
        (s.limits.admin_max_body_size, s.admin_max_connections),
        (1024, 2)
    );
    let s = run(&[
        "--config",
        file.with("[admin_limits]\nmax_body_size = 5000\n"),
    ])
    .expect("ok");
    assert_eq!(s.limits.admin_max_body_size, 5000);
    assert_eq!(s.admin_max_connections, 64);
    for (text, key) in [
        (
            "[admin_limits]\nmax_body_size = \"lots\"\n",
            "admin_limits.max_body_size",
        ),
        (
            "[admin_limits]\nmax_connections = 0\n",
            "admin_limits.max_connections",
        ),
        (
            "[admin_limits]\nmax_connections = -3\n",
            "admin_limits.max_connections",
        ),
        ("[admin_limits]\nmax_conections = 3\n", "max_conections"),
    ] {
        let m = message(run(&["--config", file.with(text)]));
        assert!(m.contains(key), "{text:?}: {m}");
    }
}

#[test]
fn flags_win_over_the_file() {
    let file = File::new("settings");
    let f = file.with("workers = 3\nshm_size = \"8m\"\n[etcd]\nname = \"FILE\"\n");
    let s = run(&["--config", f]).expect("ok");
    assert_eq!(
        (s.workers, s.shm_size, s.name.as_str()),
        (3, 8 << 20, "FILE")
    );
    let s = run(&["--config", f, "--workers=5", "--name", "FLAG"]).expect("ok");
    assert_eq!((s.workers, s.name.as_str()), (5, "FLAG"));
    let f = file.with("lisen = [\"x\"]\n");
    assert!(message(run(&["--config", f])).contains("lisen"));
}

#[test]
fn health_and_log_checks_are_read_and_bounded() {
    let file = File::new("health");
    let s = run(&[
        "--config",
        file.with(
            "[healthcheck]\nenable = true\ninterval = 0.5\npanic_threshold = 50\n\
             [logcheck]\nenable = true\ninterval = 5\nrecover = 10\n",
        ),
    ])
    .expect("ok");
    assert!(s.healthcheck.enable && s.logcheck.enable);
    assert_eq!(s.healthcheck.interval, Duration::from_millis(500));
    assert_eq!(s.healthcheck.panic_threshold, 50);
    assert_eq!(s.logcheck.recover, Duration::from_secs(10));
    for (text, key) in [
        (
            "[healthcheck]\npanic_threshold = 101\n",
            "healthcheck.panic_threshold",
        ),
        ("[logcheck]\ninterval = 4\n", "logcheck.interval"),
        (
            "[logcheck]\ninterval = 5\nrecover = 9\n",
            "logcheck.recover",
        ),
    ] {
        let m = message(run(&["--config", file.with(text)]));
        assert!(m.contains(key), "{text:?}: {m}");
    }
}

#[test]
fn bad_flags_name_their_setting() {
    assert!(message(run(&["--workers", "lots"])).starts_with("--workers: "));
    assert!(message(run(&["--shm-size", "12q"])).starts_with("--shm-size: "));
    assert!(message(run(&["--admin", "unix:"])).starts_with("--admin: "));
    assert!(message(run(&["--admin-allow", "10.0.0.0/33"])).contains("--admin-allow"));
    assert!(message(run(&["--bogus"])).contains("--bogus"));
    assert!(message(run(&["--workers"])).contains("--workers"));
}

#[test]
fn check_asks_for_the_listing() {
    match from_args(["--check".to_string(), "--workers=2".to_string()]) {
        Ok(Command::Check(s)) => {
            let listing = s.to_string();
            assert!(listing.lines().any(|l| l == "workers = 2"), "{listing}");
            assert!(
                listing.lines().any(|l| l == "timeouts.keepalive = 65"),
                "{listing}"
            );
        }
        other => panic!("expected a check, got {other:?}"),
    }
}

#[test]
fn networks_with_or_without_a_prefix() {
    let n = parse_network("x", "10.1.0.0/16").expect("network");
    assert!(n.contains(&"10.1.2.3".parse::<IpAddr>().expect("ip")));
    let host = parse_network("x", "::1").expect("a bare address is one host");
    assert_eq!(host.prefix_len(), 128);
    assert!(parse_network("x", "10.0.0.0/33").is_err());
    assert!(parse_network("x", "nope").is_err());
}

#[test]
fn a_timeout_under_a_millisecond_is_one() {
    let file = File::new("timeouts");
    let s = run(&["--config", file.with("[timeouts]\nconnect = 0.0001\n")]).expect("ok");
    assert_eq!(s.timeouts.connect_ms, 1);
}
