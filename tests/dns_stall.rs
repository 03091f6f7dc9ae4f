//! A peer given by host name is resolved without the store's lock and off
//! the etcd thread's runtime: while a resolver does not answer, changes
//! through the admin API and through etcd to other upstreams and domains
//! apply at once, and the upstream whose peer does not resolve keeps the
//! peers it had.
//!
//! The slow resolver is real: elb runs in a mount namespace of its own
//! where `/etc/resolv.conf` names a nameserver on a loopback address, on
//! which this test receives the queries and never answers (the system's
//! resolver then waits 30 s per try). That needs root (mount namespaces,
//! port 53); without it the test says why and passes without checking.

mod common;

use std::ffi::CString;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use common::backend::{Backend, admin_get, to_backend};
use common::etcd::{Etcd, elb_on, expect_served, rules_to, served_by};
use common::{Elb, HttpConn, TempDir, wait_until};

/// Where the silent nameserver listens (any loopback address works).
const NAMESERVER: &str = "127.0.0.153";
/// The resolver's own wait for an answer: glibc's longest. With the lock
/// held across a lookup, nothing else could change for this long.
const RESOLV_CONF: &str = "nameserver 127.0.0.153\noptions timeout:30 attempts:1\n";
const HOSTNAME_PEER: &str = "slow.elb.test:8080";
/// Well below the resolver's 30 s, well above what a prompt change takes
/// even on a loaded machine.
const PROMPT: Duration = Duration::from_secs(10);

/// A nameserver that receives queries and never answers.
struct SilentDns {
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentDns {
    fn start() -> Result<SilentDns, String> {
        let addr: SocketAddr = format!("{NAMESERVER}:53").parse().expect("address");
        let sock = UdpSocket::bind(addr).map_err(|e| format!("cannot bind udp {addr}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s) = (Arc::clone(&queries), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Acquire) {
                if sock.recv_from(&mut buf).is_ok() {
                    q.fetch_add(1, Ordering::AcqRel);
                }
            }
        });
        Ok(SilentDns {
            queries,
            stop,
            thread: Some(thread),
        })
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Acquire)
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// An `elb` in a mount namespace of its own, and the thread that started
/// it: the thread lives as long as elb (the harness starts elb with a
/// parent-death signal, sent when the thread that started it ends).
struct NamespacedElb {
    elb: Elb,
    /// Dropped after `elb` (fields drop in order): lets the thread end.
    _release: mpsc::Sender<()>,
}

/// Starts `elb` in a new mount namespace where `/etc/resolv.conf` is
/// `resolv_conf`. The namespace is made on a thread of its own (a mount
/// namespace belongs to the thread that unshares it, and to the processes
/// it starts), so the test's other threads keep the real one.
fn elb_with_resolv_conf(
    builder: common::ElbBuilder,
    resolv_conf: &Path,
) -> Result<NamespacedElb, String> {
    let src = cstr(resolv_conf);
    let (started_tx, started) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let namespace = || {
            // SAFETY: plain system calls on this thread; the strings are
            // NUL-terminated and outlive the calls.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(format!(
                        "unshare(CLONE_NEWNS): {}",
                        std::io::Error::last_os_error()
                    ));
                }
                // Mounts made here must not propagate back to the host.
                if libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(format!(
                        "making / private: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                if libc::mount(
                    src.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(format!(
                        "bind-mounting /etc/resolv.conf: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            Ok(())
        };
        let result = namespace().map(|()| builder.start());
        let started_ok = result.is_ok();
        if started_tx.send(result).is_ok() && started_ok {
            // Until the test drops its end.
            let _ = released.recv();
        }
    });
    let elb = started
        .recv()
        .map_err(|_| "the namespace thread died".to_string())??;
    Ok(NamespacedElb {
        elb,
        _release: release,
    })
}

/// An admin `PUT`, on a thread with a long timeout: with the lock held
/// across a lookup it would wait for the resolver.
fn admin_put_in_background(
    admin: SocketAddr,
    path: &'static str,
    body: String,
) -> JoinHandle<Result<u16, String>> {
    std::thread::spawn(move || {
        let mut c = HttpConn::connect(admin, Duration::from_secs(120))
            .map_err(|e| format!("connect admin: {e}"))?;
        c.request(
            "PUT",
            "127.0.0.1",
            path,
            &[
                ("Content-Type", "application/json"),
                ("Connection", "close"),
            ],
            body.as_bytes(),
        )
        .map(|r| r.status)
        .map_err(|e| format!("PUT {path}: {e}"))
    })
}

