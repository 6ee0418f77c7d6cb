//! Where the binary finds a dataset: a location (a directory, `file://…` or `s3://…`) parsed
//! once and resolved to a directory on this host. An `s3://` dataset is fetched into the host's
//! data cache ([`dataset_on_host`]: `gantry eval`, `data inspect|bench`), or streamed there by
//! the ranks while they train ([`with_local_dataset`]: only the manifest and the `.idx` files
//! before the first step, the shards in the order the sampler reads them, within
//! `data.cache_gb`), with S3 settings from flags or `AWS_*`; one written to `s3://` is built in
//! a staging directory there, then uploaded manifest last ([`staging_for`], [`upload_to`]).

use crate::checkpoint_cmd::S3Args;
use anyhow::{Context, Result, bail};
use gantry_checkpoint::S3Options;
use gantry_checkpoint::location::{Role, StorageLocation};
use gantry_sharding::manifest::Manifest;
use gantry_sharding::materialize::{CACHE_ENV, default_cache_root};
use gantry_sharding::remote::{self, Fetched, RemoteOptions, StreamSetup, Uploaded};
use gantry_train::JobSpec;
use gantry_train::run_context::RunContext;
use std::path::{Path, PathBuf};

/// A dataset location from the command line: a directory, `file://…` or `s3://bucket/prefix`;
/// another scheme is refused naming it.
pub fn parse_dataset_location(text: &str) -> Result<StorageLocation, String> {
    StorageLocation::parse_as(text, Role::Dataset).map_err(|e| e.to_string())
}

/// The host's data cache root: `$GANTRY_DATA_CACHE` when set and not empty, else the default
/// root in the system temporary directory. Read here, in the binary, and passed to the
/// libraries as a plain path (ranks get it through `RunContext`).
pub fn data_cache_root() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(default_cache_root, PathBuf::from)
}

/// S3 settings from this process's `AWS_*` variables (no flags): what `gantry launch`,
/// `submit` and the ranks use, as for checkpoints.
pub fn env_s3() -> S3Options {
    S3Options::with_environment(std::env::vars_os())
}

/// The directory this host reads the dataset at `location` from: a local one as it is; an
/// `s3://` one fetched into `cache_root` (the host's data cache: every byte checked against
/// the manifest, each file fetched once per host, reused while it checks out). `quiet`: no
/// report line on stderr.
pub fn dataset_dir(location: &StorageLocation, s3: &S3Options, cache_root: &Path, quiet: bool) -> Result<PathBuf> {
    let StorageLocation::Local(dir) = location else {
        let fetched = remote::fetch(location, cache_root, &RemoteOptions::with_s3(s3.clone()))
            .with_context(|| format!("dataset {location}"))?;
        if !quiet {
            eprintln!("gantry: {}", fetch_summary(&fetched));
        }
        return Ok(fetched.dir);
    };
    Ok(dir.clone())
}

/// [`dataset_dir`] with this process's `AWS_*` settings and data cache root (`gantry launch`,
/// a Slurm task, `gantry eval`).
pub fn dataset_on_host(location: &StorageLocation, quiet: bool) -> Result<PathBuf> {
    dataset_dir(location, &env_s3(), &data_cache_root(), quiet)
}

/// The spec with `data.local` set where its dataset is read on this host. A rank's `s3://`
/// dataset is streamed into the data cache its context names: the manifest and the `.idx`
/// files are fetched now (once per host: the other ranks wait for them and reuse them), and
/// `data.stream` tells the trainer how to stream the shards (the `ranks_on_host` ranks of
/// this host share `data.cache_gb`).
pub fn with_local_dataset(spec: &JobSpec, context: &RunContext, ranks_on_host: usize) -> Result<JobSpec> {
    let mut spec = spec.clone();
    if !spec.data.path.is_local() {
        let root = context.data_cache.clone().unwrap_or_else(default_cache_root);
        let options = RemoteOptions::with_s3(context.s3.clone());
        let dir = remote::prepare_stream(&spec.data.path, &root, &options)
            .with_context(|| format!("data.path = {}", spec.data.path))?;
        tracing::info!(
            dataset = %spec.data.path,
            dir = %dir.dir.display(),
            index_files_fetched = dir.fetched.len(),
            seconds = dir.seconds,
            "dataset streamed into the host's data cache (manifest and .idx files in place)"
        );
        spec.data.local = Some(dir.dir.clone());
        spec.data.stream = Some(StreamSetup {
            dir,
            options,
            sharers: ranks_on_host.max(1),
        });
    }
    Ok(spec)
}

/// Before the ranks of a job start: an `s3://` dataset's manifest is there (one GET, nothing
/// else fetched: the ranks stream the shards), its declared vocabulary fits the model and no
/// shard records a token id outside it. A shard with no recorded largest id is checked by the
/// ranks on its first read. `quiet`: no report line.
pub fn check_remote_dataset(spec: &JobSpec, quiet: bool) -> Result<()> {
    let location = &spec.data.path;
    let remote = remote::read_manifest(location, &RemoteOptions::with_s3(env_s3()))
        .with_context(|| format!("data.path = {location}"))?;
    let m = &remote.manifest;
    let vocab = spec.model.vocab_size as u64;
    gantry_sharding::vocab::check_declared(m, Path::new(&location.to_string()), vocab)?;
    for s in &m.shards {
        if let Some(max) = s.max_token_id
            && !gantry_sharding::vocab::fits(max, vocab)
        {
            bail!(
                "{}: holds token id {max} (the manifest's largest id of the shard), but the model's vocabulary is {vocab} tokens (ids below {vocab}): written with another tokenizer?",
                location.child(&format!("{}.bin", s.prefix))
            );
        }
    }
    if !quiet {
        let bytes: u64 = m.shards.iter().map(|s| s.bin_bytes + s.idx_bytes).sum();
        let budget = match spec.data.cache_budget() {
            Some(b) => format!("within a cache budget of {:.3} GB per host", b as f64 / 1e9),
            None => "no cache budget: all of it is kept".to_string(),
        };
        eprintln!(
            "gantry: dataset {location} ({} shards, {:.1} MB) streamed by the ranks into the data cache {} as they read it ({budget})",
            m.shards.len(),
            bytes as f64 / 1e6,
            data_cache_root().display(),
        );
    }
    Ok(())
}

