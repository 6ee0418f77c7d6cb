//! Generation with a KV cache, several sequences at once, on one process (TP 1, the whole
//! model): what the registry's `generate` endpoint runs.
//!
//! The cache has a fixed number of *slots*; a sequence owns one from its prefill until it is
//! released. Per layer it holds keys and values `[slots, heads, seq_len, head_dim]`.
//! - [`KvModel::prefill`] runs a prompt through the model exactly as training's forward pass
//!   does (same shapes, causal attention over the prompt) and stores its keys and values.
//! - [`KvModel::decode`] advances any set of slots by one token each in one batched pass: the
//!   new token's query attends to its slot's cached keys (a mask hides positions past each
//!   slot's length), its key and value are written at its position.
//!
//! Embedding and attention are written here (they depend on positions); the MLP and head
//! units are training's own code ([`Model::forward_unit`]), so the two paths cannot drift.
//!
//! On a GPU the weights and the cache live on the device and every pass runs under bf16
//! CUDA autocast ([`crate::autocast`]), as training's forward does; the cache holds bf16 there
//! (what autocast's projections produce; half the memory), f32 on the CPU. Where evaluation
//! and serving compute is [`tool_device`]'s answer to `--device cpu|cuda|auto`.

use crate::autocast::with_bf16_autocast;
use crate::comm::{CommClock, TensorComm};
use crate::error::TrainError;
use crate::model::{Attention, MicroBatch, Model, Unit, rotate_half};
use crate::place::{LocalRank, cuda_device_for, set_current_cuda_device};
use crate::tensor_parallel::Fwd;
use tch::{Device, IndexOp, Kind, Tensor};

/// `--device` of `gantry eval` and `gantry registry serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA where a GPU is visible (after loading libtorch's CUDA library), else the CPU.
    Auto,
}

impl DeviceChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Auto => "auto",
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceChoice, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(format!("unknown device {s:?} (cpu, cuda or auto)")),
        }
    }
}

/// What [`tool_device`] chose and why, for the tool's log and report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolDevice {
    pub device: Device,
    pub choice: DeviceChoice,
}

impl ToolDevice {
    pub fn on_gpu(&self) -> bool {
        self.device != Device::Cpu
    }

    /// `cpu` or `cuda:N`, as reports print it.
    pub fn name(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        }
    }

    /// One line for the log: the device, what computes there and why it was chosen.
    pub fn describe(&self) -> String {
        let why = match (self.choice, self.on_gpu()) {
            (DeviceChoice::Auto, true) => " (--device auto: a CUDA device is visible)",
            (DeviceChoice::Auto, false) => " (--device auto: no CUDA device is visible)",
            _ => "",
        };
        format!(
            "{} in {}{why}",
            self.name(),
            crate::autocast::compute_dtype(self.on_gpu())
        )
    }
}

/// The device `--device choice` names for a process at `local` on its host
/// ([`LocalRank::alone`] for a single process): `cpu`; `cuda`, this process's own GPU
/// ([`cuda_device_for`]), an error naming the flag where none is visible; `auto`, CUDA where a
/// GPU is visible, else the CPU. Loads libtorch's CUDA library first (where that fails with
/// `cuda`, the loader's reason is logged). Call [`enter_tool_device`] on the thread that
/// computes.
pub fn tool_device(choice: DeviceChoice, local: LocalRank) -> Result<ToolDevice, TrainError> {
    let cuda = |visible: usize| -> Result<ToolDevice, TrainError> {
        let index =
            cuda_device_for(local, visible).map_err(|e| TrainError::Device(format!("--device {choice}: {e}")))?;
        Ok(ToolDevice {
            device: Device::Cuda(index),
            choice,
        })
    };
    let cpu = ToolDevice {
        device: Device::Cpu,
        choice,
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu),
        DeviceChoice::Cuda => {
            if !(crate::load_cuda_backend_for(true) && tch::Cuda::is_available()) {
                return Err(TrainError::Device(
                    "--device cuda: no CUDA device is visible (libtorch_cuda.so did not load or this host \
                     has no GPU; check CUDA_VISIBLE_DEVICES); use --device cpu, or --device auto to fall \
                     back to the CPU"
                        .into(),
                ));
            }
            cuda(visible_cuda_devices())
        }
        DeviceChoice::Auto => {
            if crate::load_cuda_backend() && tch::Cuda::is_available() {
                cuda(visible_cuda_devices())
            } else {
                Ok(cpu)
            }
        }
    }
}

