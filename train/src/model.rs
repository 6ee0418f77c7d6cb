//! GPT-2 and Llama style decoders as a sequence of *units*: the embedding, then an attention
//! and an MLP unit per layer, then the head (final norm, logits, loss). A pipeline stage owns
//! a contiguous run of units. Units are the granularity of the executor: each starts from a
//! leaf input, so its backward can run on its own (pipeline boundaries, TP cuts) and its
//! parameters' gradients are final when it finishes (data-parallel buckets start then).
//!
//! Tensor-parallel slicing (tp ranks, rank r): QKV and MLP-in weights are split by output
//! rows (heads / hidden units), attention-out and MLP-out by input columns, embeddings and the
//! head by vocabulary rows. Global tensors are laid out so every slice is a hyper-rectangle:
//! QKV is `[3, d, d]` (which, out, in), gate/up `[2, ffn, d]`.

use crate::error::TrainError;
use crate::fused_ops::{self, FusedOps, linear_gelu_tanh};
use crate::param::{Init, NewParam, ParamId, ParamStore};
use crate::spec::{Arch, ModelSpec};
use crate::tensor_parallel::{Fwd, VocabShard, vocab_parallel_cross_entropy, vocab_parallel_embedding};
use tch::{Kind, Tensor};

/// The inputs of one micro-batch, on the compute device.
pub struct MicroBatch {
    /// `[B, T]` token ids.
    pub tokens: Tensor,
    /// `[B, T]` next-token ids.
    pub targets: Tensor,
}

pub(crate) struct Norm {
    pub(crate) weight: ParamId,
    pub(crate) bias: Option<ParamId>,
}

impl Norm {
    fn new(ps: &mut ParamStore, m: &ModelSpec, prefix: &str) -> Result<Norm, TrainError> {
        let weight = ps.add(NewParam {
            name: &format!("{prefix}.weight"),
            global_shape: &[m.d_model as i64],
            split: None,
            init: Init::Ones,
            decay: false,
            tied_copy: false,
        })?;
        let bias = match m.arch {
            Arch::Gpt2 => Some(ps.add(NewParam {
                name: &format!("{prefix}.bias"),
                global_shape: &[m.d_model as i64],
                split: None,
                init: Init::Zeros,
                decay: false,
                tied_copy: false,
            })?),
            Arch::Llama => None,
        };
        Ok(Norm { weight, bias })
    }

    pub(crate) fn apply(&self, ps: &ParamStore, x: &Tensor, eps: f64) -> Tensor {
        let d = x.size()[x.dim() - 1];
        match self.bias {
            Some(b) => x.layer_norm([d], Some(ps.get(self.weight)), Some(ps.get(b)), eps, true),
            None => x.rms_norm([d], Some(ps.get(self.weight)), eps),
        }
    }
}

pub struct Embed {
    pub(crate) wte: ParamId,
    pub(crate) wpe: Option<ParamId>,
    pub(crate) shard: VocabShard,
}

pub struct Attention {
    pub(crate) norm: Norm,
    pub(crate) qkv: ParamId,
    pub(crate) qkv_bias: Option<ParamId>,
    pub(crate) out: ParamId,
    pub(crate) out_bias: Option<ParamId>,
    pub(crate) heads: i64,
    pub(crate) head_dim: i64,
    /// `[T, head_dim / 2]` rotary tables (llama).
    pub(crate) rope: Option<(Tensor, Tensor)>,
}

pub struct Mlp {
    pub(crate) norm: Norm,
    /// gpt2: fc `[ffn, d]`; llama: gate/up `[2, ffn, d]`.
    pub(crate) up: ParamId,
    pub(crate) up_bias: Option<ParamId>,
    pub(crate) down: ParamId,
    pub(crate) down_bias: Option<ParamId>,
    pub(crate) arch: Arch,
}

pub struct Head {
    pub(crate) norm: Norm,
    /// The output embedding: `embed.wte` when tied, else `head.weight`.
    pub(crate) weight: ParamId,
    pub(crate) shard: VocabShard,
}

pub enum Unit {
    Embed(Embed),
    Attention(Attention),
    Mlp(Mlp),
    Head(Head),
}

/// Which units a stage holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePlan {
    pub first: bool,
    pub last: bool,
    /// Transformer layers `layers.start..layers.end`.
    pub layers: std::ops::Range<usize>,
}

