//! Training across hosts: a coordinator and two worker daemons, each on a host of its own
//! (network namespaces from `gantry-testkit`, each with its own address and host name), run a
//! dp 2 × tp 2 job with two ranks per host. Placement keeps each TP group inside a host
//! (shared memory) while the DP all-reduces cross hosts (TCP), and every step's loss equals a
//! one-host `gantry launch --local 4` run of the same layout. Skipped with one line where this
//! machine cannot make namespaces (failing instead when `CI=true`).

mod common;

use common::{GANTRY, text};
use gantry_testkit::netns::{Cluster, Host, HostProcess, start_or_skip};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "netns-cluster-token";
const COORDINATOR_PORT: u16 = 7070;

const SPEC: &str = r#"
name = "netns"
[model]
arch = "gpt2"
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 32
[parallel]
dp = 2
tp = 2
timeout_s = 120
[optim]
lr = 3e-3
warmup_steps = 5
[train]
steps = 20
global_batch = 8
micro_batch = 2
eval_every = 10
eval_batches = 2
threads = 1
[cluster]
max_restarts = 0
"#;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The daemons of the test, each inside its host; killed (with their ranks) on drop.
struct Daemons {
    _coordinator: HostProcess,
    _workers: Vec<HostProcess>,
    head: Host,
    coordinator: String,
}

impl Daemons {
    fn start(cluster: &Cluster, dir: &Path) -> Daemons {
        let head = cluster.host("head").unwrap().clone();
        let coordinator = format!("{}:{COORDINATOR_PORT}", head.addr());
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = head.command(GANTRY);
        cmd.args(["coordinator", "--listen", &coordinator, "--token", TOKEN])
            .args(["--heartbeat-ms", "200", "--heartbeat-deadline-s", "10", "--state"])
            .arg(dir.join("coordinator-state"))
            .stdout(Stdio::null())
            .stderr(log("coordinator"));
        let coordinator_process = HostProcess::spawn(&mut cmd).unwrap();
        let workers = ["n1", "n2"]
            .iter()
            .map(|name| {
                let host = cluster.host(name).unwrap();
                // No --advertise-address: a worker finds its host's address by the route
                // towards the coordinator, and its ranks advertise that address too.
                let mut cmd = host.command(GANTRY);
                cmd.args([
                    "worker",
                    "--coordinator",
                    &coordinator,
                    "--token",
                    TOKEN,
                    "--name",
                    name,
                ])
                .args(["--slots", "2", "--grace-s", "2", "--ports", "29500-29524", "--state"])
                .arg(dir.join(format!("worker-{name}")))
                .stdout(Stdio::null())
                .stderr(log(&format!("worker-{name}")));
                HostProcess::spawn(&mut cmd).unwrap()
            })
            .collect();
        Daemons {
            _coordinator: coordinator_process,
            _workers: workers,
            head,
            coordinator,
        }
    }

    /// The CLI, run on the head host.
    fn cli(&self, args: &[&str]) -> Output {
        self.head
            .command(GANTRY)
            .args(args)
            .env("GANTRY_COORDINATOR", &self.coordinator)
            .env("GANTRY_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(&[args, &["--json"]].concat());
        assert!(out.status.success(), "gantry {args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gantry {args:?}: {e}: {}", text(&out)))
    }

    fn wait_for(&self, what: &str, dir: &Path, limit: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; logs in {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Every step's loss from a run directory's `metrics.jsonl`.
fn losses(run: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.join("metrics.jsonl").display()));
    metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[test]
fn dp2_tp2_over_two_hosts_matches_one_host() {
    let Some(cluster) = start_or_skip("dp2_tp2_over_two_hosts", &["head", "n1", "n2"], ci()) else {
        return;
    };
    let dir = common::tempdir("netns", "train");
    let spec = common::synth_job(&dir, SPEC, 60_000, 5);

    // The one-host reference: same spec, same layout, four ranks on this host.
    let reference = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "4", "--json", "--run-dir"])
        .arg(dir.join("reference"))
        .output()
        .unwrap();
    assert!(reference.status.success(), "reference run: {}", text(&reference));
    let want = losses(&dir.join("reference"));
    assert_eq!(want.len(), 20, "reference steps");

    let daemons = Daemons::start(&cluster, &dir);
    // The coordinator may not be listening yet: a failed call is "not yet", not a failure.
    daemons.wait_for("both workers alive", &dir, Duration::from_secs(60), |d| {
        let out = d.cli(&["workers", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|w| w.as_array().map(|w| w.iter().filter(|w| w["alive"] == true).count()))
                == Some(2)
    });
    // Each worker registered with its own host's name and address.
    let workers = daemons.json(&["workers"]);
    for w in workers.as_array().unwrap() {
        let host = cluster.host(w["name"].as_str().unwrap()).unwrap();
        assert_eq!(w["hostname"], host.hostname(), "{w:#}");
        assert_eq!(w["address"], host.addr().to_string(), "{w:#}");
    }

    let submitted = daemons.json(&["submit", spec.to_str().unwrap()]);
    let id = submitted["job"].as_u64().unwrap().to_string();
    let mut job = Value::Null;
    daemons.wait_for("the job to end", &dir, Duration::from_secs(600), |d| {
        job = d.json(&["job", &id]);
        ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or(""))
    });
    assert_eq!(job["state"], "succeeded", "{job:#}\nlogs in {}", dir.display());

    // TP pairs (ranks 0,1 and 2,3) each on one host, the two DP replicas on different hosts.
    let worker_of = |rank: usize| job["ranks"][rank]["worker"].as_str().unwrap().to_string();
    assert_eq!(worker_of(0), worker_of(1), "{job:#}");
    assert_eq!(worker_of(2), worker_of(3), "{job:#}");
    assert_ne!(worker_of(0), worker_of(2), "{job:#}");

    // Rank 0 (dp 0, tp 0 of the last stage) writes the metrics on its worker.
    let run = dir.join(format!("worker-{}/jobs/{id}/attempt-1", worker_of(0)));
    let got = losses(&run);
    // Same arithmetic in the same order whatever carries the bytes: exactly equal.
    assert_eq!(got, want, "per-step losses across hosts vs one host");
}
