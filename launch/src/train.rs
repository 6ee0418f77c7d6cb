//! `gantry launch JOB.toml --local N` (spawn N rank processes on this host, follow their
//! metrics with a progress bar, summarize), `gantry launch JOB.toml` as one task of a Slurm
//! job step, and `gantry rank` (one rank process: the entry point the launcher, and the
//! worker daemons, start). `gantry launch -- PROGRAM` (any command, torchrun-style) is
//! dispatched from here to `torchrun.rs`.

use crate::autoregister::AutoRegister;
use crate::slurm::SlurmEnv;
use crate::torchrun;
use anyhow::{Context, bail};
use clap::Args;
use gantry_collectives::fabric::Bootstrap;
use gantry_collectives::spawn::{Output, spawn_local_world};
use gantry_collectives::{Fabric, FabricConfig, ParallelLayout};
use gantry_sharding::gpt::{FrameMode, OpenOptions, TokenDataset};
use gantry_sharding::manifest::Manifest;
use gantry_train::metrics::{RunSummary, StepMetrics};
use gantry_train::{JobSpec, trainer};
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

/// Read, override, resolve (vocabulary from the dataset, threads per rank) and validate for a
/// world of `world` ranks, all on this host.
pub fn resolve_spec(path: &Path, overrides: &[String], world: usize) -> anyhow::Result<JobSpec> {
    resolve_spec_for(path, overrides, world, world)
}

