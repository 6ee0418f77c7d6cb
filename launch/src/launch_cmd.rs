//! `gantry launch`: a job spec on N local rank processes (`--local N`: spawn them through the
//! local rank supervisor, follow their metrics with a progress bar, summarize), a job spec as
//! one task of a Slurm job step (each task is a rank: see `rank_cmd`), or any command with
//! torchrun's environment (`--nproc N -- PROGRAM`, `torchrun.rs`).

use crate::job_spec::{machine_share, resolve_spec};
use crate::local_ranks::{End, LocalRanks, Outcome, RankCommand, Stop, StopPolicy, last_error, signal_name, tail};
use crate::slurm::SlurmEnv;
use crate::torchrun;
use anyhow::{Context, bail};
use clap::Args;
use gantry_collectives::rank_env::{HostCores, RankProgram, thread_defaults};
use gantry_collectives::spawn::HostedStore;
use gantry_sharding::gpt::{FrameMode, OpenOptions, TokenDataset};
use gantry_sharding::manifest::Manifest;
use gantry_train::JobSpec;
use gantry_train::metrics::{RunSummary, StepMetrics};
use indicatif::{ProgressBar, ProgressStyle};
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Args)]
#[command(after_help = "Forms:
  gantry launch JOB.toml --local N            train a job as N rank processes on this host
  gantry launch --nproc N -- PROGRAM ARGS...  run any command as N ranks with torchrun's
                                              environment (RANK, LOCAL_RANK, WORLD_SIZE,
                                              LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...)
Under Slurm (SLURM_PROCID set), without --local / --nproc, `srun gantry launch JOB.toml` and
`srun gantry launch -- PROGRAM` run as one rank each: rank SLURM_PROCID of SLURM_NTASKS, rank
0 serving the store on the nodelist's first host at MASTER_PORT (default 29500 + job id % 1000).")]
pub struct LaunchArgs {
    /// The job spec (TOML): [model], [parallel], [data], [optim], [train]; see examples/.
    /// Omit it to run a command given after `--`.
    pub spec: Option<PathBuf>,
    /// Run the job spec as this many rank processes on this host (must equal dp × tp × pp).
    #[arg(long, value_name = "N")]
    pub local: Option<usize>,
    /// Run the command after `--` as this many processes with torchrun's environment.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// MASTER_PORT for a command's ranks (default: a free port) or a Slurm task (default:
    /// $MASTER_PORT, else 29500 + SLURM_JOB_ID % 1000).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// Override a spec value, e.g. `--set train.steps=20 --set parallel.tp=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run directory (default: runs/<name>-<unix time>; under Slurm runs/<name>-slurm-<job id>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Save checkpoints here: a directory, file:///… or s3://bucket/prefix (S3 settings from
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Same as
    /// `--set checkpoint.dir=URL`; `checkpoint.every` sets how often (default: at the end).
    #[arg(long, value_name = "URL")]
    pub checkpoint_dir: Option<String>,
    /// For an s3:// dataset: the most it may take in this host's data cache, in GB; shards are
    /// fetched ahead of the ranks and evicted behind them. Same as `--set data.cache_gb=GB`
    /// (default 0: no budget, the whole dataset is kept).
    #[arg(long, value_name = "GB")]
    pub data_cache_gb: Option<f64>,
    /// Resume from the checkpoint directory's `latest` committed checkpoint or a step number,
    /// in any layout; `auto`: the latest if there is one, else start at step 0.
    #[arg(long, value_name = "latest|auto|STEP")]
    pub resume: Option<String>,
    /// Print the run summary as JSON on stdout (no progress bar); with --nproc, each rank's
    /// exit status.
    #[arg(long)]
    pub json: bool,
    /// The command to run (after `--`), e.g. `-- python train.py --lr 3e-4`.
    #[arg(last = true, value_name = "PROGRAM ARGS")]
    pub command: Vec<OsString>,
}

