//! The configuration store: keys (a domain's rule set, an upstream's peers)
//! to immutable byte records, written by the master alone and read by
//! workers without a lock.
//!
//! Zones (see [`crate::Layout`]):
//!
//! * **directory**: one entry per key, `{gen, offset|len}`. A key keeps its
//!   entry until it is deleted; `len == 0` marks a free or deleted entry.
//! * **change log**: a ring of `{gen, entry index}`; generation `g` sits at
//!   `g % log_count`.
//! * **arena**: record bytes `[key len: u32][key][value]`, allocated by the
//!   master from a free list it keeps in its own heap.
//!
//! Writing key `k` at generation `g`: write the record into free arena
//! bytes, mark the entry busy, store its `offset|len`, store its `gen = g`
//! (release), write the log slot of `g` the same way, and when the batch is
//! complete store the header's published generation (release) — the one
//! commit point readers trust. The record the entry pointed to before is
//! returned to the free list only after its entry's `gen` changed, so a
//! reader that copied it sees that change when it re-checks `gen` and drops
//! the copy (a seqlock per entry, [`crate::seqlock`], with the generation as
//! the sequence: it never repeats, so no ABA).
//!
//! Reading: a worker remembers the generation it applied; on a new published
//! generation it walks the log from there and re-reads only the entries
//! named, so one change costs one record, whatever the size of the whole
//! configuration. A worker that is new, or fell a whole ring behind, scans
//! the directory instead. Either way a poll applies nothing until it has read
//! whole publications (else it keeps the old view for the next poll), and
//! applies them before the worker serves another request, so it never routes
//! by a mix of two publications.
//!
//! Nothing here takes a lock: a process killed anywhere leaves at worst an
//! unpublished batch, which no reader trusts, and the master's death takes
//! the workers with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Region;
use crate::atomic_mem::Mem;
use crate::layout::{DIR_ENTRY_SIZE, LOG_ENTRY_SIZE};
use crate::seqlock::{self, Arena, Entry, pack, unpack};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "out of arena space: the configuration arena cannot hold {0} more bytes of records; raise --shm-size"
    )]
    ArenaFull(usize),
    #[error(
        "out of keys: the configuration directory holds its maximum of {0} keys; raise --shm-size"
    )]
    DirectoryFull(usize),
    #[error("a key must be 1 to 65535 bytes")]
    BadKey,
}

/// One change, as a reader applies it.
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// Forget everything: a full listing of `Put`s follows.
    Reset,
    Put {
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        key: &'a [u8],
    },
}

/// Shared accessors of the three zones.
struct Zones<'r> {
    region: &'r Region,
}

impl<'r> Zones<'r> {
    /// Directory entry `i` (`< dir_count`: callers check indices read from
    /// the log; a wrong one would read another zone's words).
    fn dir(&self, i: usize) -> Entry<'r, AtomicU64> {
        let l = self.region.layout();
        assert!(i < l.dir_count, "directory entry {i} out of range");
        entry(
            self.region
                .mem()
                .sub(l.dir_off + i * DIR_ENTRY_SIZE, DIR_ENTRY_SIZE),
        )
    }
    fn log(&self, g: u64) -> Entry<'r, AtomicU64> {
        let l = self.region.layout();
        let at = l.log_off + (g % l.log_count as u64) as usize * LOG_ENTRY_SIZE;
        entry(self.region.mem().sub(at, LOG_ENTRY_SIZE))
    }
    fn arena(&self) -> RegionArena<'r> {
        RegionArena {
            region: self.region,
        }
    }
    fn published(&self) -> u64 {
        self.region.generation().load(Ordering::Acquire)
    }

    /// Copies entry `i`'s record if it was not rewritten meanwhile.
    /// Returns the generation read and whether the entry is live.
    fn read_entry(&self, i: usize, buf: &mut Vec<u8>) -> Option<(u64, bool)> {
        seqlock::read_record(&self.dir(i), &self.arena(), buf)
    }
}

/// The two words of a directory or log entry.
fn entry(mem: Mem<'_>) -> Entry<'_, AtomicU64> {
    Entry {
        generation: mem.u64(0),
        value: mem.u64(8),
    }
}

/// The arena zone of the mapping, as the seqlock sees it.
struct RegionArena<'r> {
    region: &'r Region,
}

impl RegionArena<'_> {
    fn zone(&self) -> Mem<'_> {
        let l = self.region.layout();
        self.region.mem().sub(l.arena_off, l.arena_len)
    }
}

