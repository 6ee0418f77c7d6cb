//! `gantry eval --model NAME[@ALIAS|@VERSION] --registry URL --data DIR [--tp T]`: loss and
//! perplexity of a registered version on a dataset's validation split, recorded back on the
//! version as an eval record.
//!
//! The model reference is resolved once (an alias that splits traffic picks one version) and
//! pinned as `NAME@N`. With `--tp 1` the evaluation runs in this process; with `--tp T`, T
//! local rank processes (this binary, hidden `--rank-result`) join one tensor-parallel
//! group, each downloading only its share of the weights (`…/tensors?tp=T&rank=R`), and rank
//! 0's result is the answer (every TP rank computes the same loss).
//!
//! `--device cpu|cuda|auto` (default auto: CUDA where a GPU is visible, else the CPU) says
//! where the forward passes run; on a GPU the weights live there and each pass runs under bf16
//! autocast. It is resolved before anything is fetched, so `--device cuda` on a host without
//! a GPU fails at once, naming the flag; with `--tp T` every rank takes its own GPU.

use crate::local_ranks::{LocalRanks, RankCommand, StopPolicy, tail};
use crate::model_loader::model_spec;
use crate::models::{Api, RegistryClient, seg};
use anyhow::{Context, bail};
use clap::Args;
use gantry_checkpoint::StorageLocation;
use gantry_collectives::fabric::Bootstrap;
use gantry_collectives::rank_env::{HostCores, OmpWait, RankProgram, thread_defaults};
use gantry_collectives::spawn::HostedStore;
use gantry_collectives::{Fabric, FabricConfig};
use gantry_registry::VersionRecord;
use gantry_train::comm::{CommClock, TensorComm};
use gantry_train::eval::{EvalConfig, EvalResult, evaluate};
use gantry_train::infer::{DeviceChoice, ToolDevice, enter_tool_device, tool_device};
use gantry_train::model::Model;
use gantry_train::place::{GpuView, LocalRank};
use gantry_train::weights;
use serde_json::json;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct EvalArgs {
    /// The model: NAME (its latest version), NAME@VERSION or NAME@ALIAS.
    #[arg(long)]
    model: String,
    /// Token dataset (from `gantry data prepare` or `gantry data synth`): a directory, file://…
    /// or s3://bucket/prefix (fetched into the host's data cache, $GANTRY_DATA_CACHE).
    #[arg(long, value_name = "DIR|URL", value_parser = crate::dataset_location::parse_dataset_location)]
    data: StorageLocation,
    /// Tensor-parallel degree: T local rank processes, each loading only its share.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Evaluate only the first N samples of the split.
    #[arg(long)]
    max_samples: Option<u64>,
    /// Fraction of documents in the validation split; 0 evaluates every document
    /// [default: the training run's data.valid_fraction, else 0.05].
    #[arg(long)]
    valid_fraction: Option<f64>,
    /// Seed that picks the validation documents [default: the training run's data.seed, else 0].
    #[arg(long)]
    split_seed: Option<u64>,
    /// Do not record the result on the version (no write token needed).
    #[arg(long)]
    no_record: bool,
    /// A note stored with the eval record.
    #[arg(long, default_value = "")]
    note: String,
    /// Give up on rank processes after this long.
    #[arg(long, default_value_t = 1800.0)]
    timeout_s: f64,
    /// Where to compute: cpu; cuda (bf16 autocast, weights on the GPU; an error where no GPU
    /// is visible); auto: cuda where a GPU is visible, else cpu.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    #[command(flatten)]
    client: RegistryClient,
    /// Internal: run as one TP rank and write the result into this directory.
    #[arg(long, hide = true, value_name = "DIR")]
    rank_result: Option<PathBuf>,
}

/// `--device` of `gantry eval` and `gantry registry serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> DeviceChoice {
        match d {
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
            DeviceArg::Auto => DeviceChoice::Auto,
        }
    }
}

