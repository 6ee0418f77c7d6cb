//! Protobuf ⇄ scheduler types. Everything a client sends is checked here, so the core only
//! ever sees well-formed values; a bad field becomes `InvalidArgument` naming it.

use crate::core::{self as c, Job, Scheduler, Worker};
use crate::job_secret::JobSecrets;
use crate::proto as p;
use tonic::Status;

/// Longest name or label accepted from a client.
const MAX_NAME: usize = 253;

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("`{field}`: {why}"))
}

fn check_name(field: &str, s: &str) -> Result<(), Status> {
    if s.is_empty() {
        return Err(invalid(field, "is empty"));
    }
    if s.len() > MAX_NAME || s.chars().any(|ch| ch.is_control()) {
        return Err(invalid(field, format!("must be 1–{MAX_NAME} printable characters")));
    }
    Ok(())
}

pub fn worker_info(r: Option<p::WorkerResources>) -> Result<c::WorkerInfo, Status> {
    let r = r.ok_or_else(|| invalid("resources", "missing"))?;
    check_name("resources.name", &r.name)?;
    if r.slots == 0 && r.gpus.is_empty() {
        return Err(invalid("resources.slots", "a worker needs at least one slot"));
    }
    if r.slots > 1 << 20 || r.gpus.len() > 1024 || r.labels.len() > 256 {
        return Err(invalid("resources", "too many slots, GPUs or labels"));
    }
    for (k, v) in &r.labels {
        check_name("resources.labels", k)?;
        if v.len() > MAX_NAME {
            return Err(invalid("resources.labels", format!("value of `{k}` is too long")));
        }
    }
    let port = |v: u32, field: &str| u16::try_from(v).map_err(|_| invalid(field, format!("{v} is not a port")));
    let (lo, hi) = (
        port(r.port_range_start, "port_range_start")?,
        port(r.port_range_end, "port_range_end")?,
    );
    let ports = match (lo, hi) {
        (0, 0) => (29500, 29999),
        (lo, hi) if lo > 0 && lo <= hi => (lo, hi),
        _ => return Err(invalid("port_range_start", format!("{lo}–{hi} is not a port range"))),
    };
    Ok(c::WorkerInfo {
        hostname: if r.hostname.is_empty() {
            r.name.clone()
        } else {
            r.hostname
        },
        address: if r.address.is_empty() {
            "127.0.0.1".into()
        } else {
            r.address
        },
        name: r.name,
        slots: r.slots,
        gpus: r
            .gpus
            .into_iter()
            .map(|g| c::Gpu {
                index: g.index,
                model: g.model,
                memory_bytes: g.memory_bytes,
            })
            .collect(),
        labels: r.labels.into_iter().collect(),
        service_address: r.service_address,
        ports,
    })
}

pub fn rank_report(r: p::RankReport) -> c::RankReport {
    let phase = match p::RankState::try_from(r.state).unwrap_or(p::RankState::Unspecified) {
        p::RankState::Running => c::RankPhase::Running { pid: r.pid },
        p::RankState::Exited => c::RankPhase::Exited {
            code: r.exit_code,
            signal: r.signal,
        },
        p::RankState::FailedToStart => c::RankPhase::FailedToStart {
            message: r.message.chars().take(2000).collect(),
        },
        p::RankState::Unspecified => c::RankPhase::Pending,
    };
    c::RankReport {
        job: r.job,
        attempt: r.attempt,
        rank: r.rank,
        phase,
        stats: r.stats.map(|s| c::RankStats {
            step: s.step,
            step_ms: finite(s.step_ms),
            tokens_per_s: finite(s.tokens_per_s),
            loss: finite(s.loss),
        }),
        blamed: r.blamed_rank,
    }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

pub fn job_request(r: Option<p::JobRequest>) -> Result<c::JobRequest, Status> {
    let r = r.ok_or_else(|| invalid("job", "missing"))?;
    let program = match r.program.and_then(|p| p.kind) {
        Some(p::job_program::Kind::TrainSpecToml(spec_toml)) => c::Program::Train { spec_toml },
        Some(p::job_program::Kind::Command(cmd)) => c::Program::Command {
            argv: cmd.argv,
            workdir: cmd.workdir,
        },
        None => return Err(invalid("job.program", "missing: give a training spec or a command")),
    };
    if r.name.len() > MAX_NAME {
        return Err(invalid("job.name", "too long"));
    }
    if r.env.len() > 1024 || r.labels.len() > 256 {
        return Err(invalid("job", "too many env variables or labels"));
    }
    for k in r.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid("job.env", format!("`{k}` is not a variable name")));
        }
    }
    Ok(c::JobRequest {
        name: r.name,
        program,
        dp: r.dp,
        tp: r.tp,
        pp: r.pp,
        gpus_per_rank: r.gpus_per_rank,
        max_restarts: r.max_restarts,
        elastic: r.elastic,
        min_dp: r.min_dp,
        priority: r.priority,
        queue: r.queue,
        labels: r.labels.into_iter().collect(),
        env: r.env.into_iter().collect(),
    })
}

fn program(p: &c::Program) -> p::JobProgram {
    let kind = match p {
        c::Program::Train { spec_toml } => p::job_program::Kind::TrainSpecToml(spec_toml.clone()),
        c::Program::Command { argv, workdir } => p::job_program::Kind::Command(p::CommandProgram {
            argv: argv.clone(),
            workdir: workdir.clone(),
        }),
    };
    p::JobProgram { kind: Some(kind) }
}

