//! Prometheus text exposition for the coordinator's `/metrics`: cluster gauges computed
//! from the scheduler's state at scrape time, plus counters and a heartbeat latency
//! histogram kept by the service.

use crate::core::{JobState, RankPhase, Scheduler};
use std::fmt::Write;

/// Upper bounds (seconds) of the heartbeat handling histogram.
const BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

#[derive(Default)]
pub struct Counters {
    pub heartbeats: u64,
    pub registrations: u64,
    pub submits: u64,
    pub restarts: u64,
    pub workers_lost: u64,
    pub workers_suspected: u64,
    heartbeat_buckets: [u64; BUCKETS.len()],
    heartbeat_sum: f64,
}

impl Counters {
    pub fn observe_heartbeat(&mut self, seconds: f64) {
        self.heartbeats += 1;
        self.heartbeat_sum += seconds;
        for (b, bound) in self.heartbeat_buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *b += 1;
            }
        }
    }
}

pub fn render(s: &Scheduler, c: &Counters) -> String {
    let mut out = String::new();
    let (mut alive, mut lost, mut cordoned, mut draining) = (0, 0, 0, 0);
    for w in s.workers() {
        if w.alive {
            alive += 1
        } else {
            lost += 1
        }
        match w.mode {
            crate::core::WorkerMode::Cordoned => cordoned += 1,
            crate::core::WorkerMode::Draining => draining += 1,
            crate::core::WorkerMode::Active => {}
        }
    }
    let _ = writeln!(
        out,
        "# HELP gantry_coordinator_workers Registered worker daemons by liveness."
    );
    let _ = writeln!(out, "# TYPE gantry_coordinator_workers gauge");
    let _ = writeln!(out, "gantry_coordinator_workers{{state=\"alive\"}} {alive}");
    let _ = writeln!(out, "gantry_coordinator_workers{{state=\"lost\"}} {lost}");
    let _ = writeln!(
        out,
        "# HELP gantry_coordinator_workers_unschedulable Workers taking no new ranks."
    );
    let _ = writeln!(out, "# TYPE gantry_coordinator_workers_unschedulable gauge");
    let _ = writeln!(
        out,
        "gantry_coordinator_workers_unschedulable{{mode=\"cordoned\"}} {cordoned}"
    );
    let _ = writeln!(
        out,
        "gantry_coordinator_workers_unschedulable{{mode=\"draining\"}} {draining}"
    );
    let states = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
    let _ = writeln!(out, "# HELP gantry_coordinator_jobs Jobs by state.");
    let _ = writeln!(out, "# TYPE gantry_coordinator_jobs gauge");
    for st in states {
        let n = s.jobs().filter(|j| j.state == st).count();
        let _ = writeln!(out, "gantry_coordinator_jobs{{state=\"{}\"}} {n}", st.name());
    }
    let running_ranks: usize = s
        .jobs()
        .filter(|j| j.state == JobState::Running)
        .map(|j| {
            j.ranks
                .iter()
                .filter(|r| matches!(r.phase, RankPhase::Running { .. }))
                .count()
        })
        .sum();
    let _ = writeln!(
        out,
        "# HELP gantry_coordinator_ranks_running Rank processes reported running."
    );
    let _ = writeln!(out, "# TYPE gantry_coordinator_ranks_running gauge");
    let _ = writeln!(out, "gantry_coordinator_ranks_running {running_ranks}");
    let _ = writeln!(
        out,
        "# HELP gantry_coordinator_job_tokens_per_second Training throughput of running jobs, as reported by their ranks."
    );
    let _ = writeln!(out, "# TYPE gantry_coordinator_job_tokens_per_second gauge");
    for j in s.jobs().filter(|j| j.state == JobState::Running) {
        let tps = job_tokens_per_s(j);
        let _ = writeln!(
            out,
            "gantry_coordinator_job_tokens_per_second{{job=\"{}\",name=\"{}\"}} {tps}",
            j.id,
            escape(&j.request.name)
        );
    }
    let counters = [
        (
            "gantry_coordinator_restarts_total",
            "Job restarts after a failure.",
            c.restarts,
        ),
        (
            "gantry_coordinator_workers_lost_total",
            "Workers declared lost (missed heartbeats).",
            c.workers_lost,
        ),
        (
            "gantry_coordinator_workers_suspected_total",
            "Workers suspected because a peer reported their rank failed (no new ranks until heard from).",
            c.workers_suspected,
        ),
        (
            "gantry_coordinator_registrations_total",
            "Worker registrations (including reconnects).",
            c.registrations,
        ),
        ("gantry_coordinator_submits_total", "Jobs accepted.", c.submits),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let name = "gantry_coordinator_heartbeat_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to handle one worker heartbeat.\n# TYPE {name} histogram"
    );
    for (b, bound) in c.heartbeat_buckets.iter().zip(BUCKETS) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {b}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", c.heartbeats);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", c.heartbeat_sum, c.heartbeats);
    out
}

/// Tokens per second of a job. Every rank reports the job's global throughput (global batch
/// tokens over its step time) and the ranks run in lockstep, so the freshest, largest
/// report is the job's figure.
pub fn job_tokens_per_s(j: &crate::core::Job) -> f64 {
    j.ranks
        .iter()
        .filter_map(|r| r.stats.as_ref().map(|s| s.tokens_per_s))
        .fold(0.0, f64::max)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
