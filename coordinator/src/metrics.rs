//! Prometheus text exposition for the coordinator's `/metrics`: cluster gauges computed
//! from the scheduler's state at scrape time, plus counters and a heartbeat latency
//! histogram kept by the service.

use crate::core::{JobState, RankPhase, Scheduler, WorkerMode};
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
    /// Times no worker at all was heard for half a deadline (the coordinator cut off).
    pub isolations: u64,
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

/// The whole `/metrics` page: workers, jobs, the service's counters, the heartbeat histogram.
pub fn render(s: &Scheduler, c: &Counters) -> String {
    let mut out = String::new();
    render_workers(&mut out, s);
    render_jobs(&mut out, s);
    render_counters(&mut out, c);
    render_heartbeats(&mut out, c);
    out
}

/// A metric family's `# HELP` and `# TYPE` lines, which precede its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Workers by liveness, and those that take no new ranks by why.
fn render_workers(out: &mut String, s: &Scheduler) {
    let (mut alive, mut lost, mut cordoned, mut draining) = (0, 0, 0, 0);
    for w in s.workers() {
        if w.alive {
            alive += 1
        } else {
            lost += 1
        }
        match w.mode {
            WorkerMode::Cordoned => cordoned += 1,
            WorkerMode::Draining => draining += 1,
            WorkerMode::Active => {}
        }
    }
    let name = "gantry_coordinator_workers";
    family(out, name, "gauge", "Registered worker daemons by liveness.");
    let _ = writeln!(
        out,
        "{name}{{state=\"alive\"}} {alive}\n{name}{{state=\"lost\"}} {lost}"
    );
    let name = "gantry_coordinator_workers_unschedulable";
    family(out, name, "gauge", "Workers taking no new ranks.");
    let _ = writeln!(
        out,
        "{name}{{mode=\"cordoned\"}} {cordoned}\n{name}{{mode=\"draining\"}} {draining}"
    );
}

/// Jobs by state, the ranks running, and each running job's throughput.
fn render_jobs(out: &mut String, s: &Scheduler) {
    let states = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
    family(out, "gantry_coordinator_jobs", "gauge", "Jobs by state.");
    for st in states {
        let n = s.jobs().filter(|j| j.state == st).count();
        let _ = writeln!(out, "gantry_coordinator_jobs{{state=\"{}\"}} {n}", st.name());
    }
    let running = || s.jobs().filter(|j| j.state == JobState::Running);
    let running_ranks: usize = running()
        .map(|j| {
            j.ranks
                .iter()
                .filter(|r| matches!(r.phase, RankPhase::Running { .. }))
                .count()
        })
        .sum();
    let name = "gantry_coordinator_ranks_running";
    family(out, name, "gauge", "Rank processes reported running.");
    let _ = writeln!(out, "{name} {running_ranks}");
    let name = "gantry_coordinator_job_tokens_per_second";
    let help = "Training throughput of running jobs, as reported by their ranks.";
    family(out, name, "gauge", help);
    for j in running() {
        let tps = job_tokens_per_s(j);
        let _ = writeln!(
            out,
            "{name}{{job=\"{}\",name=\"{}\"}} {tps}",
            j.id,
            escape(&j.request.name)
        );
    }
}

/// The service's event counters.
fn render_counters(out: &mut String, c: &Counters) {
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
            "gantry_coordinator_isolations_total",
            "Times no worker at all was heard for half the heartbeat deadline (this coordinator cut off); nobody is declared lost meanwhile.",
            c.isolations,
        ),
        (
            "gantry_coordinator_registrations_total",
            "Worker registrations (including reconnects).",
            c.registrations,
        ),
        ("gantry_coordinator_submits_total", "Jobs accepted.", c.submits),
    ];
    for (name, help, v) in counters {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
}

