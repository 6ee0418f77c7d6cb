//! `gantry checkpoint list|inspect|verify|export URL`: look at, check and export the
//! checkpoints a run saved, on local disk or S3.

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use gantry_checkpoint::export::write_safetensors;
use gantry_checkpoint::{
    Checkpoint, DType, S3Options, SliceSpec, StorageLocation, Store, StoreConfig, Which, committed_steps,
};
use gantry_train::checkpointing::TOKENIZER_CONFIG_ASSET;
use gantry_train::{hf, weights};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// S3 connection flags; each falls back to the standard AWS environment variable (read here,
/// by the binary: the libraries are handed plain fields).
#[derive(Args, Clone, Debug, Default)]
pub struct S3Args {
    /// S3 endpoint URL (for S3-compatible servers)
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// S3 region
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// S3 access key id
    #[arg(long, global = true, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub access_key: Option<String>,
    /// S3 secret access key
    #[arg(long, global = true, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
}

impl S3Args {
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            ..S3Options::with_environment(std::env::vars_os())
        }
    }
}

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Committed checkpoints under URL (a directory, file:///… or s3://bucket/prefix).
    List {
        url: StorageLocation,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// One checkpoint's manifest: step, layout, model, lineage, tensors and sizes.
    Inspect {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Re-read every chunk and check every checksum and size.
    Verify {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Write a Hugging Face folder: model.safetensors, config.json and generation_config.json
    /// (GPT2LMHeadModel or LlamaForCausalLM), and the tokenizer files when the checkpoint has a
    /// tokenizer; transformers' AutoModelForCausalLM and AutoTokenizer load it as it is.
    Export {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_enum, default_value_t = ExportFormat::Safetensors)]
        format: ExportFormat,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// A chat template (Jinja) for tokenizer_config.json, instead of the one the dataset's
        /// tokenizer came with (if any).
        #[arg(long, value_name = "FILE")]
        chat_template: Option<PathBuf>,
    },
}

/// One checkpoint: where, which step, how to reach S3.
#[derive(Args)]
pub struct Target {
    /// A directory, file:///… or s3://bucket/prefix.
    url: StorageLocation,
    /// `latest` or a step number.
    #[arg(long, default_value = "latest")]
    step: String,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    Safetensors,
}

fn open(t: &Target) -> anyhow::Result<Checkpoint> {
    let which: Which = t.step.parse().map_err(|e: String| anyhow::anyhow!("--step: {e}"))?;
    let store = Store::open_location(&t.url, &t.s3.options(), StoreConfig::default())?;
    Ok(Checkpoint::open(&store, which)?)
}

pub fn run(cmd: CheckpointCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CheckpointCommand::List { url, json, s3 } => list(&url, json, &s3),
        CheckpointCommand::Inspect { target, json } => inspect(&open(&target)?, json),
        CheckpointCommand::Verify { target, json } => verify(&open(&target)?, json),
        CheckpointCommand::Export {
            target,
            out,
            chat_template,
            ..
        } => export(&open(&target)?, &out, chat_template.as_deref()),
    }
}