pub struct Model {
    pub spec: ModelSpec,
    pub units: Vec<Unit>,
    pub params: ParamStore,
    pub plan: StagePlan,
    /// Whether GPT-2's MLP runs the fused linear + bias + GELU ([`crate::fused_ops`]) where it
    /// applies (CPU, f32/f64); the trainer sets it from the run context.
    pub fused: FusedOps,
}

/// A TP slice: (dimension, parts, part).
type Split = Option<(usize, i64, i64)>;

/// Creates one stage's units into a [`ParamStore`], sliced for TP rank `r` of `tp`.
struct Builder<'a> {
    m: &'a ModelSpec,
    tp: i64,
    r: i64,
    shard: VocabShard,
    normal: Init,
    out: Init,
    gpt: bool,
}

impl<'a> Builder<'a> {
    fn new(m: &'a ModelSpec, tp: usize, tp_rank: usize) -> Builder<'a> {
        let (tp, r, v) = (tp as i64, tp_rank as i64, m.vocab_size as i64);
        Builder {
            m,
            tp,
            r,
            shard: VocabShard {
                lo: r * (v / tp),
                len: v / tp,
            },
            normal: Init::Normal { std: m.init_std },
            out: Init::Normal {
                std: m.init_std / (2.0 * m.n_layers as f64).sqrt(),
            },
            gpt: m.arch == Arch::Gpt2,
        }
    }

    fn split(&self, dim: usize) -> Split {
        Some((dim, self.tp, self.r))
    }

    fn dims(&self) -> (i64, i64, i64, i64) {
        let m = self.m;
        (m.d_model as i64, m.vocab_size as i64, m.ffn() as i64, m.seq_len as i64)
    }

    fn add(
        &self,
        ps: &mut ParamStore,
        name: &str,
        shape: &[i64],
        split: Split,
        init: Init,
        decay: bool,
    ) -> Result<ParamId, TrainError> {
        ps.add(NewParam {
            name,
            global_shape: shape,
            split,
            init,
            decay,
            tied_copy: false,
        })
    }

    fn embed(&self, ps: &mut ParamStore) -> Result<Embed, TrainError> {
        let (d, v, _, t) = self.dims();
        let wte = self.add(ps, "embed.wte", &[v, d], self.split(0), self.normal, true)?;
        let wpe = match self.gpt {
            true => Some(self.add(ps, "embed.wpe", &[t, d], None, self.normal, true)?),
            false => None,
        };
        Ok(Embed {
            wte,
            wpe,
            shard: self.shard,
        })
    }

    /// A bias of `shape` (gpt2 only): zeros, no weight decay.
    fn bias(
        &self,
        ps: &mut ParamStore,
        name: &str,
        shape: &[i64],
        split: Split,
    ) -> Result<Option<ParamId>, TrainError> {
        match self.gpt {
            true => Ok(Some(self.add(ps, name, shape, split, Init::Zeros, false)?)),
            false => Ok(None),
        }
    }

    fn attention(&self, ps: &mut ParamStore, l: usize) -> Result<Attention, TrainError> {
        let (d, _, _, t) = self.dims();
        let p = format!("layers.{l}.attn");
        let norm = Norm::new(ps, self.m, &format!("{p}.norm"))?;
        let qkv = self.add(
            ps,
            &format!("{p}.qkv.weight"),
            &[3, d, d],
            self.split(1),
            self.normal,
            true,
        )?;
        let qkv_bias = self.bias(ps, &format!("{p}.qkv.bias"), &[3, d], self.split(1))?;
        let out = self.add(ps, &format!("{p}.out.weight"), &[d, d], self.split(1), self.out, true)?;
        let out_bias = self.bias(ps, &format!("{p}.out.bias"), &[d], None)?;
        let head_dim = self.m.head_dim() as i64;
        // A meta store (parameter layouts) allocates nothing, so it gets no rotary tables.
        let rope = match !self.gpt && !ps.is_meta() {
            true => Some(
                rope_tables(t, head_dim, self.m.rope_theta, ps.device()).map_err(|source| TrainError::ModelBuild {
                    tensor: format!("{p}.rope"),
                    shape: vec![t, head_dim / 2],
                    source,
                })?,
            ),
            false => None,
        };
        Ok(Attention {
            norm,
            qkv,
            qkv_bias,
            out,
            out_bias,
            heads: self.m.n_heads as i64 / self.tp,
            head_dim,
            rope,
        })
    }

    fn mlp(&self, ps: &mut ParamStore, l: usize) -> Result<Mlp, TrainError> {
        let (d, _, f, _) = self.dims();
        let p = format!("layers.{l}.mlp");
        let norm = Norm::new(ps, self.m, &format!("{p}.norm"))?;
        let (up, up_bias) = if self.gpt {
            let w = self.add(ps, &format!("{p}.fc.weight"), &[f, d], self.split(0), self.normal, true)?;
            (w, self.bias(ps, &format!("{p}.fc.bias"), &[f], self.split(0))?)
        } else {
            let w = self.add(
                ps,
                &format!("{p}.gate_up.weight"),
                &[2, f, d],
                self.split(1),
                self.normal,
                true,
            )?;
            (w, None)
        };
        let down = self.add(ps, &format!("{p}.down.weight"), &[d, f], self.split(1), self.out, true)?;
        let down_bias = self.bias(ps, &format!("{p}.down.bias"), &[d], None)?;
        Ok(Mlp {
            norm,
            up,
            up_bias,
            down,
            down_bias,
            arch: self.m.arch,
        })
    }

    /// Final norm and the output embedding (`wte`, this stage's own, when tied).
    fn head(&self, ps: &mut ParamStore, wte: Option<ParamId>) -> Result<Head, TrainError> {
        let (d, v, _, _) = self.dims();
        let norm = Norm::new(ps, self.m, "final_norm")?;
        let weight = match (self.m.tie_embeddings, wte) {
            (true, Some(id)) => id,
            (true, None) => ps.add(NewParam {
                name: "embed.wte",
                global_shape: &[v, d],
                split: self.split(0),
                init: self.normal,
                decay: true,
                tied_copy: true,
            })?,
            (false, _) => self.add(ps, "head.weight", &[v, d], self.split(0), self.normal, true)?,
        };
        Ok(Head {
            norm,
            weight,
            shard: self.shard,
        })
    }
}

impl Model {
    /// Build this rank's stage: create its parameters (sliced for `tp_rank` of `tp`). A
    /// tensor libtorch cannot create is [`TrainError::ModelBuild`] naming it; the sizes
    /// themselves are the spec's `validate` / `check_memory` to refuse first.
    pub fn build(
        spec: &ModelSpec,
        plan: StagePlan,
        tp: usize,
        tp_rank: usize,
        seed: u64,
        device: tch::Device,
    ) -> Result<Model, TrainError> {
        Model::build_into(spec, plan, tp, tp_rank, ParamStore::new(seed, device))
    }

