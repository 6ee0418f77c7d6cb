//! The DP × PP × TP device mesh and the rank groups derived from it.
//!
//! Ranks are laid out in Megatron order: tensor parallelism (TP) is innermost, then data
//! parallelism (DP), then pipeline parallelism (PP) outermost:
//!
//! ```text
//! rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
//! ```
//!
//! Why this order: TP exchanges activations in every layer (several all-reduces per layer, on the
//! critical path), so it needs the fastest links. Launchers hand out consecutive ranks to the
//! GPUs of one node, so keeping TP innermost makes every TP group a contiguous block of ranks
//! that lives on one node's NVLink/shared memory (as long as `tp` divides the GPUs per node).
//! DP all-reduces gradients once per step and can overlap them with the backward pass; PP only
//! sends point-to-point activations between neighbouring stages, the least traffic of all, so it
//! goes outermost and is the dimension that crosses nodes first.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One parallelism dimension of the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    /// Data parallelism: replicas that each see a different shard of the batch.
    Dp,
    /// Tensor parallelism: ranks that split each layer's weights (innermost).
    Tp,
    /// Pipeline parallelism: ranks that hold consecutive stages of the model (outermost).
    Pp,
}

impl Dim {
    /// All dimensions, in the order used by [`ParallelLayout::new`].
    pub const ALL: [Dim; 3] = [Dim::Dp, Dim::Tp, Dim::Pp];

    /// Short lowercase name (`"dp"`, `"tp"`, `"pp"`), as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Dim::Dp => "dp",
            Dim::Tp => "tp",
            Dim::Pp => "pp",
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a layout is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("world size must be at least 1, got 0")]
    EmptyWorld,

    #[error("{dim} must be at least 1, got 0 (world size {world})")]
    ZeroDegree { dim: Dim, world: usize },

    #[error("dp {dp} × tp {tp} × pp {pp} = {product} ranks, but the world has {world}")]
    WorldMismatch {
        world: usize,
        dp: usize,
        tp: usize,
        pp: usize,
        product: usize,
    },

    #[error("dp {dp} × tp {tp} × pp {pp} overflows (more than {max} ranks), but the world has {world}", max = usize::MAX)]
    Overflow {
        world: usize,
        dp: usize,
        tp: usize,
        pp: usize,
    },

    #[error("world size {world} is not divisible by tp {tp} × pp {pp}")]
    NotDivisible { world: usize, tp: usize, pp: usize },
}

/// Where one rank sits in the mesh: its rank within its DP, TP and PP groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coords {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

impl Coords {
    /// The coordinate along one dimension.
    pub fn get(self, dim: Dim) -> usize {
        match dim {
            Dim::Dp => self.dp,
            Dim::Tp => self.tp,
            Dim::Pp => self.pp,
        }
    }
}

/// A validated `world = dp × tp × pp` mesh in Megatron order (TP innermost, PP outermost).
///
/// Methods that take a rank or [`Coords`] panic when it is outside the mesh: that is a bug in
/// the caller, not a runtime condition.
/// ```
/// use gantry_collectives::ParallelLayout;
///
/// // 8 ranks: 2 data-parallel replicas × 2-way tensor × 2-way pipeline parallelism.
/// let layout = ParallelLayout::new(8, 2, 2, 2).unwrap();
/// assert_eq!(layout.tp_group(5), vec![4, 5]); // TP innermost: neighbours share a node
/// assert_eq!(layout.dp_group(5), vec![5, 7]);
/// assert_eq!(layout.pp_group(5), vec![1, 5]);
/// let err = ParallelLayout::new(8, 2, 2, 3).unwrap_err().to_string();
/// assert!(err.contains("dp 2 × tp 2 × pp 3 = 12 ranks, but the world has 8"), "{err}");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "LayoutSpec")]
pub struct ParallelLayout {
    world: usize,
    dp: usize,
    tp: usize,
    pp: usize,
}

/// Unvalidated wire form; deserializing goes through [`ParallelLayout::new`].
#[derive(Deserialize)]
struct LayoutSpec {
    world: usize,
    dp: usize,
    tp: usize,
    pp: usize,
}

