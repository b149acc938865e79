//! Whether a difference between two rows is established: a percentile bootstrap of the ratio of
//! their medians over repetitions.
//!
//! Each side's repetitions are resampled with replacement ([`RESAMPLES`] times), the ratio of the
//! two resampled medians taken each time, and the 2.5th and 97.5th percentiles of those ratios
//! form a 95 % interval. A difference is *established* when that interval excludes 1 and each
//! side had at least two repetitions: with one repetition per side nothing can be resampled, the
//! interval collapses to the observed ratio and says nothing about noise, so it never counts.
//!
//! The random numbers come from a [`SplitMix64`] with a fixed seed, so the same samples always
//! give the same interval (a report redrawn from `results.json` matches the one first printed).

use crate::metrics::median;

/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 2000;

/// The fixed seed of every bootstrap.
pub const SEED: u64 = 0x5eed_0fab_2026;

/// The confidence level of the interval.
pub const LEVEL: f64 = 0.95;

/// A small deterministic pseudo-random generator (Steele, Lea and Flood's SplitMix64): good
/// enough to pick resample indices, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0; the modulo bias is negligible for repetition counts).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The bootstrap interval of `numerator`'s median over `denominator`'s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RatioInterval {
    /// Lower bound of the 95 % interval.
    pub low: f64,
    /// Upper bound of the 95 % interval.
    pub high: f64,
    /// Whether the difference is established: the interval excludes 1 and both sides had at
    /// least two repetitions.
    pub established: bool,
}

/// The 95 % percentile-bootstrap interval of `median(numerator) / median(denominator)`.
///
/// `None` when a side is empty or every resampled denominator median is 0. With a single
/// repetition on both sides the interval is degenerate (`low == high ==` the observed ratio) and
/// never established.
pub fn ratio_interval(numerator: &[f64], denominator: &[f64]) -> Option<RatioInterval> {
    if numerator.is_empty() || denominator.is_empty() {
        return None;
    }
    let mut rng = SplitMix64::new(SEED);
    let mut resample = |values: &[f64], scratch: &mut Vec<f64>| {
        scratch.clear();
        scratch.extend((0..values.len()).map(|_| values[rng.below(values.len())]));
        median(scratch)
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut ratios = Vec::with_capacity(RESAMPLES);
    for _ in 0..RESAMPLES {
        let (Some(top), Some(bottom)) =
            (resample(numerator, &mut a), resample(denominator, &mut b))
        else {
            continue;
        };
        if bottom != 0.0 {
            ratios.push(top / bottom);
        }
    }
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0;
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    let (low, high) = (at(tail), at(1.0 - tail));
    let enough = numerator.len() >= 2 && denominator.len() >= 2;
    Some(RatioInterval {
        low,
        high,
        established: enough && (high < 1.0 || low > 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The first outputs of the reference implementation seeded with 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn clearly_separated_samples_are_established() {
        let percpu = [120.0, 118.0, 121.0, 119.0, 122.0];
        let hash = [100.0, 101.0, 99.0, 100.5, 98.0];
        let ci = ratio_interval(&percpu, &hash).unwrap();
        // Every resampled ratio lies between 118/101 and 122/98.
        assert!(ci.low >= 118.0 / 101.0 && ci.high <= 122.0 / 98.0, "{ci:?}");
        assert!(ci.low > 1.0);
        assert!(ci.established);
        // Lower is as established as higher.
        let ci = ratio_interval(&hash, &percpu).unwrap();
        assert!(ci.high < 1.0 && ci.established, "{ci:?}");
    }

    #[test]
    fn two_separated_repetitions_each_are_established() {
        let ci = ratio_interval(&[10.0, 11.0], &[20.0, 21.0]).unwrap();
        assert!(ci.low >= 10.0 / 21.0 && ci.high <= 11.0 / 20.0, "{ci:?}");
        assert!(ci.established);
    }

    #[test]
    fn identical_samples_are_not_established() {
        let same = [5.0, 7.0, 6.0, 9.0, 4.0];
        let ci = ratio_interval(&same, &same).unwrap();
        assert!(ci.low < 1.0 && ci.high > 1.0, "{ci:?}");
        assert!(!ci.established);
        let constant = ratio_interval(&[3.0, 3.0], &[3.0, 3.0]).unwrap();
        assert_eq!((constant.low, constant.high), (1.0, 1.0));
        assert!(!constant.established);
    }

    #[test]
    fn heavily_overlapping_samples_are_not_established() {
        // Medians 102 vs 100, but each side spans the other.
        let percpu = [90.0, 102.0, 115.0, 95.0, 108.0];
        let hash = [92.0, 100.0, 112.0, 97.0, 104.0];
        let ci = ratio_interval(&percpu, &hash).unwrap();
        assert!(ci.low < 1.0 && ci.high > 1.0, "{ci:?}");
        assert!(!ci.established);
    }

    #[test]
    fn one_repetition_per_side_is_degenerate_and_never_established() {
        let ci = ratio_interval(&[200.0], &[100.0]).unwrap();
        assert_eq!((ci.low, ci.high), (2.0, 2.0));
        assert!(!ci.established);
        // One side alone with a single repetition is not enough either.
        let ci = ratio_interval(&[200.0], &[100.0, 101.0, 99.0]).unwrap();
        assert!(ci.low > 1.0 && !ci.established, "{ci:?}");
    }

    #[test]
    fn empty_or_zero_denominators_give_no_interval() {
        assert!(ratio_interval(&[], &[1.0]).is_none());
        assert!(ratio_interval(&[1.0], &[]).is_none());
        assert!(ratio_interval(&[1.0, 2.0], &[0.0, 0.0]).is_none());
    }

    #[test]
    fn the_same_input_gives_the_same_interval() {
        let percpu = [1.0, 1.3, 0.9, 1.1, 1.2, 0.95];
        let hash = [1.0, 1.05, 0.98, 1.02];
        let first = ratio_interval(&percpu, &hash).unwrap();
        for _ in 0..3 {
            assert_eq!(ratio_interval(&percpu, &hash).unwrap(), first);
        }
    }
}
