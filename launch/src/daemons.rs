//! `gantry coordinator` and `gantry worker`: the two long-running daemons. Both log with
//! `tracing` (GANTRY_LOG=info by default here), stop cleanly on SIGINT/SIGTERM, and print one
//! line on stdout once they serve: the address, so scripts and tests can start them on
//! port 0. Both take the cluster token and an optional `/metrics` token from a flag, a file
//! or the environment (`secrets.rs`).
//!
//! Every daemon (these two and `gantry registry serve`) has one shape: check the config,
//! [`bind`] `--listen`, print the bound address, then the library's
//! `serve(listener, config, shutdown_signal())`, which returns once the daemon has stopped.

use crate::secrets::{ClusterTokenArgs, MetricsTokenArgs};
use anyhow::Context;
use clap::Args;
use gantry_coordinator::auth::TlsFiles;
use gantry_coordinator::core::SchedulerConfig;
use gantry_coordinator::server::{CoordinatorConfig, serve};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// gRPC (and /metrics) address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Directory of the durable state (created if missing); restart with the same one to
    /// pick up every worker and job.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// The cluster token that workers and clients must present.
    #[command(flatten)]
    pub token: ClusterTokenArgs,
    #[command(flatten)]
    pub metrics_token: MetricsTokenArgs,
    /// Worker heartbeat interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u32,
    /// A worker silent this long is lost and its jobs restart, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_deadline_s: f64,
    /// Flag ranks whose step time exceeds the job median by this factor.
    #[arg(long, default_value_t = 1.5)]
    pub straggler_factor: f64,
    /// TLS certificate (PEM); with --tls-key turns TLS on.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Print the listening address as JSON.
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Binds a daemon's `--listen` address (port 0 picks a free port; the caller prints the
/// bound one).
pub async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, not when the future is first polled: a daemon calls this before it
    // announces its address, so a SIGTERM that follows the announcement is always handled
    // (never the default action, which kills the process).
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the daemon still serves; it just cannot stop gracefully.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// Daemons log at info unless told otherwise; called by main before logging starts.
pub fn prepare_logging(is_daemon: bool) {
    if is_daemon && std::env::var_os("GANTRY_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: called before any thread is started.
        unsafe { std::env::set_var("GANTRY_LOG", "info") };
    }
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    if !(args.heartbeat_deadline_s.is_finite() && args.heartbeat_deadline_s > 0.0) {
        anyhow::bail!("--heartbeat-deadline-s must be a positive number of seconds");
    }
    let config = CoordinatorConfig {
        state_dir: args.state.clone(),
        token: args.token.get()?,
        metrics_token: args.metrics_token.get()?,
        tls: TlsFiles {
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            ..Default::default()
        },
        heartbeat_ms: args.heartbeat_ms,
        scheduler: SchedulerConfig {
            heartbeat_deadline_ms: (args.heartbeat_deadline_s * 1000.0) as u64,
            straggler_factor: args.straggler_factor,
            ..SchedulerConfig::default()
        },
    };
    config.validate()?;
    runtime()?.block_on(async {
        let shutdown = shutdown_signal();
        let listener = bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"address": addr.to_string(), "state": args.state})
            );
        } else {
            println!("listening on {addr}");
        }
        tracing::info!(address = %addr, state = %args.state.display(), "coordinator serving");
        serve(listener, config, async {
            shutdown.await;
            tracing::info!("coordinator stopping");
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator address (host:port, http://… or https://…).
    #[arg(long, env = "GANTRY_COORDINATOR")]
    pub coordinator: String,
    /// The cluster token (sent to the coordinator; required by this worker's log service).
    #[command(flatten)]
    pub token: ClusterTokenArgs,
    #[command(flatten)]
    pub metrics_token: MetricsTokenArgs,
    /// Worker name (default: the hostname); a restarted worker with the same name is the
    /// same worker.
    #[arg(long)]
    pub name: Option<String>,
    /// CPU rank slots (default: the number of CPUs).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Labels jobs can select on, e.g. `zone=a,gpu=h200`.
    #[arg(long, default_value = "")]
    pub labels: String,
    /// Where rank logs and run directories go.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Address of this worker's log service and /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Address other hosts reach this worker's ranks at (default: the local address that
    /// routes to the coordinator).
    #[arg(long)]
    pub advertise_address: Option<String>,
    /// Ports lent to jobs as MASTER_PORT, e.g. 29500-29999.
    #[arg(long, default_value = "29500-29999")]
    pub ports: String,
    /// Seconds between SIGTERM and SIGKILL when stopping a rank's process group.
    #[arg(long, default_value_t = 10.0)]
    pub grace_s: f64,
    /// CA certificate (PEM) of a TLS coordinator.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Name to expect in the coordinator's certificate.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Serve this worker's log service with TLS: certificate and key (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
}

fn parse_ports(s: &str) -> anyhow::Result<(u16, u16)> {
    let bad = || anyhow::anyhow!("--ports `{s}`: expected FIRST-LAST, e.g. 29500-29999");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    if !(args.grace_s.is_finite() && (0.0..=86_400.0).contains(&args.grace_s)) {
        anyhow::bail!("--grace-s must be a number of seconds in [0, 86400]");
    }
    let config = gantry_worker::WorkerConfig {
        coordinator: args.coordinator.clone(),
        token: args.token.get()?,
        metrics_token: args.metrics_token.get()?,
        tls: TlsFiles {
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            ca: args.tls_ca.clone(),
            domain: args.tls_domain.clone(),
        },
        name: args.name.clone(),
        slots: args.slots,
        labels: gantry_worker::parse_labels(&args.labels)?,
        advertise_address: args.advertise_address.clone(),
        state_dir: std::path::absolute(&args.state).unwrap_or(args.state.clone()),
        port_range: parse_ports(&args.ports)?,
        grace: Duration::from_secs_f64(args.grace_s),
        rank_program: std::env::current_exe().context("cannot find the gantry executable to start ranks")?,
        // Ranks start from this environment minus its secrets (gantry_worker::scrub).
        env: std::env::vars_os().collect(),
    };
    config.validate()?;
    runtime()?.block_on(async {
        let shutdown = shutdown_signal();
        let listener = bind(&args.listen).await?;
        println!("serving on {}", listener.local_addr()?);
        gantry_worker::serve(listener, config, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