impl TryFrom<LayoutSpec> for ParallelLayout {
    type Error = LayoutError;
    fn try_from(s: LayoutSpec) -> Result<Self, LayoutError> {
        ParallelLayout::new(s.world, s.dp, s.tp, s.pp)
    }
}

impl ParallelLayout {
    /// Validates `world = dp × tp × pp` with every factor at least 1.
    pub fn new(world: usize, dp: usize, tp: usize, pp: usize) -> Result<Self, LayoutError> {
        if world == 0 {
            return Err(LayoutError::EmptyWorld);
        }
        for (dim, degree) in [(Dim::Dp, dp), (Dim::Tp, tp), (Dim::Pp, pp)] {
            if degree == 0 {
                return Err(LayoutError::ZeroDegree { dim, world });
            }
        }
        let Some(product) = dp.checked_mul(tp).and_then(|x| x.checked_mul(pp)) else {
            return Err(LayoutError::Overflow { world, dp, tp, pp });
        };
        if product != world {
            return Err(LayoutError::WorldMismatch {
                world,
                dp,
                tp,
                pp,
                product,
            });
        }
        Ok(Self { world, dp, tp, pp })
    }

    /// Builds the layout with `dp = world / (tp × pp)`, failing when that does not divide.
    pub fn infer(world: usize, tp: usize, pp: usize) -> Result<Self, LayoutError> {
        if world == 0 {
            return Err(LayoutError::EmptyWorld);
        }
        for (dim, degree) in [(Dim::Tp, tp), (Dim::Pp, pp)] {
            if degree == 0 {
                return Err(LayoutError::ZeroDegree { dim, world });
            }
        }
        // Divide step by step so that a huge tp × pp cannot overflow.
        if !world.is_multiple_of(tp) || !(world / tp).is_multiple_of(pp) {
            return Err(LayoutError::NotDivisible { world, tp, pp });
        }
        Self::new(world, world / tp / pp, tp, pp)
    }

    pub fn world(&self) -> usize {
        self.world
    }
    pub fn dp(&self) -> usize {
        self.dp
    }
    pub fn tp(&self) -> usize {
        self.tp
    }
    pub fn pp(&self) -> usize {
        self.pp
    }

    /// The degree (group size) of one dimension.
    pub fn size(&self, dim: Dim) -> usize {
        match dim {
            Dim::Dp => self.dp,
            Dim::Tp => self.tp,
            Dim::Pp => self.pp,
        }
    }

    /// Distance in global ranks between neighbours along `dim` (1 for TP: innermost).
    pub fn stride(&self, dim: Dim) -> usize {
        match dim {
            Dim::Tp => 1,
            Dim::Dp => self.tp,
            Dim::Pp => self.tp * self.dp,
        }
    }

    fn check_rank(&self, rank: usize) {
        assert!(rank < self.world, "rank {rank} out of range for {self}");
    }

    /// The mesh coordinates of `rank`.
    pub fn coords(&self, rank: usize) -> Coords {
        self.check_rank(rank);
        Coords {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        }
    }

    /// The global rank at `c`; inverse of [`coords`](Self::coords).
    pub fn rank_of(&self, c: Coords) -> usize {
        assert!(
            c.dp < self.dp && c.tp < self.tp && c.pp < self.pp,
            "coordinates {c:?} out of range for {self}"
        );
        (c.pp * self.dp + c.dp) * self.tp + c.tp
    }

    /// The global ranks that differ from `rank` only along `dim`, ascending (which for PP is
    /// stage order). `rank`'s position in it is `coords(rank).get(dim)`.
    pub fn group(&self, dim: Dim, rank: usize) -> Vec<usize> {
        let stride = self.stride(dim);
        let base = rank - self.coords(rank).get(dim) * stride;
        (0..self.size(dim)).map(|i| base + i * stride).collect()
    }

    /// A group index, unique per `dim` group and in `0..world / size(dim)`, for splitting a
    /// communicator: ranks with equal colour form one group. `all_groups(dim)[color]` is it.
    pub fn color(&self, dim: Dim, rank: usize) -> usize {
        let c = self.coords(rank);
        match dim {
            Dim::Tp => c.pp * self.dp + c.dp,
            Dim::Dp => c.pp * self.tp + c.tp,
            Dim::Pp => c.dp * self.tp + c.tp,
        }
    }

