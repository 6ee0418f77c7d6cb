//! The unit executor and the pipeline interpreter.
//!
//! Forward: every unit starts from a leaf (`input.detach()` with grad), so the autograd graph
//! is one small graph per unit. Backward walks the units in reverse: backward from the unit's
//! output with `grad_out` ([`crate::autograd::backward_with`]), then each tensor-parallel cut
//! (f) has its leaf gradient all-reduced over TP and backpropagated from the cut's source; the
//! unit's input leaf now holds the gradient for the previous unit (or the previous stage).
//! Every graph is traversed once.
//!
//! [`run_schedule`] interprets a [`crate::schedule`] program: compute ops call the executor,
//! communication ops move activations and gradients over the pipeline communicator.
//! [`partition_layers`] decides which layers each stage holds.

use crate::autocast::with_bf16_autocast;
use crate::autograd::backward_with;
use crate::comm::TensorComm;
use crate::error::TrainError;
use crate::model::{MicroBatch, Model};
use crate::schedule::{Op, tag};
use crate::spec::ModelSpec;
use crate::tensor_parallel::{Cut, Fwd};
use gantry_collectives::ReduceOp;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// What one unit's forward left for its backward.
pub struct UnitRecord {
    input: Option<Tensor>,
    output: Tensor,
    cuts: Vec<Cut>,
}

/// Run the stage's units on one micro-batch. `input`: activations from the previous stage
/// (None on the first stage). Returns the output (hidden state, or the loss on the last
/// stage) and, when `grad`, the records backward needs. `autocast`: each unit runs under CUDA
/// bf16 autocast ([`crate::autocast`]); off, CUDA autocast is off for it.
pub fn forward_stage(
    model: &Model,
    input: Option<Tensor>,
    batch: &MicroBatch,
    tp: &mut TensorComm,
    grad: bool,
    autocast: bool,
    want_logits: bool,
) -> Result<(Tensor, Vec<UnitRecord>), TrainError> {
    let mut records = Vec::with_capacity(model.units.len());
    let mut x = input;
    for u in 0..model.units.len() {
        let leaf = x
            .take()
            .map(|t| if grad { t.detach().set_requires_grad(true) } else { t });
        let mut cx = Fwd {
            tp: &mut *tp,
            grad,
            cuts: Vec::new(),
        };
        let out = with_bf16_autocast(autocast, || {
            model.forward_unit(u, leaf.as_ref(), batch, &mut cx, want_logits)
        })??;
        let cuts = cx.cuts;
        if grad {
            records.push(UnitRecord {
                input: leaf,
                output: out.shallow_clone(),
                cuts,
            });
        }
        x = Some(out);
    }
    let out = x.ok_or_else(|| TrainError::Internal("a stage without units".into()))?;
    Ok((out, records))
}

/// Backward through a stage's records. `grad_out`: gradient of the stage output (None on the
/// last stage, whose output is the loss, scaled by `loss_scale`). Calls `unit_done(u)` as each
/// unit finishes. Returns the gradient of the stage input (None on the first stage).
pub fn backward_stage(
    records: Vec<UnitRecord>,
    grad_out: Option<Tensor>,
    loss_scale: f64,
    tp: &mut TensorComm,
    unit_done: &mut dyn FnMut(usize) -> Result<(), TrainError>,
) -> Result<Option<Tensor>, TrainError> {
    let mut grad = grad_out;
    for (u, rec) in records.into_iter().enumerate().rev() {
        match grad.take() {
            Some(g) => backward_with(&rec.output, &g.to_kind(rec.output.kind()))?,
            None => (&rec.output * loss_scale).f_backward()?,
        }
        for cut in rec.cuts.iter().rev() {
            let mut g = cut.leaf.grad();
            if !g.defined() {
                continue;
            }
            tp.all_reduce_(&mut g, ReduceOp::Sum)?;
            backward_with(&cut.source, &g.to_kind(cut.source.kind()))?;
        }
        unit_done(u)?;
        grad = match &rec.input {
            Some(leaf) => {
                let g = leaf.grad();
                Some(if g.defined() { g } else { leaf.zeros_like() })
            }
            None => None,
        };
    }
    Ok(grad)
}

