//! The zone's format and raw access to it: every offset of the header and
//! of a block, the geometry derived from the zone's size, and [`Zone`],
//! through which every other part of the dictionary reads and writes.
//!
//! The format is a pure function of the zone's size (no offsets are stored),
//! so every process derives the same [`Geo`]; changing any constant here
//! changes the region's layout. Offsets inside the zone are `u32` (the zone
//! is capped at 4 GiB) and 0 means "none" (the header is at 0, so no block
//! starts there). Every store goes through [`W64`]/[`W32`], which pass
//! [`crash_point`]: the unit tests stop an operation after any number of
//! stores to prove that each store leaves a repairable zone.

use std::sync::atomic::Ordering::{self, Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::atomic_mem::Mem;
use crate::robust::{MUTEX_ALIGN, MUTEX_SIZE};

use super::DictError;

// The header, at offsets from the zone start (the robust mutex is at 0).

pub(super) const Z_MAGIC: usize = 64;
pub(super) const Z_BUMP: usize = 72;
pub(super) const Z_LRU_HEAD: usize = 80;
pub(super) const Z_LRU_TAIL: usize = 88;
pub(super) const Z_CLOCK: usize = 96;
pub(super) const Z_ITEMS: usize = 104;
pub(super) const Z_USED: usize = 112;
pub(super) const Z_SEED: usize = 120;
pub(super) const Z_NEEDS_REPAIR: usize = 128;
pub(super) const Z_REPAIRS: usize = 136;
/// One u64 free-list head per size class.
pub(super) const Z_FREE_HEADS: usize = 192;
/// Size classes: 64 B << 0 ..= 64 B << 14 (1 MiB).
pub(super) const NCLASSES: usize = 15;
/// The bucket array (u32 item offsets).
pub(super) const Z_BUCKETS: usize = Z_FREE_HEADS + 8 * NCLASSES;

const _: () = assert!(MUTEX_SIZE <= Z_MAGIC && MUTEX_ALIGN <= 64);

pub(super) const DICT_MAGIC: u64 = u64::from_le_bytes(*b"ELBDICT1");

// A block, at offsets from the block start. Items and free blocks share
// the tag and the first two links.

pub(super) const MIN_BLOCK: usize = 64;
/// u32 tag: `TAG_MAGIC | state << 8 | class`.
pub(super) const B_TAG: usize = 0;
/// u32: next item of the bucket chain, or next free block of the class.
pub(super) const B_NEXT: usize = 4;
/// u32: previous item of the LRU list, or previous free block of the class.
pub(super) const B_PREV: usize = 8;
/// u32: next item of the LRU list (towards the tail).
pub(super) const B_LRU_NEXT: usize = 12;
/// u64: LRU stamp.
pub(super) const B_LAST_USED: usize = 16;
/// u64: expiry, absolute monotonic milliseconds, 0 = never.
pub(super) const B_EXPIRES: usize = 24;
pub(super) const B_HASH: usize = 32;
pub(super) const B_FLAGS: usize = 36;
pub(super) const B_VALUE_LEN: usize = 40;
/// u32: key length | value type << 24.
pub(super) const B_KEY: usize = 44;
/// Key bytes start here; the value follows at the next multiple of 8.
pub(super) const ITEM_HDR: usize = 48;

pub(super) const TAG_MAGIC: u32 = 0xD1C7_0000;
pub(super) const STATE_FREE: u32 = 1;
pub(super) const STATE_ITEM: u32 = 2;

// Value types (the top byte of `B_KEY`).
pub(super) const T_BYTES: u32 = 1;
pub(super) const T_INT: u32 = 2;
pub(super) const T_FLOAT: u32 = 3;
pub(super) const T_BOOL: u32 = 4;

/// Internal error: a user-visible one, or an inconsistency found in memory.
#[derive(Debug)]
pub(super) enum E {
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
pub(super) struct Geo {
    /// Offset of the zone in the mapping.
    pub(super) off: usize,
    pub(super) len: usize,
    pub(super) nbuckets: usize,
    pub(super) heap_start: usize,
    pub(super) heap_end: usize,
    pub(super) max_class: u32,
}

impl Geo {
    pub(super) fn new(off: usize, len: usize) -> Geo {
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
    pub(super) fn max_blocks(&self) -> usize {
        (self.heap_end - self.heap_start) / MIN_BLOCK + 1
    }
}

pub(super) fn size_of_class(class: u32) -> usize {
    MIN_BLOCK << class
}

pub(super) fn make_tag(state: u32, class: u32) -> u32 {
    TAG_MAGIC | (state << 8) | class
}

fn prev_pow2(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// A shared u64. Every store goes through [`crash_point`], so that tests
/// can stop an operation after any number of stores.
#[derive(Clone, Copy)]
pub(super) struct W64<'a>(pub(super) &'a AtomicU64);

impl W64<'_> {
    pub(super) fn load(self, o: Ordering) -> u64 {
        self.0.load(o)
    }
    pub(super) fn store(self, v: u64, o: Ordering) {
        crash_point();
        self.0.store(v, o);
    }
    pub(super) fn fetch_add(self, v: u64, o: Ordering) -> u64 {
        crash_point();
        self.0.fetch_add(v, o)
    }
    pub(super) fn fetch_sub(self, v: u64, o: Ordering) -> u64 {
        crash_point();
        self.0.fetch_sub(v, o)
    }
}

/// A shared u32, as [`W64`].
#[derive(Clone, Copy)]
pub(super) struct W32<'a>(pub(super) &'a AtomicU32);

impl W32<'_> {
    pub(super) fn load(self, o: Ordering) -> u32 {
        self.0.load(o)
    }
    pub(super) fn store(self, v: u32, o: Ordering) {
        crash_point();
        self.0.store(v, o);
    }
}

