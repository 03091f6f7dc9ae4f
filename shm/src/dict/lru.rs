//! The LRU list: doubly linked through the items, most recent first, each
//! item stamped with `last_used` from a counter in the header.
//!
//! The list is kept in strictly decreasing stamp order, so repair can
//! rebuild it by sorting the reachable items by stamp whatever state a crash
//! left the links in. `get`, `get_stale` (of a live item), `incr` and every
//! store move the item to the head, as nginx does.

use std::sync::atomic::Ordering::Relaxed;

use super::alloc::Blk;
use super::zone::{
    B_LAST_USED, B_LRU_NEXT, B_PREV, E, STATE_ITEM, Z_CLOCK, Z_LRU_HEAD, Z_LRU_TAIL, Zone,
};

impl<'a> Zone<'a> {
    /// An item block (for LRU neighbours), validated.
    fn item_blk(&self, off: usize) -> Result<usize, E> {
        match self.block(off, self.bump())? {
            Blk {
                state: STATE_ITEM, ..
            } => Ok(off),
            _ => Err(E::Corrupt("LRU link to a non-item")),
        }
    }

    pub(super) fn lru_unlink(&self, off: usize) -> Result<(), E> {
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

    pub(super) fn lru_push_head(&self, off: usize) -> Result<(), E> {
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

    pub(super) fn lru_touch(&self, off: usize) -> Result<(), E> {
        if self.w64(Z_LRU_HEAD).load(Relaxed) as usize == off {
            let stamp = self.w64(Z_CLOCK).fetch_add(1, Relaxed);
            self.blk64(off, B_LAST_USED).store(stamp, Relaxed);
            return Ok(());
        }
        self.lru_unlink(off)?;
        self.lru_push_head(off)
    }
}
