//! What the Kubernetes source knows: every EndpointSlice watched, by
//! namespace and name, and what they make of each Service's peers.
//!
//! * A slice belongs to the Service its `kubernetes.io/service-name` label
//!   names; slices without it are not a Service's and are ignored.
//! * The port is the one named `port_name`, else the slice's only port;
//!   a slice with neither is skipped (logged once per slice version).
//! * An endpoint that is ready (unset counts as ready, as the API says) and
//!   not terminating is a peer in force; one not ready is a peer out; one
//!   terminating is drained: out for new requests, its open exchanges go
//!   on. Each takes lua-resty-upstream-etcd's defaults.
//! * The upstream is named after the Service; with several namespaces
//!   watched, also `$namespace/$service` (that namespace only), while the
//!   plain name gathers the Service's peers of every namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;

use crate::peers::PeerParams;
use crate::store::ResolvedPeers;

const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// An object that lists a Service's endpoints: an EndpointSlice, or, where
/// the apiserver has no EndpointSlice API, the core/v1 Endpoints.
pub trait Listing: Resource {
    /// The Service and its peers, when the object is one of a Service's.
    fn read(&self, slices: &Slices, namespace: &str) -> Option<Slice>;
}

/// One object's peers, as far as routing cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    service: String,
    /// `ip:port` → (address, in force?).
    peers: BTreeMap<String, (SocketAddr, &'static str)>,
}

/// Every slice of the watched namespaces.
#[derive(Debug, Default)]
pub struct Slices {
    port_name: String,
    /// Several namespaces are watched: `$namespace/$service` names too.
    qualified: bool,
    slices: HashMap<(String, String), Slice>,
    /// (namespace, service) → its slices' names.
    by_service: BTreeMap<(String, String), BTreeSet<String>>,
}

impl Slices {
    pub fn new(port_name: &str, namespaces: usize) -> Slices {
        Slices {
            port_name: port_name.to_string(),
            qualified: namespaces > 1,
            ..Slices::default()
        }
    }

    /// An object added or changed; returns the upstream names it touched.
    pub fn apply<L: Listing>(&mut self, namespace: &str, s: &L) -> BTreeSet<String> {
        let Some(name) = s.meta().name.clone() else {
            return BTreeSet::new();
        };
        let mut touched = self.delete(namespace, &name);
        if let Some(slice) = s.read(self, namespace) {
            touched.extend(self.names(namespace, &slice.service));
            self.by_service
                .entry((namespace.to_string(), slice.service.clone()))
                .or_default()
                .insert(name.clone());
            self.slices.insert((namespace.to_string(), name), slice);
        }
        touched
    }