#[cfg(not(test))]
#[inline(always)]
pub(super) fn crash_point() {}

/// A simulated SIGKILL: the panic payload of [`crash_point`].
#[cfg(test)]
pub(super) struct SimulatedCrash;

#[cfg(test)]
thread_local! {
    /// Stores left before a simulated crash; 0 = never.
    pub(super) static CRASH_AFTER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
pub(super) fn crash_point() {
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
pub(super) struct Zone<'a> {
    /// The dictionary zone; every access is bounds-checked by [`Mem`].
    pub(super) mem: Mem<'a>,
    pub(super) g: Geo,
}

impl<'a> Zone<'a> {
    pub(super) fn w64(&self, off: usize) -> W64<'a> {
        W64(self.mem.u64(off))
    }

    pub(super) fn w32(&self, off: usize) -> W32<'a> {
        W32(self.mem.u32(off))
    }

    pub(super) fn blk32(&self, blk: usize, field: usize) -> W32<'a> {
        self.w32(blk + field)
    }

    pub(super) fn blk64(&self, blk: usize, field: usize) -> W64<'a> {
        self.w64(blk + field)
    }

    pub(super) fn ptr32(&self, blk: usize, field: usize) -> usize {
        self.blk32(blk, field).load(Relaxed) as usize
    }

    pub(super) fn set_ptr32(&self, blk: usize, field: usize, v: usize) {
        self.blk32(blk, field).store(v as u32, Relaxed);
    }

    pub(super) fn set_tag(&self, blk: usize, state: u32, class: u32) {
        self.blk32(blk, B_TAG)
            .store(make_tag(state, class), Release);
    }

    pub(super) fn read_bytes(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        self.mem.copy_out(off, len, &mut v);
        v
    }

    pub(super) fn write_bytes(&self, off: usize, bytes: &[u8]) {
        crash_point();
        self.mem.copy_in(off, bytes);
    }

    pub(super) fn bytes_eq(&self, off: usize, key: &[u8]) -> bool {
        self.mem.bytes_eq(off, key)
    }

    /// The bump pointer, never past the heap end (whatever is in memory).
    pub(super) fn bump(&self) -> usize {
        (self.w64(Z_BUMP).load(Relaxed) as usize).min(self.g.heap_end)
    }
}
