//! The job spec: one TOML file describes the model, the parallel layout, the data, the
//! optimizer and the run. Unknown keys are errors (a typo must not silently train the wrong
//! model); `--set section.key=value` overrides apply before validation; `validate` checks
//! every divisibility the layout needs and names the field and the numbers when one fails.
//! Every product of sizes is checked (a product that overflows is an error naming its
//! factors), every duration is finite and bounded, and the memory a rank will need is
//! estimated before anything is built ([`JobSpec::memory_estimate`], [`JobSpec::check_memory`]).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("job spec {path}: {message}")]
    Parse { path: String, message: String },
    #[error("job spec: `--set {assignment}`: {message}")]
    Override { assignment: String, message: String },
    #[error("job spec: `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
    /// The estimate of one rank's memory is above the limit.
    #[error(
        "job spec: the model does not fit: the largest rank needs about {} ({detail}), more than {} ({limit_source})",
        human_bytes(*needed_bytes),
        human_bytes(*limit_bytes)
    )]
    TooLarge {
        needed_bytes: f64,
        limit_bytes: f64,
        detail: String,
        limit_source: String,
    },
}

/// The longest accepted deadline (`parallel.timeout_s`, `checkpoint.commit_timeout_s`): 7 days.
pub const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

/// The largest element count of one tensor (libtorch sizes are `i64`).
const MAX_NUMEL: u64 = i64::MAX as u64;

const GIB: f64 = (1u64 << 30) as f64;

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Learned positions, LayerNorm, GELU (tanh), biases.
    Gpt2,
    /// RMSNorm, rotary positions, SwiGLU, no biases.
    Llama,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Vocabulary size; 0 = the dataset's, padded up to a multiple of `vocab_multiple`.
    pub vocab_size: usize,
    /// Padding multiple for the vocabulary. Independent of the TP degree on purpose: a padded
    /// size that changed with the layout would change the model and its losses.
    pub vocab_multiple: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// MLP hidden size; 0 = 4·d (gpt2) or 8/3·d rounded up to a multiple of 64 (llama).
    pub ffn_hidden: usize,
    pub seq_len: usize,
    pub tie_embeddings: bool,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub init_std: f64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            arch: Arch::Gpt2,
            vocab_size: 0,
            vocab_multiple: 128,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            ffn_hidden: 0,
            seq_len: 128,
            tie_embeddings: true,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            init_std: 0.02,
        }
    }
}

