//! The dictionary's lock: the robust, process-shared mutex at the zone
//! start, and the one way into the zone ([`Dict::with`]).
//!
//! Whoever takes the lock after a holder died (`EOWNERDEAD`), or after a
//! panic under the lock, or finds an inconsistency, repairs before anything
//! else reads the zone. The `needs repair` flag is set before the mutex is
//! marked consistent, so a locker killed while repairing leaves the repair
//! to the next one. This is the dictionary's only `unsafe`: handing the
//! mutex's bytes to [`crate::robust`].

#![allow(unsafe_code)]

use std::sync::atomic::Ordering::{Acquire, Relaxed};

use nix::errno::Errno;

use crate::robust::{LockError, MUTEX_SIZE, RobustMutex};

use super::zone::{DICT_MAGIC, E, Z_MAGIC, Z_NEEDS_REPAIR, Zone};
use super::{Dict, DictError};

/// Initialises the mutex of a zone nobody else maps yet.
pub(super) fn init_mutex(z: &Zone<'_>) -> Result<(), Errno> {
    // SAFETY: `mutex` is MUTEX_SIZE bytes of the zone (bounds checked by
    // `sub`), aligned (the zone is page-aligned, MUTEX_ALIGN <= 64), and no
    // other process maps the region yet, so nobody uses a mutex there.
    unsafe { RobustMutex::init(mutex(z)) }
}

/// The robust mutex at the zone start.
fn mutex(z: &Zone<'_>) -> *mut libc::pthread_mutex_t {
    z.mem.sub(0, MUTEX_SIZE).as_ptr().cast()
}

impl Dict<'_> {
    /// Runs `f` under the lock, repairing first if needed.
    pub(super) fn with<R>(
        &self,
        f: impl FnOnce(&Zone<'_>) -> Result<R, E>,
    ) -> Result<R, DictError> {
        let z = self.zone();
        if z.w64(Z_MAGIC).load(Acquire) != DICT_MAGIC {
            return Err(DictError::Corrupted);
        }
        // SAFETY: the magic says `init` initialised the mutex at the zone
        // start; the mapping outlives `z` and `m`.
        let m = unsafe { RobustMutex::from_ptr(mutex(&z)) };
        let (guard, owner_died) = m.lock().map_err(|e| match e {
            LockError::NotRecoverable => DictError::Poisoned,
            LockError::Other(e) => DictError::Lock(e),
        })?;
        // Dropped before `guard`: flags a repair if we unwind with the lock.
        let _panic = PanicGuard(&z);
        if owner_died {
            // Set before making the mutex consistent: if repair panics, the
            // next locker still repairs (if we die, it gets EOWNERDEAD).
            z.w64(Z_NEEDS_REPAIR).store(1, Relaxed);
            guard.make_consistent().map_err(DictError::Lock)?;
        }
        if z.w64(Z_NEEDS_REPAIR).load(Relaxed) != 0 {
            z.repair();
        }
        match f(&z) {
            Ok(r) => Ok(r),
            Err(E::Dict(e)) => Err(e),
            Err(E::Corrupt(_what)) => {
                z.repair();
                Err(DictError::Corrupted)
            }
        }
    }
}

struct PanicGuard<'z, 'a>(&'z Zone<'a>);

impl Drop for PanicGuard<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Straight to the atomic: no simulated crash while unwinding.
            self.0.w64(Z_NEEDS_REPAIR).0.store(1, Relaxed);
        }
    }
}
