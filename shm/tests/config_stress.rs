//! Publication is atomic across processes: reader processes, woken by an
//! eventfd as workers are, check every snapshot they apply. Each batch
//! rewrites every key with the batch number and a checksum; a reader that
//! ever holds keys of two batches, a torn value, or a key that should not
//! exist fails. The binary has its own `main` (`harness = false`): started
//! with `CHILD_ENV` set, it is a reader instead of the test.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use elb_shm::Region;
use elb_shm::config::{Change, ConfigReader, ConfigWriter};
use libtest_mimic::{Arguments, Trial};
use nix::sys::eventfd::{EfdFlags, EventFd};

const READERS: usize = 3;
const BATCHES: u64 = 3000;
const KEYS: usize = 40;
const CHILD_ENV: &str = "ELB_SHM_STRESS_CHILD";

fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2166136261u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(16777619)
    })
}

/// `batch:published_ns:padding:checksum`; padding varies so records move.
fn value(batch: u64, key: usize, published_ns: u64) -> Vec<u8> {
    let pad = "x".repeat((batch as usize * 7 + key * 13) % 200);
    let body = format!("{batch}:{published_ns}:{pad}");
    format!("{body}:{}", checksum(body.as_bytes())).into_bytes()
}

fn parse(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (body, sum) = s.rsplit_once(':')?;
    if sum.parse::<u32>().ok()? != checksum(body.as_bytes()) {
        return None;
    }
    let mut it = body.split(':');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Keys live in batch `b`: all but one that comes and goes, so that
/// directory entries are deleted and reused.
fn live_keys(b: u64) -> impl Iterator<Item = usize> {
    (0..KEYS).filter(move |k| !(*k == (b as usize % KEYS) && b % 2 == 1))
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn readers_never_see_a_half_published_configuration() {
    let region = Region::create(4 << 20).expect("region");
    let wakes: Vec<EventFd> = (0..READERS)
        .map(|_| EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).expect("eventfd"))
        .collect();
    let shm_fd = region.fd().as_raw_fd();
    let mut children = Children(Vec::new());
    for wake in &wakes {
        let wake_fd = wake.as_fd().as_raw_fd();
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.env(CHILD_ENV, format!("{shm_fd},{wake_fd}"))
            .stdout(Stdio::piped());
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [shm_fd, wake_fd] {
                    nix::fcntl::fcntl(
                        BorrowedFd::borrow_raw(fd),
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                }
                Ok(())
            });
        }
        children.0.push(cmd.spawn().expect("spawn reader"));
    }
    let mut writer = ConfigWriter::new(&region);
    for b in 1..=BATCHES {
        let at = now_ns();
        for k in 0..KEYS {
            let key = format!("key-{k}");
            if live_keys(b).any(|l| l == k) {
                writer.put(key.as_bytes(), &value(b, k, at)).expect("put");
            } else {
                writer.delete(key.as_bytes());
            }
        }
        writer.publish();
        for w in &wakes {
            w.write(1).expect("wake");
        }
        if b % 100 == 0 {
            // Let readers catch up now and then, so most batches are seen
            // one by one rather than coalesced.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The final batch number tells readers to stop.
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for child in &mut children.0 {
        let out = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "a reader did not finish");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut text = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut text)
            .expect("read");
        assert!(out.success(), "reader failed: {text}");
        let line = text
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no result line in: {text}"));
        let nums: Vec<u64> = line
            .split_whitespace()
            .map(|n| n.parse().expect("n"))
            .collect();
        assert!(nums[0] > 10, "reader checked too few snapshots: {line}");
        lat.push((nums[0], nums[1], nums[2]));
    }
    for (snapshots, p50, p99) in lat {
        eprintln!(
            "reader: {snapshots} snapshots checked, publish-to-applied p50 {p50} us, p99 {p99} us"
        );
    }
}

/// The reader process: `main` runs it when started by the test above.
fn reader_child(spec: &str) {
    let (shm, wake) = spec.split_once(',').expect("fds");
    // SAFETY: the parent passed these descriptors to this process alone.
    let shm = unsafe { OwnedFd::from_raw_fd(shm.parse().expect("fd")) };
    // SAFETY: as above.
    let wake = unsafe { OwnedFd::from_raw_fd(wake.parse().expect("fd")) };
    let region = Region::attach(shm).expect("attach");
    let mut reader = ConfigReader::new(&region);
    let mut view: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut lat_us = Vec::new();
    let mut snapshots = 0u64;
    loop {
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&wake, &mut buf);
        if !reader.is_stale() {
            continue;
        }
        reader.poll(|c| match c {
            Change::Reset => view.clear(),
            Change::Put { key, value } => {
                view.insert(key.to_vec(), value.to_vec());
            }
            Change::Delete { key } => {
                view.remove(key);
            }
        });
        let applied_at = now_ns();
        snapshots += 1;
        let mut batch = None;
        for (k, v) in &view {
            let (b, at) = parse(v).unwrap_or_else(|| panic!("torn value for {k:?}: {v:?}"));
            assert!(
                batch.is_none_or(|x: (u64, u64)| x.0 == b),
                "two batches in one snapshot"
            );
            batch = Some((b, at));
        }
        let (b, at) = batch.expect("a snapshot has keys");
        let want: Vec<Vec<u8>> = live_keys(b)
            .map(|k| format!("key-{k}").into_bytes())
            .collect();
        let have: Vec<Vec<u8>> = view.keys().cloned().collect();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(have, want_sorted, "keys of batch {b}");
        lat_us.push((applied_at.saturating_sub(at)) / 1000);
        if b == BATCHES {
            break;
        }
    }
    lat_us.sort_unstable();
    let pct = |p: usize| lat_us[(lat_us.len() * p / 100).min(lat_us.len() - 1)];
    println!("\nRESULT {snapshots} {} {}", pct(50), pct(99));
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        reader_child(&spec);
        return;
    }
    let trials = vec![Trial::test(
        "readers_never_see_a_half_published_configuration",
        || {
            readers_never_see_a_half_published_configuration();
            Ok(())
        },
    )];
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}
