//! The Kubernetes source (lua-resty-upstream-etcd's second source): the
//! master lists, then watches, the EndpointSlices of the configured
//! namespaces and makes each Service an upstream (`slices.rs`).
//!
//! The `kube` crate's `watcher` does the protocol: a list, then a watch from
//! its `resourceVersion` with bookmarks; on `410 Gone` it lists again, and
//! on a lost connection it retries with back-off (`default_backoff`). A
//! list arrives as `Init`, `InitApply`… `InitDone`: the namespace's slices
//! are replaced only at `InitDone`, and only upstreams whose peers changed
//! are published. Until then, and whatever fails, the last known peers
//! stay: a failing source never empties an upstream.
//!
//! It runs on a thread of its own with its own single-threaded runtime, as
//! the health checks do: a relist of thousands of slices must not hold up
//! the etcd watch, nor a slow etcd the apiserver's.
//!
//! The apiserver's certificate is verified against `ca_file` (the original
//! skipped verification); the bearer token is read from `token_file`, and
//! read again as the client refreshes it, so a rotated token is picked up.

mod slices;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::settings::Kubernetes;
use crate::store::{SourceStatus, Store};
use slices::{Listing, Slices};

/// Wait before trying the apiserver again when the client cannot be set up
/// or discovery fails (the watcher has its own back-off).
const RECONNECT: Duration = Duration::from_secs(2);

/// Starts the source's thread.
pub fn start(config: Kubernetes, store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("elb-kubernetes".into())
        .spawn(move || runtime.block_on(run(config, store)))?;
    Ok(())
}

/// A client for the configured apiserver, token and CA, built the way a
/// kubeconfig file would describe them.
async fn client(config: &Kubernetes) -> Result<Client, kube::Error> {
    let name = "elb".to_string();
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: Some(Cluster {
                server: Some(config.apiserver.clone()),
                certificate_authority: Some(config.ca_file.to_string_lossy().into_owned()),
                ..Cluster::default()
            }),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.clone(),
            auth_info: Some(AuthInfo {
                token_file: Some(config.token_file.to_string_lossy().into_owned()),
                ..AuthInfo::default()
            }),
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: Some(Context {
                cluster: name.clone(),
                user: Some(name.clone()),
                ..Context::default()
            }),
        }],
        current_context: Some(name),
        ..Kubeconfig::default()
    };
    let options = KubeConfigOptions::default();
    let c = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(kube::Error::InferKubeconfig)?;
    Client::try_from(c)
}

/// What `/status` shows, and what was logged once already.
struct Reporter {
    store: Arc<Mutex<Store>>,
    endpoint: String,
    resource_version: String,
    /// The last error logged, so that a repeated one is not logged again.
    logged: Option<String>,
}

impl Reporter {
    fn report(&self, state: &'static str, last_error: Option<String>) {
        let status = SourceStatus {
            state,
            endpoint: self.endpoint.clone(),
            revision: None,
            resource_version: Some(self.resource_version.clone()),
            last_error,
        };
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_kubernetes_status(status);
    }

    fn note_version(&mut self, meta: &ObjectMeta) {
        if let Some(v) = &meta.resource_version {
            self.resource_version.clone_from(v);
        }
    }

    fn up(&mut self) {
        if self.logged.take().is_some() {
            log::info!("kubernetes ({}): watching again", self.endpoint);
        }
        self.report("up", None);
    }

    /// An error: logged once while it repeats (401 and 403 with their
    /// reason), shown in `/status`; the last known peers stay in force.
    fn failed(&mut self, why: String) {
        if self.logged.as_deref() != Some(why.as_str()) {
            log::warn!(
                "kubernetes ({}): {why}; serving the last known peers, retrying",
                self.endpoint
            );
            self.logged = Some(why.clone());
        }
        self.report("down", Some(why));
    }
}

/// Why the watch failed, in an operator's words: 401 and 403 say so.
fn describe(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => describe_kube(k),
        watcher::Error::WatchError(r) => describe_api(r).unwrap_or_else(|| with_causes(e)),
        watcher::Error::NoResourceVersion => with_causes(e),
    }
}

fn describe_kube(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(r) => describe_api(r).unwrap_or_else(|| with_causes(e)),
        _ => with_causes(e),
    }
}

