//! Typed views of raw words in the mapping: the one place where a pointer
//! into shared memory becomes a Rust reference.
//!
//! Every word that more than one process touches is read and written as an
//! atomic, and so are record bytes copied in and out (relaxed, a word at a
//! time), so a racing read is never undefined behaviour, only stale. A
//! [`Mem`] is a byte range of the mapping that lives for `'a`; each access
//! checks its bounds and alignment in every build, so no caller needs
//! `unsafe` and no value read from shared memory can send an access outside
//! the range: the worst a wrong offset does is panic.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use memmap2::MmapRaw;

/// A byte range of a live shared mapping, valid for `'a`.
///
/// Not `Send`/`Sync` (it holds a raw pointer), like the views built on it:
/// each thread takes its own from the [`crate::Region`].
#[derive(Clone, Copy)]
pub(crate) struct Mem<'a> {
    base: *mut u8,
    len: usize,
    _mapping: PhantomData<&'a ()>,
}

impl<'a> Mem<'a> {
    /// The whole of `map`, for as long as `map` is borrowed.
    pub(crate) fn of_mapping(map: &'a MmapRaw) -> Mem<'a> {
        // SAFETY: an MmapRaw maps `len()` bytes at `as_mut_ptr()` until it
        // is dropped, which the borrow for 'a prevents. The mapping is
        // MAP_SHARED, written by other processes: Mem only ever accesses it
        // through atomics, so no Rust reference assumes it is unchanging.
        unsafe { Mem::from_raw(map.as_mut_ptr(), map.len()) }
    }

    /// # Safety
    /// `base..base + len` must stay mapped (readable and writable) for `'a`
    /// and be accessed by every thread and process only through atomics.
    unsafe fn from_raw(base: *mut u8, len: usize) -> Mem<'a> {
        Mem {
            base,
            len,
            _mapping: PhantomData,
        }
    }

