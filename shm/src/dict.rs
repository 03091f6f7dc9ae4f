//! A dictionary with the surface of nginx's `lua_shared_dict`
//! (`ngx.shared.DICT`), shared by every process that maps the region.
//!
//! # Concurrency
//!
//! Every operation takes one robust, process-shared pthread mutex
//! ([`crate::robust`]) at the start of the dictionary zone. Nothing in the
//! zone is read or written without it, except [`Dict::free_space`] (one
//! atomic counter) and [`Dict::capacity`] (a constant). A process may be
//! SIGKILLed at any instruction while it holds the lock; the next locker is
//! told so (`EOWNERDEAD`) and rebuilds every derived structure from what is in
//! memory ([`Dict::repair`]) before calling `pthread_mutex_consistent`. For
//! that to be possible the structure is kept *repairable* at every store:
//!
//! * **Blocks.** The heap (after the header and the bucket array) is carved
//!   into power-of-two blocks of 64 B up to `max_block_size()` (1/8 of the
//!   heap, at most 1 MiB). Every block starts with a 4-byte tag
//!   `{magic, state, size class}` and lies at an offset (from the heap start)
//!   that is a multiple of its size: a buddy system. Blocks are carved from a
//!   bump pointer by writing the new block's tag and then storing the bump
//!   pointer (the commit point), so a walk from the heap start to the bump
//!   pointer, block by block, always sees valid tags. Splitting writes the
//!   upper half's tag and then the lower half's (commit); merging two free
//!   buddies rewrites the lower one's tag (one store). Free blocks of each
//!   class are on a doubly linked free list; freeing merges buddies eagerly.
//! * **Index.** A hash table of bucket heads, each a chain of items linked
//!   through block offsets. An item is written whole into a block nobody can
//!   reach, then one release store links it into its chain (replacing an old
//!   item with the same key is the same single store); unlinking is one
//!   store. Items reachable from the buckets are therefore always whole.
//!   Updating a number (`incr`) or an expiry (`expire`, `flush_all`) is one
//!   aligned 8-byte store in place.
//! * **LRU.** A doubly linked list through the items, most recent first, plus
//!   a per-item `last_used` stamp from a counter in the header. The list is
//!   kept in strictly decreasing stamp order, so it can be rebuilt by sorting.
//!   `get`, `get_stale` (of a live item), `incr` and every store move the item
//!   to the head, as nginx does.
//! * **Eviction.** Each store first removes up to two expired items from the
//!   LRU tail (as nginx does). When no block of the needed class can be found
//!   (free list, splitting a larger free block, or the bump area), expired
//!   items among the last 64 of the LRU are removed; then `set`, `add`,
//!   `replace` and `incr` (not the `safe_*` variants) evict from the LRU tail,
//!   the first 30 strictly in LRU order and after that the least recently
//!   used item whose block is at least as big as the one needed (which makes
//!   the allocation succeed), reporting `forcible` if any evicted item had
//!   not expired. When memory is short, the old item of the key being stored
//!   is removed before eviction starts (as nginx does), so an operation that
//!   then fails with `NoMemory` has removed it.
//! * **Repair**, run after `EOWNERDEAD` (and after a panic while the lock was
//!   held, or when an operation finds an inconsistency): walk the blocks up
//!   to the bump pointer (truncating it at the first invalid tag); walk every
//!   chain, keeping items that are valid blocks, well formed, hashed to their
//!   bucket and not seen before, and cutting the chain at the first that is
//!   not; every other block becomes free (coalesced, free lists rebuilt); the
//!   LRU list is rebuilt by sorting the reachable items by `last_used`; the
//!   counters are recomputed. What a killed holder was doing is thus either
//!   done or not: a store whose link was not written is lost, an unlinked item
//!   is gone, a partial `flush_all` has expired part of the items.
//!
//! Every offset read from shared memory is bounds-checked (inside the heap,
//! below the bump pointer, at a block start of the right state) before it is
//! followed; an operation that meets an impossible value repairs the zone and
//! returns [`DictError::Corrupted`], it never faults.
//!
//! # Time
//!
//! Expiry times are absolute `CLOCK_MONOTONIC` milliseconds (the same clock in
//! every process of the machine), 0 meaning never. `exptime` arguments of
//! `None` or `Some(Duration::ZERO)` mean "never expires" (nginx's 0); other
//! durations are rounded up to whole milliseconds.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::Ordering::{self, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use nix::errno::Errno;

use crate::atomic_mem::{u32_at, u64_at};
use crate::region::Region;
use crate::robust::{LockError, MUTEX_ALIGN, MUTEX_SIZE, RobustMutex};

// ---------------------------------------------------------------------------
// Zone header (offsets from the start of the dictionary zone).

const Z_MAGIC: usize = 64;
const Z_BUMP: usize = 72;
const Z_LRU_HEAD: usize = 80;
const Z_LRU_TAIL: usize = 88;
const Z_CLOCK: usize = 96;
const Z_ITEMS: usize = 104;
const Z_USED: usize = 112;
const Z_SEED: usize = 120;
const Z_NEEDS_REPAIR: usize = 128;
const Z_REPAIRS: usize = 136;
/// One u64 free-list head per size class.
const Z_FREE_HEADS: usize = 192;
/// Size classes: 64 B << 0 ..= 64 B << 14 (1 MiB).
const NCLASSES: usize = 15;
/// The bucket array (u32 item offsets).
const Z_BUCKETS: usize = Z_FREE_HEADS + 8 * NCLASSES;

const _: () = assert!(MUTEX_SIZE <= Z_MAGIC && MUTEX_ALIGN <= 64);

const DICT_MAGIC: u64 = u64::from_le_bytes(*b"ELBDICT1");

// ---------------------------------------------------------------------------
// Blocks (offsets from the block start).

const MIN_BLOCK: usize = 64;
/// u32 tag: `TAG_MAGIC | state << 8 | class`.
const B_TAG: usize = 0;
/// u32: next item of the bucket chain, or next free block of the class.
const B_NEXT: usize = 4;
/// u32: previous item of the LRU list, or previous free block of the class.
const B_PREV: usize = 8;
/// u32: next item of the LRU list (towards the tail).
const B_LRU_NEXT: usize = 12;
/// u64: LRU stamp.
const B_LAST_USED: usize = 16;
/// u64: expiry, absolute monotonic milliseconds, 0 = never.
const B_EXPIRES: usize = 24;
const B_HASH: usize = 32;
const B_FLAGS: usize = 36;
const B_VALUE_LEN: usize = 40;
/// u32: key length | value type << 24.
const B_KEY: usize = 44;
/// Key bytes start here; the value follows at the next multiple of 8.
const ITEM_HDR: usize = 48;

const TAG_MAGIC: u32 = 0xD1C7_0000;
const STATE_FREE: u32 = 1;
const STATE_ITEM: u32 = 2;

const T_BYTES: u32 = 1;
const T_INT: u32 = 2;
const T_FLOAT: u32 = 3;
const T_BOOL: u32 = 4;

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 65535;
/// Expired items removed from the LRU tail on every store.
const EXPIRE_ON_STORE: usize = 2;
/// LRU tail items scanned for expired ones when memory is short.
const EXPIRE_SCAN: usize = 64;
/// Items evicted in strict LRU order before targeting big enough ones.
const LRU_EVICT: usize = 30;

// ---------------------------------------------------------------------------
// Public types.

/// A value as stored and returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bytes(Vec<u8>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Bytes(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Bytes(v.as_bytes().to_vec())
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

/// What a store did besides storing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOutcome {
    /// Items that had not expired were evicted to make room.
    pub forcible: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DictError {
    #[error("exists")]
    Exists,
    #[error("not found")]
    NotFound,
    #[error("not a number")]
    NotANumber,
    #[error("no memory")]
    NoMemory,
    #[error("key empty or too long, or item larger than the biggest block")]
    TooLarge,
    #[error("integer overflow")]
    Overflow,
    #[error("the dictionary lock is unrecoverable")]
    Poisoned,
    #[error(
        "the dictionary's memory was inconsistent; it was repaired, the operation was not done"
    )]
    Corrupted,
    #[error("cannot lock the dictionary: {0}")]
    Lock(Errno),
}

/// The dictionary of a [`Region`]. Cheap to create; every method locks.
pub struct Dict<'a> {
    region: &'a Region,
    geo: Geo,
}

impl Region {
    /// The `lua_shared_dict`-like dictionary of this region.
    pub fn dict(&self) -> Dict<'_> {
        Dict {
            region: self,
            geo: Geo::new(self.layout().dict_off, self.layout().dict_len),
        }
    }
}

