//! Gradient buckets and their flat buffers: which parameters share a bucket, where each sits
//! in it, and the flat f32 parameter and gradient buffer of every bucket.
//!
//! [`plan_buckets`] groups parameters into buckets of about `bucket_mb`, in reverse creation
//! order (the order backward finishes them). A bucket never mixes parameters that the
//! optimizer or the norm treat differently (weight decay or not, counted in the global norm or
//! not), and a tied embedding shared across pipeline stages gets a bucket of its own so the
//! first and last stage hold identically shaped buckets for it.
//!
//! [`FlatBuckets::adopt`] moves every parameter's values into a view of its bucket's
//! parameter buffer (`set_data`) and points its `.grad` at a view of the bucket's gradient
//! buffer ([`crate::autograd::set_grad`]). From then on:
//! - backward accumulates straight into the flat gradients (autograd adds into a defined
//!   `.grad` in place), so a finished bucket is reduced, measured and clipped without packing;
//! - the optimizer updates the flat parameter buffer, or this rank's ZeRO-1 shard of it, in
//!   place, and the model computes with the new values without an unpacking copy; the fp32
//!   master weights *are* the parameters, so they are not stored twice;
//! - zeroing the gradients is one fill per bucket.
//!
//! This is PyTorch DDP's `gradient_as_bucket_view` and Megatron's contiguous parameter and
//! gradient buffers. Each parameter starts at a multiple of [`ALIGN`] elements, so the views
//! keep the alignment that vectorized kernels and cuBLAS want; the gaps stay zero (zero
//! gradient, zero moments: AdamW leaves them zero).

use crate::autograd::set_grad;
use crate::error::TrainError;
use crate::model::Model;
use crate::param::{Param, ParamId};
use std::ops::Range;
use tch::{Kind, Tensor};

/// Every parameter's offset in its bucket is a multiple of this many f32 elements (256 bytes).
pub const ALIGN: usize = 64;

pub(crate) struct Bucket {
    pub params: Vec<ParamId>,
    /// Start of each parameter in the flat bucket, a multiple of [`ALIGN`] elements (the gaps
    /// between parameters stay zero).
    pub offsets: Vec<usize>,
    /// Flat length, padded to a multiple of the DP size.
    pub len: usize,
    pub decay: bool,
    pub counts_in_norm: bool,
    /// Holds only the tied embedding of a pipelined model.
    pub tied: bool,
}

impl Bucket {
    /// This rank's range of the flat bucket: all of it, or its ZeRO-1 shard.
    pub fn shard(&self, zero: bool, dp_rank: usize, dp: usize) -> Range<usize> {
        if zero {
            let n = self.len / dp;
            dp_rank * n..(dp_rank + 1) * n
        } else {
            0..self.len
        }
    }
}

/// Group the model's parameters into buckets of about `bucket_bytes`.
pub(crate) fn plan_buckets(
    model: &Model,
    tp_rank: usize,
    dp: usize,
    bucket_bytes: usize,
    pipelined: bool,
) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut open: Vec<Option<usize>> = vec![None; 4];
    let params: Vec<(ParamId, &Param)> = model.params.iter().collect();
    for &(id, p) in params.iter().rev() {
        let tied = pipelined && model.spec.tie_embeddings && p.name == "embed.wte";
        let (decay, norm) = (p.decay, p.counts_in_norm(tp_rank));
        let key = usize::from(decay) * 2 + usize::from(norm);
        let slot = if tied { None } else { open[key] };
        let b = match slot {
            Some(b) if buckets[b].len * 4 < bucket_bytes => b,
            _ => {
                buckets.push(Bucket {
                    params: Vec::new(),
                    offsets: Vec::new(),
                    len: 0,
                    decay,
                    counts_in_norm: norm,
                    tied,
                });
                let b = buckets.len() - 1;
                if !tied {
                    open[key] = Some(b);
                }
                b
            }
        };
        let bucket = &mut buckets[b];
        let start = bucket.len.next_multiple_of(ALIGN);
        bucket.offsets.push(start);
        bucket.params.push(id);
        bucket.len = start + p.numel();
    }
    for b in &mut buckets {
        b.len = b.len.div_ceil(dp) * dp;
    }
    buckets
}

pub(crate) struct FlatBuckets {
    /// Per bucket: the parameter values (`bucket.len` f32), shared with the model.
    pub params: Vec<Tensor>,
    /// Per bucket: the gradients (`bucket.len` f32), shared with the parameters' `.grad`.
    pub grads: Vec<Tensor>,
}

