//! One rank process: `gantry rank` (started by `gantry launch --local`, or by a worker daemon,
//! placed by torchrun-style variables) and a Slurm task of `gantry launch` (placed by Slurm's).
//! What the rank is told beyond the spec (fabric settings, job id, AdamW implementation…) is
//! read from the environment here, once, and passed to the trainer as plain values.

use crate::autoregister::AutoRegister;
use crate::job_spec::{machine_share, resolve_spec_for};
use crate::launch_cmd::{LaunchArgs, check_dataset, print_summary, spec_overrides};
use crate::slurm::SlurmEnv;
use crate::torchrun;
use anyhow::Context;
use clap::Args;
use gantry_collectives::fabric::Bootstrap;
use gantry_collectives::{Fabric, FabricConfig, ParallelLayout, WaitPolicy};
use gantry_sharding::manifest::Manifest;
use gantry_train::metrics::RunSummary;
use gantry_train::place::{GpuView, LocalRank};
use gantry_train::spec::DeviceSpec;
use gantry_train::{JobSpec, trainer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RankArgs {
    /// The resolved job spec the launcher wrote into the run directory.
    #[arg(long)]
    pub spec: PathBuf,
    /// Where the reporting rank writes metrics.jsonl and summary.json.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Override a spec value, e.g. `--set parallel.dp=4` (repeatable; as `gantry launch`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// When the spec has `checkpoint.dir` and no `checkpoint.resume`: resume from the newest
    /// committed checkpoint there if one exists, else start from step 0.
    #[arg(long)]
    pub resume_auto: bool,
}

/// `gantry launch JOB.toml` as task SLURM_PROCID of a Slurm job step: resolve the spec for
/// the whole step, then train as that rank in this process (rank 0 serves the store at
/// MASTER_ADDR:MASTER_PORT). The reporting rank prints the summary.
pub(crate) fn slurm_rank(args: &LaunchArgs, spec_path: &Path, slurm: &SlurmEnv) -> anyhow::Result<ExitCode> {
    let spec = resolve_spec_for(spec_path, &spec_overrides(args), slurm.world, slurm.local_world)?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-slurm-{}", spec.name, slurm.job_id)));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let p = &spec.parallel;
    let auth = torchrun::slurm_auth(slurm, Some(&run_dir))?;
    let boot = torchrun::slurm_env(slurm, args.master_port.unwrap_or(slurm.master_port), auth).place;
    let layout = rank_layout(&spec, &boot)?;
    // Every task checks (tasks on one host wait for the first and reuse its verdict).
    check_dataset(&spec, args.json || slurm.rank != 0)?;
    if slurm.rank == 0 {
        write_atomically(&run_dir.join("spec.toml"), spec.to_toml().as_bytes())?;
    }
    if slurm.rank == gantry_train::place::reporting_rank(&layout) {
        // Only this rank writes them, so it alone clears a previous attempt's (a requeued
        // job keeps its id, hence its run directory).
        for f in ["metrics.jsonl", "summary.json"] {
            let _ = std::fs::remove_file(run_dir.join(f));
        }
        if !args.json {
            eprintln!(
                "gantry: Slurm job {}: {} ranks (dp {} × tp {} × pp {}), store at {}:{}; run dir {}",
                slurm.job_id,
                slurm.world,
                p.dp,
                p.tp,
                p.pp,
                slurm.master_addr,
                args.master_port.unwrap_or(slurm.master_port),
                run_dir.display()
            );
        }
    }
    let started = Instant::now();
    if let Some(summary) = run_rank(&spec, &run_dir, &boot, layout)? {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            print_summary(&summary, started.elapsed(), &run_dir);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `gantry rank`: one rank process of a job, placed by torchrun-style variables.
pub fn rank(args: RankArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.spec).with_context(|| format!("cannot read {}", args.spec.display()))?;
    let mut spec = JobSpec::parse(&text, &args.spec.display().to_string(), &args.overrides)?;
    if args.resume_auto {
        if !spec.checkpoint.enabled() {
            tracing::info!("--resume-auto: the spec has no checkpoint.dir, so nothing to resume; starting from step 0");
        } else if spec.checkpoint.resume.is_empty() {
            // Decided by the trainer (rank 0 lists the directory, every rank opens that step).
            spec.checkpoint.resume = "auto".into();
        } else {
            tracing::info!(
                resume = spec.checkpoint.resume,
                "--resume-auto: the spec already names checkpoint.resume; using it"
            );
        }
    }
    let boot = Bootstrap::from_lookup(|k| std::env::var(k).ok())
        .map_err(anyhow::Error::msg)?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "RANK is not set: `gantry rank` runs as a rank of a job, placed by torchrun-style \
             RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (started by `gantry launch` or a worker)"
            )
        })?;
    let layout = rank_layout(&spec, &boot)?;
    run_rank(&spec, &args.run_dir, &boot, layout)?;
    Ok(ExitCode::SUCCESS)
}

