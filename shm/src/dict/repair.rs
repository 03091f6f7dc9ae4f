//! Repair after a lock holder died (`EOWNERDEAD`), panicked, or an
//! operation met an impossible value: rebuild everything derived from the
//! chains.
//!
//! The blocks are walked up to the bump pointer (truncating it at the first
//! invalid tag); every chain is walked, keeping items that are valid blocks,
//! well formed, hashed to their bucket and not seen before, and cutting the
//! chain at the first that is not; every other block becomes free
//! (coalesced, free lists rebuilt); the LRU list is rebuilt by sorting the
//! reachable items by stamp; the counters are recomputed. What a killed
//! holder was doing is thus either done or not: a store whose link was not
//! written is lost, an unlinked item is gone, a partial `flush_all` has
//! expired part of the items. Repair never fails and reads every offset
//! through validation, so it is safe to run on any bytes at all; the
//! `needs repair` flag is cleared last, so a repair that is itself
//! interrupted is run again by the next locker.

use std::cmp::Reverse;
use std::sync::atomic::Ordering::{Relaxed, Release};

use super::alloc::Blk;
use super::item::Item;
use super::zone::{
    B_LAST_USED, B_LRU_NEXT, B_NEXT, B_PREV, MIN_BLOCK, NCLASSES, STATE_FREE, STATE_ITEM,
    Z_BUCKETS, Z_BUMP, Z_CLOCK, Z_FREE_HEADS, Z_ITEMS, Z_LRU_HEAD, Z_LRU_TAIL, Z_NEEDS_REPAIR,
    Z_REPAIRS, Z_USED, Zone, size_of_class,
};

impl<'a> Zone<'a> {
    /// The blocks from the heap start, up to `bump` or the first invalid tag;
    /// returns them and where the walk stopped.
    pub(super) fn walk(&self, bump: usize) -> (Vec<Blk>, usize) {
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
    pub(super) fn valid_chain_item(
        &self,
        off: usize,
        blocks: &[Blk],
        bucket: usize,
    ) -> Option<(usize, Item)> {
        let i = blocks.binary_search_by_key(&off, |b| b.off).ok()?;
        let it = self.item(off).ok()?;
        let key = self.read_key(&it);
        let hash = self.hash(&key);
        (hash == it.hash && (hash as usize & (self.g.nbuckets - 1)) == bucket).then_some((i, it))
    }

    /// Rebuilds everything derived from the chains. Infallible: whatever is
    /// in memory, the result satisfies every invariant `verify` checks.
    pub(super) fn repair(&self) {
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
}