fn list(url: &StorageLocation, json: bool, s3: &S3Args) -> anyhow::Result<ExitCode> {
    let store = Store::open_location(url, &s3.options(), StoreConfig::default())?;
    let mut rows = Vec::new();
    for step in committed_steps(&store)? {
        // A step whose manifest does not read is listed as damaged, with the others.
        let c = match Checkpoint::open(&store, Which::Step(step)) {
            Ok(c) => c,
            Err(e) => {
                rows.push(serde_json::json!({ "step": step, "damaged": e.to_string() }));
                continue;
            }
        };
        let m = &c.manifest;
        rows.push(serde_json::json!({
            "step": m.step,
            "tokens_seen": m.job.tokens_seen,
            "bytes": m.total_bytes(),
            "world_size": m.world_size,
            "layout": m.job.layout,
            "committed_at": m.committed_at,
            "job_id": m.job.lineage.job_id,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no committed checkpoints in {}", store.url());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>10}  {:>14}  {:>10}  {:>5}  layout",
        "step", "tokens", "MiB", "ranks"
    );
    for r in &rows {
        if let Some(why) = r["damaged"].as_str() {
            println!("{:>10}  DAMAGED: {why}", r["step"].as_u64().unwrap_or(0));
            continue;
        }
        println!(
            "{:>10}  {:>14}  {:>10.1}  {:>5}  {}",
            r["step"].as_u64().unwrap_or(0),
            r["tokens_seen"].as_u64().unwrap_or(0),
            r["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            r["world_size"].as_u64().unwrap_or(0),
            r["layout"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(c: &Checkpoint, json: bool) -> anyhow::Result<ExitCode> {
    let m = &c.manifest;
    let tensors = m.tensors();
    if json {
        let out = serde_json::json!({
            "url": c.store.url(),
            "step": m.step,
            "format_version": m.format_version,
            "tokens_seen": m.job.tokens_seen,
            "world_size": m.world_size,
            "bytes": m.total_bytes(),
            "objects": m.objects.len(),
            "entries": m.entries.len(),
            "model": m.job.model,
            "layout": m.job.layout,
            "optimizer": m.job.optimizer,
            "data_cursor": m.job.data_cursor,
            "lineage": m.job.lineage,
            "tensors": tensors.iter().map(|(n, d, s)| serde_json::json!({"name": n, "dtype": d, "shape": s})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("checkpoint {} step {}", c.store.url(), m.step);
    println!("  format version  {}", m.format_version);
    println!("  tokens seen     {}", m.job.tokens_seen);
    println!("  written by      {} ranks, layout {}", m.world_size, m.job.layout);
    println!(
        "  size            {:.1} MiB in {} objects, {} slices",
        m.total_bytes() as f64 / (1 << 20) as f64,
        m.objects.len(),
        m.entries.len()
    );
    println!(
        "  lineage         job {}, spec {}, gantry {}",
        m.job.lineage.job_id, m.job.lineage.spec_hash, m.job.lineage.gantry_version
    );
    println!("  model           {}", m.job.model);
    println!("  data cursor     {}", m.job.data_cursor);
    println!("  tensors ({}):", tensors.len());
    for (name, dtype, shape) in &tensors {
        println!("    {name:<40} {dtype:?} {shape:?}");
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(c: &Checkpoint, json: bool) -> anyhow::Result<ExitCode> {
    let total = c.manifest.total_bytes();
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("verifying {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("valid template"),
        );
        b
    });
    let started = Instant::now();
    let result = c.verify(&mut |done| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = result?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "step": c.step(), "objects": report.objects, "entries": report.entries, "bytes": report.bytes, "seconds": secs})
        );
    } else {
        println!(
            "checkpoint step {} OK: {} objects, {} slices, {:.1} MiB checked in {secs:.2} s",
            c.step(),
            report.objects,
            report.entries,
            report.bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn export(c: &Checkpoint, out: &Path, chat_template: Option<&Path>) -> anyhow::Result<ExitCode> {
    let m = &c.manifest;
    let at = |e: hf::HfError| anyhow::anyhow!("{} step {}: {e}", c.store.url(), m.step);
    let model = hf::model_spec(&m.job.model).map_err(at)?;
    let chat_template = chat_template
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("--chat-template {}", p.display())))
        .transpose()?;
    let sources = hf::sources(&model);
    let requests: Vec<SliceSpec> = sources
        .iter()
        .map(|(name, shape)| SliceSpec::full(name, DType::F32, shape))
        .collect();
    let started = Instant::now();
    let loaded = c.load(&requests)?;
    let tensors: HashMap<String, hf::Source> = sources.into_iter().zip(loaded).map(|((n, s), b)| (n, (s, b))).collect();
    let tokenizer = weights::tokenizer_from_checkpoint(c)?;
    let tokenizer_config = weights::asset_from_checkpoint(c, TOKENIZER_CONFIG_ASSET)?;
    if tokenizer.is_none() && chat_template.is_some() {
        bail!(
            "--chat-template: {} step {} has no tokenizer to go with it",
            c.store.url(),
            m.step
        );
    }
    let source = tokenizer.as_deref().map(|json| hf::TokenizerSource {
        tokenizer_json: json,
        tokenizer_config: tokenizer_config.as_deref(),
        chat_template: chat_template.as_deref(),
    });
    let exported = hf::export(&model, tensors, source).map_err(at)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("gantry_step".to_string(), m.step.to_string()),
        ("gantry_job_id".to_string(), m.job.lineage.job_id.clone()),
    ]);
    let bytes = write_safetensors(&exported.tensors, metadata, &out.join("model.safetensors"))?;
    let files = exported.files();
    for (name, contents) in &files {
        let path = out.join(name);
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if exported.tokenizer_files.is_empty() {
        remove_stale_tokenizer(out)?;
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    println!(
        "exported step {} as {} ({} tensors, {:.1} MiB) to {}: model.safetensors, {} in {:.2} s",
        m.step,
        hf::architecture(&model),
        exported.tensors.len(),
        bytes as f64 / (1 << 20) as f64,
        out.display(),
        names.join(", "),
        started.elapsed().as_secs_f64()
    );
    println!("{}", tokenizer_line(&exported, tokenizer.is_some(), &m.job.data));
    Ok(ExitCode::SUCCESS)
}

/// What the export says about its tokenizer: which token is BOS/EOS, or why there is none.
fn tokenizer_line(e: &hf::Exported, had_tokenizer: bool, data: &serde_json::Value) -> String {
    match (&e.eod, had_tokenizer) {
        (Some(eod), _) => format!("tokenizer: {} (id {}) is the BOS and EOS token", eod.token, eod.id),
        (None, true) => format!(
            "tokenizer: written, but it has no {} token: config.json has no bos/eos ids",
            gantry_sharding::prepare::DEFAULT_EOD
        ),
        (None, false) => {
            let kind = data["tokenizer"]["kind"].as_str().unwrap_or("unknown");
            format!(
                "no tokenizer: the checkpoint was trained on token ids (data tokenizer kind: {kind}), so no tokenizer \
                 files were written and config.json has no bos/eos ids"
            )
        }
    }
}

/// Tokenizer files an earlier export left in `out`: `AutoTokenizer` would load them as this
/// model's.
fn remove_stale_tokenizer(out: &Path) -> anyhow::Result<()> {
    for name in hf::TOKENIZER_FILES {
        let path = out.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {} left by an earlier export", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    Ok(())
}
