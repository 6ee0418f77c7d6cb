//! What the multi-host tests (`netns_*.rs`) share: a dp 2 × tp 2 job spec with its one-host
//! reference run, and [`Daemons`]: a coordinator on host `head` and workers on other hosts of
//! a `gantry-testkit` cluster (network namespaces, each with its own address and host name),
//! driven through the CLI run on `head`.
#![allow(dead_code)] // each test binary uses its own subset

use super::{GANTRY, text};
use gantry_testkit::netns::{Cluster, Host, HostProcess};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "netns-test-token";
const COORDINATOR_PORT: u16 = 7070;

/// dp 2 × tp 2 with two ranks per host; `{name}` and `{steps}` filled in.
const DP2_TP2_SPEC: &str = r#"
name = "{name}"
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
steps = {steps}
global_batch = 8
micro_batch = 2
eval_every = 10
eval_batches = 2
threads = 1
"#;

/// Whether a machine that cannot make namespaces fails the tests (`CI=true`) rather than
/// skipping them.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A synthetic dataset in `dir/data` and the spec of a dp 2 × tp 2 job `name` of `steps`
/// steps over it, with `extra` (more sections) appended; the spec's path.
pub fn dp2_tp2_spec(dir: &Path, name: &str, steps: u64, extra: &str) -> PathBuf {
    let body = DP2_TP2_SPEC
        .replace("{name}", name)
        .replace("{steps}", &steps.to_string());
    super::synth_job(dir, &format!("{body}\n{extra}\n"), 60_000, 5)
}

/// The one-host reference: `spec` as four local ranks on this machine (checkpointing to
/// `dir/reference-ckpt` when `checkpoints`); its run directory.
pub fn reference(dir: &Path, spec: &Path, checkpoints: bool) -> PathBuf {
    let run = dir.join("reference");
    let mut cmd = Command::new(GANTRY);
    cmd.arg("launch")
        .arg(spec)
        .args(["--local", "4", "--json", "--run-dir"])
        .arg(&run);
    if checkpoints {
        cmd.arg("--checkpoint-dir").arg(dir.join("reference-ckpt"));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "reference run: {}", text(&out));
    run
}

/// Every step's loss from a run directory's `metrics.jsonl`.
pub fn losses(run: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.join("metrics.jsonl").display()));
    metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// The worker that runs `rank` of a job (as `gantry job ID --json` reports it).
pub fn worker_of(job: &Value, rank: usize) -> String {
    job["ranks"][rank]["worker"].as_str().unwrap().to_string()
}

/// The placement of a dp 2 × tp 2 job: each TP pair (ranks 0,1 and 2,3) on one host, the two
/// DP replicas on different hosts, so that only the DP all-reduces cross the network.
pub fn assert_tp_pairs_share_a_host(job: &Value) {
    assert_eq!(worker_of(job, 0), worker_of(job, 1), "{job:#}");
    assert_eq!(worker_of(job, 2), worker_of(job, 3), "{job:#}");
    assert_ne!(worker_of(job, 0), worker_of(job, 2), "{job:#}");
}

/// The daemons of a test, each inside its host; killed (with their ranks) on drop. Their
/// logs and state live in the test's directory.
pub struct Daemons {
    coordinator_process: HostProcess,
    _workers: Vec<HostProcess>,
    /// The host of the coordinator, where the CLI runs.
    pub head: Host,
    /// The coordinator's address (on `head`).
    pub coordinator: String,
    dir: PathBuf,
}

impl Daemons {
    /// A coordinator on `head` (heartbeats every 200 ms, a worker lost after `deadline_s`)
    /// and a worker with two slots on each host of `workers` (named after it); returns once
    /// the coordinator counts every worker alive.
    pub fn start(cluster: &Cluster, dir: &Path, deadline_s: u32, workers: &[&str]) -> Daemons {
        let head = cluster.host("head").unwrap().clone();
        let coordinator = format!("{}:{COORDINATOR_PORT}", head.addr());
        let mut cmd = head.command(GANTRY);
        cmd.args(["coordinator", "--listen", &coordinator, "--token", TOKEN])
            .args([
                "--heartbeat-ms",
                "200",
                "--heartbeat-deadline-s",
                &deadline_s.to_string(),
            ])
            .arg("--state")
            .arg(dir.join("coordinator-state"));
        let coordinator_process = spawn_logged(&mut cmd, dir, "coordinator");
        let worker_processes = workers
            .iter()
            .map(|name| spawn_worker(cluster.host(name).unwrap(), name, &coordinator, dir))
            .collect();
        let daemons = Daemons {
            coordinator_process,
            _workers: worker_processes,
            head,
            coordinator,
            dir: dir.to_path_buf(),
        };
        daemons.wait_for("every worker alive", Duration::from_secs(60), |d| {
            d.alive_workers() == workers.len()
        });
        daemons
    }

