//! SPEC 1, processes: the master, its workers, respawning, signals.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::{
    EVENTUALLY, Elb, HttpConn, cmdline, connection_refused, http_get, http_get_timeout, parent_of,
    pid_alive, server_unread_bytes, signal, wait_until,
};

/// What every worker answers while no route is configured.
const NO_ROUTE: u16 = 404;

/// `--shutdown-timeout` of the tests that stop elb: far beyond
/// [`EVENTUALLY`], so that a master that exits within that has not waited
/// it out, however slow the machine.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn two_workers_are_children_of_the_master() {
    let elb = Elb::builder().workers(2).start();
    let workers = elb.wait_workers(2, EVENTUALLY);
    for &w in &workers {
        assert_eq!(
            parent_of(w),
            Some(elb.pid()),
            "worker {w} is not a child of the master"
        );
        let args = cmdline(w);
        assert_eq!(
            args.get(..2),
            Some(&["elb-worker".to_string(), "worker".to_string()][..]),
            "cmdline of {w}: {args:?}"
        );
    }
    assert_eq!(
        elb.children(),
        workers,
        "the master has children other than its 2 workers"
    );
    let (status, _, _) = http_get(elb.listen_addr(), "any.test", "/").expect("a request");
    assert_eq!(status, NO_ROUTE);
}

/// A client that makes requests one after another, each on a new
/// connection, and counts the answers. It can be paused between two
/// requests: a request that the killed worker had already accepted dies with
/// it (as in nginx), so the test kills a worker only while no request is in
/// flight; every request after that must be answered.
struct Client {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    slowest: Arc<Mutex<Duration>>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    const MAX_REQUESTS: u64 = 50_000;
    /// Only against a runaway thread: the test stops the client.
    const MAX_TIME: Duration = Duration::from_secs(600);

    fn start(addr: std::net::SocketAddr) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let slowest = Arc::new(Mutex::new(Duration::ZERO));
        let thread = {
            let (stop, pause, paused) = (stop.clone(), pause.clone(), paused.clone());
            let (ok, failures, slowest) = (ok.clone(), failures.clone(), slowest.clone());
            std::thread::spawn(move || {
                let began = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire)
                    && n < Self::MAX_REQUESTS
                    && began.elapsed() < Self::MAX_TIME
                {
                    if pause.load(Ordering::Acquire) {
                        paused.store(true, Ordering::Release);
                        while pause.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        paused.store(false, Ordering::Release);
                        continue;
                    }
                    n += 1;
                    let t = Instant::now();
                    // Up to ~1 s when queued on a dead worker's socket.
                    let r = http_get_timeout(addr, "flow.test", &format!("/{n}"), EVENTUALLY);
                    let took = t.elapsed();
                    {
                        let mut s = slowest.lock().unwrap_or_else(|e| e.into_inner());
                        *s = (*s).max(took);
                    }
                    match r {
                        Ok((NO_ROUTE, _, _)) => {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok((status, _, body)) => failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!(
                                "request {n}: status {status} ({})",
                                String::from_utf8_lossy(&body)
                            )),
                        Err(e) => failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("request {n}: {e} after {took:?}")),
                    }
                }
            })
        };
        Client {
            stop,
            pause,
            paused,
            ok,
            failures,
            slowest,
            thread: Some(thread),
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }

    fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the client is between two requests and holds it there.
    fn pause(&self) -> bool {
        self.pause.store(true, Ordering::Release);
        wait_until(EVENTUALLY, || self.paused.load(Ordering::Acquire))
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    /// Stops the client; returns (answered, failures, slowest request).
    fn finish(mut self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("client thread");
        }
        let slowest = *self.slowest.lock().unwrap_or_else(|e| e.into_inner());
        (self.ok(), self.failures(), slowest)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.pause.store(false, Ordering::Release);
    }
}

