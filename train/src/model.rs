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
    fn new(ps: &mut ParamStore, m: &ModelSpec, prefix: &str) -> Norm {
        let weight = ps.add(NewParam {
            name: &format!("{prefix}.weight"),
            global_shape: &[m.d_model as i64],
            split: None,
            init: Init::Ones,
            decay: false,
            tied_copy: false,
        });
        let bias = (m.arch == Arch::Gpt2).then(|| {
            ps.add(NewParam {
                name: &format!("{prefix}.bias"),
                global_shape: &[m.d_model as i64],
                split: None,
                init: Init::Zeros,
                decay: false,
                tied_copy: false,
            })
        });
        Norm { weight, bias }
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
}

/// A TP slice: (dimension, parts, part).
type Split = Option<(usize, i64, i64)>;

impl Model {
    /// Build this rank's stage: create its parameters (sliced for `tp_rank` of `tp`).
    pub fn build(
        spec: &ModelSpec,
        plan: StagePlan,
        tp: usize,
        tp_rank: usize,
        seed: u64,
        device: tch::Device,
    ) -> Model {
        Model::build_into(spec, plan, tp, tp_rank, ParamStore::new(seed, device))
    }

    /// This rank's stage with zeroed parameters, for weights loaded right after.
    pub fn build_for_loading(
        spec: &ModelSpec,
        plan: StagePlan,
        tp: usize,
        tp_rank: usize,
        device: tch::Device,
    ) -> Model {
        Model::build_into(spec, plan, tp, tp_rank, ParamStore::zeroed(device))
    }

    /// The whole model (every layer, one stage) as TP rank `tp_rank` of `tp` holds it,
    /// zeroed for loading.
    pub fn whole_for_loading(spec: &ModelSpec, tp: usize, tp_rank: usize, device: tch::Device) -> Model {
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
        let meta = Model::build_into(spec, plan, 1, 0, ParamStore::meta());
        meta.params
            .iter()
            .filter(|(_, p)| !p.tied_copy)
            .map(|(_, p)| (p.name.clone(), p.tp_split))
            .collect()
    }