    /// This rank's stage with zeroed parameters, for weights loaded right after.
    pub fn build_for_loading(
        spec: &ModelSpec,
        plan: StagePlan,
        tp: usize,
        tp_rank: usize,
        device: tch::Device,
    ) -> Result<Model, TrainError> {
        Model::build_into(spec, plan, tp, tp_rank, ParamStore::zeroed(device))
    }

    /// The whole model (every layer, one stage) as TP rank `tp_rank` of `tp` holds it,
    /// zeroed for loading.
    pub fn whole_for_loading(
        spec: &ModelSpec,
        tp: usize,
        tp_rank: usize,
        device: tch::Device,
    ) -> Result<Model, TrainError> {
        let plan = StagePlan {
            first: true,
            last: true,
            layers: 0..spec.n_layers,
        };
        Model::build_for_loading(spec, plan, tp, tp_rank, device)
    }

    /// Every parameter of the whole model (all stages) with the dimension TP splits it along,
    /// in creation order, without creating any values.
    pub fn parameter_layout(spec: &ModelSpec) -> Vec<(String, Option<usize>)> {
        let plan = StagePlan {
            first: true,
            last: true,
            layers: 0..spec.n_layers,
        };
        let meta = Model::build_into(spec, plan, 1, 0, ParamStore::meta())
            .expect("a meta build allocates nothing (empty tensors, no rotary tables)");
        meta.params
            .iter()
            .filter(|(_, p)| !p.tied_copy)
            .map(|(_, p)| (p.name.clone(), p.tp_split))
            .collect()
    }