impl Arena for RegionArena<'_> {
    type Word = AtomicU64;
    fn len(&self) -> usize {
        self.region.layout().arena_len
    }
    fn copy_out(&self, off: usize, len: usize, out: &mut Vec<u8>) {
        self.zone().copy_out(off, len, out)
    }
    fn copy_in(&self, off: usize, bytes: &[u8]) {
        self.zone().copy_in(off, bytes)
    }
}

/// Splits a record into key and value; `None` for bytes that are not a record.
fn split_record(rec: &[u8]) -> Option<(&[u8], &[u8])> {
    let klen = u32::from_le_bytes(rec.get(..4)?.try_into().ok()?) as usize;
    let key = rec.get(4..4 + klen)?;
    Some((key, &rec[4 + klen..]))
}

/// The master's side: the only writer.
pub struct ConfigWriter<'r> {
    zones: Zones<'r>,
    keys: HashMap<Vec<u8>, usize>,
    entry_len: Vec<u32>,
    free_entries: Vec<usize>,
    next_entry: usize,
    arena: FreeList,
    generation: u64,
    /// Records replaced by the batch in progress, freed once it is published.
    retired: Vec<(u32, u32)>,
}

impl<'r> ConfigWriter<'r> {
    /// Takes the writer's role over a freshly created region.
    pub fn new(region: &'r Region) -> Self {
        let l = region.layout();
        ConfigWriter {
            zones: Zones { region },
            keys: HashMap::new(),
            entry_len: vec![0; l.dir_count],
            free_entries: Vec::new(),
            next_entry: 0,
            arena: FreeList::new(l.arena_len),
            generation: region.generation().load(Ordering::Relaxed),
            retired: Vec::new(),
        }
    }

    /// Sets `key` to `value`; visible to readers at the next [`publish`](Self::publish).
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), ConfigError> {
        self.put_all(&[(key, value)])
    }

    /// Sets every `(key, value)`, or, when the arena or the directory cannot
    /// hold them all, changes nothing and says which ran out: every arena
    /// range and directory entry is reserved before shared memory is touched.
    /// Visible to readers at the next [`publish`](Self::publish).
    pub fn put_all(&mut self, items: &[(&[u8], &[u8])]) -> Result<(), ConfigError> {
        let mut offs = Vec::with_capacity(items.len());
        let mut new_entries: HashMap<&[u8], usize> = HashMap::new();
        let mut failed = None;
        for (key, value) in items {
            if key.is_empty() || key.len() > usize::from(u16::MAX) {
                failed = Some(ConfigError::BadKey);
                break;
            }
            let len = 4 + key.len() + value.len();
            let Some(off) = u32::try_from(len).ok().and_then(|_| self.arena.alloc(len)) else {
                let needed = items.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
                failed = Some(ConfigError::ArenaFull(needed));
                break;
            };
            offs.push((off, len));
            if self.keys.contains_key(*key) || new_entries.contains_key(*key) {
                continue;
            }
            match self.take_entry() {
                Some(e) => {
                    new_entries.insert(key, e);
                }
                None => {
                    failed = Some(ConfigError::DirectoryFull(
                        self.zones.region.layout().dir_count,
                    ));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for (off, len) in offs {
                self.arena.free(off, len);
            }
            self.free_entries.extend(new_entries.into_values());
            return Err(e);
        }
        for ((key, value), (off, len)) in items.iter().zip(offs) {
            let entry = match self.keys.get(*key) {
                Some(&e) => e,
                None => new_entries[*key],
            };
            let mut rec = Vec::with_capacity(len);
            rec.extend_from_slice(&(key.len() as u32).to_le_bytes());
            rec.extend_from_slice(key);
            rec.extend_from_slice(value);
            seqlock::write_record(&self.zones.arena(), off, &rec);
            self.keys.insert(key.to_vec(), entry);
            // len fits u32: checked when reserved.
            self.commit(entry, pack(off as u32, len as u32));
            self.entry_len[entry] = len as u32;
        }
        Ok(())
    }

    /// Removes `key`; returns whether it existed. Visible at the next publish.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        let Some(entry) = self.keys.remove(key) else {
            return false;
        };
        self.commit(entry, 0);
        self.entry_len[entry] = 0;
        self.free_entries.push(entry);
        true
    }

    /// Whether `key` is set (published or not).
    pub fn contains(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key)
    }

    /// Number of keys set.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes of the arena still free.
    pub fn arena_free(&self) -> usize {
        self.arena.free_bytes
    }

    /// Makes every change since the last publish visible at once; returns
    /// the new generation (unchanged when there was nothing to publish).
    pub fn publish(&mut self) -> u64 {
        self.zones
            .region
            .generation()
            .store(self.generation, Ordering::Release);
        // Replaced records can be reused now: their entries' generations
        // changed before this point, so any reader still copying one will
        // reject its copy.
        for (off, len) in self.retired.drain(..) {
            self.arena.free(off as usize, len as usize);
        }
        self.generation
    }

    /// The generation the next publish will make visible.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn take_entry(&mut self) -> Option<usize> {
        if let Some(e) = self.free_entries.pop() {
            return Some(e);
        }
        (self.next_entry < self.entry_len.len()).then(|| {
            self.next_entry += 1;
            self.next_entry - 1
        })
    }

    fn commit(&mut self, entry: usize, loc: u64) {
        let dir = self.zones.dir(entry);
        let (old_off, old_len) = unpack(dir.value.load(Ordering::Relaxed));
        self.generation += 1;
        let g = self.generation;
        seqlock::commit(&dir, loc, g);
        seqlock::commit(&self.zones.log(g), entry as u64, g);
        if old_len != 0 {
            self.retired.push((old_off as u32, old_len as u32));
        }
    }
}

