//! A HyperLogLog sketch of distinct users: 1,024 one-byte registers (1 KiB), a
//! standard error of about 3.3%, mergeable by taking the larger register. The hash
//! is fixed (FNV-1a, then the SplitMix64 finalizer) because sketches are stored and
//! merged across restarts and versions.

/// Registers: 2^P.
const P: u32 = 10;
const M: usize = 1 << P;

/// A distinct-count sketch.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Hll {
    registers: Box<[u8; M]>,
}

impl std::fmt::Debug for Hll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hll")
            .field("estimate", &self.estimate())
            .finish()
    }
}

impl Default for Hll {
    fn default() -> Self {
        Self {
            registers: Box::new([0; M]),
        }
    }
}

/// The stable 64-bit hash of `s`.
fn hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // SplitMix64's finalizer spreads FNV's weak low bits over the whole word.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Hll {
    /// Adds one element.
    pub(crate) fn insert(&mut self, item: &str) {
        let h = hash(item);
        let index = (h >> (64 - P)) as usize;
        let rest = h << P;
        let rank = (rest.leading_zeros() + 1).min(64 - P + 1) as u8;
        if self.registers[index] < rank {
            self.registers[index] = rank;
        }
    }

    /// Adds every element of `other`.
    pub(crate) fn merge(&mut self, other: &Hll) {
        for (a, b) in self.registers.iter_mut().zip(other.registers.iter()) {
            *a = (*a).max(*b);
        }
    }

    /// Whether nothing was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.registers.iter().all(|r| *r == 0)
    }

    /// The estimated number of distinct elements.
    pub(crate) fn estimate(&self) -> u64 {
        let m = M as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for r in self.registers.iter() {
            sum += 2f64.powi(-i32::from(*r));
            if *r == 0 {
                zeros += 1;
            }
        }
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            // Small range: linear counting is exact-ish while registers are empty.
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    /// The registers, for storage.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.registers[..]
    }

    /// A sketch from stored registers; `None` if the length is wrong.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let registers: Box<[u8; M]> = bytes.to_vec().into_boxed_slice().try_into().ok()?;
        Some(Self { registers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_counts_are_exact_and_duplicates_do_not_count() {
        let mut h = Hll::default();
        assert!(h.is_empty());
        assert_eq!(h.estimate(), 0);
        for round in 0..3 {
            for i in 0..20 {
                h.insert(&format!("user-{i}"));
            }
            assert_eq!(h.estimate(), 20, "round {round}");
        }
    }

    #[test]
    fn large_counts_are_within_a_few_percent_and_merge() {
        let mut a = Hll::default();
        let mut b = Hll::default();
        for i in 0..50_000 {
            a.insert(&format!("u{i}"));
        }
        for i in 25_000..100_000 {
            b.insert(&format!("u{i}"));
        }
        let err = |e: u64, n: f64| (e as f64 - n).abs() / n;
        assert!(err(a.estimate(), 50_000.0) < 0.1, "{}", a.estimate());
        a.merge(&b);
        assert!(err(a.estimate(), 100_000.0) < 0.1, "{}", a.estimate());
        let back = Hll::from_bytes(a.as_bytes()).unwrap();
        assert_eq!(back, a);
        assert!(Hll::from_bytes(&[1, 2, 3]).is_none());
    }
}
