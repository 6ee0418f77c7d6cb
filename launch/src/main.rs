//! # gantry
//!
//! The single command-line entry point of gantry. It only wires crates together: argument
//! parsing (clap), logging, and the call into the library that does the work.
//!
//! # Layout
//! Each command's module is named for the command (`*_cmd.rs` where the plain name would be
//! another crate's or module's), so a module here is never mistaken for the crate it calls.
//! - `main.rs`: the command tree and logging set-up.
//! - `launch_cmd.rs`: `gantry launch JOB.toml --local N` (and the dispatch to the forms below);
//!   `rank_cmd.rs`: one rank process (`gantry rank`, or a Slurm task of `gantry launch`);
//!   `job_spec.rs`: a job spec resolved for its ranks (shared with `gantry submit`);
//!   `local_ranks.rs`: the one local rank supervisor (spawn, log tail, first failure) behind
//!   `--local`, `--nproc` and `gantry eval`; `torchrun.rs`: `gantry launch --nproc N -- CMD`;
//!   `slurm.rs`: the Slurm environment; `autoregister.rs`: checkpoints into the registry.
//! - `bench_cmd.rs`: `gantry bench collectives|nccl|checkpoint|cluster|startup|registry`: flags,
//!   spawning or joining local ranks, printing; the benchmarks are `gantry_bench`'s.
//! - `checkpoint_cmd.rs`: `gantry checkpoint list|inspect|verify|export`.
//! - `cluster.rs`: the cluster client commands (`submit`, `jobs`, `job`, `logs`, `cancel`,
//!   `workers`, `cordon`, `uncordon`, `drain`); `jobfile.rs` turns a job file into a request.
//! - `daemons.rs`: `gantry coordinator` and `gantry worker` (bind, then the crate's `serve`);
//!   `secrets.rs`: tokens from `--token`, `--token-file` or the environment.
//! - `registry_cmd.rs`: `gantry registry serve`; `models.rs`: `gantry models …` (its client);
//!   `model_loader.rs`: the registry's model loader (libtorch models with a KV cache);
//!   `eval_cmd.rs`: `gantry eval` (weights from the registry at any TP degree).
//! - `data.rs`: `gantry data prepare|synth|inspect|bench`.

mod autoregister;
mod bench_cmd;
mod checkpoint_cmd;
mod cluster;
mod daemons;
mod data;
mod dataset_location;
mod eval_cmd;
mod job_spec;
mod jobfile;
mod launch_cmd;
mod local_ranks;
mod model_loader;
mod models;
mod rank_cmd;
mod registry_cmd;
mod secrets;
mod slurm;
mod torchrun;

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
    Bench(bench_cmd::BenchCommand),
    /// Cancel a job: its ranks are stopped on every worker.
    Cancel(cluster::CancelArgs),
    /// Checkpoints: list, inspect, verify (re-read every checksum), export to safetensors.
    #[command(subcommand)]
    Checkpoint(checkpoint_cmd::CheckpointCommand),
    /// Run the coordinator daemon: worker registry, job queue, placement, restarts.
    Coordinator(daemons::CoordinatorArgs),
    /// Stop placing new ranks on a worker (running ranks continue).
    Cordon(cluster::ModeArgs),
    /// Token datasets: prepare (tokenize text), synthesize, upload to S3, inspect, benchmark the reader.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Drain a worker: no new ranks; shown as drained once its ranks are gone.
    Drain(cluster::ModeArgs),
    /// Evaluate a registered model (loss, perplexity) on a dataset's validation split at any
    /// TP degree, loading weights from the registry, and record the result on the version.
    Eval(eval_cmd::EvalArgs),
    /// One job: state, restarts, per-rank step and loss, stragglers, events.
    Job(cluster::JobArgs),
    /// List jobs.
    Jobs(cluster::JobsArgs),
    /// Run without a coordinator: train JOB.toml on N local ranks (--local N), run any command
    /// as N ranks with torchrun's environment (--nproc N -- CMD), or, under srun, be one rank.
    Launch(launch_cmd::LaunchArgs),
    /// Print (or --follow) a rank's log, read from the worker that runs it.
    Logs(cluster::LogsArgs),
    /// Submit a job file to the coordinator; prints the job id.
    Submit(cluster::SubmitArgs),
    /// Let a cordoned or draining worker take new ranks again.
    Uncordon(cluster::ModeArgs),
    /// The model registry from the command line: list, show, register, alias, download.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Run a worker daemon: registers this host's slots and GPUs, runs assigned ranks.
    Worker(daemons::WorkerArgs),
    /// Registered workers: liveness, mode, slots, GPUs, ranks, labels.
    Workers(cluster::WorkersArgs),
    /// The model registry service.
    #[command(subcommand)]
    Registry(registry_cmd::RegistryCommand),
    /// One rank process of a job (started by `gantry launch` or a worker; reads torchrun-style
    /// RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).
    #[command(hide = true)]
    Rank(rank_cmd::RankArgs),
}