impl ModelSpec {
    /// Saturates instead of overflowing; `validate` refuses the sizes where that matters.
    pub fn ffn(&self) -> usize {
        match (self.ffn_hidden, self.arch) {
            (0, Arch::Gpt2) => self.d_model.saturating_mul(4),
            (0, Arch::Llama) => (self.d_model.saturating_mul(8) / 3).div_ceil(64).saturating_mul(64),
            (n, _) => n,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Parameter count of the global model (tied embeddings counted once); `u64::MAX` when
    /// it overflows (which `validate` refuses).
    pub fn num_params(&self) -> u64 {
        self.param_count().unwrap_or(u64::MAX)
    }

    /// Parameter count of the global model, `None` when it overflows a `u64`.
    pub fn param_count(&self) -> Option<u64> {
        let (d, v, f, l) = (
            self.d_model as u64,
            self.vocab_size as u64,
            self.ffn() as u64,
            self.n_layers as u64,
        );
        let gpt = self.arch == Arch::Gpt2;
        let (dd, df) = (d.checked_mul(d)?, d.checked_mul(f)?);
        let per_layer = if gpt {
            // QKV and out weights and biases, fc and proj weights and biases, two norms.
            checked_sum([dd.checked_mul(4)?, df.checked_mul(2)?, f, d.checked_mul(9)?])?
        } else {
            checked_sum([dd.checked_mul(4)?, df.checked_mul(3)?, d.checked_mul(2)?])?
        };
        let embed = v.checked_mul(d)?;
        let pos = if gpt { (self.seq_len as u64).checked_mul(d)? } else { 0 };
        let final_norm = if gpt { d.checked_mul(2)? } else { d };
        let head = if self.tie_embeddings { 0 } else { embed };
        checked_sum([embed, pos, l.checked_mul(per_layer)?, final_norm, head])
    }

    /// Training FLOPs per token as in the MFU formula: 6·N + 12·L·d·T (N without the
    /// position embedding).
    pub fn flops_per_token(&self) -> f64 {
        let (l, d, t) = (self.n_layers as f64, self.d_model as f64, self.seq_len as f64);
        let pos = match self.arch {
            Arch::Gpt2 => t * d,
            Arch::Llama => 0.0,
        };
        6.0 * (self.num_params() as f64 - pos) + 12.0 * l * d * t
    }
}

fn checked_sum(terms: impl IntoIterator<Item = u64>) -> Option<u64> {
    terms.into_iter().try_fold(0u64, u64::checked_add)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// One forward, one backward in the steady state: at most `pp` micro-batches in flight.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// All forwards, then all backwards: simpler, holds every micro-batch's activations.
    Gpipe,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSpec {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub schedule: Schedule,
    /// Layers per pipeline stage; empty = balanced by parameter count.
    pub stage_layers: Vec<usize>,
    /// ZeRO-1: shard optimizer state over data-parallel ranks.
    pub zero1: bool,
    /// Gradient bucket size for the data-parallel all-reduce, MiB.
    pub bucket_mb: f64,
    /// Deadline of every collective call, seconds.
    pub timeout_s: f64,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            dp: 1,
            tp: 1,
            pp: 1,
            schedule: Schedule::OneFOneB,
            stage_layers: Vec::new(),
            zero1: false,
            bucket_mb: 25.0,
            timeout_s: 300.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// A dataset directory written by `gantry data prepare` or `gantry data synth`.
    pub path: PathBuf,
    /// Fraction of documents held out for validation.
    pub valid_fraction: f64,
    pub seed: u64,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            path: PathBuf::from("data/synth"),
            valid_fraction: 0.05,
            seed: 1234,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSpec {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
}

impl Default for OptimSpec {
    fn default() -> Self {
        OptimSpec {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSpec {
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub steps: u64,
    /// Samples per optimizer step over all data-parallel ranks.
    pub global_batch: usize,
    /// Samples per micro-batch on one rank.
    pub micro_batch: usize,
    pub seed: u64,
    pub device: DeviceSpec,
    /// Validation loss every this many steps (and at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Global batches of the validation split per evaluation.
    pub eval_batches: u64,
    /// Intra-op threads per rank; 0 = cores / ranks on this host.
    pub threads: usize,
    /// At the end, continue validation text with this many sampled tokens (0 = none).
    pub sample_tokens: usize,
    /// Stop after this many steps (0 = run all `steps`), keeping the learning-rate schedule of
    /// `steps`: a run cut short on purpose, to be resumed from its checkpoint.
    pub stop_after: u64,
    /// Memory one rank may use, GiB. The spec is refused before anything is built when the
    /// estimate of its largest rank (weights, gradients and AdamW moments, the activations of
    /// the micro-batches in flight, the logits, the prefetched token batches; see
    /// [`JobSpec::memory_estimate`]) is larger. 0 = this machine's memory (`MemTotal`) divided
    /// among the ranks on it, checked by `gantry launch` and `gantry rank`.
    pub max_memory_gib: f64,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            steps: 100,
            global_batch: 16,
            micro_batch: 4,
            seed: 42,
            device: DeviceSpec::Cpu,
            eval_every: 0,
            eval_batches: 4,
            threads: 0,
            sample_tokens: 0,
            stop_after: 0,
            max_memory_gib: 0.0,
        }
    }
}

/// Where and when to save checkpoints, and what to resume from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// A local directory, `file:///…` or `s3://bucket/prefix` (S3 settings from the standard
    /// `AWS_*` environment variables). Empty = no checkpoints.
    pub dir: String,
    /// Save every this many steps (0 = only at the end of the run).
    pub every: u64,
    /// Save when the run ends (at `steps` or `stop_after`).
    pub at_end: bool,
    /// Keep the newest K committed checkpoints (0 = keep all) ...
    pub keep_last: usize,
    /// ... plus every step divisible by this (0 = none).
    pub keep_every: u64,
    /// Resume from `latest` or a step number; `auto` = the latest committed checkpoint if
    /// there is one, else start fresh; empty = start fresh.
    pub resume: String,
    /// Chunk objects are cut at about this many MiB.
    pub chunk_mb: f64,
    /// How long rank 0 waits for the other ranks' writes before giving up on a save.
    pub commit_timeout_s: f64,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            dir: String::new(),
            every: 0,
            at_end: true,
            keep_last: 0,
            keep_every: 0,
            resume: String::new(),
            chunk_mb: 256.0,
            commit_timeout_s: 600.0,
        }
    }
}

impl CheckpointSpec {
    pub fn enabled(&self) -> bool {
        !self.dir.is_empty()
    }
}

/// Registering the run's committed checkpoints as versions of a model in a registry
/// (`gantry registry serve`); rank 0 does it in the background, so training never waits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySpec {
    /// The registry's address (`http://host:port`); empty = do not register.
    pub url: String,
    /// The model the checkpoints become versions of.
    pub model: String,
    /// `final`: the run's last committed checkpoint; `every`: each committed checkpoint.
    pub register: String,
    /// Move this alias (e.g. `staging`) to each new version; empty = none.
    pub alias: String,
    /// The environment variable that holds a write token.
    pub token_env: String,
}

impl Default for RegistrySpec {
    fn default() -> Self {
        RegistrySpec {
            url: String::new(),
            model: String::new(),
            register: "final".into(),
            alias: String::new(),
            token_env: "GANTRY_REGISTRY_TOKEN".into(),
        }
    }
}

impl RegistrySpec {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSpec {
    /// Names the run directory (`runs/<name>-<time>` unless given).
    pub name: String,
    pub model: ModelSpec,
    pub parallel: ParallelSpec,
    pub data: DataSpec,
    pub optim: OptimSpec,
    pub train: TrainSpec,
    pub checkpoint: CheckpointSpec,
    pub registry: RegistrySpec,
}

impl JobSpec {
    /// Parse TOML text, apply `key=value` overrides (`train.steps=20`, `parallel.tp=2`).
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<JobSpec, SpecError> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| SpecError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        JobSpec::deserialize(value).map_err(|e| SpecError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a job spec always serializes")
    }

