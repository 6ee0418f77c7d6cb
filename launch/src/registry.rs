//! `gantry registry serve`: the model registry's HTTP/JSON service (the routes and their
//! OpenAPI document live in `gantry_registry::http`).

use anyhow::Context;
use clap::{Args, Subcommand};
use gantry_registry::http::{ServeConfig, parse_token_file, start};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Serve the registry over HTTP: models, versions from verified committed checkpoints,
    /// aliases (weighted), eval records, file downloads with ranges and ETags;
    /// `GET /openapi.json` documents every route.
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
    /// Require a token for reads too.
    #[arg(long)]
    closed_reads: bool,
    /// Print the address as JSON.
    #[arg(long)]
    json: bool,
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
    let config = ServeConfig {
        listen: args.listen.clone(),
        db: args.db.clone(),
        tokens,
        open_reads: !args.closed_reads,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut running = start(config).await?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"address": running.addr.to_string(), "db": args.db})
            );
        } else {
            println!("listening on {}", running.addr);
        }
        tokio::select! {
            r = running.wait_ref() => return r.map_err(anyhow::Error::from),
            _ = crate::daemons::shutdown_signal() => {}
        }
        running.stop().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
