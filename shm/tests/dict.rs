//! The shared dictionary: semantics in one process, and then real processes
//! (this test binary re-executed as children that attach to the region's
//! memfd) hammering it and being SIGKILLed while they hold its lock. The
//! binary has its own `main` (`harness = false`): started with a role in
//! `ROLE_ENV`, it plays that child; otherwise it runs the tests.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use elb_shm::Region;
use elb_shm::dict::{Dict, DictError, SetOutcome, Value};
use libtest_mimic::{Arguments, Trial};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};

const ROLE_ENV: &str = "ELB_DICT_TEST_ROLE";
const FD_ENV: &str = "ELB_DICT_TEST_FD";
const ARG_ENV: &str = "ELB_DICT_TEST_ARG";

const MIB: usize = 1 << 20;
const NO_EVICTION: SetOutcome = SetOutcome { forcible: false };

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Polls `f` every millisecond until it holds; false past `limit`.
fn poll_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(ms(1));
    }
}

/// Asserts a TTL read after setting `set_to` at (or after) `since`: what
/// can have elapsed is measured, so a stalled test process cannot fail it.
/// The dictionary's clock counts whole milliseconds, so its reading may be
/// one behind ours at each end.
fn assert_ttl_since(ttl: Duration, set_to: Duration, since: Instant) {
    let elapsed = since.elapsed();
    assert!(
        ttl <= set_to && ttl + elapsed + ms(2) >= set_to,
        "TTL {ttl:?} of {set_to:?} set {elapsed:?} ago"
    );
}

/// Whether checks made since `set_at` ran before an item stored then with
/// `ttl` could have expired. When the machine stalled the test for that
/// long, the caller skips what only holds before expiry (and says so).
fn before_expiry(set_at: Instant, ttl: Duration) -> bool {
    let elapsed = set_at.elapsed();
    // Two whole-millisecond clock readings: one of slack each.
    let early = elapsed + ms(2) < ttl;
    if !early {
        println!("{elapsed:?} passed since a {ttl:?} item was set: its presence is not checked");
    }
    early
}

/// Runs `f` on another thread and waits for it at most `limit`: a lock that
/// hangs fails the test instead of hanging it.
fn with_deadline<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(e) => panic!("{what}: no answer within {limit:?} ({e})"),
    }
}

fn int(d: &Dict<'_>, key: &str) -> Option<i64> {
    match d.get(key.as_bytes()).expect("get") {
        Some((Value::Int(v), _)) => Some(v),
        Some(other) => panic!("{key} holds {other:?}"),
        None => None,
    }
}

fn bytes(b: u8, n: usize) -> Value {
    Value::Bytes(vec![b; n])
}

/// xorshift64*, enough to vary sizes and timings.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng((seed ^ t ^ u64::from(std::process::id())).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// Child processes.

/// A child process running one `child_*` function of this binary; killed (by its
/// PID) and reaped on drop, whatever happened.
struct ChildProc {
    child: Child,
}

