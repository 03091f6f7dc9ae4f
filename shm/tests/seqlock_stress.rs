//! A batch is applied whole or not at all, even while the writer rewrites
//! the same keys in batch after batch as fast as it can: reader processes
//! poll without pause and check that every key of every snapshot they apply
//! holds the same batch number. This binary is its own child: with
//! `CHILD_ENV` set, `main` runs a reader instead of the tests.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use elb_shm::Region;
use elb_shm::config::{Change, ConfigReader, ConfigWriter};
use libtest_mimic::{Arguments, Trial};

const READERS: usize = 2;
const KEYS: usize = 16;
/// How long the writer publishes; then it publishes `LAST`.
const WRITE_FOR: Duration = Duration::from_secs(3);
const LAST: u64 = u64::MAX;
const CHILD_ENV: &str = "ELB_SEQLOCK_STRESS_READER";

fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2166136261u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(16777619)
    })
}

/// `batch:key:padding:checksum`; the padding varies so that records move
/// and freed records are reused at other offsets.
fn value(batch: u64, key: usize) -> Vec<u8> {
    let pad = "x".repeat((batch as usize).wrapping_mul(7).wrapping_add(key * 13) % 61);
    let body = format!("{batch}:{key}:{pad}");
    format!("{body}:{}", checksum(body.as_bytes())).into_bytes()
}

/// The batch number of a value, if it is a whole value of `key`.
fn batch_of(key: usize, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let (body, sum) = s.rsplit_once(':')?;
    if sum.parse::<u32>().ok()? != checksum(body.as_bytes()) {
        return None;
    }
    let mut it = body.split(':');
    let batch = it.next()?.parse().ok()?;
    (it.next()?.parse::<usize>().ok()? == key).then_some(batch)
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

fn overlapping_batches_are_never_half_visible() {
    let region = Region::create(4 << 20).expect("region");
    let shm_fd = region.fd().as_raw_fd();
    let mut children = Children(Vec::new());
    for _ in 0..READERS {
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.env(CHILD_ENV, shm_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only prctl and fcntl, both
        // async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::fcntl::fcntl(
                    BorrowedFd::borrow_raw(shm_fd),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
                Ok(())
            });
        }
        children.0.push(cmd.spawn().expect("spawn reader"));
    }
    let mut writer = ConfigWriter::new(&region);
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|k| format!("key-{k}").into_bytes()).collect();
    let start = Instant::now();
    let mut batch = 0u64;
    while start.elapsed() < WRITE_FOR {
        batch += 1;
        for (k, key) in keys.iter().enumerate() {
            writer.put(key, &value(batch, k)).expect("put");
        }
        writer.publish();
    }
    for (k, key) in keys.iter().enumerate() {
        writer.put(key, &value(LAST, k)).expect("put");
    }
    writer.publish();
    eprintln!("writer: {batch} batches of {KEYS} keys in {WRITE_FOR:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    for child in &mut children.0 {
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "a reader did not finish");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read");
        assert!(status.success(), "reader failed: {out}{err}");
        let snapshots: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("SNAPSHOTS "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no result line in: {out}{err}"));
        assert!(
            snapshots > 10,
            "a reader checked only {snapshots} snapshots"
        );
        eprintln!("reader: {snapshots} snapshots checked");
    }
}

/// A reader process: polls without pause until it applies `LAST`.
fn reader(fd: &str) {
    let fd = fd.parse().expect("fd");
    // SAFETY: the parent left this descriptor open for this process alone.
    let region = Region::attach(unsafe { OwnedFd::from_raw_fd(fd) }).expect("attach");
    let mut reader = ConfigReader::new(&region);
    let mut view: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut snapshots = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "LAST never arrived");
        if !reader.is_stale() {
            std::hint::spin_loop();
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
        if view.is_empty() {
            continue;
        }
        snapshots += 1;
        let batches: Vec<Option<u64>> = (0..KEYS)
            .map(|k| {
                let v = view.get(format!("key-{k}").as_bytes())?;
                batch_of(k, v)
            })
            .collect();
        assert!(
            batches.iter().all(|b| b.is_some() && *b == batches[0]),
            "snapshot {snapshots} (generation {}) mixes batches: {batches:?}",
            reader.applied()
        );
        if batches[0] == Some(LAST) {
            break;
        }
    }
    println!("SNAPSHOTS {snapshots}");
}

fn main() {
    if let Ok(fd) = std::env::var(CHILD_ENV) {
        reader(&fd);
        return;
    }
    let trials = vec![Trial::test(
        "overlapping_batches_are_never_half_visible",
        || {
            overlapping_batches_are_never_half_visible();
            Ok(())
        },
    )];
    libtest_mimic::run(&Arguments::from_args(), trials).exit();
}
