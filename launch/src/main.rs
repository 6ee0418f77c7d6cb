//! # gantry
//!
//! The single command-line entry point of gantry. It only wires crates together: argument
//! parsing (clap), logging, and the call into the library that does the work.
//!
//! # Layout
//! - `main.rs`: the command tree and logging set-up.
//! - `bench.rs`: `gantry bench collectives` (spawns local ranks or joins via env) and
//!   `gantry bench nccl` (the NCCL device self test).
//! - `checkpoint.rs`: `gantry checkpoint list|inspect|verify|export`.
//! - `data.rs`: `gantry data prepare|synth|inspect|bench`.
//! - `train.rs`: `gantry launch JOB.toml --local N` and `gantry rank` (one rank process).

mod bench;
mod bench_checkpoint;
mod checkpoint;
mod data;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// gantry: a distributed training runtime (collectives, sharded data, checkpoints, registry).
#[derive(Parser)]
#[command(name = "gantry", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks that print figures (never pass/fail on speed).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Checkpoints: list, inspect, verify (re-read every checksum), export to safetensors.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCommand),
    /// Token datasets: prepare (tokenize text), synthesize, inspect, benchmark the reader.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a job on this host: spawn N rank processes, follow them, summarize.
    Launch(train::LaunchArgs),
    /// One rank process of a job (started by `gantry launch` or a worker; reads torchrun-style
    /// RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).
    #[command(hide = true)]
    Rank(train::RankArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `gantry data inspect DIR | head` would panic in println! once
    // the pipe closes; restore the default (exit quietly), as other Unix tools do.
    // SAFETY: setting a signal disposition at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Checkpoint(cmd) => checkpoint::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Launch(args) => train::launch(args),
        Command::Rank(args) => train::rank(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gantry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
