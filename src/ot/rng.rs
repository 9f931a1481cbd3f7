//! A tiny deterministic generator (SplitMix64) and random documents and
//! operations built from it, for the test vectors and the simulation. Not
//! for anything that needs unpredictability.

use super::TextOperation;

/// Text pieces documents and inserts are made of: ASCII, Latin with a
/// precomposed and a combining accent, a lone combining mark, CJK, a ZWJ
/// family emoji (5 chars), a single emoji outside the BMP, a newline.
pub(crate) const PIECES: &[&str] = &[
    "a",
    "b",
    "xyz",
    " ",
    "\n",
    "é",
    "e\u{301}",
    "\u{301}",
    "中文",
    "👩\u{200d}👩\u{200d}👧",
    "🎉",
    "ß",
];

/// SplitMix64: a 64-bit state, one multiply-xorshift output function.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    pub(crate) fn piece(&mut self) -> &'static str {
        PIECES.get(self.below(PIECES.len())).copied().unwrap_or("a")
    }

    /// A document of up to `max_pieces` pieces.
    pub(crate) fn doc(&mut self, max_pieces: usize) -> String {
        let n = self.below(max_pieces + 1);
        (0..n).map(|_| self.piece()).collect()
    }

    /// A random valid operation on a document of `len` chars, with up to
    /// `max_steps` edits.
    pub(crate) fn op(&mut self, len: usize, max_steps: usize) -> TextOperation {
        let mut op = TextOperation::new();
        let mut remaining = len;
        for _ in 0..self.below(max_steps + 1) {
            match self.below(3) {
                0 => {
                    let n = (1 + self.below(4)).min(remaining);
                    op = op.retain(n);
                    remaining -= n;
                }
                1 => {
                    let n = (1 + self.below(4)).min(remaining);
                    op = op.delete(n);
                    remaining -= n;
                }
                _ => op = op.insert(self.piece()),
            }
        }
        op.retain(remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_valid() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        // Reference value of SplitMix64 with seed 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
        for _ in 0..200 {
            let doc = a.doc(8);
            let op = a.op(doc.chars().count(), 6);
            assert!(op.apply(&doc).is_ok());
        }
        assert_eq!(a.below(0), 0);
    }
}
