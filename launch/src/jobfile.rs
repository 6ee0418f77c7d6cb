//! `gantry submit JOB.toml`: turn a job file into a [`JobRequest`].
//!
//! A job file is either a training spec (the same file `gantry launch` runs; its `[parallel]`
//! section gives the layout) or a command job:
//!
//! ```toml
//! name = "ddp-smoke"
//! command = ["python", "train.py", "--epochs", "1"]
//! workdir = "/srv/project"   # default: the rank's run directory on the worker
//! nproc = 4                  # or [parallel] dp / tp / pp
//! env = { NCCL_DEBUG = "WARN" }
//! ```
//!
//! Both may carry a `[cluster]` section: `max_restarts`, `elastic`, `min_dp`, `priority`,
//! `queue`, `labels`, `gpus_per_rank`, `env_pass` (secret-looking variables of the worker's
//! environment the ranks may inherit; sent as `GANTRY_ENV_PASS` in the job's `env`, and a
//! training spec's `registry.token_env` is added to it). Unknown keys anywhere are errors
//! that name the key.

use anyhow::{Context, bail};
use gantry_coordinator::proto as p;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(default)]
    pub max_restarts: u32,
    #[serde(default)]
    pub elastic: bool,
    #[serde(default)]
    pub min_dp: u32,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "yes")]
    pub queue: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gpus_per_rank: u32,
    /// Variables of the worker's environment the ranks need although they look secret
    /// (`AWS_ACCESS_KEY_ID`, …); every other secret is removed (`gantry_worker::scrub`).
    #[serde(default)]
    pub env_pass: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            max_restarts: 0,
            elastic: false,
            min_dp: 0,
            priority: 0,
            queue: true,
            labels: BTreeMap::new(),
            gpus_per_rank: 0,
            env_pass: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layout {
    #[serde(default = "one")]
    dp: u32,
    #[serde(default = "one")]
    tp: u32,
    #[serde(default = "one")]
    pp: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandJob {
    #[serde(default)]
    name: String,
    command: Vec<String>,
    #[serde(default)]
    workdir: String,
    nproc: Option<u32>,
    parallel: Option<Layout>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cluster: ClusterSection,
}

/// Flags of `gantry submit` that override the file's `[cluster]` section.
#[derive(Default)]
pub struct SubmitOverrides {
    pub spec_overrides: Vec<String>,
    /// `--data-cache-gb`: `data.cache_gb` of a training spec.
    pub data_cache_gb: Option<f64>,
    pub max_restarts: Option<u32>,
    pub elastic: bool,
    pub priority: Option<i32>,
    pub no_queue: bool,
    pub name: Option<String>,
}

pub fn load(path: &Path, o: &SubmitOverrides) -> anyhow::Result<p::JobRequest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job file {}", path.display()))?;
    let origin = path.display().to_string();
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: {e}"))?;
    let stem = path
        .file_stem()
        .map_or("job".into(), |s| s.to_string_lossy().into_owned());
    let mut req = if table.contains_key("command") {
        if !o.spec_overrides.is_empty() || o.data_cache_gb.is_some() {
            bail!("{origin}: --set and --data-cache-gb apply to training specs, not command jobs");
        }
        let job: CommandJob = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        command_request(job, &origin, &stem)?
    } else {
        let cluster: ClusterSection = match table.remove("cluster") {
            Some(v) => v
                .try_into()
                .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: [cluster]: {e}"))?,
            None => ClusterSection::default(),
        };
        train_request(&toml::to_string(&table)?, path, o, cluster)?
    };
    if let Some(n) = o.max_restarts {
        req.max_restarts = n;
    }
    if o.elastic {
        req.elastic = true;
    }
    if let Some(pr) = o.priority {
        req.priority = pr;
    }
    if o.no_queue {
        req.queue = false;
    }
    if let Some(name) = &o.name {
        req.name = name.clone();
    }
    Ok(req)
}

