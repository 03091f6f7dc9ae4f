//! A Kubernetes apiserver stand-in for integration tests: real HTTPS (a fresh
//! CA and server certificate per instance), real bearer-token checks, and the
//! apiserver's JSON protocol for `discovery.k8s.io/v1` EndpointSlices (and the
//! core/v1 Endpoints derived from them), so that a real client (`kubectl`,
//! client-go, the `kube` crate's `watcher`) can list and watch it. Nothing is
//! installed: it runs in the test process, on std threads and blocking rustls.
//!
//! What it covers:
//! * TLS on `127.0.0.1:<common::free_port()>`, certificate valid for the IP
//!   `127.0.0.1` and the name `localhost`, signed by a per-instance CA
//!   ([`ApiServer::ca_pem`]); ALPN `http/1.1` only (clients fall back from h2).
//! * `Authorization: Bearer <token>` on every request, else 401 `Unauthorized`
//!   (a `Status` object); [`ApiServer::set_forbidden`] makes every resource
//!   request 403 `Forbidden` (discovery stays open, as the `system:discovery`
//!   role keeps it for every authenticated user).
//! * Discovery, legacy form: `GET /version`, `/api`, `/apis`, `/api/v1`,
//!   `/apis/discovery.k8s.io`, `/apis/discovery.k8s.io/v1`. Aggregated
//!   discovery (`as=APIGroupDiscoveryList`) is answered with the plain legacy
//!   JSON, from which clients fall back, as against an apiserver before 1.26.
//!   `/openapi/v2`, `/openapi/v3` and any other path: 404 `Status`.
//! * `endpointslices` (discovery.k8s.io/v1) and `endpoints` (core v1): get,
//!   list and watch, per namespace and across all namespaces. Endpoints are
//!   derived from the slices the way the endpoints controller does (one object
//!   per `kubernetes.io/service-name`, ready → `addresses`, not ready →
//!   `notReadyAddresses`, terminating → left out, one subset per port list).
//!   `namespaces`: list and get (`default`, `kube-system`, `kube-public` and
//!   any namespace that holds a slice).
//! * List: `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`),
//!   `fieldSelector` on `metadata.name` / `metadata.namespace` only (other
//!   fields: 400), `limit` + `continue` (real pagination over a consistent
//!   snapshot; an expired continue token is 410), `resourceVersion` with
//!   `resourceVersionMatch` `NotOlderThan` (default; a version newer than the
//!   current one is 504 "Too large resource version") or `Exact` (the state at
//!   that version, rebuilt from history; older than the compaction point:
//!   410 `Expired`). `metadata.resourceVersion` of the list is the global
//!   resourceVersion, a decimal string that grows with every change.
//! * Watch (`watch=1|true`): chunked, newline-delimited JSON events `ADDED`,
//!   `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`, each flushed when it happens.
//!   From a `resourceVersion`: every change after it (history is kept until
//!   [`ApiServer::compact`]); with none or `"0"`: synthetic `ADDED` for what
//!   exists, then changes. `allowWatchBookmarks=true`: a `BOOKMARK` every
//!   second. `timeoutSeconds=N`: the stream ends after N s. `sendInitialEvents
//!   =true` (watch-list streaming): `ADDED` for what exists, then a bookmark
//!   annotated `k8s.io/initial-events-end`. A label selector filters events
//!   as the apiserver does (an object that stops matching is `DELETED`).
//!   A watch from a compacted version gets one `ERROR` event (`Status` 410
//!   `Expired`) and the stream ends; [`ApiServer::compact`] does the same to
//!   every open watch.
//! * Outages: [`ApiServer::set_down`] resets every open connection (watches
//!   included) and closes the listening socket, so new connections are
//!   refused (client-go fails those at once, where it retries resets); the
//!   same port is listened on again when it is back up. The port comes from
//!   `common::free_port` (below the ephemeral range) so that no client
//!   connection can take it in between.
//!
//! What it does not do: protobuf or YAML bodies, CBOR, HTTP/2, any write verb
//! through the API (changes come from the test's own calls; POST, PUT, PATCH,
//! DELETE answer 405), server-side apply, dry runs, the legacy
//! `/watch/` path prefix, field selectors other than name and namespace,
//! `resourceVersionMatch` on watches, `Table` output (a request asking for
//! `as=Table` gets the plain list, as from a server without table support),
//! OpenAPI documents, authentication other than one static bearer token
//! (no client certificates, no anonymous access: even `/version` needs the
//! token), RBAC per resource, admission, validation of the objects it is
//! given, resource kinds other than the three above, separate resourceVersion
//! counters per resource (one counter, as with a single etcd), and real
//! compaction timing (it happens only when the test calls
//! [`ApiServer::compact`]).
//!
//! ```ignore
//! let api = ApiServer::start("secret");
//! api.set_endpoint_slice("default", endpoint_slice("web-abc", "web", "http", 8080,
//!     &[("10.0.0.1", true, false)]));
//! let kubeconfig = dir.write("kubeconfig", &api.kubeconfig("secret"));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};

use super::Response;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The `gitVersion` that `GET /version` reports.
pub const SERVER_VERSION: &str = "v1.28.0";

/// How often idle connection threads look at the stop and down switches, and
/// how long a watch waits for a change before it looks again.
const TICK: Duration = Duration::from_millis(50);

/// How long a write to a client may block before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

// --- certificates ------------------------------------------------------------

