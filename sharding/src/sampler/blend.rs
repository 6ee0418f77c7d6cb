//! Blending several datasets by weight, exactly and without randomness.
//!
//! A blended stream position `p` goes to one dataset and becomes the next position of that
//! dataset's own stream (which the dataset's [`super::Shuffle`] turns into a sample). The goal
//! is Megatron's: after `p` positions, dataset `i` has received about `p · w_i` of them, never
//! drifting. Megatron gets there with a sequential greedy loop (give each position to the
//! dataset lagging its target most) and materializes the result; that needs `O(p)` time or
//! memory to answer "where does position `p` go". Here the answer has a closed form.
//!
//! # Construction (frozen: checkpoints depend on it)
//!
//! 1. Weights are normalized and quantized to integers `q_i = round(w_i · 2^48)` (at least 1
//!    for a positive weight; zero-weight datasets take no part).
//! 2. A Huffman tree is built over the `q_i`: repeatedly merge the two lightest nodes, lightest
//!    first (ties: leaves in dataset order before merged nodes, merged nodes in creation order);
//!    the first becomes the left child.
//! 3. An inner node with children of weights `a` (left) and `b` routes the `n`-th position of
//!    its own stream by rounding: with `d = a + b` and `L(n) = floor((n·a + floor(d/2)) / d)`
//!    (positions `0..n` sent left so far, `n·a/d` rounded), position `n` goes left iff
//!    `L(n + 1) > L(n)`, and becomes position `L(n)` of the left stream, else position
//!    `n - L(n)` of the right stream. This is exact integer arithmetic (`u128`).
//!
//! [`Blend::at`] walks from the root to a leaf: `O(depth) ≤ O(#datasets)` per position, no
//! state, no memory beyond the tree.
//!
//! # Why it is exact and balanced
//!
//! `L(n + 1) - L(n)` is 0 or 1 because `a <= d`, and `L(0) = 0`, so every position goes to
//! exactly one child and each child's positions are numbered `0, 1, 2, …` without gaps; by
//! induction each leaf (dataset) receives a gap-free stream. Each split misses its exact share
//! by at most about 1/2, and a child's error is scaled by its weight share when passed down:
//! a leaf's total deviation is at most `1/2 · Σ w_i / W(ancestor)` over its ancestors below the
//! root. In a Huffman tree every node's grandparent weighs at least twice the node, so that sum
//! is below 4: after any number of positions `p`, dataset `i` has received `p · w_i ± 2`
//! positions (the property tests check this).
//!
//! For two datasets the rule is exactly the greedy one: give position `p` to the dataset whose
//! count lags its target `(p + 1) · w_i` most (ties to the lighter dataset).

use super::SamplerError;

/// Fixed-point scale of the quantized weights (frozen).
const WEIGHT_SCALE: f64 = (1u64 << 48) as f64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Leaf {
        dataset: usize,
    },
    Split {
        left: usize,
        right: usize,
        /// Quantized weight of the left subtree.
        left_weight: u64,
        /// Quantized weight of both subtrees together.
        weight: u64,
    },
}

/// A deterministic schedule interleaving datasets by weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Blend {
    /// Normalized weights (sum 1).
    weights: Vec<f64>,
    sizes: Vec<u64>,
    nodes: Vec<Node>,
    root: usize,
}

