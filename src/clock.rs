//! Wall-clock time for features that bucket by time (analytics), behind a handle a
//! test can set: [`Clock::manual`] returns a clock that moves only when told, so a
//! test can put events on both sides of a bucket boundary without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch, from the system or from a test.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock that moves only through [`Clock::set`] and [`Clock::advance`].
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A manual clock starting at `start_ms`.
    pub fn manual(start_ms: u64) -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        if let Some(t) = replay::time_ms() {
            return t;
        }
        match self {
            Clock::System => crate::util::unix_millis(),
            Clock::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    /// Sets a manual clock; does nothing to the system clock.
    pub fn set(&self, ms: u64) {
        if let Clock::Manual(t) = self {
            t.store(ms, Ordering::Release);
        }
    }

    /// Moves a manual clock forward; does nothing to the system clock.
    pub fn advance(&self, ms: u64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(ms, Ordering::AcqRel);
        }
    }
}

/// The application of a replicated command (`crate::services::replica`): inside
/// [`scope`](replay::scope), [`Clock::now_ms`] is the command's time and
/// [`crate::util::random_hex`] draws from the command's seed, so every node that
/// applies the command computes the same timestamps and ids.
///
/// A task-local: work a service spawns from inside the scope does not inherit it.
pub mod replay {
    use std::cell::Cell;
    use std::future::Future;

    /// What a command fixes.
    #[derive(Debug)]
    pub struct Replay {
        time_ms: u64,
        state: Cell<u64>,
    }

    tokio::task_local! {
        static REPLAY: Replay;
    }

    /// Runs `fut` as the application of a command made at `time_ms` with `seed`.
    pub async fn scope<F: Future>(time_ms: u64, seed: u64, fut: F) -> F::Output {
        REPLAY
            .scope(
                Replay {
                    time_ms,
                    state: Cell::new(seed),
                },
                fut,
            )
            .await
    }

    /// Whether a command is being applied.
    pub fn active() -> bool {
        REPLAY.try_with(|_| ()).is_ok()
    }

    /// The command's time, while one is applied.
    pub fn time_ms() -> Option<u64> {
        REPLAY.try_with(|r| r.time_ms).ok()
    }

    /// Fills `out` from the command's seed (SplitMix64); false outside a command.
    pub fn fill(out: &mut [u8]) -> bool {
        REPLAY
            .try_with(|r| {
                for chunk in out.chunks_mut(8) {
                    let mut z = r.state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
                    r.state.set(z);
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^= z >> 31;
                    chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
                }
            })
            .is_ok()
    }

    #[cfg(test)]
    mod tests {
        #[tokio::test]
        async fn a_command_fixes_time_and_ids() {
            assert!(!super::active());
            let ids = || async { (crate::util::random_hex(8), crate::util::random_hex(4)) };
            let a = super::scope(5, 42, ids()).await;
            let b = super::scope(5, 42, ids()).await;
            assert_eq!(a, b, "the same seed makes the same ids");
            assert_ne!(a, super::scope(5, 43, ids()).await);
            assert_ne!(a.0, crate::util::random_hex(8), "outside: random");
            let t = super::scope(77, 1, async { crate::clock::Clock::System.now_ms() }).await;
            assert_eq!(t, 77);
        }
    }
}

/// Durations written the human way in configuration files and queries: `"10s"`, `"500ms"`, `"13days"`.
#[cfg(feature = "server")]
pub(crate) mod duration_str {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    /// An optional duration.
    pub(crate) mod option {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