    /// A slice gone; returns the upstream names it touched.
    pub fn delete(&mut self, namespace: &str, name: &str) -> BTreeSet<String> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.slices.remove(&key) else {
            return BTreeSet::new();
        };
        let service = (namespace.to_string(), old.service.clone());
        if let Some(set) = self.by_service.get_mut(&service) {
            set.remove(name);
            if set.is_empty() {
                self.by_service.remove(&service);
            }
        }
        self.names(namespace, &old.service)
    }

    /// Every slice of `namespace` anew (a list after a start, a lost watch
    /// or `410 Gone`); returns the names whose peers may have changed: the
    /// store skips those whose peers did not.
    pub fn replace_namespace<L: Listing>(
        &mut self,
        namespace: &str,
        listed: &[L],
    ) -> BTreeSet<String> {
        let old: Vec<String> = self
            .slices
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, n)| n.clone())
            .collect();
        let mut touched = BTreeSet::new();
        for name in old {
            touched.extend(self.delete(namespace, &name));
        }
        for s in listed {
            touched.extend(self.apply(namespace, s));
        }
        touched
    }

    /// The peers of upstream `name` (empty: none).
    pub fn peers(&self, name: &str) -> ResolvedPeers {
        let mut out = ResolvedPeers::new();
        let wanted: Vec<&(String, String)> = match name.split_once('/') {
            Some((ns, svc)) => self
                .by_service
                .keys()
                .filter(|(n, s)| n == ns && s == svc)
                .collect(),
            None => self.by_service.keys().filter(|(_, s)| s == name).collect(),
        };
        for key in wanted {
            for slice_name in &self.by_service[key] {
                let Some(slice) = self.slices.get(&(key.0.clone(), slice_name.clone())) else {
                    continue;
                };
                for (peer, &(addr, status)) in &slice.peers {
                    // The same address in two slices: in force wins.
                    let in_force = out.get(peer).is_some_and(|(_, p)| p.status == "up");
                    if !in_force {
                        let params = PeerParams {
                            status: status.to_string(),
                            ..PeerParams::resty()
                        };
                        out.insert(peer.clone(), (addr, params));
                    }
                }
            }
        }
        out
    }

    fn names(&self, namespace: &str, service: &str) -> BTreeSet<String> {
        let mut n = BTreeSet::from([service.to_string()]);
        if self.qualified {
            n.insert(format!("{namespace}/{service}"));
        }
        n
    }

    /// The port named `port_name`, else the only one; warns when neither.
    fn port<'p>(
        &self,
        ports: impl Iterator<Item = (Option<&'p str>, Option<i32>)> + Clone,
        namespace: &str,
        name: &str,
    ) -> Option<u16> {
        let named = ports
            .clone()
            .find(|(n, _)| *n == Some(self.port_name.as_str()))
            .map(|(_, p)| p);
        let all: Vec<_> = ports.map(|(_, p)| p).collect();
        let port = match (named, all.as_slice()) {
            (Some(p), _) => p,
            (None, [only]) => *only,
            _ => None,
        };
        let port = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
        if port.is_none() {
            log::warn!(
                "kubernetes: {namespace}/{name} has no port named '{}' and not exactly one port; skipped",
                self.port_name
            );
        }
        port
    }
}

impl Listing for EndpointSlice {
    fn read(&self, slices: &Slices, namespace: &str) -> Option<Slice> {
        let s = self;
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let service = s.metadata.labels.as_ref()?.get(SERVICE_LABEL)?.clone();
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            return None;
        }
        let ports = s.ports.as_deref().unwrap_or_default();
        let port = slices.port(
            ports.iter().map(|p| (p.name.as_deref(), p.port)),
            namespace,
            name,
        )?;
        let mut peers = BTreeMap::new();
        for e in &s.endpoints {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let status = match (ready, terminating) {
                (_, true) => "terminating",
                (false, false) => "not ready",
                (true, false) => "up",
            };
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                let addr = SocketAddr::new(ip, port);
                peers.insert(addr.to_string(), (addr, status));
            }
        }
        Some(Slice { service, peers })
    }
}