#[test]
fn a_killed_worker_is_replaced_and_requests_keep_flowing() {
    let elb = Elb::builder().workers(2).start();
    let addr = elb.listen_addr();
    let before = elb.wait_workers(2, EVENTUALLY);
    let client = Client::start(addr);
    assert!(
        wait_until(EVENTUALLY, || client.ok() >= 50
            || !client.failures().is_empty()),
        "the client got only {} answers before the kill",
        client.ok()
    );
    assert!(
        client.failures().is_empty(),
        "failures before the kill: {:?}",
        client.failures()
    );

    let victim = before[0];
    assert!(client.pause(), "the client did not pause");
    signal(victim, Signal::SIGKILL);
    let killed_at = Instant::now();
    client.resume();

    let mut after = Vec::new();
    let replaced = wait_until(EVENTUALLY, || {
        after = elb.workers();
        after.len() == 2 && !after.contains(&victim)
    });
    let took = killed_at.elapsed();
    // SPEC 1 asks for a new worker within 1 s: printed, as a loaded
    // machine can make it later.
    eprintln!("worker {victim} killed; replaced after {took:?}: workers {before:?} -> {after:?}");

    // Keep the requests flowing a while after the replacement too.
    let ok_then = client.ok();
    wait_until(EVENTUALLY, || client.ok() >= ok_then + 100);
    let (answered, failures, slowest) = client.finish();
    eprintln!(
        "client: {answered} answered, {} failed, slowest {slowest:?}",
        failures.len()
    );

    assert!(
        replaced,
        "no new worker {took:?} after the kill: workers {after:?}"
    );
    assert!(
        after.contains(&before[1]),
        "the other worker {} is gone: {after:?}",
        before[1]
    );
    assert!(
        answered >= ok_then + 100,
        "requests stopped flowing: {answered} answered"
    );
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:#?}",
        failures.len()
    );
}

/// Connections that the kernel queued on a worker's socket when it died are
/// served by its successor (the master keeps every socket open). The worker
/// is stopped (SIGSTOP) first, so that connections pile up on its socket
/// before it is killed.
#[test]
fn connections_queued_for_a_killed_worker_are_served_by_its_successor() {
    const CONNS: usize = 20;
    let elb = Elb::builder().workers(2).start();
    let addr = elb.listen_addr();
    let before = elb.wait_workers(2, EVENTUALLY);
    let victim = before[0];
    signal(victim, Signal::SIGSTOP);
    assert!(
        wait_until(EVENTUALLY, || common::process_state(victim) == Some('T')),
        "worker {victim} did not stop: state {:?}",
        common::process_state(victim)
    );

    let mut conns: Vec<HttpConn> = (0..CONNS)
        .map(|i| {
            let mut c = HttpConn::connect(addr, EVENTUALLY).expect("connect");
            c.send_request(
                "GET",
                "queued.test",
                &format!("/{i}"),
                &[("Connection", "close")],
                b"",
            )
            .expect("send");
            c
        })
        .collect();
    let answered = |c: &HttpConn| {
        let s = c.stream();
        s.set_nonblocking(true).expect("nonblocking");
        let got = matches!(s.peek(&mut [0u8; 1]), Ok(n) if n > 0);
        s.set_nonblocking(false).expect("blocking");
        got
    };
    // The other worker answers its share; the rest waits, unread, on the
    // stopped worker's socket.
    let mut queued = 0;
    let settled = wait_until(EVENTUALLY, || {
        let (mut done, mut waiting) = (0, 0);
        for c in &conns {
            if answered(c) {
                done += 1;
            } else if server_unread_bytes(addr, c.local_addr()).is_some_and(|n| n > 0) {
                waiting += 1;
            }
        }
        queued = waiting;
        done + waiting == CONNS && waiting > 0
    });
    eprintln!("{queued} of {CONNS} connections queued on the stopped worker {victim}");
    assert!(
        settled,
        "connections neither answered nor queued ({queued} queued)"
    );

    signal(victim, Signal::SIGKILL);
    let killed_at = Instant::now();
    for (i, c) in conns.iter_mut().enumerate() {
        match c.read_response() {
            Ok(r) => assert_eq!(r.status, NO_ROUTE, "connection {i}: {r:?}"),
            Err(e) => panic!("connection {i} was not answered after the kill: {e}"),
        }
    }
    eprintln!(
        "all {CONNS} answered {:?} after the kill",
        killed_at.elapsed()
    );
    let after = elb.wait_workers(2, EVENTUALLY);
    assert!(
        !after.contains(&victim) && after.contains(&before[1]),
        "workers {before:?} -> {after:?}"
    );
}

