//! `gantry registry serve`: the model registry's HTTP/JSON service (the routes and their
//! OpenAPI document live in `gantry_registry::http`).

use crate::model_loader::TchLoader;
use anyhow::Context;
use clap::{Args, Subcommand};
use gantry_registry::CheckpointRoot;
use gantry_registry::http::conn::ConnectionLimits;
use gantry_registry::http::{ServeConfig, parse_token_file, serve};
use gantry_registry::serving::ModelLoader;
use gantry_train::infer::{enter_tool_device, tool_device};
use gantry_train::place::LocalRank;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Serve the registry over HTTP: models, versions from verified committed checkpoints,
    /// aliases (weighted), eval records, file downloads with ranges and ETags, per-TP-rank
    /// tensor shares, and text generation (`POST /v1/models/NAME@ALIAS/generate`: a KV cache,
    /// concurrent requests batched, weighted aliases for A/B and canary traffic, per-version
    /// figures on `/metrics`); `GET /openapi.json` documents every route.
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to serve on (port 0 picks one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: String,
    /// The registry database (created if missing).
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// Tokens, one per line: `read TOKEN` or `write TOKEN` (`#` starts a comment). Writes
    /// need a write token; without this file the registry is read-only.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Require a token for reads too (`/metrics` included).
    #[arg(long)]
    closed_reads: bool,
    /// Print the address as JSON.
    #[arg(long)]
    json: bool,
    /// Memory for versions loaded for generation (weights and KV caches); the least recently
    /// used are evicted past it, and a version that alone needs more is refused (507).
    #[arg(long, default_value_t = 4096)]
    model_cache_mb: u64,
    /// Sequences generated together per loaded version (the KV cache's slots); more
    /// concurrent requests wait for a free slot.
    #[arg(long, default_value_t = 8)]
    batch_slots: usize,
    /// Generation requests in flight per served version (generating or waiting for a slot)
    /// before new ones are answered 503.
    #[arg(long, default_value_t = gantry_registry::http::DEFAULT_MAX_PENDING)]
    max_pending: usize,
    /// Intra-op threads for generation (0: libtorch's default, every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Do not load models: `generate` answers 501.
    #[arg(long)]
    no_generate: bool,
    /// Where generation computes: cpu; cuda (weights and KV caches on the GPU, bf16
    /// autocast; an error where no GPU is visible); auto: cuda where a GPU is visible, else cpu.
    #[arg(long, value_enum, default_value_t = crate::eval_cmd::DeviceArg::Auto)]
    device: crate::eval_cmd::DeviceArg,
    /// Accept registrations only from under these locations (comma-separated directories,
    /// file:// or s3://bucket/prefix); anything else is refused with 403, without saying
    /// whether it exists. Without it, any location the server can read is accepted.
    #[arg(long, value_name = "DIR,…", value_delimiter = ',')]
    checkpoint_roots: Vec<String>,
    /// Seconds a client has to send a request's headers (also the longest wait for the next
    /// request on a kept-alive HTTP/1 connection).
    #[arg(long, default_value_t = 15.0, value_name = "SECONDS")]
    header_timeout_s: f64,
    /// Seconds a connection may stay open with no request in flight.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    idle_timeout_s: f64,
    /// Open connections at once; at the cap the longest-idle one is closed to make room, and
    /// when all are busy a newcomer gets 503.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    #[command(flatten)]
    s3: crate::checkpoint_cmd::S3Args,
}

pub fn run(cmd: RegistryCommand) -> anyhow::Result<ExitCode> {
    let RegistryCommand::Serve(args) = cmd;
    let tokens = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            parse_token_file(&text).with_context(|| format!("token file {}", path.display()))?
        }
        None => Vec::new(),
    };
    let checkpoint_roots = args
        .checkpoint_roots
        .iter()
        .filter(|r| !r.trim().is_empty())
        .map(|r| CheckpointRoot::parse(r.trim()).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("--checkpoint-roots")?;
    let config = ServeConfig {
        db: args.db.clone(),
        tokens,
        open_reads: !args.closed_reads,
        s3: args.s3.options(),
        checkpoint_roots,
        connections: ConnectionLimits {
            header_read_timeout: crate::flag_seconds("--header-timeout-s", args.header_timeout_s)?,
            idle_timeout: crate::flag_seconds("--idle-timeout-s", args.idle_timeout_s)?,
            max_connections: args.max_connections,
            ..ConnectionLimits::default()
        },
        model_cache_bytes: args.model_cache_mb.saturating_mul(1 << 20),
        max_pending: args.max_pending,
        generation: None,
    };
    if args.batch_slots == 0 {
        anyhow::bail!("--batch-slots must be at least 1");
    }
    // Where generation computes, resolved before anything is bound: `--device cuda` without a
    // GPU is refused here, naming the flag.
    let device = if args.no_generate {
        None
    } else {
        let device = tool_device(args.device.into(), LocalRank::alone())?;
        enter_tool_device(&device)?;
        eprintln!("gantry registry serve: generation on {}", device.describe());
        Some(device)
    };
    let generation: Option<Arc<dyn ModelLoader>> = match &device {
        None => None,
        Some(device) => {
            if args.threads > 0 {
                gantry_train::tch::set_num_threads(args.threads as i32);
            }
            Some(Arc::new(TchLoader {
                slots: args.batch_slots,
                device: device.device,
            }))
        }
    };
    let config = ServeConfig { generation, ..config };
    // Refused before anything is bound or announced.
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = crate::daemons::shutdown_signal();
        let listener = crate::daemons::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        if args.json {
            let device = device.as_ref().map(|d| d.name());
            println!(
                "{}",
                serde_json::json!({"address": addr.to_string(), "db": args.db, "device": device})
            );
        } else {
            println!("listening on {addr}");
        }
        serve(listener, config, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
