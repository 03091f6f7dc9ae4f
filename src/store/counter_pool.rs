//! The request counters' entries (`elb_shm::counters`) handed out by the
//! master: one per domain, one per upstream (its response-time histogram)
//! and one per peer, while entries last. An entry given back goes to the
//! next taker at once, cleared first: a worker still on an older
//! configuration may add a request of the old owner to it, which is all a
//! late view costs.

use std::collections::HashMap;

use elb_shm::Region;
use elb_shm::counters::{Counts, Observed};

/// What an entry counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Owner {
    /// A domain's requests, by lower-cased name.
    Domain(String),
    /// An upstream's response times, by name.
    Upstream(String),
    /// A peer's answers, by the index of its state slot (a peer keeps its
    /// slot as long as it stays in its upstream at the same address).
    Peer(u32),
}

pub(super) struct CounterPool {
    owners: HashMap<Owner, u32>,
    free: Vec<u32>,
    next: u32,
    limit: u32,
    workers: usize,
    /// Whether running out was logged already.
    warned: bool,
}

impl CounterPool {
    pub fn new(region: &Region, workers: usize) -> CounterPool {
        CounterPool {
            owners: HashMap::new(),
            free: Vec::new(),
            next: 0,
            limit: u32::try_from(region.counter_entries(workers)).unwrap_or(u32::MAX),
            workers,
            warned: false,
        }
    }

    /// The owner's entry, taken (and cleared) when it has none yet; `None`
    /// when every entry is taken.
    pub fn entry(&mut self, region: &Region, owner: Owner) -> Option<u32> {
        if let Some(&e) = self.owners.get(&owner) {
            return Some(e);
        }
        let e = self.free.pop().or_else(|| {
            (self.next < self.limit).then(|| {
                self.next += 1;
                self.next - 1
            })
        });
        let Some(e) = e else {
            if !self.warned {
                log::warn!(
                    "request counters full ({} entries per worker): domains, upstreams and peers set from now on are not counted; raise --shm-size",
                    self.limit
                );
                self.warned = true;
            }
            return None;
        };
        for w in 0..self.workers {
            if let Some(c) = region.counters(w, self.workers, e as usize) {
                c.clear();
            }
        }
        self.owners.insert(owner, e);
        Some(e)
    }

    pub fn release(&mut self, owner: &Owner) {
        if let Some(e) = self.owners.remove(owner) {
            self.free.push(e);
        }
    }

    /// Entry `e` as counters, summed over the workers.
    pub fn counts(&self, region: &Region, e: u32) -> Counts {
        let mut sum = Counts::default();
        for w in 0..self.workers {
            if let Some(c) = region.counters(w, self.workers, e as usize) {
                c.add_to(&mut sum);
            }
        }
        sum
    }

    /// Entry `e` as a histogram, summed over the workers.
    pub fn observed(&self, region: &Region, e: u32) -> Observed {
        let mut sum = Observed::default();
        for w in 0..self.workers {
            if let Some(h) = region.histogram(w, self.workers, e as usize) {
                h.add_to(&mut sum);
            }
        }
        sum
    }

    /// Each domain's counts.
    pub fn domains<'a>(&'a self, region: &Region) -> Vec<(&'a str, Counts)> {
        self.owners
            .iter()
            .filter_map(|(o, &e)| match o {
                Owner::Domain(d) => Some((d.as_str(), self.counts(region, e))),
                _ => None,
            })
            .collect()
    }
}
