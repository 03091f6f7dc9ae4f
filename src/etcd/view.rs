//! The master's copy of what etcd holds under the watched prefixes: every
//! key's raw value and revision, and every upstream's peers by layout. It
//! turns watch events, and a full reload, into [`Changes`] for the store
//! (peers as named: the client resolves them), and plans the writes of a
//! dump.
//!
//! Events are applied by revision: an event older than what the view holds
//! for its key is dropped. That makes a watch that replays what a reload
//! already saw, the echo of a dump, or two watches over overlapping
//! prefixes harmless.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::Value;

use crate::peers::{PeerParams, split_host_port};

use super::keys::{KeyKind, Layout, Source, ValueError, parse_peer, parse_rules};
use crate::store::{Changes, PeerList};

/// A key and its value at a revision, as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A watch event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Put(Kv),
    Delete { key: Vec<u8>, revision: i64 },
}

/// A value that was skipped: its key and why.
#[derive(Debug)]
pub struct Skipped {
    pub key: String,
    pub error: ValueError,
}

/// What applying events produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changes: Changes<PeerList>,
    pub skipped: Vec<Skipped>,
    /// Keys whose value changed in the view.
    pub keys_changed: usize,
}

type PeerMap = BTreeMap<(String, Source), PeerParams>;

pub struct View {
    layout: Layout,
    kvs: HashMap<Vec<u8>, (Vec<u8>, i64)>,
    /// Keys a dump deleted, with the revision: an older put of them still
    /// in flight on the watch must not bring them back.
    tombstones: HashMap<Vec<u8>, i64>,
    peers: HashMap<String, PeerMap>,
}

