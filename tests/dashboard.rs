//! The dashboard (`GET /__erulb__/`), opened in a real headless Chromium
//! (Debian's `chromium`, which `scripts/test` installs): it draws the
//! domains' rule graphs and the upstreams' peers from the JSON endpoints
//! with no JavaScript error, a screenshot is saved, and a client outside
//! the admin allow list gets 403.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use common::backend::{admin, get, put_domains, put_upstreams};
use common::health::HealthBackend;
use common::{Capture, Elb, TempDir};

const CHROMIUM: &str = "/usr/bin/chromium";
/// Chromium's own start can be slow on a loaded machine; this bounds it.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs headless Chromium on `url` with `args` (`--dump-dom`,
/// `--screenshot=…`) in a profile of its own; returns what it printed.
/// It is killed, by PID, if it outlives [`BROWSER_TIMEOUT`].
fn chromium(url: &str, args: &[String], profile: &Path) -> (String, String) {
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            // Time enough for the first fetches and a few refreshes.
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chromium (scripts/test installs it)");
    let out = Capture::start(child.stdout.take().expect("stdout"));
    let err = Capture::start(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish: {}", err.text());
            }
        }
    }
    out.wait_eof(Duration::from_secs(10));
    err.wait_eof(Duration::from_secs(10));
    (out.text(), err.text())
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

#[test]
fn the_dashboard_draws_domains_rules_and_peers_without_error() {
    let elb = Elb::builder().workers(2).start();
    let (a, b) = (HealthBackend::start("a"), HealthBackend::start("b"));
    put_upstreams(
        elb.admin_addr(),
        &json!({
            "web": {a.host_port(): "weight=3", b.host_port(): "weight=1"},
            "blog": {b.host_port(): ""}
        }),
    );
    put_domains(
        elb.admin_addr(),
        &json!({
            "shop.test": {"init": "by_agent", "rules": {
                "by_agent": {"type": "ua", "args": {"pattern": "curl", "succ": "to_blog", "fail": "blog_path"}},
                "blog_path": {"type": "path", "args": {"pattern": "/blog/", "succ": "to_blog", "fail": "throttle"}},
                "throttle": {"type": "limit", "args": {"rate": "10r/s", "burst": 5, "succ": "to_web"}},
                "to_blog": {"type": "backend", "args": {"servername": "blog"}},
                "to_web": {"type": "backend", "args": {"servername": "web"}}
            }},
            "api.test": {"init": "only", "rules": {
                "only": {"type": "backend", "args": {"servername": "web"}}
            }}
        }),
    );
    for _ in 0..8 {
        assert_eq!(get(elb.listen_addr(), "api.test", "/", &[]).status, 200);
    }

    let url = format!("http://{}/__erulb__/", elb.admin_addr());
    let profile = TempDir::new("chromium");
    let (dom, log) = chromium(&url, &["--dump-dom".into()], profile.path());
    // The page ran to its first full refresh, and counted no error.
    assert!(
        dom.contains(r#"data-ready="1""#),
        "not ready:\n{dom}\n{log}"
    );
    assert!(dom.contains(r#"data-js-errors="0""#), "{dom}\n{log}");
    assert!(!log.contains("Uncaught"), "{log}");
    // What the test set is on the page: domains, each rule as a node of
    // the graph, each upstream's peers.
    for domain in ["shop.test", "api.test"] {
        assert!(
            dom.contains(&format!(r#"data-name="{domain}""#)),
            "{domain}:\n{dom}"
        );
    }
    for rule in [
        "by_agent",
        "blog_path",
        "throttle",
        "to_blog",
        "to_web",
        "only",
    ] {
        assert!(
            dom.contains(&format!(r#"data-rule="{rule}""#)),
            "{rule}:\n{dom}"
        );
    }
    // A limit draws with its rate, and its end without `fail` says 429.
    assert!(dom.contains("limit 10r/s +5 by remote_"), "{dom}");
    assert!(dom.contains(">429<"), "{dom}");
    assert!(dom.contains(r#"data-upstream="web""#), "{dom}");
    assert!(dom.contains(r#"data-upstream="blog""#), "{dom}");
    for peer in [a.host_port(), b.host_port()] {
        assert!(
            dom.contains(&format!(r#"data-peer="{peer}""#)),
            "{peer}:\n{dom}"
        );
    }

    let shot = target_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile = TempDir::new("chromium");
    chromium(
        &url,
        &[format!("--screenshot={}", shot.display())],
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "a blank screenshot: {} bytes",
        png.len()
    );
    println!("dashboard screenshot: {}", shot.display());
}

#[test]
fn a_thousand_domains_start_collapsed_and_the_list_is_capped() {
    let elb = Elb::builder().workers(1).start();
    let sets: serde_json::Map<String, serde_json::Value> = (0..1000)
        .map(|i| {
            (
                format!("d{i:04}.test"),
                json!({"init": "r", "rules": {"r": {"type": "backend", "args": {"servername": "web"}}}}),
            )
        })
        .collect();
    put_domains(elb.admin_addr(), &serde_json::Value::Object(sets));
    let url = format!("http://{}/__erulb__/", elb.admin_addr());
    let profile = TempDir::new("chromium");
    let (dom, log) = chromium(&url, &["--dump-dom".into()], profile.path());
    assert!(dom.contains(r#"data-ready="1""#), "not ready:\n{log}");
    assert!(dom.contains(r#"data-js-errors="0""#), "{log}");
    assert!(dom.contains(r#"id="domain-count">1000 of 1000<"#), "{dom}");
    // The first 200 are listed, closed, so no graph is drawn; the search
    // reaches the others.
    assert!(dom.contains(r#"data-name="d0199.test""#));
    assert!(!dom.contains(r#"data-name="d0200.test""#));
    assert!(dom.contains("800 more: narrow the search"));
    assert!(!dom.contains("data-rule="), "closed groups draw nothing");
}

#[test]
fn the_dashboard_obeys_the_admin_allow_list() {
    let elb = Elb::builder()
        .args(["--admin-allow", "10.9.9.0/24"])
        .start();
    let page = admin(elb.admin_addr(), "GET", "/__erulb__/", None);
    assert_eq!(page.status, 403, "{}", page.text);
    // Through a proxy listener too.
    let proxied = get(elb.listen_addr(), "any.test", "/__erulb__/", &[]);
    assert_eq!(proxied.status, 403);

    let open = Elb::builder().start();
    let page = admin(open.admin_addr(), "GET", "/__erulb__/", None);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    // One page, nothing fetched from elsewhere.
    assert!(page.text.contains("<script>") && page.text.contains("<style>"));
    for outside in ["src=", "href=", "@import", "url(http", "https://"] {
        assert!(!page.text.contains(outside), "the page names {outside}");
    }
    // The one address in it is SVG's namespace, a name and not a fetch.
    assert_eq!(
        page.text.matches("http://").count(),
        page.text.matches("http://www.w3.org/2000/svg").count()
    );
}
