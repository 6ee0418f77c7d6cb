//! The worker's Prometheus metrics: plain atomics updated by the daemon loop and the
//! supervisor, rendered in the text exposition format by `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the heartbeat latency histogram buckets.
const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Success,
    /// Non-zero exit code, or a signal the worker did not send.
    Failure,
    /// The worker stopped it.
    Killed,
}

#[derive(Debug, Default)]
pub struct Metrics {
    ranks_running: AtomicU64,
    rank_starts: AtomicU64,
    rank_start_failures: AtomicU64,
    exits_success: AtomicU64,
    exits_failure: AtomicU64,
    exits_killed: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_failures: AtomicU64,
    connected: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn set_ranks_running(&self, n: usize) {
        self.ranks_running.store(n as u64, Relaxed);
    }

    pub fn rank_started(&self) {
        self.rank_starts.fetch_add(1, Relaxed);
    }

    pub fn rank_failed_to_start(&self) {
        self.rank_start_failures.fetch_add(1, Relaxed);
    }

    pub fn rank_exited(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Success => &self.exits_success,
            Outcome::Failure => &self.exits_failure,
            Outcome::Killed => &self.exits_killed,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A heartbeat answered after `latency`.
    pub fn heartbeat_ok(&self, latency: Duration) {
        self.heartbeats.fetch_add(1, Relaxed);
        let secs = latency.as_secs_f64();
        // Buckets are cumulative in the exposition; store per-bucket counts, sum on render.
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(latency.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn heartbeat_failed(&self) {
        self.heartbeat_failures.fetch_add(1, Relaxed);
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(u64::from(connected), Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut scalar = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        scalar(
            "gantry_worker_ranks_running",
            "gauge",
            "Rank processes alive on this worker.",
            self.ranks_running.load(Relaxed),
        );
        scalar(
            "gantry_worker_rank_starts_total",
            "counter",
            "Rank processes started.",
            self.rank_starts.load(Relaxed),
        );
        scalar(
            "gantry_worker_rank_start_failures_total",
            "counter",
            "Rank processes that could not be started.",
            self.rank_start_failures.load(Relaxed),
        );
        scalar(
            "gantry_worker_heartbeats_total",
            "counter",
            "Heartbeats answered by the coordinator.",
            self.heartbeats.load(Relaxed),
        );
        scalar(
            "gantry_worker_heartbeat_failures_total",
            "counter",
            "Register and heartbeat calls that failed.",
            self.heartbeat_failures.load(Relaxed),
        );
        scalar(
            "gantry_worker_connected",
            "gauge",
            "1 while the coordinator answers, else 0.",
            self.connected.load(Relaxed),
        );

        let name = "gantry_worker_rank_exits_total";
        let _ = writeln!(
            out,
            "# HELP {name} Rank processes that ended, by outcome.\n# TYPE {name} counter"
        );
        for (outcome, counter) in [
            ("success", &self.exits_success),
            ("failure", &self.exits_failure),
            ("killed", &self.exits_killed),
        ] {
            let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {}", counter.load(Relaxed));
        }

        let name = "gantry_worker_heartbeat_latency_seconds";
        let _ = writeln!(out, "# HELP {name} Heartbeat round-trip time.\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.latency_sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::new();
        m.set_ranks_running(2);
        m.rank_started();
        m.rank_exited(Outcome::Killed);
        m.heartbeat_ok(Duration::from_millis(3));
        m.heartbeat_ok(Duration::from_secs(10));
        m.set_connected(true);
        let text = m.render();
        for line in [
            "gantry_worker_ranks_running 2",
            "gantry_worker_rank_starts_total 1",
            "gantry_worker_rank_exits_total{outcome=\"killed\"} 1",
            "gantry_worker_rank_exits_total{outcome=\"success\"} 0",
            "gantry_worker_heartbeats_total 2",
            "gantry_worker_heartbeat_failures_total 0",
            "gantry_worker_connected 1",
            "gantry_worker_heartbeat_latency_seconds_bucket{le=\"0.001\"} 0",
            "gantry_worker_heartbeat_latency_seconds_bucket{le=\"0.005\"} 1",
            "gantry_worker_heartbeat_latency_seconds_bucket{le=\"5\"} 1",
            "gantry_worker_heartbeat_latency_seconds_bucket{le=\"+Inf\"} 2",
            "gantry_worker_heartbeat_latency_seconds_sum 10.003",
            "gantry_worker_heartbeat_latency_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }
}