impl ChildProc {
    fn spawn(region: &Region, role: &str, arg: &str) -> ChildProc {
        let fd: RawFd = region.fd().as_raw_fd();
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.env(ROLE_ENV, role)
            .env(FD_ENV, fd.to_string())
            .env(ARG_ENV, arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only makes two system
        // calls (prctl, fcntl), both async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the test thread that spawned us.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `fd` is the region's memfd, open in the parent and
                // so in this forked child.
                let memfd = BorrowedFd::borrow_raw(fd);
                fcntl(memfd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                Ok(())
            })
        };
        ChildProc {
            child: cmd.spawn().expect("spawn child"),
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, or `None` if still running after `limit`.
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut status = None;
        poll_until(limit, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// In a child: the region passed by the parent, and the role's argument.
fn child_region() -> (Region, String) {
    let fd: RawFd = std::env::var(FD_ENV)
        .expect("fd variable")
        .parse()
        .expect("fd");
    // SAFETY: the parent left this descriptor open (without CLOEXEC) for us
    // alone; nothing else in this process owns it.
    let region = Region::attach(unsafe { OwnedFd::from_raw_fd(fd) }).expect("attach");
    (region, std::env::var(ARG_ENV).unwrap_or_default())
}

/// Child of `four_processes_hammer_the_same_keys`: `ARG = "id iterations"`.
fn child_hammer() {
    let (region, arg) = child_region();
    let d = region.dict();
    let mut it = arg.split(' ').map(|s| s.parse::<u64>().expect("arg"));
    let (id, iters) = (it.next().expect("id"), it.next().expect("iters"));
    for n in 0..iters {
        d.incr(format!("c{}", n % 3).as_bytes(), 1, Some(0), None)
            .expect("incr shared");
        d.incr(format!("p{id}").as_bytes(), 1, Some(0), None)
            .expect("incr own");
        let v = Value::Bytes(format!("{id}:{n}").into_bytes());
        d.set(format!("s{}", n % 5).as_bytes(), &v, None, id as u32)
            .expect("set shared");
        if n % 16 == 0 {
            match d.add(b"first", &Value::Int(id as i64), None, 0) {
                Ok(_) | Err(DictError::Exists) => {}
                Err(e) => panic!("add: {e}"),
            }
            d.get(format!("s{}", (n + 1) % 5).as_bytes()).expect("get");
        }
    }
}

/// Child of `sigkill_in_a_loop_leaves_a_consistent_dict`: churns until killed
/// (or for 60 s), touching at most ~150 KiB of values so that nothing the
/// parent stored is ever evicted.
fn child_churn() {
    let (region, _) = child_region();
    let d = region.dict();
    let mut rng = Rng::new(1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let r = rng.next();
        let k = format!("k{}", r % 64);
        match r % 13 {
            0..=3 => {
                let v = bytes(r as u8, (r >> 8) as usize % 1500);
                d.set(k.as_bytes(), &v, None, 0).expect("set");
            }
            4 => {
                let _ = d.add(k.as_bytes(), &Value::Float(1.5), None, 1);
            }
            5 => {
                let _ = d.replace(k.as_bytes(), &Value::Bool(true), None, 2);
            }
            6 => d.delete(k.as_bytes()).expect("delete"),
            7 => {
                let key = format!("ctr{}", r % 4);
                d.incr(key.as_bytes(), 1, Some(0), None).expect("incr");
            }
            8 => {
                let key = format!("t{}", r % 32);
                let ttl = Some(ms(1 + (r >> 8) % 20));
                d.set(key.as_bytes(), &bytes(7, (r >> 16) as usize % 200), ttl, 0)
                    .expect("set ttl");
            }
            9 => {
                let _ = d.expire(k.as_bytes(), Some(ms(5)));
            }
            10 => {
                d.flush_expired(8).expect("flush_expired");
            }
            _ => {
                d.get(k.as_bytes()).expect("get");
            }
        }
        d.incr(b"child_ops", 1, Some(0), None).expect("progress");
    }
}

/// Child of `sigkill_during_eviction_is_repaired`: stores far more than fits.
fn child_evict() {
    let (region, _) = child_region();
    let d = region.dict();
    let mut rng = Rng::new(2);
    let max = d.max_value_len(8);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let r = rng.next();
        let key = format!("e{}", r % 2000);
        let size = (r >> 16) as usize % max;
        let ttl = r.is_multiple_of(4).then(|| ms(1 + (r >> 8) % 10));
        d.set(key.as_bytes(), &bytes(r as u8, size), ttl, 0)
            .expect("set");
        if r.is_multiple_of(7) {
            d.incr(b"evict_ops", 1, Some(0), None).expect("incr");
        }
    }
}

// ---------------------------------------------------------------------------
// Semantics, in one process.

fn values_of_every_type_round_trip() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let all: Vec<u8> = (0..=255).collect();
    let values = [
        Value::Bytes(Vec::new()),
        Value::Bytes(all.clone()),
        Value::Bytes(vec![0xAB; d.max_value_len(4)]),
        Value::Int(0),
        Value::Int(-1),
        Value::Int(i64::MIN),
        Value::Int(i64::MAX),
        Value::Float(-0.0),
        Value::Float(1e-300),
        Value::Float(f64::INFINITY),
        Value::Bool(true),
        Value::Bool(false),
    ];
    for (i, v) in values.iter().enumerate() {
        // The same key goes through every type, and a key per value too.
        let flags = [0, 1, u32::MAX][i % 3];
        assert_eq!(d.set(b"same", v, None, flags), Ok(NO_EVICTION));
        assert_eq!(d.get(b"same"), Ok(Some((v.clone(), flags))));
        let key = format!("key\0{i}\u{e9}");
        d.set(key.as_bytes(), v, None, i as u32).expect("set");
    }
    for (i, v) in values.iter().enumerate() {
        let key = format!("key\0{i}\u{e9}");
        assert_eq!(d.get(key.as_bytes()), Ok(Some((v.clone(), i as u32))));
    }
    // NaN round-trips bit for bit.
    let nan = f64::from_bits(0x7ff8_0000_dead_beef);
    d.set(b"nan", &Value::Float(nan), None, 0).expect("set");
    match d.get(b"nan") {
        Ok(Some((Value::Float(f), 0))) => assert_eq!(f.to_bits(), nan.to_bits()),
        other => panic!("{other:?}"),
    }
    // A binary key of the maximal length that still fits.
    let long_key = vec![0u8; 4000];
    d.set(&long_key, &Value::Int(4), None, 0)
        .expect("set long key");
    assert_eq!(d.get(&long_key), Ok(Some((Value::Int(4), 0))));
    assert_eq!(d.get(&long_key[..3999]), Ok(None));
    d.check_consistency().expect("consistent");
}

fn set_add_replace_delete() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    assert_eq!(d.get(b"a"), Ok(None));
    assert_eq!(
        d.replace(b"a", &Value::Int(1), None, 0),
        Err(DictError::NotFound)
    );
    assert_eq!(d.add(b"a", &Value::Int(1), None, 7), Ok(NO_EVICTION));
    assert_eq!(d.add(b"a", &Value::Int(2), None, 0), Err(DictError::Exists));
    assert_eq!(
        d.safe_add(b"a", &Value::Int(2), None, 0),
        Err(DictError::Exists)
    );
    assert_eq!(d.get(b"a"), Ok(Some((Value::Int(1), 7))));
    assert_eq!(d.replace(b"a", &"x".into(), None, 8), Ok(NO_EVICTION));
    assert_eq!(d.get(b"a"), Ok(Some(("x".into(), 8))));
    assert_eq!(d.set(b"a", &bytes(1, 3000), None, 9), Ok(NO_EVICTION));
    assert_eq!(d.get(b"a"), Ok(Some((bytes(1, 3000), 9))));
    assert_eq!(d.safe_set(b"a", &bytes(2, 10), None, 10), Ok(NO_EVICTION));
    assert_eq!(d.get(b"a"), Ok(Some((bytes(2, 10), 10))));
    assert_eq!(d.delete(b"a"), Ok(()));
    assert_eq!(d.get(b"a"), Ok(None));
    assert_eq!(d.delete(b"a"), Ok(()), "deleting an absent key is fine");
    assert_eq!(
        d.replace(b"a", &Value::Int(1), None, 0),
        Err(DictError::NotFound)
    );