    fn build_into(spec: &ModelSpec, plan: StagePlan, tp: usize, tp_rank: usize, mut ps: ParamStore) -> Model {
        let device = ps.device();
        let m = spec;
        let (d, v, f, t) = (m.d_model as i64, m.vocab_size as i64, m.ffn() as i64, m.seq_len as i64);
        let (tp, r) = (tp as i64, tp_rank as i64);
        let split = |dim: usize| -> Split { Some((dim, tp, r)) };
        let shard = VocabShard {
            lo: r * (v / tp),
            len: v / tp,
        };
        let out_std = m.init_std / (2.0 * m.n_layers as f64).sqrt();
        let mut units = Vec::new();
        let add = |ps: &mut ParamStore, name: String, shape: &[i64], split: Split, init: Init, decay: bool| {
            ps.add(NewParam {
                name: &name,
                global_shape: shape,
                split,
                init,
                decay,
                tied_copy: false,
            })
        };
        let normal = Init::Normal { std: m.init_std };
        let gpt = m.arch == Arch::Gpt2;
        let mut wte = None;
        if plan.first {
            let id = add(&mut ps, "embed.wte".into(), &[v, d], split(0), normal, true);
            wte = Some(id);
            let wpe = gpt.then(|| add(&mut ps, "embed.wpe".into(), &[t, d], None, normal, true));
            units.push(Unit::Embed(Embed { wte: id, wpe, shard }));
        }
        for l in plan.layers.clone() {
            let p = format!("layers.{l}");
            let norm = Norm::new(&mut ps, m, &format!("{p}.attn.norm"));
            let qkv = add(
                &mut ps,
                format!("{p}.attn.qkv.weight"),
                &[3, d, d],
                split(1),
                normal,
                true,
            );
            let qkv_bias = gpt.then(|| {
                add(
                    &mut ps,
                    format!("{p}.attn.qkv.bias"),
                    &[3, d],
                    split(1),
                    Init::Zeros,
                    false,
                )
            });
            let out = add(
                &mut ps,
                format!("{p}.attn.out.weight"),
                &[d, d],
                split(1),
                Init::Normal { std: out_std },
                true,
            );
            let out_bias = gpt.then(|| add(&mut ps, format!("{p}.attn.out.bias"), &[d], None, Init::Zeros, false));
            let heads = m.n_heads as i64 / tp;
            let head_dim = m.head_dim() as i64;
            let rope = (!gpt).then(|| rope_tables(t, head_dim, m.rope_theta, device));
            units.push(Unit::Attention(Attention {
                norm,
                qkv,
                qkv_bias,
                out,
                out_bias,
                heads,
                head_dim,
                rope,
            }));
            let norm = Norm::new(&mut ps, m, &format!("{p}.mlp.norm"));
            let (up, up_bias) = if gpt {
                let w = add(&mut ps, format!("{p}.mlp.fc.weight"), &[f, d], split(0), normal, true);
                let b = add(&mut ps, format!("{p}.mlp.fc.bias"), &[f], split(0), Init::Zeros, false);
                (w, Some(b))
            } else {
                (
                    add(
                        &mut ps,
                        format!("{p}.mlp.gate_up.weight"),
                        &[2, f, d],
                        split(1),
                        normal,
                        true,
                    ),
                    None,
                )
            };
            let down = add(
                &mut ps,
                format!("{p}.mlp.down.weight"),
                &[d, f],
                split(1),
                Init::Normal { std: out_std },
                true,
            );
            let down_bias = gpt.then(|| add(&mut ps, format!("{p}.mlp.down.bias"), &[d], None, Init::Zeros, false));
            units.push(Unit::Mlp(Mlp {
                norm,
                up,
                up_bias,
                down,
                down_bias,
                arch: m.arch,
            }));
        }
        if plan.last {
            let norm = Norm::new(&mut ps, m, "final_norm");
            let weight = match (m.tie_embeddings, wte) {
                (true, Some(id)) => id,
                (true, None) => ps.add(NewParam {
                    name: "embed.wte",
                    global_shape: &[v, d],
                    split: split(0),
                    init: normal,
                    decay: true,
                    tied_copy: true,
                }),
                (false, _) => add(&mut ps, "head.weight".into(), &[v, d], split(0), normal, true),
            };
            units.push(Unit::Head(Head { norm, weight, shard }));
        }
        Model {
            spec: spec.clone(),
            units,
            params: ps,
            plan,
        }
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
                let qkv = n
                    .linear(&w, bias.as_ref())
                    .view([b, t, 3, h, hd])
                    .permute([2, 0, 3, 1, 4]);
                let (mut q, mut k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
                if let Some((cos, sin)) = &a.rope {
                    q = apply_rope(&q, cos, sin, t);
                    k = apply_rope(&k, cos, sin, t);
                }
                let y = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false);
                let y = y.transpose(1, 2).reshape([b, t, local]);
                let o = cx.row_parallel_linear(&y, ps.get(a.out), a.out_bias.map(|id| ps.get(id)))?;
                Ok(x + o)
            }
            Unit::Mlp(m) => {
                let x = input.ok_or_else(need)?;
                let n = m.norm.apply(ps, x, eps);
                let n = cx.enter_tp(&n);
                let hidden = match m.arch {
                    Arch::Gpt2 => n.linear(ps.get(m.up), m.up_bias.map(|id| ps.get(id))).gelu("tanh"),
                    Arch::Llama => {
                        let w = ps.get(m.up);
                        let f = w.size()[1];
                        let gu = n.linear::<Tensor>(&w.view([2 * f, -1]), None);
                        let parts = gu.split(f, -1);
                        parts[0].silu() * &parts[1]
                    }
                };
                let o = cx.row_parallel_linear(&hidden, ps.get(m.down), m.down_bias.map(|id| ps.get(id)))?;
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
                let logits = n.linear::<Tensor>(ps.get(hd.weight), None);
                let vl = logits.size()[2];
                vocab_parallel_cross_entropy(cx, &logits.view([-1, vl]), &batch.targets.view([-1]), hd.shard)
            }
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

fn rope_tables(t: i64, head_dim: i64, theta: f64, device: tch::Device) -> (Tensor, Tensor) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let pos = Tensor::arange(t, (Kind::Float, tch::Device::Cpu));
    let angles = pos.unsqueeze(1) * Tensor::from_slice(&inv).unsqueeze(0);
    (angles.cos().to_device(device), angles.sin().to_device(device))
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

/// Split `n_layers` over `pp` stages: explicit counts, or balanced so the largest stage's
/// parameter count is as small as possible (the first stage also holds the embedding, the last
/// the head). Pure; every stage gets at least one layer.
pub fn partition_layers(spec: &ModelSpec, pp: usize, explicit: &[usize]) -> Vec<std::ops::Range<usize>> {
    let counts: Vec<usize> = if !explicit.is_empty() {
        explicit.to_vec()
    } else {
        let d = spec.d_model as u64;
        let layer = (spec.num_params() - (spec.vocab_size as u64 * d)).max(1) / spec.n_layers.max(1) as u64;
        let edge = spec.vocab_size as u64 * d;
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
    let cost = |stage: usize, layers: usize| {
        layers as u64 * layer_cost + if stage == 0 || stage == pp - 1 { edge_cost } else { 0 }
    };
    // Smallest feasible bound by binary search over the answer; then fill greedily.
    let (mut lo, mut hi) = (0u64, cost(0, n_layers) + edge_cost);
    let fits = |bound: u64| -> Option<Vec<usize>> {
        let mut left = n_layers;
        let mut out = Vec::with_capacity(pp);
        for s in 0..pp {
            let stages_after = pp - s - 1;
            let mut take = 0;
            while take < left - stages_after && cost(s, take + 1) <= bound {
                take += 1;
            }
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
    Model::build(&spec, plan, 1, 0, 7, tch::Device::Cpu)
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
    }
}