    fn build_into(
        spec: &ModelSpec,
        plan: StagePlan,
        tp: usize,
        tp_rank: usize,
        mut ps: ParamStore,
    ) -> Result<Model, TrainError> {
        let b = Builder::new(spec, tp, tp_rank);
        let mut units = Vec::new();
        let mut wte = None;
        if plan.first {
            let embed = b.embed(&mut ps)?;
            wte = Some(embed.wte);
            units.push(Unit::Embed(embed));
        }
        for l in plan.layers.clone() {
            units.push(Unit::Attention(b.attention(&mut ps, l)?));
            units.push(Unit::Mlp(b.mlp(&mut ps, l)?));
        }
        if plan.last {
            units.push(Unit::Head(b.head(&mut ps, wte)?));
        }
        Ok(Model {
            spec: spec.clone(),
            units,
            params: ps,
            plan,
            fused: FusedOps::default(),
        })
    }

    /// Parameters a unit reads (its gradients are complete once the unit's backward is done,
    /// except a tied embedding, which both the first and the last unit touch).
    pub fn unit_params(&self, unit: usize) -> Vec<ParamId> {
        match &self.units[unit] {
            Unit::Embed(e) => [Some(e.wte), e.wpe].into_iter().flatten().collect(),
            Unit::Attention(a) => [
                Some(a.norm.weight),
                a.norm.bias,
                Some(a.qkv),
                a.qkv_bias,
                Some(a.out),
                a.out_bias,
            ]
            .into_iter()
            .flatten()
            .collect(),
            Unit::Mlp(m) => [
                Some(m.norm.weight),
                m.norm.bias,
                Some(m.up),
                m.up_bias,
                Some(m.down),
                m.down_bias,
            ]
            .into_iter()
            .flatten()
            .collect(),
            Unit::Head(h) => [Some(h.norm.weight), h.norm.bias, Some(h.weight)]
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    /// Run unit `u`. `input` is the previous unit's output as a leaf (None for the embedding).
    /// Returns the hidden state, or for the head the mean loss (`want_logits`: the last
    /// position's logits, this rank's vocabulary shard).
    pub fn forward_unit(
        &self,
        u: usize,
        input: Option<&Tensor>,
        batch: &MicroBatch,
        cx: &mut Fwd<'_>,
        want_logits: bool,
    ) -> Result<Tensor, TrainError> {
        let ps = &self.params;
        let eps = self.spec.norm_eps;
        let need = || TrainError::Internal(format!("unit {u} needs an input"));
        match &self.units[u] {
            Unit::Embed(e) => {
                let h = vocab_parallel_embedding(cx, ps.get(e.wte), &batch.tokens, e.shard)?;
                Ok(match e.wpe {
                    Some(wpe) => h + ps.get(wpe).narrow(0, 0, batch.tokens.size()[1]),
                    None => h,
                })
            }
            Unit::Attention(a) => {
                let x = input.ok_or_else(need)?;
                let (b, t) = (x.size()[0], x.size()[1]);
                let (h, hd) = (a.heads, a.head_dim);
                let local = h * hd;
                let n = a.norm.apply(ps, x, eps);
                let n = cx.enter_tp(&n);
                let w = ps.get(a.qkv).view([3 * local, -1]);
                let bias = a.qkv_bias.map(|id| ps.get(id).view([3 * local]));
                let qkv = self
                    .linear(&n, &w, bias.as_ref())?
                    .view([b, t, 3, h, hd])
                    .permute([2, 0, 3, 1, 4]);
                // unbind (backward: one stack), not three selects (each backward zero-fills a
                // gradient of the whole QKV tensor, then the three are summed).
                let [mut q, mut k, v]: [Tensor; 3] = qkv
                    .unbind(0)
                    .try_into()
                    .map_err(|_| TrainError::Internal("QKV does not split into three".into()))?;
                if let Some((cos, sin)) = &a.rope {
                    q = apply_rope(&q, cos, sin, t);
                    k = apply_rope(&k, cos, sin, t);
                }
                let y = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false);
                let y = y.transpose(1, 2).reshape([b, t, local]);
                let o = self.row_parallel_linear(cx, &y, ps.get(a.out), a.out_bias.map(|id| ps.get(id)))?;
                Ok(x + o)
            }
            Unit::Mlp(m) => {
                let x = input.ok_or_else(need)?;
                let n = m.norm.apply(ps, x, eps);
                let n = cx.enter_tp(&n);
                let hidden = match m.arch {
                    Arch::Gpt2 if self.fused.applies(&n) => {
                        linear_gelu_tanh(&n, ps.get(m.up), m.up_bias.map(|id| ps.get(id)))?
                    }
                    Arch::Gpt2 => n.linear(ps.get(m.up), m.up_bias.map(|id| ps.get(id))).gelu("tanh"),
                    Arch::Llama => {
                        let w = ps.get(m.up);
                        let f = w.size()[1];
                        let gu = n.linear::<Tensor>(&w.view([2 * f, -1]), None);
                        let parts = gu.split(f, -1);
                        parts[0].silu() * &parts[1]
                    }
                };
                let o = self.row_parallel_linear(cx, &hidden, ps.get(m.down), m.down_bias.map(|id| ps.get(id)))?;
                Ok(x + o)
            }
            Unit::Head(hd) => {
                let x = input.ok_or_else(need)?;
                let n = hd.norm.apply(ps, x, eps);
                let n = cx.enter_tp(&n);
                if want_logits {
                    let last = n.select(1, n.size()[1] - 1);
                    return Ok(last.linear::<Tensor>(ps.get(hd.weight), None));
                }
                let logits = self.linear(&n, ps.get(hd.weight), None)?;
                let vl = logits.size()[2];
                vocab_parallel_cross_entropy(cx, &logits.view([-1, vl]), &batch.targets.view([-1]), hd.shard)
            }
        }
    }

    /// `x · wᵀ + bias`: the fused operators' linear where they apply (same gradients, faster
    /// matmul kernels in f32), ATen's elsewhere.
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, TrainError> {
        match self.fused.applies(x) {
            true => Ok(fused_ops::linear(x, w, bias)?),
            false => Ok(x.linear(w, bias)),
        }
    }

    /// [`Fwd::row_parallel_linear`], through [`Model::linear`] when there is no tensor
    /// parallelism (then it is one linear layer with its bias).
    fn row_parallel_linear(
        &self,
        cx: &mut Fwd<'_>,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor, TrainError> {
        match cx.tp.is_trivial() {
            true => self.linear(x, w, bias),
            false => cx.row_parallel_linear(x, w, bias),
        }
    }

    /// The logits of head unit `u` at every position of `input` `[B, T, d]` (this rank's
    /// vocabulary shard; no tensor-parallel cut, so for inference): the norm and projection
    /// of [`Model::forward_unit`]'s head, for scoring a prompt's own tokens.
    pub fn head_logits(&self, u: usize, input: &Tensor) -> Result<Tensor, TrainError> {
        match &self.units[u] {
            Unit::Head(hd) => {
                let n = hd.norm.apply(&self.params, input, self.spec.norm_eps);
                Ok(n.linear::<Tensor>(self.params.get(hd.weight), None))
            }
            _ => Err(TrainError::Internal(format!("unit {u} is not the head"))),
        }
    }

    /// This rank's vocabulary shard (for generation).
    pub fn vocab_shard(&self) -> Option<VocabShard> {
        self.units.iter().find_map(|u| match u {
            Unit::Head(h) => Some(h.shard),
            _ => None,
        })
    }
}

fn rope_tables(t: i64, head_dim: i64, theta: f64, device: tch::Device) -> Result<(Tensor, Tensor), tch::TchError> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let pos = Tensor::f_arange(t, (Kind::Float, tch::Device::Cpu))?;
    let angles = pos
        .f_unsqueeze(1)?
        .f_mul(&Tensor::f_from_slice(&inv)?.f_unsqueeze(0)?)?;
    Ok((
        angles.f_cos()?.f_to_device(device)?,
        angles.f_sin()?.f_to_device(device)?,
    ))
}

/// Rotate-half rotary embedding of `x` `[B, H, T, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, t: i64) -> Tensor {
    rotate_half(x, &cos.narrow(0, 0, t), &sin.narrow(0, 0, t))
}