/// Writes the empty dictionary: called once by [`Region::create`], before any
/// other process maps the region. On failure the magic stays unset and every
/// operation reports [`DictError::Corrupted`].
pub(crate) fn init(region: &Region) {
    let dict = region.dict();
    let z = dict.zone();
    // SAFETY: the zone starts page-aligned, holds at least Z_MAGIC >=
    // MUTEX_SIZE bytes there, and no other process maps the region yet.
    if unsafe { RobustMutex::init(z.base.cast()) }.is_err() {
        return;
    }
    let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0x0045_4c42_u64);
    z.w64(Z_BUMP).store(z.g.heap_start as u64, Relaxed);
    z.w64(Z_CLOCK).store(1, Relaxed);
    z.w64(Z_SEED).store(seed, Relaxed);
    z.w64(Z_MAGIC).store(DICT_MAGIC, Release);
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Set,
    Add,
    Replace,
}

impl Dict<'_> {
    /// The value and flags of `key`, `None` if absent or expired. Moves the
    /// item to the head of the LRU list.
    pub fn get(&self, key: &[u8]) -> Result<Option<(Value, u32)>, DictError> {
        check_key(key)?;
        self.with(|z| {
            let now = now_ms();
            let Some(f) = z.find(key, z.hash(key))? else {
                return Ok(None);
            };
            if is_expired(f.item.expires, now) {
                return Ok(None);
            }
            let v = z.read_value(&f.item);
            z.lru_touch(f.item.off)?;
            Ok(Some((v, f.item.flags)))
        })
    }

    /// As [`Dict::get`], but also returns an expired item that has not been
    /// removed yet, with `stale == true`.
    pub fn get_stale(&self, key: &[u8]) -> Result<Option<(Value, u32, bool)>, DictError> {
        check_key(key)?;
        self.with(|z| {
            let now = now_ms();
            let Some(f) = z.find(key, z.hash(key))? else {
                return Ok(None);
            };
            let stale = is_expired(f.item.expires, now);
            let v = z.read_value(&f.item);
            if !stale {
                z.lru_touch(f.item.off)?;
            }
            Ok(Some((v, f.item.flags, stale)))
        })
    }

    /// Stores `value` under `key`, evicting items if memory is short.
    pub fn set(
        &self,
        key: &[u8],
        value: &Value,
        exptime: Option<Duration>,
        flags: u32,
    ) -> Result<SetOutcome, DictError> {
        self.store(key, value, exptime, flags, Mode::Set, false)
    }

    /// As [`Dict::set`], but fails with [`DictError::NoMemory`] rather than
    /// evict items that have not expired.
    pub fn safe_set(
        &self,
        key: &[u8],
        value: &Value,
        exptime: Option<Duration>,
        flags: u32,
    ) -> Result<SetOutcome, DictError> {
        self.store(key, value, exptime, flags, Mode::Set, true)
    }

    /// As [`Dict::set`], but fails with [`DictError::Exists`] if the key is
    /// present and not expired.
    pub fn add(
        &self,
        key: &[u8],
        value: &Value,
        exptime: Option<Duration>,
        flags: u32,
    ) -> Result<SetOutcome, DictError> {
        self.store(key, value, exptime, flags, Mode::Add, false)
    }

    /// As [`Dict::add`], without evicting items that have not expired.
    pub fn safe_add(
        &self,
        key: &[u8],
        value: &Value,
        exptime: Option<Duration>,
        flags: u32,
    ) -> Result<SetOutcome, DictError> {
        self.store(key, value, exptime, flags, Mode::Add, true)
    }

    /// As [`Dict::set`], but fails with [`DictError::NotFound`] if the key is
    /// absent or expired.
    pub fn replace(
        &self,
        key: &[u8],
        value: &Value,
        exptime: Option<Duration>,
        flags: u32,
    ) -> Result<SetOutcome, DictError> {
        self.store(key, value, exptime, flags, Mode::Replace, false)
    }

    /// Removes `key` (expired or not). Removing an absent key is not an
    /// error (nginx's `delete` is `set(key, nil)`).
    pub fn delete(&self, key: &[u8]) -> Result<(), DictError> {
        check_key(key)?;
        self.with(|z| {
            if let Some(f) = z.find(key, z.hash(key))? {
                z.remove_item(&f.item)?;
            }
            Ok(())
        })
    }

    /// Adds `by` to the integer under `key` and returns the new value.
    ///
    /// Values are `i64`: a [`Value::Int`] is incremented in place (one 8-byte
    /// store); any other value, [`Value::Float`] included, is
    /// [`DictError::NotANumber`]; overflow is [`DictError::Overflow`]. If the
    /// key is absent or expired: with `init`, it is stored as `init + by`
    /// with expiry `init_ttl` and flags 0 (evicting if need be, reported in
    /// the outcome); without, [`DictError::NotFound`]. `init_ttl` is ignored
    /// when the key exists, whose expiry is kept.
    pub fn incr(
        &self,
        key: &[u8],
        by: i64,
        init: Option<i64>,
        init_ttl: Option<Duration>,
    ) -> Result<(i64, SetOutcome), DictError> {
        check_key(key)?;
        let class = self.class_for(key.len(), 8)?;
        self.with(|z| {
            let now = now_ms();
            let hash = z.hash(key);
            if let Some(f) = z.find(key, hash)?
                && !is_expired(f.item.expires, now)
            {
                if f.item.vtype != T_INT {
                    return Err(DictError::NotANumber.into());
                }
                let word = z.w64(f.item.value_off());
                let new = (word.load(Relaxed) as i64)
                    .checked_add(by)
                    .ok_or(DictError::Overflow)?;
                word.store(new as u64, Release);
                z.lru_touch(f.item.off)?;
                return Ok((new, SetOutcome::default()));
            }
            let Some(init) = init else {
                return Err(DictError::NotFound.into());
            };
            let new = init.checked_add(by).ok_or(DictError::Overflow)?;
            let value = Value::Int(new);
            let enc = Enc::new(&value);
            let out = z.store(
                key,
                hash,
                &enc,
                class,
                expiry(now, init_ttl),
                0,
                Mode::Set,
                false,
                now,
            )?;
            Ok((new, out))
        })
    }

    /// Time to live of `key`: `None` if it never expires. Absent or expired
    /// keys are [`DictError::NotFound`].
    pub fn ttl(&self, key: &[u8]) -> Result<Option<Duration>, DictError> {
        check_key(key)?;
        self.with(|z| {
            let now = now_ms();
            match z.find(key, z.hash(key))? {
                Some(f) if !is_expired(f.item.expires, now) => {
                    Ok((f.item.expires != 0).then(|| Duration::from_millis(f.item.expires - now)))
                }
                _ => Err(DictError::NotFound.into()),
            }
        })
    }

    /// Sets the expiry of an existing, unexpired `key` (`None`: never).
    pub fn expire(&self, key: &[u8], exptime: Option<Duration>) -> Result<(), DictError> {
        check_key(key)?;
        self.with(|z| {
            let now = now_ms();
            match z.find(key, z.hash(key))? {
                Some(f) if !is_expired(f.item.expires, now) => {
                    z.blk64(f.item.off, B_EXPIRES)
                        .store(expiry(now, exptime), Release);
                    Ok(())
                }
                _ => Err(DictError::NotFound.into()),
            }
        })
    }

    /// Keys that have not expired, most recently used first, at most `max`
    /// of them; `max == 0` means all (nginx's `get_keys` defaults to 1024:
    /// pass it explicitly).
    pub fn keys(&self, max: usize) -> Result<Vec<Vec<u8>>, DictError> {
        self.with(|z| {
            let now = now_ms();
            let mut out = Vec::new();
            let mut cur = z.w64(Z_LRU_HEAD).load(Relaxed) as usize;
            let mut steps = 0;
            while cur != 0 && (max == 0 || out.len() < max) {
                steps += 1;
                if steps > z.g.max_blocks() {
                    return Err(E::Corrupt("LRU list cycle"));
                }
                let it = z.item(cur)?;
                if !is_expired(it.expires, now) {
                    out.push(z.read_key(&it));
                }
                cur = it.lru_next;
            }
            Ok(out)
        })
    }

    /// Marks every item expired (their memory is reclaimed lazily, or by
    /// [`Dict::flush_expired`]).
    pub fn flush_all(&self) -> Result<(), DictError> {
        self.with(|z| {
            let mut cur = z.w64(Z_LRU_HEAD).load(Relaxed) as usize;
            let mut steps = 0;
            while cur != 0 {
                steps += 1;
                if steps > z.g.max_blocks() {
                    return Err(E::Corrupt("LRU list cycle"));
                }
                let it = z.item(cur)?;
                z.blk64(it.off, B_EXPIRES).store(1, Release);
                cur = it.lru_next;
            }
            Ok(())
        })
    }

    /// Removes expired items, at most `max` (`0`: all); returns how many.
    pub fn flush_expired(&self, max: usize) -> Result<usize, DictError> {
        self.with(|z| {
            let now = now_ms();
            let mut freed = 0;
            let mut cur = z.w64(Z_LRU_TAIL).load(Relaxed) as usize;
            let mut steps = 0;
            while cur != 0 && (max == 0 || freed < max) {
                steps += 1;
                if steps > z.g.max_blocks() {
                    return Err(E::Corrupt("LRU list cycle"));
                }
                let it = z.item(cur)?;
                cur = it.lru_prev;
                if is_expired(it.expires, now) {
                    z.remove_item(&it)?;
                    freed += 1;
                }
            }
            Ok(freed)
        })
    }

    /// Bytes of the heap not held by items (free blocks and never carved
    /// space; expired items still hold theirs until removed). Read without
    /// the lock: a snapshot. Because blocks are powers of two, an item of
    /// `n` bytes may need up to `2n` of it, and fragmentation may make a
    /// block of a given size unavailable even when this is larger.
    pub fn free_space(&self) -> usize {
        let used = self.zone().w64(Z_USED).load(Relaxed) as usize;
        self.capacity().saturating_sub(used)
    }

    /// Bytes of the heap (the zone less its header and bucket array).
    pub fn capacity(&self) -> usize {
        self.geo.heap_end - self.geo.heap_start
    }

    /// Size of the biggest block: an item takes 48 bytes of header, its key
    /// rounded up to 8 bytes, and its value (8 bytes for a number or bool).
    pub fn max_block_size(&self) -> usize {
        MIN_BLOCK << self.geo.max_class
    }

    /// Longest byte-string value storable under a key of `key_len` bytes.
    pub fn max_value_len(&self, key_len: usize) -> usize {
        self.max_block_size()
            .saturating_sub(ITEM_HDR + key_len.next_multiple_of(8))
    }

    /// Rebuilds the free lists, LRU list and counters from the chains (what
    /// happens automatically after a lock holder died). For tests.
    #[doc(hidden)]
    pub fn repair(&self) -> Result<(), DictError> {
        self.with(|z| {
            z.repair();
            Ok(())
        })
    }

    /// Verifies every invariant of the zone under the lock (after the repair
    /// that taking the lock may trigger). For tests.
    #[doc(hidden)]
    pub fn check_consistency(&self) -> Result<(), String> {
        match self.with(|z| Ok(z.verify())) {
            Ok(r) => r,
            Err(e) => Err(format!("cannot lock: {e}")),
        }
    }

    /// How many repairs the zone has gone through. For tests.
    #[doc(hidden)]
    pub fn repair_count(&self) -> u64 {
        self.zone().w64(Z_REPAIRS).load(Relaxed)
    }

    fn store(
        &self,
        key: &[u8],
        value: &Value,
        exptime: Option<Duration>,
        flags: u32,
        mode: Mode,
        safe: bool,
    ) -> Result<SetOutcome, DictError> {
        check_key(key)?;
        let enc = Enc::new(value);
        let class = self.class_for(key.len(), enc.len())?;
        self.with(|z| {
            let now = now_ms();
            let hash = z.hash(key);
            z.store(
                key,
                hash,
                &enc,
                class,
                expiry(now, exptime),
                flags,
                mode,
                safe,
                now,
            )
        })
    }

    fn class_for(&self, key_len: usize, value_len: usize) -> Result<u32, DictError> {
        let need = ITEM_HDR + key_len.next_multiple_of(8) + value_len;
        let class = need
            .max(MIN_BLOCK)
            .next_power_of_two()
            .trailing_zeros()
            .saturating_sub(MIN_BLOCK.trailing_zeros());
        if class > self.geo.max_class {
            return Err(DictError::TooLarge);
        }
        Ok(class)
    }

    fn zone(&self) -> Zone<'_> {
        Zone {
            // SAFETY: dict_off < size of the mapping (from the layout).
            base: unsafe { self.region.base().add(self.geo.off) },
            g: self.geo,
            _region: PhantomData,
        }
    }

    /// Runs `f` under the lock, repairing first if needed.
    fn with<R>(&self, f: impl FnOnce(&Zone<'_>) -> Result<R, E>) -> Result<R, DictError> {
        let z = self.zone();
        if z.w64(Z_MAGIC).load(Acquire) != DICT_MAGIC {
            return Err(DictError::Corrupted);
        }
        // SAFETY: the magic says `init` initialised the mutex at the zone
        // start; the mapping outlives `z` and `m`.
        let m = unsafe { RobustMutex::from_ptr(z.base.cast()) };
        let (guard, owner_died) = m.lock().map_err(|e| match e {
            LockError::NotRecoverable => DictError::Poisoned,
            LockError::Other(e) => DictError::Lock(e),
        })?;
        // Dropped before `guard`: flags a repair if we unwind with the lock.
        let _panic = PanicGuard(&z);
        if owner_died {
            // Set before making the mutex consistent: if repair panics, the
            // next locker still repairs (if we die, it gets EOWNERDEAD).
            z.w64(Z_NEEDS_REPAIR).store(1, Relaxed);
            guard.make_consistent().map_err(DictError::Lock)?;
        }
        if z.w64(Z_NEEDS_REPAIR).load(Relaxed) != 0 {
            z.repair();
        }
        match f(&z) {
            Ok(r) => Ok(r),
            Err(E::Dict(e)) => Err(e),
            Err(E::Corrupt(_what)) => {
                z.repair();
                Err(DictError::Corrupted)
            }
        }
    }
}

