//! A process-shared, robust pthread mutex living in shared memory.
//!
//! The mutex is initialised in place once (by the master, before any other
//! process maps the region) with `PTHREAD_PROCESS_SHARED`, so every process
//! that maps the memory can use it, and `PTHREAD_MUTEX_ROBUST`, so that when
//! its owner dies (SIGKILL included: the kernel walks the dead thread's robust
//! list) the next `pthread_mutex_lock` succeeds with `EOWNERDEAD` instead of
//! hanging. The new owner then repairs what the lock protects and calls
//! [`RobustGuard::make_consistent`]; unlocking without doing so leaves the
//! mutex `ENOTRECOVERABLE` for good.
//!
//! The type is also `PTHREAD_MUTEX_ERRORCHECK`: a thread locking it twice gets
//! `EDEADLK` instead of hanging forever.

use std::marker::PhantomData;

use nix::errno::Errno;

/// Bytes the mutex occupies in shared memory.
pub(crate) const MUTEX_SIZE: usize = size_of::<libc::pthread_mutex_t>();
/// Alignment the mutex needs.
pub(crate) const MUTEX_ALIGN: usize = align_of::<libc::pthread_mutex_t>();

/// Why a lock could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockError {
    /// A previous owner died and its successor unlocked without marking the
    /// state consistent: the mutex can never be locked again.
    NotRecoverable,
    /// Any other error of `pthread_mutex_lock` (`EDEADLK`, `EINVAL`...).
    Other(Errno),
}

/// A handle on a robust mutex in shared memory.
pub(crate) struct RobustMutex<'a> {
    ptr: *mut libc::pthread_mutex_t,
    _mapping: PhantomData<&'a ()>,
}

impl<'a> RobustMutex<'a> {
    /// Initialises a robust, process-shared, error-checking mutex at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `MUTEX_SIZE` bytes, aligned to
    /// `MUTEX_ALIGN`, and no process or thread may be using a mutex there.
    pub(crate) unsafe fn init(ptr: *mut libc::pthread_mutex_t) -> Result<(), Errno> {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is writable storage for an attribute object.
        check(unsafe { libc::pthread_mutexattr_init(attr.as_mut_ptr()) })?;
        let attr_ptr = attr.as_mut_ptr();
        let result = (|| {
            // SAFETY: `attr_ptr` was initialised by pthread_mutexattr_init.
            check(unsafe {
                libc::pthread_mutexattr_setpshared(attr_ptr, libc::PTHREAD_PROCESS_SHARED)
            })?;
            // SAFETY: as above.
            check(unsafe {
                libc::pthread_mutexattr_setrobust(attr_ptr, libc::PTHREAD_MUTEX_ROBUST)
            })?;
            // SAFETY: as above.
            check(unsafe {
                libc::pthread_mutexattr_settype(attr_ptr, libc::PTHREAD_MUTEX_ERRORCHECK)
            })?;
            // SAFETY: the caller guarantees `ptr` is valid, aligned and unused;
            // `attr_ptr` is an initialised attribute object.
            check(unsafe { libc::pthread_mutex_init(ptr, attr_ptr) })
        })();
        // SAFETY: `attr_ptr` was initialised above and is not used afterwards.
        unsafe { libc::pthread_mutexattr_destroy(attr_ptr) };
        result
    }

    /// A handle on the mutex at `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to a mutex initialised by [`RobustMutex::init`] in a
    /// mapping that stays mapped for `'a`.
    pub(crate) unsafe fn from_ptr(ptr: *mut libc::pthread_mutex_t) -> RobustMutex<'a> {
        RobustMutex {
            ptr,
            _mapping: PhantomData,
        }
    }

    /// Locks the mutex, blocking. The boolean is true when the previous owner
    /// died holding it: the caller owns the lock and must repair the state it
    /// protects, then call [`RobustGuard::make_consistent`].
    pub(crate) fn lock(&self) -> Result<(RobustGuard<'_>, bool), LockError> {
        // SAFETY: `self.ptr` is an initialised mutex in a live mapping
        // (contract of `from_ptr`).
        let rc = unsafe { libc::pthread_mutex_lock(self.ptr) };
        match rc {
            0 => Ok((RobustGuard { mutex: self }, false)),
            libc::EOWNERDEAD => Ok((RobustGuard { mutex: self }, true)),
            libc::ENOTRECOVERABLE => Err(LockError::NotRecoverable),
            e => Err(LockError::Other(Errno::from_raw(e))),
        }
    }
}

