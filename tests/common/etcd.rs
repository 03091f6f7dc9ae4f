//! A real etcd for the tests: [`Etcd`] runs one member or a cluster on free
//! loopback ports with its data in a temporary directory (on tmpfs when
//! there is one: fsync is then nearly free), waits for health with a
//! deadline, and kills every member by PID on drop. Members can be stopped,
//! restarted on the same data, or the whole cluster wiped.
//!
//! [`Kv`] is a small blocking client (etcd-client on a current-thread
//! runtime) to write test data: single puts and deletes, and many keys at
//! once in transactions of up to 128 operations, several in flight.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp};

use super::{Capture, dies_with_the_test, free_port, http_get_timeout, wait_until};

/// How long a member may take to report healthy.
pub const ETCD_READY: Duration = Duration::from_secs(20);

static DIR_COUNTER: AtomicU32 = AtomicU32::new(0);

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
    log: Option<Capture>,
}

/// A running etcd (one member or several).
pub struct Etcd {
    dir: PathBuf,
    members: Vec<Member>,
    /// Changes on a wipe, so that the new cluster is a new one.
    generation: u32,
    /// Flags added to every member's command line from its next start.
    extra: Vec<String>,
}

impl Etcd {
    /// One member, started and healthy.
    pub fn start() -> Etcd {
        Etcd::cluster(1)
    }

    /// `n` members, started and healthy.
    pub fn cluster(n: usize) -> Etcd {
        let mut e = Etcd::new(n);
        e.start_all();
        e
    }

    /// `n` members on reserved ports, none started yet.
    pub fn new(n: usize) -> Etcd {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "elb-etcd-{}-{}",
            std::process::id(),
            DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create etcd data dir");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
                log: None,
            })
            .collect();
        Etcd {
            dir,
            members,
            generation: 0,
            extra: Vec::new(),
        }
    }

    /// Flags every member gets from its next start on (`--enable-v2`).
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(|a| a.to_string()).collect();
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.members[i].name)
    }

    /// `127.0.0.1:PORT,…` of every member, for `--etcd`.
    pub fn endpoints(&self) -> String {
        (0..self.members.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts every member that is not running and waits until all are
    /// healthy (a cluster needs a quorum for that: start them together).
    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i);
        }
    }

    /// Starts member `i` again on its data (and waits for its health).
    pub fn start_member(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
        self.wait_healthy(i);
    }

    fn spawn(&mut self, i: usize) {
        let cluster = self.initial_cluster();
        let token = format!("elb-test-{}-{}", std::process::id(), self.generation);
        let data = self.dir.join(&self.members[i].name);
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-token", &token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        dies_with_the_test(&mut cmd);
        let mut child = cmd.spawn().expect("start etcd (is etcd-server installed?)");
        m.log = child.stderr.take().map(Capture::start);
        m.child = Some(child);
    }

    /// Waits until member `i` answers `/health` with `true`.
    pub fn wait_healthy(&mut self, i: usize) {
        let addr = format!("127.0.0.1:{}", self.members[i].client)
            .parse()
            .expect("address");
        let mut exited = None;
        let ok = wait_until(ETCD_READY, || {
            if let Some(c) = self.members[i].child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                exited = Some(status);
                return true;
            }
            matches!(
                http_get_timeout(addr, "localhost", "/health", Duration::from_millis(500)),
                Ok((200, _, body)) if String::from_utf8_lossy(&body).contains("true")
            )
        });
        assert!(
            ok && exited.is_none(),
            "etcd member {i} not healthy within {ETCD_READY:?} (exit: {exited:?}); log:\n{}",
            self.log(i)
        );
    }

    /// What member `i` logged.
    pub fn log(&self, i: usize) -> String {
        self.members[i]
            .log
            .as_ref()
            .map(Capture::text)
            .unwrap_or_default()
    }

    /// Kills member `i` (SIGKILL, by PID) and waits for it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }

    /// Stops every member, restarts them on the same data.
    pub fn restart_all(&mut self) {
        self.stop_all();
        self.start_all();
    }

    /// Stops every member, deletes all data, starts an empty cluster on the
    /// same ports.
    pub fn wipe(&mut self) {
        self.stop_all();
        for m in &self.members {
            let _ = std::fs::remove_dir_all(self.dir.join(&m.name));
        }
        self.generation += 1;
        self.start_all();
    }

    /// A client of this etcd.
    pub fn kv(&self) -> Kv {
        Kv::connect(&self.endpoints())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                eprintln!("---- etcd member {i} log ----\n{}", self.log(i));
            }
        }
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- a blocking client ----------------------------------------------------------

/// Operations per transaction (etcd's default `--max-txn-ops`).
const TXN_OPS: usize = 128;
/// Bytes of keys and values per transaction (etcd takes up to 1.5 MiB).
const TXN_BYTES: usize = 1 << 20;
/// Transactions in flight at once in [`Kv::put_many`].
const IN_FLIGHT: usize = 8;
/// How long a write retries a cluster that is electing, or a dead member.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// A blocking etcd client for test data.
pub struct Kv {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Kv {
    pub fn connect(endpoints: &str) -> Kv {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let eps: Vec<String> = endpoints.split(',').map(str::to_string).collect();
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(5));
        let client = rt
            .block_on(Client::connect(eps, Some(opts)))
            .expect("etcd client");
        Kv { rt, client }
    }