    // Expired keys count as absent for add and replace.
    d.set(b"e", &Value::Int(1), Some(ms(20)), 0).expect("set");
    assert!(poll_until(Duration::from_secs(5), || d.get(b"e") == Ok(None)));
    assert_eq!(
        d.replace(b"e", &Value::Int(2), None, 0),
        Err(DictError::NotFound)
    );
    assert_eq!(d.add(b"e", &Value::Int(3), None, 0), Ok(NO_EVICTION));
    assert_eq!(d.get(b"e"), Ok(Some((Value::Int(3), 0))));
    assert_eq!(d.ttl(b"e"), Ok(None), "the new item has no expiry");

    // Many keys: chains of several items per bucket.
    for i in 0..1500 {
        d.set(format!("many{i}").as_bytes(), &Value::Int(i), None, 0)
            .expect("set many");
    }
    for i in (0..1500).step_by(2) {
        d.delete(format!("many{i}").as_bytes()).expect("delete");
    }
    for i in 0..1500 {
        let want = (i % 2 == 1).then_some(i);
        assert_eq!(int(&d, &format!("many{i}")), want);
    }
    d.check_consistency().expect("consistent");
}

fn incr_with_and_without_init() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    assert_eq!(d.incr(b"n", 1, None, None), Err(DictError::NotFound));
    assert_eq!(d.incr(b"n", 5, Some(10), None), Ok((15, NO_EVICTION)));
    assert_eq!(d.incr(b"n", -20, Some(1000), None), Ok((-5, NO_EVICTION)));
    assert_eq!(d.get(b"n"), Ok(Some((Value::Int(-5), 0))));
    assert_eq!(d.ttl(b"n"), Ok(None));

    // init_ttl applies when the key is created, not when it exists.
    let created = Instant::now();
    assert_eq!(
        d.incr(b"t", 1, Some(0), Some(ms(60_000))),
        Ok((1, NO_EVICTION))
    );
    let ttl = d.ttl(b"t").expect("ttl").expect("expires");
    assert_ttl_since(ttl, ms(60_000), created);
    d.expire(b"t", None).expect("expire");
    assert_eq!(d.incr(b"t", 1, Some(0), Some(ms(10))), Ok((2, NO_EVICTION)));
    assert_eq!(d.ttl(b"t"), Ok(None));

    // An expiring counter disappears and starts again from init.
    let created = Instant::now();
    assert_eq!(
        d.incr(b"short", 1, Some(100), Some(ms(200))),
        Ok((101, NO_EVICTION))
    );
    let second = d.incr(b"short", 1, None, None);
    if before_expiry(created, ms(200)) {
        assert_eq!(second, Ok((102, NO_EVICTION)));
    }
    assert!(poll_until(Duration::from_secs(5), || d.get(b"short") == Ok(None)));
    assert_eq!(d.incr(b"short", 1, None, None), Err(DictError::NotFound));
    assert_eq!(d.incr(b"short", 1, Some(0), None), Ok((1, NO_EVICTION)));

    for v in [bytes(b'1', 1), Value::Float(1.0), Value::Bool(true)] {
        d.set(b"v", &v, None, 3).expect("set");
        assert_eq!(d.incr(b"v", 1, Some(0), None), Err(DictError::NotANumber));
        assert_eq!(d.get(b"v"), Ok(Some((v, 3))), "left unchanged");
    }
    d.set(b"big", &Value::Int(i64::MAX - 1), None, 0)
        .expect("set");
    assert_eq!(d.incr(b"big", 1, None, None), Ok((i64::MAX, NO_EVICTION)));
    assert_eq!(d.incr(b"big", 1, None, None), Err(DictError::Overflow));
    assert_eq!(
        d.incr(b"absent", 1, Some(i64::MAX), None),
        Err(DictError::Overflow)
    );
    assert_eq!(d.get(b"absent"), Ok(None));
    d.check_consistency().expect("consistent");
}

