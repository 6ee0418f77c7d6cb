//! The scheduler core's data: workers, job requests, jobs, events in and actions out.
//! Plain serde structs; the gRPC shell converts to and from protobuf, the state store
//! persists them as JSON.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type JobId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
}

/// What a worker daemon declares when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub hostname: String,
    /// Where other hosts reach its ranks (MASTER_ADDR when it hosts rank 0).
    pub address: String,
    pub slots: u32,
    pub gpus: Vec<Gpu>,
    pub labels: BTreeMap<String, String>,
    /// host:port of its log service and /metrics.
    pub service_address: String,
    /// Inclusive range of ports it lends as MASTER_PORT.
    pub ports: (u16, u16),
}

impl WorkerInfo {
    /// A CPU worker with `slots` slots (tests and simulations).
    pub fn cpu(name: &str, slots: u32) -> WorkerInfo {
        WorkerInfo {
            name: name.to_string(),
            hostname: name.to_string(),
            address: "127.0.0.1".to_string(),
            slots,
            gpus: Vec::new(),
            labels: BTreeMap::new(),
            service_address: String::new(),
            ports: (29500, 29999),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerMode {
    Active,
    /// No new ranks; running ones continue.
    Cordoned,
    /// No new ranks; drained once its ranks are gone.
    Draining,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub info: WorkerInfo,
    pub mode: WorkerMode,
    pub alive: bool,
    /// Milliseconds on the scheduler's clock; not persisted meaningfully (a restarted
    /// coordinator gives every worker a fresh deadline).
    pub last_heartbeat_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// A gantry training job: the resolved spec each rank runs with `gantry rank`.
    Train { spec_toml: String },
    /// Any program, started with torchrun-compatible environment variables.
    Command { argv: Vec<String>, workdir: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    pub name: String,
    pub program: Program,
    pub dp: u32,
    pub tp: u32,
    pub pp: u32,
    /// 0 for CPU ranks.
    pub gpus_per_rank: u32,
    pub max_restarts: u32,
    /// After a failure, restart with fewer data-parallel replicas when the full job no
    /// longer fits (never below `min_dp`; the new dp divides the requested one so the global
    /// batch still splits evenly).
    pub elastic: bool,
    pub min_dp: u32,
    pub priority: i32,
    /// Wait for capacity (true) or be refused at submit when it does not fit now (false).
    pub queue: bool,
    /// Only workers carrying all these labels.
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

impl JobRequest {
    /// A CPU command job of `dp` ranks (tests and simulations).
    pub fn command(name: &str, dp: u32) -> JobRequest {
        JobRequest {
            name: name.to_string(),
            program: Program::Command {
                argv: vec!["true".into()],
                workdir: String::new(),
            },
            dp,
            tp: 1,
            pp: 1,
            gpus_per_rank: 0,
            max_restarts: 0,
            elastic: false,
            min_dp: 1,
            priority: 0,
            queue: true,
            labels: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    pub fn world(&self) -> u64 {
        self.dp as u64 * self.tp as u64 * self.pp as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Where one rank of the current attempt runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankSlot {
    pub worker: String,
    pub local_rank: u32,
    pub local_world: u32,
    pub gpus: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RankPhase {
    /// Assigned; the worker has not reported it yet.
    Pending,
    Running {
        pid: u32,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    FailedToStart {
        message: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankStats {
    pub step: u64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub loss: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankStatus {
    pub phase: RankPhase,
    pub stats: Option<RankStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at_ms: u64,
    pub kind: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub request: JobRequest,
    pub state: JobState,
    /// Why it failed or was cancelled.
    pub reason: String,
    /// 1 for the first start; each restart adds one. 0 while never started.
    pub attempt: u32,
    pub restarts: u32,
    /// Data-parallel degree of the current (or next) attempt.
    pub dp: u32,
    /// Rank r of the current attempt runs at `placement[r]`; empty while queued.
    pub placement: Vec<RankSlot>,
    pub master_addr: String,
    pub master_port: u16,
    pub ranks: Vec<RankStatus>,
    pub events: Vec<JobEvent>,
    pub submitted_ms: u64,
    pub finished_ms: u64,
}

impl Job {
    pub fn world(&self) -> usize {
        (self.dp * self.request.tp * self.request.pp) as usize
    }
}

/// A worker's account of one rank process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    pub job: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub phase: RankPhase,
    pub stats: Option<RankStats>,
    /// For a failed rank: the peer rank its last error names as the one that failed (a
    /// closed connection, a peer that stopped responding). The worker reads it from the
    /// rank's log; it is a claim to check, not a verdict.
    #[serde(default)]
    pub blamed: Option<u32>,
}

/// What the scheduler decided; the shell logs them, counts them in metrics, and the
/// workers learn the new desired state on their next heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    StartRanks {
        worker: String,
        job: JobId,
        attempt: u32,
        ranks: Vec<u32>,
    },
    StopRanks {
        worker: String,
        job: JobId,
        attempt: u32,
    },
    MarkWorkerLost {
        worker: String,
        silent_ms: u64,
    },
    /// No worker heard for `silent_ms` while `alive` were expected: the coordinator takes
    /// itself to be cut off and declares nobody lost until workers are heard again.
    Isolated {
        silent_ms: u64,
        alive: usize,
    },
    /// `worker` was the first heard after an isolation of `silent_ms`: every live worker's
    /// silence is credited that much.
    HeardAgain {
        worker: String,
        silent_ms: u64,
    },
    /// A failed rank of `job` named `rank`, which runs on `worker`, as failed: no new ranks
    /// go to `worker` until it is heard from or declared lost.
    SuspectWorker {
        worker: String,
        job: JobId,
        rank: u32,
    },
    /// A suspected worker was heard from again and is placeable.
    ClearSuspicion {
        worker: String,
    },
    /// A job got its ranks: attempt `attempt` runs with `dp` data-parallel replicas.
    PlaceJob {
        job: JobId,
        attempt: u32,
        dp: u32,
    },
    /// An attempt failed and the job goes back to the queue for restart number `restart`.
    RestartJob {
        job: JobId,
        restart: u32,
        reason: String,
    },
    FinishJob {
        job: JobId,
        state: JobState,
        reason: String,
    },
}

/// Why a submission was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("job `{name}` needs {needed} ranks ({what}) but {reason}; set `queue = true` to wait for capacity")]
    DoesNotFit {
        name: String,
        needed: u64,
        what: String,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no job {0}")]
    UnknownJob(JobId),
    #[error("no worker named `{0}`")]
    UnknownWorker(String),
}