fn describe_api(r: &kube::core::ErrorResponse) -> Option<String> {
    match r.code {
        401 => Some(format!(
            "401 Unauthorized (the token was refused): {}",
            r.message
        )),
        403 => Some(format!(
            "403 Forbidden (the service account needs list and watch on endpointslices): {}",
            r.message
        )),
        _ => None,
    }
}

/// An error and what caused it, as far down as it goes ("client error
/// (connect): invalid peer certificate: UnknownIssuer").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

/// Where peers are read from: EndpointSlices, or core/v1 Endpoints where
/// the apiserver has no EndpointSlice API.
enum Kind {
    Slices,
    Endpoints,
}

async fn connect(config: &Kubernetes) -> Result<(Client, Kind), kube::Error> {
    let client = client(config).await?;
    let kind = match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => Kind::Slices,
        Ok(_) => Kind::Endpoints,
        Err(kube::Error::Api(r)) if r.code == 404 => Kind::Endpoints,
        Err(e) => return Err(e),
    };
    Ok((client, kind))
}

async fn run(config: Kubernetes, store: Arc<Mutex<Store>>) {
    let mut reporter = Reporter {
        store: Arc::clone(&store),
        endpoint: config.apiserver.clone(),
        resource_version: String::new(),
        logged: None,
    };
    reporter.report("connecting", None);
    let (client, kind) = loop {
        match connect(&config).await {
            Ok(c) => break c,
            Err(e) => {
                reporter.failed(describe_kube(&e));
                tokio::time::sleep(RECONNECT).await;
            }
        }
    };
    match kind {
        Kind::Slices => watch::<EndpointSlice>(client, &config, &store, &mut reporter).await,
        Kind::Endpoints => {
            log::info!(
                "kubernetes ({}): no EndpointSlice API; watching core/v1 Endpoints",
                config.apiserver
            );
            watch::<Endpoints>(client, &config, &store, &mut reporter).await;
        }
    }
}

/// Lists and watches `K` in every configured namespace, for good.
async fn watch<K>(
    client: Client,
    config: &Kubernetes,
    store: &Mutex<Store>,
    reporter: &mut Reporter,
) where
    K: Listing
        + Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let streams = config.namespaces.iter().map(|ns| {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let ns = ns.clone();
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |ev| (ns.clone(), ev))
            .boxed()
    });
    let mut events = futures_util::stream::select_all(streams);
    let mut slices = Slices::new(&config.port_name, config.namespaces.len());
    // A list in progress, per namespace.
    let mut listing: HashMap<String, Vec<K>> = HashMap::new();
    while let Some((ns, event)) = events.next().await {
        let touched = match event {
            Ok(Event::Apply(s)) => {
                reporter.note_version(s.meta());
                slices.apply(&ns, &s)
            }
            Ok(Event::Delete(s)) => {
                reporter.note_version(s.meta());
                s.meta()
                    .name
                    .as_deref()
                    .map(|n| slices.delete(&ns, n))
                    .unwrap_or_default()
            }
            Ok(Event::Init) => {
                listing.insert(ns, Vec::new());
                continue;
            }
            Ok(Event::InitApply(s)) => {
                reporter.note_version(s.meta());
                listing.entry(ns).or_default().push(s);
                continue;
            }
            Ok(Event::InitDone) => {
                let listed = listing.remove(&ns).unwrap_or_default();
                slices.replace_namespace(&ns, &listed)
            }
            Err(e) => {
                reporter.failed(describe(&e));
                continue;
            }
        };
        reporter.up();
        publish(store, &slices, touched);
    }
}

/// Hands the touched upstreams' peers to the store, which combines them
/// with etcd's and publishes what changed.
fn publish(store: &Mutex<Store>, slices: &Slices, touched: BTreeSet<String>) {
    if touched.is_empty() {
        return;
    }
    let lists = touched
        .into_iter()
        .map(|name| {
            let peers = slices.peers(&name);
            (name, Some(peers))
        })
        .collect();
    let applied = store
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .apply_kubernetes(lists);
    for e in applied.errors {
        log::warn!("kubernetes: a change was left unchanged: {e}");
    }
}
