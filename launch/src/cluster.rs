//! The cluster client commands: `submit`, `jobs`, `job`, `logs`, `cancel`, `workers`,
//! `cordon`, `uncordon`, `drain`. Each is one or two gRPC calls to the coordinator (logs go
//! to the worker that ran the rank), printed as a table or, with `--json`, as JSON.

use crate::secrets::ClusterTokenArgs;
use anyhow::{Context, bail};
use clap::Args;
use gantry_coordinator::auth::{AddToken, TlsFiles, channel};
use gantry_coordinator::proto as p;
use p::admin_client::AdminClient;
use p::worker_logs_client::WorkerLogsClient;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How to reach the coordinator (shared by every client command).
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Coordinator address: host:port, http://… or https://…
    #[arg(long, env = "GANTRY_COORDINATOR", default_value = "127.0.0.1:7070")]
    pub coordinator: String,
    /// The cluster token (the one the coordinator was started with).
    #[command(flatten)]
    pub token: ClusterTokenArgs,
    /// CA certificate (PEM) to verify a TLS coordinator; turns TLS on.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Server name to expect in the coordinator's certificate (default: the host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

type Admin = AdminClient<InterceptedService<Channel, AddToken>>;

impl ClientArgs {
    fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls_ca.clone(),
            domain: self.tls_domain.clone(),
            ..Default::default()
        }
    }

    fn admin(&self) -> anyhow::Result<Admin> {
        let ch = channel(&self.coordinator, &self.tls())?;
        Ok(AdminClient::with_interceptor(ch, AddToken::new(&self.token.get()?)?))
    }

    fn logs_client(&self, addr: &str) -> anyhow::Result<LogClient> {
        let ch = channel(addr, &self.tls())?;
        Ok(WorkerLogsClient::with_interceptor(
            ch,
            AddToken::new(&self.token.get()?)?,
        ))
    }
}

/// A gRPC error as a user should read it.
fn rpc(e: tonic::Status, what: &str, coordinator: &str) -> anyhow::Error {
    match e.code() {
        tonic::Code::Unavailable => {
            anyhow::anyhow!("{what}: cannot reach the coordinator at {coordinator}: {}", e.message())
        }
        tonic::Code::Unauthenticated => anyhow::anyhow!("{what}: {} (coordinator {coordinator})", e.message()),
        _ => anyhow::anyhow!("{what}: {}", e.message()),
    }
}

