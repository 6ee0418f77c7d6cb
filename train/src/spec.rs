//! The job spec: one TOML file describes the model, the parallel layout, the data, the
//! optimizer and the run. Unknown keys are errors (a typo must not silently train the wrong
//! model); `--set section.key=value` overrides apply before validation; `validate` checks
//! every divisibility the layout needs and names the field and the numbers when one fails.

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
}

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
    pub fn ffn(&self) -> usize {
        match (self.ffn_hidden, self.arch) {
            (0, Arch::Gpt2) => 4 * self.d_model,
            (0, Arch::Llama) => (8 * self.d_model / 3).div_ceil(64) * 64,
            (n, _) => n,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Parameter count of the global model (tied embeddings counted once).
    pub fn num_params(&self) -> u64 {
        let (d, v, f, l) = (
            self.d_model as u64,
            self.vocab_size as u64,
            self.ffn() as u64,
            self.n_layers as u64,
        );
        let per_layer = match self.arch {
            Arch::Gpt2 => 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d,
            Arch::Llama => 4 * d * d + 3 * d * f + 2 * d,
        };
        let embed = v * d
            + match self.arch {
                Arch::Gpt2 => self.seq_len as u64 * d,
                Arch::Llama => 0,
            };
        let final_norm = match self.arch {
            Arch::Gpt2 => 2 * d,
            Arch::Llama => d,
        };
        let head = if self.tie_embeddings { 0 } else { v * d };
        embed + l * per_layer + final_norm + head
    }

    /// Training FLOPs per token as in the MFU formula: 6·N + 12·L·d·T (N without the
    /// position embedding).
    pub fn flops_per_token(&self) -> f64 {
        let pos = match self.arch {
            Arch::Gpt2 => (self.seq_len * self.d_model) as f64,
            Arch::Llama => 0.0,
        };
        6.0 * (self.num_params() as f64 - pos) + 12.0 * (self.n_layers * self.d_model * self.seq_len) as f64
    }
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
        self.train.global_batch / (self.train.micro_batch * self.parallel.dp).max(1)
    }

    /// Check the spec against a world of `world` ranks. Needs `model.vocab_size` resolved.
    pub fn validate(&self, world: usize) -> Result<(), SpecError> {
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
        let layout = p.dp * p.tp * p.pp;
        if layout != world {
            return Err(invalid(
                "parallel",
                format!(
                    "dp {} × tp {} × pp {} = {layout} ranks, but the world has {world}",
                    p.dp, p.tp, p.pp
                ),
            ));
        }
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
            let sum: usize = p.stage_layers.iter().sum();
            if sum != m.n_layers || p.stage_layers.contains(&0) {
                return Err(invalid(
                    "parallel.stage_layers",
                    format!(
                        "{:?} must be positive and sum to n_layers {} (sums to {sum})",
                        p.stage_layers, m.n_layers
                    ),
                ));
            }
        }
        let per_step = t.micro_batch * p.dp;
        if !t.global_batch.is_multiple_of(per_step) {
            return Err(invalid(
                "train.global_batch",
                format!(
                    "global_batch {} is not divisible by micro_batch {} × dp {} = {per_step}",
                    t.global_batch, t.micro_batch, p.dp
                ),
            ));
        }
        if p.bucket_mb.is_nan() || p.bucket_mb <= 0.0 {
            return Err(invalid("parallel.bucket_mb", "must be positive"));
        }
        if p.timeout_s.is_nan() || p.timeout_s <= 0.0 {
            return Err(invalid("parallel.timeout_s", "must be positive"));
        }
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
        if c.chunk_mb.is_nan() || c.chunk_mb <= 0.0 || c.commit_timeout_s.is_nan() || c.commit_timeout_s <= 0.0 {
            return Err(invalid("checkpoint", "chunk_mb and commit_timeout_s must be positive"));
        }
        let r = &self.registry;
        if r.enabled() {
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
        }
        if t.stop_after > t.steps {
            return Err(invalid(
                "train.stop_after",
                format!("{} is past train.steps {}", t.stop_after, t.steps),
            ));
        }
        if !(0.0..1.0).contains(&self.data.valid_fraction) {
            return Err(invalid(
                "data.valid_fraction",
                format!("{} is not in [0, 1)", self.data.valid_fraction),
            ));
        }
        Ok(())
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
