//! Request counters, per worker: each worker counts into entries of its
//! own (single writer, plain atomic adds, no lock shared with any other
//! process), the master sums them. A worker that dies loses no count it
//! made; a new worker in its slot goes on adding to the same entries.
//!
//! The zone is cut in one part per worker, so the number of entries each
//! worker has depends on how many workers share the zone
//! ([`Region::counter_entries`]). The master hands each entry to one thing
//! that is counted, the same entry in every worker's part, and reads it as
//! one of two kinds:
//!
//! * [`Counters`], for a domain (request times) or an upstream peer (its
//!   response times): requests, the sum of times in milliseconds, the five
//!   status classes, and [`CODES`] cells of (status, count) that the worker
//!   claims as statuses first appear; statuses past those are in their
//!   class only;
//! * [`Histogram`], for an upstream: its peers' response times, counted in
//!   buckets of [`BOUNDS_MS`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Region;
use crate::atomic_mem::Mem;

/// Bytes of one entry.
pub const ENTRY: usize = 128;
const WORDS: usize = ENTRY / 8;
const REQUESTS: usize = 0;
const COST_MS: usize = 1;
const CLASSES: usize = 2;
const FIRST_CODE: usize = CLASSES + 5;
/// Exact statuses one entry keeps.
pub const CODES: usize = WORDS - FIRST_CODE;
/// A code cell: the status in the top 16 bits, the count below.
const CODE_SHIFT: u32 = 48;
const COUNT_MASK: u64 = (1 << CODE_SHIFT) - 1;

/// One worker's entry for one domain.
#[derive(Clone, Copy)]
pub struct Counters<'r> {
    mem: Mem<'r>,
}

/// What an entry (or a sum of them) holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub cost_ms: u64,
    /// 1xx to 5xx.
    pub classes: [u64; 5],
    /// Exact statuses, as counted.
    pub codes: Vec<(u16, u64)>,
}

impl Region {
    /// Entries each of `workers` workers has.
    pub fn counter_entries(&self, workers: usize) -> usize {
        self.layout().counters_len / ENTRY / workers.max(1)
    }

    /// Worker `worker`'s entry `entry`, the zone being shared by `workers`
    /// workers; `None` past the end.
    pub fn counters(&self, worker: usize, workers: usize, entry: usize) -> Option<Counters<'_>> {
        let per = self.counter_entries(workers);
        if worker >= workers || entry >= per {
            return None;
        }
        let off = self.layout().counters_off + (worker * per + entry) * ENTRY;
        Some(Counters {
            mem: self.mem().sub(off, ENTRY),
        })
    }
}

impl Counters<'_> {
    fn word(&self, i: usize) -> &AtomicU64 {
        self.mem.u64(i * 8)
    }

    /// Counts one request (by the worker that owns the entry only).
    pub fn count(&self, status: u16, cost_ms: u64) {
        self.word(REQUESTS).fetch_add(1, Ordering::Relaxed);
        self.word(COST_MS).fetch_add(cost_ms, Ordering::Relaxed);
        if let Some(class) = (usize::from(status / 100))
            .checked_sub(1)
            .filter(|c| *c < 5)
        {
            self.word(CLASSES + class).fetch_add(1, Ordering::Relaxed);
        }
        for i in FIRST_CODE..WORDS {
            let w = self.word(i);
            let cell = w.load(Ordering::Relaxed);
            let code = (cell >> CODE_SHIFT) as u16;
            if code == status {
                w.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if code == 0 {
                // Only the owner writes the entry: no other claim can race.
                w.store(u64::from(status) << CODE_SHIFT | 1, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Adds what the entry holds to `sum`.
    pub fn add_to(&self, sum: &mut Counts) {
        sum.requests += self.word(REQUESTS).load(Ordering::Relaxed);
        sum.cost_ms += self.word(COST_MS).load(Ordering::Relaxed);
        for (c, total) in sum.classes.iter_mut().enumerate() {
            *total += self.word(CLASSES + c).load(Ordering::Relaxed);
        }
        for i in FIRST_CODE..WORDS {
            let cell = self.word(i).load(Ordering::Relaxed);
            let code = (cell >> CODE_SHIFT) as u16;
            if code == 0 {
                break;
            }
            let n = cell & COUNT_MASK;
            match sum.codes.iter_mut().find(|(c, _)| *c == code) {
                Some((_, total)) => *total += n,
                None => sum.codes.push((code, n)),
            }
        }
    }

    /// Empties the entry (the master, before it hands the entry to another
    /// domain).
    pub fn clear(&self) {
        for i in 0..WORDS {
            self.word(i).store(0, Ordering::Relaxed);
        }
    }
}

/// Upper bounds, in milliseconds, of a [`Histogram`]'s buckets; a last
/// bucket takes what is slower.
pub const BOUNDS_MS: [u64; 13] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];
const OBSERVED: usize = 0;
const SUM_MS: usize = 1;
const FIRST_BUCKET: usize = 2;
const _: () = assert!(FIRST_BUCKET + BOUNDS_MS.len() < WORDS);

/// One worker's response-time histogram for one upstream.
#[derive(Clone, Copy)]
pub struct Histogram<'r> {
    mem: Mem<'r>,
}

/// What a histogram (or a sum of them) holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub count: u64,
    pub sum_ms: u64,
    /// Per bucket of [`BOUNDS_MS`], then the slower ones; not cumulative.
    pub buckets: [u64; BOUNDS_MS.len() + 1],
}

impl Region {
    /// Worker `worker`'s entry `entry`, read as a [`Histogram`].
    pub fn histogram(&self, worker: usize, workers: usize, entry: usize) -> Option<Histogram<'_>> {
        self.counters(worker, workers, entry)
            .map(|c| Histogram { mem: c.mem })
    }
}