/// A certificate authority made for one test, with rcgen.
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl TestCa {
    /// A fresh self-signed CA (ECDSA P-256) named `common_name`.
    pub fn new(common_name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa { params, key, cert }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server certificate for `names` (IP addresses become IP SANs, the
    /// rest DNS SANs) signed by this CA: (certificate DER, PKCS#8 key DER).
    pub fn server_cert(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("server cert params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        let key = rcgen::KeyPair::generate().expect("server key");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign server cert");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), key)
    }
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// --- the server --------------------------------------------------------------

/// A running apiserver stand-in. Dropping it stops it: the listener, every
/// connection and every thread.
pub struct ApiServer {
    addr: SocketAddr,
    ca: TestCa,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    token: String,
    tls: Arc<rustls::ServerConfig>,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    down: AtomicBool,
    forbidden: AtomicBool,
    slices_served: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn quitting(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.down.load(Ordering::Acquire)
    }
}

impl ApiServer {
    /// Starts a stand-in on `127.0.0.1:<free port>` that accepts `token`.
    pub fn start(token: &str) -> ApiServer {
        let ca = TestCa::new("elb-test-kubernetes-ca");
        let (cert, key) = ca.server_cert(&["127.0.0.1", "localhost"]);
        let mut tls = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server certificate");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let addr = super::free_addr();
        let listener = TcpListener::bind(addr).expect("bind apiserver stand-in");
        let shared = Arc::new(Shared {
            token: token.to_string(),
            tls: Arc::new(tls),
            state: Mutex::new(State::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
            forbidden: AtomicBool::new(false),
            slices_served: AtomicBool::new(true),
            threads: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("apiserver-accept".into())
            .spawn(move || accept_loop(s, listener))
            .expect("spawn accept thread");
        ApiServer {
            addr,
            ca,
            shared,
            accept: Some(accept),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the server certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Writes `token` (the token given to [`ApiServer::start`]) and `ca.crt`
    /// into `dir`, as in a pod's service-account directory: (token file, CA
    /// file).
    pub fn write_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let token = dir.join("token");
        let ca = dir.join("ca.crt");
        std::fs::write(&token, &self.shared.token).expect("write token file");
        std::fs::write(&ca, self.ca_pem()).expect("write CA file");
        (token, ca)
    }

    /// A kubeconfig (YAML) for this server with this server's CA and `token`.
    pub fn kubeconfig(&self, token: &str) -> String {
        kubeconfig_yaml(&self.url(), &self.ca_pem(), token)
    }

    /// Creates the EndpointSlice `slice` in `namespace`, or replaces the one
    /// of the same `metadata.name`: the server fills in `namespace`, `uid`,
    /// `resourceVersion` (the next global one), `generation`,
    /// `creationTimestamp`, `apiVersion` and `kind`, and open watches get
    /// `ADDED` or `MODIFIED`. The Endpoints of its service follow.
    pub fn set_endpoint_slice(&self, namespace: &str, slice: Value) {
        let name = slice["metadata"]["name"]
            .as_str()
            .expect("EndpointSlice without metadata.name")
            .to_string();
        let mut st = self.shared.lock();
        let key = (Kind::EndpointSlice, namespace.to_string(), name.clone());
        let old_service = st.objects.get(&key).and_then(service_of);
        let new_service = service_of(&slice);
        st.record(Kind::EndpointSlice, namespace, &name, Some(slice));
        for svc in BTreeSet::from_iter(old_service.into_iter().chain(new_service)) {
            st.sync_endpoints(namespace, &svc);
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Deletes an EndpointSlice (nothing if there is none): open watches get
    /// `DELETED` with its last state at the new resourceVersion.
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) {
        let mut st = self.shared.lock();
        let key = (Kind::EndpointSlice, namespace.to_string(), name.to_string());
        let service = st.objects.get(&key).and_then(service_of);
        st.record(Kind::EndpointSlice, namespace, name, None);
        if let Some(svc) = service {
            st.sync_endpoints(namespace, &svc);
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// The EndpointSlices now in `namespace`, as the server holds them.
    pub fn endpoint_slices(&self, namespace: &str) -> Vec<Value> {
        let st = self.shared.lock();
        st.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == Kind::EndpointSlice && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Compacts the history: every version older than the current one is
    /// gone. Open watches get an `ERROR` event (`Status` 410 `Expired`) and
    /// are closed; a watch from an older version then gets that same event,
    /// an `Exact` list or a continue token from before gets HTTP 410.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted_rv = st.rv;
        st.compactions += 1;
        st.history.clear();
        drop(st);
        self.shared.changed.notify_all();
    }

    /// While down, every open connection (watches included) is reset and
    /// nothing listens on the port (connections are refused); the data is
    /// kept for when it is back up, on the same port. Returns once the
    /// listening socket is closed, or open again.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Release);
        self.shared.changed.notify_all();
        if down {
            // Wake the accept loop, which then sees `down`.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        let mut st = self.shared.lock();
        let deadline = Instant::now() + Duration::from_secs(10);
        while st.listening == down && Instant::now() < deadline {
            st = self
                .shared
                .changed
                .wait_timeout(st, TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        assert!(
            st.listening != down,
            "the apiserver stand-in could not {} {}",
            if down { "close" } else { "listen on" },
            self.addr
        );
    }

    /// While set, every authenticated request for resources (not discovery,
    /// which every authenticated user may read) is answered 403 `Forbidden`,
    /// as for a service account without RBAC for them.
    pub fn set_forbidden(&self, forbidden: bool) {
        self.shared.forbidden.store(forbidden, Ordering::Release);
    }

    /// Whether the `discovery.k8s.io` group exists: when not, discovery does
    /// not list it and its paths are 404, as on a cluster older than 1.21;
    /// the core/v1 `endpoints` stay.
    pub fn set_endpoint_slices_served(&self, served: bool) {
        self.shared.slices_served.store(served, Ordering::Release);
    }

    /// Same as `set_endpoint_slices_served(false)`.
    pub fn without_endpoint_slices(&self) {
        self.set_endpoint_slices_served(false);
    }

    /// `"METHOD path?query"` of every request read so far, in order (requests
    /// refused for their token included).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    /// `GET path_and_query` over a new TLS connection that trusts this
    /// server's CA, with `Authorization: Bearer <token>` and `Connection:
    /// close`, read to the end (a watch must end by itself: `timeoutSeconds`,
    /// an `ERROR`, or the server going down). The body is de-chunked.
    pub fn get(&self, token: &str, path_and_query: &str) -> io::Result<Response> {
        https_get(self.addr, &self.ca.der(), token, path_and_query)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        // Wake the accept loop, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A kubeconfig (YAML) for `server` trusting `ca_pem`, authenticating with
/// `token`; its one context is the current one.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: standin
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: standin
  user:
    token: {token}
contexts:
- name: standin
  context:
    cluster: standin
    user: standin
    namespace: default
current-context: standin
",
        ca = base64(ca_pem.as_bytes())
    )
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `discovery.k8s.io/v1` EndpointSlice named `name` for the Service
/// `service` (label `kubernetes.io/service-name`), `addressType` IPv4, one
/// TCP port `port_name`/`port`, and one endpoint per `(ip, ready,
/// terminating)`. `ready` is the pod's readiness, and the conditions are
/// those the EndpointSlice controller writes: `serving` = ready,
/// `terminating` = terminating, `ready` = ready and not terminating.
pub fn endpoint_slice(
    name: &str,
    service: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(&str, bool, bool)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(ip, ready, terminating)| {
            json!({
                "addresses": [ip],
                "conditions": {
                    "ready": ready && !terminating,
                    "serving": ready,
                    "terminating": terminating,
                },
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn service_of(obj: &Value) -> Option<String> {
    obj["metadata"]["labels"][SERVICE_NAME_LABEL]
        .as_str()
        .map(str::to_string)
}

// --- state -------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
enum Kind {
    EndpointSlice,
    Endpoints,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Endpoints => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Endpoints => "",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "endpointslices",
            Kind::Endpoints => "endpoints",
        }
    }

    /// `endpointslices.discovery.k8s.io`, `endpoints`.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }

    /// The object of a `BOOKMARK` event, as the apiserver serializes it.
    fn bookmark(self, rv: u64, initial_events_end: bool) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let mut obj =
            json!({"kind": self.kind(), "apiVersion": self.api_version(), "metadata": meta});
        if self == Kind::EndpointSlice {
            obj["addressType"] = json!("");
            obj["endpoints"] = Value::Null;
        }
        obj
    }
}

type Key = (Kind, String, String);

/// One change: `prev` → `new` (None: absent), made at `rv`.
struct Change {
    rv: u64,
    key: Key,
    prev: Option<Value>,
    new: Option<Value>,
}

struct State {
    /// The global resourceVersion: the version of the latest change.
    rv: u64,
    /// Versions older than this are compacted (history starts after it).
    compacted_rv: u64,
    /// Bumped by each compaction: watches open across one end with 410.
    compactions: u64,
    next_uid: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change after `compacted_rv`, in order.
    history: Vec<Change>,
    requests: Vec<String>,
    open_watches: usize,
    /// Whether the listening socket is open (false while down).
    listening: bool,
}

impl State {
    fn new() -> State {
        State {
            rv: 1,
            compacted_rv: 1,
            compactions: 0,
            next_uid: 1,
            objects: BTreeMap::new(),
            history: Vec::new(),
            requests: Vec::new(),
            open_watches: 0,
            listening: true,
        }
    }

    /// Sets (Some) or deletes (None) an object as one change at a new version.
    fn record(&mut self, kind: Kind, ns: &str, name: &str, new: Option<Value>) {
        let key = (kind, ns.to_string(), name.to_string());
        let prev = self.objects.get(&key).cloned();
        if prev.is_none() && new.is_none() {
            return;
        }
        self.rv += 1;
        let rv = self.rv;
        let new = new.map(|mut obj| {
            if !obj.is_object() {
                panic!("a {} must be a JSON object: {obj}", kind.kind());
            }
            obj["apiVersion"] = json!(kind.api_version());
            obj["kind"] = json!(kind.kind());
            if !obj["metadata"].is_object() {
                obj["metadata"] = json!({});
            }
            let meta = &mut obj["metadata"];
            meta["name"] = json!(name);
            meta["namespace"] = json!(ns);
            meta["resourceVersion"] = json!(rv.to_string());
            match &prev {
                Some(p) => {
                    meta["uid"] = p["metadata"]["uid"].clone();
                    meta["creationTimestamp"] = p["metadata"]["creationTimestamp"].clone();
                    let generation = p["metadata"]["generation"].as_u64().unwrap_or(0);
                    meta["generation"] = json!(generation + 1);
                }
                None => {
                    meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
                    self.next_uid += 1;
                    meta["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
                    meta["generation"] = json!(1);
                }
            }
            obj
        });
        match &new {
            Some(obj) => {
                self.objects.insert(key.clone(), obj.clone());
            }
            None => {
                self.objects.remove(&key);
            }
        }
        self.history.push(Change { rv, key, prev, new });
    }

    /// Brings the Endpoints of `service` in `ns` in line with its slices.
    fn sync_endpoints(&mut self, ns: &str, service: &str) {
        let slices: Vec<&Value> = self
            .objects
            .iter()
            .filter(|((k, n, _), v)| {
                *k == Kind::EndpointSlice && n == ns && service_of(v).as_deref() == Some(service)
            })
            .map(|(_, v)| v)
            .collect();
        let key = (Kind::Endpoints, ns.to_string(), service.to_string());
        let current = self.objects.get(&key);
        if slices.is_empty() {
            if current.is_some() {
                self.record(Kind::Endpoints, ns, service, None);
            }
            return;
        }
        let subsets = endpoints_subsets(&slices);
        if let Some(cur) = current
            && cur.get("subsets") == subsets.as_ref()
        {
            return;
        }
        let mut obj = json!({"metadata": {"name": service}});
        if let Some(s) = subsets {
            obj["subsets"] = s;
        }
        self.record(Kind::Endpoints, ns, service, Some(obj));
    }

    /// The objects of `kind` as they were at `rv` (compacted_rv ≤ rv ≤ self.rv).
    fn objects_at(&self, kind: Kind, rv: u64) -> BTreeMap<Key, Value> {
        let mut objs: BTreeMap<Key, Value> = self
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for c in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if c.key.0 != kind {
                continue;
            }
            match &c.prev {
                Some(p) => objs.insert(c.key.clone(), p.clone()),
                None => objs.remove(&c.key),
            };
        }
        objs
    }

    /// The watch events for `filter` of the changes after `after`.
    fn events_since(&self, after: u64, filter: &Filter) -> Vec<Value> {
        let start = self.history.partition_point(|c| c.rv <= after);
        let mut out = Vec::new();
        for c in &self.history[start..] {
            if c.key.0 != filter.kind || !filter.in_namespace(&c.key.1) {
                continue;
            }
            let was = c.prev.as_ref().is_some_and(|p| filter.matches(p));
            let is = c.new.as_ref().is_some_and(|n| filter.matches(n));
            let event = match (was, is) {
                (false, true) => ("ADDED", c.new.clone()),
                (true, true) => ("MODIFIED", c.new.clone()),
                (true, false) => {
                    let mut obj = c.new.clone().or_else(|| c.prev.clone());
                    if let Some(o) = &mut obj {
                        o["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                    }
                    ("DELETED", obj)
                }
                (false, false) => continue,
            };
            out.push(json!({"type": event.0, "object": event.1}));
        }
        out
    }
}

/// The `subsets` of the Endpoints for these slices (None when empty).
fn endpoints_subsets(slices: &[&Value]) -> Option<Value> {
    // port list (as JSON text) → (ports, ready ip → address, not-ready ip → address)
    type Sub = (Value, BTreeMap<String, Value>, BTreeMap<String, Value>);
    let mut subsets: BTreeMap<String, Sub> = BTreeMap::new();
    for slice in slices {
        if slice["addressType"].as_str() == Some("FQDN") {
            continue;
        }
        let ports: Vec<Value> = slice["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["port"].is_u64())
                    .map(|p| {
                        let mut port = json!({
                            "port": p["port"],
                            "protocol": p["protocol"].as_str().unwrap_or("TCP"),
                        });
                        if let Some(n) = p["name"].as_str().filter(|n| !n.is_empty()) {
                            port["name"] = json!(n);
                        }
                        if let Some(a) = p["appProtocol"].as_str() {
                            port["appProtocol"] = json!(a);
                        }
                        port
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ports = Value::Array(ports);
        let sub = subsets
            .entry(ports.to_string())
            .or_insert_with(|| (ports.clone(), BTreeMap::new(), BTreeMap::new()));
        for ep in slice["endpoints"].as_array().into_iter().flatten() {
            // A nil `ready` means ready (EndpointConditions docs).
            let ready = ep["conditions"]["ready"].as_bool() != Some(false);
            let terminating = ep["conditions"]["terminating"].as_bool() == Some(true);
            if terminating {
                continue;
            }
            for ip in ep["addresses"].as_array().into_iter().flatten() {
                let Some(ip) = ip.as_str() else { continue };
                let mut addr = json!({"ip": ip});
                if let Some(n) = ep["nodeName"].as_str() {
                    addr["nodeName"] = json!(n);
                }
                if ep["targetRef"].is_object() {
                    addr["targetRef"] = ep["targetRef"].clone();
                }
                let into = if ready { &mut sub.1 } else { &mut sub.2 };
                into.insert(ip.to_string(), addr);
            }
        }
    }
    let out: Vec<Value> = subsets
        .into_values()
        .filter(|(_, r, n)| !r.is_empty() || !n.is_empty())
        .map(|(ports, ready, not_ready)| {
            let mut s = json!({});
            if !ready.is_empty() {
                s["addresses"] = Value::Array(ready.into_values().collect());
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = Value::Array(not_ready.into_values().collect());
            }
            if ports.as_array().is_some_and(|p| !p.is_empty()) {
                s["ports"] = ports;
            }
            s
        })
        .collect();
    (!out.is_empty()).then_some(Value::Array(out))
}

// --- selectors ---------------------------------------------------------------

enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Req {
    fn matches(&self, get: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Req::Eq(k, v) => get(k).as_deref() == Some(v),
            Req::Ne(k, v) => get(k).as_deref() != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        }
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<Req>, String> {
    let mut reqs = Vec::new();
    for t in split_terms(s) {
        let bad = || format!("unable to parse requirement: {t:?}");
        let req = if let Some(open) = t.find('(') {
            let close = t.rfind(')').filter(|&c| c > open).ok_or_else(bad)?;
            let mut words = t[..open].split_whitespace();
            let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad());
            };
            let values: Vec<String> = t[open + 1..close]
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            match op {
                "in" => Req::In(key.to_string(), values),
                "notin" => Req::NotIn(key.to_string(), values),
                _ => return Err(bad()),
            }
        } else if let Some(k) = t.strip_prefix('!') {
            Req::NotExists(k.trim().to_string())
        } else if let Some((k, v)) = t.split_once("!=") {
            Req::Ne(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            Req::Eq(k.trim().to_string(), v.trim().to_string())
        } else if t.contains(char::is_whitespace) {
            return Err(bad());
        } else {
            Req::Exists(t.to_string())
        };
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_field_selector(s: &str) -> Result<Vec<Req>, String> {
    let mut reqs = Vec::new();
    for t in split_terms(s) {
        let (k, v, eq) = if let Some((k, v)) = t.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            (k, v, true)
        } else {
            return Err(format!("invalid selector: '{s}'; can't understand '{t}'"));
        };
        let k = k.trim();
        if k != "metadata.name" && k != "metadata.namespace" {
            return Err(format!("field label not supported: {k}"));
        }
        let (k, v) = (k.to_string(), v.trim().to_string());
        reqs.push(if eq { Req::Eq(k, v) } else { Req::Ne(k, v) });
    }
    Ok(reqs)
}

/// Which objects a list or watch is about.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: Vec<Req>,
    fields: Vec<Req>,
}

impl Filter {
    fn in_namespace(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = |k: &str| obj["metadata"]["labels"][k].as_str().map(str::to_string);
        let fields = |k: &str| {
            let f = k.strip_prefix("metadata.").unwrap_or(k);
            obj["metadata"][f].as_str().map(str::to_string)
        };
        self.labels.iter().all(|r| r.matches(&labels))
            && self.fields.iter().all(|r| r.matches(&fields))
    }
}

// --- HTTP --------------------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

struct Request {
    method: String,
    target: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("1" | "true" | "True"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        super::header(&self.headers, name)
    }
}

fn decode_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Accepts connections until stopped; while down, with the listening socket
/// closed, and then bound again to the same address.
fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let addr = listener.local_addr().expect("local addr");
    let mut listener = Some(listener);
    while !shared.stop.load(Ordering::Acquire) {
        if shared.down.load(Ordering::Acquire) {
            if listener.take().is_some() {
                shared.lock().listening = false;
                shared.changed.notify_all();
            }
            let st = shared.lock();
            drop(
                shared
                    .changed
                    .wait_timeout(st, TICK)
                    .unwrap_or_else(|e| e.into_inner()),
            );
            continue;
        }
        let Some(l) = &listener else {
            // Back up: the same port again (std sets SO_REUSEADDR, so
            // connections in TIME_WAIT do not stand in the way).
            match TcpListener::bind(addr) {
                Ok(l) => {
                    listener = Some(l);
                    shared.lock().listening = true;
                    shared.changed.notify_all();
                }
                Err(e) => {
                    eprintln!("apiserver stand-in: cannot listen on {addr} again: {e}");
                    std::thread::sleep(TICK);
                }
            }
            continue;
        };
        let Ok((sock, _)) = l.accept() else { continue };
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        if shared.down.load(Ordering::Acquire) {
            reset(&sock);
            continue;
        }
        let s = Arc::clone(&shared);
        let t = std::thread::Builder::new()
            .name("apiserver-conn".into())
            .spawn(move || serve_conn(s, sock));
        let mut threads = shared.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| !t.is_finished());
        if let Ok(t) = t {
            threads.push(t);
        }
    }
}

/// Closes with a TCP reset (SO_LINGER 0).
fn reset(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
}

fn serve_conn(shared: Arc<Shared>, sock: TcpStream) {
    let _ = sock.set_read_timeout(Some(TICK));
    let _ = sock.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = sock.set_nodelay(true);
    let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&shared.tls)) else {
        return;
    };
    let mut tls = Tls::new(conn, sock);
    let mut buf = Vec::new();
    while let Ok(Some(req)) = read_request(&shared, &mut tls, &mut buf) {
        if shared.quitting() || !matches!(handle(&shared, &mut tls, &req), Ok(true)) {
            break;
        }
    }
    if shared.down.load(Ordering::Acquire) {
        reset(&tls.sock);
        return;
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
}

/// Appends what the client sent next to `buf`; false when the connection
/// ended or the server is stopping (a read timeout is only a tick to look
/// at that).
fn read_more(shared: &Shared, tls: &mut Tls, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 16384];
    match tls.read(&mut chunk) {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e) if is_tick(&e) => Ok(!shared.quitting()),
        Err(e) => Err(e),
    }
}

/// Reads one request head (and skips a Content-Length body). None: the
/// connection ended, or the server is stopping or down.
fn read_request(shared: &Shared, tls: &mut Tls, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD || !read_more(shared, tls, buf)? {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (first.next(), first.next()) else {
        return Ok(None);
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body_len: usize = super::header(&headers, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < body_len {
        if !read_more(shared, tls, buf)? {
            return Ok(None);
        }
    }
    buf.drain(..body_len);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        path: percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned(),
        query: decode_query(query),
        headers,
    }))
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        500 => "Internal Server Error",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A `Status` object of a failure.
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

fn not_found() -> Value {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

/// Writes a complete response; Ok(keep the connection).
fn respond(
    tls: &mut Tls,
    req: &Request,
    code: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<bool> {
    let keep = !req
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nCache-Control: no-cache, private\r\n\
         Content-Length: {}\r\n{}\r\n",
        reason_phrase(code),
        body.len(),
        if keep { "" } else { "Connection: close\r\n" },
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    tls.write_all(&out)?;
    tls.flush()?;
    Ok(keep)
}

fn respond_json(tls: &mut Tls, req: &Request, code: u16, v: &Value) -> io::Result<bool> {
    respond(tls, req, code, "application/json", v.to_string().as_bytes())
}

fn respond_status(tls: &mut Tls, req: &Request, s: &Value) -> io::Result<bool> {
    let code = s["code"].as_u64().unwrap_or(500) as u16;
    respond_json(tls, req, code, s)
}

/// Answers one request; Ok(keep the connection).
fn handle(shared: &Shared, tls: &mut Tls, req: &Request) -> io::Result<bool> {
    shared
        .lock()
        .requests
        .push(format!("{} {}", req.method, req.target));
    let authorized = req.header("authorization").is_some_and(|v| {
        v.split_once(' ').is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim() == shared.token
        })
    });
    if !authorized {
        return respond_status(tls, req, &status(401, "Unauthorized", "Unauthorized", None));
    }
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    // Discovery stays open to every authenticated user (the system:discovery
    // role), as for a service account that lacks only the RBAC for resources.
    let discovery = match segs.as_slice() {
        [] | [_] => true,
        ["api", ..] => segs.len() <= 2,
        ["apis", ..] => segs.len() <= 3,
        _ => false,
    };
    if shared.forbidden.load(Ordering::Acquire) && !discovery {
        return respond_status(tls, req, &forbidden(req, &segs));
    }
    if req.method != "GET" {
        let msg = "the server does not allow this method on the requested resource";
        return respond_status(
            tls,
            req,
            &status(405, "MethodNotAllowed", msg, Some(json!({}))),
        );
    }
    let slices = shared.slices_served.load(Ordering::Acquire);
    let collection = |kind: Kind, ns: Option<&str>| (kind, ns.map(str::to_string), None::<String>);
    let target = match segs.as_slice() {
        ["version"] => return respond_json(tls, req, 200, &version()),
        ["healthz" | "livez" | "readyz"] => {
            return respond(tls, req, 200, "text/plain; charset=utf-8", b"ok");
        }
        ["api"] => return respond_json(tls, req, 200, &api_versions(tls)),
        ["apis"] => return respond_json(tls, req, 200, &api_groups(slices)),
        ["api", "v1"] => return respond_json(tls, req, 200, &core_resources()),
        ["apis", "discovery.k8s.io"] if slices => {
            return respond_json(tls, req, 200, &discovery_group());
        }
        ["apis", "discovery.k8s.io", "v1"] if slices => {
            return respond_json(tls, req, 200, &discovery_resources());
        }
        ["api", "v1", "namespaces"] => {
            return respond_json(tls, req, 200, &namespaces(shared, None));
        }
        ["api", "v1", "namespaces", ns] => {
            return respond_json_or_status(tls, req, namespaces(shared, Some(ns)));
        }
        ["api", "v1", "endpoints"] => collection(Kind::Endpoints, None),
        ["api", "v1", "namespaces", ns, "endpoints"] => collection(Kind::Endpoints, Some(ns)),
        ["api", "v1", "namespaces", ns, "endpoints", name] => (
            Kind::Endpoints,
            Some(ns.to_string()),
            Some(name.to_string()),
        ),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] if slices => {
            collection(Kind::EndpointSlice, None)
        }
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ] if slices => collection(Kind::EndpointSlice, Some(ns)),
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
            name,
        ] if slices => (
            Kind::EndpointSlice,
            Some(ns.to_string()),
            Some(name.to_string()),
        ),
        _ => return respond_status(tls, req, &not_found()),
    };
    match target {
        (kind, Some(ns), Some(name)) => {
            let st = shared.lock();
            let obj = st.objects.get(&(kind, ns, name.clone())).cloned();
            drop(st);
            match obj {
                Some(o) => respond_json(tls, req, 200, &o),
                None => {
                    let msg = format!("{} \"{name}\" not found", kind.qualified());
                    let details =
                        json!({"name": name, "group": kind.group(), "kind": kind.plural()});
                    respond_status(tls, req, &status(404, "NotFound", &msg, Some(details)))
                }
            }
        }
        (kind, ns, _) => {
            let filter = match filter(kind, ns, req) {
                Ok(f) => f,
                Err(s) => return respond_status(tls, req, &s),
            };
            if req.flag("watch") {
                watch(shared, tls, req, &filter)
            } else {
                let answer = list(shared, req, &filter);
                respond_json_or_status(tls, req, answer)
            }
        }
    }
}

fn respond_json_or_status(tls: &mut Tls, req: &Request, v: Value) -> io::Result<bool> {
    if v["kind"] == "Status" {
        respond_status(tls, req, &v)
    } else {
        respond_json(tls, req, 200, &v)
    }
}

fn forbidden(req: &Request, segs: &[&str]) -> Value {
    let user = "system:serviceaccount:default:elb";
    let (resource, group, ns) = match segs {
        ["api", "v1", "namespaces", ns, r, ..] => (*r, "", Some(*ns)),
        ["api", "v1", r, ..] => (*r, "", None),
        ["apis", g, _, "namespaces", ns, r, ..] => (*r, *g, Some(*ns)),
        ["apis", g, _, r, ..] => (*r, *g, None),
        _ => {
            let msg = format!(
                "forbidden: User \"{user}\" cannot get path \"{}\"",
                req.path
            );
            return status(403, "Forbidden", &msg, Some(json!({})));
        }
    };
    let verb = if req.flag("watch") { "watch" } else { "list" };
    let qualified = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    let scope = match ns {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    let msg = format!(
        "{qualified} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\"{scope}"
    );
    status(
        403,
        "Forbidden",
        &msg,
        Some(json!({"group": group, "kind": resource})),
    )
}

fn filter(kind: Kind, namespace: Option<String>, req: &Request) -> Result<Filter, Value> {
    let labels = parse_label_selector(req.param("labelSelector").unwrap_or(""))
        .map_err(|m| status(400, "BadRequest", &m, None))?;
    let fields = parse_field_selector(req.param("fieldSelector").unwrap_or(""))
        .map_err(|m| status(400, "BadRequest", &m, None))?;
    Ok(Filter {
        kind,
        namespace,
        labels,
        fields,
    })
}

fn expired(message: &str) -> Value {
    status(410, "Expired", message, None)
}

fn too_large(rv: u64, current: u64) -> Value {
    status(
        504,
        "Timeout",
        &format!("Too large resource version: {rv}, current: {current}"),
        Some(
            json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
        ),
    )
}

fn parse_rv(s: &str) -> Result<u64, Value> {
    s.parse().map_err(|_| {
        status(
            400,
            "BadRequest",
            &format!("invalid resource version: {s:?}"),
            None,
        )
    })
}

fn list(shared: &Shared, req: &Request, filter: &Filter) -> Value {
    let st = shared.lock();
    let rv_param = req.param("resourceVersion").unwrap_or("");
    let exact = req.param("resourceVersionMatch") == Some("Exact");
    let (at, after) = if let Some(token) = req.param("continue").filter(|t| !t.is_empty()) {
        let Some((rv, ns, name)) = decode_continue(token) else {
            return status(400, "BadRequest", "continue key is not valid", None);
        };
        if rv < st.compacted_rv {
            return expired(
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            );
        }
        (rv, Some((filter.kind, ns, name)))
    } else if exact || !matches!(rv_param, "" | "0") {
        let rv = match parse_rv(rv_param) {
            Ok(rv) => rv,
            Err(s) => return s,
        };
        if rv > st.rv {
            return too_large(rv, st.rv);
        }
        if exact && rv < st.compacted_rv {
            return expired(&format!(
                "too old resource version: {rv} ({})",
                st.compacted_rv
            ));
        }
        (if exact { rv } else { st.rv }, None)
    } else {
        (st.rv, None)
    };
    let objects = st.objects_at(filter.kind, at);
    drop(st);
    let limit: usize = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut items = Vec::new();
    let mut more = 0usize;
    let mut last = None;
    for (key, obj) in objects {
        if after.as_ref().is_some_and(|a| key <= *a)
            || !filter.in_namespace(&key.1)
            || !filter.matches(&obj)
        {
            continue;
        }
        if limit > 0 && items.len() == limit {
            more += 1;
            continue;
        }
        last = Some(key);
        let mut obj = obj;
        if let Some(o) = obj.as_object_mut() {
            // Items of a list carry no apiVersion and kind of their own.
            o.remove("apiVersion");
            o.remove("kind");
        }
        items.push(obj);
    }
    let mut meta = json!({"resourceVersion": at.to_string()});
    if more > 0
        && let Some((_, ns, name)) = last
    {
        meta["continue"] = json!(encode_continue(at, &ns, &name));
        if filter.labels.is_empty() && filter.fields.is_empty() {
            meta["remainingItemCount"] = json!(more);
        }
    }
    json!({
        "kind": format!("{}List", filter.kind.kind()),
        "apiVersion": filter.kind.api_version(),
        "metadata": meta,
        "items": items,
    })
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}/{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_string(), parts.next()?.to_string()))
}

/// Counts an open watch while it lives.
struct WatchGuard<'a>(&'a Shared);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().open_watches -= 1;
    }
}

fn write_chunk(tls: &mut Tls, data: &[u8]) -> io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    tls.write_all(&out)?;
    tls.flush()
}

fn write_event(tls: &mut Tls, event: &Value) -> io::Result<()> {
    let mut line = event.to_string().into_bytes();
    line.push(b'\n');
    write_chunk(tls, &line)
}

/// True once the client has shut its side down (or the socket failed).
fn client_gone(sock: &TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn watch(shared: &Shared, tls: &mut Tls, req: &Request, filter: &Filter) -> io::Result<bool> {
    let rv_param = req.param("resourceVersion").unwrap_or("");
    let from = match rv_param {
        "" | "0" => None,
        s => match parse_rv(s) {
            Ok(rv) => Some(rv),
            Err(s) => return respond_status(tls, req, &s),
        },
    };
    let send_initial = req.flag("sendInitialEvents");
    let bookmarks = req.flag("allowWatchBookmarks");
    let deadline = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Instant::now() + Duration::from_secs(t));

    let mut st = shared.lock();
    let mut initial = Vec::new();
    let mut gone = None;
    let mut last = st.rv;
    match from {
        Some(rv) if !send_initial && rv < st.compacted_rv => {
            gone = Some(format!(
                "too old resource version: {rv} ({})",
                st.compacted_rv
            ));
        }
        Some(rv) if !send_initial => last = rv,
        _ => {
            let from = (filter.kind, String::new(), String::new());
            for ((kind, ns, _), obj) in st.objects.range(from..) {
                if *kind != filter.kind {
                    break;
                }
                if filter.in_namespace(ns) && filter.matches(obj) {
                    initial.push(json!({"type": "ADDED", "object": obj}));
                }
            }
        }
    }
    let generation = st.compactions;
    st.open_watches += 1;
    drop(st);
    let _guard = WatchGuard(shared);

    tls.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )?;
    tls.flush()?;
    if let Some(msg) = gone {
        write_event(tls, &json!({"type": "ERROR", "object": expired(&msg)}))?;
        return end_stream(tls, req);
    }
    for e in &initial {
        write_event(tls, e)?;
    }
    if send_initial {
        let bm = filter.kind.bookmark(last, true);
        write_event(tls, &json!({"type": "BOOKMARK", "object": bm}))?;
    }
    let mut next_bookmark = Instant::now() + Duration::from_secs(1);
    loop {
        if shared.quitting() || client_gone(&tls.sock) {
            return Ok(false);
        }
        let mut st = shared.lock();
        if st.rv <= last && st.compactions == generation {
            st = shared
                .changed
                .wait_timeout(st, TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if shared.quitting() {
            return Ok(false);
        }
        if st.compactions != generation {
            let msg = format!("too old resource version: {last} ({})", st.compacted_rv);
            drop(st);
            write_event(tls, &json!({"type": "ERROR", "object": expired(&msg)}))?;
            return end_stream(tls, req);
        }
        let events = st.events_since(last, filter);
        last = last.max(st.rv);
        drop(st);
        for e in &events {
            write_event(tls, e)?;
        }
        let now = Instant::now();
        if bookmarks && now >= next_bookmark {
            let bm = filter.kind.bookmark(last, false);
            write_event(tls, &json!({"type": "BOOKMARK", "object": bm}))?;
            next_bookmark = now + Duration::from_secs(1);
        }
        if deadline.is_some_and(|d| now >= d) {
            return end_stream(tls, req);
        }
    }
}

/// Ends a chunked watch stream; Ok(keep the connection).
fn end_stream(tls: &mut Tls, req: &Request) -> io::Result<bool> {
    tls.write_all(b"0\r\n\r\n")?;
    tls.flush()?;
    Ok(!req
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close")))
}

// --- discovery documents -----------------------------------------------------

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "28",
        "gitVersion": SERVER_VERSION,
        "gitCommit": "855e7c48de7388eb330da0f8d9d2394ee818fb8d",
        "gitTreeState": "clean",
        "buildDate": "2023-08-15T10:15:54Z",
        "goVersion": "go1.20.7",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions(tls: &Tls) -> Value {
    let addr = tls
        .sock
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}],
    })
}

fn discovery_group() -> Value {
    let v1 = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "discovery.k8s.io",
        "versions": [v1],
        "preferredVersion": v1,
    })
}

fn api_groups(slices: bool) -> Value {
    let mut groups = Vec::new();
    if slices {
        let mut g = discovery_group();
        let o = g.as_object_mut().expect("object");
        o.remove("kind");
        o.remove("apiVersion");
        groups.push(g);
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn core_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "endpoints",
                "singularName": "endpoints",
                "namespaced": true,
                "kind": "Endpoints",
                "verbs": ["get", "list", "watch"],
                "shortNames": ["ep"],
            },
            {
                "name": "namespaces",
                "singularName": "namespace",
                "namespaced": false,
                "kind": "Namespace",
                "verbs": ["get", "list"],
                "shortNames": ["ns"],
            },
        ],
    })
}