impl Blend {
    /// A blend of `weights.len()` datasets; `sizes[i]` is the number of samples in dataset `i`.
    ///
    /// Weights are normalized (only their ratios matter). Errors: no datasets, `weights` and
    /// `sizes` of different lengths, a weight that is negative, NaN or infinite (naming it),
    /// all weights zero, or a positive-weight dataset of size 0.
    pub fn new(weights: &[f64], sizes: &[u64]) -> Result<Blend, SamplerError> {
        if weights.is_empty() {
            return Err(SamplerError::NoDatasets);
        }
        if weights.len() != sizes.len() {
            return Err(SamplerError::BlendLengthMismatch {
                weights: weights.len(),
                sizes: sizes.len(),
            });
        }
        for (index, &weight) in weights.iter().enumerate() {
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(SamplerError::InvalidWeight { index, weight });
            }
        }
        let max = weights.iter().copied().fold(0.0, f64::max);
        if max <= 0.0 {
            return Err(SamplerError::AllWeightsZero { count: weights.len() });
        }
        for (index, (&weight, &size)) in weights.iter().zip(sizes).enumerate() {
            if weight > 0.0 && size == 0 {
                return Err(SamplerError::EmptyBlendDataset { index, weight });
            }
        }
        // Divide by the largest weight first so huge weights cannot overflow the sum.
        let scaled: Vec<f64> = weights.iter().map(|&w| w / max).collect();
        let sum: f64 = scaled.iter().sum();
        let normalized: Vec<f64> = scaled.iter().map(|&w| w / sum).collect();

        let mut nodes = Vec::new();
        // (weight, node index) of the subtrees not yet merged.
        let mut active: Vec<(u64, usize)> = Vec::new();
        for (dataset, (&weight, &share)) in weights.iter().zip(&normalized).enumerate() {
            if weight > 0.0 {
                // share <= 1, so the product fits; a positive weight keeps at least one unit.
                let quantum = ((share * WEIGHT_SCALE).round() as u64).max(1);
                active.push((quantum, nodes.len()));
                nodes.push(Node::Leaf { dataset });
            }
        }
        while active.len() > 1 {
            let (left_weight, left) = take_lightest(&mut active);
            let (right_weight, right) = take_lightest(&mut active);
            let weight = left_weight + right_weight;
            active.push((weight, nodes.len()));
            nodes.push(Node::Split {
                left,
                right,
                left_weight,
                weight,
            });
        }
        // `max > 0` guarantees at least one leaf.
        let root = active.first().map_or(0, |&(_, node)| node);
        Ok(Blend {
            weights: normalized,
            sizes: sizes.to_vec(),
            nodes,
            root,
        })
    }

    /// Number of datasets (including zero-weight ones).
    pub fn num_datasets(&self) -> usize {
        self.weights.len()
    }

    /// The normalized weights (they sum to 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The dataset sizes given to [`Self::new`].
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Where blended position `position` goes: `(dataset, position within that dataset's
    /// stream)`. The second value counts how many earlier blended positions went to the same
    /// dataset, so each dataset's stream is consumed in order without gaps; map it through that
    /// dataset's epochs and shuffle (`epoch = q / size`, `sample = shuffle(epoch, q % size)`).
    pub fn at(&self, position: u64) -> (usize, u64) {
        let mut node = self.root;
        let mut n = position;
        loop {
            match self.nodes[node] {
                Node::Leaf { dataset } => return (dataset, n),
                Node::Split {
                    left,
                    right,
                    left_weight,
                    weight,
                } => {
                    let before = left_count(u128::from(n), left_weight, weight);
                    let after = left_count(u128::from(n) + 1, left_weight, weight);
                    // before <= n, so it fits in u64.
                    let before = before as u64;
                    if after > u128::from(before) {
                        node = left;
                        n = before;
                    } else {
                        node = right;
                        n -= before;
                    }
                }
            }
        }
    }

    /// How many of the blended positions `0..position` go to each dataset (they sum to
    /// `position`). `O(#datasets)`; useful for progress reports and for checking the schedule.
    pub fn counts(&self, position: u64) -> Vec<u64> {
        let mut counts = vec![0; self.weights.len()];
        let mut stack = vec![(self.root, position)];
        while let Some((node, n)) = stack.pop() {
            match self.nodes[node] {
                Node::Leaf { dataset } => counts[dataset] = n,
                Node::Split {
                    left,
                    right,
                    left_weight,
                    weight,
                } => {
                    let to_left = left_count(u128::from(n), left_weight, weight) as u64;
                    stack.push((left, to_left));
                    stack.push((right, n - to_left));
                }
            }
        }
        counts
    }
}