pub fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    match (&args.spec, args.command.is_empty()) {
        (Some(spec), false) => bail!(
            "give either a job spec (`gantry launch {} --local N`) or a command after `--` \
             (`gantry launch --nproc N -- PROGRAM ARGS…`), not both",
            spec.display()
        ),
        (None, true) => bail!(
            "nothing to launch: give a job spec (`gantry launch JOB.toml --local N`) or a command \
             after `--` (`gantry launch --nproc N -- PROGRAM ARGS…`)"
        ),
        (None, false) => launch_command(&args),
        (Some(spec), true) => {
            if args.nproc.is_some() {
                bail!("--nproc runs a command given after `--`; a job spec runs with --local N");
            }
            match args.local {
                Some(0) => bail!("--local must be at least 1"),
                Some(n) => {
                    if args.master_port.is_some() {
                        bail!("--master-port is for a command (--nproc) or a Slurm task; --local hosts its own store");
                    }
                    launch_spec(&args, spec, n)
                }
                None => match slurm_env()? {
                    Some(slurm) => crate::rank_cmd::slurm_rank(&args, spec, &slurm),
                    None => bail!(
                        "--local N is required: how many rank processes to run on this host \
                         (or run under srun, one Slurm task per rank)"
                    ),
                },
            }
        }
    }
}

fn slurm_env() -> anyhow::Result<Option<SlurmEnv>> {
    SlurmEnv::from_env().context("reading this Slurm task's environment")
}

/// `gantry launch [--nproc N] -- PROGRAM ARGS…`.
fn launch_command(args: &LaunchArgs) -> anyhow::Result<ExitCode> {
    if args.local.is_some() {
        bail!("--local is for a job spec (`gantry launch JOB.toml --local N`); a command runs with --nproc N");
    }
    for (flag, given) in [
        ("--set", !args.overrides.is_empty()),
        ("--run-dir", args.run_dir.is_some()),
        ("--checkpoint-dir", args.checkpoint_dir.is_some()),
        ("--resume", args.resume.is_some()),
        ("--data-cache-gb", args.data_cache_gb.is_some()),
    ] {
        if given {
            bail!("{flag} applies to a job spec, not to a command");
        }
    }
    match args.nproc {
        Some(0) => bail!("--nproc must be at least 1"),
        Some(n) => {
            if let Ok(Some(s)) = SlurmEnv::from_env()
                && s.world > 1
            {
                eprintln!(
                    "gantry: --nproc {n}: running {n} local ranks in each of the {} Slurm tasks (one world per task); \
                     drop --nproc to make the Slurm tasks the ranks",
                    s.world
                );
            }
            torchrun::launch_local(n, args.master_port, args.json, &args.command)
        }
        None => match slurm_env()? {
            Some(slurm) => {
                if args.json {
                    bail!("--json reports the ranks gantry spawns (--nproc); a Slurm task runs the command itself");
                }
                let port = args.master_port.unwrap_or(slurm.master_port);
                torchrun::exec_slurm_task(&slurm, port, &args.command)
            }
            None => bail!(
                "--nproc N is required to run a command: how many ranks to start on this host \
                 (or run under srun, one Slurm task per rank)"
            ),
        },
    }
}

/// `--set`, `--checkpoint-dir`, `--resume` and `--data-cache-gb` as spec overrides.
pub(crate) fn spec_overrides(args: &LaunchArgs) -> Vec<String> {
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.checkpoint_dir {
        overrides.push(format!("checkpoint.dir={}", toml_string(dir)));
    }
    if let Some(which) = &args.resume {
        overrides.push(format!("checkpoint.resume={}", toml_string(which)));
    }
    if let Some(gb) = args.data_cache_gb {
        // `{:?}` keeps a decimal point, so TOML reads a float.
        overrides.push(format!("data.cache_gb={gb:?}"));
    }
    overrides
}

