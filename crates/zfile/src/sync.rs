//! obd's one policy for poisoned locks, used by every crate of the workspace.
//!
//! A `Mutex` or `RwLock` is poisoned when a thread panicked while holding it.
//! A panic in obd is a bug, but one thread's bug must not take down a device,
//! the device service or a conversion with every other thread that shares the
//! lock, and a panic while panicking (in `Drop`) aborts. So **a poisoned lock
//! is recovered**: its guard is taken as if nothing happened ([`MutexExt`],
//! [`RwLockExt`], and [`recover`] for `Condvar::wait` and `into_inner`).
//!
//! That is sound because of the rule every critical section follows: **the
//! guarded state is valid at every point where its holder could panic.**
//! Compute outside the lock, then apply the result with steps that each leave
//! the state valid (an assignment, `push`, `insert`, `take`, a counter bump);
//! never hold a lock across a half-done multi-step update that may panic
//! midway. State for which that cannot hold must not be shared behind a lock.
//!
//! Tests may `unwrap()` their own locks: a panic there is the test failing.

use std::sync::{LockResult, Mutex, MutexGuard, PoisonError, RwLock};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

/// The guard (or value) in `r`, poisoned or not (see the [module](self) policy).
pub fn recover<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}

/// `Mutex::lock` with the [module](self) policy: a poisoned lock is recovered.
pub trait MutexExt<T: ?Sized> {
    /// Locks, waiting for the holder if any; never fails.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        recover(self.lock())
    }
}

/// `RwLock::read`/`write` with the [module](self) policy: a poisoned lock is
/// recovered.
pub trait RwLockExt<T: ?Sized> {
    /// Locks for shared reading; never fails.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// Locks for exclusive writing; never fails.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        recover(self.read())
    }
    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        recover(self.write())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisoned_locks_are_recovered_with_their_state() {
        let m = Mutex::new(vec![1]);
        let rw = RwLock::new(7);
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _g = m.lock().unwrap();
                    let _w = rw.write().unwrap();
                    panic!("poison both");
                })
                .join();
        });
        assert!(m.is_poisoned() && rw.is_poisoned());
        m.locked().push(2);
        assert_eq!(*m.locked(), [1, 2]);
        *rw.write_locked() += 1;
        assert_eq!(*rw.read_locked(), 8);
        assert_eq!(recover(m.into_inner()), [1, 2]);
    }
}
