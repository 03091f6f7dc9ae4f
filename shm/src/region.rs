//! Creating the region (master) and attaching to it (worker).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::atomic_mem::Mem;
use crate::layout::Layout;

const MAGIC: u64 = u64::from_le_bytes(*b"ELBSHM01");
const OFF_MAGIC: usize = 0;
const OFF_SIZE: usize = 8;
const OFF_GENERATION: usize = 16;
/// The dictionary zone's length: the layout depends on it.
const OFF_DICT_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region size {0} is out of range (1m to 4g)")]
    Size(usize),
    #[error(
        "dictionary zone of {0} bytes does not fit a region of {1} (64k, whole pages, at most half)"
    )]
    DictSize(usize, usize),
    #[error("cannot create the region: {0}")]
    Create(#[source] std::io::Error),
    #[error("cannot map the region: {0}")]
    Map(#[source] std::io::Error),
    #[error("the inherited descriptor is not an ELB region")]
    NotARegion,
}

/// One mapping of the shared region.
pub struct Region {
    file: File,
    map: MmapRaw,
    layout: Layout,
}

impl Region {
    /// Creates a fresh region of `size` bytes whose dictionary takes an
    /// eighth of it.
    pub fn create(size: usize) -> Result<Region, RegionError> {
        let layout = Layout::for_size(size).ok_or(RegionError::Size(size))?;
        Region::create_with(layout)
    }

    /// Creates a fresh region of `size` bytes whose dictionary (the zone of
    /// the `limit` rules' buckets) takes `dict_len` of them (master only).
    pub fn create_with_dict(size: usize, dict_len: usize) -> Result<Region, RegionError> {
        if Layout::for_size(size).is_none() {
            return Err(RegionError::Size(size));
        }
        let layout = Layout::new(size, dict_len).ok_or(RegionError::DictSize(dict_len, size))?;
        Region::create_with(layout)
    }

    fn create_with(layout: Layout) -> Result<Region, RegionError> {
        let size = layout.size;
        let fd = memfd_create(
            "elb-shm",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| RegionError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(RegionError::Create)?;
        // Sealed so that no process can truncate it under another's mapping
        // (which would turn reads into SIGBUS).
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .map_err(|e| RegionError::Create(e.into()))?;
        let map = MmapRaw::map_raw(&file).map_err(RegionError::Map)?;
        let region = Region { file, map, layout };
        // The memfd starts zeroed, which is the empty state of every zone;
        // only the header and the dictionary need writing.
        region.word(OFF_SIZE).store(size as u64, Ordering::Relaxed);
        region
            .word(OFF_DICT_LEN)
            .store(layout.dict_len as u64, Ordering::Relaxed);
        crate::dict::init(&region);
        region.word(OFF_MAGIC).store(MAGIC, Ordering::Release);
        Ok(region)
    }

    /// Maps a region created by the master, from an inherited descriptor.
    pub fn attach(fd: OwnedFd) -> Result<Region, RegionError> {
        let file = File::from(fd);
        let len = file.metadata().map_err(RegionError::Map)?.len() as usize;
        // The header, read through a layout valid for any region of this
        // size, says how long the dictionary is; then the real layout.
        let probe = Layout::for_size(len).ok_or(RegionError::NotARegion)?;
        let map = MmapRaw::map_raw(&file).map_err(RegionError::Map)?;
        let mut region = Region {
            file,
            map,
            layout: probe,
        };
        if region.word(OFF_MAGIC).load(Ordering::Acquire) != MAGIC
            || region.word(OFF_SIZE).load(Ordering::Relaxed) != len as u64
        {
            return Err(RegionError::NotARegion);
        }
        let dict_len = region.word(OFF_DICT_LEN).load(Ordering::Relaxed) as usize;
        region.layout = Layout::new(len, dict_len).ok_or(RegionError::NotARegion)?;
        Ok(region)
    }

    /// The memfd, to pass to a worker.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The whole mapping, for the zones' typed views.
    pub(crate) fn mem(&self) -> Mem<'_> {
        Mem::of_mapping(&self.map)
    }

    /// The published configuration generation.
    pub(crate) fn generation(&self) -> &AtomicU64 {
        self.word(OFF_GENERATION)
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        self.mem().u64(off)
    }
}

// Send and Sync come from the fields (memmap2's MmapRaw is both): every
// process and thread reaches the mapping through atomics alone.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Region>()
};
