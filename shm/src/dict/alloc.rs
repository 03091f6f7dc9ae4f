//! The allocator: power-of-two blocks carved from a bump pointer, buddies
//! merged eagerly, one doubly linked free list per size class.
//!
//! Every block starts with a tag `{magic, state, size class}` and lies at a
//! multiple of its size from the heap start, so a walk from the heap start
//! to the bump pointer, block by block, always finds valid tags: that walk
//! is what repair trusts. To keep it so, each change of the tiling is
//! ordered tag first, commit second: carving writes the new block's tag and
//! then moves the bump pointer; splitting writes the upper half's tag and
//! then the lower half's; merging rewrites the lower buddy's tag (one
//! store). Free lists are derived data (repair rebuilds them), so their
//! links may be left half-updated by a crash.

use std::sync::atomic::Ordering::{Relaxed, Release};

use super::zone::{
    B_NEXT, B_PREV, B_TAG, E, MIN_BLOCK, STATE_FREE, STATE_ITEM, TAG_MAGIC, W64, Z_BUMP,
    Z_FREE_HEADS, Zone, make_tag, size_of_class,
};

/// A walked block.
#[derive(Debug, Clone, Copy)]
pub(super) struct Blk {
    pub(super) off: usize,
    pub(super) class: u32,
    pub(super) state: u32,
}

impl<'a> Zone<'a> {
    /// The head of the free list of `class`.
    pub(super) fn free_head(&self, class: u32) -> W64<'a> {
        self.w64(Z_FREE_HEADS + 8 * class as usize)
    }

    /// The block at `off`, validated: a carved, aligned block whose tag is
    /// well formed. Does not check that `off` is a block start of the
    /// current tiling (only a walk can); callers rely on the invariants for
    /// that, and repair on the walk.
    pub(super) fn block(&self, off: usize, bump: usize) -> Result<Blk, E> {
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
    pub(super) fn try_alloc(&self, class: u32) -> Result<Option<usize>, E> {
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
    pub(super) fn free_block(&self, off: usize, class: u32) -> Result<(), E> {
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
}