/// Per-step pipeline state for one stage.
pub struct StepIo<'a> {
    pub model: &'a Model,
    pub tp: &'a mut TensorComm,
    pub pp: &'a mut TensorComm,
    /// Micro-batch `mb`'s inputs (tokens on the first stage, targets on the last).
    pub batches: &'a [MicroBatch],
    /// Shape of the activations exchanged between stages.
    pub act_shape: Vec<i64>,
    pub device: Device,
    pub autocast: bool,
    /// Scale of each micro-batch's loss in backward (1 / micro-batches).
    pub loss_scale: f64,
}

/// Run one step's program on this stage. Returns the sum of the micro-batch losses (last
/// stage; zero elsewhere) as a 0-dimensional f64 tensor on the stage's device, not read: the
/// trainer reads it with the gradient norm, once per step. `unit_done(mb, unit)` is called as
/// units finish backward.
pub fn run_schedule(
    io: &mut StepIo<'_>,
    ops: &[Op],
    grad: bool,
    unit_done: &mut dyn FnMut(usize, usize) -> Result<(), TrainError>,
) -> Result<Tensor, TrainError> {
    let pp_rank = io.pp.rank();
    let (prev, next) = (pp_rank.wrapping_sub(1), pp_rank + 1);
    let mut inputs: HashMap<usize, Tensor> = HashMap::new();
    let mut outputs: HashMap<usize, Tensor> = HashMap::new();
    let mut records: HashMap<usize, Vec<UnitRecord>> = HashMap::new();
    let mut out_grads: HashMap<usize, Tensor> = HashMap::new();
    let mut in_grads: HashMap<usize, Tensor> = HashMap::new();
    let mut loss_sum: Option<Tensor> = None;
    let last = io.model.plan.last;
    let missing =
        |what: &str, mb: usize| TrainError::Internal(format!("stage {pp_rank}: no {what} for micro-batch {mb}"));
    for &op in ops {
        match op {
            Op::RecvForward { mb } => {
                let t = io.pp.recv(&io.act_shape, io.device, prev, tag(op))?;
                inputs.insert(mb, t);
            }
            Op::Forward { mb } => {
                let input = inputs.remove(&mb);
                let (out, recs) = forward_stage(io.model, input, &io.batches[mb], io.tp, grad, io.autocast, false)?;
                if last {
                    let l = out.detach().to_kind(Kind::Double);
                    loss_sum = Some(match loss_sum {
                        Some(s) => s + l,
                        None => l,
                    });
                } else {
                    outputs.insert(mb, out.detach());
                }
                if grad {
                    records.insert(mb, recs);
                }
            }
            Op::SendForward { mb } => {
                let t = outputs.remove(&mb).ok_or_else(|| missing("output", mb))?;
                io.pp.send(&t, next, tag(op))?;
            }
            Op::RecvBackward { mb } => {
                let t = io.pp.recv(&io.act_shape, io.device, next, tag(op))?;
                out_grads.insert(mb, t);
            }
            Op::Backward { mb } => {
                let recs = records.remove(&mb).ok_or_else(|| missing("forward record", mb))?;
                let g = out_grads.remove(&mb);
                let input_grad = backward_stage(recs, g, io.loss_scale, io.tp, &mut |u| unit_done(mb, u))?;
                if let Some(g) = input_grad {
                    in_grads.insert(mb, g);
                }
            }
            Op::SendBackward { mb } => {
                let g = in_grads.remove(&mb).ok_or_else(|| missing("input gradient", mb))?;
                io.pp.send(&g, prev, tag(op))?;
            }
            Op::SendForwardRecvBackward { send, recv } => {
                let t = outputs.remove(&send).ok_or_else(|| missing("output", send))?;
                let g = io.pp.send_recv(&t, &io.act_shape, io.device, next, tag(op))?;
                out_grads.insert(recv, g);
            }
            Op::SendBackwardRecvForward { send, recv } => {
                let g = in_grads.remove(&send).ok_or_else(|| missing("input gradient", send))?;
                let t = io.pp.send_recv(&g, &io.act_shape, io.device, prev, tag(op))?;
                inputs.insert(recv, t);
            }
        }
    }
    Ok(loss_sum.unwrap_or_else(|| Tensor::zeros([], (Kind::Double, io.device))))
}

