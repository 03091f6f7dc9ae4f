//! Eviction, as nginx does it: each store first removes up to two expired
//! items from the LRU tail; when no block of the needed class can be found,
//! expired items among the last 64 of the LRU are removed; then `set`,
//! `add`, `replace` and `incr` (not the `safe_*` variants) evict from the
//! tail, the first 30 strictly in LRU order and after that the least
//! recently used item whose block is at least as big as the one needed
//! (which makes the allocation succeed), reporting `forcible` if any
//! evicted item had not expired.
//!
//! Every loop is bounded by the number of blocks: a cycle left in the LRU
//! links by garbage ends as corruption (and a repair), never as a hang
//! while holding the lock.

use std::sync::atomic::Ordering::Relaxed;

use super::DictError;
use super::expiry::is_expired;
use super::zone::{E, Z_LRU_TAIL, Zone};

/// Expired items removed from the LRU tail on every store.
const EXPIRE_ON_STORE: usize = 2;
/// LRU tail items scanned for expired ones when memory is short.
const EXPIRE_SCAN: usize = 64;
/// Items evicted in strict LRU order before targeting big enough ones.
const LRU_EVICT: usize = 30;

impl<'a> Zone<'a> {
    /// What every store does first: remove up to [`EXPIRE_ON_STORE`]
    /// expired items from the LRU tail.
    pub(super) fn expire_on_store(&self, now: u64) -> Result<(), E> {
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
        Ok(())
    }

    /// Allocation once the fast path failed: expired items, then eviction.
    pub(super) fn alloc_slow(
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
}