/// Before any rank starts, on this host: every file training reads hashes to the manifest's
/// xxh3 (the first time only: the verdict is kept in the data cache under the dataset's
/// fingerprint, so later launches read no shard), and every token id is below the model's
/// vocabulary (each shard's largest id from the manifest, or found by that check), else an
/// error naming the shard, the document and the id. `quiet`: no report line.
pub(crate) fn check_dataset(spec: &JobSpec, quiet: bool) -> anyhow::Result<()> {
    if !spec.data.path.is_local() {
        // The ranks stream it: nothing but the manifest is read here.
        return crate::dataset_location::check_remote_dataset(spec, quiet);
    }
    let dir = &crate::dataset_location::dataset_on_host(&spec.data.path, quiet)?;
    // The ranks' dataset opens look for the verdict in the same place (their default).
    let root = crate::dataset_location::data_cache_root();
    let host = gantry_sharding::verify::check_on_host(dir, &root, 0)
        .with_context(|| format!("data.path = {}: the dataset does not match its manifest", dir.display()))?;
    if !quiet {
        if host.reused {
            eprintln!(
                "gantry: dataset {} matches its manifest (checked on this host before: {})",
                dir.display(),
                host.verdict.display()
            );
        } else {
            eprintln!(
                "gantry: checked {} files of {} against its manifest (xxh3, {:.3} GB in {:.2} s){}",
                host.files,
                dir.display(),
                host.bytes as f64 / 1e9,
                host.seconds,
                match &host.not_saved {
                    None => format!("; verdict kept in {}", host.verdict.display()),
                    Some(why) => format!("; not remembered ({why}): the next launch checks again"),
                }
            );
        }
    }
    // Each shard's largest id: recorded in the manifest, else found by the check above (a
    // compressed-only shard of an older dataset has neither: the ranks scan it on first read).
    let manifest = Manifest::read(dir)?;
    let vocab = spec.model.vocab_size as u64;
    let largest: Vec<Option<u64>> = manifest
        .shards
        .iter()
        .zip(&host.max_token_ids)
        .map(|(s, found)| s.max_token_id.or(*found))
        .collect();
    if largest
        .iter()
        .flatten()
        .all(|&max| gantry_sharding::vocab::fits(max, vocab))
    {
        return Ok(());
    }
    // Open the dataset to find the offending document (frames, if any, through the frame
    // cache: nothing is decompressed to disk here).
    let opts = OpenOptions {
        frames: FrameMode::Lru,
        cache_dir: Some(root),
        vocab_size: Some(vocab),
        ..OpenOptions::default()
    };
    let data = TokenDataset::open_with(dir, &opts).with_context(|| format!("data.path = {}", dir.display()))?;
    data.check_largest_ids(&largest)
        .with_context(|| format!("data.path = {}", dir.display()))?;
    Ok(())
}

