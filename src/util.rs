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