/// Local rank `rank` of the `tp` evaluation processes on this host (each its own GPU).
fn eval_local_rank(rank: usize, tp: usize) -> LocalRank {
    LocalRank {
        rank,
        ranks_on_host: tp.max(1),
        view: GpuView::Shared,
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The version a reference names, pinned.
fn resolve(api: &Api, model: &str) -> anyhow::Result<VersionRecord> {
    let reference = if model.contains('@') {
        model.to_string()
    } else {
        format!("{model}@latest")
    };
    let v =
        runtime()?.block_on(api.json(api.request(reqwest::Method::GET, &format!("/v1/models/{}", seg(&reference)))))?;
    serde_json::from_value(v).context("the registry's version record does not parse")
}

/// The evaluation settings: flags, else what the training run used, else defaults.
/// `data` is the dataset's directory on this host.
fn config(args: &EvalArgs, v: &VersionRecord, data: PathBuf) -> EvalConfig {
    let defaults = EvalConfig::default();
    EvalConfig {
        data,
        valid_fraction: args
            .valid_fraction
            .or_else(|| v.data["valid_fraction"].as_f64())
            .unwrap_or(defaults.valid_fraction),
        split_seed: args
            .split_seed
            .or_else(|| v.data["seed"].as_u64())
            .unwrap_or(defaults.split_seed),
        batch: args.batch,
        max_samples: args.max_samples,
        cache_dir: Some(crate::dataset_location::data_cache_root()),
    }
}

/// Evaluate as TP rank `rank` of `tp` on `device`, `comm` being the TP group (None at TP 1).
fn eval_rank(
    api: &Api,
    v: &VersionRecord,
    cfg: &EvalConfig,
    tp: usize,
    rank: usize,
    comm: TensorComm,
    device: &ToolDevice,
) -> anyhow::Result<EvalResult> {
    let spec = model_spec(v).map_err(anyhow::Error::msg)?;
    let path = format!(
        "/v1/models/{}/versions/{}/tensors?tp={tp}&rank={rank}",
        seg(&v.model),
        v.version
    );
    let started = Instant::now();
    let bytes = runtime()?.block_on(async {
        let resp = api.send(api.request(reqwest::Method::GET, &path)).await?;
        Ok::<_, anyhow::Error>(resp.bytes().await?)
    })?;
    let model = Model::whole_for_loading(&spec, tp, rank, device.device)?;
    weights::load_from_safetensors(&model, &bytes)
        .with_context(|| format!("{}@{} TP share {rank}/{tp}", v.model, v.version))?;
    tracing::info!(
        rank,
        tp,
        bytes = bytes.len(),
        seconds = started.elapsed().as_secs_f64(),
        device = device.name(),
        "weights loaded"
    );
    let mut comm = comm;
    Ok(evaluate(&model, &mut comm, cfg, device.device)?)
}

/// The model can read the dataset's tokens, and `tp` divides what TP splits.
fn check(v: &VersionRecord, data: &Path, tp: usize) -> anyhow::Result<()> {
    let spec = model_spec(v).map_err(anyhow::Error::msg)?;
    let manifest = gantry_sharding::manifest::Manifest::read(data)
        .with_context(|| format!("{} is not a token dataset", data.display()))?;
    gantry_sharding::vocab::check_declared(&manifest, data, spec.vocab_size as u64)
        .with_context(|| format!("{}@{} cannot read {}", v.model, v.version, data.display()))?;
    if tp == 0 {
        bail!("--tp must be at least 1");
    }
    for (what, n) in [
        ("model.n_heads", spec.n_heads),
        ("model.vocab_size", spec.vocab_size),
        ("model.ffn", spec.ffn()),
    ] {
        if n % tp != 0 {
            bail!("--tp {tp} does not divide {what} = {n} of {}@{}", v.model, v.version);
        }
    }
    Ok(())
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    if let Some(dir) = &args.rank_result {
        return rank(&args, &api, dir);
    }
    // The device first: `--device cuda` without a GPU (or with fewer GPUs than --tp) fails
    // before anything is fetched.
    let device = tool_device(args.device.into(), eval_local_rank(0, args.tp))?;
    tracing::info!("evaluating on {}", device.describe());
    let v = resolve(&api, &args.model)?;
    let data = crate::dataset_location::dataset_on_host(&args.data, false)?;
    check(&v, &data, args.tp)?;
    let cfg = config(&args, &v, data);
    cfg.validate()?;
    let started = Instant::now();
    let result = if args.tp == 1 {
        enter_tool_device(&device)?;
        eval_rank(
            &api,
            &v,
            &cfg,
            1,
            0,
            TensorComm::new(None, CommClock::default()),
            &device,
        )?
    } else {
        spawn_ranks(&args, &v, &cfg, &device)?
    };
    let seconds = started.elapsed().as_secs_f64();
    let dataset = args.data.to_string();
    let note = format!(
        "{}valid_fraction {} split_seed {}, {} samples, on {}",
        if args.note.is_empty() {
            String::new()
        } else {
            format!("{}; ", args.note)
        },
        cfg.valid_fraction,
        cfg.split_seed,
        result.samples,
        device.name()
    );
    if !args.no_record {
        let body = json!({
            "dataset": dataset, "loss": result.loss, "perplexity": result.perplexity,
            "tokens": result.tokens, "tp": args.tp, "note": note,
        });
        let path = format!("/v1/models/{}/versions/{}/evals", seg(&v.model), v.version);
        runtime()?
            .block_on(api.post_json(reqwest::Method::POST, &path, &body))
            .context("recording the eval on the version (a write token is needed; --no-record skips it)")?;
    }
    let report = json!({
        "model": v.model, "version": v.version, "step": v.step, "dataset": dataset, "tp": args.tp,
        "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
        "samples": result.samples, "valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed,
        "seconds": seconds, "recorded": !args.no_record, "device": device.name(),
        "compute": gantry_train::autocast::compute_dtype(device.on_gpu()),
    });
    if args.client.json {
        println!("{report}");
    } else {
        println!(
            "{}@{} (step {}): loss {:.6} nats/token, perplexity {:.4} over {} tokens ({} samples, tp {}) in {:.1} s on {}{}",
            v.model,
            v.version,
            v.step,
            result.loss,
            result.perplexity,
            result.tokens,
            result.samples,
            args.tp,
            seconds,
            device.describe(),
            if args.no_record {
                ""
            } else {
                "; recorded on the version"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Spawn `tp` rank processes on `device`'s kind (each rank then takes its own GPU) and return
/// rank 0's result.
fn spawn_ranks(
    args: &EvalArgs,
    v: &VersionRecord,
    cfg: &EvalConfig,
    device: &ToolDevice,
) -> anyhow::Result<EvalResult> {
    let dir = std::env::temp_dir().join(format!("gantry-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut child: Vec<OsString> = vec![
        "eval".into(),
        "--model".into(),
        format!("{}@{}", v.model, v.version).into(),
        "--data".into(),
        cfg.data.clone().into(),
        "--tp".into(),
        args.tp.to_string().into(),
        "--batch".into(),
        cfg.batch.to_string().into(),
        "--valid-fraction".into(),
        cfg.valid_fraction.to_string().into(),
        "--split-seed".into(),
        cfg.split_seed.to_string().into(),
        "--registry".into(),
        args.client.registry.clone().into(),
        // What this process resolved (auto included), so every rank computes on the same kind.
        "--device".into(),
        if device.on_gpu() { "cuda" } else { "cpu" }.into(),
        "--rank-result".into(),
        dir.clone().into(),
    ];
    if let Some(n) = cfg.max_samples {
        child.extend(["--max-samples".into(), n.to_string().into()]);
    }
    let exe = std::env::current_exe().context("cannot find the gantry binary")?;
    let host = HostCores::measure();
    let threads = (host.cores / args.tp).max(1);
    let mut parent: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    parent.push(("GANTRY_EVAL_THREADS".into(), threads.to_string().into()));
    // The token (from --token, --token-file or the environment) reaches the ranks through
    // their environment, not argv; a token file variable they inherit is blanked so the two
    // never conflict.
    if let Some(token) = args.client.token()? {
        parent.push(("GANTRY_REGISTRY_TOKEN".into(), token.into()));
        parent.push(("GANTRY_REGISTRY_TOKEN_FILE".into(), OsString::new()));
    }
    let store = HostedStore::bind().context("starting the evaluation ranks")?;
    let thread_policy = thread_defaults(
        RankProgram::Gantry {
            threads_per_rank: threads,
            wait: OmpWait::Auto,
        },
        args.tp,
        host,
    );
    let commands = (0..args.tp)
        .map(|rank| {
            let mut env = store.rank_env(rank, args.tp);
            env.threads = Some(thread_policy);
            RankCommand {
                program: exe.clone().into(),
                args: child.clone(),
                env: env.environment(parent.iter().cloned()),
                log: Some(dir.join(format!("rank-{rank}.log"))),
            }
        })
        .collect();
    let policy = StopPolicy {
        linger: Duration::from_secs(3),
        signal: libc::SIGKILL,
        grace: Duration::from_secs(1),
    };
    let deadline = crate::flag_seconds("--timeout-s", args.timeout_s)?;
    let outcome = LocalRanks::spawn(commands, Some(store))
        .context("starting the evaluation ranks")?
        .supervise(policy, Some(deadline), || {});
    let failed = outcome.unsuccessful();
    if !failed.is_empty() {
        let logs: Vec<String> = failed
            .iter()
            .map(|r| {
                let log = dir.join(format!("rank-{r}.log"));
                format!("rank {r} ({}):\n{}", log.display(), tail(&log, 20))
            })
            .collect();
        bail!("evaluation ranks {failed:?} failed or timed out\n{}", logs.join("\n"));
    }
    let path = dir.join("result-0.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let result: serde_json::Value = serde_json::from_str(&text)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(EvalResult {
        loss: result["loss"].as_f64().context("result without loss")?,
        perplexity: result["perplexity"].as_f64().context("result without perplexity")?,
        tokens: result["tokens"].as_u64().context("result without tokens")?,
        samples: result["samples"].as_u64().context("result without samples")?,
    })
}

/// One TP rank (hidden mode of `gantry eval`).
fn rank(args: &EvalArgs, api: &Api, dir: &Path) -> anyhow::Result<ExitCode> {
    if let Some(n) = std::env::var("GANTRY_EVAL_THREADS")
        .ok()
        .and_then(|t| t.parse::<i32>().ok())
    {
        gantry_train::tch::set_num_threads(n);
        gantry_train::tch::set_num_interop_threads(1);
    }
    let boot = Bootstrap::from_lookup(|k| std::env::var(k).ok())
        .map_err(anyhow::Error::msg)?
        .context("--rank-result is for the rank processes `gantry eval --tp T` starts")?;
    let fabric = Fabric::from_bootstrap(
        &boot,
        FabricConfig::default()
            .with_lookup(|k| std::env::var(k).ok())
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .context("joining the evaluation ranks")?;
    let (rank, tp) = (fabric.rank(), fabric.world_size());
    let device = tool_device(args.device.into(), eval_local_rank(rank, tp)).with_context(|| format!("rank {rank}"))?;
    enter_tool_device(&device)?;
    let v = resolve(api, &args.model)?;
    // The launching eval resolved the dataset and passes its local directory down.
    let data = crate::dataset_location::dataset_on_host(&args.data, true)?;
    let cfg = config(args, &v, data);
    // On a GPU the tensor-parallel all-reduces run through the group's NCCL twin.
    let comm = TensorComm::for_device(Some(fabric.world()), CommClock::default(), device.device)
        .with_context(|| format!("rank {rank}"))?;
    let result = eval_rank(api, &v, &cfg, tp, rank, comm, &device).with_context(|| format!("rank {rank}"))?;
    let path = dir.join(format!("result-{rank}.json"));
    std::fs::write(&path, serde_json::to_vec(&result)?).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}