/// `gantry launch JOB.toml --local N`.
fn launch_spec(args: &LaunchArgs, spec_path: &Path, local: usize) -> anyhow::Result<ExitCode> {
    let spec = resolve_spec(spec_path, &spec_overrides(args), local)?;
    spec.check_memory(machine_share(local))?;
    check_dataset(&spec, args.json)?;
    let run_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => {
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            PathBuf::from("runs").join(format!("{}-{secs}", spec.name))
        }
    };
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let spec_path = run_dir.join("spec.toml");
    std::fs::write(&spec_path, spec.to_toml()).with_context(|| format!("cannot write {}", spec_path.display()))?;
    for f in ["metrics.jsonl", "summary.json"] {
        let _ = std::fs::remove_file(run_dir.join(f));
    }
    let (p, t) = (&spec.parallel, &spec.train);
    if !args.json {
        eprintln!(
            "gantry: {} ranks (dp {} × tp {} × pp {}{}), {} parameters, {} steps of {} samples × {} tokens; run dir {}",
            local,
            p.dp,
            p.tp,
            p.pp,
            if p.zero1 { ", ZeRO-1" } else { "" },
            spec.model.num_params(),
            t.steps,
            t.global_batch,
            spec.model.seq_len,
            run_dir.display()
        );
    }
    let started = Instant::now();
    let store = HostedStore::bind().context("cannot host the ranks' rendezvous store")?;
    let commands = rank_commands(&spec, &spec_path, &run_dir, &store, local)?;
    let ranks = LocalRanks::spawn(commands, Some(store))?;
    let progress = Progress::new(t.steps, args.json);
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut follower = MetricsFollower::default();
    // After a failure the others get a moment to report their own view (a peer's error names
    // the rank it blames) before they are stopped.
    let policy = StopPolicy {
        linger: Duration::from_secs(3),
        signal: libc::SIGKILL,
        grace: Duration::from_secs(1),
    };
    let outcome = ranks.supervise(policy, None, || {
        for m in follower.poll(&metrics_path) {
            progress.update(&m);
        }
    });
    for m in follower.poll(&metrics_path) {
        progress.update(&m);
    }
    progress.finish();
    match outcome.stop {
        None => {}
        Some(Stop::Signal(s)) => {
            eprintln!("gantry: stopped by {}", signal_name(s));
            return Ok(ExitCode::from(End::Signal(s).exit_code()));
        }
        Some(Stop::Failed(rank)) => {
            report_failure(&outcome, &logs);
            bail!(
                "training failed: rank {rank} exited with {} (logs in {})",
                outcome.ranks[rank].end.describe(),
                logs.display()
            );
        }
        Some(Stop::Timeout) => bail!("the ranks were stopped at a deadline (logs in {})", logs.display()),
    }
    let summary_path = run_dir.join("summary.json");
    let summary: RunSummary = serde_json::from_slice(
        &std::fs::read(&summary_path)
            .with_context(|| format!("ranks finished but {} is missing", summary_path.display()))?,
    )
    .with_context(|| format!("cannot parse {}", summary_path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, started.elapsed(), &run_dir);
    }
    Ok(ExitCode::SUCCESS)
}

/// Each rank runs `gantry rank --spec … --run-dir …` with the launcher's own environment plus
/// what the environment writer sets: its place around the launcher's store, `GANTRY_LOG=info`
/// and the thread policy for `train.threads` per rank (both only where the user chose nothing),
/// its output appended to `logs/rank-<r>.log`.
fn rank_commands(
    spec: &JobSpec,
    spec_path: &Path,
    run_dir: &Path,
    store: &HostedStore,
    local: usize,
) -> anyhow::Result<Vec<RankCommand>> {
    let exe = std::env::current_exe().context("cannot find the gantry executable to spawn ranks")?;
    let args: Vec<OsString> = vec![
        "rank".into(),
        "--spec".into(),
        spec_path.into(),
        "--run-dir".into(),
        run_dir.into(),
    ];
    let program = RankProgram::Gantry {
        threads_per_rank: spec.train.threads,
        wait: spec.train.omp_wait,
    };
    let threads = thread_defaults(program, local, HostCores::measure());
    let parent: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let logs = run_dir.join("logs");
    Ok((0..local)
        .map(|rank| {
            let mut env = store.rank_env(rank, local);
            env.log = Some("info".into());
            env.threads = Some(threads);
            RankCommand {
                program: exe.clone().into(),
                args: args.clone(),
                env: env.environment(parent.iter().cloned()),
                log: Some(logs.join(format!("rank-{rank}.log"))),
            }
        })
        .collect())
}

/// The first failing rank's log tail, then every rank's last error: the first rank to exit is
/// often not the culprit (it saw a peer leave after that peer timed out on the real one).
fn report_failure(outcome: &Outcome, logs: &Path) {
    let log_of = |r: usize| logs.join(format!("rank-{r}.log"));
    if let Some((rank, end)) = outcome.failed() {
        eprintln!(
            "gantry: rank {rank} failed ({}); last lines of {}:",
            end.describe(),
            log_of(rank).display()
        );
        eprintln!("{}", tail(&log_of(rank), 20));
    }
    for (r, ended) in outcome.ranks.iter().enumerate() {
        if ended.stopped {
            eprintln!("gantry: rank {r}: still running when the others failed; stopped");
        } else if !ended.end.success() {
            let last = last_error(&log_of(r)).unwrap_or_else(|| format!("exited with {}", ended.end.describe()));
            if last.starts_with(&format!("rank {r}:")) {
                eprintln!("gantry: {last}");
            } else {
                eprintln!("gantry: rank {r}: {last}");
            }
        }
    }
}