/// The heartbeat handling histogram: cumulative buckets, then the sum and the count.
fn render_heartbeats(out: &mut String, c: &Counters) {
    let name = "gantry_coordinator_heartbeat_seconds";
    family(out, name, "histogram", "Time to handle one worker heartbeat.");
    for (b, bound) in c.heartbeat_buckets.iter().zip(BUCKETS) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {b}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", c.heartbeats);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", c.heartbeat_sum, c.heartbeats);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::SchedulerConfig;

    /// The page of an empty cluster, byte for byte: scrapers parse it, so its shape is pinned.
    #[test]
    fn an_empty_cluster_renders_every_family() {
        let mut c = Counters {
            submits: 2,
            restarts: 1,
            ..Counters::default()
        };
        c.observe_heartbeat(0.003);
        let page = render(&Scheduler::new(SchedulerConfig::default()), &c);
        let want = "\
# HELP gantry_coordinator_workers Registered worker daemons by liveness.
# TYPE gantry_coordinator_workers gauge
gantry_coordinator_workers{state=\"alive\"} 0
gantry_coordinator_workers{state=\"lost\"} 0
# HELP gantry_coordinator_workers_unschedulable Workers taking no new ranks.
# TYPE gantry_coordinator_workers_unschedulable gauge
gantry_coordinator_workers_unschedulable{mode=\"cordoned\"} 0
gantry_coordinator_workers_unschedulable{mode=\"draining\"} 0
# HELP gantry_coordinator_jobs Jobs by state.
# TYPE gantry_coordinator_jobs gauge
gantry_coordinator_jobs{state=\"queued\"} 0
gantry_coordinator_jobs{state=\"running\"} 0
gantry_coordinator_jobs{state=\"succeeded\"} 0
gantry_coordinator_jobs{state=\"failed\"} 0
gantry_coordinator_jobs{state=\"cancelled\"} 0
# HELP gantry_coordinator_ranks_running Rank processes reported running.
# TYPE gantry_coordinator_ranks_running gauge
gantry_coordinator_ranks_running 0
# HELP gantry_coordinator_job_tokens_per_second Training throughput of running jobs, as reported by their ranks.
# TYPE gantry_coordinator_job_tokens_per_second gauge
# HELP gantry_coordinator_restarts_total Job restarts after a failure.
# TYPE gantry_coordinator_restarts_total counter
gantry_coordinator_restarts_total 1
# HELP gantry_coordinator_workers_lost_total Workers declared lost (missed heartbeats).
# TYPE gantry_coordinator_workers_lost_total counter
gantry_coordinator_workers_lost_total 0
# HELP gantry_coordinator_workers_suspected_total Workers suspected because a peer reported their rank failed (no new ranks until heard from).
# TYPE gantry_coordinator_workers_suspected_total counter
gantry_coordinator_workers_suspected_total 0
# HELP gantry_coordinator_isolations_total Times no worker at all was heard for half the heartbeat deadline (this coordinator cut off); nobody is declared lost meanwhile.
# TYPE gantry_coordinator_isolations_total counter
gantry_coordinator_isolations_total 0
# HELP gantry_coordinator_registrations_total Worker registrations (including reconnects).
# TYPE gantry_coordinator_registrations_total counter
gantry_coordinator_registrations_total 0
# HELP gantry_coordinator_submits_total Jobs accepted.
# TYPE gantry_coordinator_submits_total counter
gantry_coordinator_submits_total 2
# HELP gantry_coordinator_heartbeat_seconds Time to handle one worker heartbeat.
# TYPE gantry_coordinator_heartbeat_seconds histogram
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.0001\"} 0
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.00025\"} 0
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.0005\"} 0
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.001\"} 0
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.0025\"} 0
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.005\"} 1
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.01\"} 1
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.025\"} 1
gantry_coordinator_heartbeat_seconds_bucket{le=\"0.1\"} 1
gantry_coordinator_heartbeat_seconds_bucket{le=\"1\"} 1
gantry_coordinator_heartbeat_seconds_bucket{le=\"+Inf\"} 1
gantry_coordinator_heartbeat_seconds_sum 0.003
gantry_coordinator_heartbeat_seconds_count 1
";
        assert_eq!(page, want);
    }
}