impl FlatBuckets {
    /// Allocate one parameter and one gradient buffer per bucket on the model's device, copy
    /// each parameter into its place and make the parameter and its gradient views of them.
    pub fn adopt(model: &Model, buckets: &[Bucket]) -> Result<FlatBuckets, TrainError> {
        let device = model.params.device();
        let mut flat = FlatBuckets {
            params: Vec::with_capacity(buckets.len()),
            grads: Vec::with_capacity(buckets.len()),
        };
        for bucket in buckets {
            let values = Tensor::zeros([bucket.len as i64], (Kind::Float, device));
            let grads = Tensor::zeros([bucket.len as i64], (Kind::Float, device));
            for (&id, &offset) in bucket.params.iter().zip(&bucket.offsets) {
                let p = model.params.param(id);
                if p.tensor.kind() != Kind::Float {
                    return Err(TrainError::Internal(format!(
                        "parameter {} is {:?}; flat buckets hold f32 master weights",
                        p.name,
                        p.tensor.kind()
                    )));
                }
                let shape = p.tensor.size();
                let n = p.numel() as i64;
                let mut view = values.narrow(0, offset as i64, n).view(shape.as_slice());
                tch::no_grad(|| view.copy_(&p.tensor));
                // A shallow clone shares the parameter's tensor: setting its data moves the
                // model's parameter, which stays a leaf that requires grad.
                p.tensor.shallow_clone().set_data(&view);
                set_grad(&p.tensor, &grads.narrow(0, offset as i64, n).view(shape.as_slice()))
                    .map_err(|e| TrainError::Internal(format!("parameter {}: {e}", p.name)))?;
            }
            flat.params.push(values);
            flat.grads.push(grads);
        }
        Ok(flat)
    }

    /// Zero every gradient with one multi-tensor call (on CUDA one launch for all buckets);
    /// the parameters' `.grad` stay views of the buffers.
    ///
    /// The first micro-batch cannot overwrite instead: libtorch's AccumulateGrad adds into a
    /// defined `.grad` in place and writes only into an undefined one, and then it installs
    /// the incoming gradient tensor (or a clone of it) as `.grad`, not a view of the bucket.
    /// Restoring the view would copy every gradient back into the bucket, which costs more
    /// than this fill (a write-only pass) saves.
    pub fn zero_grads(&mut self) -> Result<(), tch::TchError> {
        let grads: Vec<&Tensor> = self.grads.iter().collect();
        crate::fused::foreach_zero_(&grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Model {
        crate::model::tiny_test_model(crate::spec::Arch::Gpt2)
    }

    /// Sum over all parameters of `Σ w · c` with a fixed coefficient per element: its gradient
    /// is known exactly, and it touches every parameter.
    fn probe_loss(model: &Model) -> Tensor {
        let terms: Vec<Tensor> = (model.params.iter().enumerate())
            .map(|(i, (_, p))| (&p.tensor * (i as f64 + 1.0)).sum(Kind::Float))
            .collect();
        Tensor::stack(&terms, 0).sum(Kind::Float)
    }

    #[test]
    fn parameters_and_gradients_become_views_of_the_buckets() {
        let model = tiny();
        let before: Vec<Tensor> = model.params.iter().map(|(_, p)| p.tensor.copy()).collect();
        // Small buckets, so there are several and parameters share them.
        let buckets = plan_buckets(&model, 0, 1, 4096, false);
        assert!(buckets.len() > 2);
        let mut flat = FlatBuckets::adopt(&model, &buckets).unwrap();

        for (b, bucket) in buckets.iter().enumerate() {
            for (&id, &off) in bucket.params.iter().zip(&bucket.offsets) {
                let p = model.params.param(id);
                assert_eq!(off % ALIGN, 0, "{} starts at {off}", p.name);
                // Values kept, now read from the flat buffer.
                assert!(p.tensor.equal(&before[id.0]), "{}", p.name);
                let slice = flat.params[b].narrow(0, off as i64, p.numel() as i64);
                assert!(slice.equal(&before[id.0].view([-1])), "{}", p.name);
                assert!(p.tensor.requires_grad() && p.tensor.is_leaf(), "{}", p.name);
            }
        }

        // Backward twice accumulates into the flat gradients; zeroing clears them.
        for _ in 0..2 {
            probe_loss(&model).backward();
        }
        for (b, bucket) in buckets.iter().enumerate() {
            let mut expected = vec![0f32; bucket.len];
            for (&id, &off) in bucket.params.iter().zip(&bucket.offsets) {
                let n = model.params.param(id).numel();
                expected[off..off + n].fill(2.0 * (id.0 as f32 + 1.0));
            }
            assert_eq!(Vec::<f32>::try_from(&flat.grads[b]).unwrap(), expected, "bucket {b}");
        }
        flat.zero_grads().unwrap();
        assert!(
            model
                .params
                .iter()
                .all(|(_, p)| p.tensor.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0)
        );

        // An in-place update of a flat buffer is the model's new value.
        let _ = flat.params[0].g_add_scalar_(1.0);
        let (id, off) = (buckets[0].params[0], buckets[0].offsets[0]);
        assert_eq!(off, 0);
        assert!(model.params.get(id).equal(&(&before[id.0] + 1.0)));
    }
}
