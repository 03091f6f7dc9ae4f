//! Where each zone of the region lies, computed from its size and the size
//! of its dictionary (which the region's header records), so the master and
//! every worker derive the same layout without storing offsets.

/// Workers a region has slots for (`--workers` is capped at this).
pub const MAX_WORKERS: usize = 256;

const HEADER_SIZE: usize = 4096;
/// Bytes of one worker slot (two cache lines).
pub(crate) const SLOT_SIZE: usize = 128;
/// Bytes of one configuration directory entry: generation + packed offset/len.
pub(crate) const DIR_ENTRY_SIZE: usize = 16;
/// Bytes of one change-log entry: generation + directory index.
pub(crate) const LOG_ENTRY_SIZE: usize = 16;
/// Bytes of one peer-state record.
pub(crate) const PEER_SIZE: usize = 64;
/// Smallest region accepted.
pub const MIN_SIZE: usize = 1 << 20;
/// Largest region accepted: offsets in the directory are 32-bit.
pub const MAX_SIZE: usize = u32::MAX as usize;
/// Smallest dictionary zone.
pub const MIN_DICT: usize = 64 << 10;

/// Byte ranges of the zones of a region of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub size: usize,
    pub slots_off: usize,
    pub peers_off: usize,
    pub peers_count: usize,
    pub dir_off: usize,
    pub dir_count: usize,
    pub log_off: usize,
    pub log_count: usize,
    pub dict_off: usize,
    pub dict_len: usize,
    pub counters_off: usize,
    pub counters_len: usize,
    pub arena_off: usize,
    pub arena_len: usize,
}

impl Layout {
    /// The layout of a region of `size` bytes (`MIN_SIZE..=MAX_SIZE`) whose
    /// dictionary takes an eighth of it.
    pub fn for_size(size: usize) -> Option<Layout> {
        Layout::new(size, (size / 8) & !4095)
    }

    /// The layout of a region of `size` bytes whose dictionary takes
    /// `dict_len` (from [`MIN_DICT`] to half the region, in whole pages);
    /// every other zone is in proportion to the rest.
    pub fn new(size: usize, dict_len: usize) -> Option<Layout> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&size)
            || !(MIN_DICT..=size / 2).contains(&dict_len)
            || !dict_len.is_multiple_of(4096)
        {
            return None;
        }
        let base = size - dict_len;
        let slots_off = HEADER_SIZE;
        let peers_off = slots_off + MAX_WORKERS * SLOT_SIZE;
        // One state slot per 512 bytes and one directory entry per KiB of
        // region outside the dictionary: 64 MiB hold 128k peers plus
        // upstreams, and 64k domains plus upstreams.
        let peers_count = base / 512;
        let dir_off = align(peers_off + peers_count * PEER_SIZE, 64);
        let dir_count = base / 1024;
        let log_off = align(dir_off + dir_count * DIR_ENTRY_SIZE, 64);
        let log_count = (base / 1024).next_power_of_two().min(1 << 16);
        let dict_off = align(log_off + log_count * LOG_ENTRY_SIZE, 4096);
        // Per-worker request counters (`counters.rs`): one eighth, 8 MiB
        // of 64 MiB, 64k entries: two workers count 10,000 domains, 10,000
        // peers and their upstreams.
        let counters_off = align(dict_off + dict_len, 4096);
        let counters_len = base / 8;
        let arena_off = align(counters_off + counters_len, 4096);
        let arena_len = size.checked_sub(arena_off)?;
        Some(Layout {
            size,
            slots_off,
            peers_off,
            peers_count,
            dir_off,
            dir_count,
            log_off,
            log_count,
            dict_off,
            dict_len,
            counters_off,
            counters_len,
            arena_off,
            arena_len,
        })
    }
}

fn align(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_do_not_overlap_and_fit() {
        for size in [MIN_SIZE, 64 << 20, 1 << 30] {
            let l = Layout::for_size(size).expect("valid size");
            assert!(l.peers_off >= l.slots_off + MAX_WORKERS * SLOT_SIZE);
            assert!(l.dir_off >= l.peers_off + l.peers_count * PEER_SIZE);
            assert!(l.log_off >= l.dir_off + l.dir_count * DIR_ENTRY_SIZE);
            assert!(l.dict_off >= l.log_off + l.log_count * LOG_ENTRY_SIZE);
            assert!(l.counters_off >= l.dict_off + l.dict_len);
            assert!(l.arena_off >= l.counters_off + l.counters_len);
            assert_eq!(l.arena_off + l.arena_len, size);
            assert!(l.arena_len > size / 2, "arena gets most of the region");
        }
        assert!(Layout::for_size(MIN_SIZE - 1).is_none());
        // A dictionary of its own size, beside zones sized by the rest.
        let l = Layout::new(80 << 20, 16 << 20).expect("valid");
        assert_eq!(l.dict_len, 16 << 20);
        assert_eq!(l.counters_len, 8 << 20);
        assert!(l.arena_off >= l.counters_off + l.counters_len);
        assert!(Layout::new(80 << 20, 41 << 20).is_none(), "more than half");
        assert!(
            Layout::new(80 << 20, (64 << 10) + 1).is_none(),
            "not whole pages"
        );
        assert!(Layout::new(80 << 20, 32 << 10).is_none(), "under 64k");
    }
}
