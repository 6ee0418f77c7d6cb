//! `gantry bench cluster`: control-plane scale. A real coordinator process and many simulated
//! workers (lightweight clients in this process) heartbeating; heartbeat latency p50/p99, the
//! coordinator's CPU, and the time to place and assign a very large job.

use crate::daemons::{Harness, TOKEN};
use crate::error::{BenchError, Result};
use crate::{host, stats};
use futures::StreamExt;
use gantry_coordinator::auth::{AddToken, TlsFiles, channel};
use gantry_coordinator::core::placement::{self, Capacity, Shape};
use gantry_coordinator::proto as p;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The settings of `gantry bench cluster`.
#[derive(Clone, Debug)]
pub struct ClusterBenchConfig {
    /// Simulated workers (lightweight clients in this process).
    pub workers: usize,
    /// Rank slots per simulated worker.
    pub slots: u32,
    /// Heartbeat interval of every simulated worker, milliseconds.
    pub heartbeat_ms: u64,
    /// Seconds of heartbeats to measure, before and again after placing the big job.
    pub seconds: f64,
    /// HTTP/2 connections the simulated workers share.
    pub connections: usize,
    /// Ranks of the job to place (needs workers × slots of capacity).
    pub ranks: u64,
}

impl Default for ClusterBenchConfig {
    fn default() -> Self {
        ClusterBenchConfig {
            workers: 10_000,
            slots: 10,
            heartbeat_ms: 1000,
            seconds: 10.0,
            connections: 16,
            ranks: 100_000,
        }
    }
}

impl ClusterBenchConfig {
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 || self.connections == 0 || self.slots == 0 || self.heartbeat_ms == 0 {
            return Err(BenchError::setting(
                "--workers, --slots, --connections and --heartbeat-ms",
                "must be positive",
            ));
        }
        let capacity = self.workers as u64 * self.slots as u64;
        if self.ranks > capacity {
            return Err(BenchError::setting(
                "--ranks",
                format!("{} is more than --workers × --slots = {capacity}", self.ranks),
            ));
        }
        Ok(())
    }
}

type Cluster = p::cluster_client::ClusterClient<InterceptedService<Channel, AddToken>>;

/// Heartbeats of every simulated worker over one measuring period.
#[derive(Clone, Debug)]
pub struct Phase {
    pub heartbeats: usize,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: usize,
    /// The coordinator's CPU over the period, in cores.
    pub coordinator_cpu: f64,
}

impl Phase {
    fn to_json(&self) -> serde_json::Value {
        json!({"heartbeats": self.heartbeats, "per_s": self.per_s, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
               "max_ms": self.max_ms, "errors": self.errors, "coordinator_cpu_cores": self.coordinator_cpu})
    }

    fn text_line(&self, what: &str) -> String {
        format!(
            "  {what:<28} {:>7} heartbeats ({:>6.0}/s)  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  errors {}  coordinator CPU {:.0}% of a core",
            self.heartbeats,
            self.per_s,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.errors,
            100.0 * self.coordinator_cpu
        )
    }
}

/// Everything `gantry bench cluster` reports.
#[derive(Clone, Debug)]
pub struct ClusterReport {
    pub config: ClusterBenchConfig,
    pub register_s: f64,
    pub idle: Phase,
    pub submit_ms: f64,
    /// `placement::place` alone for the job (median of 5).
    pub placement_ms: f64,
    /// The same for TP 8 on 8-slot workers (one TP group per node).
    pub placement_tp8_ms: f64,
    pub with_job: Phase,
}

impl ClusterReport {
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        json!({
            "workers": c.workers, "slots": c.slots, "heartbeat_ms": c.heartbeat_ms,
            "connections": c.connections, "register_s": self.register_s,
            "idle": self.idle.to_json(), "ranks": c.ranks, "submit_ms": self.submit_ms,
            "placement_ms": self.placement_ms, "placement_tp8_ms": self.placement_tp8_ms,
            "with_job": self.with_job.to_json(),
        })
    }

    pub fn text_lines(&self) -> Vec<String> {
        let c = &self.config;
        vec![
            format!(
                "control plane: {} simulated workers × {} slots, one heartbeat each every {} ms over {} HTTP/2 connections (clients share this machine's cores)",
                c.workers, c.slots, c.heartbeat_ms, c.connections
            ),
            format!("  registered all workers in {:.2} s", self.register_s),
            self.idle.text_line("idle cluster:"),
            format!(
                "  {}-rank job: submit RPC {:.0} ms (placement, rank assignment, durable commit); placement alone {:.1} ms (tp 8 on {} 8-slot workers: {:.1} ms)",
                c.ranks,
                self.submit_ms,
                self.placement_ms,
                c.ranks.div_ceil(8),
                self.placement_tp8_ms
            ),
            self.with_job.text_line(&format!("with the {}-rank job:", c.ranks)),
        ]
    }
}