/// `x` `[…, hd]` rotated by angles whose cosines and sines (`[…, hd / 2]`, broadcast against
/// `x`) are given.
pub(crate) fn rotate_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let (cos, sin) = (cos.to_kind(x.kind()), sin.to_kind(x.kind()));
    let last = x.dim() as i64 - 1;
    let x1 = x.narrow(last, 0, half);
    let x2 = x.narrow(last, half, half);
    Tensor::cat(&[&x1 * &cos - &x2 * &sin, &x1 * &sin + &x2 * &cos], last)
}

/// A whole 2-layer model (vocabulary 64, d 32, 4 heads, sequence 16) on the CPU, for tests.
#[cfg(test)]
pub(crate) fn tiny_test_model(arch: Arch) -> Model {
    let spec = ModelSpec {
        arch,
        vocab_size: 64,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        seq_len: 16,
        ..ModelSpec::default()
    };
    let plan = StagePlan {
        first: true,
        last: true,
        layers: 0..spec.n_layers,
    };
    Model::build(&spec, plan, 1, 0, 7, tch::Device::Cpu).expect("a tiny model builds")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::partition_layers;
    use crate::spec::JobSpec;
    use proptest::prelude::*;

    /// One size of a generated spec: mostly small, sometimes absurd.
    fn size() -> impl Strategy<Value = usize> {
        prop_oneof![
            6 => 1usize..=64,
            1 => Just(1_000_000_000usize),
            1 => Just(1_000_000_000_000usize),
            1 => Just(6_148_914_691_236_517_206usize),
            1 => Just(usize::MAX),
            1 => any::<usize>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Any spec, absurd numbers included, either fails `validate` (a typed, named error) or
        /// builds: the first and last stage of the first and last TP rank are built on the CPU
        /// and come back `Ok` or a typed `TrainError`, never a panic. The memory limit (64 MiB)
        /// keeps what is built small.
        #[test]
        fn specs_that_validate_build(
            llama in any::<bool>(),
            (tp, pp, dp) in (1usize..=2, 1usize..=2, 1usize..=2),
            (heads, head_dim, layers, seq) in (1usize..=2, 1usize..=8, 1usize..=4, 1usize..=32),
            (vocab_k, micro, accum, tie) in (1usize..=64, 1usize..=4, 1usize..=3, any::<bool>()),
            absurd in proptest::collection::vec((0usize..11, size()), 0..=2),
            timeout in prop_oneof![6 => Just(30.0), 1 => Just(f64::INFINITY), 1 => Just(1e300), 1 => Just(f64::NAN), 1 => Just(0.0)],
        ) {
            let mut spec = JobSpec::default();
            let m = &mut spec.model;
            m.arch = if llama { Arch::Llama } else { Arch::Gpt2 };
            m.n_heads = heads * tp;
            m.d_model = m.n_heads * head_dim * 2;
            (m.n_layers, m.seq_len, m.vocab_size, m.tie_embeddings) = (layers.max(pp), seq, vocab_k * tp, tie);
            (spec.parallel.tp, spec.parallel.pp, spec.parallel.dp) = (tp, pp, dp);
            spec.parallel.timeout_s = timeout;
            (spec.train.micro_batch, spec.train.global_batch) = (micro, micro * dp * accum);
            spec.train.max_memory_gib = 1.0 / 16.0;
            for (field, value) in absurd {
                let (m, p, t) = (&mut spec.model, &mut spec.parallel, &mut spec.train);
                *[
                    &mut m.d_model, &mut m.n_layers, &mut m.n_heads, &mut m.seq_len, &mut m.vocab_size,
                    &mut m.ffn_hidden, &mut p.dp, &mut p.tp, &mut p.pp, &mut t.micro_batch, &mut t.global_batch,
                ][field] = value;
            }
            let p = &spec.parallel;
            let world = p.dp.wrapping_mul(p.tp).wrapping_mul(p.pp);
            if spec.validate(world).is_err() {
                return Ok(());
            }
            let ranges = partition_layers(&spec.model, p.pp, &p.stage_layers);
            prop_assert_eq!(ranges.len(), p.pp);
            for stage in [0, p.pp - 1] {
                for tp_rank in [0, p.tp - 1] {
                    let plan = StagePlan { first: stage == 0, last: stage + 1 == p.pp, layers: ranges[stage].clone() };
                    match Model::build(&spec.model, plan, p.tp, tp_rank, 1, tch::Device::Cpu) {
                        Ok(model) => prop_assert!(model.params.numel() as u64 <= spec.model.num_params() * 2),
                        Err(e) => prop_assert!(matches!(e, TrainError::ModelBuild { .. }), "{e}"),
                    }
                }
            }
        }
    }
}
