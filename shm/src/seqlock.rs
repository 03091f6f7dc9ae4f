//! The configuration store's per-entry seqlock, generic over its atomics so
//! that the region (std atomics over shared memory) and the loom model
//! (`loom` atomics, in this file's tests) run this one implementation.
//!
//! An entry is two words: a generation, which never repeats, and a value
//! (a directory entry's packed `offset|len` into the arena, or a log slot's
//! entry index). The writer marks the entry [`BUSY`] before it changes the
//! value, so a reader that sees a value from a rewrite in progress also sees
//! the generation change when it re-checks, and drops what it read. The
//! generation alone cannot play that part: between the value's store and the
//! generation's, a reader would pair the new value with the old generation.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, Ordering};

/// The generation of an entry being rewritten. Real generations count up
/// from 1 and never reach it.
pub(crate) const BUSY: u64 = u64::MAX;

/// A 64-bit atomic word and the fences of the same memory model.
pub(crate) trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn fence(order: Ordering);
}

impl Word for AtomicU64 {
    #[inline]
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    #[inline]
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }
    #[inline]
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order)
    }
}

/// Record bytes, which readers may copy while the writer reuses them. Both
/// copies are relaxed; the ordering is this module's business.
pub(crate) trait Arena {
    type Word: Word;
    fn len(&self) -> usize;
    /// Replaces `out` with the `len` bytes at `off` (in bounds).
    fn copy_out(&self, off: usize, len: usize, out: &mut Vec<u8>);
    /// Writes `bytes` at `off` (in bounds).
    fn copy_in(&self, off: usize, bytes: &[u8]);
}

/// One seqlocked entry: its generation and its value.
pub(crate) struct Entry<'a, W> {
    pub generation: &'a W,
    pub value: &'a W,
}

/// Writer: gives the entry `value` at `generation` (> every earlier one).
pub(crate) fn commit<W: Word>(e: &Entry<'_, W>, value: u64, generation: u64) {
    e.generation.store(BUSY, Relaxed);
    // Orders the mark before the value: a reader that loads the new value
    // and then fences (acquire) loads BUSY or later when it re-checks.
    W::fence(Release);
    e.value.store(value, Relaxed);
    e.generation.store(generation, Release);
}

/// Reader: the entry's generation and value, if it was not being rewritten.
pub(crate) fn read<W: Word>(e: &Entry<'_, W>) -> Option<(u64, u64)> {
    let g1 = e.generation.load(Acquire);
    if g1 == BUSY {
        return None;
    }
    let value = e.value.load(Relaxed);
    W::fence(Acquire);
    (e.generation.load(Relaxed) == g1).then_some((g1, value))
}

/// Writer: puts a record's bytes at `off`, in space no entry of a published
/// generation points to. The space may be a record freed after its entry
/// changed, which a late reader may still be copying.
pub(crate) fn write_record<A: Arena>(arena: &A, off: usize, bytes: &[u8]) {
    // Orders that entry's change (made before the record was freed) before
    // these bytes: a reader that copies any of them sees the change when it
    // re-checks its entry's generation.
    A::Word::fence(Release);
    arena.copy_in(off, bytes);
}

pub(crate) fn pack(off: u32, len: u32) -> u64 {
    (u64::from(off) << 32) | u64::from(len)
}

pub(crate) fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
}

/// Reader: copies the record an `offset|len` entry points to into `buf`
/// (cleared for a free entry). Returns the generation and whether the entry
/// is live, or `None` if the entry was being rewritten, or was rewritten
/// while the bytes were copied.
pub(crate) fn read_record<A: Arena>(
    e: &Entry<'_, A::Word>,
    arena: &A,
    buf: &mut Vec<u8>,
) -> Option<(u64, bool)> {
    let g1 = e.generation.load(Acquire);
    if g1 == BUSY {
        return None;
    }
    let (off, len) = unpack(e.value.load(Relaxed));
    if len == 0 {
        buf.clear();
    } else {
        // Only a racing rewrite can pair an offset with another record's
        // length: never copy outside the arena; the re-check drops it.
        if off.checked_add(len).is_none_or(|end| end > arena.len()) {
            return None;
        }
        arena.copy_out(off, len, buf);
    }
    A::Word::fence(Acquire);
    (e.generation.load(Relaxed) == g1).then_some((g1, len != 0))
}

#[cfg(test)]
mod loom_model {
    //! One writer rewriting one entry twice, the second time into the bytes
    //! of the record the first rewrite freed; one reader. Every execution
    //! loom can schedule (within the preemption bound) is checked.

    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU8, AtomicU64 as LoomU64};

    impl Word for LoomU64 {
        fn load(&self, order: Ordering) -> u64 {
            LoomU64::load(self, order)
        }
        fn store(&self, value: u64, order: Ordering) {
            LoomU64::store(self, value, order)
        }
        fn fence(order: Ordering) {
            loom::sync::atomic::fence(order)
        }
    }

    /// Two records of two bytes each; a record written at generation `g` is
    /// `[g, g]`.
    struct Bytes([AtomicU8; 4]);

    impl Arena for Bytes {
        type Word = LoomU64;
        fn len(&self) -> usize {
            self.0.len()
        }
        fn copy_out(&self, off: usize, len: usize, out: &mut Vec<u8>) {
            out.clear();
            out.extend(self.0[off..off + len].iter().map(|b| b.load(Relaxed)));
        }
        fn copy_in(&self, off: usize, bytes: &[u8]) {
            for (b, v) in self.0[off..].iter().zip(bytes) {
                b.store(*v, Relaxed);
            }
        }
    }

    struct Shared {
        generation: LoomU64,
        loc: LoomU64,
        arena: Bytes,
    }

    impl Shared {
        fn entry(&self) -> Entry<'_, LoomU64> {
            Entry {
                generation: &self.generation,
                value: &self.loc,
            }
        }
    }

    #[test]
    fn a_reader_accepts_only_what_was_written_together() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(4);
        model.check(|| {
            // Generation 1: record [1, 1] at offset 0, written before the
            // reader exists.
            let shared = Arc::new(Shared {
                generation: LoomU64::new(1),
                loc: LoomU64::new(pack(0, 2)),
                arena: Bytes([1, 1, 0, 0].map(AtomicU8::new)),
            });
            let written = [(1, pack(0, 2)), (2, pack(2, 2)), (3, pack(0, 2))];
            let writer = {
                let s = Arc::clone(&shared);
                loom::thread::spawn(move || {
                    // Generation 2 into fresh bytes; then offset 0 is freed
                    // and generation 3 reuses it.
                    for (g, loc) in &written[1..] {
                        let (off, len) = unpack(*loc);
                        write_record(&s.arena, off, &vec![*g as u8; len]);
                        commit(&s.entry(), *loc, *g);
                    }
                })
            };
            let mut buf = Vec::new();
            if let Some((g, live)) = read_record(&shared.entry(), &shared.arena, &mut buf) {
                assert!(live);
                assert_eq!(buf, [g as u8; 2], "record bytes of generation {g}");
            }
            if let Some((g, loc)) = read(&shared.entry()) {
                assert!(
                    written.contains(&(g, loc)),
                    "generation {g} paired with location {loc:#x}"
                );
            }
            writer.join().expect("writer");
        });
    }
}