fn update_int_reads_and_writes_under_one_lock() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    // Absent: f sees None; what it returns is stored, with its expiry.
    let (seen, out) = d
        .update_int(b"b", |v, now| (Some((41, Some(ms(60_000)))), (v, now)))
        .expect("update");
    assert_eq!(seen.0, None);
    assert!(seen.1 > 0, "the clock");
    assert_eq!(out, NO_EVICTION);
    assert_eq!(d.get(b"b"), Ok(Some((Value::Int(41), 0))));
    assert!(d.ttl(b"b").expect("ttl").is_some());
    // Present: f sees it; returning None leaves it as it is.
    let (seen, _) = d.update_int(b"b", |v, _| (None, v)).expect("update");
    assert_eq!(seen, Some(41));
    assert_eq!(d.get(b"b"), Ok(Some((Value::Int(41), 0))));
    // In place, with a new expiry (None: never).
    d.update_int(b"b", |v, _| (Some((v.unwrap_or(0) + 1, None)), ()))
        .expect("update");
    assert_eq!(d.get(b"b"), Ok(Some((Value::Int(42), 0))));
    assert_eq!(d.ttl(b"b"), Ok(None));
    // A value that is not an integer reads as None and is replaced.
    d.set(b"s", &Value::from("text"), None, 0).expect("set");
    let (seen, _) = d
        .update_int(b"s", |v, _| (Some((1, None)), v))
        .expect("update");
    assert_eq!(seen, None);
    assert_eq!(d.get(b"s"), Ok(Some((Value::Int(1), 0))));
    d.check_consistency().expect("consistent");
}

fn ttl_expire_and_expiry_happening() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    assert_eq!(d.ttl(b"k"), Err(DictError::NotFound));
    assert_eq!(d.expire(b"k", None), Err(DictError::NotFound));
    d.set(b"k", &"v".into(), None, 0).expect("set");
    assert_eq!(d.ttl(b"k"), Ok(None));
    d.set(b"zero", &"v".into(), Some(Duration::ZERO), 0)
        .expect("set");
    assert_eq!(
        d.ttl(b"zero"),
        Ok(None),
        "a zero exptime means never, as in nginx"
    );
    let expired_at = Instant::now();
    d.expire(b"k", Some(Duration::from_secs(100)))
        .expect("expire");
    let ttl = d.ttl(b"k").expect("ttl").expect("some");
    assert_ttl_since(ttl, Duration::from_secs(100), expired_at);
    d.expire(b"k", None).expect("expire");
    assert_eq!(d.ttl(b"k"), Ok(None));

    // A 200 ms item: there, then stale, with its flags.
    let set_at = Instant::now();
    d.set(b"short", &"soon gone".into(), Some(ms(200)), 42)
        .expect("set");
    let ttl = d.ttl(b"short");
    let got = d.get(b"short");
    let stale = d.get_stale(b"short");
    if before_expiry(set_at, ms(200)) {
        let ttl = ttl.expect("ttl").expect("some");
        assert!(ttl <= ms(200) && ttl > Duration::ZERO, "{ttl:?}");
        assert_eq!(got, Ok(Some(("soon gone".into(), 42))));
        assert_eq!(stale, Ok(Some(("soon gone".into(), 42, false))));
    }
    assert!(poll_until(Duration::from_secs(5), || d.get(b"short") == Ok(None)));
    assert!(
        set_at.elapsed() >= ms(190),
        "expired after {:?}",
        set_at.elapsed()
    );
    assert_eq!(
        d.get_stale(b"short"),
        Ok(Some(("soon gone".into(), 42, true)))
    );
    assert_eq!(d.ttl(b"short"), Err(DictError::NotFound));
    assert_eq!(d.expire(b"short", None), Err(DictError::NotFound));

    // expire() shortens a TTL, and a later set() without one removes it.
    d.expire(b"k", Some(ms(50))).expect("expire");
    assert!(poll_until(Duration::from_secs(5), || d.get(b"k") == Ok(None)));
    d.set(b"k", &"again".into(), None, 0).expect("set");
    assert_eq!(d.ttl(b"k"), Ok(None));
    assert_eq!(d.get_stale(b"k"), Ok(Some(("again".into(), 0, false))));
    d.check_consistency().expect("consistent");
}