fn discovery_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "discovery.k8s.io/v1",
        "resources": [{
            "name": "endpointslices",
            "singularName": "endpointslice",
            "namespaced": true,
            "kind": "EndpointSlice",
            "verbs": ["get", "list", "watch"],
        }],
    })
}

/// The NamespaceList, or one Namespace (a 404 Status if unknown).
fn namespaces(shared: &Shared, one: Option<&str>) -> Value {
    let st = shared.lock();
    let mut names: BTreeSet<String> = ["default", "kube-public", "kube-system"]
        .into_iter()
        .map(str::to_string)
        .collect();
    names.extend(st.objects.keys().map(|(_, ns, _)| ns.clone()));
    let rv = st.rv;
    drop(st);
    let ns = |name: &str| {
        json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        })
    };
    match one {
        Some(name) if names.contains(name) => {
            let mut n = ns(name);
            n["kind"] = json!("Namespace");
            n["apiVersion"] = json!("v1");
            n
        }
        Some(name) => status(
            404,
            "NotFound",
            &format!("namespaces \"{name}\" not found"),
            Some(json!({"name": name, "kind": "namespaces"})),
        ),
        None => json!({
            "kind": "NamespaceList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": rv.to_string()},
            "items": names.iter().map(|n| ns(n)).collect::<Vec<_>>(),
        }),
    }
}

// --- time --------------------------------------------------------------------

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

// --- a client ----------------------------------------------------------------

/// `GET path_and_query` over TLS to `addr` trusting `ca` only, with a bearer
/// token and `Connection: close`, read to the end of the connection.
pub fn https_get(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    token: &str,
    path_and_query: &str,
) -> io::Result<Response> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| io::Error::other(format!("CA certificate: {e}")))?;
    let config = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    sock.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Accept: application/json\r\nUser-Agent: elb-tests\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes())?;
    tls.flush()?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // The peer closed without close_notify: what was read stands.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no complete response head"))?;
    let mut r = Response::head(&String::from_utf8_lossy(&raw[..end]))?;
    let mut body = raw[end + 4..].to_vec();
    if super::header(&r.headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let i = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunked body cut short"))?;
            let size = std::str::from_utf8(&rest[..i]).unwrap_or("");
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            rest = &rest[i + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return Err(bad("chunk cut short"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    } else if let Some(len) =
        super::header(&r.headers, "content-length").and_then(|l| l.parse().ok())
    {
        body.truncate(len);
    }
    r.body = body;
    Ok(r)
}

/// The events of a watch body (one JSON object per line).
pub fn watch_events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad watch event {l:?}: {e}")))
        .collect()
}
