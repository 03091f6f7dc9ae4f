//! Putting an upstream's peers in force: staging its next state (taking
//! the state slots and counter entries new peers need), writing its record,
//! and keeping or undoing the stage; and combining what each source says
//! of it (`sources.rs`).

use super::counter_pool::Owner;
use super::records::{record, same_peers};
use super::slot_pool::SlotPool;
use super::sources::SourceKind;
use super::{Applied, Peer, ResolvedPeers, Store, StoreError, Upstream};
use elb_workers::published::upstream_key;

use std::collections::BTreeMap;

impl Store {
    /// Writes one upstream's resolved peer list (not published yet), or,
    /// when it does not fit, changes nothing.
    pub(super) fn install_upstream(
        &mut self,
        name: String,
        list: ResolvedPeers,
    ) -> Result<(), StoreError> {
        let staged = self.stage_upstream(name, list)?;
        let generation = self.writer.generation();
        if let Err(e) = self
            .writer
            .put(&upstream_key(&staged.name), &record(&staged.up))
        {
            self.unstage(vec![staged]);
            return Err(e.into());
        }
        self.keep(staged, generation);
        Ok(())
    }

    /// Builds an upstream's next state, taking the state slots it needs;
    /// nothing else changes until [`keep`](Self::keep).
    pub(super) fn stage_upstream(
        &mut self,
        name: String,
        list: ResolvedPeers,
    ) -> Result<Staged, StoreError> {
        let old = self.upstreams.get(&name);
        let mut taken = Vec::new();
        let mut retired = Vec::new();
        let take = |slots: &mut SlotPool, taken: &mut Vec<u32>| {
            let slot = slots.take(self.region)?;
            taken.push(slot.index);
            Some(slot)
        };
        let cursor = match old {
            Some(u) => Some(u.cursor_slot),
            None => take(&mut self.slots, &mut taken).map(|h| h.index),
        };
        let mut peers = BTreeMap::new();
        let mut complete = cursor.is_some();
        for (peer_name, (addr, params)) in list {
            if !complete {
                break;
            }
            // A peer that stays keeps its state (failures, time out).
            let kept = old
                .and_then(|u| u.peers.get(&peer_name))
                .filter(|p| p.addr == addr);
            // A peer joining an upstream that exists, or any peer once the
            // first load is in force, starts slowly; peers of the first
            // load, and a new upstream's from the admin API, at once.
            let added_live = kept.map_or(self.loaded || old.is_some(), |p| p.added_live);
            let slot = match old.and_then(|u| u.peers.get(&peer_name)) {
                Some(p) if p.addr == addr => Some(p.slot),
                Some(p) => {
                    retired.push(p.slot.index);
                    take(&mut self.slots, &mut taken)
                }
                None => take(&mut self.slots, &mut taken),
            };
            match slot {
                Some(slot) => {
                    peers.insert(
                        peer_name,
                        Peer {
                            addr,
                            params,
                            slot,
                            added_live,
                            counters: None,
                        },
                    );
                }
                None => complete = false,
            }
        }
        let (Some(cursor_slot), true) = (cursor, complete) else {
            self.slots.give_back(taken);
            return Err(StoreError::NoStateSlot);
        };
        if let Some(u) = old {
            retired.extend(
                u.peers
                    .iter()
                    .filter(|(n, _)| !peers.contains_key(*n))
                    .map(|(_, p)| p.slot.index),
            );
        }
        let ramps = old.map_or_else(BTreeMap::new, |u| {
            u.ramps
                .iter()
                .filter(|(n, _)| peers.contains_key(*n))
                .map(|(n, r)| (n.clone(), *r))
                .collect()
        });
        let fresh = old.is_none();
        let response_times = self
            .counters
            .entry(self.region, Owner::Upstream(name.clone()));
        for p in peers.values_mut() {
            p.counters = self.counters.entry(self.region, Owner::Peer(p.slot.index));
        }
        Ok(Staged {
            name,
            up: Upstream {
                peers,
                cursor_slot,
                response_times,
                ramps,
            },
            taken,
            retired,
            fresh,
        })
    }

    /// Puts staged upstreams in force, written at generations after
    /// `generation`.
    pub(super) fn keep(&mut self, staged: Staged, generation: u64) {
        for slot in staged.retired {
            self.slots.retire(slot, generation);
            self.counters.release(&Owner::Peer(slot));
        }
        self.upstreams.insert(staged.name, staged.up);
    }

    /// Forgets staged upstreams that were refused: their slots go back.
    pub(super) fn unstage(&mut self, staged: Vec<Staged>) {
        for s in staged {
            for &slot in &s.taken {
                self.counters.release(&Owner::Peer(slot));
            }
            if s.fresh {
                self.counters.release(&Owner::Upstream(s.name));
            }
            self.slots.give_back(s.taken);
        }
    }

    /// Removes one upstream (not published yet); whether it existed.
    pub(super) fn remove_upstream(&mut self, name: &str) -> bool {
        self.writer.delete(&upstream_key(name));
        match self.upstreams.remove(name) {
            Some(up) => {
                let g = self.writer.generation();
                self.slots.retire(up.cursor_slot, g);
                self.counters.release(&Owner::Upstream(name.to_string()));
                for p in up.peers.values() {
                    self.slots.retire(p.slot.index, g);
                    self.counters.release(&Owner::Peer(p.slot.index));
                }
                true
            }
            None => false,
        }
    }

    /// `source` now says `list` for `name`: what both sources make of it
    /// goes in force (not published yet).
    pub(super) fn apply_source(
        &mut self,
        source: SourceKind,
        name: String,
        list: Option<ResolvedPeers>,
        out: &mut Applied,
    ) {
        self.sources.set(source, &name, list);
        let effective = self.sources.effective(&name);
        self.apply_upstream(name, effective, out);
    }

    /// Puts `name`'s peers in force (not published yet); none removes it.
    /// What is equal to what is in force is skipped.
    pub(super) fn apply_upstream(
        &mut self,
        name: String,
        list: Option<ResolvedPeers>,
        out: &mut Applied,
    ) {
        let Some(list) = list.filter(|l| !l.is_empty()) else {
            if self.remove_upstream(&name) {
                out.changed += 1;
            }
            return;
        };
        if self
            .upstreams
            .get(&name)
            .is_some_and(|up| same_peers(up, &list))
        {
            return;
        }
        let needed = list.len() + usize::from(!self.upstreams.contains_key(&name));
        if needed > self.slots.available() {
            out.errors.push(StoreError::NoStateSlot);
            return;
        }
        match self.install_upstream(name, list) {
            Ok(()) => out.changed += 1,
            Err(e) => out.errors.push(e),
        }
    }
}

/// An upstream's next state, its new slots taken, not yet in force.
pub(super) struct Staged {
    pub name: String,
    pub up: Upstream,
    /// Slots taken for it: returned if it is refused.
    taken: Vec<u32>,
    /// Slots of its old state that it no longer uses: retired if it is kept.
    retired: Vec<u32>,
    /// A new upstream, not a new state of one in force.
    fresh: bool,
}