impl View {
    pub fn new(layout: Layout) -> View {
        View {
            layout,
            kvs: HashMap::new(),
            tombstones: HashMap::new(),
            peers: HashMap::new(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of domain keys and of upstreams currently held.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        let domains = self
            .kvs
            .keys()
            .filter(|k| matches!(self.layout.classify(k), KeyKind::Domain(_)))
            .count();
        (domains, self.peers.len())
    }

    /// Applies watch events; events older than the view's state of their
    /// key are dropped.
    pub fn apply(&mut self, events: Vec<Event>) -> Outcome {
        let mut batch = Batch::default();
        for ev in events {
            self.apply_one(ev, false, &mut batch);
        }
        self.finish(batch)
    }

    /// Replaces the view by a full listing at one revision, producing the
    /// changes that lead from the old view to it (none if nothing changed).
    /// Revisions are not compared: after a wipe or a restore they may go
    /// back.
    pub fn resync(&mut self, listing: Vec<Kv>) -> Outcome {
        self.tombstones.clear();
        let mut batch = Batch::default();
        let mut seen: HashSet<Vec<u8>> = HashSet::with_capacity(listing.len());
        for kv in listing {
            seen.insert(kv.key.clone());
            match self.kvs.get_mut(&kv.key) {
                Some((value, rev)) if *value == kv.value => *rev = kv.mod_revision,
                _ => self.apply_one(Event::Put(kv), true, &mut batch),
            }
        }
        let gone: Vec<Vec<u8>> = self
            .kvs
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.apply_one(Event::Delete { key, revision: 0 }, true, &mut batch);
        }
        self.finish(batch)
    }

    /// Records what a dump wrote (each write with its txn's revision), so
    /// that the view matches etcd without touching the store, which already
    /// holds that state; the watch's echo of these writes is then dropped as
    /// not newer.
    pub fn record_dump(&mut self, writes: &[(Op, i64)]) {
        let mut batch = Batch::default();
        for (op, revision) in writes {
            match op {
                Op::Put(key, value) => self.apply_one(
                    Event::Put(Kv {
                        key: key.clone(),
                        value: value.clone(),
                        mod_revision: *revision,
                    }),
                    false,
                    &mut batch,
                ),
                Op::Delete(key) => {
                    self.apply_one(
                        Event::Delete {
                            key: key.clone(),
                            revision: *revision,
                        },
                        false,
                        &mut batch,
                    );
                    self.tombstones.insert(key.clone(), *revision);
                }
            }
        }
        // Drop empty upstreams the same way `finish` would.
        for up in batch.upstreams {
            if self.peers.get(&up).is_some_and(BTreeMap::is_empty) {
                self.peers.remove(&up);
            }
        }
    }

    fn apply_one(&mut self, ev: Event, force: bool, batch: &mut Batch) {
        match ev {
            Event::Put(kv) => {
                if !force {
                    let held = self.kvs.get(&kv.key).map(|(_, r)| *r);
                    let dead = self.tombstones.get(&kv.key).copied();
                    if held.max(dead).is_some_and(|r| r >= kv.mod_revision) {
                        return;
                    }
                }
                self.tombstones.remove(&kv.key);
                batch.keys_changed += 1;
                self.interpret_put(&kv.key, &kv.value, batch);
                self.kvs.insert(kv.key, (kv.value, kv.mod_revision));
            }
            Event::Delete { key, revision } => {
                match self.kvs.get(&key) {
                    None => return,
                    Some((_, r)) if !force && *r >= revision => return,
                    Some(_) => {}
                }
                self.kvs.remove(&key);
                batch.keys_changed += 1;
                match self.layout.classify(&key) {
                    KeyKind::Domain(d) => {
                        batch.domains.insert(d.to_string(), None);
                    }
                    KeyKind::Peer {
                        source,
                        upstream,
                        peer,
                    } => {
                        if let Some(m) = self.peers.get_mut(upstream) {
                            m.remove(&(peer.to_string(), source));
                        }
                        batch.upstreams.insert(upstream.to_string());
                    }
                    KeyKind::Unknown => {}
                }
            }
        }
    }

    fn interpret_put(&mut self, key: &[u8], value: &[u8], batch: &mut Batch) {
        let skip = |batch: &mut Batch, error| {
            batch.skipped.push(Skipped {
                key: String::from_utf8_lossy(key).into_owned(),
                error,
            })
        };
        match self.layout.classify(key) {
            KeyKind::Domain(d) => match parse_rules(value) {
                Ok(v) => {
                    batch.domains.insert(d.to_string(), Some(v));
                }
                // The rule set in force stays.
                Err(e) => skip(batch, e),
            },
            KeyKind::Peer {
                source,
                upstream,
                peer,
            } => match split_host_port(peer)
                .map_err(ValueError::from)
                .and_then(|_| parse_peer(source, value))
            {
                Ok((p, defaulted)) => {
                    if let Some(why) = defaulted {
                        log::warn!(
                            "etcd: {}: {why}; every lua-resty-upstream-etcd default applies",
                            String::from_utf8_lossy(key)
                        );
                    }
                    self.peers
                        .entry(upstream.to_string())
                        .or_default()
                        .insert((peer.to_string(), source), p);
                    batch.upstreams.insert(upstream.to_string());
                }
                // The peer's parameters in force (if any) stay; a peer
                // that is not `host:port` is never in.
                Err(e) => skip(batch, e),
            },
            KeyKind::Unknown => log::debug!(
                "etcd: ignoring {}: not a rule set or a peer key",
                String::from_utf8_lossy(key)
            ),
        }
    }

    fn finish(&mut self, batch: Batch) -> Outcome {
        let mut changes = Changes {
            domains: batch.domains.into_iter().collect(),
            upstreams: Vec::with_capacity(batch.upstreams.len()),
        };
        for up in batch.upstreams {
            let merged = self.peers.get(&up).map(merge).unwrap_or_default();
            if merged.is_empty() {
                self.peers.remove(&up);
                changes.upstreams.push((up, None));
            } else {
                changes.upstreams.push((up, Some(merged)));
            }
        }
        Outcome {
            changes,
            skipped: batch.skipped,
            keys_changed: batch.keys_changed,
        }
    }
}

/// One upstream's peers from both layouts; on a name in both, the
/// `/$NAME/upstreams/` one (sorted last) wins.
fn merge(peers: &PeerMap) -> PeerList {
    let mut out: BTreeMap<&str, &PeerParams> = BTreeMap::new();
    for ((name, _), p) in peers {
        out.insert(name, p);
    }
    out.into_iter()
        .map(|(n, p)| (n.to_string(), p.clone()))
        .collect()
}

#[derive(Default)]
struct Batch {
    domains: BTreeMap<String, Option<Value>>,
    upstreams: BTreeSet<String>,
    skipped: Vec<Skipped>,
    keys_changed: usize,
}

// --- dump --------------------------------------------------------------------

/// One write of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

impl Op {
    fn size(&self) -> usize {
        // Key and value plus the request's framing, generously.
        match self {
            Op::Put(k, v) => k.len() + v.len() + 32,
            Op::Delete(k) => k.len() + 32,
        }
    }
}

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Under etcd's default `--max-request-bytes` (1.5 MiB), with room to spare.
pub const MAX_TXN_BYTES: usize = 1_400_000;

/// What the in-memory configuration looks like in etcd.
pub fn desired(
    layout: &Layout,
    domains: &[(String, Value)],
    upstreams: &[(String, Vec<(String, PeerParams)>)],
) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (d, rules) in domains {
        out.insert(
            layout.domain_key(d).into_bytes(),
            rules.to_string().into_bytes(),
        );
    }
    for (up, peers) in upstreams {
        for (peer, params) in peers {
            out.insert(
                layout.peer_key(up, peer).into_bytes(),
                params.to_value().into_bytes(),
            );
        }
    }
    out
}