/// The manifest of the dataset at `location` (read from S3 for `s3://`, nothing else fetched),
/// with this process's `AWS_*` settings.
pub fn read_manifest_at(location: &StorageLocation) -> Result<Manifest> {
    Ok(remote::read_manifest(location, &RemoteOptions::with_s3(env_s3()))?.manifest)
}

/// One line saying what a fetch did.
pub fn fetch_summary(f: &Fetched) -> String {
    if f.reused {
        return format!(
            "dataset {} in the data cache at {} (checked on this host before; nothing fetched)",
            f.location,
            f.dir.display()
        );
    }
    if f.fetched.is_empty() && f.refetched.is_empty() {
        return format!(
            "dataset {} in the data cache at {}: its {} cached file(s) checked against the manifest, nothing fetched",
            f.location,
            f.dir.display(),
            f.kept
        );
    }
    format!(
        "dataset {} fetched into {}: {} file(s), {:.1} MB in {:.2} s, {} already cached{}",
        f.location,
        f.dir.display(),
        f.fetched.len(),
        f.bytes_fetched as f64 / 1e6,
        f.seconds,
        f.kept,
        if f.refetched.is_empty() {
            String::new()
        } else {
            format!("; fetched again (cached copy damaged): {}", f.refetched.join(", "))
        }
    )
}

/// A temporary directory for a dataset on its way to S3, removed when dropped.
pub struct Staging(PathBuf);

impl Staging {
    fn new() -> Result<Staging> {
        let root = data_cache_root();
        sweep_stale_staging(&root);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = root.join(format!("staging-{}-{secs}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Staging(dir))
    }

    /// Where the dataset is built (must not exist yet).
    pub fn dataset(&self) -> PathBuf {
        self.0.join("dataset")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Remove the staging directories under `root` whose process is gone (a `synth` or `prepare
/// --output s3://` that was killed before it could clean up). A directory whose pid names a
/// live process is left alone, even if that pid was reused: it is only disk.
fn sweep_stale_staging(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("staging-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists; no signal is sent.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => tracing::info!(dir = %path.display(), "removed the staging directory of a killed upload"),
                Err(e) => tracing::debug!(dir = %path.display(), error = %e, "cannot remove a stale staging directory"),
            }
        }
    }
}

/// The staging directory for a dataset written to `output`: `None` for a local output; for
/// an `s3://` one, a fresh directory, once `output` is known to be usable and free (no
/// manifest there yet), so a wrong bucket, credentials or an occupied prefix fail before
/// any work is done.
pub fn staging_for(output: &StorageLocation, s3: &S3Args) -> Result<Option<Staging>> {
    if output.is_local() {
        return Ok(None);
    }
    match remote::read_manifest(output, &RemoteOptions::with_s3(s3.options())) {
        Ok(_) => bail!(
            "{output} already holds a dataset (its manifest.json is there): write to another prefix, or delete that one first"
        ),
        Err(remote::RemoteError::NoManifest { .. }) => Ok(Some(Staging::new()?)),
        Err(e) => Err(e).with_context(|| format!("--output {output}")),
    }
}

/// Upload the finished dataset in `dir` to the S3 `location`.
pub fn upload_to(dir: &Path, location: &StorageLocation, s3: &S3Args, files: usize) -> Result<Uploaded> {
    let opts = RemoteOptions {
        upload_files: files.max(1),
        ..RemoteOptions::with_s3(s3.options())
    };
    remote::upload(dir, location, &opts).with_context(|| format!("uploading {} to {location}", dir.display()))
}

pub fn upload_summary(u: &Uploaded) -> String {
    if u.already_complete {
        return format!(
            "{} already holds this dataset (same manifest): nothing uploaded",
            u.location
        );
    }
    format!(
        "uploaded {} of {} file(s), {:.1} MB, to {} in {:.2} s{} (manifest.json last)",
        u.uploaded.len(),
        u.files,
        u.bytes_uploaded as f64 / 1e6,
        u.location,
        u.seconds,
        if u.skipped.is_empty() {
            String::new()
        } else {
            format!("; {} already there from an interrupted upload", u.skipped.len())
        }
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn staging_of_a_killed_upload_is_swept_and_a_live_one_kept() {
        let root = std::env::temp_dir().join(format!("gantry-staging-sweep-{}", std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = root.join(format!("staging-{dead}-1"));
        let live = root.join(format!("staging-{}-2", std::process::id()));
        let dataset = root.join("0123456789abcdef");
        for d in [&stale.join("dataset"), &live, &dataset] {
            std::fs::create_dir_all(d).unwrap();
        }
        super::sweep_stale_staging(&root);
        assert!(!stale.exists(), "the dead process's staging directory is removed");
        assert!(live.exists() && dataset.exists(), "a live one and cached datasets stay");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