/// [`resolve_spec`] for a world of `world` ranks of which `here` share this host's cores.
pub fn resolve_spec_for(path: &Path, overrides: &[String], world: usize, here: usize) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job spec {}", path.display()))?;
    // A job file for `gantry submit` may carry a [cluster] section; it means nothing here.
    let text = crate::jobfile::without_cluster_section(&text, &path.display().to_string())?;
    let mut spec = JobSpec::parse(&text, &path.display().to_string(), overrides)?;
    let manifest = Manifest::read(&spec.data.path).with_context(|| {
        format!(
            "data.path = {}: not a gantry dataset (make one with `gantry data synth` or `gantry data prepare`)",
            spec.data.path.display()
        )
    })?;
    if spec.model.vocab_size == 0 {
        let m = spec.model.vocab_multiple.max(1);
        spec.model.vocab_size = (manifest.vocab_size as usize).div_ceil(m) * m;
    } else {
        gantry_sharding::vocab::check_declared(&manifest, &spec.data.path, spec.model.vocab_size as u64)
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
    spec.data.path = std::path::absolute(&spec.data.path).unwrap_or(spec.data.path.clone());
    // Ranks may run elsewhere: a relative checkpoint directory means this one's.
    let dir = &spec.checkpoint.dir;
    if !dir.is_empty() && !dir.contains("://") {
        spec.checkpoint.dir = std::path::absolute(dir).map_or(dir.clone(), |p| p.display().to_string());
    }
    spec.validate(world)?;
    Ok(spec)
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
                    Some(slurm) => slurm_rank(&args, spec, &slurm),
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

/// `--set`, `--checkpoint-dir` and `--resume` as spec overrides.
fn spec_overrides(args: &LaunchArgs) -> Vec<String> {
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.checkpoint_dir {
        overrides.push(format!("checkpoint.dir={}", toml_string(dir)));
    }
    if let Some(which) = &args.resume {
        overrides.push(format!("checkpoint.resume={}", toml_string(which)));
    }
    overrides
}

/// Before any rank starts, on this host: every file training reads hashes to the manifest's
/// xxh3 (the first time only: the verdict is kept in the data cache under the dataset's
/// fingerprint, so later launches read no shard), and every token id is below the model's
/// vocabulary (each shard's largest id from the manifest, or found by that check), else an
/// error naming the shard, the document and the id. `quiet`: no report line.
fn check_dataset(spec: &JobSpec, quiet: bool) -> anyhow::Result<()> {
    let dir = &spec.data.path;
    // The ranks' dataset opens look for the verdict in the same place (their default).
    let root = gantry_sharding::materialize::default_cache_root();
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
    let exe = std::env::current_exe().context("cannot find the gantry executable to spawn ranks")?;
    let argv: Vec<std::ffi::OsString> = vec![
        "rank".into(),
        "--spec".into(),
        spec_path.clone().into(),
        "--run-dir".into(),
        run_dir.clone().into(),
    ];
    let mut env = vec![];
    if std::env::var_os("GANTRY_LOG").is_none() {
        env.push(("GANTRY_LOG".to_string(), "info".to_string()));
    }
    // libgomp's threads spin while waiting for work by default; with every core busy (ranks ×
    // threads >= cores) spinning threads steal the cores the others need (measured: 4–7×
    // slower on a loaded 2-core machine). Sleep instead, unless the user chose.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("OMP_WAIT_POLICY").is_none() && local * spec.train.threads >= cores {
        env.push(("OMP_WAIT_POLICY".to_string(), "PASSIVE".to_string()));
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
    let mut world = spawn_local_world(&exe, &argv, local, &env, Output::Files(logs.clone()))?;
    let progress = Progress::new(t.steps, args.json);
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut follower = MetricsFollower::default();
    let mut failed: Option<(usize, String)> = None;
    let mut status = vec![None; local];
    loop {
        for m in follower.poll(&metrics_path) {
            progress.update(&m);
        }
        for (i, c) in world.children.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = c.try_wait().ok().flatten();
                if let Some(s) = status[i]
                    && !s.success()
                    && failed.is_none()
                {
                    failed = Some((i, s.to_string()));
                }
            }
        }
        if failed.is_some() || status.iter().all(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some((rank, how)) = failed {
        // Give the others a moment to report their own view (a peer's error names the rank
        // it blames), then stop them.
        let final_status = world.wait_all(Duration::from_secs(3));
        progress.finish();
        let log = logs.join(format!("rank-{rank}.log"));
        eprintln!("gantry: rank {rank} failed ({how}); last lines of {}:", log.display());
        eprintln!("{}", tail(&log, 20));
        // The first rank to exit is often not the culprit (it saw a peer leave after that peer
        // timed out on the real one): show every rank's last error, and who never exited.
        for (r, st) in final_status.iter().enumerate() {
            match st {
                Some(st) if st.success() => {}
                Some(st) => {
                    let path = logs.join(format!("rank-{r}.log"));
                    let last = last_error(&path).unwrap_or_else(|| format!("exited with {st}"));
                    if last.starts_with(&format!("rank {r}:")) {
                        eprintln!("gantry: {last}");
                    } else {
                        eprintln!("gantry: rank {r}: {last}");
                    }
                }
                None => eprintln!("gantry: rank {r}: still running when the others failed; stopped"),
            }
        }
        bail!(
            "training failed: rank {rank} exited with {how} (logs in {})",
            logs.display()
        );
    }
    let _ = world.wait_all(Duration::from_secs(5));
    for m in follower.poll(&metrics_path) {
        progress.update(&m);
    }
    progress.finish();
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

fn print_summary(s: &RunSummary, wall: Duration, run_dir: &Path) {
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

/// The last `gantry: error:` line of a rank's log, without the prefix.
fn last_error(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("gantry: error: "))
        .map(str::to_string)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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

/// `gantry launch JOB.toml` as task SLURM_PROCID of a Slurm job step: resolve the spec for
/// the whole step, then train as that rank in this process (rank 0 serves the store at
/// MASTER_ADDR:MASTER_PORT). The reporting rank prints the summary.
fn slurm_rank(args: &LaunchArgs, spec_path: &Path, slurm: &SlurmEnv) -> anyhow::Result<ExitCode> {
    let spec = resolve_spec_for(spec_path, &spec_overrides(args), slurm.world, slurm.local_world)?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-slurm-{}", spec.name, slurm.job_id)));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let p = &spec.parallel;
    let layout = ParallelLayout::new(slurm.world, p.dp, p.tp, p.pp)?;
    // Every task checks (tasks on one host wait for the first and reuse its verdict).
    check_dataset(&spec, args.json || slurm.rank != 0)?;
    if slurm.rank == 0 {
        write_atomically(&run_dir.join("spec.toml"), spec.to_toml().as_bytes())?;
    }
    if slurm.rank == trainer::reporting_rank(&layout) {
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
    let boot = Bootstrap {
        rank: slurm.rank,
        world: slurm.world,
        local_rank: slurm.local_rank,
        local_world: slurm.local_world,
        master_addr: slurm.master_addr.clone(),
        master_port: args.master_port.unwrap_or(slurm.master_port),
        store_external: false,
    };
    let started = Instant::now();
    if let Some(summary) = run_rank(&spec, &run_dir, &boot)? {
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
    let boot = Bootstrap::from_env().map_err(anyhow::Error::msg)?.ok_or_else(|| {
        anyhow::anyhow!(
            "RANK is not set: `gantry rank` runs as a rank of a job, placed by torchrun-style \
             RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (started by `gantry launch` or a worker)"
        )
    })?;
    run_rank(&spec, &args.run_dir, &boot)?;
    Ok(ExitCode::SUCCESS)
}

/// Join the job's ranks per `boot` and train; the reporting rank writes `summary.json` and
/// gets the summary back.
fn run_rank(spec: &JobSpec, run_dir: &Path, boot: &Bootstrap) -> anyhow::Result<Option<RunSummary>> {
    gantry_train::load_cuda_backend();
    if spec.train.threads > 0 {
        gantry_train::tch::set_num_threads(spec.train.threads as i32);
        gantry_train::tch::set_num_interop_threads(1);
    }
    // Before anything is built or joined (a worker's spec reaches here unvalidated): the
    // deadline must become a Duration, the sizes must fit this host's share of memory.
    spec.validate(boot.world)?;
    spec.check_memory(machine_share(boot.local_world))?;
    let mut config = FabricConfig::default()
        .with_env()
        .map_err(|e| anyhow::anyhow!("fabric config: {e}"))?;
    config.timeout = Duration::from_secs_f64(spec.parallel.timeout_s);
    if let Some(keep) = std::env::var("GANTRY_FLIGHT_KEEP").ok().filter(|v| !v.is_empty()) {
        config.flight_keep = keep
            .parse()
            .with_context(|| format!("GANTRY_FLIGHT_KEEP=`{keep}` is not a number of dumps"))?;
    }
    let fabric = Fabric::from_bootstrap(boot, config).context("joining the job's ranks")?;
    let rank = fabric.rank();
    let mut registry = if rank == 0 {
        AutoRegister::new(spec, run_dir)
    } else {
        None
    };
    let trained = trainer::train_observed(spec, &fabric, run_dir, &mut |step| {
        if let Some(r) = registry.as_mut() {
            r.committed(step);
        }
    });
    if let Some(r) = registry {
        r.finish();
    }
    let mut summary = trained.with_context(|| format!("rank {rank}"))?;
    let p = &spec.parallel;
    let layout = ParallelLayout::new(fabric.world_size(), p.dp, p.tp, p.pp)?;
    if rank != trainer::reporting_rank(&layout) {
        return Ok(None);
    }
    summary.entropy_floor = Manifest::read(&spec.data.path)
        .ok()
        .and_then(|m| m.entropy_nats_per_token);
    write_atomically(&run_dir.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    Ok(Some(summary))
}

/// This host's memory (`MemTotal` of /proc/meminfo) divided among its `ranks` ranks: the
/// default memory limit of each (`train.max_memory_gib = 0`); `None` where it cannot be read.
fn machine_share(ranks: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(gantry_train::spec::mem_total_bytes(&text)? / ranks.max(1) as u64)
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
