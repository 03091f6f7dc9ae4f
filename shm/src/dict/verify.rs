//! Every invariant of the zone checked at once, for tests
//! ([`super::Dict::check_consistency`]): what repair must establish and
//! every operation must keep.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;

use super::zone::{
    B_LAST_USED, B_LRU_NEXT, B_NEXT, B_PREV, MIN_BLOCK, NCLASSES, STATE_FREE, Z_BUCKETS, Z_BUMP,
    Z_CLOCK, Z_ITEMS, Z_LRU_HEAD, Z_LRU_TAIL, Z_NEEDS_REPAIR, Z_USED, Zone, size_of_class,
};

impl<'a> Zone<'a> {
    /// Checks every invariant; a description of the first broken one.
    pub(super) fn verify(&self) -> Result<(), String> {
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