    /// Every group along `dim`, indexed by [`color`](Self::color). They partition the world.
    pub fn all_groups(&self, dim: Dim) -> Vec<Vec<usize>> {
        (0..self.world)
            .filter(|&r| self.coords(r).get(dim) == 0)
            .map(|r| self.group(dim, r))
            .collect()
    }

    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        self.group(Dim::Tp, rank)
    }
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        self.group(Dim::Dp, rank)
    }
    /// The ranks holding each pipeline stage for `rank`'s (dp, tp) slice, in stage order.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        self.group(Dim::Pp, rank)
    }
    pub fn all_tp_groups(&self) -> Vec<Vec<usize>> {
        self.all_groups(Dim::Tp)
    }
    pub fn all_dp_groups(&self) -> Vec<Vec<usize>> {
        self.all_groups(Dim::Dp)
    }
    pub fn all_pp_groups(&self) -> Vec<Vec<usize>> {
        self.all_groups(Dim::Pp)
    }
    pub fn tp_color(&self, rank: usize) -> usize {
        self.color(Dim::Tp, rank)
    }
    pub fn dp_color(&self, rank: usize) -> usize {
        self.color(Dim::Dp, rank)
    }
    pub fn pp_color(&self, rank: usize) -> usize {
        self.color(Dim::Pp, rank)
    }

    pub fn is_first_stage(&self, rank: usize) -> bool {
        self.coords(rank).pp == 0
    }
    pub fn is_last_stage(&self, rank: usize) -> bool {
        self.coords(rank).pp == self.pp - 1
    }
    /// The rank holding the next pipeline stage with the same dp and tp coordinates.
    pub fn next_stage_rank(&self, rank: usize) -> Option<usize> {
        (!self.is_last_stage(rank)).then(|| rank + self.stride(Dim::Pp))
    }
    /// The rank holding the previous pipeline stage with the same dp and tp coordinates.
    pub fn prev_stage_rank(&self, rank: usize) -> Option<usize> {
        (!self.is_first_stage(rank)).then(|| rank - self.stride(Dim::Pp))
    }

    /// `(dp_rank, dp_size)`: which data shard this rank reads and how many shards there are.
    /// TP peers and all stages of one pipeline share it, so they see the same samples.
    pub fn dp_rank_and_size(&self, rank: usize) -> (usize, usize) {
        (self.coords(rank).dp, self.dp)
    }

    /// The summary line followed by a `rank dp tp pp` table of the whole mesh.
    pub fn describe(&self) -> String {
        let w = |n: usize| n.to_string().len().max(2);
        let (wr, wd, wt, wp) = (w(self.world - 1).max(4), w(self.dp), w(self.tp), w(self.pp));
        let mut out = format!("{self} (Megatron order: tp innermost, pp outermost)\n");
        out += &format!("{:>wr$}  {:>wd$}  {:>wt$}  {:>wp$}\n", "rank", "dp", "tp", "pp");
        for rank in 0..self.world {
            let c = self.coords(rank);
            out += &format!("{rank:>wr$}  {:>wd$}  {:>wt$}  {:>wp$}\n", c.dp, c.tp, c.pp);
        }
        out
    }
}