/// The transactions that turn `current` (what is under the dumped
/// prefixes) into `desired`: keys already holding the right value are left
/// alone. One transaction when everything fits in one; otherwise every put
/// first, then the deletes of stale keys, so that nothing in use vanishes
/// before its replacement is written.
pub fn plan_dump(
    current: &HashMap<Vec<u8>, Vec<u8>>,
    desired: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Vec<Vec<Op>> {
    let puts: Vec<Op> = desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| Op::Put(k.clone(), v.clone()))
        .collect();
    let mut stale: Vec<&Vec<u8>> = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .collect();
    stale.sort();
    let deletes: Vec<Op> = stale.into_iter().map(|k| Op::Delete(k.clone())).collect();
    let total = puts.len() + deletes.len();
    let bytes: usize = puts.iter().chain(&deletes).map(Op::size).sum();
    if total == 0 {
        return Vec::new();
    }
    if total <= MAX_TXN_OPS && bytes <= MAX_TXN_BYTES {
        return vec![puts.into_iter().chain(deletes).collect()];
    }
    let mut batches = chunk(puts);
    batches.extend(chunk(deletes));
    batches
}

fn chunk(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    let mut cur: Vec<Op> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let s = op.size();
        if !cur.is_empty() && (cur.len() == MAX_TXN_OPS || bytes + s > MAX_TXN_BYTES) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += s;
        cur.push(op);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Weight;

    fn layout() -> Layout {
        Layout::new("T", Some("/svc/"))
    }

    fn put(key: &str, value: &str, rev: i64) -> Event {
        Event::Put(Kv {
            key: key.into(),
            value: value.into(),
            mod_revision: rev,
        })
    }

    fn del(key: &str, rev: i64) -> Event {
        Event::Delete {
            key: key.into(),
            revision: rev,
        }
    }

    const RULES: &str =
        r#"{"init":"a","rules":{"a":{"type":"backend","args":{"servername":"web"}}}}"#;

    #[test]
    fn events_become_changes_and_peers_are_merged() {
        let mut v = View::new(layout());
        let o = v.apply(vec![
            put("/T/rules/a.com", RULES, 2),
            put("/T/upstreams/web/127.0.0.1:1", "weight=2", 3),
            put("/svc/web/127.0.0.1:2", r#"{"weight":3}"#, 4),
            put("/svc/web/127.0.0.1:1", r#"{"weight":9}"#, 5),
            put("/T/rules/bad.com", "{nope", 6),
        ]);
        assert_eq!(o.changes.domains.len(), 1);
        assert_eq!(o.skipped.len(), 1);
        assert_eq!(o.skipped[0].key, "/T/rules/bad.com");
        let (name, peers) = &o.changes.upstreams[0];
        let peers = peers.as_ref().expect("peers");
        assert_eq!(name, "web");
        assert_eq!(peers.len(), 2);
        // The /T/upstreams/ value wins over the services one.
        assert_eq!(peers[0].0, "127.0.0.1:1");
        assert_eq!(peers[0].1.weight, Weight::whole(2));
        assert_eq!(peers[1].1.weight, Weight::whole(3));
        assert_eq!(v.counts(), (2, 1));
        // Deleting the last peers removes the upstream.
        let o = v.apply(vec![
            del("/T/upstreams/web/127.0.0.1:1", 7),
            del("/svc/web/127.0.0.1:1", 7),
            del("/svc/web/127.0.0.1:2", 7),
        ]);
        assert_eq!(o.changes.upstreams, vec![("web".to_string(), None)]);
        assert_eq!(v.counts(), (2, 0));
    }

    #[test]
    fn old_and_repeated_events_are_dropped() {
        let mut v = View::new(layout());
        v.apply(vec![put("/T/rules/a.com", RULES, 5)]);
        let o = v.apply(vec![
            put("/T/rules/a.com", RULES, 5),
            del("/T/rules/a.com", 4),
        ]);
        assert_eq!(o.keys_changed, 0);
        assert!(o.changes.domains.is_empty());
        let o = v.apply(vec![del("/T/rules/a.com", 6), del("/T/rules/a.com", 6)]);
        assert_eq!(o.changes.domains, vec![("a.com".to_string(), None)]);
    }

    #[test]
    fn resync_yields_only_the_difference() {
        let mut v = View::new(layout());
        let kv = |k: &str, val: &str, r| Kv {
            key: k.into(),
            value: val.into(),
            mod_revision: r,
        };
        let o = v.resync(vec![
            kv("/T/rules/a.com", RULES, 2),
            kv("/T/upstreams/web/127.0.0.1:1", "", 3),
        ]);
        assert_eq!(o.keys_changed, 2);
        let o = v.resync(vec![
            kv("/T/rules/a.com", RULES, 2),
            kv("/T/upstreams/web/127.0.0.1:1", "", 3),
        ]);
        assert_eq!(o.keys_changed, 0);
        assert!(o.changes.domains.is_empty() && o.changes.upstreams.is_empty());
        // After a wipe: lower revisions, one key gone, one new.
        let o = v.resync(vec![kv("/T/upstreams/web/127.0.0.1:2", "", 1)]);
        assert_eq!(o.changes.domains, vec![("a.com".to_string(), None)]);
        let peers = o.changes.upstreams[0].1.as_ref().expect("peers");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].0, "127.0.0.1:2");
    }

    #[test]
    fn a_dump_is_recorded_and_its_echo_ignored() {
        let mut v = View::new(layout());
        v.apply(vec![put("/T/rules/old.com", RULES, 2)]);
        v.record_dump(&[
            (Op::Put(b"/T/rules/a.com".to_vec(), RULES.into()), 10),
            (Op::Delete(b"/T/rules/old.com".to_vec()), 11),
        ]);
        // The echo, and an older put of the deleted key still in flight.
        let o = v.apply(vec![
            put("/T/rules/old.com", RULES, 9),
            put("/T/rules/a.com", RULES, 10),
            del("/T/rules/old.com", 11),
        ]);
        assert_eq!(o.keys_changed, 0);
        assert_eq!(v.counts(), (1, 0));
    }

    #[test]
    fn dump_plans_fit_etcd_limits() {
        let cur: HashMap<Vec<u8>, Vec<u8>> = [
            (b"/k/same".to_vec(), b"1".to_vec()),
            (b"/k/stale".to_vec(), b"x".to_vec()),
        ]
        .into();
        let mut want: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        want.insert(b"/k/same".to_vec(), b"1".to_vec());
        want.insert(b"/k/new".to_vec(), b"2".to_vec());
        let plan = plan_dump(&cur, &want);
        assert_eq!(
            plan,
            vec![vec![
                Op::Put(b"/k/new".to_vec(), b"2".to_vec()),
                Op::Delete(b"/k/stale".to_vec())
            ]]
        );
        assert!(plan_dump(&cur, &cur.clone().into_iter().collect()).is_empty());
        // 300 puts and 100 deletes: puts first, in txns of at most 128.
        let cur: HashMap<Vec<u8>, Vec<u8>> = (0..100)
            .map(|i| (format!("/old/{i}").into_bytes(), b"v".to_vec()))
            .collect();
        let want: BTreeMap<Vec<u8>, Vec<u8>> = (0..300)
            .map(|i| (format!("/new/{i:03}").into_bytes(), b"v".to_vec()))
            .collect();
        let plan = plan_dump(&cur, &want);
        assert!(plan.iter().all(|b| !b.is_empty() && b.len() <= MAX_TXN_OPS));
        let flat: Vec<&Op> = plan.iter().flatten().collect();
        assert_eq!(flat.len(), 400);
        let first_delete = flat.iter().position(|o| matches!(o, Op::Delete(_)));
        assert_eq!(first_delete, Some(300));
        assert!(!plan.iter().any(|b| {
            b.iter().any(|o| matches!(o, Op::Put(..)))
                && b.iter().any(|o| matches!(o, Op::Delete(_)))
        }));
        // Big values split by size.
        let big: BTreeMap<Vec<u8>, Vec<u8>> = (0..4)
            .map(|i| (format!("/b/{i}").into_bytes(), vec![b'x'; 600_000]))
            .collect();
        let plan = plan_dump(&HashMap::new(), &big);
        assert_eq!(plan.len(), 2);
        assert!(
            plan.iter()
                .all(|b| b.iter().map(Op::size).sum::<usize>() <= MAX_TXN_BYTES)
        );
    }
}