fn keys_flush_all_flush_expired_and_free_space() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let cap = d.capacity();
    assert!(cap > 100_000, "{cap}");
    assert_eq!(d.free_space(), cap);
    assert_eq!(d.keys(0), Ok(Vec::<Vec<u8>>::new()));

    d.set(b"a", &bytes(1, 900), None, 0).expect("set"); // a 1 KiB block
    assert_eq!(d.free_space(), cap - 1024);
    d.set(b"b", &Value::Int(2), None, 0).expect("set"); // a 64 B block
    assert_eq!(d.free_space(), cap - 1024 - 64);
    d.set(b"c", &bytes(3, 100), None, 0).expect("set"); // 256 B
    assert_eq!(d.free_space(), cap - 1024 - 64 - 256);
    d.set(b"a", &bytes(1, 10), None, 0).expect("set"); // shrinks to 128 B
    assert_eq!(d.free_space(), cap - 128 - 64 - 256);

    // Most recently used first; get() refreshes.
    let k = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
    assert_eq!(d.keys(0), Ok(k(&["a", "c", "b"])));
    d.get(b"b").expect("get");
    assert_eq!(d.keys(0), Ok(k(&["b", "a", "c"])));
    assert_eq!(d.keys(2), Ok(k(&["b", "a"])));
    d.set(b"gone", &Value::Int(0), Some(ms(1)), 0).expect("set");
    assert!(poll_until(Duration::from_secs(5), || d.get(b"gone") == Ok(None)));
    assert_eq!(
        d.keys(0),
        Ok(k(&["b", "a", "c"])),
        "expired keys are not listed"
    );

    d.flush_all().expect("flush_all");
    assert_eq!(d.keys(0), Ok(Vec::<Vec<u8>>::new()));
    for key in ["a", "b", "c"] {
        assert_eq!(d.get(key.as_bytes()), Ok(None));
        assert!(matches!(
            d.get_stale(key.as_bytes()),
            Ok(Some((_, _, true)))
        ));
    }
    assert!(
        d.free_space() < cap,
        "flushed items hold memory until removed"
    );
    assert_eq!(d.flush_expired(2), Ok(2));
    assert_eq!(d.flush_expired(0), Ok(2));
    assert_eq!(d.flush_expired(0), Ok(0));
    assert_eq!(d.free_space(), cap);
    assert_eq!(d.get_stale(b"a"), Ok(None));
    d.check_consistency().expect("consistent");

    // Freed blocks merge back: the biggest block fits again.
    let max = d.max_value_len(3);
    assert_eq!(d.safe_set(b"max", &bytes(9, max), None, 0), Ok(NO_EVICTION));
}

fn too_large_keys_and_values_are_rejected() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let v = Value::Int(1);
    assert_eq!(d.set(b"", &v, None, 0), Err(DictError::TooLarge));
    assert_eq!(d.get(b""), Err(DictError::TooLarge));
    assert_eq!(d.delete(b""), Err(DictError::TooLarge));
    assert_eq!(d.incr(b"", 1, Some(0), None), Err(DictError::TooLarge));
    let huge_key = vec![b'k'; 65536];
    assert_eq!(d.set(&huge_key, &v, None, 0), Err(DictError::TooLarge));
    assert_eq!(d.get(&huge_key), Err(DictError::TooLarge));
    // 65535 bytes is a valid key length, but bigger than the biggest block
    // of a 1 MiB region.
    assert_eq!(
        d.set(&huge_key[..65535], &v, None, 0),
        Err(DictError::TooLarge)
    );
    assert_eq!(d.get(&huge_key[..65535]), Ok(None));

    let max = d.max_value_len(5);
    assert!(max >= 8000, "{max}");
    assert_eq!(
        d.set(b"value", &bytes(1, max + 1), None, 0),
        Err(DictError::TooLarge)
    );
    assert_eq!(
        d.safe_set(b"value", &bytes(1, max + 1), None, 0),
        Err(DictError::TooLarge)
    );
    assert_eq!(d.set(b"value", &bytes(1, max), None, 0), Ok(NO_EVICTION));
    assert_eq!(d.get(b"value"), Ok(Some((bytes(1, max), 0))));

    // A bigger region has bigger blocks, up to 1 MiB.
    let region = Region::create(128 * MIB).expect("region");
    let d = region.dict();
    assert_eq!(d.max_block_size(), MIB);
    d.set(&huge_key[..65535], &v, None, 0).expect("longest key");
    let max = d.max_value_len(1);
    d.set(b"v", &bytes(2, max), None, 0).expect("1 MiB item");
    assert_eq!(
        d.set(b"v", &bytes(2, max + 1), None, 0),
        Err(DictError::TooLarge)
    );
    d.check_consistency().expect("consistent");
}