/// core/v1 Endpoints: one object per Service, named after it; each subset
/// has its ports, its ready `addresses` and its `notReadyAddresses`.
impl Listing for Endpoints {
    fn read(&self, slices: &Slices, namespace: &str) -> Option<Slice> {
        let service = self.metadata.name.clone()?;
        let mut peers = BTreeMap::new();
        for subset in self.subsets.as_deref().unwrap_or_default() {
            let ports = subset.ports.as_deref().unwrap_or_default();
            let Some(port) = slices.port(
                ports.iter().map(|p| (p.name.as_deref(), Some(p.port))),
                namespace,
                &service,
            ) else {
                continue;
            };
            let ready = subset.addresses.iter().flatten().map(|a| (a, "up"));
            let not_ready = subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| (a, "not ready"));
            for (a, status) in ready.chain(not_ready) {
                if let Ok(ip) = a.ip.parse::<IpAddr>() {
                    let addr = SocketAddr::new(ip, port);
                    peers.insert(addr.to_string(), (addr, status));
                }
            }
        }
        Some(Slice { service, peers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(
        name: &str,
        service: &str,
        ports: &[(&str, u16)],
        eps: &[(&str, bool, bool)],
    ) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": ports.iter().map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
            "endpoints": eps.iter().map(|(ip, ready, term)| serde_json::json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": term}
            })).collect::<Vec<_>>(),
        }))
        .expect("slice")
    }

    fn statuses(p: &ResolvedPeers) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, (_, q))| (n.clone(), q.status.clone()))
            .collect()
    }

    #[test]
    fn ready_not_ready_and_terminating_endpoints() {
        let mut s = Slices::new("http", 1);
        let t = s.apply(
            "default",
            &slice(
                "web-1",
                "web",
                &[("metrics", 9090), ("http", 8080)],
                &[
                    ("10.0.0.1", true, false),
                    ("10.0.0.2", false, false),
                    ("10.0.0.3", false, true),
                ],
            ),
        );
        assert_eq!(t, BTreeSet::from(["web".to_string()]));
        let p = s.peers("web");
        assert_eq!(
            statuses(&p),
            vec![
                ("10.0.0.1:8080".into(), "up".into()),
                ("10.0.0.2:8080".into(), "not ready".into()),
                ("10.0.0.3:8080".into(), "terminating".into())
            ]
        );
        assert_eq!(p["10.0.0.1:8080"].1.weight, PeerParams::resty().weight);
        // A second slice of the same service adds to it; deleting one
        // takes only its peers.
        s.apply(
            "default",
            &slice("web-2", "web", &[("x", 81)], &[("10.0.0.9", true, false)]),
        );
        assert_eq!(s.peers("web").len(), 4);
        assert!(s.peers("web").contains_key("10.0.0.9:81"));
        s.delete("default", "web-1");
        assert_eq!(s.peers("web").len(), 1);
        // Two ports, none named http: skipped.
        s.apply(
            "default",
            &slice(
                "db-1",
                "db",
                &[("a", 1), ("b", 2)],
                &[("10.0.0.5", true, false)],
            ),
        );
        assert!(s.peers("db").is_empty());
    }

    #[test]
    fn core_endpoints_read_as_one_slice_per_service() {
        let ep: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "subsets": [{
                "addresses": [{"ip": "10.0.0.1"}],
                "notReadyAddresses": [{"ip": "10.0.0.2"}],
                "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9000}]
            }]
        }))
        .expect("endpoints");
        let mut s = Slices::new("http", 1);
        s.apply("default", &ep);
        assert_eq!(
            statuses(&s.peers("web")),
            vec![
                ("10.0.0.1:8080".into(), "up".into()),
                ("10.0.0.2:8080".into(), "not ready".into())
            ]
        );
    }

    #[test]
    fn several_namespaces_name_both_ways_and_a_relist_replaces() {
        let mut s = Slices::new("http", 2);
        let t = s.apply(
            "a",
            &slice(
                "web-1",
                "web",
                &[("http", 80)],
                &[("10.0.1.1", true, false)],
            ),
        );
        assert_eq!(t, BTreeSet::from(["web".to_string(), "a/web".to_string()]));
        s.apply(
            "b",
            &slice(
                "web-1",
                "web",
                &[("http", 80)],
                &[("10.0.2.1", true, false)],
            ),
        );
        assert_eq!(s.peers("web").len(), 2);
        assert_eq!(
            statuses(&s.peers("b/web")),
            vec![("10.0.2.1:80".into(), "up".into())]
        );
        let t = s.replace_namespace(
            "a",
            &[slice(
                "api-1",
                "api",
                &[("http", 80)],
                &[("10.0.1.2", true, false)],
            )],
        );
        assert!(t.contains("a/web") && t.contains("a/api"));
        assert!(s.peers("a/web").is_empty());
        assert_eq!(s.peers("web").len(), 1);
    }
}