    /// Runs `op` until it succeeds or [`WRITE_DEADLINE`] passes (a member
    /// may be down, or a leader being elected).
    fn retry<T>(
        &self,
        what: &str,
        mut op: impl AsyncFnMut(Client) -> Result<T, etcd_client::Error>,
    ) -> T {
        let deadline = Instant::now() + WRITE_DEADLINE;
        self.rt.block_on(async {
            loop {
                match op(self.client.clone()).await {
                    Ok(v) => return v,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("etcd {what}: {e}"),
                }
            }
        })
    }

    /// Puts one key; returns the revision of the write.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.retry("put", async |mut c| {
            c.put(key, value, None)
                .await
                .map(|r| r.header().map_or(0, |h| h.revision()))
        })
    }

    /// Deletes one key; returns the revision.
    pub fn delete(&self, key: &str) -> i64 {
        self.retry("delete", async |mut c| {
            c.delete(key, None)
                .await
                .map(|r| r.header().map_or(0, |h| h.revision()))
        })
    }

    /// Deletes everything under `prefix`.
    pub fn delete_prefix(&self, prefix: &str) {
        self.retry("delete prefix", async |mut c| {
            c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                .await
                .map(drop)
        })
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.retry("get", async |mut c| {
            c.get("/", Some(GetOptions::new().with_count_only()))
                .await
                .map(|r| r.header().map_or(0, |h| h.revision()))
        })
    }

    /// Every key and value under `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.retry("get prefix", async |mut c| {
            c.get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map(|r| {
                    r.kvs()
                        .iter()
                        .map(|kv| {
                            (
                                String::from_utf8_lossy(kv.key()).into_owned(),
                                String::from_utf8_lossy(kv.value()).into_owned(),
                            )
                        })
                        .collect()
                })
        })
    }

    /// Compacts the history up to `revision` (physically).
    pub fn compact(&self, revision: i64) {
        self.retry("compact", async |mut c| {
            c.compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .map(drop)
        })
    }

    /// Puts all of `items`, in transactions of up to 128 keys (and 1 MB), several in
    /// flight at once. Order between transactions is not kept.
    pub fn put_many(&self, items: &[(String, String)]) {
        // At most 128 operations and about 1 MB per transaction.
        let mut batches: Vec<Vec<(String, String)>> = Vec::new();
        let mut bytes = 0;
        for item in items {
            let size = item.0.len() + item.1.len();
            match batches.last_mut() {
                Some(b) if b.len() < TXN_OPS && bytes + size <= TXN_BYTES => {
                    bytes += size;
                    b.push(item.clone());
                }
                _ => {
                    bytes = size;
                    batches.push(vec![item.clone()]);
                }
            }
        }
        let client = self.client.clone();
        self.rt.block_on(async move {
            let mut set: tokio::task::JoinSet<Result<(), etcd_client::Error>> =
                tokio::task::JoinSet::new();
            for batch in batches {
                if set.len() >= IN_FLIGHT
                    && let Some(r) = set.join_next().await
                {
                    r.expect("txn task").expect("txn");
                }
                let mut c = client.clone();
                set.spawn(async move {
                    let ops: Vec<TxnOp> = batch
                        .iter()
                        .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                        .collect();
                    c.txn(Txn::new().and_then(ops)).await.map(drop)
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("txn task").expect("txn");
            }
        });
    }
}

// --- elb against this etcd --------------------------------------------------------

/// An elb (2 workers) on `endpoints` with `--name name`.
pub fn elb_on(endpoints: &str, name: &str) -> super::ElbBuilder {
    super::Elb::builder()
        .no_default_etcd()
        .workers(2)
        .args(["--etcd", endpoints, "--name", name])
}

/// The name of the echo backend that answered `GET /` for `host`, if one
/// did (any other answer or an I/O error: `None`).
pub fn served_by(addr: std::net::SocketAddr, host: &str) -> Option<String> {
    let (status, _, body) = http_get_timeout(addr, host, "/", Duration::from_secs(2)).ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("name")?.as_str().map(str::to_string)
}

/// The status of `GET /` for `host` (`None` on an I/O error).
pub fn status_of(addr: std::net::SocketAddr, host: &str) -> Option<u16> {
    http_get_timeout(addr, host, "/", Duration::from_secs(2))
        .ok()
        .map(|(s, _, _)| s)
}

/// A rule set that sends everything to `servername`, as JSON text.
pub fn rules_to(servername: &str) -> String {
    super::backend::to_backend(servername).to_string()
}

/// Waits up to `timeout` for `host` to be served by the backend `name`;
/// returns how long it took, or fails the test showing elb's stderr.
pub fn expect_served(elb: &super::Elb, host: &str, name: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    let mut last = None;
    let ok = wait_until(timeout, || {
        last = served_by(elb.listen_addr(), host);
        last.as_deref() == Some(name)
    });
    assert!(
        ok,
        "{host} not served by {name} within {timeout:?} (last: {last:?}, status {:?}); elb stderr:\n{}",
        status_of(elb.listen_addr(), host),
        elb.stderr()
    );
    t.elapsed()
}

/// Waits up to `timeout` for `GET /` on `host` to answer `status`.
pub fn expect_status(elb: &super::Elb, host: &str, status: u16, timeout: Duration) {
    let mut last = None;
    let ok = wait_until(timeout, || {
        last = status_of(elb.listen_addr(), host);
        last == Some(status)
    });
    assert!(
        ok,
        "{host} did not answer {status} within {timeout:?} (last: {last:?}); elb stderr:\n{}",
        elb.stderr()
    );
}