/// SIGTERM or SIGINT: exit 0 without waiting out the shutdown timeout, with
/// no worker left; an idle keep-alive connection does not hold the stop back.
fn stops_gracefully_on(sig: Signal) {
    let mut elb = Elb::builder()
        .workers(2)
        .args([
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
        ])
        .start();
    let addr = elb.listen_addr();
    let workers = elb.wait_workers(2, EVENTUALLY);
    let mut idle = HttpConn::connect(addr, EVENTUALLY).expect("connect");
    let r = idle
        .request("GET", "idle.test", "/", &[], b"")
        .expect("a keep-alive request");
    assert_eq!(r.status, NO_ROUTE);

    let sent = Instant::now();
    elb.signal(sig);
    // No request in flight: no reason to wait for the shutdown timeout.
    let status = elb.wait_exit(EVENTUALLY);
    let took = sent.elapsed();
    eprintln!("{sig}: master exited ({status:?}) after {took:?}");
    let status = status.unwrap_or_else(|| {
        panic!("the master still runs {took:?} after {sig} (shutdown timeout {SHUTDOWN_TIMEOUT:?})")
    });
    assert_eq!(status.code(), Some(0), "exit status after {sig}: {status}");
    assert!(idle.closed_by_peer(), "the idle connection was not closed");
    assert!(
        wait_until(EVENTUALLY, || workers.iter().all(|&w| !pid_alive(w))),
        "workers left after {sig}: {:?}",
        workers
            .iter()
            .filter(|&&w| pid_alive(w))
            .collect::<Vec<_>>()
    );
    assert!(connection_refused(addr), "{addr} still accepts connections");
}

#[test]
fn sigterm_exits_zero_and_leaves_no_process() {
    stops_gracefully_on(Signal::SIGTERM);
}

#[test]
fn sigint_likewise() {
    stops_gracefully_on(Signal::SIGINT);
}

/// Opens a connection, has it served once (so a worker holds it), then
/// sends the start of a second request and waits until the worker has read
/// it: the worker now holds an unfinished request.
fn request_in_flight(addr: std::net::SocketAddr) -> HttpConn {
    let mut conn = HttpConn::connect(addr, EVENTUALLY).expect("connect");
    let r = conn
        .request("GET", "inflight.test", "/first", &[], b"")
        .expect("first request");
    assert_eq!(r.status, NO_ROUTE);
    conn.send(b"GET /second HTTP/1.1\r\nHost: inflight.test\r\n")
        .expect("send a partial head");
    let client = conn.local_addr();
    assert!(
        wait_until(EVENTUALLY, || server_unread_bytes(addr, client) == Some(0)),
        "the worker did not read the partial request (unread: {:?})",
        server_unread_bytes(addr, client)
    );
    conn
}

/// SIGQUIT: exit without waiting for a request in flight (nor for the
/// shutdown timeout); the request is dropped.
#[test]
fn sigquit_stops_without_waiting_for_the_request_in_flight() {
    let mut elb = Elb::builder()
        .workers(2)
        .args([
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
        ])
        .start();
    let addr = elb.listen_addr();
    let workers = elb.wait_workers(2, EVENTUALLY);
    let mut conn = request_in_flight(addr);

    let sent = Instant::now();
    elb.signal(Signal::SIGQUIT);
    let status = elb.wait_exit(EVENTUALLY);
    let took = sent.elapsed();
    eprintln!("SIGQUIT: master exited ({status:?}) after {took:?}");
    let status = status.unwrap_or_else(|| {
        panic!("the master still runs {took:?} after SIGQUIT: it waits for the in-flight request")
    });
    assert!(
        status.code().is_some(),
        "the master was killed by a signal: {status}"
    );
    assert!(
        wait_until(EVENTUALLY, || workers.iter().all(|&w| !pid_alive(w))),
        "workers left after SIGQUIT"
    );
    // The unfinished request is dropped, not answered.
    conn.send(b"\r\n").ok();
    match conn.read_response() {
        Ok(r) => panic!(
            "the in-flight request was answered {} after SIGQUIT",
            r.status
        ),
        Err(e) => eprintln!("in-flight request after SIGQUIT: {e}"),
    }
    assert!(connection_refused(addr), "{addr} still accepts connections");
}