struct PanicGuard<'z, 'a>(&'z Zone<'a>);

impl Drop for PanicGuard<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Straight to the atomic: no simulated crash while unwinding.
            self.0.w64(Z_NEEDS_REPAIR).0.store(1, Relaxed);
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), DictError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(DictError::TooLarge);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Internals.

/// Internal error: a user-visible one, or an inconsistency found in memory.
#[derive(Debug)]
enum E {
    Dict(DictError),
    Corrupt(&'static str),
}

impl From<DictError> for E {
    fn from(e: DictError) -> E {
        E::Dict(e)
    }
}

/// Geometry of the zone, derived from its size alone.
#[derive(Debug, Clone, Copy)]
struct Geo {
    /// Offset of the zone in the mapping.
    off: usize,
    len: usize,
    nbuckets: usize,
    heap_start: usize,
    heap_end: usize,
    max_class: u32,
}

impl Geo {
    fn new(off: usize, len: usize) -> Geo {
        // Offsets are stored as u32.
        let len = len.min(u32::MAX as usize);
        let nbuckets = prev_pow2((len / 128).max(16));
        let heap_start = (Z_BUCKETS + 4 * nbuckets).next_multiple_of(MIN_BLOCK);
        let heap_len = len.saturating_sub(heap_start) / MIN_BLOCK * MIN_BLOCK;
        let mut max_class = 0;
        while (max_class as usize) < NCLASSES - 1 && (MIN_BLOCK << (max_class + 1)) <= heap_len / 8
        {
            max_class += 1;
        }
        Geo {
            off,
            len,
            nbuckets,
            heap_start,
            heap_end: heap_start + heap_len,
            max_class,
        }
    }

    /// Upper bound on the number of blocks (and so of items, chain lengths).
    fn max_blocks(&self) -> usize {
        (self.heap_end - self.heap_start) / MIN_BLOCK + 1
    }
}

fn prev_pow2(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

fn size_of_class(class: u32) -> usize {
    MIN_BLOCK << class
}

fn make_tag(state: u32, class: u32) -> u32 {
    TAG_MAGIC | (state << 8) | class
}

fn now_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000,
        // Cannot happen on Linux; 1 keeps "expired" meaningful.
        Err(_) => 1,
    }
}

fn expiry(now: u64, exptime: Option<Duration>) -> u64 {
    match exptime {
        None => 0,
        Some(d) if d.is_zero() => 0,
        Some(d) => {
            let ms = u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
            now.saturating_add(ms)
        }
    }
}

fn is_expired(expires: u64, now: u64) -> bool {
    expires != 0 && expires <= now
}

fn hash_key(seed: u64, key: &[u8]) -> u32 {
    const M: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (key.len() as u64).wrapping_mul(M);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(M);
        h ^= h >> 29;
    }
    let rest = chunks.remainder();
    let mut w = [0u8; 8];
    w[..rest.len()].copy_from_slice(rest);
    h = (h ^ u64::from_le_bytes(w)).wrapping_mul(M);
    // fmix64 of MurmurHash3.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h as u32) ^ ((h >> 32) as u32)
}

/// A value ready to be written.
struct Enc<'v> {
    vtype: u32,
    bytes: &'v [u8],
    word: u64,
}