/// A TOML string literal, so `--set` values with any characters parse as strings.
fn toml_string(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn print_summary(s: &RunSummary, wall: Duration, run_dir: &Path) {
    println!(
        "run {} finished: {} steps in {:.1} s",
        run_dir.display(),
        s.steps,
        wall.as_secs_f64()
    );
    let Some(loss) = s.final_loss else {
        // No step ran: no loss, throughput or metrics to report.
        println!(
            "  nothing trained: the run resumed at step {}, where it ends (train.steps / train.stop_after)",
            s.steps
        );
        return;
    };
    println!("  final train loss   {loss:.4}");
    match (s.val_loss, s.entropy_floor) {
        (Some(v), Some(h)) => {
            println!("  validation loss    {v:.4}");
            println!(
                "  entropy floor      {h:.4}   (the data's exact entropy rate; gap {:.4} nats/token)",
                v - h
            );
        }
        (Some(v), None) => println!("  validation loss    {v:.4}"),
        _ => {}
    }
    println!(
        "  throughput         {:.0} tokens/s, {:.1} ms/step, {:.0}% of step time in communication (rank 0 of the last stage)",
        s.mean_tokens_per_s,
        s.mean_step_ms,
        100.0 * s.comm_share
    );
    println!(
        "  after backward     {:.1} ms/step (gradient buckets, norm, clipping, AdamW)",
        s.mean_update_ms
    );
    if let Some(mfu) = s.mean_mfu {
        println!("  MFU                {:.1}% of the H200's dense bf16 peak", 100.0 * mfu);
    }
    for (i, text) in s.samples.iter().enumerate() {
        println!("  sample {i}: {text}");
    }
    let registered = std::fs::read_to_string(run_dir.join("registry.jsonl")).unwrap_or_default();
    for line in registered.lines() {
        let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match r["error"].as_str() {
            Some(e) => println!("  registry           step {} NOT registered: {e}", r["step"]),
            None => println!(
                "  registry           step {} registered as {}@{}{}",
                r["step"],
                r["model"].as_str().unwrap_or(""),
                r["version"],
                r["alias"]
                    .as_str()
                    .filter(|a| !a.is_empty())
                    .map(|a| format!(" (alias {a})"))
                    .unwrap_or_default()
            ),
        }
    }
    println!("  metrics: {}", run_dir.join("metrics.jsonl").display());
}

/// Reads the lines appended to metrics.jsonl since the last call.
#[derive(Default)]
struct MetricsFollower {
    offset: u64,
    partial: String,
}

impl MetricsFollower {
    fn poll(&mut self, path: &Path) -> Vec<StepMetrics> {
        let Ok(mut f) = std::fs::File::open(path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = String::new();
        let Ok(n) = f.read_to_string(&mut buf) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.push_str(&buf);
        let mut out = Vec::new();
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            if let Ok(m) = serde_json::from_str(line.trim()) {
                out.push(m);
            }
        }
        out
    }
}

/// A progress bar on a terminal; a log line every ~10% of the steps otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    steps: u64,
    quiet: bool,
}

impl Progress {
    fn new(steps: u64, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(steps);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}").expect("valid template"),
            );
            b
        });
        Progress { bar, steps, quiet }
    }

    fn update(&self, m: &StepMetrics) {
        let val = m.val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
        let msg = format!("loss {:.4}{val}  {:.0} tok/s", m.loss, m.tokens_per_s);
        if let Some(b) = &self.bar {
            b.set_position(m.step);
            b.set_message(msg);
        } else if !self.quiet {
            let every = (self.steps / 10).max(1);
            if m.step.is_multiple_of(every) || m.step == self.steps || m.val_loss.is_some() {
                eprintln!(
                    "step {}/{}  {msg}  lr {:.2e}  grad norm {:.3}",
                    m.step, self.steps, m.lr, m.grad_norm
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
