//! The index: a hash table of bucket heads (`u32` item offsets), each a
//! chain linked through the items.
//!
//! The chains are the dictionary's only source of truth: repair rebuilds
//! everything else from what they reach. So an item is written whole into a
//! block nobody can reach, and one release store links it in (replacing an
//! old item of the same key is that same single store); unlinking is one
//! store. An item reachable from a bucket is therefore always whole. The
//! hash is seeded per region so that keys chosen by clients cannot be made
//! to collide.

use std::sync::atomic::Ordering::{Relaxed, Release};

use super::item::Item;
use super::zone::{B_NEXT, E, ITEM_HDR, Z_BUCKETS, Z_SEED, Zone};

pub(super) fn hash_key(seed: u64, key: &[u8]) -> u32 {
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

/// An item found by key, and the zone offset of the u32 that links it.
pub(super) struct Found {
    pub(super) item: Item,
    pub(super) link: usize,
}

impl<'a> Zone<'a> {
    pub(super) fn hash(&self, key: &[u8]) -> u32 {
        hash_key(self.w64(Z_SEED).load(Relaxed), key)
    }

    pub(super) fn bucket_slot(&self, hash: u32) -> usize {
        Z_BUCKETS + 4 * (hash as usize & (self.g.nbuckets - 1))
    }

    pub(super) fn find(&self, key: &[u8], hash: u32) -> Result<Option<Found>, E> {
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
    pub(super) fn chain_unlink(&self, it: &Item) -> Result<(), E> {
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
}