/// A worker's side: follows the published generation.
pub struct ConfigReader<'r> {
    zones: Zones<'r>,
    applied: u64,
    /// Which key each directory entry held when last applied.
    entry_keys: HashMap<usize, Vec<u8>>,
    buf: Vec<u8>,
}

/// How long a reader waits for a batch in progress to be published (the
/// master publishes batches within microseconds) before it gives up on a
/// listing for this poll, or applies the log as far as it is published.
const BATCH_WAIT: Duration = Duration::from_millis(200);

impl<'r> ConfigReader<'r> {
    /// A reader that has applied nothing: its first poll lists everything.
    pub fn new(region: &'r Region) -> Self {
        ConfigReader {
            zones: Zones { region },
            applied: 0,
            entry_keys: HashMap::new(),
            buf: Vec::new(),
        }
    }

    /// The generation this reader has applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Whether a generation newer than the applied one is published: one
    /// atomic load, cheap enough for every request.
    pub fn is_stale(&self) -> bool {
        self.zones.published() != self.applied
    }

    /// Applies every published change since the last poll, in order, and
    /// returns the generation now applied. Changes are applied only once a
    /// whole publication is read: when that cannot be done before the wait
    /// runs out (a batch in progress kept an entry or the directory busy),
    /// nothing is applied and the old generation is returned, so the caller
    /// keeps its old view and the next poll tries again.
    pub fn poll(&mut self, mut apply: impl FnMut(Change<'_>)) -> u64 {
        let mut target = self.zones.published();
        if target == self.applied {
            return target;
        }
        let full = self.applied == 0
            || target < self.applied
            || target - self.applied > self.zones.region.layout().log_count as u64;
        if full {
            return self.scan(&mut apply).unwrap_or(self.applied);
        }
        let deadline = Instant::now() + BATCH_WAIT;
        let mut walk = Walk::default();
        let mut from = self.applied;
        loop {
            match self.follow_log(from, target, &mut walk) {
                LogWalk::Done { superseded_by } if superseded_by <= target => break,
                LogWalk::Done { superseded_by } => {
                    // Some entry was rewritten by a batch newer than `target`:
                    // wait for that batch, then read it too, so that no key
                    // is left behind the others.
                    let published = self.wait_published(superseded_by, deadline);
                    if published <= target {
                        return self.applied;
                    }
                    from = target;
                    target = published;
                }
                LogWalk::Wrapped => return self.scan(&mut apply).unwrap_or(self.applied),
            }
        }
        for (entry, key) in walk.keys {
            match key {
                Some(key) => self.entry_keys.insert(entry, key),
                None => self.entry_keys.remove(&entry),
            };
        }
        for change in &walk.changes {
            match change {
                Pending::Put { record } => {
                    if let Some((key, value)) = split_record(record) {
                        apply(Change::Put { key, value });
                    }
                }
                Pending::Delete { key } => apply(Change::Delete { key }),
            }
        }
        self.applied = target;
        target
    }

    fn wait_published(&self, want: u64, deadline: Instant) -> u64 {
        loop {
            let p = self.zones.published();
            if p >= want || Instant::now() >= deadline {
                return p;
            }
            std::thread::yield_now();
        }
    }

    /// Lists every live entry as of the published generation, after a Reset,
    /// and returns that generation; `None`, having applied nothing, if no
    /// whole listing could be read before the deadline.
    fn scan(&mut self, apply: &mut impl FnMut(Change<'_>)) -> Option<u64> {
        let l = *self.zones.region.layout();
        let deadline = Instant::now() + BATCH_WAIT;
        'listing: loop {
            let published = self.zones.published();
            let mut live: Vec<(usize, Vec<u8>)> = Vec::new();
            for i in 0..l.dir_count {
                // An entry being rewritten, rewritten while copied, or part
                // of a batch not yet published: start the listing again.
                let stable = self
                    .zones
                    .read_entry(i, &mut self.buf)
                    .filter(|(g, _)| *g <= published);
                let Some((_, is_live)) = stable else {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::yield_now();
                    continue 'listing;
                };
                if is_live && split_record(&self.buf).is_some() {
                    live.push((i, std::mem::take(&mut self.buf)));
                }
            }
            apply(Change::Reset);
            self.entry_keys.clear();
            for (i, rec) in &live {
                if let Some((key, value)) = split_record(rec) {
                    self.entry_keys.insert(*i, key.to_vec());
                    apply(Change::Put { key, value });
                }
            }
            self.applied = published;
            return Some(published);
        }
    }

    /// Reads the changes of generations `from + 1..=target` into `walk`,
    /// applying nothing.
    fn follow_log(&mut self, from: u64, target: u64, walk: &mut Walk) -> LogWalk {
        let mut superseded_by = 0;
        let dir_count = self.zones.region.layout().dir_count;
        for g in from + 1..=target {
            // A slot being rewritten, or rewritten, belongs to a later lap.
            let entry = match seqlock::read(&self.zones.log(g)) {
                Some((lg, entry)) if lg == g => entry as usize,
                _ => return LogWalk::Wrapped,
            };
            if entry >= dir_count {
                continue;
            }
            match self.zones.read_entry(entry, &mut self.buf) {
                Some((eg, live)) if eg == g => {
                    let old = match walk.keys.get(&entry) {
                        Some(k) => k.clone(),
                        None => self.entry_keys.get(&entry).cloned(),
                    };
                    let key = live
                        .then(|| split_record(&self.buf).map(|(k, _)| k.to_vec()))
                        .flatten();
                    // A deleted or reused entry: the key it held is gone.
                    if let Some(old) = old.filter(|o| key.as_ref() != Some(o)) {
                        walk.changes.push(Pending::Delete { key: old });
                    }
                    if key.is_some() {
                        walk.changes.push(Pending::Put {
                            record: self.buf.clone(),
                        });
                    }
                    walk.keys.insert(entry, key);
                }
                Some((eg, _)) => superseded_by = superseded_by.max(eg),
                // Rewritten while we copied: by a newer generation.
                None => superseded_by = superseded_by.max(target + 1),
            }
        }
        LogWalk::Done { superseded_by }
    }
}

/// Changes read from the log, applied once the whole walk is consistent.
#[derive(Default)]
struct Walk {
    changes: Vec<Pending>,
    /// Which key each entry named holds after `changes` (`None`: none).
    keys: HashMap<usize, Option<Vec<u8>>>,
}

enum Pending {
    Put { record: Vec<u8> },
    Delete { key: Vec<u8> },
}

enum LogWalk {
    Done { superseded_by: u64 },
    Wrapped,
}

/// The master's allocator for arena bytes: best fit over coalesced free runs.
struct FreeList {
    by_off: BTreeMap<usize, usize>,
    by_len: BTreeMap<(usize, usize), ()>,
    free_bytes: usize,
}

const ALIGN: usize = 8;

impl FreeList {
    fn new(len: usize) -> Self {
        let mut f = FreeList {
            by_off: BTreeMap::new(),
            by_len: BTreeMap::new(),
            free_bytes: 0,
        };
        let len = len / ALIGN * ALIGN;
        if len > 0 {
            f.insert(0, len);
        }
        f
    }

    fn insert(&mut self, off: usize, len: usize) {
        self.by_off.insert(off, len);
        self.by_len.insert((len, off), ());
        self.free_bytes += len;
    }

    fn remove(&mut self, off: usize, len: usize) {
        self.by_off.remove(&off);
        self.by_len.remove(&(len, off));
        self.free_bytes -= len;
    }

    fn alloc(&mut self, len: usize) -> Option<usize> {
        let len = len.div_ceil(ALIGN) * ALIGN;
        let (&(run, off), _) = self.by_len.range((len, 0)..).next()?;
        self.remove(off, run);
        if run > len {
            self.insert(off + len, run - len);
        }
        Some(off)
    }

    fn free(&mut self, mut off: usize, len: usize) {
        let mut len = len.div_ceil(ALIGN) * ALIGN;
        if let Some((&prev, &plen)) = self.by_off.range(..off).next_back()
            && prev + plen == off
        {
            self.remove(prev, plen);
            off = prev;
            len += plen;
        }
        if let Some(&next_len) = self.by_off.get(&(off + len)) {
            self.remove(off + len, next_len);
            len += next_len;
        }
        self.insert(off, len);
    }
}

#[cfg(test)]
mod tests;