    /// The CLI, run on the head host.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.head
            .command(GANTRY)
            .args(args)
            .env("GANTRY_COORDINATOR", &self.coordinator)
            .env("GANTRY_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The CLI's `--json` answer to `args`, which must succeed.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(&[args, &["--json"]].concat());
        assert!(out.status.success(), "gantry {args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gantry {args:?}: {e}: {}", text(&out)))
    }

    /// Workers the coordinator counts alive (0 while it does not answer yet).
    pub fn alive_workers(&self) -> usize {
        let out = self.cli(&["workers", "--json"]);
        if !out.status.success() {
            return 0;
        }
        let w: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("workers: {e}: {}", text(&out)));
        w.as_array().unwrap().iter().filter(|w| w["alive"] == true).count()
    }

    /// Submit the job `spec`; its id.
    pub fn submit(&self, spec: &Path) -> u64 {
        self.json(&["submit", spec.to_str().unwrap()])["job"].as_u64().unwrap()
    }

    /// Poll `ok` until it holds; fail naming `what` (and where the logs are) after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for job `id` to satisfy `ok`. A CLI call that fails meanwhile is retried (the
    /// network is what these tests break); the last failure is in the timeout's message.
    pub fn wait_job(&self, id: u64, what: &str, limit: Duration, mut ok: impl FnMut(&Value) -> bool) -> Value {
        let mut job = Value::Null;
        let mut failure = String::new();
        let start = Instant::now();
        loop {
            let out = self.cli(&["job", &id.to_string(), "--json"]);
            if out.status.success() {
                job = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("job {id}: {e}: {}", text(&out)));
                if ok(&job) {
                    return job;
                }
            } else {
                failure = text(&out);
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; last CLI failure: {failure}\n{job:#}\n\
                 coordinator: {:?}; logs in {}",
                self.coordinator_process.try_wait(),
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for job `id` to end, which it must do by succeeding; its last state.
    pub fn wait_end(&self, id: u64, limit: Duration) -> Value {
        let job = self.wait_job(id, "the job to end", limit, |j| {
            ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or(""))
        });
        assert_eq!(job["state"], "succeeded", "{job:#}\nlogs in {}", self.dir.display());
        job
    }

    /// The run directory of `attempt` of job `id` on `worker`.
    pub fn run_dir(&self, worker: &str, id: u64, attempt: u64) -> PathBuf {
        self.dir.join(format!("worker-{worker}/jobs/{id}/attempt-{attempt}"))
    }
}

/// A worker `name` with two slots on `host`, state in `dir/worker-NAME`. No
/// `--advertise-address`: a worker finds its host's address by the route towards the
/// coordinator, and its ranks advertise that address too.
fn spawn_worker(host: &Host, name: &str, coordinator: &str, dir: &Path) -> HostProcess {
    let mut cmd = host.command(GANTRY);
    cmd.args(["worker", "--coordinator", coordinator, "--token", TOKEN, "--name", name])
        .args(["--slots", "2", "--grace-s", "2", "--ports", "29500-29524", "--state"])
        .arg(dir.join(format!("worker-{name}")));
    spawn_logged(&mut cmd, dir, &format!("worker-{name}"))
}

/// Start a daemon's `cmd` with its log (at `GANTRY_LOG=info`) in `dir/LOG.log`.
fn spawn_logged(cmd: &mut Command, dir: &Path, log: &str) -> HostProcess {
    let path = dir.join(format!("{log}.log"));
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cmd.env("GANTRY_LOG", "info").stdout(Stdio::null()).stderr(file);
    HostProcess::spawn(cmd).unwrap_or_else(|e| panic!("starting the daemon logging to {}: {e}", path.display()))
}
