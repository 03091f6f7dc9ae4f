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
//! bytes, store the entry's `offset|len`, store the entry's `gen = g`
//! (release), write the log slot of `g`, and when the batch is complete
//! store the header's published generation (release) — the one commit point
//! readers trust. The record the entry pointed to before is returned to the
//! free list only after its entry's `gen` changed, so a reader that copied it
//! sees that change when it re-checks `gen` and drops the copy (a seqlock per
//! entry, with the generation as the sequence: it never repeats, so no ABA).
//!
//! Reading: a worker remembers the generation it applied; on a new published
//! generation it walks the log from there and re-reads only the entries
//! named, so one change costs one record, whatever the size of the whole
//! configuration. A worker that is new, or fell a whole ring behind, scans
//! the directory instead. Either way every change of one publication is
//! applied before the worker serves another request, so it never routes by
//! a mix of two publications.
//!
//! Nothing here takes a lock: a process killed anywhere leaves at worst an
//! unpublished batch, which no reader trusts, and the master's death takes
//! the workers with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use crate::Region;
use crate::atomic_mem::{copy_in, copy_out, u64_at};
use crate::layout::{DIR_ENTRY_SIZE, LOG_ENTRY_SIZE};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the configuration store is full ({0} bytes of records needed); raise --shm-size")]
    ArenaFull(usize),
    #[error("the configuration store holds its maximum of {0} keys; raise --shm-size")]
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

fn pack(off: u32, len: u32) -> u64 {
    (u64::from(off) << 32) | u64::from(len)
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
}

/// Shared accessors of the three zones.
struct Zones<'r> {
    region: &'r Region,
}

