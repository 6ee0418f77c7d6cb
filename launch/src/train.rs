//! `gantry launch JOB.toml --local N` (spawn N rank processes on this host, follow their
//! metrics with a progress bar, summarize) and `gantry rank` (one rank process: the entry
//! point the launcher, and later the worker daemons, start).

use anyhow::{Context, bail};
use clap::Args;
use gantry_collectives::spawn::{Output, spawn_local_world};
use gantry_collectives::{Fabric, FabricConfig, ParallelLayout};
use gantry_sharding::manifest::Manifest;
use gantry_train::metrics::{RunSummary, StepMetrics};
use gantry_train::{JobSpec, trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Args)]
pub struct LaunchArgs {
    /// The job spec (TOML): [model], [parallel], [data], [optim], [train]; see examples/.
    pub spec: PathBuf,
    /// Run this many rank processes on this host (must equal dp × tp × pp).
    #[arg(long, value_name = "N")]
    pub local: usize,
    /// Override a spec value, e.g. `--set train.steps=20 --set parallel.tp=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run directory (default: runs/<name>-<unix time>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Save checkpoints here: a directory, file:///… or s3://bucket/prefix (S3 settings from
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Same as
    /// `--set checkpoint.dir=URL`; `checkpoint.every` sets how often (default: at the end).
    #[arg(long, value_name = "URL")]
    pub checkpoint_dir: Option<String>,
    /// Resume from the checkpoint directory's `latest` committed checkpoint or a step number,
    /// in any layout.
    #[arg(long, value_name = "latest|STEP")]
    pub resume: Option<String>,
    /// Print the run summary as JSON on stdout (no progress bar).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RankArgs {
    /// The resolved job spec the launcher wrote into the run directory.
    #[arg(long)]
    pub spec: PathBuf,
    /// Where the reporting rank writes metrics.jsonl and summary.json.
    #[arg(long)]
    pub run_dir: PathBuf,
}

/// Read, override, resolve (vocabulary from the dataset, threads per rank) and validate.
pub fn resolve_spec(path: &Path, overrides: &[String], world: usize) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job spec {}", path.display()))?;
    let mut spec = JobSpec::parse(&text, &path.display().to_string(), overrides)?;
    let manifest = Manifest::read(&spec.data.path).with_context(|| {
        format!(
            "data.path = {}: not a gantry dataset (make one with `gantry data synth` or `gantry data prepare`)",
            spec.data.path.display()
        )
    })?;
    let data_vocab = manifest.vocab_size as usize;
    if spec.model.vocab_size == 0 {
        let m = spec.model.vocab_multiple.max(1);
        spec.model.vocab_size = data_vocab.div_ceil(m) * m;
    } else if spec.model.vocab_size < data_vocab {
        bail!(
            "job spec: `model.vocab_size`: {} is smaller than the dataset's vocabulary {data_vocab} ({})",
            spec.model.vocab_size,
            spec.data.path.display()
        );
    }
    if spec.train.threads == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        spec.train.threads = (cores / world.max(1)).max(1);
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
    if args.local == 0 {
        bail!("--local must be at least 1");
    }
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.checkpoint_dir {
        overrides.push(format!("checkpoint.dir={}", toml_string(dir)));
    }
    if let Some(which) = &args.resume {
        overrides.push(format!("checkpoint.resume={}", toml_string(which)));
    }
    let spec = resolve_spec(&args.spec, &overrides, args.local)?;
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
    if std::env::var_os("OMP_WAIT_POLICY").is_none() && args.local * spec.train.threads >= cores {
        env.push(("OMP_WAIT_POLICY".to_string(), "PASSIVE".to_string()));
    }
    let (p, t) = (&spec.parallel, &spec.train);
    if !args.json {
        eprintln!(
            "gantry: {} ranks (dp {} × tp {} × pp {}{}), {} parameters, {} steps of {} samples × {} tokens; run dir {}",
            args.local,
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
    let mut world = spawn_local_world(&exe, &argv, args.local, &env, Output::Files(logs.clone()))?;
    let progress = Progress::new(t.steps, args.json);
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut follower = MetricsFollower::default();
    let mut failed: Option<(usize, String)> = None;
    let mut status = vec![None; args.local];
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
    println!("  final train loss   {:.4}", s.final_loss);
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
    for (i, text) in s.samples.iter().enumerate() {
        println!("  sample {i}: {text}");
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

/// `gantry rank`: one rank process of a job.
pub fn rank(args: RankArgs) -> anyhow::Result<ExitCode> {
    gantry_train::load_cuda_backend();
    let text = std::fs::read_to_string(&args.spec).with_context(|| format!("cannot read {}", args.spec.display()))?;
    let spec = JobSpec::parse(&text, &args.spec.display().to_string(), &[])?;
    if spec.train.threads > 0 {
        gantry_train::tch::set_num_threads(spec.train.threads as i32);
        gantry_train::tch::set_num_interop_threads(1);
    }
    let mut config = FabricConfig::default()
        .with_env()
        .map_err(|e| anyhow::anyhow!("fabric config: {e}"))?;
    config.timeout = Duration::from_secs_f64(spec.parallel.timeout_s);
    let fabric = Fabric::from_env(config).context("joining the job's ranks")?;
    let rank = fabric.rank();
    let mut summary = trainer::train(&spec, &fabric, &args.run_dir).with_context(|| format!("rank {rank}"))?;
    let p = &spec.parallel;
    let layout = ParallelLayout::new(fabric.world_size(), p.dp, p.tp, p.pp)?;
    if rank == trainer::reporting_rank(&layout) {
        summary.entropy_floor = Manifest::read(&spec.data.path)
            .ok()
            .and_then(|m| m.entropy_nats_per_token);
        let path = args.run_dir.join("summary.json");
        let tmp = args.run_dir.join("summary.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