/// Every simulated worker heartbeats every `every` for `seconds`, starting at a random
/// offset so the load is spread like a real fleet's.
async fn heartbeat_phase(clients: &[Cluster], names: &[String], every: Duration, seconds: f64, pid: u32) -> Phase {
    let cpu0 = host::cpu_seconds(pid);
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
                let beat = p::HeartbeatRequest {
                    worker: name.clone(),
                    ranks: Vec::new(),
                };
                match client.heartbeat(beat).await {
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
    let cpu = match (cpu0, host::cpu_seconds(pid)) {
        (Some(a), Some(b)) => (b - a) / wall,
        _ => f64::NAN,
    };
    Phase {
        heartbeats: all.len(),
        per_s: all.len() as f64 / wall,
        p50_ms: stats::quantile_rounded(&all, 0.5),
        p99_ms: stats::quantile_rounded(&all, 0.99),
        max_ms: all.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
        errors,
        coordinator_cpu: cpu,
    }
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
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let placed = placement::place(&caps, &shape);
            let dt = t.elapsed().as_secs_f64() * 1e3;
            assert!(placed.is_some_and(|p| p.len() as u64 == ranks), "placement must fit");
            dt
        })
        .collect();
    stats::quantile_rounded(&times, 0.5)
}

/// One HTTP/2 connection per client, connected up front.
async fn connect(addr: &str, connections: usize) -> Result<Vec<Cluster>> {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let ch = gantry_coordinator::auth::endpoint(addr, &TlsFiles::default())?
            .connect()
            .await?;
        clients.push(p::cluster_client::ClusterClient::with_interceptor(
            ch,
            AddToken::new(TOKEN)?,
        ));
    }
    Ok(clients)
}

/// Register every simulated worker, 256 at a time; seconds taken.
async fn register_all(clients: &[Cluster], names: &[String], slots: u32) -> Result<f64> {
    let t = Instant::now();
    let registered: Vec<Result<(), tonic::Status>> = futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let mut c = clients[i % clients.len()].clone();
            let resources = p::WorkerResources {
                name: name.clone(),
                hostname: name.clone(),
                address: "127.0.0.1".into(),
                slots,
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
    if let Some(Err(status)) = registered.into_iter().find(|r| r.is_err()) {
        return Err(BenchError::Rpc {
            call: "registering simulated workers",
            status,
        });
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Submit a `ranks`-rank job that needs placing; milliseconds of the submit RPC.
async fn submit_big_job(addr: &str, ranks: u64) -> Result<f64> {
    let mut admin =
        p::admin_client::AdminClient::with_interceptor(channel(addr, &TlsFiles::default())?, AddToken::new(TOKEN)?);
    let job = p::JobRequest {
        name: "placement-bench".into(),
        program: Some(p::JobProgram {
            kind: Some(p::job_program::Kind::Command(p::CommandProgram {
                argv: vec!["true".into()],
                workdir: String::new(),
            })),
        }),
        dp: ranks as u32,
        tp: 1,
        pp: 1,
        queue: true,
        ..Default::default()
    };
    let t = Instant::now();
    let reply = admin
        .submit(p::SubmitRequest { job: Some(job) })
        .await
        .map_err(|status| BenchError::Rpc { call: "submit", status })?
        .into_inner();
    let submit_ms = t.elapsed().as_secs_f64() * 1e3;
    if reply.state != "running" {
        return Err(BenchError::Harness(format!(
            "the {ranks}-rank job was not placed (state {})",
            reply.state
        )));
    }
    Ok(submit_ms)
}

/// Run `gantry bench cluster`: a coordinator process of `harness.gantry`, simulated workers
/// registered and heartbeating idle, a big job placed, heartbeats again; then placement alone.
pub fn run(config: &ClusterBenchConfig, harness: &Harness) -> Result<ClusterReport> {
    config.validate()?;
    let dir = harness.scratch("cluster")?;
    let (daemon, addr) = harness.start_coordinator(&dir.join("state"), config.heartbeat_ms, 60.0)?;
    let pid = daemon.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Harness(format!("cannot start a tokio runtime: {e}")))?;
    let measured = rt.block_on(async {
        let clients = connect(&addr, config.connections).await?;
        let names: Vec<String> = (0..config.workers).map(|i| format!("sim-{i:06}")).collect();
        let register_s = register_all(&clients, &names, config.slots).await?;
        let every = Duration::from_millis(config.heartbeat_ms);
        let idle = heartbeat_phase(&clients, &names, every, config.seconds, pid).await;
        let submit_ms = submit_big_job(&addr, config.ranks).await?;
        let loaded = heartbeat_phase(&clients, &names, every, config.seconds, pid).await;
        Ok::<_, BenchError>((register_s, idle, submit_ms, loaded))
    });
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    let (register_s, idle, submit_ms, with_job) = measured?;
    let ranks = config.ranks;
    Ok(ClusterReport {
        config: config.clone(),
        register_s,
        idle,
        submit_ms,
        placement_ms: placement_alone(config.workers, config.slots, ranks, 1),
        // TP 8 on 8-slot nodes: one TP group per node.
        placement_tp8_ms: placement_alone(ranks.div_ceil(8) as usize, 8, ranks.div_ceil(8) * 8, 8),
        with_job,
    })
}