    /// Micro-batches per step on each rank (gradient accumulation steps).
    pub fn micro_batches(&self) -> usize {
        self.train.global_batch / self.train.micro_batch.saturating_mul(self.parallel.dp).max(1)
    }

    /// Check the spec against a world of `world` ranks. Needs `model.vocab_size` resolved.
    /// The memory estimate is checked against `train.max_memory_gib` when it is set; the
    /// machine's memory is the binary's to pass to [`JobSpec::check_memory`].
    pub fn validate(&self, world: usize) -> Result<(), SpecError> {
        self.validate_layout(world)?;
        self.validate_model()?;
        self.validate_batch()?;
        self.validate_numbers()?;
        self.validate_checkpoint()?;
        self.validate_registry()?;
        self.check_memory(None)?;
        Ok(())
    }

    fn validate_layout(&self, world: usize) -> Result<(), SpecError> {
        let (m, p, t) = (&self.model, &self.parallel, &self.train);
        for (field, v) in [
            ("parallel.dp", p.dp),
            ("parallel.tp", p.tp),
            ("parallel.pp", p.pp),
            ("model.d_model", m.d_model),
            ("model.n_layers", m.n_layers),
            ("model.n_heads", m.n_heads),
            ("model.seq_len", m.seq_len),
            ("train.global_batch", t.global_batch),
            ("train.micro_batch", t.micro_batch),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        let Some(layout) = p.dp.checked_mul(p.tp).and_then(|x| x.checked_mul(p.pp)) else {
            return Err(invalid(
                "parallel",
                format!(
                    "dp {} × tp {} × pp {} overflows (more than {} ranks), but the world has {world}",
                    p.dp,
                    p.tp,
                    p.pp,
                    usize::MAX
                ),
            ));
        };
        if layout != world {
            return Err(invalid(
                "parallel",
                format!(
                    "dp {} × tp {} × pp {} = {layout} ranks, but the world has {world}",
                    p.dp, p.tp, p.pp
                ),
            ));
        }
        if p.pp > m.n_layers {
            return Err(invalid(
                "parallel.pp",
                format!(
                    "pp {} is more than n_layers {} (every stage needs a layer)",
                    p.pp, m.n_layers
                ),
            ));
        }
        if !p.stage_layers.is_empty() {
            if p.stage_layers.len() != p.pp {
                return Err(invalid(
                    "parallel.stage_layers",
                    format!("{} entries for pp {}", p.stage_layers.len(), p.pp),
                ));
            }
            let sum = p.stage_layers.iter().try_fold(0usize, |a, &n| a.checked_add(n));
            if sum != Some(m.n_layers) || p.stage_layers.contains(&0) {
                return Err(invalid(
                    "parallel.stage_layers",
                    format!(
                        "{:?} must be positive and sum to n_layers {} (sums to {})",
                        p.stage_layers,
                        m.n_layers,
                        sum.map_or("more than usize".into(), |s| s.to_string())
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Divisibility by heads and TP, and every tensor's element count within libtorch's `i64`.
    fn validate_model(&self) -> Result<(), SpecError> {
        let (m, p) = (&self.model, &self.parallel);
        if !m.d_model.is_multiple_of(m.n_heads) {
            return Err(invalid(
                "model.d_model",
                format!("d_model {} is not divisible by n_heads {}", m.d_model, m.n_heads),
            ));
        }
        if m.arch == Arch::Llama && !m.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "model.d_model",
                "llama needs an even head dimension for rotary positions",
            ));
        }
        if !m.n_heads.is_multiple_of(p.tp) {
            return Err(invalid(
                "parallel.tp",
                format!("n_heads {} is not divisible by tp {}", m.n_heads, p.tp),
            ));
        }
        if !m.ffn().is_multiple_of(p.tp) {
            return Err(invalid(
                "parallel.tp",
                format!("ffn_hidden {} is not divisible by tp {}", m.ffn(), p.tp),
            ));
        }
        if m.vocab_size == 0 {
            return Err(invalid("model.vocab_size", "not resolved (0 means: from the dataset)"));
        }
        if !m.vocab_size.is_multiple_of(p.tp) {
            return Err(invalid(
                "parallel.tp",
                format!("vocab_size {} is not divisible by tp {}", m.vocab_size, p.tp),
            ));
        }
        let (d, v, f, s) = (m.d_model as u64, m.vocab_size as u64, m.ffn() as u64, m.seq_len as u64);
        let (b, vt) = (self.train.micro_batch as u64, (m.vocab_size / p.tp) as u64);
        if m.ffn_hidden == 0 && m.d_model > usize::MAX / 8 {
            return Err(invalid(
                "model.d_model",
                format!("d_model {} is too large to derive ffn_hidden from", m.d_model),
            ));
        }
        #[rustfmt::skip]
        let tensors: [(&'static str, &str, Factors); 6] = [
            ("model.vocab_size", "the token embedding", &[("vocab_size", v), ("d_model", d)]),
            ("model.seq_len", "the positions", &[("seq_len", s), ("d_model", d)]),
            ("model.d_model", "the QKV weight", &[("3", 3), ("d_model", d), ("d_model", d)]),
            ("model.ffn_hidden", "the MLP weight", &[("2", 2), ("ffn_hidden", f), ("d_model", d)]),
            ("train.micro_batch", "a micro-batch's activations", &[("micro_batch", b), ("seq_len", s), ("d_model", d)]),
            ("train.micro_batch", "a micro-batch's logits", &[("micro_batch", b), ("seq_len", s), ("vocab_size / tp", vt)]),
        ];
        for (field, what, factors) in tensors {
            checked_product(field, what, factors, MAX_NUMEL)?;
        }
        if m.param_count().is_none() {
            return Err(invalid(
                "model",
                format!(
                    "the parameter count of n_layers {} × d_model {} (ffn_hidden {}, vocab_size {}) overflows a u64",
                    m.n_layers, m.d_model, f, m.vocab_size
                ),
            ));
        }
        Ok(())
    }

    fn validate_batch(&self) -> Result<(), SpecError> {
        let (p, t) = (&self.parallel, &self.train);
        let Some(per_step) = t.micro_batch.checked_mul(p.dp) else {
            return Err(invalid(
                "train.micro_batch",
                format!("micro_batch {} × dp {} overflows", t.micro_batch, p.dp),
            ));
        };
        if !t.global_batch.is_multiple_of(per_step) {
            return Err(invalid(
                "train.global_batch",
                format!(
                    "global_batch {} is not divisible by micro_batch {} × dp {} = {per_step}",
                    t.global_batch, t.micro_batch, p.dp
                ),
            ));
        }
        // The token counters of the metrics: steps × global_batch × seq_len.
        let factors = [
            ("steps", t.steps),
            ("global_batch", t.global_batch as u64),
            ("seq_len", self.model.seq_len as u64),
        ];
        checked_product("train.steps", "the tokens of the run", &factors, u64::MAX)?;
        if t.stop_after > t.steps {
            return Err(invalid(
                "train.stop_after",
                format!("{} is past train.steps {}", t.stop_after, t.steps),
            ));
        }
        Ok(())
    }

    /// Floats: finite where they become sizes or durations, in range where they are rates.
    fn validate_numbers(&self) -> Result<(), SpecError> {
        let p = &self.parallel;
        if !(p.bucket_mb.is_finite() && p.bucket_mb > 0.0) {
            return Err(invalid(
                "parallel.bucket_mb",
                format!("{} is not a positive number of MiB", num(p.bucket_mb)),
            ));
        }
        seconds("parallel.timeout_s", p.timeout_s)?;
        let o = &self.optim;
        if o.lr.is_nan() || o.lr <= 0.0 || o.min_lr.is_nan() || o.min_lr < 0.0 || o.min_lr > o.lr {
            return Err(invalid(
                "optim.lr",
                format!("need 0 <= min_lr ({}) <= lr ({}), lr > 0", o.min_lr, o.lr),
            ));
        }
        for (field, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(field, format!("{b} is not in [0, 1)")));
            }
        }
        if !(0.0..1.0).contains(&self.data.valid_fraction) {
            return Err(invalid(
                "data.valid_fraction",
                format!("{} is not in [0, 1)", self.data.valid_fraction),
            ));
        }
        let limit = self.train.max_memory_gib;
        if !(limit.is_finite() && limit >= 0.0) {
            return Err(invalid(
                "train.max_memory_gib",
                format!("{} is not a number of GiB (0 = this machine's memory)", num(limit)),
            ));
        }
        Ok(())
    }

    fn validate_checkpoint(&self) -> Result<(), SpecError> {
        let c = &self.checkpoint;
        if !c.resume.is_empty() && c.resume != "auto" && c.resume.parse::<gantry_checkpoint::Which>().is_err() {
            return Err(invalid(
                "checkpoint.resume",
                format!("{:?} is neither `latest`, `auto` nor a step number", c.resume),
            ));
        }
        if !c.resume.is_empty() && !c.enabled() {
            return Err(invalid("checkpoint.resume", "needs checkpoint.dir"));
        }
        if !(c.chunk_mb.is_finite() && c.chunk_mb > 0.0) {
            return Err(invalid(
                "checkpoint.chunk_mb",
                format!("{} is not a positive number of MiB", num(c.chunk_mb)),
            ));
        }
        seconds("checkpoint.commit_timeout_s", c.commit_timeout_s)
    }

    fn validate_registry(&self) -> Result<(), SpecError> {
        let (r, c) = (&self.registry, &self.checkpoint);
        if !r.enabled() {
            return Ok(());
        }
        if !c.enabled() {
            return Err(invalid(
                "registry.url",
                "registers checkpoints, so it needs checkpoint.dir",
            ));
        }
        if r.model.trim().is_empty() {
            return Err(invalid(
                "registry.model",
                "names the model the checkpoints become versions of",
            ));
        }
        if r.register != "final" && r.register != "every" {
            return Err(invalid(
                "registry.register",
                format!("{:?} is neither `final` nor `every`", r.register),
            ));
        }
        Ok(())
    }

    /// What the largest rank of this job will need, estimated from the sizes alone (in `f64`,
    /// so absurd sizes give huge figures, never an overflow). It is meant as a floor: every
    /// term is something the rank really holds, and libtorch's workspaces, the temporary
    /// global tensors of initialization and fragmentation come on top.
    pub fn memory_estimate(&self) -> MemoryEstimate {
        let (m, p, t) = (&self.model, &self.parallel, &self.train);
        let (tp, pp, dp) = (p.tp.max(1) as f64, p.pp.max(1) as f64, p.dp.max(1) as f64);
        let (d, f, v, s, b) = (
            m.d_model as f64,
            m.ffn() as f64,
            m.vocab_size as f64,
            m.seq_len as f64,
            t.micro_batch as f64,
        );
        let params = m.num_params();
        // The largest stage holds at least the average, and TP splits every big tensor.
        let params_per_rank = params as f64 / (tp * pp);
        let moments = if p.zero1 { 8.0 / dp } else { 8.0 };
        let state_bytes = params_per_rank * (4.0 + 4.0 + moments);
        let micro = self.micro_batches().max(1);
        let in_flight = match p.schedule {
            Schedule::OneFOneB => micro.min(p.pp.max(1)),
            Schedule::Gpipe => micro,
        };
        let layers = match p.stage_layers.iter().max() {
            Some(&n) => n,
            None => m.n_layers.div_ceil(p.pp.max(1)),
        };
        // Per token and layer: the two norms' inputs and outputs, QKV, the attention output,
        // the MLP's hidden activations before and after the nonlinearity.
        let elem = match t.device {
            DeviceSpec::Cpu => 4.0,
            DeviceSpec::Cuda => 2.0,
        };
        let per_layer = (4.0 * d + (4.0 * d + 2.0 * f) / tp) * elem;
        let tokens = b * s;
        let logits = tokens * (v / tp) * 4.0 * 2.0;
        let activation_bytes = in_flight as f64 * layers as f64 * tokens * per_layer + logits;
        // The prefetcher queues two steps' micro-batches of token and target ids (i64).
        let data_bytes = 2.0 * micro as f64 * tokens * 16.0;
        MemoryEstimate {
            params,
            params_per_rank,
            state_bytes,
            activation_bytes,
            data_bytes,
            in_flight,
            layers_per_stage: layers,
        }
    }

    /// Refuse the spec when [`memory_estimate`](Self::memory_estimate) is above
    /// `train.max_memory_gib`, or, when that is 0, above `machine_bytes_per_rank` (this
    /// machine's memory divided among its ranks, which the binary reads; `None`: unchecked).
    pub fn check_memory(&self, machine_bytes_per_rank: Option<u64>) -> Result<(), SpecError> {
        let explicit = self.train.max_memory_gib;
        let (limit_bytes, limit_source) = if explicit > 0.0 {
            (explicit * GIB, format!("`train.max_memory_gib` = {explicit}"))
        } else if let Some(bytes) = machine_bytes_per_rank {
            (
                bytes as f64,
                "this machine's memory divided among its ranks; `train.max_memory_gib` sets another limit".into(),
            )
        } else {
            return Ok(());
        };
        let e = self.memory_estimate();
        if e.total_bytes() <= limit_bytes {
            return Ok(());
        }
        let (m, t) = (&self.model, &self.train);
        let detail = format!(
            "{} of the model's {} parameters: {} of weights, gradients and AdamW moments; \
             {} of activations for {} micro-batch(es) in flight of micro_batch {} × seq_len {} \
             through {} layer(s) of d_model {} and logits over vocab_size {}; {} of prefetched tokens",
            count(e.params_per_rank),
            e.params,
            human_bytes(e.state_bytes),
            human_bytes(e.activation_bytes),
            e.in_flight,
            t.micro_batch,
            m.seq_len,
            e.layers_per_stage,
            m.d_model,
            m.vocab_size,
            human_bytes(e.data_bytes),
        );
        Err(SpecError::TooLarge {
            needed_bytes: e.total_bytes(),
            limit_bytes,
            detail,
            limit_source,
        })
    }
}

/// What one rank needs, by [`JobSpec::memory_estimate`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters of the whole model.
    pub params: u64,
    /// Parameters of the largest rank (at least `params / (tp × pp)`).
    pub params_per_rank: f64,
    /// fp32 weights and gradients, AdamW's two moments (divided over DP under ZeRO-1).
    pub state_bytes: f64,
    /// What the first stage keeps for backward, plus the logits and their gradient.
    pub activation_bytes: f64,
    /// Token and target ids queued by the data prefetcher.
    pub data_bytes: f64,
    /// Micro-batches whose activations a stage holds at once (1F1B: at most `pp`).
    pub in_flight: usize,
    pub layers_per_stage: usize,
}

impl MemoryEstimate {
    pub fn total_bytes(&self) -> f64 {
        self.state_bytes + self.activation_bytes + self.data_bytes
    }
}

/// `MemTotal` of `/proc/meminfo`'s text, in bytes (the binary reads the file).
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Named factors of a product of sizes.
type Factors<'a> = &'a [(&'a str, u64)];

/// `factors` multiplied, or an error naming them when the product exceeds `max`.
fn checked_product(field: &'static str, what: &str, factors: Factors, max: u64) -> Result<u64, SpecError> {
    let product = factors
        .iter()
        .try_fold(1u64, |acc, &(_, x)| acc.checked_mul(x))
        .filter(|&p| p <= max);
    product.ok_or_else(|| {
        let named: Vec<String> = factors.iter().map(|(n, x)| format!("{n} {x}")).collect();
        invalid(field, format!("{what}: {} is more than {max}", named.join(" × ")))
    })
}

/// A deadline: finite, positive, at most [`MAX_TIMEOUT_S`] (it becomes a `Duration`).
fn seconds(field: &'static str, value: f64) -> Result<(), SpecError> {
    if value > 0.0 && value <= MAX_TIMEOUT_S {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{} is not a number of seconds in (0, {MAX_TIMEOUT_S}] (at most 7 days)",
            num(value)
        ),
    ))
}

/// A float as a user wrote it, in exponent form when long (`1e300`, not 301 digits).
fn num(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1e15 {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// A count estimated in `f64`: whole below 10^15, else in exponent form (no false digits).
fn count(n: f64) -> String {
    if n < 1e15 {
        format!("{n:.0}")
    } else {
        format!("{n:.3e}")
    }
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let (mut value, mut unit) = (bytes, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 1e6 {
        format!("{value:.3e} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `a.b.c=value`: the value is parsed as TOML (`2`, `true`, `"text"`, `[1, 2]`), falling back
/// to a bare string (`data.path=/tmp/x`).
fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<(), SpecError> {
    let bad = |message: &str| SpecError::Override {
        assignment: assignment.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = assignment.split_once('=').ok_or_else(|| bad("expected key=value"))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(bad("empty key segment"));
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| bad(&format!("`{p}` is not a table")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(overrides: &[&str]) -> JobSpec {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let mut s = JobSpec::parse("", "test", &o).unwrap();
        if s.model.vocab_size == 0 {
            s.model.vocab_size = 512;
        }
        s
    }

    #[test]
    fn defaults_validate_on_one_rank() {
        spec(&[]).validate(1).unwrap();
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = JobSpec::parse("[model]\nd_modle = 3\n", "job.toml", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("d_modle") && msg.contains("job.toml"), "{msg}");
        let err = JobSpec::parse("", "job.toml", &["train.stepz=3".into()]).unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");
    }

    #[test]
    fn overrides_parse_values_as_toml() {
        let s = spec(&[
            "train.steps=7",
            "parallel.zero1=true",
            "data.path=/tmp/x",
            "name=\"a b\"",
        ]);
        assert_eq!(s.train.steps, 7);
        assert!(s.parallel.zero1);
        assert_eq!(s.data.path, PathBuf::from("/tmp/x"));
        assert_eq!(s.name, "a b");
    }

    #[test]
    fn layout_errors_name_fields_and_numbers() {
        let e = spec(&["parallel.dp=2", "parallel.tp=2"])
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dp 2 × tp 2 × pp 1 = 4") && e.contains("world has 2"), "{e}");
        let e = spec(&["parallel.tp=3"]).validate(3).unwrap_err().to_string();
        assert!(e.contains("n_heads 4 is not divisible by tp 3"), "{e}");
        let e = spec(&["parallel.pp=5"]).validate(5).unwrap_err().to_string();
        assert!(e.contains("pp 5 is more than n_layers 4"), "{e}");
        let e = spec(&["parallel.dp=2", "train.global_batch=12", "train.micro_batch=4"])
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("global_batch 12 is not divisible by micro_batch 4 × dp 2 = 8"),
            "{e}"
        );
        let e = spec(&["model.vocab_size=510", "parallel.tp=4"])
            .validate(4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size 510 is not divisible by tp 4"), "{e}");
        let e = spec(&["parallel.pp=2", "parallel.stage_layers=[3, 2]"])
            .validate(2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sum to n_layers 4"), "{e}");
    }

    #[test]
    fn resolved_spec_round_trips_through_toml() {
        let s = spec(&["model.arch=\"llama\"", "parallel.schedule=\"gpipe\""]);
        let back = JobSpec::parse(&s.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(s, back);
    }

    #[test]
    fn parameter_count_matches_gpt2_small() {
        let m = ModelSpec {
            vocab_size: 50257,
            d_model: 768,
            n_layers: 12,
            n_heads: 12,
            seq_len: 1024,
            ..ModelSpec::default()
        };
        assert_eq!(m.num_params(), 124_439_808);
    }

    fn invalid_field(e: SpecError) -> (&'static str, String) {
        let msg = e.to_string();
        match e {
            SpecError::Invalid { field, .. } => (field, msg),
            other => panic!("expected SpecError::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn deadlines_must_be_finite_positive_and_at_most_a_week() {
        for field in ["parallel.timeout_s", "checkpoint.commit_timeout_s"] {
            for (value, shown) in [
                ("inf", "inf"),
                ("1e300", "1e300"),
                ("nan", "NaN"),
                ("0", "0"),
                ("-1", "-1"),
                ("604801", "604801"),
            ] {
                let e = spec(&[&format!("{field}={value}")]).validate(1).unwrap_err();
                let (got, msg) = invalid_field(e);
                assert_eq!(got, field, "{msg}");
                assert!(
                    msg.contains(&format!("{shown} is not a number of seconds in (0, 604800]")),
                    "{msg}"
                );
            }
            spec(&[&format!("{field}=604800")]).validate(1).unwrap();
            spec(&[&format!("{field}=0.5")]).validate(1).unwrap();
        }
        let (field, msg) = invalid_field(spec(&["parallel.bucket_mb=inf"]).validate(1).unwrap_err());
        assert_eq!(field, "parallel.bucket_mb", "{msg}");
        let (field, msg) = invalid_field(spec(&["checkpoint.chunk_mb=inf"]).validate(1).unwrap_err());
        assert_eq!(field, "checkpoint.chunk_mb", "{msg}");
    }

    #[test]
    fn size_products_that_overflow_are_errors_naming_the_factors() {
        // 6148914691236517206 × 3 wraps to exactly 2: the world size it claims to match.
        let e = spec(&["parallel.dp=6148914691236517206", "parallel.pp=3"])
            .validate(2)
            .unwrap_err();
        let (field, msg) = invalid_field(e);
        assert_eq!(field, "parallel");
        assert!(msg.contains("dp 6148914691236517206 × tp 1 × pp 3 overflows"), "{msg}");
        let e = spec(&[
            "train.micro_batch=4611686018427387904",
            "parallel.dp=4",
            "parallel.tp=1",
        ])
        .validate(4)
        .unwrap_err();
        let (field, msg) = invalid_field(e);
        assert_eq!(field, "train.micro_batch", "{msg}");
        let e = spec(&["model.d_model=1000000000", "model.n_layers=12"])
            .validate(1)
            .unwrap_err();
        let (field, msg) = invalid_field(e);
        assert_eq!(field, "model", "{msg}");
        assert!(
            msg.contains("n_layers 12 × d_model 1000000000") && msg.contains("overflows"),
            "{msg}"
        );
        let e = spec(&["model.vocab_size=1000000000000", "model.d_model=10000000000"])
            .validate(1)
            .unwrap_err();
        let (field, msg) = invalid_field(e);
        assert_eq!(field, "model.vocab_size");
        assert!(
            msg.contains("vocab_size 1000000000000 × d_model 10000000000 is more than"),
            "{msg}"
        );
        let e = spec(&[
            "train.steps=1000000000000000",
            "train.global_batch=1048576",
            "train.micro_batch=4",
        ])
        .validate(1)
        .unwrap_err();
        let (field, msg) = invalid_field(e);
        assert_eq!(field, "train.steps");
        assert!(
            msg.contains("steps 1000000000000000 × global_batch 1048576 × seq_len 128"),
            "{msg}"
        );
    }

    #[test]
    fn huge_models_are_refused_naming_the_sizes_and_the_limit() {
        for (set, names) in [
            ("model.n_layers=1000000000000", "of the model's 198272"),
            ("model.seq_len=1000000000", "seq_len 1000000000"),
            ("model.vocab_size=1000000000000", "vocab_size 1000000000000"),
            ("train.global_batch=4000000000000", "prefetched tokens"),
        ] {
            let s = spec(&[set, "train.max_memory_gib=64"]);
            let e = s.validate(1).unwrap_err();
            let msg = e.to_string();
            let SpecError::TooLarge {
                needed_bytes,
                limit_bytes,
                ..
            } = e
            else {
                panic!("{set}: expected TooLarge, got {msg}");
            };
            assert!(needed_bytes > limit_bytes && limit_bytes == 64.0 * GIB, "{msg}");
            assert!(msg.contains(names) && msg.contains("parameters"), "{set}: {msg}");
            assert!(
                msg.contains("more than 64.0 GiB (`train.max_memory_gib` = 64)"),
                "{msg}"
            );
        }
        // Without an explicit limit, validate leaves memory to the binary, which passes this
        // machine's share.
        let s = spec(&["model.n_layers=1000000000000"]);
        s.validate(1).unwrap();
        let msg = s.check_memory(Some(8 << 30)).unwrap_err().to_string();
        assert!(
            msg.contains("more than 8.0 GiB (this machine's memory divided among its ranks"),
            "{msg}"
        );
        assert!(msg.contains("EiB of weights, gradients and AdamW moments"), "{msg}");
        // The defaults need a few MiB.
        let small = spec(&[]);
        small.check_memory(Some(1 << 30)).unwrap();
        assert!(small.memory_estimate().total_bytes() < 64.0 * 1024.0 * 1024.0);
        let e = spec(&["train.max_memory_gib=-1"]).validate(1).unwrap_err();
        assert_eq!(invalid_field(e).0, "train.max_memory_gib");
    }

    #[test]
    fn memory_estimate_counts_what_a_rank_holds() {
        let s = spec(&["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.zero1=true"]);
        let e = s.memory_estimate();
        assert_eq!(e.params, s.model.num_params());
        assert_eq!(e.params_per_rank, e.params as f64 / 4.0);
        // fp32 weights and gradients, the moments sharded over the 2 DP ranks.
        assert_eq!(e.state_bytes, e.params_per_rank * 12.0);
        assert_eq!((e.in_flight, e.layers_per_stage), (2, 2));
        let gpipe = spec(&[
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.dp=2",
            "parallel.schedule=\"gpipe\"",
        ]);
        assert_eq!(
            gpipe.memory_estimate().in_flight,
            2,
            "16 / (4 × dp 2) = 2 micro-batches"
        );
    }

    #[test]
    fn mem_total_is_read_from_meminfo_text() {
        let text = "MemTotal:       24522840 kB\nMemFree:        22000000 kB\n";
        assert_eq!(mem_total_bytes(text), Some(24522840 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 3 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: lots\n"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Mutated job files and arbitrary `--set` overrides (what `gantry submit` and the
        /// daemons accept from users) parse to a spec or an error; validation then either
        /// passes or names a field. Never a panic.
        #[test]
        fn mutated_specs_and_overrides_never_panic(
            cut in 0usize..400,
            insert in "\\PC{0,8}",
            key in proptest::sample::select(vec![
                "model.d_model", "model.n_heads", "model.n_layers", "model.seq_len", "model.vocab_size",
                "parallel.dp", "parallel.tp", "parallel.pp", "parallel.stage_layers", "train.steps",
                "train.global_batch", "train.micro_batch", "optim.lr", "checkpoint.every", "checkpoint.resume",
                "nonsense.key", "model", "",
            ]),
            value in proptest::prop_oneof![
                "-?[0-9]{1,12}", "[0-9]\\.[0-9]e-?[0-9]{1,3}", "\"\\PC{0,6}\"", "\\[[0-9, ]{0,8}\\]",
                proptest::strategy::Just("true".to_string()), proptest::strategy::Just("nan".to_string()),
                proptest::strategy::Just("inf".to_string()), "\\PC{0,6}",
            ],
            world in 0usize..9,
        ) {
            let base = "[model]\nd_model = 64\nn_layers = 2\nn_heads = 4\nseq_len = 32\nvocab_size = 512\n\
                        [parallel]\ndp = 2\n[train]\nsteps = 8\nglobal_batch = 16\nmicro_batch = 2\n";
            let mut text: String = base.chars().take(cut).collect();
            text.push_str(&insert);
            text.extend(base.chars().skip(cut));
            for (t, o) in [(text.as_str(), vec![]), (base, vec![format!("{key}={value}")])] {
                if let Ok(spec) = JobSpec::parse(t, "fuzz.toml", &o) {
                    let _ = spec.validate(world);
                }
            }
        }
    }
}
