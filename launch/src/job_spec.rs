//! A job spec as a rank will run it: read the TOML (a `gantry submit` job file's `[cluster]`
//! section dropped), apply `--set` overrides, fill in what comes from the dataset and the host
//! (vocabulary size, threads per rank, absolute paths) and validate. `gantry launch`, `gantry
//! submit` and Slurm tasks all resolve through here, so a spec means the same everywhere.

use anyhow::Context;
use gantry_train::JobSpec;
use std::path::Path;

/// Read, override, resolve (vocabulary from the dataset, threads per rank) and validate for a
/// world of `world` ranks, all on this host.
pub fn resolve_spec(path: &Path, overrides: &[String], world: usize) -> anyhow::Result<JobSpec> {
    resolve_spec_for(path, overrides, world, world)
}

/// [`resolve_spec`] for a world of `world` ranks of which `here` share this host's cores.
pub fn resolve_spec_for(path: &Path, overrides: &[String], world: usize, here: usize) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job spec {}", path.display()))?;
    // A job file for `gantry submit` may carry a [cluster] section; it means nothing here.
    let text = without_cluster_section(&text, &path.display().to_string())?;
    let mut spec = JobSpec::parse(&text, &path.display().to_string(), overrides)?;
    // Only the manifest: an s3:// dataset is read from S3 here (`gantry submit` checks a spec
    // without fetching its data), fetched by the hosts that train on it.
    let manifest = crate::dataset_location::read_manifest_at(&spec.data.path).with_context(|| {
        format!(
            "data.path = {}: not a gantry dataset (make one with `gantry data synth` or `gantry data prepare`, \
             or copy one there with `gantry data upload`)",
            spec.data.path
        )
    })?;
    if spec.model.vocab_size == 0 {
        let m = spec.model.vocab_multiple.max(1);
        spec.model.vocab_size = (manifest.vocab_size as usize).div_ceil(m) * m;
    } else {
        let shown = std::path::PathBuf::from(spec.data.path.to_string());
        gantry_sharding::vocab::check_declared(&manifest, &shown, spec.model.vocab_size as u64)
            .context("job spec: `model.vocab_size`")?;
    }
    if spec.train.threads == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        spec.train.threads = (cores / here.max(1)).max(1);
    }
    if spec.name.is_empty() {
        spec.name = path
            .file_stem()
            .map_or("job".into(), |s| s.to_string_lossy().into_owned());
    }
    spec.data.path = spec.data.path.absolute();
    // Ranks may run elsewhere: a relative checkpoint directory means this one's.
    if !spec.checkpoint.dir.is_empty() {
        let location =
            gantry_checkpoint::StorageLocation::parse(&spec.checkpoint.dir).context("job spec: `checkpoint.dir`")?;
        spec.checkpoint.dir = location.absolute().to_string();
    }
    spec.validate(world)?;
    Ok(spec)
}

/// The job file without its `[cluster]` section (the scheduler's part), for the trainer.
pub fn without_cluster_section(text: &str, origin: &str) -> anyhow::Result<String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: {e}"))?;
    if table.remove("cluster").is_none() {
        return Ok(text.to_string());
    }
    Ok(toml::to_string(&table)?)
}

/// This host's memory (`MemTotal` of /proc/meminfo) divided among its `ranks` ranks: the
/// default memory limit of each (`train.max_memory_gib = 0`); `None` where it cannot be read.
pub fn machine_share(ranks: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(gantry_train::spec::mem_total_bytes(&text)? / ranks.max(1) as u64)
}