impl fmt::Display for ParallelLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { world, dp, tp, pp } = self;
        write!(f, "world {world} = dp {dp} × tp {tp} × pp {pp}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn validation_errors_name_each_factor() {
        #[rustfmt::skip]
        let cases = [
            ((8, 0, 2, 2), "dp must be at least 1, got 0 (world size 8)"),
            ((8, 2, 0, 2), "tp must be at least 1, got 0 (world size 8)"),
            ((8, 2, 2, 0), "pp must be at least 1, got 0 (world size 8)"),
            ((0, 1, 1, 1), "world size must be at least 1, got 0"),
            ((8, 2, 2, 3), "dp 2 × tp 2 × pp 3 = 12 ranks, but the world has 8"),
            ((16, 1, 2, 4), "dp 1 × tp 2 × pp 4 = 8 ranks, but the world has 16"),
        ];
        for ((world, dp, tp, pp), want) in cases {
            let got = ParallelLayout::new(world, dp, tp, pp).unwrap_err();
            assert_eq!(got.to_string(), want);
        }
        let e = ParallelLayout::new(8, 2, 0, 2).unwrap_err();
        assert!(matches!(e, LayoutError::ZeroDegree { dim: Dim::Tp, .. }));
        let e = ParallelLayout::new(8, usize::MAX, 2, 1).unwrap_err();
        assert!(matches!(e, LayoutError::Overflow { .. }), "{e}");
        // Wrapping, this product would be exactly 2: the world size it claims to match.
        let e = ParallelLayout::new(2, 6148914691236517206, 1, 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dp 6148914691236517206 × tp 1 × pp 3 overflows (more than 18446744073709551615 ranks), but the world has 2"
        );
    }

    #[test]
    fn infer_computes_dp_or_names_tp_and_pp() {
        let l = ParallelLayout::infer(12, 2, 2).unwrap();
        assert_eq!((l.world(), l.dp(), l.tp(), l.pp()), (12, 3, 2, 2));
        #[rustfmt::skip]
        let cases = [
            ((8, 3, 1), "world size 8 is not divisible by tp 3 × pp 1"),
            ((4, 4, 2), "world size 4 is not divisible by tp 4 × pp 2"),
            ((8, 0, 2), "tp must be at least 1, got 0 (world size 8)"),
            ((8, 2, 0), "pp must be at least 1, got 0 (world size 8)"),
            ((0, 1, 1), "world size must be at least 1, got 0"),
        ];
        for ((world, tp, pp), want) in cases {
            let got = ParallelLayout::infer(world, tp, pp).unwrap_err();
            assert_eq!(got.to_string(), want);
        }
        let e = ParallelLayout::infer(8, usize::MAX, usize::MAX).unwrap_err();
        assert!(matches!(e, LayoutError::NotDivisible { .. }), "{e}");
    }

    #[test]
    fn megatron_order_and_display() {
        let l = ParallelLayout::new(8, 2, 2, 2).unwrap();
        assert_eq!(l.to_string(), "world 8 = dp 2 × tp 2 × pp 2");
        let c = l.coords(5);
        assert_eq!((c.dp, c.tp, c.pp), (0, 1, 1));
        assert_eq!(l.all_tp_groups(), [[0, 1], [2, 3], [4, 5], [6, 7]]);
        assert_eq!(l.all_dp_groups(), [[0, 2], [1, 3], [4, 6], [5, 7]]);
        assert_eq!(l.all_pp_groups(), [[0, 4], [1, 5], [2, 6], [3, 7]]);
        assert_eq!([l.tp_color(5), l.dp_color(5), l.pp_color(5)], [2, 3, 1]);
        assert_eq!(l.next_stage_rank(1), Some(5));
        assert_eq!(l.prev_stage_rank(1), None);
        assert_eq!(l.next_stage_rank(6), None);
        assert_eq!(l.prev_stage_rank(6), Some(2));
        assert_eq!(l.dp_rank_and_size(6), (1, 2));
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let l = ParallelLayout::new(12, 3, 2, 2).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"world":12,"dp":3,"tp":2,"pp":2}"#);
        assert_eq!(serde_json::from_str::<ParallelLayout>(&json).unwrap(), l);
        let bad = serde_json::from_str::<ParallelLayout>(r#"{"world":8,"dp":2,"tp":2,"pp":3}"#);
        let msg = bad.unwrap_err().to_string();
        assert!(
            msg.contains("dp 2 × tp 2 × pp 3 = 12 ranks, but the world has 8"),
            "{msg}"
        );
        let coords = serde_json::to_string(&l.coords(9)).unwrap();
        assert_eq!(coords, r#"{"dp":1,"tp":1,"pp":1}"#);
    }

    #[test]
    #[should_panic(expected = "rank 8 out of range")]
    fn out_of_range_rank_panics() {
        ParallelLayout::new(8, 2, 2, 2).unwrap().coords(8);
    }

    proptest! {
        #[test]
        fn mesh_invariants(dp in 1usize..=8, tp in 1usize..=8, pp in 1usize..=8) {
            let world = dp * tp * pp;
            let l = ParallelLayout::new(world, dp, tp, pp).unwrap();
            prop_assert_eq!(ParallelLayout::infer(world, tp, pp).unwrap(), l);
            for dim in Dim::ALL {
                let groups = l.all_groups(dim);
                prop_assert_eq!(groups.len(), world / l.size(dim));
                // Groups partition the world: sizes add up and no rank appears twice.
                let seen: BTreeSet<usize> = groups.iter().flatten().copied().collect();
                prop_assert_eq!(seen.len(), world);
                prop_assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), world);
                for rank in 0..world {
                    let g = l.group(dim, rank);
                    prop_assert_eq!(g.len(), l.size(dim));
                    prop_assert!(g.windows(2).all(|w| w[0] < w[1]));
                    prop_assert_eq!(g[l.coords(rank).get(dim)], rank);
                    prop_assert_eq!(groups.iter().filter(|g| g.contains(&rank)).count(), 1);
                    prop_assert_eq!(&groups[l.color(dim, rank)], &g);
                    // Members agree on every other coordinate.
                    for &peer in &g {
                        for other in Dim::ALL.into_iter().filter(|&d| d != dim) {
                            prop_assert_eq!(l.coords(peer).get(other), l.coords(rank).get(other));
                        }
                    }
                }
            }
            for rank in 0..world {
                let c = l.coords(rank);
                prop_assert_eq!(c.tp, rank % tp);
                prop_assert_eq!(c.dp, (rank / tp) % dp);
                prop_assert_eq!(c.pp, rank / (tp * dp));
                prop_assert_eq!(l.rank_of(c), rank);
                // TP innermost: TP peers are one contiguous block of ranks.
                let start = rank - rank % tp;
                prop_assert_eq!(l.tp_group(rank), (start..start + tp).collect::<Vec<_>>());
                prop_assert_eq!(l.is_first_stage(rank), c.pp == 0);
                prop_assert_eq!(l.is_last_stage(rank), c.pp == pp - 1);
                if let Some(next) = l.next_stage_rank(rank) {
                    prop_assert_eq!(l.prev_stage_rank(next), Some(rank));
                    prop_assert_eq!(l.coords(next), Coords { pp: c.pp + 1, ..c });
                } else {
                    prop_assert!(l.is_last_stage(rank));
                }
                if let Some(prev) = l.prev_stage_rank(rank) {
                    prop_assert_eq!(l.next_stage_rank(prev), Some(rank));
                } else {
                    prop_assert!(l.is_first_stage(rank));
                }
                prop_assert_eq!(l.dp_rank_and_size(rank), (c.dp, dp));
            }
        }
    }

    fn render_golden(l: &ParallelLayout) -> String {
        let mut out = l.describe();
        for dim in [Dim::Tp, Dim::Dp, Dim::Pp] {
            out += &format!("\n{} groups (color: ranks):\n", dim.name().to_uppercase());
            for (color, g) in l.all_groups(dim).iter().enumerate() {
                out += &format!("  {color}: {g:?}\n");
            }
        }
        out
    }

    #[test]
    fn golden_layouts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/layout");
        let bless = std::env::var("GANTRY_BLESS").is_ok_and(|v| v == "1");
        let mut failures = Vec::new();
        for (world, dp, tp, pp) in [(8, 2, 2, 2), (8, 1, 2, 4), (12, 3, 2, 2), (6, 3, 2, 1), (1, 1, 1, 1)] {
            let actual = render_golden(&ParallelLayout::new(world, dp, tp, pp).unwrap());
            let path = dir.join(format!("{world}-dp{dp}-tp{tp}-pp{pp}.txt"));
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &actual).unwrap();
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(expected) if expected == actual => {}
                Ok(expected) => failures.push(format!(
                    "{}: mismatch\n--- expected\n{expected}--- actual\n{actual}",
                    path.display()
                )),
                Err(e) => failures.push(format!("{}: {e}", path.display())),
            }
        }
        assert!(
            failures.is_empty(),
            "{}\n(rerun with GANTRY_BLESS=1 to rewrite)",
            failures.join("\n")
        );
    }
}