/// Keep freed heap memory for the next step instead of returning it to the kernel: a CPU
/// step's matmuls (oneDNN's) take and free large buffers every call, and glibc's defaults
/// shrank and regrew the heap each time (about 1,330 `brk` calls in 10 tiny steps against
/// 915, and two to three times the system time per step). Buffers under 32 MiB come from the
/// heap, and it is trimmed only past 1 GiB free. Left alone when the user set glibc's malloc
/// tunables.
fn keep_freed_heap(rank: usize) {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc")) {
        tracing::info!(rank, "heap: glibc's malloc tunables as GLIBC_TUNABLES sets them");
        return;
    }
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets allocator parameters, under the main arena's lock (safe
        // with other threads allocating); a refused setting leaves the default.
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        };
        tracing::info!(
            rank,
            kept = set,
            "heap: freed memory kept for the next step (mmap threshold 32 MiB, trim threshold 1 GiB)"
        );
    }
}

/// Join the job's ranks per `boot` and train; the reporting rank writes `summary.json` and
/// gets the summary back.
fn run_rank(
    spec: &JobSpec,
    run_dir: &Path,
    boot: &Bootstrap,
    layout: ParallelLayout,
) -> anyhow::Result<Option<RunSummary>> {
    let wants_gpu = spec.train.device == DeviceSpec::Cuda;
    gantry_train::load_cuda_backend_for(wants_gpu);
    if spec.train.threads > 0 {
        gantry_train::tch::set_num_threads(spec.train.threads as i32);
        gantry_train::tch::set_num_interop_threads(1);
    }
    // What the launcher or the worker says beyond the spec, read here once: the trainer
    // reads no environment.
    let context = gantry_train::run_context::RunContext {
        s3: gantry_checkpoint::S3Options::with_environment(std::env::vars_os()),
        ..gantry_train::run_context::RunContext::from_vars(|k| std::env::var_os(k))
            .with_context(|| format!("rank {}", boot.rank))?
    };
    // The dataset on this host: an s3:// one is fetched into the data cache (each file once
    // per host: the other ranks wait for it and reuse the checked copy).
    let spec = &crate::dataset_location::with_local_dataset(spec, &context, boot.local_world)
        .with_context(|| format!("rank {}", boot.rank))?;
    let cores = gantry_collectives::HostCores::measure().cores;
    let mut config = FabricConfig {
        wait: WaitPolicy::for_host(boot.local_world, cores),
        ..FabricConfig::default()
    }
    .with_lookup(|k| std::env::var(k).ok())
    .map_err(|e| anyhow::anyhow!("fabric config: {e}"))?;
    config.timeout = Duration::from_secs_f64(spec.parallel.timeout_s);
    if let Some(keep) = std::env::var("GANTRY_FLIGHT_KEEP").ok().filter(|v| !v.is_empty()) {
        config.flight_keep = keep
            .parse()
            .with_context(|| format!("GANTRY_FLIGHT_KEEP=`{keep}` is not a number of dumps"))?;
    }
    // libgomp read its wait policy when the process started; say which one this rank has.
    let omp_wait = std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "libgomp default".into());
    tracing::info!(
        rank = boot.rank,
        omp_wait_policy = omp_wait,
        intra_op_threads = spec.train.threads,
        ranks_on_host = boot.local_world,
        "OpenMP threads"
    );
    // The device before joining: ranks of a host with too few GPUs all refuse at once
    // rather than leave the others waiting in the rendezvous.
    let local = LocalRank {
        rank: boot.local_rank,
        ranks_on_host: boot.local_world,
        view: if boot.own_gpus { GpuView::Own } else { GpuView::Shared },
    };
    let device = gantry_train::place::device_of(spec, local).with_context(|| format!("rank {}", boot.rank))?;
    tracing::info!(
        rank = boot.rank,
        local_rank = boot.local_rank,
        device = ?device,
        compute = gantry_train::autocast::compute_dtype(device != gantry_train::tch::Device::Cpu),
        "device and compute dtype"
    );
    if device == gantry_train::tch::Device::Cpu {
        keep_freed_heap(boot.rank);
    }
    let fabric = Fabric::from_bootstrap(boot, config).context("joining the job's ranks")?;
    let rank = fabric.rank();
    let place = gantry_train::place::RankPlace::new(layout, rank, device);
    let mut registry = if rank == 0 {
        AutoRegister::new(spec, run_dir)
    } else {
        None
    };
    let trained = trainer::train_observed(spec, &fabric, &place, &context, run_dir, &mut |step| {
        if let Some(r) = registry.as_mut() {
            r.committed(step);
        }
    });
    if let Some(r) = registry {
        r.finish();
    }
    let mut summary = trained.with_context(|| format!("rank {rank}"))?;
    if !place.reports() {
        return Ok(None);
    }
    summary.entropy_floor = spec
        .data
        .dir()
        .ok()
        .and_then(|dir| Manifest::read(dir).ok())
        .and_then(|m| m.entropy_nats_per_token);
    write_atomically(&run_dir.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    Ok(Some(summary))
}

/// The spec checked for this rank's world and host, and the rank's parallel layout: the one
/// place a rank process builds it; everything after takes it from here.
fn rank_layout(spec: &JobSpec, boot: &Bootstrap) -> anyhow::Result<ParallelLayout> {
    // Before anything is built or joined (a worker's spec reaches here unvalidated): the
    // deadline must become a Duration, the sizes must fit this host's share of memory.
    spec.validate(boot.world)?;
    spec.check_memory(machine_share(boot.local_world))?;
    Ok(spec.parallel.layout(boot.world)?)
}

/// Write `<path>.tmp`, then rename: a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