#[test]
fn a_silent_resolver_holds_up_nothing_and_its_upstream_keeps_its_peers() {
    let dns = match SilentDns::start() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIPPED: no silent nameserver on {NAMESERVER}:53 ({why}); needs root");
            return;
        }
    };
    let etcd = Etcd::start();
    let kv = etcd.kv();
    let dir = TempDir::new("dns");
    let conf = dir.write("resolv.conf", RESOLV_CONF);
    let ns = match elb_with_resolv_conf(elb_on(&etcd.endpoints(), "ELBDNS"), &conf) {
        Ok(e) => e,
        Err(why) => {
            println!("SKIPPED: cannot give elb its own /etc/resolv.conf ({why}); needs root");
            return;
        }
    };
    let elb = &ns.elb;
    let seen = std::fs::read_to_string(format!("/proc/{}/root/etc/resolv.conf", elb.pid()))
        .expect("elb's resolv.conf");
    assert_eq!(seen, RESOLV_CONF, "elb does not see the test's resolv.conf");

    let old = Backend::start("old");
    let other = Backend::start("other");
    let adm = Backend::start("adm");
    kv.put(&format!("/ELBDNS/upstreams/u1/{}", old.host_port()), "");
    kv.put("/ELBDNS/rules/a.test", &rules_to("u1"));
    expect_served(elb, "a.test", "old", PROMPT);

    // u1 gains a peer by host name: elb asks the silent nameserver.
    kv.put(&format!("/ELBDNS/upstreams/u1/{HOSTNAME_PEER}"), "");
    let asked = Instant::now();
    assert!(
        wait_until(PROMPT, || dns.queries() > 0),
        "elb never asked the nameserver; stderr:\n{}",
        elb.stderr()
    );

    // While the name is pending: a change through the admin API...
    let admin = elb.admin_addr();
    let put = admin_put_in_background(
        admin,
        "/__erulb__/upstream",
        json!({"u2": {adm.host_port(): ""}}).to_string(),
    );
    // ...and one through etcd, to other upstreams and domains.
    kv.put(&format!("/ELBDNS/upstreams/u3/{}", other.host_port()), "");
    kv.put("/ELBDNS/rules/c.test", &rules_to("u3"));
    let etcd_ok = wait_until(PROMPT, || {
        served_by(elb.listen_addr(), "c.test").as_deref() == Some("other")
    });
    println!(
        "etcd change applied: {etcd_ok}, {:?} after the lookup began",
        asked.elapsed()
    );
    let admin_ok = wait_until(PROMPT, || put.is_finished());
    println!(
        "admin change answered: {admin_ok}, {:?} after the lookup began",
        asked.elapsed()
    );
    assert!(
        etcd_ok && admin_ok,
        "while a peer name was being resolved, within {PROMPT:?}: c.test (set through etcd) \
         served: {etcd_ok}; an admin PUT answered: {admin_ok}; stderr:\n{}",
        elb.stderr()
    );
    assert_eq!(put.join().expect("admin thread"), Ok(200));
    let put = admin_put_in_background(
        admin,
        "/__erulb__/domain",
        json!({"b.test": to_backend("u2")}).to_string(),
    );
    expect_served(elb, "b.test", "adm", PROMPT);
    assert_eq!(put.join().expect("admin thread"), Ok(200));
    assert_eq!(
        served_by(elb.listen_addr(), "a.test").as_deref(),
        Some("old")
    );

    // The name never resolves: u1 keeps the peers it had, and says so.
    let warned = wait_until(PROMPT, || {
        elb.stderr()
            .lines()
            .any(|l| l.contains("upstream u1 left unchanged") && l.contains(HOSTNAME_PEER))
    });
    println!(
        "u1's change was refused {:?} after the lookup began",
        asked.elapsed()
    );
    assert!(
        warned,
        "no warning naming {HOSTNAME_PEER}; stderr:\n{}",
        elb.stderr()
    );
    let ups = admin_get(admin, "/__erulb__/upstream");
    let names: Vec<&str> = ups["u1"]
        .as_array()
        .map(|peers| peers.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec![old.host_port().as_str()], "u1: {}", ups["u1"]);
    for _ in 0..5 {
        assert_eq!(
            served_by(elb.listen_addr(), "a.test").as_deref(),
            Some("old")
        );
    }
}