/// Fills the 1 MiB region's dictionary with 1 KiB items `lru000`... until a
/// safe store fails; returns their count.
fn fill_with_1k_items(d: &Dict<'_>) -> usize {
    let mut n = 0;
    loop {
        match d.safe_set(
            format!("lru{n:03}").as_bytes(),
            &bytes(n as u8, 900),
            None,
            0,
        ) {
            Ok(o) => assert_eq!(o, NO_EVICTION),
            Err(DictError::NoMemory) => return n,
            Err(e) => panic!("{e}"),
        }
        n += 1;
    }
}

fn safe_set_and_safe_add_report_no_memory() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let n = fill_with_1k_items(&d);
    assert!(n > 100, "{n}");
    assert!(d.free_space() < 1024, "{}", d.free_space());
    let v = bytes(0, 900);
    assert_eq!(d.safe_set(b"new", &v, None, 0), Err(DictError::NoMemory));
    assert_eq!(d.safe_add(b"new", &v, None, 0), Err(DictError::NoMemory));
    for i in 0..n {
        assert!(
            d.get(format!("lru{i:03}").as_bytes())
                .expect("get")
                .is_some()
        );
    }
    // Replacing an item by one of its size needs no eviction, even safely.
    assert_eq!(
        d.safe_set(b"lru005", &bytes(1, 800), None, 0),
        Ok(NO_EVICTION)
    );
    // The plain variants evict.
    assert_eq!(
        d.add(b"new", &v, None, 0),
        Ok(SetOutcome { forcible: true })
    );
    d.check_consistency().expect("consistent");
}

fn eviction_follows_lru_order_and_prefers_expired_items() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let n = fill_with_1k_items(&d);
    let key = |i: usize| format!("lru{i:03}");
    // (keys() does not refresh the LRU position, get() would.)
    let present = |i: usize| d.keys(0).expect("keys").contains(&key(i).into_bytes());

    // lru000 is refreshed, so lru001 is the least recently used.
    d.get(key(0).as_bytes()).expect("get");
    let v = bytes(0xEE, 900);
    assert_eq!(
        d.set(b"new1", &v, None, 0),
        Ok(SetOutcome { forcible: true })
    );
    assert!(present(0) && !present(1) && present(2));
    assert_eq!(
        d.set(b"new2", &v, None, 0),
        Ok(SetOutcome { forcible: true })
    );
    assert!(present(0) && !present(2) && present(3));
    // A bigger item evicts as many as it needs, oldest first.
    let big = d.max_value_len(4);
    assert_eq!(
        d.set(b"big1", &bytes(1, big), None, 0),
        Ok(SetOutcome { forcible: true })
    );
    assert!(present(0), "lru000 was refreshed");
    assert!(present(n - 1), "the newest survive");
    assert_eq!(d.get(b"big1"), Ok(Some((bytes(1, big), 0))));
    d.check_consistency().expect("consistent");

    // Small items make way for the biggest one, oldest first.
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let mut small = 0;
    while d.safe_set(format!("s{small}").as_bytes(), &Value::Int(small), None, 0) == Ok(NO_EVICTION)
    {
        small += 1;
    }
    assert!(small > 1500, "{small}");
    let big = d.max_value_len(3);
    assert_eq!(
        d.set(b"big", &bytes(1, big), None, 0),
        Ok(SetOutcome { forcible: true })
    );
    let left = d.keys(0).expect("keys");
    assert!(
        left.len() as i64 > small - 200,
        "{} of {small} left",
        left.len()
    );
    assert!(left.contains(&format!("s{}", small - 1).into_bytes()));
    assert!(!left.contains(&b"s0".to_vec()));
    d.check_consistency().expect("consistent");

    // An expired item well inside the list goes before any valid one.
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let present = |i: usize| d.keys(0).expect("keys").contains(&key(i).into_bytes());
    let n = fill_with_1k_items(&d);
    // Expired only once the fill is done: a TTL set while filling could run
    // out during a stall and let the fill reclaim the item. expire() leaves
    // the item where it is in the LRU list.
    d.expire(key(20).as_bytes(), Some(ms(1))).expect("expire");
    // Wait without get(), which would make lru020 the most recent.
    assert!(poll_until(Duration::from_secs(5), || !present(20)));
    assert_eq!(d.set(b"new", &v, None, 0), Ok(NO_EVICTION));
    for i in (0..n).filter(|&i| i != 20) {
        assert!(d.get(key(i).as_bytes()).expect("get").is_some(), "{i}");
    }
    d.check_consistency().expect("consistent");
}