impl<'v> Enc<'v> {
    fn new(v: &'v Value) -> Enc<'v> {
        let (vtype, bytes, word) = match v {
            Value::Bytes(b) => (T_BYTES, b.as_slice(), 0),
            Value::Int(i) => (T_INT, &[][..], *i as u64),
            Value::Float(f) => (T_FLOAT, &[][..], f.to_bits()),
            Value::Bool(b) => (T_BOOL, &[][..], u64::from(*b)),
        };
        Enc { vtype, bytes, word }
    }

    fn len(&self) -> usize {
        if self.vtype == T_BYTES {
            self.bytes.len()
        } else {
            8
        }
    }
}

/// A validated item header, copied out.
#[derive(Debug, Clone)]
struct Item {
    off: usize,
    class: u32,
    next: usize,
    lru_prev: usize,
    lru_next: usize,
    last_used: u64,
    expires: u64,
    hash: u32,
    flags: u32,
    key_len: usize,
    vtype: u32,
    value_len: usize,
}

impl Item {
    fn value_off(&self) -> usize {
        self.off + ITEM_HDR + self.key_len.next_multiple_of(8)
    }
}

/// An item found by key, and the zone offset of the u32 that links it.
struct Found {
    item: Item,
    link: usize,
}

/// A walked block.
#[derive(Debug, Clone, Copy)]
struct Blk {
    off: usize,
    class: u32,
    state: u32,
}

/// A shared u64. Every store goes through [`crash_point`], so that tests
/// can stop an operation after any number of stores.
#[derive(Clone, Copy)]
struct W64<'a>(&'a AtomicU64);

impl W64<'_> {
    fn load(self, o: Ordering) -> u64 {
        self.0.load(o)
    }
    fn store(self, v: u64, o: Ordering) {
        crash_point();
        self.0.store(v, o);
    }
    fn fetch_add(self, v: u64, o: Ordering) -> u64 {
        crash_point();
        self.0.fetch_add(v, o)
    }
    fn fetch_sub(self, v: u64, o: Ordering) -> u64 {
        crash_point();
        self.0.fetch_sub(v, o)
    }
}

/// A shared u32, as [`W64`].
#[derive(Clone, Copy)]
struct W32<'a>(&'a AtomicU32);

impl W32<'_> {
    fn load(self, o: Ordering) -> u32 {
        self.0.load(o)
    }
    fn store(self, v: u32, o: Ordering) {
        crash_point();
        self.0.store(v, o);
    }
}

#[cfg(not(test))]
#[inline(always)]
fn crash_point() {}

/// A simulated SIGKILL: the panic payload of [`crash_point`].
#[cfg(test)]
struct SimulatedCrash;

#[cfg(test)]
thread_local! {
    /// Stores left before a simulated crash; 0 = never.
    static CRASH_AFTER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
fn crash_point() {
    CRASH_AFTER.with(|c| match c.get() {
        0 => {}
        1 => {
            c.set(0);
            std::panic::panic_any(SimulatedCrash);
        }
        n => c.set(n - 1),
    });
}

/// Raw access to the zone. Only used with the lock held.
struct Zone<'a> {
    /// Start of the dictionary zone.
    base: *mut u8,
    g: Geo,
    _region: PhantomData<&'a Region>,
}

impl<'a> Zone<'a> {
    // --- raw words -------------------------------------------------------

