//! A dictionary with the surface of nginx's `lua_shared_dict`
//! (`ngx.shared.DICT`), shared by every process that maps the region.
//!
//! This file is the public API ([`Dict`]); the zone behind it is split by
//! what each part owns:
//!
//! | module | owns |
//! |---|---|
//! | `zone` | the format: header and block offsets, geometry, raw word access |
//! | `lock` | the robust mutex; the one way into the zone, repairing first if needed |
//! | `alloc` | power-of-two blocks, buddy merging, free lists, the bump pointer |
//! | `index` | the hash buckets and their chains: what is stored |
//! | `lru` | the recency list and stamps |
//! | `item` | an item's layout, validated reads, store and remove |
//! | `evict` | expired-first removal and eviction when memory is short |
//! | `expiry` | the clock |
//! | `repair` | rebuilding everything derived from the chains |
//! | `verify` | checking every invariant (tests) |
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
//! the chains of the index are the truth, each change to them is one store
//! of a whole item, and everything else (free lists, LRU, counters) can be
//! derived again; each module says how it keeps its part of that.
//!
//! When memory is short, the old item of the key being stored is removed
//! before eviction starts (as nginx does), so an operation that then fails
//! with `NoMemory` has removed it.
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

mod alloc;
mod evict;
mod expiry;
mod index;
mod item;
mod lock;
mod lru;
mod repair;
#[cfg(test)]
mod tests;
mod verify;
mod zone;

use std::sync::atomic::Ordering::{Relaxed, Release};
use std::time::Duration;

use nix::errno::Errno;

use crate::region::Region;

use self::expiry::{expiry, is_expired, now_ms};
use self::item::Enc;
use self::zone::{
    B_EXPIRES, DICT_MAGIC, E, Geo, ITEM_HDR, MIN_BLOCK, T_INT, Z_BUMP, Z_CLOCK, Z_LRU_HEAD,
    Z_LRU_TAIL, Z_MAGIC, Z_REPAIRS, Z_SEED, Z_USED, Zone,
};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 65535;

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

/// What [`Dict::check_consistency`] found wrong.
#[derive(Debug, thiserror::Error)]
pub enum Inconsistency {
    #[error("cannot lock: {0}")]
    Lock(DictError),
    /// The first broken invariant, described.
    #[error("{0}")]
    Broken(String),
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
    if lock::init_mutex(&z).is_err() {
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
            let out = store_int(z, key, hash, class, new, expiry(now, init_ttl), now)?;
            Ok((new, out))
        })
    }

    /// Reads the integer under `key` and stores what `f` makes of it, in
    /// one hold of the lock, so that updates from every process apply one
    /// after the other (a rate limiter's bucket). `f` gets the value (`None`
    /// when absent, expired or not an integer) and the time now, in
    /// `CLOCK_MONOTONIC` milliseconds; it returns what to store, with its
    /// expiry, or `None` to leave the key as it is (it still counts as
    /// used, for the LRU), and an answer for the caller. Storing evicts the least recently used items when memory is
    /// short, as [`Dict::set`] does (reported in the outcome). `f` runs with
    /// the lock held: it must be quick and must not panic.
    pub fn update_int<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<i64>, u64) -> (Option<(i64, Option<Duration>)>, R),
    ) -> Result<(R, SetOutcome), DictError> {
        check_key(key)?;
        let class = self.class_for(key.len(), 8)?;
        self.with(|z| {
            let now = now_ms();
            let hash = z.hash(key);
            let found = z
                .find(key, hash)?
                .filter(|f| !is_expired(f.item.expires, now) && f.item.vtype == T_INT);
            let current = found
                .as_ref()
                .map(|f| z.w64(f.item.value_off()).load(Relaxed) as i64);
            let (store, answer) = f(current, now);
            let Some((new, ttl)) = store else {
                // Read, it was used: as nginx's limit_req, a bucket that
                // refuses requests is a busy one, not one to evict.
                if let Some(f) = found {
                    z.lru_touch(f.item.off)?;
                }
                return Ok((answer, SetOutcome::default()));
            };
            if let Some(f) = found {
                z.w64(f.item.value_off()).store(new as u64, Release);
                z.blk64(f.item.off, B_EXPIRES)
                    .store(expiry(now, ttl), Release);
                z.lru_touch(f.item.off)?;
                return Ok((answer, SetOutcome::default()));
            }
            let out = store_int(z, key, hash, class, new, expiry(now, ttl), now)?;
            Ok((answer, out))
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
    pub fn check_consistency(&self) -> Result<(), Inconsistency> {
        match self.with(|z| Ok(z.verify())) {
            Ok(r) => r.map_err(Inconsistency::Broken),
            Err(e) => Err(Inconsistency::Lock(e)),
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
            mem: self.region.mem().sub(self.geo.off, self.geo.len),
            g: self.geo,
        }
    }
}

/// Stores a new integer item (`set`, evicting if need be).
fn store_int(
    z: &Zone<'_>,
    key: &[u8],
    hash: u32,
    class: u32,
    n: i64,
    expires: u64,
    now: u64,
) -> Result<SetOutcome, E> {
    let value = Value::Int(n);
    z.store(
        key,
        hash,
        &Enc::new(&value),
        class,
        expires,
        0,
        Mode::Set,
        false,
        now,
    )
}

fn check_key(key: &[u8]) -> Result<(), DictError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(DictError::TooLarge);
    }
    Ok(())
}
