//! Per-worker slots: each written by its own worker only (single writer),
//! read by the master. Cache-line aligned, so workers never contend.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Region;
use crate::atomic_mem::Mem;
use crate::layout::{MAX_WORKERS, SLOT_SIZE};

const OFF_PID: usize = 0;
const OFF_APPLIED: usize = 8;
const OFF_REQUESTS: usize = 16;
const OFF_CONNECTIONS: usize = 24;
const OFF_STARTED: usize = 32;
const OFF_RESTARTS: usize = 40;
const OFF_ACCEPT_PAUSES: usize = 48;
const OFF_POOL_EVICTIONS: usize = 56;

/// A view of worker slot `index`.
pub struct WorkerSlot<'r> {
    mem: Mem<'r>,
}

impl Region {
    /// Slot `index` (`< MAX_WORKERS`), or `None` past the last.
    pub fn worker_slot(&self, index: usize) -> Option<WorkerSlot<'_>> {
        (index < MAX_WORKERS).then(|| WorkerSlot {
            mem: self
                .mem()
                .sub(self.layout().slots_off + index * SLOT_SIZE, SLOT_SIZE),
        })
    }
}

impl WorkerSlot<'_> {
    fn word(&self, off: usize) -> &AtomicU64 {
        self.mem.u64(off)
    }

    /// Called by the master before it starts a worker in this slot: the
    /// slot starts afresh, noting when (Unix seconds) and how many workers
    /// this slot had before.
    pub fn reset(&self, pid: u32, started: u64, restarts: u64) {
        self.word(OFF_APPLIED).store(0, Ordering::Relaxed);
        self.word(OFF_REQUESTS).store(0, Ordering::Relaxed);
        self.word(OFF_CONNECTIONS).store(0, Ordering::Relaxed);
        self.word(OFF_ACCEPT_PAUSES).store(0, Ordering::Relaxed);
        self.word(OFF_POOL_EVICTIONS).store(0, Ordering::Relaxed);
        self.word(OFF_STARTED).store(started, Ordering::Relaxed);
        self.word(OFF_RESTARTS).store(restarts, Ordering::Relaxed);
        self.word(OFF_PID).store(u64::from(pid), Ordering::Release);
    }

    /// Times the worker stopped accepting: at its connection cap, or out
    /// of descriptors.
    pub fn accept_pauses(&self) -> u64 {
        self.word(OFF_ACCEPT_PAUSES).load(Ordering::Relaxed)
    }

    pub fn count_accept_pause(&self) {
        self.word(OFF_ACCEPT_PAUSES).fetch_add(1, Ordering::Relaxed);
    }

    /// Idle peer connections the worker closed at its per-peer pool cap.
    pub fn pool_evictions(&self) -> u64 {
        self.word(OFF_POOL_EVICTIONS).load(Ordering::Relaxed)
    }

    pub fn count_pool_evictions(&self, n: u64) {
        self.word(OFF_POOL_EVICTIONS)
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Client connections the worker holds now.
    pub fn connections(&self) -> u64 {
        self.word(OFF_CONNECTIONS).load(Ordering::Relaxed)
    }

    pub fn set_connections(&self, n: u64) {
        self.word(OFF_CONNECTIONS).store(n, Ordering::Relaxed);
    }

    /// When the master started the worker, in Unix seconds.
    pub fn started(&self) -> u64 {
        self.word(OFF_STARTED).load(Ordering::Relaxed)
    }

    /// Workers this slot had before the current one.
    pub fn restarts(&self) -> u64 {
        self.word(OFF_RESTARTS).load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> u32 {
        self.word(OFF_PID).load(Ordering::Acquire) as u32
    }

    pub fn set_pid(&self, pid: u32) {
        self.word(OFF_PID).store(u64::from(pid), Ordering::Release);
    }

    /// The configuration generation this worker has applied.
    pub fn applied(&self) -> u64 {
        self.word(OFF_APPLIED).load(Ordering::Acquire)
    }

    pub fn set_applied(&self, generation: u64) {
        self.word(OFF_APPLIED).store(generation, Ordering::Release);
    }

    /// Requests this worker has answered.
    pub fn requests(&self) -> u64 {
        self.word(OFF_REQUESTS).load(Ordering::Relaxed)
    }

    pub fn count_request(&self) {
        self.word(OFF_REQUESTS).fetch_add(1, Ordering::Relaxed);
    }
}