/// One admin RPC, blocking, with its error in the user's words.
fn admin_call<T, F, Fut>(client: &ClientArgs, what: &str, call: F) -> anyhow::Result<T>
where
    F: FnOnce(Admin) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    runtime()?.block_on(async {
        let admin = client.admin()?;
        call(admin)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| rpc(e, what, &client.coordinator))
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[derive(Args)]
pub struct SubmitArgs {
    /// Job file: a training spec (as for `gantry launch`) or a command job; both may have a
    /// [cluster] section (max_restarts, elastic, min_dp, priority, queue, labels, gpus_per_rank).
    pub job: PathBuf,
    /// Override a training spec value (repeatable), e.g. `--set train.steps=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// For an s3:// dataset: the most it may take in each host's data cache, in GB (same as
    /// `--set data.cache_gb=GB`; default: no budget).
    #[arg(long, value_name = "GB")]
    pub data_cache_gb: Option<f64>,
    /// Job name (default: the file's `name`, else its file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Restart after a failure up to this many times (overrides [cluster] max_restarts).
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// Restart with fewer data-parallel replicas when the full job no longer fits.
    #[arg(long)]
    pub elastic: bool,
    /// Higher runs first.
    #[arg(long)]
    pub priority: Option<i32>,
    /// Fail now instead of waiting in the queue when the job does not fit.
    #[arg(long)]
    pub no_queue: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let overrides = crate::jobfile::SubmitOverrides {
        spec_overrides: args.overrides.clone(),
        data_cache_gb: args.data_cache_gb,
        max_restarts: args.max_restarts,
        elastic: args.elastic,
        priority: args.priority,
        no_queue: args.no_queue,
        name: args.name.clone(),
    };
    let job = crate::jobfile::load(&args.job, &overrides)?;
    let (name, world) = (job.name.clone(), job.dp.saturating_mul(job.tp).saturating_mul(job.pp));
    let what = format!("submit {}", args.job.display());
    let r = admin_call(&args.client, &what, |mut a| async move {
        a.submit(p::SubmitRequest { job: Some(job) }).await
    })?;
    if args.client.json {
        println!(
            "{}",
            json!({"job": r.job, "name": name, "state": r.state, "ranks": world})
        );
    } else {
        println!("{}", r.job);
        eprintln!("gantry: submitted job {} `{name}` ({world} ranks): {}", r.job, r.state);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let jobs = admin_call(&args.client, "list jobs", |mut a| async move {
        a.list_jobs(p::ListJobsRequest {}).await
    })?
    .jobs;
    if args.client.json {
        println!("{}", Value::Array(jobs.iter().map(job_json).collect()));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>5}  {:<24} {:<10} {:>5} {:>8} {:>12}",
        "ID", "NAME", "STATE", "RANKS", "RESTARTS", "TOKENS/S"
    );
    for j in &jobs {
        println!(
            "{:>5}  {:<24} {:<10} {:>5} {:>8} {:>12.0}",
            j.id,
            j.name,
            j.state,
            j.dp.saturating_mul(j.tp).saturating_mul(j.pp),
            j.restarts,
            j.tokens_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct JobArgs {
    /// Job id (from `gantry submit` or `gantry jobs`).
    pub id: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn rank_json(r: &p::RankView) -> Value {
    json!({
        "rank": r.rank, "worker": r.worker, "local_rank": r.local_rank, "state": r.state, "pid": r.pid,
        "dp": r.dp_index, "pp": r.pp_index, "tp": r.tp_index,
        "step": r.stats.as_ref().map(|s| s.step),
        "step_ms": r.stats.as_ref().map(|s| s.step_ms),
        "tokens_per_s": r.stats.as_ref().map(|s| s.tokens_per_s),
        "loss": r.stats.as_ref().map(|s| s.loss),
        "straggler": r.straggler,
    })
}

pub fn job_json(j: &p::JobView) -> Value {
    json!({
        "id": j.id, "name": j.name, "state": j.state, "reason": j.reason,
        "attempt": j.attempt, "restarts": j.restarts, "max_restarts": j.max_restarts,
        "dp": j.dp, "tp": j.tp, "pp": j.pp, "elastic": j.elastic, "priority": j.priority,
        "submitted_ms": j.submitted_ms, "finished_ms": j.finished_ms, "tokens_per_s": j.tokens_per_s,
        "ranks": j.ranks.iter().map(rank_json).collect::<Vec<_>>(),
        "stragglers": j.ranks.iter().filter(|r| r.straggler).map(|r| r.rank).collect::<Vec<_>>(),
        "events": j.events.iter().map(|e| json!({"at_ms": e.at_ms, "kind": e.kind, "message": e.message})).collect::<Vec<_>>(),
    })
}

async fn get_job(client: &ClientArgs, id: u64) -> anyhow::Result<p::JobView> {
    let mut admin = client.admin()?;
    Ok(admin
        .get_job(p::GetJobRequest { job: id })
        .await
        .map_err(|e| rpc(e, &format!("job {id}"), &client.coordinator))?
        .into_inner())
}

pub fn job(args: JobArgs) -> anyhow::Result<ExitCode> {
    let j = runtime()?.block_on(get_job(&args.client, args.id))?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "job {} `{}`: {}{}",
        j.id,
        j.name,
        j.state,
        if j.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", j.reason)
        }
    );
    println!(
        "  layout dp {} × tp {} × pp {}{}, attempt {}, restarts {}/{}, {:.0} tokens/s",
        j.dp,
        j.tp,
        j.pp,
        if j.elastic { " (elastic)" } else { "" },
        j.attempt,
        j.restarts,
        j.max_restarts,
        j.tokens_per_s
    );
    if !j.ranks.is_empty() {
        println!(
            "  {:>4}  {:<16} {:<22} {:>7} {:>9} {:>10}",
            "RANK", "WORKER", "STATE", "STEP", "STEP MS", "LOSS"
        );
        for r in &j.ranks {
            let (step, ms, loss) = r
                .stats
                .as_ref()
                .map_or((String::new(), String::new(), String::new()), |s| {
                    (
                        s.step.to_string(),
                        format!("{:.1}", s.step_ms),
                        format!("{:.4}", s.loss),
                    )
                });
            println!(
                "  {:>4}  {:<16} {:<22} {:>7} {:>9} {:>10}{}",
                r.rank,
                r.worker,
                r.state,
                step,
                ms,
                loss,
                if r.straggler { "  STRAGGLER" } else { "" }
            );
        }
    }
    println!("  events:");
    for e in &j.events {
        println!("    {}  {:<10} {}", format_ms(e.at_ms), e.kind, e.message);
    }
    Ok(ExitCode::SUCCESS)
}

fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03} UTC", ms % 1000)
}

#[derive(Args)]
pub struct LogsArgs {
    /// Job id.
    pub id: u64,
    /// Which rank (default 0).
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Attempt (default: the latest the rank's worker ran).
    #[arg(long)]
    pub attempt: Option<u32>,
    /// Keep printing as the rank writes, until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The rank's entry in the job and a log client for the worker that runs (or ran) it.
async fn locate(args: &LogsArgs) -> anyhow::Result<(p::RankView, LogClient)> {
    let job = get_job(&args.client, args.id).await?;
    let Some(rank) = job.ranks.iter().find(|r| r.rank == args.rank) else {
        let why = if job.ranks.is_empty() {
            "; it has not been placed yet"
        } else {
            ""
        };
        bail!(
            "job {} has no rank {} (it has {} ranks{why})",
            args.id,
            args.rank,
            job.ranks.len()
        );
    };
    if rank.worker_service.is_empty() {
        bail!(
            "worker {} of job {} rank {} serves no logs",
            rank.worker,
            args.id,
            args.rank
        );
    }
    let client = args.client.logs_client(&rank.worker_service)?;
    Ok((rank.clone(), client))
}

type LogClient = WorkerLogsClient<InterceptedService<Channel, AddToken>>;

pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let (mut rank, mut client) = locate(&args).await?;
        let mut out = std::io::stdout().lock();
        let mut offset = 0;
        // Which attempt is being printed: the one asked for, else the latest on first read.
        let mut attempt = args.attempt.unwrap_or(0);
        loop {
            let request = p::ReadLogRequest {
                job: args.id,
                rank: args.rank,
                attempt,
                offset,
                max_bytes: 1 << 20,
            };
            let reply = match client.read_log(request).await {
                Ok(r) => r.into_inner(),
                // A restarted rank's log appears when the worker starts it.
                Err(e) if args.follow && e.code() == tonic::Code::NotFound => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Err(e) => bail!(
                    "logs of job {} rank {} from worker {} ({}): {}",
                    args.id,
                    args.rank,
                    rank.worker,
                    rank.worker_service,
                    e.message()
                ),
            };
            attempt = reply.attempt;
            out.write_all(&reply.data)?;
            out.flush()?;
            let got = reply.next_offset > offset;
            offset = reply.next_offset;
            if got {
                continue;
            }
            if !args.follow {
                break;
            }
            if !reply.running {
                // The coordinator may be restarting; a follower waits for it.
                let Ok(job) = get_job(&args.client, args.id).await else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                if args.attempt.is_none() && job.state == "running" && job.attempt > attempt {
                    // The job restarted: follow the rank into its new attempt, wherever it runs.
                    writeln!(
                        out,
                        "--- gantry: job {} restarted, attempt {} ---",
                        args.id, job.attempt
                    )?;
                    (rank, client) = locate(&args).await?;
                    (attempt, offset) = (job.attempt, 0);
                    continue;
                }
                if job.state != "running" && job.state != "queued" {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args)]
pub struct CancelArgs {
    /// Job id.
    pub id: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let request = p::CancelJobRequest { job: args.id };
    let reply = admin_call(&args.client, &format!("cancel job {}", args.id), |mut a| async move {
        a.cancel_job(request).await
    })?;
    let job = reply.job.context("the coordinator returned no job")?;
    if args.client.json {
        println!("{}", job_json(&job));
    } else {
        println!("job {} `{}`: {}", job.id, job.name, job.state);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

fn mode_name(m: i32) -> &'static str {
    match p::WorkerMode::try_from(m) {
        Ok(p::WorkerMode::Active) => "active",
        Ok(p::WorkerMode::Cordoned) => "cordoned",
        Ok(p::WorkerMode::Draining) => "draining",
        Err(_) => "unknown",
    }
}

fn worker_json(w: &p::WorkerView) -> Value {
    let r = w.resources.clone().unwrap_or_default();
    json!({
        "name": r.name, "hostname": r.hostname, "address": r.address, "service_address": r.service_address,
        "slots": r.slots, "used_slots": w.used_slots, "ranks": w.ranks,
        "gpus": r.gpus.iter().map(|g| json!({"index": g.index, "model": g.model, "memory_bytes": g.memory_bytes})).collect::<Vec<_>>(),
        "labels": r.labels, "mode": mode_name(w.mode), "alive": w.alive,
        "heartbeat_age_ms": w.heartbeat_age_ms,
    })
}

pub fn workers(args: WorkersArgs) -> anyhow::Result<ExitCode> {
    let workers = admin_call(&args.client, "list workers", |mut a| async move {
        a.list_workers(p::ListWorkersRequest {}).await
    })?
    .workers;
    if args.client.json {
        println!("{}", Value::Array(workers.iter().map(worker_json).collect()));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<8} {:<9} {:>9} {:>5} {:>6}  LABELS",
        "NAME", "STATE", "MODE", "SLOTS", "GPUS", "RANKS"
    );
    for w in &workers {
        let r = w.resources.clone().unwrap_or_default();
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mode = match (mode_name(w.mode), w.ranks) {
            ("draining", 0) => "drained",
            (m, _) => m,
        };
        println!(
            "{:<20} {:<8} {:<9} {:>9} {:>5} {:>6}  {}",
            r.name,
            if w.alive { "alive" } else { "lost" },
            mode,
            format!("{}/{}", w.used_slots, r.slots),
            r.gpus.len(),
            w.ranks,
            labels.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ModeArgs {
    /// Worker name (see `gantry workers`).
    pub worker: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn set_mode(args: ModeArgs, mode: p::WorkerMode) -> anyhow::Result<ExitCode> {
    let request = p::SetWorkerModeRequest {
        worker: args.worker.clone(),
        mode: mode as i32,
    };
    let reply = admin_call(&args.client, &format!("worker {}", args.worker), |mut a| async move {
        a.set_worker_mode(request).await
    })?;
    let w = reply.worker.context("the coordinator returned no worker")?;
    if args.client.json {
        println!("{}", worker_json(&w));
    } else {
        println!(
            "worker {}: {} ({} ranks running)",
            args.worker,
            mode_name(w.mode),
            w.ranks
        );
    }
    Ok(ExitCode::SUCCESS)
}
