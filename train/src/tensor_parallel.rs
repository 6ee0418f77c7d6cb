//! Megatron-style tensor parallelism without custom autograd functions.
//!
//! The two conjugate operators:
//! - **f** (identity forward, all-reduce backward) sits where a replicated activation enters
//!   column-parallel layers. tch has no custom backward, so [`Fwd::enter_tp`] *cuts* the graph
//!   there: the layers see a fresh leaf, and the unit executor (`stage.rs`) later all-reduces
//!   that leaf's gradient over TP and continues backward from the original tensor with it.
//! - **g** (all-reduce forward, identity backward) sits after row-parallel layers:
//!   `y = allreduce(x).detach() + (x - x.detach())` has the all-reduced value and the identity
//!   as gradient, exactly.
//!
//! Vocabulary-parallel cross-entropy uses only g: the row max is shift-only (no gradient
//! needed), and the global sum of exponentials and the target logit are sums over ranks whose
//! per-rank derivatives are exactly what g passes through.

use crate::comm::TensorComm;
use crate::error::TrainError;
use gantry_collectives::ReduceOp;
use tch::{Kind, Reduction, Tensor};

/// A cut made by f: `leaf` stands for `source` in the rest of the graph.
pub struct Cut {
    pub source: Tensor,
    pub leaf: Tensor,
}

/// What a unit's forward pass needs besides its input.
pub struct Fwd<'a> {
    pub tp: &'a mut TensorComm,
    /// Whether gradients will be needed (false in evaluation and generation).
    pub grad: bool,
    /// Cuts made during this unit's forward, in order.
    pub cuts: Vec<Cut>,
}

impl Fwd<'_> {
    /// f: identity forward; its backward all-reduces over TP (done by the unit executor).
    pub fn enter_tp(&mut self, x: &Tensor) -> Tensor {
        if self.tp.is_trivial() || !self.grad {
            return x.shallow_clone();
        }
        let leaf = x.detach().set_requires_grad(true);
        self.cuts.push(Cut {
            source: x.shallow_clone(),
            leaf: leaf.shallow_clone(),
        });
        leaf
    }

    /// g: all-reduce (sum) forward, identity backward.
    pub fn reduce_tp(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        if self.tp.is_trivial() {
            return Ok(x.shallow_clone());
        }
        let reduced = self.tp.all_reduced(x, ReduceOp::Sum)?;
        if !self.grad {
            return Ok(reduced);
        }
        Ok(reduced + (x - x.detach()))
    }

    /// A row-parallel linear layer: `x · wᵀ` summed over TP (g), then `bias` added once. With
    /// a single TP rank the bias goes into the matmul itself (one fused kernel, as in
    /// `nn.Linear`; under autocast it also keeps the output in bf16).
    pub fn row_parallel_linear(&mut self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, TrainError> {
        if self.tp.is_trivial() {
            return Ok(x.linear(w, bias));
        }
        let o = self.reduce_tp(&x.linear::<Tensor>(w, None))?;
        Ok(match bias {
            Some(b) => o + b,
            None => o,
        })
    }

    /// All-reduce with max, no gradient (used for the softmax shift).
    fn max_tp(&mut self, x: &Tensor) -> Result<Tensor, TrainError> {
        if self.tp.is_trivial() {
            return Ok(x.detach());
        }
        self.tp.all_reduced(&x.detach(), ReduceOp::Max)
    }
}

/// Rows `[lo, lo + len)` of a vocabulary held by this TP rank.
#[derive(Clone, Copy, Debug)]
pub struct VocabShard {
    pub lo: i64,
    pub len: i64,
}

/// Vocabulary-parallel embedding lookup: each rank looks up the ids in its shard, zeros the
/// rest, and g sums the shards.
pub fn vocab_parallel_embedding(
    cx: &mut Fwd<'_>,
    weight: &Tensor,
    ids: &Tensor,
    shard: VocabShard,
) -> Result<Tensor, TrainError> {
    if cx.tp.is_trivial() {
        return Ok(Tensor::embedding(weight, ids, -1, false, false));
    }
    let inside = ids.ge(shard.lo).logical_and(&ids.lt(shard.lo + shard.len));
    let local = (ids - shard.lo) * inside.to_kind(Kind::Int64);
    let e = Tensor::embedding(weight, &local, -1, false, false) * inside.unsqueeze(-1).to_kind(weight.kind());
    cx.reduce_tp(&e)
}

/// Mean cross-entropy of `logits` (`[N, V/tp]`, this rank's vocabulary shard) against
/// `targets` (`[N]`, global ids), without gathering the full vocabulary.
pub fn vocab_parallel_cross_entropy(
    cx: &mut Fwd<'_>,
    logits: &Tensor,
    targets: &Tensor,
    shard: VocabShard,
) -> Result<Tensor, TrainError> {
    let logits = logits.to_kind(Kind::Float);
    if cx.tp.is_trivial() {
        return Ok(logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -100, 0.0));
    }
    let max = cx.max_tp(&logits.amax(-1, true))?;
    let shifted = &logits - max;
    let sum_exp = cx.reduce_tp(&shifted.exp().sum_dim_intlist(-1, false, Kind::Float))?;
    let inside = targets.ge(shard.lo).logical_and(&targets.lt(shard.lo + shard.len));
    let local = ((targets - shard.lo) * inside.to_kind(Kind::Int64)).unsqueeze(-1);
    let picked = shifted.gather(-1, &local, false).squeeze_dim(-1) * inside.to_kind(Kind::Float);
    let target_logit = cx.reduce_tp(&picked)?;
    Ok((sum_exp.log() - target_logit).mean(Kind::Float))
}

/// Full logits of the last position, gathered over the vocabulary shards (generation only).
pub fn gather_vocab(tp: &mut TensorComm, logits_last: &Tensor, shard: VocabShard) -> Result<Tensor, TrainError> {
    if tp.is_trivial() {
        return Ok(logits_last.to_kind(Kind::Float));
    }
    let rows = logits_last.size()[0];
    let full = Tensor::zeros(
        [rows, shard.len * tp.size() as i64],
        (Kind::Float, logits_last.device()),
    );
    tch::no_grad(|| {
        full.narrow(1, shard.lo, shard.len)
            .copy_(&logits_last.to_kind(Kind::Float));
    });
    tp.all_reduced(&full, ReduceOp::Sum)
}