    /// The `len` bytes at `off`.
    pub(crate) fn sub(self, off: usize, len: usize) -> Mem<'a> {
        self.check(off, len);
        // SAFETY: off..off + len lies inside this range (checked), which
        // satisfies from_raw's contract for 'a.
        unsafe { Mem::from_raw(self.base.add(off), len) }
    }

    /// Start of the range, for a pthread object living there
    /// ([`crate::robust`]), which only libc dereferences.
    pub(crate) fn as_ptr(self) -> *mut u8 {
        self.base
    }

    /// Panics unless `off..off + len` lies inside the range.
    fn check(self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "shared memory access at {off}+{len} outside a range of {}",
            self.len
        );
    }

    /// Panics unless a `T` at `off` is inside the range and aligned.
    fn check_word<T>(self, off: usize) {
        self.check(off, size_of::<T>());
        assert!(
            (self.base as usize + off).is_multiple_of(align_of::<T>()),
            "shared memory word at {off} misaligned"
        );
    }

    /// The atomic `u64` at `off` (8-byte aligned).
    pub(crate) fn u64(self, off: usize) -> &'a AtomicU64 {
        self.check_word::<AtomicU64>(off);
        // SAFETY: in bounds and aligned (checked); the range is mapped for
        // 'a; AtomicU64 has the layout of u64 and any bit pattern is valid.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    /// The atomic `u32` at `off` (4-byte aligned).
    pub(crate) fn u32(self, off: usize) -> &'a AtomicU32 {
        self.check_word::<AtomicU32>(off);
        // SAFETY: as in `u64`.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    fn u8(self, off: usize) -> &'a AtomicU8 {
        self.check(off, 1);
        // SAFETY: in bounds (checked); AtomicU8 has the layout of u8.
        unsafe { &*self.base.add(off).cast::<AtomicU8>() }
    }

    /// Replaces `out` with the `len` bytes at `off`, which another process
    /// may be rewriting: relaxed atomic loads (a word at a time where
    /// aligned), so a racing write makes the copy stale, never undefined.
    /// The caller orders and validates the copy (the seqlock in
    /// `crate::seqlock`, or the dictionary's lock).
    pub(crate) fn copy_out(self, off: usize, len: usize, out: &mut Vec<u8>) {
        self.check(off, len);
        let head = (self.base as usize + off).next_multiple_of(8) - (self.base as usize + off);
        let head = head.min(len);
        let words = (len - head) / 8;
        out.clear();
        out.reserve(len);
        for i in 0..head {
            out.push(self.u8(off + i).load(Ordering::Relaxed));
        }
        for w in 0..words {
            let v = self.u64(off + head + w * 8).load(Ordering::Relaxed);
            out.extend_from_slice(&v.to_ne_bytes());
        }
        for i in head + words * 8..len {
            out.push(self.u8(off + i).load(Ordering::Relaxed));
        }
    }

    /// Copies `bytes` to `off`, where a stale reader may still be copying
    /// (a freed record reused): relaxed atomic stores, a word at a time where
    /// aligned. The caller orders them (the seqlock in `crate::seqlock`).
    pub(crate) fn copy_in(self, off: usize, bytes: &[u8]) {
        self.check(off, bytes.len());
        let len = bytes.len();
        let head = (self.base as usize + off).next_multiple_of(8) - (self.base as usize + off);
        let head = head.min(len);
        let words = (len - head) / 8;
        for (i, b) in bytes[..head].iter().enumerate() {
            self.u8(off + i).store(*b, Ordering::Relaxed);
        }
        for (w, chunk) in bytes[head..head + words * 8].chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.u64(off + head + w * 8)
                .store(u64::from_ne_bytes(word), Ordering::Relaxed);
        }
        for (i, b) in bytes.iter().enumerate().skip(head + words * 8) {
            self.u8(off + i).store(*b, Ordering::Relaxed);
        }
    }

    /// Whether the `bytes.len()` bytes at `off` equal `bytes` (relaxed
    /// loads, as [`Mem::copy_out`]).
    pub(crate) fn bytes_eq(self, off: usize, bytes: &[u8]) -> bool {
        self.check(off, bytes.len());
        bytes
            .iter()
            .enumerate()
            .all(|(i, b)| self.u8(off + i).load(Ordering::Relaxed) == *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_at_every_alignment_and_length() {
        let mut mem = vec![0u64; 8];
        // SAFETY: `mem` outlives `m` and is only accessed through it.
        let m = unsafe { Mem::from_raw(mem.as_mut_ptr().cast::<u8>(), 64) };
        let mut out = vec![9u8; 3];
        for start in 0..9 {
            for len in 0..=40 {
                let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + start + 1) as u8).collect();
                m.copy_in(start, &bytes);
                m.copy_out(start, len, &mut out);
                assert_eq!(out, bytes, "start {start} len {len}");
                assert!(m.bytes_eq(start, &bytes));
                if len > 0 {
                    let mut other = bytes.clone();
                    other[len - 1] ^= 1;
                    assert!(!m.bytes_eq(start, &other));
                }
            }
        }
    }

    #[test]
    fn accesses_outside_the_range_or_misaligned_panic() {
        let mut mem = vec![0u64; 2];
        // SAFETY: as above.
        let m = unsafe { Mem::from_raw(mem.as_mut_ptr().cast::<u8>(), 16) };
        let sub = m.sub(8, 8);
        sub.u64(0).store(7, Ordering::Relaxed);
        assert_eq!(m.u64(8).load(Ordering::Relaxed), 7);
        for f in [
            Box::new(move || _ = m.u64(16)) as Box<dyn Fn()>,
            Box::new(move || _ = m.u64(4)),
            Box::new(move || _ = m.u32(2)),
            Box::new(move || _ = sub.u32(8)),
            Box::new(move || _ = m.sub(8, 9)),
            Box::new(move || m.copy_in(15, &[1, 2])),
            Box::new(move || _ = m.bytes_eq(usize::MAX, &[1])),
        ] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            assert!(r.is_err());
        }
        drop(mem);
    }
}