/// Garbage written into the zone (not over the mutex) is never followed out
/// of bounds: operations return, `repair` fixes, the dictionary works again.
fn garbage_in_the_zone_is_repaired_without_faults() {
    let region = Region::create(MIB).expect("region");
    let d = region.dict();
    let file = File::from(region.fd().try_clone_to_owned().expect("dup"));
    let (off, len) = (region.layout().dict_off, region.layout().dict_len);
    let mut rng = Rng::new(3);
    for round in 0..200 {
        for i in 0..200u64 {
            d.set(
                format!("g{}", (i * 7 + round) % 300).as_bytes(),
                &bytes(1, (i as usize * 13) % 700),
                None,
                0,
            )
            .expect("set before corruption");
        }
        d.check_consistency().expect("consistent before corruption");
        // Words after the mutex (64 bytes) and the magic (8).
        for _ in 0..1 + rng.below(20) {
            let at = 72 + rng.below((len - 72) as u64 / 4) * 4;
            let word = match rng.below(4) {
                0 => rng.next() as u32,
                1 => rng.below(len as u64) as u32,
                2 => (rng.below(len as u64 / 64) * 64) as u32,
                _ => 0,
            };
            file.write_at(&word.to_le_bytes(), off as u64 + at)
                .expect("pwrite");
        }
        for i in 0..50u64 {
            let k = format!("g{}", rng.below(300));
            let _ = match i % 6 {
                0 => d.set(k.as_bytes(), &bytes(2, 300), None, 0).map(drop),
                1 => d.get(k.as_bytes()).map(drop),
                2 => d.delete(k.as_bytes()),
                3 => d.incr(k.as_bytes(), 1, Some(0), None).map(drop),
                4 => d.keys(0).map(drop),
                _ => d.flush_expired(0).map(drop),
            };
        }
        d.repair().expect("repair");
        d.check_consistency()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        d.set(b"after", &Value::Int(round as i64), None, 0)
            .expect("set after repair");
        assert_eq!(d.get(b"after"), Ok(Some((Value::Int(round as i64), 0))));
    }
}

// ---------------------------------------------------------------------------
// Real processes.

fn four_processes_hammer_the_same_keys() {
    const PROCS: u64 = 4;
    const ITERS: u64 = 20_000;
    let region = Region::create(4 * MIB).expect("region");
    let d = region.dict();
    let mut kids: Vec<ChildProc> = (0..PROCS)
        .map(|id| ChildProc::spawn(&region, "hammer", &format!("{id} {ITERS}")))
        .collect();
    // The parent hammers too.
    for _ in 0..ITERS {
        d.incr(b"c0", 1, Some(0), None).expect("incr");
    }
    for (id, k) in kids.iter_mut().enumerate() {
        let status = k
            .wait_for(Duration::from_secs(40))
            .unwrap_or_else(|| panic!("child {id} still running"));
        assert!(status.success(), "child {id}: {status}");
    }
    let total: i64 = (0..3).map(|c| int(&d, &format!("c{c}")).unwrap_or(0)).sum();
    assert_eq!(total, ((PROCS + 1) * ITERS) as i64);
    for id in 0..PROCS {
        assert_eq!(int(&d, &format!("p{id}")), Some(ITERS as i64));
    }
    let first = int(&d, "first").expect("first");
    assert!((0..PROCS as i64).contains(&first));
    for s in 0..5 {
        let Some((Value::Bytes(v), flags)) = d.get(format!("s{s}").as_bytes()).expect("get") else {
            panic!("s{s} missing");
        };
        let v = String::from_utf8(v).expect("utf8");
        let (id, n) = v.split_once(':').expect("id:n");
        let (id, n): (u64, u64) = (id.parse().expect("id"), n.parse().expect("n"));
        assert!(
            id < PROCS && n < ITERS && n % 5 == s && flags as u64 == id,
            "{v}"
        );
    }
    assert_eq!(d.repair_count(), 0, "no process died");
    d.check_consistency().expect("consistent");
}