/// Split `n_layers` over `pp` stages: explicit counts, or balanced so the largest stage's
/// parameter count is as small as possible (the first stage also holds the embedding, the last
/// the head). Pure; every stage gets at least one layer.
pub fn partition_layers(spec: &ModelSpec, pp: usize, explicit: &[usize]) -> Vec<std::ops::Range<usize>> {
    let counts: Vec<usize> = if !explicit.is_empty() {
        explicit.to_vec()
    } else {
        let edge = (spec.vocab_size as u64).saturating_mul(spec.d_model as u64);
        let layer = spec.num_params().saturating_sub(edge).max(1) / spec.n_layers.max(1) as u64;
        balance(spec.n_layers, pp, layer.max(1), edge)
    };
    let mut start = 0;
    counts
        .iter()
        .map(|&c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}

/// Layer counts per stage minimizing the maximum of `layers·layer_cost (+ edge_cost on the
/// first and last stage)`.
pub fn balance(n_layers: usize, pp: usize, layer_cost: u64, edge_cost: u64) -> Vec<usize> {
    if pp == 1 {
        return vec![n_layers];
    }
    let layer_cost = layer_cost.max(1);
    let edge = |stage: usize| if stage == 0 || stage == pp - 1 { edge_cost } else { 0 };
    let cost = |stage: usize, layers: usize| (layers as u64).saturating_mul(layer_cost).saturating_add(edge(stage));
    // Smallest feasible bound by binary search over the answer; then fill greedily.
    let (mut lo, mut hi) = (0u64, cost(0, n_layers).saturating_add(edge_cost));
    let fits = |bound: u64| -> Option<Vec<usize>> {
        let mut left = n_layers;
        let mut out = Vec::with_capacity(pp);
        for s in 0..pp {
            let stages_after = pp - s - 1;
            // The most layers this stage can take within `bound` (computed, not counted up:
            // a model with many layers must not make this linear in them).
            let most = bound.checked_sub(edge(s)).map_or(0, |b| b / layer_cost);
            let take = usize::try_from(most).unwrap_or(usize::MAX).min(left - stages_after);
            if take == 0 {
                return None;
            }
            out.push(take);
            left -= take;
        }
        (left == 0).then_some(out)
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    fits(lo).expect("the upper bound always fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_gives_every_stage_a_layer_and_sums() {
        for n in 1..12 {
            for pp in 1..=n {
                for edge in [0, 3, 50] {
                    let c = balance(n, pp, 10, edge);
                    assert_eq!(c.len(), pp);
                    assert_eq!(c.iter().sum::<usize>(), n);
                    assert!(c.iter().all(|&x| x >= 1), "{n} {pp} {edge}: {c:?}");
                }
            }
        }
    }

    #[test]
    fn balance_is_optimal_against_brute_force() {
        fn max_cost(c: &[usize], layer: u64, edge: u64) -> u64 {
            let pp = c.len();
            c.iter()
                .enumerate()
                .map(|(s, &l)| l as u64 * layer + if s == 0 || s == pp - 1 { edge } else { 0 })
                .max()
                .unwrap()
        }
        fn best(n: usize, pp: usize, layer: u64, edge: u64, prefix: &mut Vec<usize>) -> u64 {
            if prefix.len() == pp - 1 {
                let used: usize = prefix.iter().sum();
                if used >= n {
                    return u64::MAX;
                }
                prefix.push(n - used);
                let c = max_cost(prefix, layer, edge);
                prefix.pop();
                return c;
            }
            let used: usize = prefix.iter().sum();
            let mut b = u64::MAX;
            for take in 1..n.saturating_sub(used) {
                prefix.push(take);
                b = b.min(best(n, pp, layer, edge, prefix));
                prefix.pop();
            }
            b
        }
        for n in 2..10 {
            for pp in 2..=n.min(5) {
                for edge in [0, 5, 10, 40] {
                    let c = balance(n, pp, 10, edge);
                    assert_eq!(
                        max_cost(&c, 10, edge),
                        best(n, pp, 10, edge, &mut Vec::new()),
                        "{n} {pp} {edge} {c:?}"
                    );
                }
            }
        }
        assert_eq!(balance(4, 2, 10, 0), vec![2, 2]);
        // Many layers: computed per stage, not counted one by one.
        let big = balance(1 << 40, 3, 1 << 20, u64::MAX / 2);
        assert_eq!(big.iter().sum::<usize>(), 1 << 40);
    }
}