/// Positions among `0..n` a split sends left: `n · a / d` rounded half up.
fn left_count(n: u128, a: u64, d: u64) -> u128 {
    let d = u128::from(d);
    (n * u128::from(a) + d / 2) / d
}

/// Removes and returns the lightest `(weight, node)` (ties: lower node index).
fn take_lightest(active: &mut Vec<(u64, usize)>) -> (u64, usize) {
    let mut best = 0;
    for (i, entry) in active.iter().enumerate() {
        if *entry < active[best] {
            best = i;
        }
    }
    active.swap_remove(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Walks positions `0..len` and checks the schedule against its own counts and the weights.
    fn check_schedule(blend: &Blend, len: u64, tolerance: f64) -> Result<(), TestCaseError> {
        let mut counts = vec![0u64; blend.num_datasets()];
        for p in 0..len {
            let (dataset, index) = blend.at(p);
            prop_assert!(blend.weights()[dataset] > 0.0, "zero-weight dataset {} chosen", dataset);
            // Each dataset's stream is consumed in order without gaps.
            prop_assert_eq!(index, counts[dataset]);
            counts[dataset] += 1;
            for (i, &c) in counts.iter().enumerate() {
                let target = (p + 1) as f64 * blend.weights()[i];
                prop_assert!(
                    (c as f64 - target).abs() <= tolerance,
                    "after {} positions dataset {} has {} (target {})",
                    p + 1,
                    i,
                    c,
                    target
                );
            }
        }
        prop_assert_eq!(&counts, &blend.counts(len));
        Ok(())
    }

    #[test]
    fn simple_ratios() {
        let blend = Blend::new(&[1.0, 3.0], &[10, 10]).unwrap();
        assert_eq!(blend.weights(), [0.25, 0.75]);
        let order: Vec<usize> = (0..8).map(|p| blend.at(p).0).collect();
        assert_eq!(order, [1, 0, 1, 1, 1, 0, 1, 1]);
        assert_eq!(blend.counts(8), [2, 6]);
        check_schedule(&blend, 10_000, 1.0).unwrap();
    }

    #[test]
    fn zero_weight_datasets_are_skipped() {
        let blend = Blend::new(&[0.0, 2.0, 0.0, 2.0], &[0, 5, 7, 5]).unwrap();
        check_schedule(&blend, 1000, 1.0).unwrap();
        assert_eq!(blend.counts(1000), [0, 500, 0, 500]);
        let single = Blend::new(&[0.0, 1.0], &[0, 1]).unwrap();
        assert_eq!(single.at(12345), (1, 12345));
    }

    #[test]
    fn two_datasets_follow_the_greedy_rule() {
        for weights in [[1.0, 2.0], [0.3, 0.7], [1.0, 1.0], [5.0, 1.0], [1e-3, 1.0]] {
            let blend = Blend::new(&weights, &[1, 1]).unwrap();
            let Node::Split {
                left,
                left_weight,
                weight,
                ..
            } = blend.nodes[blend.root]
            else {
                panic!("two datasets make a split");
            };
            let Node::Leaf { dataset: lighter } = blend.nodes[left] else {
                panic!("children of a two-leaf tree are leaves");
            };
            let q = if lighter == 0 {
                [left_weight, weight - left_weight]
            } else {
                [weight - left_weight, left_weight]
            };
            let mut counts = [0i128; 2];
            for p in 0..5000u64 {
                // lag_i · Q = (p + 1) · q_i - c_i · Q
                let lag = |i: usize| i128::from(p + 1) * i128::from(q[i]) - counts[i] * i128::from(weight);
                let greedy = match lag(0).cmp(&lag(1)) {
                    std::cmp::Ordering::Greater => 0,
                    std::cmp::Ordering::Less => 1,
                    std::cmp::Ordering::Equal => lighter,
                };
                assert_eq!(blend.at(p).0, greedy, "weights {weights:?}, position {p}");
                counts[greedy] += 1;
            }
        }
    }

    #[test]
    fn many_skewed_datasets_stay_within_two() {
        // Deep, lopsided trees: uniform, exponentially spread, halving and one-dominant weights.
        let mut state = 12345u64;
        for trial in 0..60usize {
            let k = 2 + trial % 30;
            let weights: Vec<f64> = (0..k)
                .map(|i| {
                    state = crate::sampler::prng::mix64(state.wrapping_add(1));
                    let u = crate::sampler::prng::unit_f64(state);
                    match trial % 4 {
                        0 => u + 1e-9,
                        1 => (-10.0 * u).exp(),
                        2 => 0.5f64.powi(i as i32),
                        _ if i == 0 => 100.0,
                        _ => u + 1e-9,
                    }
                })
                .collect();
            let blend = Blend::new(&weights, &vec![1; k]).unwrap();
            check_schedule(&blend, 4000, 2.0).unwrap();
        }
    }

    #[test]
    fn bad_weights_are_errors() {
        assert_eq!(Blend::new(&[], &[]), Err(SamplerError::NoDatasets));
        assert_eq!(
            Blend::new(&[1.0], &[1, 2]),
            Err(SamplerError::BlendLengthMismatch { weights: 1, sizes: 2 })
        );
        let err = Blend::new(&[1.0, -0.5], &[1, 1]).unwrap_err();
        assert_eq!(err, SamplerError::InvalidWeight { index: 1, weight: -0.5 });
        assert!(err.to_string().contains("dataset 1"), "{err}");
        assert!(err.to_string().contains("-0.5"), "{err}");
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = Blend::new(&[bad, 1.0], &[1, 1]).unwrap_err();
            assert!(matches!(err, SamplerError::InvalidWeight { index: 0, .. }), "{err}");
        }
        assert_eq!(
            Blend::new(&[0.0, 0.0], &[1, 1]),
            Err(SamplerError::AllWeightsZero { count: 2 })
        );
        assert_eq!(
            Blend::new(&[1.0, 0.5], &[3, 0]),
            Err(SamplerError::EmptyBlendDataset { index: 1, weight: 0.5 })
        );
        // Huge weights are fine: only ratios matter.
        let blend = Blend::new(&[f64::MAX, f64::MAX], &[1, 1]).unwrap();
        assert_eq!(blend.weights(), [0.5, 0.5]);
    }

    proptest! {
        #[test]
        fn schedule_is_exact_and_balanced(
            weights in proptest::collection::vec(prop_oneof![Just(0.0), 1e-3f64..100.0], 1..8),
            extra in 1e-3f64..100.0,
        ) {
            // At least one positive weight.
            let mut weights = weights;
            weights.push(extra);
            let sizes = vec![1; weights.len()];
            let blend = Blend::new(&weights, &sizes).unwrap();
            check_schedule(&blend, 3000, 2.0)?;
        }

        #[test]
        fn far_positions_stay_balanced(
            weights in proptest::collection::vec(1e-3f64..100.0, 1..10),
            position in 0u64..(1 << 40),
        ) {
            let blend = Blend::new(&weights, &vec![1; weights.len()]).unwrap();
            let before = blend.counts(position);
            let after = blend.counts(position + 1);
            prop_assert_eq!(before.iter().sum::<u64>(), position);
            let (dataset, index) = blend.at(position);
            prop_assert_eq!(index, before[dataset]);
            for i in 0..weights.len() {
                let expected = before[i] + u64::from(i == dataset);
                prop_assert_eq!(after[i], expected);
                let target = position as f64 * blend.weights()[i];
                prop_assert!((before[i] as f64 - target).abs() <= 2.01, "dataset {}: {} vs {}", i, before[i], target);
            }
        }
    }
}