fn sigkill_in_a_loop_leaves_a_consistent_dict() {
    const ROUNDS: u64 = 50;
    let region = Arc::new(Region::create(4 * MIB).expect("region"));
    let d = region.dict();
    let mut rng = Rng::new(4);
    let mut expected = 0i64;
    for round in 0..ROUNDS {
        let mut child = ChildProc::spawn(&region, "churn", "");
        // Let it run for a random number of operations while the parent
        // increments its own counter.
        let start = int(&d, "child_ops").unwrap_or(0);
        let target = start + 1 + rng.below(2000) as i64;
        let progressed = poll_until(Duration::from_secs(20), || {
            assert_eq!(
                d.incr(b"parent", 1, Some(0), None).map(|x| x.0),
                Ok(expected + 1)
            );
            expected += 1;
            int(&d, "child_ops").unwrap_or(0) >= target
        });
        assert!(progressed, "round {round}: the child made no progress");
        // The parent just released the lock, which the child may be waking
        // up to take: kill it a random moment later, not right then.
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        child.kill();

        // The lock is free (or recoverable) and the structure is whole.
        let r = Arc::clone(&region);
        let (consistent, counter) =
            with_deadline(Duration::from_secs(10), "lock after kill", move || {
                let d = r.dict();
                (d.check_consistency(), d.incr(b"parent", 1, Some(0), None))
            });
        expected += 1;
        if let Err(e) = consistent {
            panic!("round {round}: {e}");
        }
        assert_eq!(counter, Ok((expected, NO_EVICTION)), "round {round}");
    }
    assert_eq!(int(&d, "parent"), Some(expected));
    let repairs = d.repair_count();
    eprintln!("{ROUNDS} kills, {repairs} while the child held the lock");
    assert!(repairs > 0, "no kill ever landed inside the lock");
}

fn sigkill_during_eviction_is_repaired() {
    const ROUNDS: u64 = 30;
    let region = Arc::new(Region::create(MIB).expect("region"));
    let d = region.dict();
    let mut rng = Rng::new(5);
    for round in 0..ROUNDS {
        let mut child = ChildProc::spawn(&region, "evict", "");
        // Progress: watch the child's counter change (it may itself be
        // evicted, so look for changes, not a total).
        let mut last = int(&d, "evict_ops");
        let mut changes = 0;
        let want = 2 + rng.below(10);
        let progressed = poll_until(Duration::from_secs(20), || {
            let now = int(&d, "evict_ops");
            if now != last {
                changes += 1;
                last = now;
            }
            changes >= want
        });
        assert!(progressed, "round {round}: the child made no progress");
        child.kill();
        let r = Arc::clone(&region);
        let consistent = with_deadline(Duration::from_secs(10), "lock after kill", move || {
            r.dict().check_consistency()
        });
        if let Err(e) = consistent {
            panic!("round {round}: {e}");
        }
        let v = bytes(round as u8, 5000);
        d.set(b"parent", &v, None, 0).expect("set");
        assert_eq!(d.get(b"parent"), Ok(Some((v, 0))));
    }
}

fn main() {
    // Children are this binary started with a role: they run that role
    // instead of the tests, so no test passes merely by finding no role.
    if let Ok(role) = std::env::var(ROLE_ENV) {
        match role.as_str() {
            "hammer" => child_hammer(),
            "churn" => child_churn(),
            "evict" => child_evict(),
            other => panic!("unknown child role {other:?}"),
        }
        return;
    }
    let trials = vec![
        Trial::test("values_of_every_type_round_trip", || {
            values_of_every_type_round_trip();
            Ok(())
        }),
        Trial::test("set_add_replace_delete", || {
            set_add_replace_delete();
            Ok(())
        }),
        Trial::test("incr_with_and_without_init", || {
            incr_with_and_without_init();
            Ok(())
        }),
        Trial::test("update_int_reads_and_writes_under_one_lock", || {
            update_int_reads_and_writes_under_one_lock();
            Ok(())
        }),
        Trial::test("ttl_expire_and_expiry_happening", || {
            ttl_expire_and_expiry_happening();
            Ok(())
        }),
        Trial::test("keys_flush_all_flush_expired_and_free_space", || {
            keys_flush_all_flush_expired_and_free_space();
            Ok(())
        }),
        Trial::test("too_large_keys_and_values_are_rejected", || {
            too_large_keys_and_values_are_rejected();
            Ok(())
        }),
        Trial::test("safe_set_and_safe_add_report_no_memory", || {
            safe_set_and_safe_add_report_no_memory();
            Ok(())
        }),
        Trial::test(
            "eviction_follows_lru_order_and_prefers_expired_items",
            || {
                eviction_follows_lru_order_and_prefers_expired_items();
                Ok(())
            },
        ),
        Trial::test("garbage_in_the_zone_is_repaired_without_faults", || {
            garbage_in_the_zone_is_repaired_without_faults();
            Ok(())
        }),
        Trial::test("four_processes_hammer_the_same_keys", || {
            four_processes_hammer_the_same_keys();
            Ok(())
        }),
        Trial::test("sigkill_in_a_loop_leaves_a_consistent_dict", || {
            sigkill_in_a_loop_leaves_a_consistent_dict();
            Ok(())
        }),
        Trial::test("sigkill_during_eviction_is_repaired", || {
            sigkill_during_eviction_is_repaired();
            Ok(())
        }),
    ];
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}