fn visible_cuda_devices() -> usize {
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

/// Make the chosen GPU this thread's current CUDA device (nothing to do on the CPU).
pub fn enter_tool_device(d: &ToolDevice) -> Result<(), TrainError> {
    match d.device {
        Device::Cuda(index) => set_current_cuda_device(index),
        _ => Ok(()),
    }
}

/// The dtype of the KV cache on `device`: bf16 on a GPU (autocast's projections are bf16
/// there), f32 on the CPU.
pub fn cache_kind(device: Device) -> Kind {
    if device == Device::Cpu {
        Kind::Float
    } else {
        Kind::BFloat16
    }
}

pub struct KvModel {
    pub model: Model,
    device: Device,
    /// Per attention unit (in layer order): cached keys and values.
    cache: Vec<(Tensor, Tensor)>,
    /// Tokens cached per slot.
    lens: Vec<usize>,
}

/// Logits of the next token for one sequence: `[vocab]` as f32.
pub type Logits = Vec<f32>;

/// A prompt token scored by the model: its log-probability given the tokens before it, and
/// the most likely tokens at its position (most likely first).
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredToken {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl KvModel {
    /// A cache of `slots` sequences of up to the model's `seq_len` tokens. `model` must be a
    /// whole model (one stage, TP 1) with its weights loaded, on `device`; the cache is made
    /// there, in [`cache_kind`]`(device)`.
    pub fn new(model: Model, slots: usize, device: Device) -> Result<KvModel, TrainError> {
        KvModel::with_cache_kind(model, slots, device, cache_kind(device))
    }

    /// [`KvModel::new`] with a cache of `kind` (the tests run a bf16 cache on the CPU).
    fn with_cache_kind(model: Model, slots: usize, device: Device, kind: Kind) -> Result<KvModel, TrainError> {
        if !(model.plan.first && model.plan.last) {
            return Err(TrainError::Internal(
                "generation needs the whole model on one process".into(),
            ));
        }
        let t = model.spec.seq_len as i64;
        let cache = model
            .units
            .iter()
            .filter_map(|u| match u {
                Unit::Attention(a) => Some(a),
                _ => None,
            })
            .map(|a| {
                if a.heads * a.head_dim != model.spec.d_model as i64 {
                    return Err(TrainError::Internal("generation needs TP 1 (all heads)".into()));
                }
                let shape = [slots as i64, a.heads, t, a.head_dim];
                Ok((
                    Tensor::zeros(shape, (kind, device)),
                    Tensor::zeros(shape, (kind, device)),
                ))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvModel {
            model,
            device,
            cache,
            lens: vec![0; slots],
        })
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    pub fn max_len(&self) -> usize {
        self.model.spec.seq_len
    }

    pub fn vocab_size(&self) -> usize {
        self.model.spec.vocab_size
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes of weights and cache.
    pub fn bytes(&self) -> u64 {
        let weights: usize = self.model.params.iter().map(|(_, p)| p.numel() * 4).sum();
        let cache: usize = self
            .cache
            .iter()
            .map(|(k, v)| (k.numel() + v.numel()) * k.kind().elt_size_in_bytes())
            .sum();
        (weights + cache) as u64
    }

    /// Start a sequence in `slot` with `tokens` (1 ..= seq_len of them); returns the logits of
    /// the token after them.
    pub fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Logits, TrainError> {
        let (input, positions) = self.prompt_input(slot, tokens)?;
        let logits = self.forward(&input, &positions, Step::Prefill { slot }, false)?;
        self.lens[slot] = tokens.len();
        Ok(Vec::<f32>::try_from(host_f32(&logits))?)
    }

    /// A prompt that fits `slot` as model input `[1, n]` and its positions `[1, n]`.
    fn prompt_input(&self, slot: usize, tokens: &[u32]) -> Result<(Tensor, Tensor), TrainError> {
        self.check_prefill(slot, tokens)?;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let n = ids.len() as i64;
        let input = Tensor::from_slice(&ids).view([1, n]).to_device(self.device);
        Ok((input, Tensor::arange(n, (Kind::Int64, self.device)).view([1, n])))
    }

    /// [`KvModel::prefill`], and each prompt token after the first scored from the logits at
    /// the position before it, in the same forward pass (log-softmax in f32, as training's
    /// cross-entropy), with the `top` most likely tokens there.
    pub fn prefill_scored(
        &mut self,
        slot: usize,
        tokens: &[u32],
        top: usize,
    ) -> Result<(Logits, Vec<ScoredToken>), TrainError> {
        let (input, positions) = self.prompt_input(slot, tokens)?;
        let n = tokens.len() as i64;
        // [n, vocab] in f32 on the host.
        let all = self
            .forward(&input, &positions, Step::Prefill { slot }, true)?
            .to_kind(Kind::Float)
            .view([n, -1])
            .to_device(Device::Cpu);
        self.lens[slot] = tokens.len();
        let next = Vec::<f32>::try_from(all.get(n - 1))?;
        if n == 1 {
            return Ok((next, Vec::new()));
        }
        let logp = all.narrow(0, 0, n - 1).log_softmax(-1, Kind::Float);
        let next_ids: Vec<i64> = tokens[1..].iter().map(|&t| i64::from(t)).collect();
        let targets = Tensor::from_slice(&next_ids).view([n - 1, 1]);
        let chosen = Vec::<f32>::try_from(logp.gather(1, &targets, false).view([-1]))?;
        let k = (top as i64).min(logp.size()[1]);
        let (top_lp, top_ids) = logp.topk(k, -1, true, true);
        let top_lp = Vec::<f32>::try_from(top_lp.contiguous().view([-1]))?;
        let top_ids = Vec::<i64>::try_from(top_ids.contiguous().view([-1]))?;
        let scored = chosen
            .iter()
            .enumerate()
            .map(|(i, &logprob)| {
                let row = i * k as usize..(i + 1) * k as usize;
                ScoredToken {
                    logprob,
                    top: top_ids[row.clone()]
                        .iter()
                        .zip(&top_lp[row])
                        .map(|(&t, &l)| (t as u32, l))
                        .collect(),
                }
            })
            .collect();
        Ok((next, scored))
    }

    fn check_prefill(&self, slot: usize, tokens: &[u32]) -> Result<(), TrainError> {
        if slot >= self.slots() || tokens.is_empty() || tokens.len() > self.max_len() {
            return Err(TrainError::Internal(format!(
                "prefill of {} tokens into slot {slot} (of {}, up to {} tokens)",
                tokens.len(),
                self.slots(),
                self.max_len()
            )));
        }
        Ok(())
    }

    /// One more token for each `(slot, token)`; returns each slot's next-token logits in
    /// order. A slot at `seq_len` tokens cannot take another.
    pub fn decode(&mut self, batch: &[(usize, u32)]) -> Result<Vec<Logits>, TrainError> {
        for &(slot, _) in batch {
            if slot >= self.slots() || self.lens[slot] == 0 || self.lens[slot] >= self.max_len() {
                return Err(TrainError::Internal(format!(
                    "decode in slot {slot}: {} tokens cached of {}",
                    self.lens.get(slot).copied().unwrap_or(0),
                    self.max_len()
                )));
            }
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let b = batch.len() as i64;
        let ids: Vec<i64> = batch.iter().map(|&(_, t)| i64::from(t)).collect();
        let pos: Vec<i64> = batch.iter().map(|&(s, _)| self.lens[s] as i64).collect();
        let slots: Vec<i64> = batch.iter().map(|&(s, _)| s as i64).collect();
        let tokens = Tensor::from_slice(&ids).view([b, 1]).to_device(self.device);
        let positions = Tensor::from_slice(&pos).view([b, 1]).to_device(self.device);
        let slot_ids = Tensor::from_slice(&slots).to_device(self.device);
        let len = pos.iter().max().copied().unwrap_or(0) + 1;
        let logits = self.forward(&tokens, &positions, Step::Decode { slots: &slot_ids, len }, false)?;
        for &(s, _) in batch {
            self.lens[s] += 1;
        }
        let flat = Vec::<f32>::try_from(host_f32(&logits))?;
        Ok(flat.chunks(self.vocab_size()).map(<[f32]>::to_vec).collect())
    }

    /// Forget a slot's sequence.
    pub fn release(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = 0;
        }
    }

    /// [`KvModel::run`] without gradients, under bf16 CUDA autocast on a GPU (entered here, on
    /// whichever thread serves the call: the setting is per thread).
    fn forward(
        &mut self,
        tokens: &Tensor,
        positions: &Tensor,
        step: Step<'_>,
        every_position: bool,
    ) -> Result<Tensor, TrainError> {
        let on_gpu = self.device != Device::Cpu;
        with_bf16_autocast(on_gpu, || {
            tch::no_grad(|| self.run(tokens, positions, step, every_position))
        })?
    }

    /// Tokens `[B, n]` at `positions` `[B, n]` through every unit; the last position's logits
    /// (`every_position`: the logits at every position, `[B, n, vocab]`).
    fn run(
        &mut self,
        tokens: &Tensor,
        positions: &Tensor,
        step: Step<'_>,
        every_position: bool,
    ) -> Result<Tensor, TrainError> {
        let mut comm = TensorComm::new(None, CommClock::default());
        let batch = MicroBatch {
            tokens: tokens.shallow_clone(),
            targets: tokens.shallow_clone(),
        };
        let ps = &self.model.params;
        let mut x: Option<Tensor> = None;
        let mut layer = 0;
        for (u, unit) in self.model.units.iter().enumerate() {
            x = Some(match unit {
                Unit::Embed(e) => {
                    let (b, n) = (tokens.size()[0], tokens.size()[1]);
                    let h = ps.get(e.wte).index_select(0, &tokens.view([-1])).view([b, n, -1]);
                    match e.wpe {
                        Some(wpe) => h + ps.get(wpe).index_select(0, &positions.view([-1])).view([b, n, -1]),
                        None => h,
                    }
                }
                Unit::Attention(a) => {
                    let input = x
                        .as_ref()
                        .ok_or_else(|| TrainError::Internal("attention without input".into()))?;
                    let out = attend(&self.model, a, input, positions, &mut self.cache[layer], &step);
                    layer += 1;
                    out
                }
                Unit::Head(_) if every_position => {
                    let input = x
                        .as_ref()
                        .ok_or_else(|| TrainError::Internal("head without input".into()))?;
                    self.model.head_logits(u, input)?
                }
                Unit::Mlp(_) | Unit::Head(_) => {
                    let mut cx = Fwd {
                        tp: &mut comm,
                        grad: false,
                        cuts: Vec::new(),
                    };
                    self.model.forward_unit(u, x.as_ref(), &batch, &mut cx, true)?
                }
            });
        }
        x.ok_or_else(|| TrainError::Internal("a model without units".into()))
    }
}

/// Logits (any dtype, any device) as one flat f32 row on the host.
fn host_f32(logits: &Tensor) -> Tensor {
    logits
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1])
        .to_device(Device::Cpu)
}

enum Step<'a> {
    Prefill {
        slot: usize,
    },
    /// `len`: the longest slot's length after this token.
    Decode {
        slots: &'a Tensor,
        len: i64,
    },
}

/// Rotary embedding of `x` `[B, H, n, hd]` at `positions` `[B, n]`.
fn rope_at(x: &Tensor, cos: &Tensor, sin: &Tensor, positions: &Tensor) -> Tensor {
    let (b, n) = (positions.size()[0], positions.size()[1]);
    let half = x.size()[3] / 2;
    let pick = |t: &Tensor| t.index_select(0, &positions.view([-1])).view([b, 1, n, half]);
    rotate_half(x, &pick(cos), &pick(sin))
}

/// One attention unit with the cache (the residual included, as in training).
fn attend(
    model: &Model,
    a: &Attention,
    x: &Tensor,
    positions: &Tensor,
    cache: &mut (Tensor, Tensor),
    step: &Step<'_>,
) -> Tensor {
    let ps = &model.params;
    let (b, n) = (x.size()[0], x.size()[1]);
    let (h, hd) = (a.heads, a.head_dim);
    let normed = a.norm.apply(ps, x, model.spec.norm_eps);
    let w = ps.get(a.qkv).view([3 * h * hd, -1]);
    let bias = a.qkv_bias.map(|id| ps.get(id).view([3 * h * hd]));
    let qkv = normed
        .linear(&w, bias.as_ref())
        .view([b, n, 3, h, hd])
        .permute([2, 0, 3, 1, 4]);
    let (mut q, mut k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
    if let Some((cos, sin)) = &a.rope {
        q = rope_at(&q, cos, sin, positions);
        k = rope_at(&k, cos, sin, positions);
    }
    let (cache_k, cache_v) = cache;
    let y = match step {
        Step::Prefill { slot } => {
            let s = *slot as i64;
            // copy_ converts to the cache's dtype.
            cache_k.i((s..s + 1, .., 0..n, ..)).copy_(&k);
            cache_v.i((s..s + 1, .., 0..n, ..)).copy_(&v);
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)
        }
        Step::Decode { slots, len } => {
            let len = *len;
            let pos = positions.view([-1]);
            let index = [Some(slots.shallow_clone()), None, Some(pos.shallow_clone())];
            // index_put_ needs the cache's dtype (k and v are bf16 under autocast, or f32 after
            // a rotary embedding; the cache is bf16 on a GPU).
            let _ = cache_k.index_put_(&index, &k.squeeze_dim(2).to_kind(cache_k.kind()), false);
            let _ = cache_v.index_put_(&index, &v.squeeze_dim(2).to_kind(cache_v.kind()), false);
            // Read back in the query's dtype (autocast casts all three to bf16 on a GPU anyway);
            // narrowed first, so only the `len` cached positions are gathered and copied.
            let keys = cache_k.narrow(2, 0, len).index_select(0, slots).to_kind(q.kind());
            let values = cache_v.narrow(2, 0, len).index_select(0, slots).to_kind(q.kind());
            let mask = Tensor::arange(len, (Kind::Int64, x.device()))
                .view([1, len])
                .le_tensor(&pos.view([b, 1]))
                .view([b, 1, 1, len]);
            Tensor::scaled_dot_product_attention(&q, &keys, &values, Some(&mask), 0.0, false, None, false)
        }
    };
    let y = y.transpose(1, 2).reshape([b, n, h * hd]);
    let o = y.linear::<Tensor>(ps.get(a.out), None);
    let o = match a.out_bias {
        Some(id) => o + ps.get(id),
        None => o,
    };
    x + o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::forward_stage;
    use crate::spec::Arch;

    fn tiny(arch: Arch) -> Model {
        crate::model::tiny_test_model(arch)
    }

    /// Training's forward pass over `tokens`: the last position's logits.
    fn full_forward(model: &Model, tokens: &[u32]) -> Vec<f32> {
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let t = Tensor::from_slice(&ids).view([1, ids.len() as i64]);
        let batch = MicroBatch {
            tokens: t.shallow_clone(),
            targets: t,
        };
        let mut tp = TensorComm::new(None, CommClock::default());
        let (logits, _) =
            tch::no_grad(|| forward_stage(model, None, &batch, &mut tp, false, false, true).map_err(|e| e.to_string()))
                .unwrap();
        Vec::<f32>::try_from(logits.view([-1])).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Training's loss over `tokens`: the mean cross-entropy of each token after the first.
    fn training_loss(model: &Model, tokens: &[u32]) -> f64 {
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let n = ids.len() as i64 - 1;
        let batch = MicroBatch {
            tokens: Tensor::from_slice(&ids[..n as usize]).view([1, n]),
            targets: Tensor::from_slice(&ids[1..]).view([1, n]),
        };
        let mut tp = TensorComm::new(None, CommClock::default());
        let (loss, _) = tch::no_grad(|| {
            forward_stage(model, None, &batch, &mut tp, false, false, false).map_err(|e| e.to_string())
        })
        .unwrap();
        loss.double_value(&[])
    }

    #[test]
    fn scored_prompts_are_the_training_loss_and_leave_the_slot_ready() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            let reference = tiny(arch);
            let mut kv = KvModel::new(tiny(arch), 2, Device::Cpu).unwrap();
            let a: Vec<u32> = vec![5, 17, 3, 60, 9, 41, 2, 33, 12, 8, 50, 1];
            let (next, scored) = kv.prefill_scored(1, &a, 3).unwrap();
            assert_eq!(scored.len(), a.len() - 1);
            let mean = -scored.iter().map(|s| f64::from(s.logprob)).sum::<f64>() / scored.len() as f64;
            let loss = training_loss(&reference, &a);
            assert!(
                (mean - loss).abs() < 1e-5,
                "{arch:?}: scored {mean} vs training loss {loss}"
            );
            for s in &scored {
                assert_eq!(s.top.len(), 3);
                assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1));
                assert!(s.logprob <= s.top[0].1 + 1e-6);
            }
            // The same next-token logits as a plain prefill, and the cache is filled as by one.
            assert!(max_diff(&next, &full_forward(&reference, &a)) < 1e-5);
            let out = kv.decode(&[(1, 7)]).unwrap();
            let mut longer = a.clone();
            longer.push(7);
            assert!(max_diff(&out[0], &full_forward(&reference, &longer)) < 1e-4, "{arch:?}");
            // One token: nothing to score.
            assert!(kv.prefill_scored(0, &[4], 2).unwrap().1.is_empty());
        }
    }

    #[test]
    fn cached_generation_matches_the_training_forward_pass() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            let reference = tiny(arch);
            let mut kv = KvModel::new(tiny(arch), 3, Device::Cpu).unwrap();
            // Two sequences of different lengths advance together in slots 2 and 0.
            let a: Vec<u32> = vec![5, 17, 3, 60, 9, 41, 2, 33, 12, 8, 50, 1];
            let b: Vec<u32> = vec![7, 7, 21, 44, 0, 63, 30, 11, 19, 26, 4, 39];
            let (pa, pb) = (4, 2);
            let la = kv.prefill(2, &a[..pa]).unwrap();
            let lb = kv.prefill(0, &b[..pb]).unwrap();
            assert!(
                max_diff(&la, &full_forward(&reference, &a[..pa])) < 1e-5,
                "{arch:?} prefill a"
            );
            assert!(
                max_diff(&lb, &full_forward(&reference, &b[..pb])) < 1e-5,
                "{arch:?} prefill b"
            );
            for step in 0..8 {
                let (na, nb) = (pa + step, pb + step);
                let out = kv.decode(&[(2, a[na]), (0, b[nb])]).unwrap();
                let da = max_diff(&out[0], &full_forward(&reference, &a[..=na]));
                let db = max_diff(&out[1], &full_forward(&reference, &b[..=nb]));
                assert!(da < 1e-4 && db < 1e-4, "{arch:?} step {step}: {da} {db}");
            }
            // A released slot starts over.
            kv.release(2);
            let again = kv.prefill(2, &b[..3]).unwrap();
            assert!(max_diff(&again, &full_forward(&reference, &b[..3])) < 1e-5);
        }
    }

    #[test]
    fn a_bf16_cache_follows_the_f32_one() {
        // What a GPU runs: the cache in bf16, written from f32 (or bf16) keys and values and
        // read back in the query's dtype. On the CPU (no autocast) only the cache rounds.
        for arch in [Arch::Gpt2, Arch::Llama] {
            let mut exact = KvModel::new(tiny(arch), 2, Device::Cpu).unwrap();
            let mut half = KvModel::with_cache_kind(tiny(arch), 2, Device::Cpu, Kind::BFloat16).unwrap();
            assert_eq!(half.cache[0].0.kind(), Kind::BFloat16);
            assert!(half.bytes() < exact.bytes());
            let a: Vec<u32> = vec![5, 17, 3, 60, 9, 41, 2, 33];
            let (le, lh) = (exact.prefill(1, &a[..3]).unwrap(), half.prefill(1, &a[..3]).unwrap());
            assert!(
                max_diff(&le, &lh) < 1e-5,
                "{arch:?} prefill attends over the fresh keys"
            );
            for (step, &t) in a[3..].iter().enumerate() {
                let (e, h) = (exact.decode(&[(1, t)]).unwrap(), half.decode(&[(1, t)]).unwrap());
                let d = max_diff(&e[0], &h[0]);
                assert!(d < 5e-2, "{arch:?} step {step}: {d}");
            }
        }
        assert_eq!(cache_kind(Device::Cpu), Kind::Float);
        assert_eq!(cache_kind(Device::Cuda(0)), Kind::BFloat16);
    }

    #[test]
    fn the_device_flag_on_a_host_without_a_gpu() {
        for (text, choice) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda),
            ("auto", DeviceChoice::Auto),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice));
            assert_eq!(choice.to_string(), text);
        }
        assert!("gpu".parse::<DeviceChoice>().unwrap_err().contains("cpu, cuda or auto"));
        let alone = LocalRank::alone();
        let cpu = tool_device(DeviceChoice::Cpu, alone).unwrap();
        assert_eq!((cpu.device, cpu.name()), (Device::Cpu, "cpu".to_string()));
        assert_eq!(cpu.describe(), "cpu in f32");
        enter_tool_device(&cpu).unwrap();
        if tch::Cuda::is_available() {
            // The GPU host: auto and cuda both pick this process's GPU.
            let auto = tool_device(DeviceChoice::Auto, alone).unwrap();
            assert_eq!(auto.device, Device::Cuda(0));
            assert!(auto.describe().contains("bf16 autocast"), "{}", auto.describe());
            return;
        }
        let auto = tool_device(DeviceChoice::Auto, alone).unwrap();
        assert_eq!(auto.device, Device::Cpu);
        assert_eq!(auto.describe(), "cpu in f32 (--device auto: no CUDA device is visible)");
        let e = tool_device(DeviceChoice::Cuda, alone).unwrap_err().to_string();
        assert!(
            e.starts_with("--device cuda: no CUDA device is visible") && e.contains("--device cpu"),
            "{e}"
        );
    }

    #[test]
    fn slots_and_context_are_checked() {
        let mut kv = KvModel::new(tiny(Arch::Gpt2), 2, Device::Cpu).unwrap();
        assert!(kv.prefill(2, &[1]).is_err());
        assert!(kv.prefill(0, &[]).is_err());
        assert!(kv.prefill(0, &[1; 17]).is_err());
        assert!(kv.decode(&[(1, 3)]).is_err(), "decode of an empty slot");
        kv.prefill(0, &[1; 16]).unwrap();
        assert!(kv.decode(&[(0, 3)]).is_err(), "the context is full");
        assert!(kv.bytes() > 0);
    }
}
