//! The job spec: one TOML file describes the model, the parallel layout, the data, the
//! optimizer and the run. Unknown keys are errors (a typo must not silently train the wrong
//! model); `--set section.key=value` overrides apply before validation.
//!
//! # Layout
//! - `mod.rs`: [`JobSpec`], parsing and overrides, and [`JobSpec::validate`]: each section's
//!   own rules, then the rules that tie sections together (TP must divide the heads, the
//!   batch must divide over DP, a registry needs checkpoints, ...).
//! - `model.rs`, `parallel.rs`, `run.rs` (`[data]`, `[optim]`, `[train]`), `outputs.rs`
//!   (`[checkpoint]`, `[registry]`): one struct per section, each with a `validate` that
//!   checks what that section alone decides. The parallel degrees are checked by
//!   [`gantry_collectives::ParallelLayout::new`], so the spec refuses a layout with the same
//!   words a rank would.
//! - `memory.rs`: the estimate of one rank's memory ([`JobSpec::memory_estimate`],
//!   [`JobSpec::check_memory`]), checked before anything is built.
//!
//! Every error names the field and the numbers. Every product of sizes is checked (a product
//! that overflows is an error naming its factors) and every duration is finite and bounded.

mod memory;
mod model;
mod outputs;
mod parallel;
mod run;

use memory::human_bytes;
pub use memory::{MemoryEstimate, mem_total_bytes};
pub use model::{Arch, ModelSpec};
pub use outputs::{CheckpointSpec, RegistrySpec};
pub use parallel::{ParallelSpec, Schedule};
pub use run::{DataSpec, DeviceSpec, OptimSpec, TrainSpec};
use serde::{Deserialize, Serialize};

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

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        message: message.into(),
    }
}

/// The field an `Invalid` error names (the sections' tests check which rule refused).
#[cfg(test)]
pub(crate) fn invalid_field(e: SpecError) -> &'static str {
    match e {
        SpecError::Invalid { field, .. } => field,
        other => panic!("expected SpecError::Invalid, got {other:?}"),
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
    ///
    /// The layout goes first: the rules across sections divide by its degrees.
    pub fn validate(&self, world: usize) -> Result<(), SpecError> {
        self.parallel.validate(world)?;
        self.model.validate()?;
        self.train.validate()?;
        self.optim.validate()?;
        self.data.validate()?;
        self.checkpoint.validate()?;
        self.registry.validate()?;
        self.check_stages()?;
        self.check_tensor_split()?;
        self.check_batches()?;
        if self.registry.enabled() && !self.checkpoint.enabled() {
            return Err(invalid(
                "registry.url",
                "registers checkpoints, so it needs checkpoint.dir",
            ));
        }
        self.check_memory(None)
    }

    /// Every pipeline stage needs a layer, and explicit stage sizes must cover the model.
    fn check_stages(&self) -> Result<(), SpecError> {
        let (m, p) = (&self.model, &self.parallel);
        if p.pp > m.n_layers {
            return Err(invalid(
                "parallel.pp",
                format!(
                    "pp {} is more than n_layers {} (every stage needs a layer)",
                    p.pp, m.n_layers
                ),
            ));
        }
        if p.stage_layers.is_empty() {
            return Ok(());
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
        Ok(())
    }

    /// TP splits the heads, the MLP and the vocabulary evenly; a micro-batch's tensors on one
    /// TP rank stay within libtorch's `i64` element counts.
    fn check_tensor_split(&self) -> Result<(), SpecError> {
        let (m, p) = (&self.model, &self.parallel);
        for (what, size) in [
            ("n_heads", m.n_heads),
            ("ffn_hidden", m.ffn()),
            ("vocab_size", m.vocab_size),
        ] {
            if !size.is_multiple_of(p.tp) {
                return Err(invalid(
                    "parallel.tp",
                    format!("{what} {size} is not divisible by tp {}", p.tp),
                ));
            }
        }
        let (b, s, d) = (self.train.micro_batch as u64, m.seq_len as u64, m.d_model as u64);
        let vt = (m.vocab_size / p.tp) as u64;
        #[rustfmt::skip]
        let tensors: [(&str, Factors); 2] = [
            ("a micro-batch's activations", &[("micro_batch", b), ("seq_len", s), ("d_model", d)]),
            ("a micro-batch's logits", &[("micro_batch", b), ("seq_len", s), ("vocab_size / tp", vt)]),
        ];
        for (what, factors) in tensors {
            checked_product("train.micro_batch", what, factors, MAX_NUMEL)?;
        }
        Ok(())
    }

    /// The global batch divides into micro-batches over DP, and the run's token counters fit.
    fn check_batches(&self) -> Result<(), SpecError> {
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
        Ok(())
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
    use memory::GIB;
    use std::path::PathBuf;

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
    fn the_openmp_wait_policy_is_a_word_of_three() {
        use gantry_collectives::OmpWait;
        assert_eq!(spec(&[]).train.omp_wait, OmpWait::Auto);
        let s = spec(&["train.omp_wait=\"passive\""]);
        assert_eq!(s.train.omp_wait.variable(), Some("PASSIVE"));
        let back = JobSpec::parse(&s.to_toml(), "spec.toml", &[]).unwrap();
        assert_eq!(back.train.omp_wait, OmpWait::Passive, "the resolved spec keeps it");
        let err = JobSpec::parse("[train]\nomp_wait = \"sometimes\"\n", "job.toml", &[]).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
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
        assert_eq!(
            s.data.path,
            gantry_checkpoint::location::StorageLocation::Local(PathBuf::from("/tmp/x"))
        );
        assert_eq!(s.data.dir().unwrap(), std::path::Path::new("/tmp/x"));
        assert_eq!(s.name, "a b");
    }

    #[test]
    fn the_data_path_is_a_dataset_location() {
        let s = spec(&["data.path=s3://bkt/corpora/c1/"]);
        assert_eq!(s.data.path.to_string(), "s3://bkt/corpora/c1");
        let e = s.data.dir().unwrap_err().to_string();
        assert!(
            e.contains("`data.path`") && e.contains("s3://bkt/corpora/c1 is not on this host"),
            "{e}"
        );
        let back = JobSpec::parse(&s.to_toml(), "spec.toml", &[]).unwrap();
        assert_eq!(back.data.path, s.data.path, "the resolved spec keeps the location");
        for text in ["[data]\npath = \"ftp://x\"\n", ""] {
            let o: Vec<String> = if text.is_empty() {
                vec!["data.path=ftp://x".into()]
            } else {
                vec![]
            };
            let e = JobSpec::parse(text, "job.toml", &o).unwrap_err().to_string();
            assert!(
                e.contains("bad dataset location \"ftp://x\"") && e.contains("\"ftp://\""),
                "{e}"
            );
        }
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