/// Ownership of a locked [`RobustMutex`]; unlocks on drop.
///
/// Not `Send` (it holds a raw pointer): a pthread mutex must be unlocked by
/// the thread that locked it.
pub(crate) struct RobustGuard<'m> {
    mutex: &'m RobustMutex<'m>,
}

impl RobustGuard<'_> {
    /// Declares the protected state repaired after an `EOWNERDEAD` lock.
    pub(crate) fn make_consistent(&self) -> Result<(), Errno> {
        // SAFETY: the mutex is initialised and locked by this thread.
        check(unsafe { libc::pthread_mutex_consistent(self.mutex.ptr) })
    }
}

impl Drop for RobustGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the mutex is initialised and locked by this thread (the
        // guard exists only between a successful lock and this drop).
        let rc = unsafe { libc::pthread_mutex_unlock(self.mutex.ptr) };
        debug_assert_eq!(rc, 0, "pthread_mutex_unlock failed");
    }
}

fn check(rc: libc::c_int) -> Result<(), Errno> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw(rc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heap storage standing in for shared memory.
    struct Storage(Box<std::mem::MaybeUninit<libc::pthread_mutex_t>>);

    impl Storage {
        fn new() -> Storage {
            let mut s = Storage(Box::new(std::mem::MaybeUninit::uninit()));
            // SAFETY: fresh, aligned, unused storage.
            unsafe { RobustMutex::init(s.ptr()) }.expect("init");
            s
        }
        fn ptr(&mut self) -> *mut libc::pthread_mutex_t {
            self.0.as_mut_ptr()
        }
    }

    struct SendPtr(*mut libc::pthread_mutex_t);
    // SAFETY: the pointer is only used to reach a process-shared mutex,
    // which any thread may lock.
    unsafe impl Send for SendPtr {}

    #[test]
    fn lock_unlock_and_relock_is_an_error() {
        let mut s = Storage::new();
        // SAFETY: initialised by Storage::new, lives for the whole test.
        let m = unsafe { RobustMutex::from_ptr(s.ptr()) };
        let (g, died) = m.lock().expect("lock");
        assert!(!died);
        assert_eq!(m.lock().err(), Some(LockError::Other(Errno::EDEADLK)));
        drop(g);
        let (_g, died) = m.lock().expect("relock");
        assert!(!died);
    }

    #[test]
    fn dead_owner_is_reported_and_recoverable() {
        let mut s = Storage::new();
        let p = SendPtr(s.ptr());
        std::thread::spawn(move || {
            let p = p;
            // SAFETY: initialised, outlives the thread (joined below).
            let m = unsafe { RobustMutex::from_ptr(p.0) };
            let (g, _) = m.lock().expect("lock in thread");
            // The thread exits holding the lock.
            std::mem::forget(g);
        })
        .join()
        .expect("join");
        // SAFETY: as above.
        let m = unsafe { RobustMutex::from_ptr(s.ptr()) };
        let (g, died) = m.lock().expect("lock after owner death");
        assert!(died);
        g.make_consistent().expect("consistent");
        drop(g);
        let (_g, died) = m.lock().expect("lock after repair");
        assert!(!died);
    }

    #[test]
    fn unlock_without_consistent_poisons() {
        let mut s = Storage::new();
        let p = SendPtr(s.ptr());
        std::thread::spawn(move || {
            let p = p;
            // SAFETY: initialised, outlives the thread (joined below).
            let m = unsafe { RobustMutex::from_ptr(p.0) };
            std::mem::forget(m.lock().expect("lock in thread").0);
        })
        .join()
        .expect("join");
        // SAFETY: as above.
        let m = unsafe { RobustMutex::from_ptr(s.ptr()) };
        let (g, died) = m.lock().expect("lock after owner death");
        assert!(died);
        drop(g);
        assert_eq!(m.lock().err(), Some(LockError::NotRecoverable));
    }
}