#[test]
fn sigkill_of_the_master_takes_its_workers() {
    let mut elb = Elb::builder().workers(2).start();
    let addr = elb.listen_addr();
    let workers = elb.wait_workers(2, EVENTUALLY);

    let sent = Instant::now();
    elb.signal(Signal::SIGKILL);
    assert!(
        elb.wait_exit(EVENTUALLY).is_some(),
        "the master survived SIGKILL"
    );
    let gone = wait_until(EVENTUALLY, || workers.iter().all(|&w| !pid_alive(w)));
    let took = sent.elapsed();
    eprintln!("master SIGKILLed; workers {workers:?} gone after {took:?}");
    assert!(
        gone,
        "workers still alive {took:?} after the master died: {:?}",
        workers
            .iter()
            .filter(|&&w| pid_alive(w))
            .collect::<Vec<_>>()
    );
    assert!(connection_refused(addr), "{addr} still accepts connections");
}

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    let mut elb = Elb::builder()
        .workers(2)
        .args([
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
        ])
        .start();
    let addr = elb.listen_addr();
    let workers = elb.wait_workers(2, EVENTUALLY);
    let mut conn = request_in_flight(addr);

    let sent = Instant::now();
    elb.signal(Signal::SIGTERM);
    // New connections are refused at once, while the old one is served.
    let refused = wait_until(EVENTUALLY, || connection_refused(addr));
    let closed_after = sent.elapsed();
    eprintln!("SIGTERM: listener closed after {closed_after:?}");
    assert!(
        refused,
        "{addr} still accepts new connections {closed_after:?} after SIGTERM"
    );
    assert!(
        elb.running(),
        "the master exited ({:?}) with a request in flight",
        elb.try_exit()
    );
    assert!(
        workers.iter().any(|&w| pid_alive(w)),
        "no worker is left to finish the in-flight request"
    );

    conn.send(b"\r\n").expect("finish the request");
    let r = conn
        .read_response()
        .expect("the in-flight request is answered after SIGTERM");
    assert_eq!(r.status, NO_ROUTE, "{r:?}");
    assert_eq!(
        r.header("content-length")
            .and_then(|l| l.parse::<usize>().ok()),
        Some(r.body.len())
    );

    // The request is done: no reason to wait for the shutdown timeout.
    let status = elb.wait_exit(EVENTUALLY);
    let took = sent.elapsed();
    eprintln!("SIGTERM: master exited ({status:?}) after {took:?}");
    let status = status.unwrap_or_else(|| {
        panic!(
            "the master still runs {took:?} after SIGTERM although the request was done (shutdown timeout {SHUTDOWN_TIMEOUT:?})"
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(
        wait_until(EVENTUALLY, || workers.iter().all(|&w| !pid_alive(w))),
        "workers left after SIGTERM"
    );
}

/// A worker that dies young, again and again, is restarted with a growing
/// delay, and the master says so in its log. Provoked from outside: each
/// successor is killed as soon as it runs, well within the 2 s that count
/// as a quick exit.
#[test]
fn a_crash_looping_worker_is_logged() {
    let elb = Elb::builder().workers(1).start();
    let mut current = elb.wait_workers(1, EVENTUALLY)[0];
    let mut killed = Vec::new();
    for round in 0..3 {
        signal(current, Signal::SIGKILL);
        killed.push(current);
        let mut next = None;
        let back = wait_until(EVENTUALLY, || {
            next = elb.workers().into_iter().find(|w| !killed.contains(w));
            next.is_some()
        });
        assert!(back, "round {round}: no worker after killing {current}");
        current = next.unwrap_or_default();
    }
    let last = *killed.last().unwrap_or(&0);
    let logged = wait_until(EVENTUALLY, || {
        elb.stderr()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(&last.to_string()))
    });
    eprintln!("killed {killed:?}; stderr:\n{}", elb.stderr());
    assert!(
        logged,
        "no ERROR line about the crash-looping worker (pid {last})"
    );
    // The slot is served again.
    let (status, _, _) =
        http_get(elb.listen_addr(), "any.test", "/").expect("a request after the crash loop");
    assert_eq!(status, NO_ROUTE);
}

/// The master starts workers through a descriptor of its own binary; each
/// worker closes its inherited copy, and holds nothing of that file.
#[test]
fn workers_run_the_masters_binary_and_keep_no_descriptor_of_it() {
    let elb = Elb::builder().workers(2).start();
    let binary = std::fs::canonicalize(common::ELB).expect("the elb binary");
    for w in elb.workers() {
        let exe = std::fs::read_link(format!("/proc/{w}/exe")).expect("exe");
        assert_eq!(exe, binary, "worker {w} runs {exe:?}");
        for fd in std::fs::read_dir(format!("/proc/{w}/fd"))
            .expect("fds")
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(target, binary, "worker {w} holds {:?}", fd.path());
        }
    }
}