/// A duration given in seconds on the command line: finite, positive, at most a day (a
/// `Duration` cannot hold `inf` or a negative number, and converting one panics).
pub(crate) fn flag_seconds(flag: &str, value: f64) -> anyhow::Result<std::time::Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
        anyhow::bail!("{flag} must be a number of seconds in (0, 86400], not {value}");
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Rank and daemon logs usually go to files: colour only on a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Coordinator(_) | Command::Worker(_) | Command::Registry(_)
    );
    // Rust ignores SIGPIPE, so `gantry data inspect DIR | head` would panic in println! once
    // the pipe closes; restore the default (exit quietly), as other Unix tools do. Not for
    // daemons: a peer that resets its connection (a client gone, a worker that gave up on a
    // call and reconnected) would make the next vectored socket write kill the daemon
    // silently; ignored, it is an EPIPE on that one connection. Nor for a rank: its output
    // goes to its launcher, not to `head`, and its peers, store, checkpoint server and
    // registry are sockets whose loss it must report (with the rank at fault), not die of.
    if !daemon && !matches!(cli.command, Command::Rank(_)) {
        // SAFETY: setting a signal disposition at start, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    daemons::prepare_logging(daemon);
    init_logging();
    let result = match cli.command {
        Command::Bench(cmd) => bench_cmd::run(cmd),
        Command::Cancel(args) => cluster::cancel(args),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(cmd),
        Command::Coordinator(args) => daemons::coordinator(args),
        Command::Cordon(args) => cluster::set_mode(args, gantry_coordinator::proto::WorkerMode::Cordoned),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Drain(args) => cluster::set_mode(args, gantry_coordinator::proto::WorkerMode::Draining),
        Command::Job(args) => cluster::job(args),
        Command::Jobs(args) => cluster::jobs(args),
        Command::Logs(args) => cluster::logs(args),
        Command::Submit(args) => cluster::submit(args),
        Command::Uncordon(args) => cluster::set_mode(args, gantry_coordinator::proto::WorkerMode::Active),
        Command::Worker(args) => daemons::worker(args),
        Command::Workers(args) => cluster::workers(args),
        Command::Data(cmd) => data::run(cmd),
        Command::Launch(args) => launch_cmd::launch(args),
        Command::Rank(args) => rank_cmd::rank(args),
        Command::Registry(cmd) => registry_cmd::run(cmd),
        Command::Models(cmd) => models::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One write: local ranks share their launcher's stderr, and `eprintln!` writes each
            // formatted piece on its own, so two ranks' messages interleaved mid-line. A pipe
            // keeps a write of up to 4 KiB whole.
            let line = format!("gantry: error: {}\n", error_chain(&*e));
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}

/// An error (anyhow's or a library's own) and its causes, `: `-separated like anyhow's `{:#}`, but without a cause whose text
/// the message so far already ends with: many of the libraries' errors name their source in
/// their own message (`{path}: {source}`) and also hand it on as the cause, which `{:#}` printed
/// twice (`…/manifest.json: No such file or directory (os error 2): No such file or directory
/// (os error 2)`).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// Like the libraries' `#[error("{path}: {source}")]` variants.
    #[derive(Debug)]
    struct Named {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for Named {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Named {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Named {
            path: "/d/manifest.json".into(),
            source: io(),
        });
        assert_eq!(error_chain(&*e), "/d/manifest.json: no such file");
        // Context above it keeps every level that adds something.
        let e = e.context("opening the dataset");
        assert_eq!(error_chain(&*e), "opening the dataset: /d/manifest.json: no such file");
        // A cause the message does not end with is printed, as `{:#}` does.
        let plain = anyhow::Error::new(io()).context("reading the spec");
        assert_eq!(error_chain(&*plain), format!("{plain:#}"));
        assert_eq!(error_chain(&*plain), "reading the spec: no such file");
    }
}