impl Histogram<'_> {
    /// Counts one response time (by the worker that owns the entry only).
    pub fn observe(&self, ms: u64) {
        let bucket = BOUNDS_MS.partition_point(|&b| b < ms);
        self.mem.u64(OBSERVED * 8).fetch_add(1, Ordering::Relaxed);
        self.mem.u64(SUM_MS * 8).fetch_add(ms, Ordering::Relaxed);
        self.mem
            .u64((FIRST_BUCKET + bucket) * 8)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Adds what the histogram holds to `sum`.
    pub fn add_to(&self, sum: &mut Observed) {
        sum.count += self.mem.u64(OBSERVED * 8).load(Ordering::Relaxed);
        sum.sum_ms += self.mem.u64(SUM_MS * 8).load(Ordering::Relaxed);
        for (i, b) in sum.buckets.iter_mut().enumerate() {
            *b += self.mem.u64((FIRST_BUCKET + i) * 8).load(Ordering::Relaxed);
        }
    }
}

impl Counts {
    /// `self - earlier`, field by field (counts only grow between two
    /// clears).
    pub fn since(&self, earlier: &Counts) -> Counts {
        let mut d = Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            cost_ms: self.cost_ms.saturating_sub(earlier.cost_ms),
            classes: [0; 5],
            codes: Vec::new(),
        };
        for (i, c) in d.classes.iter_mut().enumerate() {
            *c = self.classes[i].saturating_sub(earlier.classes[i]);
        }
        for &(code, n) in &self.codes {
            let before = earlier
                .codes
                .iter()
                .find(|(c, _)| *c == code)
                .map_or(0, |(_, n)| *n);
            if n > before {
                d.codes.push((code, n - before));
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_count_apart_and_the_master_sums() {
        let region = Region::create(1 << 20).expect("region");
        let per = region.counter_entries(2);
        assert!(per > 100, "{per}");
        let a = region.counters(0, 2, 7).expect("entry");
        let b = region.counters(1, 2, 7).expect("entry");
        assert!(region.counters(2, 2, 0).is_none());
        assert!(region.counters(0, 2, per).is_none());
        a.count(200, 5);
        a.count(200, 7);
        a.count(404, 1);
        b.count(502, 30);
        let mut sum = Counts::default();
        a.add_to(&mut sum);
        b.add_to(&mut sum);
        assert_eq!(sum.requests, 4);
        assert_eq!(sum.cost_ms, 43);
        assert_eq!(sum.classes, [0, 2, 0, 1, 1]);
        sum.codes.sort_unstable();
        assert_eq!(sum.codes, vec![(200, 2), (404, 1), (502, 1)]);
        let before = sum.clone();
        a.count(200, 1);
        let mut now = Counts::default();
        a.add_to(&mut now);
        b.add_to(&mut now);
        let d = now.since(&before);
        assert_eq!((d.requests, d.codes.clone()), (1, vec![(200, 1)]));
        a.clear();
        let mut cleared = Counts::default();
        a.add_to(&mut cleared);
        assert_eq!(cleared, Counts::default());
    }

    #[test]
    fn a_histogram_counts_each_time_in_its_bucket() {
        let region = Region::create(1 << 20).expect("region");
        let a = region.histogram(0, 2, 3).expect("entry");
        let b = region.histogram(1, 2, 3).expect("entry");
        a.observe(0);
        a.observe(5);
        a.observe(6);
        b.observe(60_000);
        b.observe(60_001);
        let mut sum = Observed::default();
        a.add_to(&mut sum);
        b.add_to(&mut sum);
        assert_eq!((sum.count, sum.sum_ms), (5, 120_012));
        let mut want = [0; BOUNDS_MS.len() + 1];
        want[0] = 2; // 0 and 5 ms: bounds are inclusive, as Prometheus' `le`
        want[1] = 1;
        want[BOUNDS_MS.len() - 1] = 1;
        want[BOUNDS_MS.len()] = 1;
        assert_eq!(sum.buckets, want);
    }

    #[test]
    fn statuses_past_the_cells_count_in_their_class() {
        let region = Region::create(1 << 20).expect("region");
        let e = region.counters(0, 1, 0).expect("entry");
        for code in 0..(CODES as u16 + 3) {
            e.count(400 + code, 0);
        }
        let mut sum = Counts::default();
        e.add_to(&mut sum);
        assert_eq!(sum.classes[3], CODES as u64 + 3);
        assert_eq!(sum.codes.len(), CODES);
    }
}