    fn w64(&self, off: usize) -> W64<'a> {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.g.len,
            "dict: word {off} out of bounds"
        );
        // SAFETY: checked in bounds of the zone and 8-aligned (the zone is
        // page-aligned); the mapping lives for 'a.
        W64(unsafe { u64_at(self.base, off) })
    }

    fn w32(&self, off: usize) -> W32<'a> {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.g.len,
            "dict: word {off} out of bounds"
        );
        // SAFETY: as in w64, 4-aligned.
        W32(unsafe { u32_at(self.base, off) })
    }

    fn blk32(&self, blk: usize, field: usize) -> W32<'a> {
        self.w32(blk + field)
    }

    fn blk64(&self, blk: usize, field: usize) -> W64<'a> {
        self.w64(blk + field)
    }

    fn ptr32(&self, blk: usize, field: usize) -> usize {
        self.blk32(blk, field).load(Relaxed) as usize
    }

    fn set_ptr32(&self, blk: usize, field: usize, v: usize) {
        self.blk32(blk, field).store(v as u32, Relaxed);
    }

    fn set_tag(&self, blk: usize, state: u32, class: u32) {
        self.blk32(blk, B_TAG)
            .store(make_tag(state, class), Release);
    }

    fn read_bytes(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.g.len, "dict: bytes out of bounds");
        let mut v = Vec::with_capacity(len);
        // SAFETY: the source is inside the zone (checked), the destination
        // has capacity `len`; the lock is held, so no process writes these
        // bytes meanwhile.
        unsafe {
            ptr::copy_nonoverlapping(self.base.add(off), v.as_mut_ptr(), len);
            v.set_len(len);
        }
        v
    }

    fn write_bytes(&self, off: usize, bytes: &[u8]) {
        crash_point();
        assert!(off + bytes.len() <= self.g.len, "dict: bytes out of bounds");
        // SAFETY: the destination is inside the zone (checked) and in a block
        // nobody can reach yet; the lock is held.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len()) };
    }

    fn bytes_eq(&self, off: usize, key: &[u8]) -> bool {
        assert!(off + key.len() <= self.g.len, "dict: bytes out of bounds");
        // SAFETY: `off..off + key.len()` is inside the zone (checked above)
        // and the lock is held, so no process writes these bytes while the
        // shared slice lives (only for this comparison).
        let stored = unsafe { std::slice::from_raw_parts(self.base.add(off), key.len()) };
        stored == key
    }

    /// The bump pointer, never past the heap end (whatever is in memory).
    fn bump(&self) -> usize {
        (self.w64(Z_BUMP).load(Relaxed) as usize).min(self.g.heap_end)
    }

    fn hash(&self, key: &[u8]) -> u32 {
        hash_key(self.w64(Z_SEED).load(Relaxed), key)
    }

    fn bucket_slot(&self, hash: u32) -> usize {
        Z_BUCKETS + 4 * (hash as usize & (self.g.nbuckets - 1))
    }

    fn free_head(&self, class: u32) -> W64<'a> {
        self.w64(Z_FREE_HEADS + 8 * class as usize)
    }

    // --- validation ------------------------------------------------------

    /// The block at `off`, validated: a carved, aligned block whose tag is
    /// well formed. Does not check that `off` is a block start of the
    /// current tiling (only a walk can); callers rely on the invariants for
    /// that, and repair on the walk.
    fn block(&self, off: usize, bump: usize) -> Result<Blk, E> {
        let g = &self.g;
        let bump = bump.min(g.heap_end);
        if off < g.heap_start || off >= bump || !(off - g.heap_start).is_multiple_of(MIN_BLOCK) {
            return Err(E::Corrupt("block offset out of range"));
        }
        let tag = self.blk32(off, B_TAG).load(Relaxed);
        let (state, class) = ((tag >> 8) & 0xff, tag & 0xff);
        if tag & 0xffff_0000 != TAG_MAGIC
            || !(state == STATE_FREE || state == STATE_ITEM)
            || class > g.max_class
        {
            return Err(E::Corrupt("bad block tag"));
        }
        let size = size_of_class(class);
        if !(off - g.heap_start).is_multiple_of(size) || off + size > bump {
            return Err(E::Corrupt("misplaced block"));
        }
        Ok(Blk { off, class, state })
    }

    fn item(&self, off: usize) -> Result<Item, E> {
        let b = self.block(off, self.bump())?;
        if b.state != STATE_ITEM {
            return Err(E::Corrupt("not an item"));
        }
        let kw = self.blk32(off, B_KEY).load(Relaxed);
        let key_len = (kw & 0xff_ffff) as usize;
        let vtype = kw >> 24;
        let value_len = self.blk32(off, B_VALUE_LEN).load(Relaxed) as usize;
        let ok_type = match vtype {
            T_BYTES => true,
            T_INT | T_FLOAT | T_BOOL => value_len == 8,
            _ => false,
        };
        if !ok_type
            || key_len == 0
            || key_len > MAX_KEY_LEN
            || ITEM_HDR + key_len.next_multiple_of(8) + value_len > size_of_class(b.class)
        {
            return Err(E::Corrupt("malformed item"));
        }
        Ok(Item {
            off,
            class: b.class,
            next: self.ptr32(off, B_NEXT),
            lru_prev: self.ptr32(off, B_PREV),
            lru_next: self.ptr32(off, B_LRU_NEXT),
            last_used: self.blk64(off, B_LAST_USED).load(Relaxed),
            expires: self.blk64(off, B_EXPIRES).load(Relaxed),
            hash: self.blk32(off, B_HASH).load(Relaxed),
            flags: self.blk32(off, B_FLAGS).load(Relaxed),
            key_len,
            vtype,
            value_len,
        })
    }

    /// An item block (for LRU neighbours), validated.
    fn item_blk(&self, off: usize) -> Result<usize, E> {
        match self.block(off, self.bump())? {
            Blk {
                state: STATE_ITEM, ..
            } => Ok(off),
            _ => Err(E::Corrupt("LRU link to a non-item")),
        }
    }

    /// A free block of `class`, validated.
    fn free_blk(&self, off: usize, class: u32) -> Result<usize, E> {
        match self.block(off, self.bump())? {
            Blk {
                state: STATE_FREE,
                class: c,
                ..
            } if c == class => Ok(off),
            _ => Err(E::Corrupt("free list link to a non-free block")),
        }
    }

    fn read_key(&self, it: &Item) -> Vec<u8> {
        self.read_bytes(it.off + ITEM_HDR, it.key_len)
    }

    fn read_value(&self, it: &Item) -> Value {
        let vo = it.value_off();
        match it.vtype {
            T_BYTES => Value::Bytes(self.read_bytes(vo, it.value_len)),
            T_INT => Value::Int(self.w64(vo).load(Relaxed) as i64),
            T_FLOAT => Value::Float(f64::from_bits(self.w64(vo).load(Relaxed))),
            _ => Value::Bool(self.w64(vo).load(Relaxed) != 0),
        }
    }

    // --- index -----------------------------------------------------------

    fn find(&self, key: &[u8], hash: u32) -> Result<Option<Found>, E> {
        let mut link = self.bucket_slot(hash);
        let mut cur = self.w32(link).load(Relaxed) as usize;
        let mut steps = 0;
        while cur != 0 {
            steps += 1;
            if steps > self.g.max_blocks() {
                return Err(E::Corrupt("chain cycle"));
            }
            let it = self.item(cur)?;
            if it.hash == hash && it.key_len == key.len() && self.bytes_eq(cur + ITEM_HDR, key) {
                return Ok(Some(Found { item: it, link }));
            }
            link = cur + B_NEXT;
            cur = it.next;
        }
        Ok(None)
    }

    /// Unlinks `it` from its chain (one store).
    fn chain_unlink(&self, it: &Item) -> Result<(), E> {
        let mut link = self.bucket_slot(it.hash);
        let mut steps = 0;
        loop {
            let cur = self.w32(link).load(Relaxed) as usize;
            if cur == 0 {
                return Err(E::Corrupt("item not in its chain"));
            }
            steps += 1;
            if steps > self.g.max_blocks() {
                return Err(E::Corrupt("chain cycle"));
            }
            if cur == it.off {
                self.w32(link).store(it.next as u32, Release);
                return Ok(());
            }
            link = self.item(cur)?.off + B_NEXT;
        }
    }

    // --- LRU -------------------------------------------------------------

    fn lru_unlink(&self, off: usize) -> Result<(), E> {
        let prev = self.ptr32(off, B_PREV);
        let next = self.ptr32(off, B_LRU_NEXT);
        if prev == 0 {
            if self.w64(Z_LRU_HEAD).load(Relaxed) as usize != off {
                return Err(E::Corrupt("LRU head mismatch"));
            }
        } else if self.ptr32(self.item_blk(prev)?, B_LRU_NEXT) != off {
            return Err(E::Corrupt("LRU prev mismatch"));
        }
        if next == 0 {
            if self.w64(Z_LRU_TAIL).load(Relaxed) as usize != off {
                return Err(E::Corrupt("LRU tail mismatch"));
            }
        } else if self.ptr32(self.item_blk(next)?, B_PREV) != off {
            return Err(E::Corrupt("LRU next mismatch"));
        }
        if prev == 0 {
            self.w64(Z_LRU_HEAD).store(next as u64, Relaxed);
        } else {
            self.set_ptr32(prev, B_LRU_NEXT, next);
        }
        if next == 0 {
            self.w64(Z_LRU_TAIL).store(prev as u64, Relaxed);
        } else {
            self.set_ptr32(next, B_PREV, prev);
        }
        self.set_ptr32(off, B_PREV, 0);
        self.set_ptr32(off, B_LRU_NEXT, 0);
        Ok(())
    }

    fn lru_push_head(&self, off: usize) -> Result<(), E> {
        let head = self.w64(Z_LRU_HEAD).load(Relaxed) as usize;
        if head != 0 {
            self.item_blk(head)?;
        }
        let stamp = self.w64(Z_CLOCK).fetch_add(1, Relaxed);
        self.blk64(off, B_LAST_USED).store(stamp, Relaxed);
        self.set_ptr32(off, B_PREV, 0);
        self.set_ptr32(off, B_LRU_NEXT, head);
        if head != 0 {
            self.set_ptr32(head, B_PREV, off);
        } else {
            self.w64(Z_LRU_TAIL).store(off as u64, Relaxed);
        }
        self.w64(Z_LRU_HEAD).store(off as u64, Relaxed);
        Ok(())
    }

    fn lru_touch(&self, off: usize) -> Result<(), E> {
        if self.w64(Z_LRU_HEAD).load(Relaxed) as usize == off {
            let stamp = self.w64(Z_CLOCK).fetch_add(1, Relaxed);
            self.blk64(off, B_LAST_USED).store(stamp, Relaxed);
            return Ok(());
        }
        self.lru_unlink(off)?;
        self.lru_push_head(off)
    }

    // --- blocks ----------------------------------------------------------

    fn flist_push(&self, off: usize, class: u32) -> Result<(), E> {
        let head = self.free_head(class).load(Relaxed) as usize;
        if head != 0 {
            self.free_blk(head, class)?;
            self.set_ptr32(head, B_PREV, off);
        }
        self.set_ptr32(off, B_NEXT, head);
        self.set_ptr32(off, B_PREV, 0);
        self.free_head(class).store(off as u64, Relaxed);
        Ok(())
    }

    fn flist_unlink(&self, off: usize, class: u32) -> Result<(), E> {
        let prev = self.ptr32(off, B_PREV);
        let next = self.ptr32(off, B_NEXT);
        if prev == 0 {
            if self.free_head(class).load(Relaxed) as usize != off {
                return Err(E::Corrupt("free list head mismatch"));
            }
        } else if self.ptr32(self.free_blk(prev, class)?, B_NEXT) != off {
            return Err(E::Corrupt("free list prev mismatch"));
        }
        if next != 0 && self.ptr32(self.free_blk(next, class)?, B_PREV) != off {
            return Err(E::Corrupt("free list next mismatch"));
        }
        if prev == 0 {
            self.free_head(class).store(next as u64, Relaxed);
        } else {
            self.set_ptr32(prev, B_NEXT, next);
        }
        if next != 0 {
            self.set_ptr32(next, B_PREV, prev);
        }
        Ok(())
    }

    fn flist_pop(&self, class: u32) -> Result<Option<usize>, E> {
        let head = self.free_head(class).load(Relaxed) as usize;
        if head == 0 {
            return Ok(None);
        }
        self.free_blk(head, class)?;
        self.flist_unlink(head, class)?;
        Ok(Some(head))
    }

    /// Splits the unlisted free block `off` of class `from` down to class
    /// `to`, listing the upper halves.
    fn split_down(&self, off: usize, from: u32, to: u32) -> Result<(), E> {
        let mut c = from;
        while c > to {
            c -= 1;
            let upper = off + size_of_class(c);
            // Upper tag first, then the lower (release: the commit point).
            self.blk32(upper, B_TAG)
                .store(make_tag(STATE_FREE, c), Relaxed);
            self.set_tag(off, STATE_FREE, c);
            self.flist_push(upper, c)?;
        }
        Ok(())
    }

    /// Carves a block of class >= `want` from the bump area, carving (and
    /// freeing) smaller blocks first if the bump pointer is not aligned
    /// enough. Returns the block (tagged free, unlisted) and its class.
    fn carve(&self, want: u32) -> Result<Option<(usize, u32)>, E> {
        let g = self.g;
        loop {
            let bump = self.w64(Z_BUMP).load(Relaxed) as usize;
            if bump < g.heap_start || bump > g.heap_end {
                return Err(E::Corrupt("bump pointer out of range"));
            }
            let rel = bump - g.heap_start;
            if !rel.is_multiple_of(MIN_BLOCK) {
                return Err(E::Corrupt("bump pointer misaligned"));
            }
            let Some(c) = (0..=g.max_class).rev().find(|&c| {
                rel.is_multiple_of(size_of_class(c)) && bump + size_of_class(c) <= g.heap_end
            }) else {
                return Ok(None);
            };
            // Tag first, then the bump pointer (release: the commit point).
            self.blk32(bump, B_TAG)
                .store(make_tag(STATE_FREE, c), Relaxed);
            self.w64(Z_BUMP)
                .store((bump + size_of_class(c)) as u64, Release);
            if c >= want {
                return Ok(Some((bump, c)));
            }
            self.free_block(bump, c)?;
        }
    }

    /// A block of class `class`, tagged as an item, without evicting.
    fn try_alloc(&self, class: u32) -> Result<Option<usize>, E> {
        let found = match self.flist_pop(class)? {
            Some(off) => Some((off, class)),
            None => {
                let mut larger = None;
                for c in class + 1..=self.g.max_class {
                    if let Some(off) = self.flist_pop(c)? {
                        larger = Some((off, c));
                        break;
                    }
                }
                match larger {
                    Some(l) => Some(l),
                    None => self.carve(class)?,
                }
            }
        };
        let Some((off, c)) = found else {
            return Ok(None);
        };
        self.split_down(off, c, class)?;
        self.set_tag(off, STATE_ITEM, class);
        Ok(Some(off))
    }

    /// Frees the block `off` of `class` (already unreachable), merging it
    /// with free buddies.
    fn free_block(&self, off: usize, class: u32) -> Result<(), E> {
        let g = self.g;
        let bump = self.bump();
        let (mut off, mut c) = (off, class);
        self.set_tag(off, STATE_FREE, c);
        while c < g.max_class {
            let size = size_of_class(c);
            let buddy = g.heap_start + ((off - g.heap_start) ^ size);
            if buddy + size > bump {
                break;
            }
            let tag = self.blk32(buddy, B_TAG).load(Relaxed);
            if tag != make_tag(STATE_FREE, c) {
                break;
            }
            self.flist_unlink(buddy, c)?;
            off = off.min(buddy);
            c += 1;
            self.set_tag(off, STATE_FREE, c);
        }
        self.flist_push(off, c)
    }

    // --- items -----------------------------------------------------------

    fn remove_item(&self, it: &Item) -> Result<(), E> {
        self.chain_unlink(it)?;
        self.lru_unlink(it.off)?;
        self.w64(Z_ITEMS).fetch_sub(1, Relaxed);
        self.w64(Z_USED)
            .fetch_sub(size_of_class(it.class) as u64, Relaxed);
        self.free_block(it.off, it.class)
    }

    /// Allocation once the fast path failed: expired items, then eviction.
    fn alloc_slow(
        &self,
        class: u32,
        safe: bool,
        now: u64,
        forcible: &mut bool,
    ) -> Result<usize, E> {
        let mut cur = self.w64(Z_LRU_TAIL).load(Relaxed) as usize;
        for _ in 0..EXPIRE_SCAN {
            if cur == 0 {
                break;
            }
            let it = self.item(cur)?;
            cur = it.lru_prev;
            if is_expired(it.expires, now) {
                self.remove_item(&it)?;
            }
        }
        if let Some(b) = self.try_alloc(class)? {
            return Ok(b);
        }
        if safe {
            return Err(DictError::NoMemory.into());
        }
        let mut evicted = 0;
        // Whether an item as big as needed may still exist (none appears
        // while evicting, so one fruitless scan is enough).
        let mut big_items = true;
        loop {
            let mut victim = self.w64(Z_LRU_TAIL).load(Relaxed) as usize;
            if evicted >= LRU_EVICT && big_items {
                // The least recently used item big enough to make room.
                big_items = false;
                let mut cur = victim;
                let mut steps = 0;
                while cur != 0 {
                    steps += 1;
                    if steps > self.g.max_blocks() {
                        return Err(E::Corrupt("LRU list cycle"));
                    }
                    let it = self.item(cur)?;
                    if it.class >= class {
                        victim = cur;
                        big_items = true;
                        break;
                    }
                    cur = it.lru_prev;
                }
            }
            if victim == 0 {
                return Err(DictError::NoMemory.into());
            }
            if evicted > self.g.max_blocks() {
                return Err(E::Corrupt("eviction does not end"));
            }
            let it = self.item(victim)?;
            if !is_expired(it.expires, now) {
                *forcible = true;
            }
            self.remove_item(&it)?;
            evicted += 1;
            if let Some(b) = self.try_alloc(class)? {
                return Ok(b);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_item(
        &self,
        blk: usize,
        class: u32,
        key: &[u8],
        hash: u32,
        enc: &Enc<'_>,
        expires: u64,
        flags: u32,
    ) {
        let need = ITEM_HDR + key.len().next_multiple_of(8) + enc.len();
        assert!(need <= size_of_class(class) && blk + size_of_class(class) <= self.g.len);
        self.set_ptr32(blk, B_NEXT, 0);
        self.set_ptr32(blk, B_PREV, 0);
        self.set_ptr32(blk, B_LRU_NEXT, 0);
        self.blk64(blk, B_LAST_USED).store(0, Relaxed);
        self.blk64(blk, B_EXPIRES).store(expires, Relaxed);
        self.blk32(blk, B_HASH).store(hash, Relaxed);
        self.blk32(blk, B_FLAGS).store(flags, Relaxed);
        self.blk32(blk, B_VALUE_LEN)
            .store(enc.len() as u32, Relaxed);
        self.blk32(blk, B_KEY)
            .store(key.len() as u32 | (enc.vtype << 24), Relaxed);
        self.write_bytes(blk + ITEM_HDR, key);
        let vo = blk + ITEM_HDR + key.len().next_multiple_of(8);
        if enc.vtype == T_BYTES {
            self.write_bytes(vo, enc.bytes);
        } else {
            self.w64(vo).store(enc.word, Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        key: &[u8],
        hash: u32,
        enc: &Enc<'_>,
        class: u32,
        expires: u64,
        flags: u32,
        mode: Mode,
        safe: bool,
        now: u64,
    ) -> Result<SetOutcome, E> {
        for _ in 0..EXPIRE_ON_STORE {
            let tail = self.w64(Z_LRU_TAIL).load(Relaxed) as usize;
            if tail == 0 {
                break;
            }
            let it = self.item(tail)?;
            if !is_expired(it.expires, now) {
                break;
            }
            self.remove_item(&it)?;
        }
        let old = self.find(key, hash)?;
        let live = old
            .as_ref()
            .is_some_and(|f| !is_expired(f.item.expires, now));
        match mode {
            Mode::Add if live => return Err(DictError::Exists.into()),
            Mode::Replace if !live => return Err(DictError::NotFound.into()),
            _ => {}
        }
        let mut forcible = false;
        let blk = match self.try_alloc(class)? {
            Some(b) => b,
            None => {
                // Short of memory: the old item goes first, as in nginx.
                if let Some(f) = &old {
                    self.remove_item(&f.item)?;
                }
                self.alloc_slow(class, safe, now, &mut forcible)?
            }
        };
        self.write_item(blk, class, key, hash, enc, expires, flags);
        // Chains may have changed while allocating: look again.
        match self.find(key, hash)? {
            Some(f) => {
                self.set_ptr32(blk, B_NEXT, f.item.next);
                // The commit point: the old item is replaced by the new.
                self.w32(f.link).store(blk as u32, Release);
                self.lru_unlink(f.item.off)?;
                self.w64(Z_USED)
                    .fetch_sub(size_of_class(f.item.class) as u64, Relaxed);
                self.free_block(f.item.off, f.item.class)?;
            }
            None => {
                let slot = self.bucket_slot(hash);
                self.set_ptr32(blk, B_NEXT, self.w32(slot).load(Relaxed) as usize);
                // The commit point.
                self.w32(slot).store(blk as u32, Release);
                self.w64(Z_ITEMS).fetch_add(1, Relaxed);
            }
        }
        self.w64(Z_USED)
            .fetch_add(size_of_class(class) as u64, Relaxed);
        self.lru_push_head(blk)?;
        Ok(SetOutcome { forcible })
    }

    // --- repair and verification ----------------------------------------

    /// The blocks from the heap start, up to `bump` or the first invalid tag;
    /// returns them and where the walk stopped.
    fn walk(&self, bump: usize) -> (Vec<Blk>, usize) {
        let mut blocks = Vec::new();
        let mut pos = self.g.heap_start;
        while pos < bump {
            match self.block(pos, bump) {
                Ok(b) => {
                    blocks.push(b);
                    pos += size_of_class(b.class);
                }
                Err(_) => break,
            }
        }
        (blocks, pos)
    }

    /// A chain member, fully validated (used by repair and verify): a block
    /// of the walk, an item, well formed, with the hash of its key, in bucket
    /// `bucket`.
    fn valid_chain_item(&self, off: usize, blocks: &[Blk], bucket: usize) -> Option<(usize, Item)> {
        let i = blocks.binary_search_by_key(&off, |b| b.off).ok()?;
        let it = self.item(off).ok()?;
        let key = self.read_key(&it);
        let hash = self.hash(&key);
        (hash == it.hash && (hash as usize & (self.g.nbuckets - 1)) == bucket).then_some((i, it))
    }

    /// Rebuilds everything derived from the chains. Infallible: whatever is
    /// in memory, the result satisfies every invariant `verify` checks.
    fn repair(&self) {
        let g = self.g;
        // 1. The carved blocks.
        let bump = (self.w64(Z_BUMP).load(Relaxed) as usize).clamp(g.heap_start, g.heap_end);
        let bump = g.heap_start + (bump - g.heap_start) / MIN_BLOCK * MIN_BLOCK;
        let (blocks, end) = self.walk(bump);
        self.w64(Z_BUMP).store(end as u64, Release);

        // 2. The reachable items; chains are cut at the first bad link.
        let mut reach = vec![false; blocks.len()];
        let mut items: Vec<(u64, usize)> = Vec::new();
        for b in 0..g.nbuckets {
            let mut link = Z_BUCKETS + 4 * b;
            loop {
                let cur = self.w32(link).load(Relaxed) as usize;
                if cur == 0 {
                    break;
                }
                match self.valid_chain_item(cur, &blocks, b) {
                    Some((i, it)) if !reach[i] => {
                        reach[i] = true;
                        items.push((it.last_used, cur));
                        link = cur + B_NEXT;
                    }
                    _ => {
                        self.w32(link).store(0, Release);
                        break;
                    }
                }
            }
        }

        // 3. Everything else is free: coalesce buddies (a stack over the
        // blocks in address order), retag, rebuild the free lists.
        let mut out: Vec<Blk> = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            let state = if reach[i] { STATE_ITEM } else { STATE_FREE };
            out.push(Blk { state, ..*b });
            while out.len() >= 2 {
                let (lo, hi) = (out[out.len() - 2], out[out.len() - 1]);
                let size = size_of_class(lo.class);
                let mergeable = lo.state == STATE_FREE
                    && hi.state == STATE_FREE
                    && lo.class == hi.class
                    && lo.class < g.max_class
                    && lo.off + size == hi.off
                    && (lo.off - g.heap_start).is_multiple_of(2 * size);
                if !mergeable {
                    break;
                }
                out.pop();
                if let Some(top) = out.last_mut() {
                    top.class += 1;
                }
            }
        }
        for c in 0..NCLASSES {
            self.w64(Z_FREE_HEADS + 8 * c).store(0, Relaxed);
        }
        let mut last_free: [usize; NCLASSES] = [0; NCLASSES];
        for b in &out {
            self.set_tag(b.off, b.state, b.class);
            if b.state == STATE_FREE {
                let c = b.class as usize;
                let prev = last_free[c];
                self.set_ptr32(b.off, B_PREV, prev);
                self.set_ptr32(b.off, B_NEXT, 0);
                if prev == 0 {
                    self.w64(Z_FREE_HEADS + 8 * c).store(b.off as u64, Relaxed);
                } else {
                    self.set_ptr32(prev, B_NEXT, b.off);
                }
                last_free[c] = b.off;
            }
        }

        // 4. The LRU list, most recent first. An item linked but not yet
        // stamped (stamp 0) was being stored: it counts as the most recent.
        // Re-stamping keeps the stamps strictly decreasing along the list.
        items.sort_unstable_by_key(|&(stamp, off)| {
            Reverse((if stamp == 0 { u64::MAX } else { stamp }, off))
        });
        // (A garbage clock is pulled back into a range that cannot wrap.)
        let base = self.w64(Z_CLOCK).load(Relaxed).clamp(1, u64::MAX / 4);
        let mut used = 0u64;
        for (n, &(_, off)) in items.iter().enumerate() {
            let prev = if n == 0 { 0 } else { items[n - 1].1 };
            let next = items.get(n + 1).map_or(0, |x| x.1);
            self.set_ptr32(off, B_PREV, prev);
            self.set_ptr32(off, B_LRU_NEXT, next);
            self.blk64(off, B_LAST_USED)
                .store(base + (items.len() - n) as u64, Relaxed);
            if let Ok(b) = self.block(off, end) {
                used += size_of_class(b.class) as u64;
            }
        }
        self.w64(Z_CLOCK)
            .store(base + items.len() as u64 + 1, Relaxed);
        self.w64(Z_LRU_HEAD)
            .store(items.first().map_or(0, |x| x.1) as u64, Relaxed);
        self.w64(Z_LRU_TAIL)
            .store(items.last().map_or(0, |x| x.1) as u64, Relaxed);

        // 5. Counters.
        self.w64(Z_ITEMS).store(items.len() as u64, Relaxed);
        self.w64(Z_USED).store(used, Relaxed);
        self.w64(Z_REPAIRS).fetch_add(1, Relaxed);
        self.w64(Z_NEEDS_REPAIR).store(0, Release);
    }

    /// Checks every invariant; a description of the first broken one.
    fn verify(&self) -> Result<(), String> {
        let g = self.g;
        let bump = self.w64(Z_BUMP).load(Relaxed) as usize;
        if bump < g.heap_start
            || bump > g.heap_end
            || !(bump - g.heap_start).is_multiple_of(MIN_BLOCK)
        {
            return Err(format!("bump pointer {bump} out of range"));
        }
        let (blocks, end) = self.walk(bump);
        if end != bump {
            return Err(format!("block walk stops at {end}, bump pointer is {bump}"));
        }
        const UNSEEN: u8 = 0;
        const LISTED: u8 = 1;
        const LINKED: u8 = 2;
        let mut seen = vec![UNSEEN; blocks.len()];
        let index = |off: usize| blocks.binary_search_by_key(&off, |b| b.off).ok();

        // Free lists.
        for c in 0..NCLASSES as u32 {
            let mut cur = self.free_head(c).load(Relaxed) as usize;
            if c > g.max_class && cur != 0 {
                return Err(format!("free list of class {c} above the maximum"));
            }
            let mut prev = 0;
            while cur != 0 {
                let i = index(cur).ok_or(format!("free list {c}: {cur} is not a block"))?;
                let b = blocks[i];
                if b.state != STATE_FREE || b.class != c {
                    return Err(format!("free list {c}: block {cur} is {b:?}"));
                }
                if seen[i] != UNSEEN {
                    return Err(format!("free list {c}: block {cur} listed twice"));
                }
                seen[i] = LISTED;
                if self.ptr32(cur, B_PREV) != prev {
                    return Err(format!("free list {c}: bad prev link at {cur}"));
                }
                prev = cur;
                cur = self.ptr32(cur, B_NEXT);
            }
        }

        // Chains.
        let mut keys = HashSet::new();
        let mut reachable = 0usize;
        let mut used = 0usize;
        let mut max_stamp = 0;
        for b in 0..g.nbuckets {
            let mut cur = self.w32(Z_BUCKETS + 4 * b).load(Relaxed) as usize;
            while cur != 0 {
                let (i, it) = self
                    .valid_chain_item(cur, &blocks, b)
                    .ok_or(format!("bucket {b}: invalid item at {cur}"))?;
                if seen[i] != UNSEEN {
                    return Err(format!("bucket {b}: block {cur} linked twice or also free"));
                }
                seen[i] = LINKED;
                if !keys.insert(self.read_key(&it)) {
                    return Err(format!("bucket {b}: duplicate key at {cur}"));
                }
                reachable += 1;
                used += size_of_class(it.class);
                max_stamp = max_stamp.max(it.last_used);
                cur = it.next;
            }
        }
        if let Some(i) = seen.iter().position(|&s| s == UNSEEN) {
            return Err(format!(
                "block {:?} is neither free-listed nor reachable",
                blocks[i]
            ));
        }

        // Coalescing: no free block has a free buddy of its class.
        for b in blocks.iter().filter(|b| b.state == STATE_FREE) {
            if b.class >= g.max_class {
                continue;
            }
            let size = size_of_class(b.class);
            let buddy = g.heap_start + ((b.off - g.heap_start) ^ size);
            if let Some(j) = index(buddy)
                && blocks[j].state == STATE_FREE
                && blocks[j].class == b.class
            {
                return Err(format!("free buddies {} and {buddy} not merged", b.off));
            }
        }

        // LRU.
        let mut cur = self.w64(Z_LRU_HEAD).load(Relaxed) as usize;
        let (mut prev, mut count, mut last_stamp) = (0, 0, u64::MAX);
        let mut in_lru = vec![false; blocks.len()];
        while cur != 0 {
            let i = index(cur).ok_or(format!("LRU: {cur} is not a block"))?;
            if seen[i] != LINKED || in_lru[i] {
                return Err(format!(
                    "LRU: {cur} is not a reachable item, or is listed twice"
                ));
            }
            in_lru[i] = true;
            if self.ptr32(cur, B_PREV) != prev {
                return Err(format!("LRU: bad prev link at {cur}"));
            }
            let stamp = self.blk64(cur, B_LAST_USED).load(Relaxed);
            if stamp >= last_stamp {
                return Err(format!("LRU: stamps not decreasing at {cur}"));
            }
            last_stamp = stamp;
            count += 1;
            prev = cur;
            cur = self.ptr32(cur, B_LRU_NEXT);
        }
        if self.w64(Z_LRU_TAIL).load(Relaxed) as usize != prev {
            return Err("LRU: tail does not match the last item".into());
        }
        if count != reachable {
            return Err(format!("LRU holds {count} items, chains {reachable}"));
        }

        // Counters.
        let items = self.w64(Z_ITEMS).load(Relaxed) as usize;
        if items != reachable {
            return Err(format!("item counter {items}, reachable {reachable}"));
        }
        let used_ctr = self.w64(Z_USED).load(Relaxed) as usize;
        if used_ctr != used {
            return Err(format!(
                "used counter {used_ctr}, reachable items hold {used}"
            ));
        }
        if reachable > 0 && self.w64(Z_CLOCK).load(Relaxed) <= max_stamp {
            return Err("LRU clock behind an item's stamp".into());
        }
        if self.w64(Z_NEEDS_REPAIR).load(Relaxed) != 0 {
            return Err("repair pending".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    use std::sync::Once;

    use super::*;

    fn quiet_simulated_crashes() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !info.payload().is::<SimulatedCrash>() {
                    default(info);
                }
            }));
        });
    }

    /// Runs `op`, simulating a SIGKILL at its `n`th store; `None` if it
    /// "died". The lock is released by unwinding, with the repair flag set,
    /// exactly as `EOWNERDEAD` would make the next locker repair.
    fn crash_after<R>(n: u64, op: impl FnOnce() -> R) -> Option<R> {
        CRASH_AFTER.with(|c| c.set(n));
        let r = catch_unwind(AssertUnwindSafe(op));
        CRASH_AFTER.with(|c| c.set(0));
        match r {
            Ok(v) => Some(v),
            Err(p) if p.is::<SimulatedCrash>() => None,
            Err(p) => resume_unwind(p),
        }
    }

    fn snapshot(d: &Dict<'_>) -> BTreeMap<Vec<u8>, Value> {
        let mut all = BTreeMap::new();
        // Stale items too: walk the LRU list through get_stale.
        let keys = d
            .with(|z2| {
                let mut out = Vec::new();
                let mut cur = z2.w64(Z_LRU_HEAD).load(Relaxed) as usize;
                while cur != 0 {
                    let it = z2.item(cur)?;
                    out.push(z2.read_key(&it));
                    cur = it.lru_next;
                }
                Ok(out)
            })
            .expect("keys");
        for k in keys {
            if let Some((v, _, _)) = d.get_stale(&k).expect("get_stale") {
                all.insert(k, v);
            }
        }
        all
    }

    fn populate(d: &Dict<'_>) {
        for i in 0..40u8 {
            let key = format!("k{i}");
            let v = Value::Bytes(vec![i; 20 + 37 * i as usize]);
            d.set(key.as_bytes(), &v, None, u32::from(i))
                .expect("populate");
            d.set(
                format!("n{i}").as_bytes(),
                &Value::Int(i64::from(i)),
                None,
                0,
            )
            .expect("populate");
        }
    }

    type Step = Box<dyn Fn(&Dict<'_>)>;

    struct Case {
        name: &'static str,
        setup: Step,
        op: Step,
        /// The value of "x" once the operation is done.
        done: Option<Value>,
    }

    fn case(name: &'static str, setup: Step, op: Step, done: Option<Value>) -> Case {
        Case {
            name,
            setup,
            op,
            done,
        }
    }

    fn bytes(b: u8, n: usize) -> Value {
        Value::Bytes(vec![b; n])
    }

    #[test]
    fn every_crash_point_of_every_operation_is_repairable() {
        quiet_simulated_crashes();
        let region = Region::create(1 << 20).expect("region");
        let d = region.dict();
        populate(&d);
        let x: &[u8] = b"x";
        let set = |v: Value| -> Step { Box::new(move |d| drop(d.set(b"x", &v, None, 0))) };
        let del: Step = Box::new(|d| drop(d.delete(b"x")));
        let cases = vec![
            case("set new", del, set(bytes(1, 100)), Some(bytes(1, 100))),
            case(
                "set same class",
                set(bytes(1, 100)),
                set(bytes(2, 100)),
                Some(bytes(2, 100)),
            ),
            case(
                "set bigger",
                set(bytes(1, 100)),
                set(bytes(3, 3000)),
                Some(bytes(3, 3000)),
            ),
            case(
                "add",
                Box::new(|d| drop(d.delete(b"x"))),
                Box::new(|d| drop(d.add(b"x", &Value::Int(5), None, 0))),
                Some(Value::Int(5)),
            ),
            case(
                "replace",
                set(Value::Int(1)),
                Box::new(|d| drop(d.replace(b"x", &Value::Float(2.5), None, 0))),
                Some(Value::Float(2.5)),
            ),
            case(
                "delete",
                set(bytes(4, 10)),
                Box::new(|d| drop(d.delete(b"x"))),
                None,
            ),
            case(
                "incr in place",
                set(Value::Int(10)),
                Box::new(|d| drop(d.incr(b"x", 5, None, None))),
                Some(Value::Int(15)),
            ),
            case(
                "incr init",
                Box::new(|d| drop(d.delete(b"x"))),
                Box::new(|d| drop(d.incr(b"x", 5, Some(1), Some(Duration::from_secs(60))))),
                Some(Value::Int(6)),
            ),
            case(
                "expire",
                set(Value::Int(1)),
                Box::new(|d| drop(d.expire(b"x", Some(Duration::from_secs(3600))))),
                Some(Value::Int(1)),
            ),
            case(
                "get",
                set(Value::Int(3)),
                Box::new(|d| drop(d.get(b"x"))),
                Some(Value::Int(3)),
            ),
            case(
                "flush_expired",
                Box::new(|d| {
                    d.set(b"x", &Value::Int(1), Some(Duration::from_millis(1)), 0)
                        .expect("set");
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    while d.get(b"x").expect("get").is_some() {
                        assert!(std::time::Instant::now() < deadline, "x never expired");
                        std::thread::yield_now();
                    }
                }),
                Box::new(|d| drop(d.flush_expired(0))),
                None,
            ),
            case(
                "repair",
                set(Value::Int(7)),
                Box::new(|d| drop(d.repair())),
                Some(Value::Int(7)),
            ),
        ];
        for c in &cases {
            let mut crashes = 0;
            for n in 1.. {
                (c.setup)(&d);
                let before = snapshot(&d);
                let finished = crash_after(n, || (c.op)(&d)).is_some();
                if let Err(e) = d.check_consistency() {
                    panic!("{}: crash at store {n}: {e}", c.name);
                }
                let mut after = snapshot(&d);
                let mut before = before;
                let (bx, ax) = (before.remove(x), after.remove(x));
                assert_eq!(
                    before, after,
                    "{}: crash at store {n}: other keys changed",
                    c.name
                );
                assert!(
                    ax == bx || ax == c.done,
                    "{}: crash at store {n}: x is {ax:?}, was {bx:?}, would be {:?}",
                    c.name,
                    c.done
                );
                if finished {
                    assert_eq!(ax, c.done, "{}: finished", c.name);
                    break;
                }
                crashes += 1;
            }
            assert!(crashes > 0, "{}: no store at all?", c.name);
        }
    }

    #[test]
    fn crashes_while_evicting_are_repairable() {
        quiet_simulated_crashes();
        let region = Region::create(1 << 20).expect("region");
        let d = region.dict();
        let mut i = 0u32;
        // Fill with mixed sizes until a safe store fails.
        while d
            .safe_set(
                format!("f{i}").as_bytes(),
                &bytes(i as u8, 30 + (i as usize * 97) % 1500),
                None,
                0,
            )
            .is_ok()
        {
            i += 1;
        }
        assert!(i > 50);
        let big = d.max_value_len(8);
        for n in 1.. {
            let key = format!("big{n}");
            let out = crash_after(n, || d.set(key.as_bytes(), &bytes(9, big), None, 0));
            if let Err(e) = d.check_consistency() {
                panic!("crash at store {n}: {e}");
            }
            if let Some(r) = out {
                // Earlier crashes may have evicted enough already.
                assert!(r.is_ok(), "{r:?}");
                assert!(n > 10, "eviction took only {n} stores");
                break;
            }
        }
        d.check_consistency().expect("consistent");
    }

    #[test]
    fn geometry_fits_the_zone() {
        for size in [1usize << 20, 3 << 20, 64 << 20, 1 << 30] {
            let l = crate::Layout::for_size(size).expect("layout");
            let g = Geo::new(l.dict_off, l.dict_len);
            assert!(g.nbuckets.is_power_of_two() && g.nbuckets >= 16);
            assert!(g.heap_start >= Z_BUCKETS + 4 * g.nbuckets);
            assert!(g.heap_end <= l.dict_len && g.heap_end > g.heap_start);
            let max = size_of_class(g.max_class);
            assert!(max * 8 <= g.heap_end - g.heap_start && max <= 1 << 20);
            assert!(max >= 8192, "{size}: max block {max}");
        }
    }

    #[test]
    fn hash_depends_on_seed_and_every_byte() {
        let k = b"some key of more than eight bytes";
        assert_ne!(hash_key(1, k), hash_key(2, k));
        let mut k2 = *k;
        k2[30] ^= 1;
        assert_ne!(hash_key(1, k), hash_key(1, &k2));
        assert_ne!(hash_key(1, b"a"), hash_key(1, b"a\0"));
    }
}
