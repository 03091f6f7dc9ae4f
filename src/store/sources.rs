//! Two sources of peers, as lua-resty-upstream-etcd's
//! `picker.init(first, second, merge)` had them: etcd (both layouts, and
//! the admin API, which writes what a dump puts in etcd) and Kubernetes.
//! Each source's last list per upstream is kept; what is in force is
//! computed from both for one upstream at a time, so a change from either
//! costs in proportion to that change.

use std::collections::{BTreeMap, HashSet};

use super::{PeerList, ResolvedPeers};

/// A source of peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Etcd,
    Kubernetes,
}

/// How the two sources combine (`[sources]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Without `merge`: the source whose peers win while it has any.
    pub first: SourceKind,
    /// Peers of one name from both sources are balanced together.
    pub merge: bool,
}

impl Default for SourcePolicy {
    fn default() -> Self {
        SourcePolicy {
            first: SourceKind::Etcd,
            merge: true,
        }
    }
}

#[derive(Default)]
pub(super) struct SourceLists {
    pub policy: SourcePolicy,
    etcd: BTreeMap<String, ResolvedPeers>,
    kubernetes: BTreeMap<String, ResolvedPeers>,
}

impl SourceLists {
    /// `source`'s list for `name` from now on (none, or empty: it has none).
    pub fn set(&mut self, source: SourceKind, name: &str, list: Option<ResolvedPeers>) {
        let lists = match source {
            SourceKind::Etcd => &mut self.etcd,
            SourceKind::Kubernetes => &mut self.kubernetes,
        };
        match list.filter(|l| !l.is_empty()) {
            Some(l) => {
                lists.insert(name.to_string(), l);
            }
            None => {
                lists.remove(name);
            }
        }
    }

    /// What `name`'s peers would be if `source` said `list`.
    pub fn effective_with(
        &self,
        source: SourceKind,
        name: &str,
        list: Option<&ResolvedPeers>,
    ) -> Option<ResolvedPeers> {
        let list = list.filter(|l| !l.is_empty());
        let (etcd, kubernetes) = match source {
            SourceKind::Etcd => (list, self.kubernetes.get(name)),
            SourceKind::Kubernetes => (self.etcd.get(name), list),
        };
        match (etcd, kubernetes) {
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => Some(one.clone()),
            (Some(e), Some(k)) if self.policy.merge => {
                // One peer per host:port: etcd's entry, with its parameters.
                let taken: HashSet<_> = e.values().map(|(addr, _)| *addr).collect();
                let mut merged = e.clone();
                for (n, (addr, p)) in k {
                    if !taken.contains(addr) && !merged.contains_key(n) {
                        merged.insert(n.clone(), (*addr, p.clone()));
                    }
                }
                Some(merged)
            }
            (Some(e), Some(k)) => Some(match self.policy.first {
                SourceKind::Etcd => e.clone(),
                SourceKind::Kubernetes => k.clone(),
            }),
        }
    }

    /// What is in force for `name`.
    pub fn effective(&self, name: &str) -> Option<ResolvedPeers> {
        self.effective_with(SourceKind::Etcd, name, self.etcd.get(name))
    }

    /// etcd's lists (and the admin API's), as a dump writes them.
    pub fn etcd_lists(&self) -> Vec<(String, PeerList)> {
        self.etcd
            .iter()
            .map(|(name, peers)| {
                let list = peers
                    .iter()
                    .map(|(n, (_, p))| (n.clone(), p.clone()))
                    .collect();
                (name.clone(), list)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{PeerParams, Weight};

    fn list(peers: &[(&str, u16, u32)]) -> ResolvedPeers {
        peers
            .iter()
            .map(|&(n, port, w)| {
                let p = PeerParams {
                    weight: Weight::whole(w),
                    ..PeerParams::default()
                };
                (n.to_string(), (([127, 0, 0, 1], port).into(), p))
            })
            .collect()
    }

    fn names(l: Option<ResolvedPeers>) -> Vec<(String, f64)> {
        l.unwrap_or_default()
            .into_iter()
            .map(|(n, (_, p))| (n, p.weight.as_f64()))
            .collect()
    }

    #[test]
    fn merged_first_and_fallback() {
        let mut s = SourceLists::default();
        s.set(
            SourceKind::Etcd,
            "web",
            Some(list(&[("127.0.0.1:1", 1, 5)])),
        );
        s.set(
            SourceKind::Kubernetes,
            "web",
            Some(list(&[("127.0.0.1:1", 1, 100), ("127.0.0.1:2", 2, 100)])),
        );
        // Merged: one peer per address, etcd's parameters.
        assert_eq!(
            names(s.effective("web")),
            vec![("127.0.0.1:1".into(), 5.0), ("127.0.0.1:2".into(), 100.0)]
        );
        s.policy.merge = false;
        assert_eq!(names(s.effective("web")), vec![("127.0.0.1:1".into(), 5.0)]);
        s.policy.first = SourceKind::Kubernetes;
        assert_eq!(names(s.effective("web")).len(), 2);
        // The first source has none: the other's.
        s.set(SourceKind::Kubernetes, "web", Some(ResolvedPeers::new()));
        assert_eq!(names(s.effective("web")), vec![("127.0.0.1:1".into(), 5.0)]);
        s.set(SourceKind::Etcd, "web", None);
        assert_eq!(s.effective("web"), None);
        // A dump writes etcd's lists only.
        s.set(SourceKind::Etcd, "db", Some(list(&[("127.0.0.1:4", 4, 1)])));
        assert_eq!(s.etcd_lists().len(), 1);
    }
}
