//! SplitMix64, written once for all of gantry: the sampler's counter-based hash
//! (`sampler/prng.rs`), synthetic data ([`crate::synth`]) and token sampling
//! ([`crate::next_token`]) all draw from here.
//!
//! **Frozen.** Checkpoints store data cursors, datasets were generated and served outputs
//! were promised per seed, all through these functions: the constants, the order of the
//! steps and the 53-bit unit conversion never change. The tests pin known outputs.
//!
//! [`mix64`] is the output function ("finalizer") of Sebastiano Vigna's SplitMix64
//! (<https://prng.di.unimi.it/splitmix64.c>, the same constants as Java's `SplittableRandom`): a
//! bijection on `u64` with full avalanche. The generator [`SplitMix64`] with state `s` advances
//! `s` by [`GOLDEN_GAMMA`] and outputs `mix64(s)`.

/// SplitMix64's increment: `2^64 / φ`, odd.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finalizer: a bijective avalanche mix of one `u64`.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` from the top 53 bits of `h` (every value exactly representable).
pub fn unit_f64(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// SplitMix64 as a stream: [`mix64`] over a counter stepped by [`GOLDEN_GAMMA`].
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)` from the next output ([`unit_f64`]).
    pub fn next_unit(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_is_splitmix64() {
        // Reference outputs of splitmix64.c seeded with state 0: the first three calls return
        // mix64(1γ), mix64(2γ), mix64(3γ).
        assert_eq!(mix64(GOLDEN_GAMMA), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(2)), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(3)), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn splitmix_is_fixed_forever() {
        // Datasets and tests depend on this stream; it must never change.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn unit_f64_range() {
        assert_eq!(unit_f64(0), 0.0);
        assert!(unit_f64(u64::MAX) < 1.0);
        assert_eq!(unit_f64(1 << 63), 0.5);
        // The serving sampler's old `Draws::unit` divided instead of multiplying: the same
        // value, since dividing by a power of two is exact.
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            let bits = b.next_u64();
            assert_eq!(a.next_unit(), (bits >> 11) as f64 / (1u64 << 53) as f64);
        }
    }
}