/// Adds `names` to the job's `GANTRY_ENV_PASS` (the list the worker reads), keeping any
/// names the job's `env` already gives there. Each must be a plain variable name.
fn add_env_pass(env: &mut HashMap<String, String>, names: &[String], origin: &str) -> anyhow::Result<()> {
    let key = gantry_worker::scrub::ENV_PASS;
    let mut all: Vec<String> = env
        .get(key)
        .map(|l| {
            gantry_worker::scrub::parse_pass(l)
                .into_iter()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for n in names {
        if n.is_empty() || n.contains(|c: char| c == '=' || c == ',' || c == '\0' || c.is_whitespace()) {
            bail!("{origin}: [cluster] env_pass: `{n}` is not an environment variable name");
        }
        if !all.contains(n) {
            all.push(n.clone());
        }
    }
    if !all.is_empty() {
        env.insert(key.to_string(), all.join(","));
    }
    Ok(())
}

fn base(
    name: String,
    program: p::job_program::Kind,
    (dp, tp, pp): (u32, u32, u32),
    c: ClusterSection,
) -> p::JobRequest {
    p::JobRequest {
        name,
        program: Some(p::JobProgram { kind: Some(program) }),
        dp,
        tp,
        pp,
        gpus_per_rank: c.gpus_per_rank,
        max_restarts: c.max_restarts,
        elastic: c.elastic,
        min_dp: c.min_dp,
        priority: c.priority,
        queue: c.queue,
        labels: c.labels.into_iter().collect(),
        env: HashMap::new(),
    }
}

fn command_request(job: CommandJob, origin: &str, stem: &str) -> anyhow::Result<p::JobRequest> {
    if job.command.is_empty() || job.command[0].is_empty() {
        bail!(
            "{origin}: `command` is empty: give the program and its arguments, e.g. command = [\"python\", \"train.py\"]"
        );
    }
    let layout = match (job.nproc, &job.parallel) {
        (Some(_), Some(_)) => bail!("{origin}: give either `nproc` or a [parallel] section, not both"),
        (Some(0), None) => bail!("{origin}: `nproc` must be at least 1"),
        (Some(n), None) => (n, 1, 1),
        (None, Some(l)) => (l.dp, l.tp, l.pp),
        (None, None) => (1, 1, 1),
    };
    let workdir = if job.workdir.is_empty() {
        String::new()
    } else {
        std::path::absolute(&job.workdir).map_or(job.workdir.clone(), |p| p.display().to_string())
    };
    let name = if job.name.is_empty() {
        stem.to_string()
    } else {
        job.name
    };
    let program = p::job_program::Kind::Command(p::CommandProgram {
        argv: job.command,
        workdir,
    });
    let pass = job.cluster.env_pass.clone();
    let mut req = base(name, program, layout, job.cluster);
    req.env = job.env.into_iter().collect();
    add_env_pass(&mut req.env, &pass, origin)?;
    Ok(req)
}

fn train_request(
    text: &str,
    path: &Path,
    o: &SubmitOverrides,
    cluster: ClusterSection,
) -> anyhow::Result<p::JobRequest> {
    let origin = path.display().to_string();
    let mut overrides = o.spec_overrides.clone();
    if let Some(gb) = o.data_cache_gb {
        overrides.push(format!("data.cache_gb={gb:?}"));
    }
    let spec = gantry_train::JobSpec::parse(text, &origin, &overrides)?;
    let (dp, tp, pp) = (spec.parallel.dp, spec.parallel.tp, spec.parallel.pp);
    // Resolve exactly as `gantry launch` does (it skips the [cluster] section too): dataset
    // vocabulary, name from the file, data and checkpoint paths made absolute against
    // where the user runs submit, validation of the layout.
    // Saturating: a product that overflows is refused by validation, naming the factors.
    let spec = crate::job_spec::resolve_spec(path, &overrides, dp.saturating_mul(tp).saturating_mul(pp))
        .with_context(|| format!("job file {origin}"))?;
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).with_context(|| format!("{origin}: parallel.{what} = {v} is too large"))
    };
    let mut pass = cluster.env_pass.clone();
    // A spec that registers its checkpoints names the variable holding its registry token.
    if spec.registry.enabled() && !spec.registry.token_env.is_empty() {
        pass.push(spec.registry.token_env.clone());
    }
    let mut req = base(
        spec.name.clone(),
        p::job_program::Kind::TrainSpecToml(spec.to_toml()),
        (to_u32(dp, "dp")?, to_u32(tp, "tp")?, to_u32(pp, "pp")?),
        cluster,
    );
    add_env_pass(&mut req.env, &pass, &origin)?;
    // The spec's wait policy travels as the variable libgomp reads at start; an
    // `OMP_WAIT_POLICY` the job's own env sets stays.
    if let Some(policy) = spec.train.omp_wait.variable() {
        req.env
            .entry("OMP_WAIT_POLICY".to_string())
            .or_insert_with(|| policy.to_string());
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pass_merges_into_the_jobs_env() {
        let mut env = HashMap::new();
        add_env_pass(&mut env, &[], "job.toml").unwrap();
        assert!(env.is_empty(), "nothing asked, nothing added");
        env.insert("GANTRY_ENV_PASS".to_string(), "HF_TOKEN".to_string());
        let names = ["AWS_ACCESS_KEY_ID".to_string(), "HF_TOKEN".to_string()];
        add_env_pass(&mut env, &names, "job.toml").unwrap();
        assert_eq!(env["GANTRY_ENV_PASS"], "HF_TOKEN,AWS_ACCESS_KEY_ID");
        for bad in ["", "A=B", "A,B", "A B"] {
            let e = add_env_pass(&mut env, &[bad.to_string()], "job.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("env_pass") && e.contains("job.toml"), "{e}");
        }
    }

    #[test]
    fn data_cache_gb_becomes_the_specs_data_cache_gb() {
        let dir = std::env::temp_dir().join(format!("gantry-jobfile-cache-gb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = gantry_sharding::synth::SynthConfig {
            tokens: 5000,
            ..Default::default()
        };
        gantry_sharding::synth::synthesize(&dir.join("data"), &cfg).unwrap();
        let job = dir.join("job.toml");
        std::fs::write(&job, format!("[data]\npath = \"{}\"\n", dir.join("data").display())).unwrap();
        let o = SubmitOverrides {
            data_cache_gb: Some(0.5),
            ..SubmitOverrides::default()
        };
        let req = load(&job, &o).unwrap();
        let Some(p::job_program::Kind::TrainSpecToml(toml)) = req.program.and_then(|p| p.kind) else {
            panic!("a training spec");
        };
        assert!(toml.contains("cache_gb = 0.5"), "{toml}");
        let command = dir.join("cmd.toml");
        std::fs::write(&command, "command = [\"true\"]\n").unwrap();
        let e = load(&command, &o).unwrap_err().to_string();
        assert!(e.contains("--data-cache-gb apply to training specs"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
