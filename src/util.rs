//! Small helpers shared by several modules.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// `n` random bytes from the system generator, as lowercase hex.
///
/// While a replicated command is applied ([`crate::clock::replay`]), the bytes come
/// from the command's seed instead, so that every node makes the same ids.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if !crate::clock::replay::fill(&mut bytes) {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the system random generator is available");
    }
    hex(&bytes)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Locking a mutex that survives a poisoned lock.
///
/// A panic while a `std::sync` lock is held poisons it, and every later `lock()`
/// returns an error. Tutti's critical sections leave their data consistent
/// wherever a panic could occur, so a later holder takes the data as it is
/// rather than spreading one task's panic to every request that touches the
/// same lock.
pub trait Unpoisoned<T: ?Sized> {
    /// Locks, taking the data as it is if a holder panicked.
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T: ?Sized> Unpoisoned<T> for std::sync::Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reading and writing an `RwLock` that survives a poisoned lock, as
/// [`Unpoisoned`] does for a mutex.
pub trait UnpoisonedRw<T: ?Sized> {
    /// Takes a read guard, taking the data as it is if a writer panicked.
    fn reading(&self) -> std::sync::RwLockReadGuard<'_, T>;
    /// Takes the write guard, taking the data as it is if a writer panicked.
    fn writing(&self) -> std::sync::RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> UnpoisonedRw<T> for std::sync::RwLock<T> {
    fn reading(&self) -> std::sync::RwLockReadGuard<'_, T> {
        self.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn writing(&self) -> std::sync::RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, RwLock};

    use super::{Unpoisoned, UnpoisonedRw};

    #[test]
    fn a_lock_poisoned_by_a_panic_still_gives_its_data() {
        let m = Mutex::new(1);
        let rw = RwLock::new(1);
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let mut a = m.lock().unwrap();
                let mut b = rw.write().unwrap();
                *a = 2;
                *b = 2;
                panic!("a holder panics");
            })
            .join()
        });
        assert!(m.is_poisoned() && rw.is_poisoned());
        assert_eq!(*m.locked(), 2, "the update made before the panic stays");
        assert_eq!(*rw.reading(), 2);
        *rw.writing() = 3;
        assert_eq!(*rw.reading(), 3);
    }
}