/// What a worker needs to start `rank` of `job`, this attempt's secret included.
pub fn assignment(job: &Job, rank: u32, secrets: &JobSecrets) -> p::RankAssignment {
    let slot = &job.placement[rank as usize];
    p::RankAssignment {
        job: job.id,
        attempt: job.attempt,
        rank,
        world_size: job.placement.len() as u32,
        local_rank: slot.local_rank,
        local_world_size: slot.local_world,
        master_addr: job.master_addr.clone(),
        master_port: job.master_port as u32,
        gpus: slot.gpus.clone(),
        program: Some(program(&job.request.program)),
        dp: job.dp,
        tp: job.request.tp,
        pp: job.request.pp,
        resume: job.attempt > 1,
        job_name: job.request.name.clone(),
        env: job.request.env.clone().into_iter().collect(),
        job_secret: secrets.for_attempt(job.id, job.attempt),
    }
}

pub fn desired(s: &Scheduler, worker: &str, secrets: &JobSecrets) -> Vec<p::RankAssignment> {
    s.desired(worker)
        .into_iter()
        .map(|(job, rank)| assignment(job, rank, secrets))
        .collect()
}

pub fn resources(i: &c::WorkerInfo) -> p::WorkerResources {
    p::WorkerResources {
        name: i.name.clone(),
        hostname: i.hostname.clone(),
        address: i.address.clone(),
        slots: i.slots,
        gpus: i
            .gpus
            .iter()
            .map(|g| p::Gpu {
                index: g.index,
                model: g.model.clone(),
                memory_bytes: g.memory_bytes,
            })
            .collect(),
        labels: i.labels.clone().into_iter().collect(),
        service_address: i.service_address.clone(),
        port_range_start: i.ports.0 as u32,
        port_range_end: i.ports.1 as u32,
    }
}

pub fn mode(m: c::WorkerMode) -> p::WorkerMode {
    match m {
        c::WorkerMode::Active => p::WorkerMode::Active,
        c::WorkerMode::Cordoned => p::WorkerMode::Cordoned,
        c::WorkerMode::Draining => p::WorkerMode::Draining,
    }
}

pub fn worker_view(s: &Scheduler, w: &Worker, now_ms: u64) -> p::WorkerView {
    let (used, ranks) = s.worker_load(&w.info.name);
    p::WorkerView {
        resources: Some(resources(&w.info)),
        mode: mode(w.mode) as i32,
        alive: w.alive,
        last_heartbeat_ms: w.last_heartbeat_ms,
        used_slots: used,
        ranks: ranks as u32,
        heartbeat_age_ms: now_ms.saturating_sub(w.last_heartbeat_ms) as f64,
    }
}

fn phase_name(ph: &c::RankPhase) -> String {
    match ph {
        c::RankPhase::Pending => "pending".into(),
        c::RankPhase::Running { .. } => "running".into(),
        c::RankPhase::Exited { code: Some(0), .. } => "succeeded".into(),
        c::RankPhase::Exited { signal: Some(s), .. } => format!("killed (signal {s})"),
        c::RankPhase::Exited { code: Some(code), .. } => format!("failed (exit {code})"),
        c::RankPhase::Exited { .. } => "exited".into(),
        c::RankPhase::FailedToStart { message } => format!("failed to start: {message}"),
    }
}

pub fn job_view(s: &Scheduler, j: &Job) -> p::JobView {
    let stragglers = s.stragglers(j);
    let (tp, pp) = (j.request.tp.max(1), j.request.pp.max(1));
    let ranks = j
        .placement
        .iter()
        .enumerate()
        .map(|(r, slot)| {
            let status = j.ranks.get(r);
            let r32 = r as u32;
            p::RankView {
                rank: r32,
                worker: slot.worker.clone(),
                local_rank: slot.local_rank,
                state: status.map_or("pending".into(), |st| phase_name(&st.phase)),
                pid: match status.map(|st| &st.phase) {
                    Some(c::RankPhase::Running { pid }) => *pid,
                    _ => 0,
                },
                stats: status.and_then(|st| st.stats.as_ref()).map(|st| p::RankStats {
                    step: st.step,
                    step_ms: st.step_ms,
                    tokens_per_s: st.tokens_per_s,
                    loss: st.loss,
                }),
                straggler: stragglers.get(r).copied().unwrap_or(false),
                worker_service: s
                    .worker(&slot.worker)
                    .map_or(String::new(), |w| w.info.service_address.clone()),
                dp_index: r32 / (tp * pp),
                pp_index: (r32 / tp) % pp,
                tp_index: r32 % tp,
            }
        })
        .collect();
    p::JobView {
        id: j.id,
        name: j.request.name.clone(),
        state: j.state.name().to_string(),
        attempt: j.attempt,
        restarts: j.restarts,
        max_restarts: j.request.max_restarts,
        dp: j.dp,
        tp: j.request.tp,
        pp: j.request.pp,
        submitted_ms: j.submitted_ms,
        finished_ms: j.finished_ms,
        ranks,
        events: j
            .events
            .iter()
            .map(|e| p::JobEvent {
                at_ms: e.at_ms,
                kind: e.kind.clone(),
                message: e.message.clone(),
            })
            .collect(),
        reason: j.reason.clone(),
        tokens_per_s: crate::metrics::job_tokens_per_s(j),
        priority: j.request.priority,
        elastic: j.request.elastic,
    }
}