impl<'r> Zones<'r> {
    fn dir_gen(&self, i: usize) -> &'r AtomicU64 {
        let l = self.region.layout();
        debug_assert!(i < l.dir_count);
        // SAFETY: the entry lies inside the directory zone of the mapping.
        unsafe { u64_at(self.region.base(), l.dir_off + i * DIR_ENTRY_SIZE) }
    }
    fn dir_loc(&self, i: usize) -> &'r AtomicU64 {
        let l = self.region.layout();
        // SAFETY: as dir_gen, second word of the entry.
        unsafe { u64_at(self.region.base(), l.dir_off + i * DIR_ENTRY_SIZE + 8) }
    }
    fn log_gen(&self, g: u64) -> &'r AtomicU64 {
        let l = self.region.layout();
        let i = (g % l.log_count as u64) as usize;
        // SAFETY: the slot lies inside the log zone of the mapping.
        unsafe { u64_at(self.region.base(), l.log_off + i * LOG_ENTRY_SIZE) }
    }
    fn log_entry(&self, g: u64) -> &'r AtomicU64 {
        let l = self.region.layout();
        let i = (g % l.log_count as u64) as usize;
        // SAFETY: as log_gen, second word of the slot.
        unsafe { u64_at(self.region.base(), l.log_off + i * LOG_ENTRY_SIZE + 8) }
    }
    fn published(&self) -> u64 {
        self.region.generation().load(Ordering::Acquire)
    }

    /// Copies entry `i`'s record if its generation is stable across the copy.
    /// Returns the generation read and whether the entry is live.
    fn read_entry(&self, i: usize, buf: &mut Vec<u8>) -> Option<(u64, bool)> {
        let l = self.region.layout();
        let g1 = self.dir_gen(i).load(Ordering::Acquire);
        let (off, len) = unpack(self.dir_loc(i).load(Ordering::Relaxed));
        if len == 0 {
            buf.clear();
        } else {
            // A racing rewrite may pair an offset with another record's length:
            // never copy outside the arena; the generation check drops it.
            if off.checked_add(len).is_none_or(|end| end > l.arena_len) {
                return None;
            }
            // SAFETY: off..off+len lies inside the arena zone (checked above).
            unsafe { copy_out(self.region.base().add(l.arena_off + off), len, buf) };
        }
        fence(Ordering::Acquire);
        let g2 = self.dir_gen(i).load(Ordering::Relaxed);
        (g1 == g2).then_some((g1, len != 0))
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
        if key.is_empty() || key.len() > usize::from(u16::MAX) {
            return Err(ConfigError::BadKey);
        }
        let len = 4 + key.len() + value.len();
        let len32 = u32::try_from(len).map_err(|_| ConfigError::ArenaFull(len))?;
        let off = self.arena.alloc(len).ok_or(ConfigError::ArenaFull(len))?;
        let entry = match self.keys.get(key) {
            Some(&e) => e,
            None => match self.take_entry() {
                Some(e) => e,
                None => {
                    self.arena.free(off, len);
                    return Err(ConfigError::DirectoryFull(
                        self.zones.region.layout().dir_count,
                    ));
                }
            },
        };
        let l = self.zones.region.layout();
        let mut rec = Vec::with_capacity(len);
        rec.extend_from_slice(&(key.len() as u32).to_le_bytes());
        rec.extend_from_slice(key);
        rec.extend_from_slice(value);
        // SAFETY: off..off+len was just allocated inside the arena and no
        // directory entry points to it, so no reader trusts these bytes yet.
        unsafe { copy_in(self.zones.region.base().add(l.arena_off + off), &rec) };
        self.keys.insert(key.to_vec(), entry);
        self.commit(entry, pack(off as u32, len32));
        self.entry_len[entry] = len32;
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
        let old = self.zones.dir_loc(entry).load(Ordering::Relaxed);
        let (old_off, old_len) = unpack(old);
        self.generation += 1;
        let g = self.generation;
        self.zones.dir_loc(entry).store(loc, Ordering::Relaxed);
        self.zones.dir_gen(entry).store(g, Ordering::Release);
        self.zones
            .log_entry(g)
            .store(entry as u64, Ordering::Relaxed);
        self.zones.log_gen(g).store(g, Ordering::Release);
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

/// How long a reader waits for a batch in progress to be published before
/// applying what it has (the master publishes batches within microseconds).
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
    /// returns the generation now applied.
    pub fn poll(&mut self, mut apply: impl FnMut(Change<'_>)) -> u64 {
        let mut target = self.zones.published();
        if target == self.applied {
            return target;
        }
        let full = self.applied == 0
            || target < self.applied
            || target - self.applied > self.zones.region.layout().log_count as u64;
        if full {
            target = self.scan(&mut apply);
        }
        let deadline = Instant::now() + BATCH_WAIT;
        loop {
            match self.follow_log(target, &mut apply) {
                LogWalk::Done { superseded_by } if superseded_by <= target => break,
                LogWalk::Done { superseded_by } => {
                    // Some entry was rewritten by a batch newer than `target`:
                    // wait for that batch, then apply it too, so that no key
                    // is left behind the others.
                    let published = self.wait_published(superseded_by, deadline);
                    if published <= target {
                        break;
                    }
                    target = published;
                }
                LogWalk::Wrapped => target = self.scan(&mut apply),
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

    /// Lists every live entry as of the published generation, after a Reset.
    fn scan(&mut self, apply: &mut impl FnMut(Change<'_>)) -> u64 {
        let l = *self.zones.region.layout();
        let deadline = Instant::now() + BATCH_WAIT;
        loop {
            let published = self.zones.published();
            let mut live: Vec<(usize, Vec<u8>)> = Vec::new();
            let mut torn = false;
            for i in 0..l.dir_count {
                let Some((g, is_live)) = self.zones.read_entry(i, &mut self.buf) else {
                    torn = true;
                    break;
                };
                if g > published {
                    // Part of a batch not yet published.
                    torn = true;
                    break;
                }
                if is_live && split_record(&self.buf).is_some() {
                    live.push((i, std::mem::take(&mut self.buf)));
                }
            }
            if torn && Instant::now() < deadline {
                std::thread::yield_now();
                continue;
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
            return published;
        }
    }

    fn follow_log(&mut self, target: u64, apply: &mut impl FnMut(Change<'_>)) -> LogWalk {
        let mut superseded_by = 0;
        let dir_count = self.zones.region.layout().dir_count;
        for g in self.applied + 1..=target {
            let lg = self.zones.log_gen(g);
            if lg.load(Ordering::Acquire) != g {
                return LogWalk::Wrapped;
            }
            let entry = self.zones.log_entry(g).load(Ordering::Relaxed) as usize;
            fence(Ordering::Acquire);
            if lg.load(Ordering::Relaxed) != g {
                return LogWalk::Wrapped;
            }
            if entry >= dir_count {
                continue;
            }
            match self.zones.read_entry(entry, &mut self.buf) {
                Some((eg, live)) if eg == g => {
                    let old = self.entry_keys.remove(&entry);
                    if !live {
                        if let Some(key) = old {
                            apply(Change::Delete { key: &key });
                        }
                        continue;
                    }
                    let Some((key, value)) = split_record(&self.buf) else {
                        continue;
                    };
                    // A reused entry: the key it held before is gone.
                    if let Some(old) = old.filter(|o| o.as_slice() != key) {
                        apply(Change::Delete { key: &old });
                    }
                    self.entry_keys.insert(entry, key.to_vec());
                    apply(Change::Put { key, value });
                }
                Some((eg, _)) => superseded_by = superseded_by.max(eg),
                // Rewritten while we copied: by a newer generation.
                None => superseded_by = superseded_by.max(target + 1),
            }
        }
        self.applied = target;
        LogWalk::Done { superseded_by }
    }
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
mod tests {
    use super::*;

    fn drain(r: &mut ConfigReader<'_>, view: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> u64 {
        r.poll(|c| match c {
            Change::Reset => view.clear(),
            Change::Put { key, value } => {
                view.insert(key.to_vec(), value.to_vec());
            }
            Change::Delete { key } => {
                view.remove(key);
            }
        })
    }

    #[test]
    fn put_delete_and_reuse_reach_a_reader_in_order() {
        let region = Region::create(1 << 20).expect("region");
        let mut w = ConfigWriter::new(&region);
        let mut r = ConfigReader::new(&region);
        let mut view = BTreeMap::new();
        w.put(b"a", b"1").expect("put");
        w.put(b"b", b"2").expect("put");
        let g = w.publish();
        assert_eq!(drain(&mut r, &mut view), g);
        assert_eq!(view.len(), 2);
        w.delete(b"a");
        w.put(b"c", b"3").expect("put"); // reuses a's entry
        w.put(b"b", b"22").expect("put");
        w.publish();
        drain(&mut r, &mut view);
        let want: BTreeMap<Vec<u8>, Vec<u8>> = [
            (b"b".to_vec(), b"22".to_vec()),
            (b"c".to_vec(), b"3".to_vec()),
        ]
        .into_iter()
        .collect();
        assert_eq!(view, want);
        // A late reader sees the same state by scanning.
        let mut late = ConfigReader::new(&region);
        let mut v2 = BTreeMap::new();
        drain(&mut late, &mut v2);
        assert_eq!(v2, want);
    }

    #[test]
    fn unpublished_changes_are_invisible() {
        let region = Region::create(1 << 20).expect("region");
        let mut w = ConfigWriter::new(&region);
        let mut r = ConfigReader::new(&region);
        let mut view = BTreeMap::new();
        w.put(b"a", b"1").expect("put");
        w.publish();
        drain(&mut r, &mut view);
        w.put(b"a", b"2").expect("put");
        assert!(!r.is_stale());
        assert_eq!(
            view.get(b"a".as_slice()).map(Vec::as_slice),
            Some(b"1".as_slice())
        );
    }

    #[test]
    fn a_reader_behind_a_whole_ring_rescans() {
        let region = Region::create(1 << 20).expect("region");
        let log = region.layout().log_count;
        let mut w = ConfigWriter::new(&region);
        let mut r = ConfigReader::new(&region);
        let mut view = BTreeMap::new();
        w.put(b"keep", b"x").expect("put");
        w.publish();
        drain(&mut r, &mut view);
        for i in 0..log + 10 {
            w.put(b"hot", i.to_string().as_bytes()).expect("put");
            w.publish();
        }
        drain(&mut r, &mut view);
        assert_eq!(view.len(), 2);
        assert_eq!(view[b"hot".as_slice()], (log + 9).to_string().into_bytes());
    }

    #[test]
    fn arena_space_is_reused_and_exhaustion_is_an_error() {
        let region = Region::create(1 << 20).expect("region");
        let mut w = ConfigWriter::new(&region);
        let free = w.arena_free();
        for _ in 0..1000 {
            w.put(b"k", &[7u8; 1000]).expect("put");
            w.publish();
        }
        assert!(w.arena_free() + 2048 >= free, "replaced records are freed");
        let big = vec![0u8; free + 1];
        assert!(matches!(
            w.put(b"big", &big),
            Err(ConfigError::ArenaFull(_))
        ));
    }

    #[test]
    fn free_list_coalesces() {
        let mut f = FreeList::new(1024);
        let a = f.alloc(100).expect("a");
        let b = f.alloc(100).expect("b");
        let c = f.alloc(100).expect("c");
        f.free(b, 100);
        f.free(a, 100);
        f.free(c, 100);
        assert_eq!(f.by_off.len(), 1);
        assert_eq!(f.free_bytes, 1024);
    }
}
