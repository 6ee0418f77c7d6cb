//! `gantry bench cluster` (control-plane scale with simulated workers) and `gantry bench
//! startup` (time from `gantry submit` to every rank's first training step).
//!
//! Both start real daemons (`gantry coordinator`, `gantry worker`) as child processes on
//! loopback with throwaway state directories, so the figures include gRPC, the token check,
//! the durable store and process start-up, exactly as a user's cluster pays them.

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use gantry_coordinator::auth::{AddToken, TlsFiles, channel};
use gantry_coordinator::core::placement::{self, Capacity, Shape};
use gantry_coordinator::proto as p;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "bench-token";

#[derive(Args)]
pub struct ClusterBenchArgs {
    /// Simulated workers (lightweight clients in this process).
    #[arg(long, default_value_t = 10_000)]
    workers: usize,
    /// Rank slots per simulated worker.
    #[arg(long, default_value_t = 10)]
    slots: u32,
    /// Heartbeat interval of every simulated worker, milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Seconds of heartbeats to measure, before and again after placing the big job.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// HTTP/2 connections the simulated workers share.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Ranks of the job to place (needs workers × slots of capacity).
    #[arg(long, default_value_t = 100_000)]
    ranks: u64,
    #[arg(long)]
    json: bool,
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scratch(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("gantry-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

/// Start `gantry coordinator` on port 0; returns it and its address.
fn start_coordinator(state: &Path, heartbeat_ms: u64, deadline_s: f64) -> anyhow::Result<(Daemon, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--token", TOKEN])
        .args([
            "--heartbeat-ms",
            &heartbeat_ms.to_string(),
            "--heartbeat-deadline-s",
            &deadline_s.to_string(),
        ])
        .arg("--state")
        .arg(state)
        .env("GANTRY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the coordinator")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("coordinator stdout")?).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("listening on ").map(str::to_string);
    let daemon = Daemon(child);
    let addr = addr.with_context(|| format!("the coordinator did not start: `{}`", line.trim()))?;
    Ok((daemon, addr))
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

type Cluster = p::cluster_client::ClusterClient<InterceptedService<Channel, AddToken>>;

struct Phase {
    heartbeats: usize,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    coordinator_cpu: f64,
}

/// Every simulated worker heartbeats every `every` for `seconds`, starting at a random
/// offset so the load is spread like a real fleet's.
async fn heartbeat_phase(clients: &[Cluster], names: &[String], every: Duration, seconds: f64, pid: u32) -> Phase {
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        let name = name.clone();
        let offset = every.mul_f64((i as f64 * 0.618_033_988_7).fract());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if Instant::now() >= until {
                    break;
                }
                let t = Instant::now();
                match client
                    .heartbeat(p::HeartbeatRequest {
                        worker: name.clone(),
                        ranks: Vec::new(),
                    })
                    .await
                {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu_seconds(pid)) {
        (Some(a), Some(b)) => (b - a) / wall,
        _ => f64::NAN,
    };
    all.sort_by(f64::total_cmp);
    Phase {
        heartbeats: all.len(),
        per_s: all.len() as f64 / wall,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        errors,
        coordinator_cpu: cpu,
    }
}

fn phase_json(p: &Phase) -> serde_json::Value {
    json!({"heartbeats": p.heartbeats, "per_s": p.per_s, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms,
           "max_ms": p.max_ms, "errors": p.errors, "coordinator_cpu_cores": p.coordinator_cpu})
}

fn print_phase(what: &str, p: &Phase) {
    println!(
        "  {what:<28} {:>7} heartbeats ({:>6.0}/s)  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  errors {}  coordinator CPU {:.0}% of a core",
        p.heartbeats,
        p.per_s,
        p.p50_ms,
        p.p99_ms,
        p.max_ms,
        p.errors,
        100.0 * p.coordinator_cpu
    );
}

/// Time `placement::place` alone for `ranks` ranks over `workers` × `slots` (median of 5).
fn placement_alone(workers: usize, slots: u32, ranks: u64, tp: u32) -> f64 {
    let labels = BTreeMap::new();
    let names: Vec<String> = (0..workers).map(|i| format!("sim-{i:06}")).collect();
    let caps: Vec<Capacity> = names
        .iter()
        .map(|n| Capacity {
            name: n,
            free_slots: slots,
            free_gpus: Vec::new(),
            labels: &labels,
        })
        .collect();
    let shape = Shape {
        world: ranks,
        tp,
        gpus_per_rank: 0,
        labels: &labels,
    };
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let placed = placement::place(&caps, &shape);
            let dt = t.elapsed().as_secs_f64() * 1e3;
            assert!(placed.is_some_and(|p| p.len() as u64 == ranks), "placement must fit");
            dt
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

pub fn cluster(args: ClusterBenchArgs) -> anyhow::Result<ExitCode> {
    if args.workers == 0 || args.connections == 0 || args.slots == 0 || args.heartbeat_ms == 0 {
        bail!("--workers, --slots, --connections and --heartbeat-ms must be positive");
    }
    if args.ranks > args.workers as u64 * args.slots as u64 {
        bail!(
            "--ranks {} is more than --workers × --slots = {}",
            args.ranks,
            args.workers as u64 * args.slots as u64
        );
    }
    let dir = scratch("cluster")?;
    let (daemon, addr) = start_coordinator(&dir.join("state"), args.heartbeat_ms, 60.0)?;
    let pid = daemon.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..args.connections {
            // One HTTP/2 connection per channel, connected up front.
            let ch = gantry_coordinator::auth::endpoint(&addr, &TlsFiles::default())?
                .connect()
                .await?;
            clients.push(p::cluster_client::ClusterClient::with_interceptor(
                ch,
                AddToken::new(TOKEN)?,
            ));
        }
        let names: Vec<String> = (0..args.workers).map(|i| format!("sim-{i:06}")).collect();
        let t = Instant::now();
        let registered: Vec<Result<(), tonic::Status>> = futures::stream::iter(names.iter().enumerate())
            .map(|(i, name)| {
                let mut c = clients[i % clients.len()].clone();
                let resources = p::WorkerResources {
                    name: name.clone(),
                    hostname: name.clone(),
                    address: "127.0.0.1".into(),
                    slots: args.slots,
                    ..Default::default()
                };
                async move {
                    c.register(p::RegisterRequest {
                        resources: Some(resources),
                        ranks: vec![],
                    })
                    .await
                    .map(|_| ())
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        if let Some(Err(e)) = registered.iter().find(|r| r.is_err()) {
            bail!("registering simulated workers: {e}");
        }
        let register_s = t.elapsed().as_secs_f64();
        let every = Duration::from_millis(args.heartbeat_ms);
        let idle = heartbeat_phase(&clients, &names, every, args.seconds, pid).await;

        let mut admin = p::admin_client::AdminClient::with_interceptor(
            channel(&addr, &TlsFiles::default())?,
            AddToken::new(TOKEN)?,
        );
        let job = p::JobRequest {
            name: "placement-bench".into(),
            program: Some(p::JobProgram {
                kind: Some(p::job_program::Kind::Command(p::CommandProgram {
                    argv: vec!["true".into()],
                    workdir: String::new(),
                })),
            }),
            dp: args.ranks as u32,
            tp: 1,
            pp: 1,
            queue: true,
            ..Default::default()
        };
        let t = Instant::now();
        let reply = admin.submit(p::SubmitRequest { job: Some(job) }).await?.into_inner();
        let submit_ms = t.elapsed().as_secs_f64() * 1e3;
        if reply.state != "running" {
            bail!("the {}-rank job was not placed (state {})", args.ranks, reply.state);
        }
        let loaded = heartbeat_phase(&clients, &names, every, args.seconds, pid).await;
        Ok((register_s, idle, submit_ms, loaded))
    });
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    let (register_s, idle, submit_ms, loaded) = report?;
    let alone_ms = placement_alone(args.workers, args.slots, args.ranks, 1);
    // TP 8 on 8-slot nodes: one TP group per node.
    let alone_tp8_ms = placement_alone(args.ranks.div_ceil(8) as usize, 8, args.ranks.div_ceil(8) * 8, 8);
    if args.json {
        println!(
            "{}",
            json!({
                "workers": args.workers, "slots": args.slots, "heartbeat_ms": args.heartbeat_ms,
                "connections": args.connections, "register_s": register_s,
                "idle": phase_json(&idle), "ranks": args.ranks, "submit_ms": submit_ms,
                "placement_ms": alone_ms, "placement_tp8_ms": alone_tp8_ms,
                "with_job": phase_json(&loaded),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "control plane: {} simulated workers × {} slots, one heartbeat each every {} ms over {} HTTP/2 connections (clients share this machine's cores)",
        args.workers, args.slots, args.heartbeat_ms, args.connections
    );
    println!("  registered all workers in {register_s:.2} s");
    print_phase("idle cluster:", &idle);
    println!(
        "  {}-rank job: submit RPC {submit_ms:.0} ms (placement, rank assignment, durable commit); placement alone {alone_ms:.1} ms (tp 8 on {} 8-slot workers: {alone_tp8_ms:.1} ms)",
        args.ranks,
        args.ranks.div_ceil(8)
    );
    print_phase(&format!("with the {}-rank job:", args.ranks), &loaded);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct StartupBenchArgs {
    /// Ranks of the job (one worker with this many slots).
    #[arg(long, default_value_t = 4)]
    nproc: u32,
    /// Jobs to time (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long)]
    json: bool,
}

const STARTUP_SPEC: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 16
[train]
steps = 3
global_batch = 8
micro_batch = 1
threads = 1
"#;

/// Submit → every rank has finished its first training step (the ranks' progress files).
pub fn startup(args: StartupBenchArgs) -> anyhow::Result<ExitCode> {
    if args.nproc == 0 || args.repeat == 0 {
        bail!("--nproc and --repeat must be positive");
    }
    let exe = std::env::current_exe()?;
    let dir = scratch("startup")?;
    let data = dir.join("data");
    let out = Command::new(&exe)
        .args(["data", "synth", "--tokens", "100000", "--seed", "1", "--output"])
        .arg(&data)
        .output()?;
    if !out.status.success() {
        bail!("data synth failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let spec = dir.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "{STARTUP_SPEC}[parallel]\ndp = {}\n[data]\npath = \"{}\"\n",
            args.nproc,
            data.display()
        ),
    )?;
    let (coordinator, addr) = start_coordinator(&dir.join("coordinator"), 100, 10.0)?;
    let worker_state = dir.join("worker");
    let worker = Daemon(
        Command::new(&exe)
            .args(["worker", "--coordinator", &addr, "--token", TOKEN, "--name", "bench"])
            .args(["--slots", &args.nproc.to_string()])
            .arg("--state")
            .arg(&worker_state)
            .env("GANTRY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let client = |cmd: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(&exe)
            .args(cmd)
            .env("GANTRY_COORDINATOR", &addr)
            .env("GANTRY_TOKEN", TOKEN)
            .output()?)
    };
    // Wait for the worker to register.
    let t = Instant::now();
    loop {
        let o = client(&["workers", "--json"])?;
        if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"alive\":true") {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the worker did not register");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let t0 = Instant::now();
        let o = client(&["submit", spec.to_str().context("path")?, "--json"])?;
        if !o.status.success() {
            bail!("submit failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let id = v["job"].as_u64().context("job id")?;
        let run = worker_state.join(format!("jobs/{id}/attempt-1"));
        let job_failed = |id: u64| -> anyhow::Result<bool> {
            let o = client(&["job", &id.to_string(), "--json"])?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            Ok(v["state"] == "failed")
        };
        let mut polls = 0u64;
        loop {
            let stepped = (0..args.nproc).all(|r| {
                std::fs::read(run.join(format!("rank-{r}.progress.json")))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s >= 1)
            });
            if stepped {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) || (polls % 100 == 99 && job_failed(id)?) {
                bail!("job {id} did not reach its first step; see {}", run.display());
            }
            polls += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(t0.elapsed().as_secs_f64());
        // Let the job finish before the next one (one worker, all slots).
        let t = Instant::now();
        while !String::from_utf8_lossy(&client(&["job", &id.to_string(), "--json"])?.stdout).contains("\"succeeded\"") {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("job {id} did not finish");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(worker);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    if args.json {
        println!(
            "{}",
            json!({"nproc": args.nproc, "submit_to_first_step_s": times, "median_s": median})
        );
    } else {
        println!(
            "gantry submit → every rank's first training step, {} ranks on one worker: median {median:.2} s of {:?}",
            args.nproc,
            times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
        );
    }
    Ok(ExitCode::SUCCESS)
}
