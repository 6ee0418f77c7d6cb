//! The coordinator and worker daemons end to end: real processes on loopback, the real CLI.
//!
//! - A command job runs on a pool of workers with torchrun's environment; `logs`, `job`,
//!   `jobs`, `workers`, `cancel`, `cordon`/`uncordon`, `/metrics` work; bad job files and a
//!   wrong token get clear errors and the daemons keep serving.
//! - Training on 3 workers survives a SIGKILLed rank (restart from the last checkpoint) and a
//!   SIGKILLed coordinator (restarted on the same state), finishing with exactly the final
//!   loss of an uninterrupted run.
//! - A SIGKILLed worker daemon is declared lost after the heartbeat deadline and the elastic
//!   job finishes on the remaining workers with fewer data-parallel replicas.
//! - A SIGKILLed worker daemon costs a job exactly one restart, which names the rank and
//!   worker that died (the surviving rank's report blames it and the coordinator suspects
//!   its worker instead of placing the restart there).

mod common;
#[path = "../../worker/tests/common/tls.rs"]
mod tls;

use common::{GANTRY, text};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-cluster-token";

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    dir: PathBuf,
    addr: String,
    coordinator: Option<Daemon>,
    workers: Vec<(String, Option<Daemon>)>,
}

fn start_coordinator(dir: &Path, listen: &str, extra: &[&str]) -> (Daemon, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coordinator.log"))
        .unwrap();
    let mut child = Command::new(GANTRY)
        .args([
            "coordinator",
            "--listen",
            listen,
            "--token",
            TOKEN,
            "--heartbeat-ms",
            "200",
        ])
        .args(["--heartbeat-deadline-s", "3"])
        .args(extra)
        .arg("--state")
        .arg(dir.join("coordinator-state"))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = common::listening_address(&mut child).unwrap_or_else(|| {
        panic!(
            "coordinator did not start; see {}",
            dir.join("coordinator.log").display()
        )
    });
    (Daemon { child }, addr)
}

impl Cluster {
    /// A coordinator and one worker per `(name, slots)`, each with its own state directory
    /// and MASTER_PORT range (they share this host's ports).
    fn start(dir: &Path, workers: &[(&str, u32)]) -> Cluster {
        let (coordinator, addr) = start_coordinator(dir, "127.0.0.1:0", &[]);
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            addr,
            coordinator: Some(coordinator),
            workers: Vec::new(),
        };
        for (i, (name, slots)) in workers.iter().enumerate() {
            let d = c.start_worker(name, *slots, i);
            c.workers.push((name.to_string(), Some(d)));
        }
        c.wait_for("all workers alive", Duration::from_secs(60), |c| {
            let w = c.json(&["workers"]);
            w.as_array().unwrap().iter().filter(|w| w["alive"] == true).count() == workers.len()
        });
        c
    }

    fn start_worker(&self, name: &str, slots: u32, index: usize) -> Daemon {
        let log = std::fs::File::create(self.dir.join(format!("worker-{name}.log"))).unwrap();
        // 25 ports per worker (an attempt takes a new one), below Linux's ephemeral range
        // (32768-60999): a port there can be taken at any moment by another process's
        // outgoing connection (seen: rank 0 could not bind its rendezvous store).
        let block = (std::process::id() % 227) * 4 + index as u32 % 4;
        let base = 10_000 + block * 25;
        let child = Command::new(GANTRY)
            .args(["worker", "--coordinator", &self.addr, "--token", TOKEN, "--name", name])
            .args([
                "--slots",
                &slots.to_string(),
                "--grace-s",
                "2",
                "--labels",
                &format!("index={index}"),
            ])
            .args(["--ports", &format!("{}-{}", base, base + 24), "--state"])
            .arg(self.dir.join(format!("worker-{name}")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(GANTRY)
            .args(args)
            .env("GANTRY_COORDINATOR", &self.addr)
            .env("GANTRY_TOKEN", TOKEN)
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(out.status.success(), "gantry {args:?} failed: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gantry {args:?}: {e}: {}", text(&out)))
    }

    fn job(&self, id: u64) -> Value {
        self.json(&["job", &id.to_string()])
    }

    fn submit(&self, file: &Path, extra: &[&str]) -> u64 {
        let mut args = vec!["submit", file.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(out.status.success(), "submit failed: {}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["job"].as_u64().unwrap()
    }

    fn wait_for(&self, what: &str, limit: Duration, mut ok: impl FnMut(&Cluster) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}; logs in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_job(&self, id: u64, what: &str, limit: Duration, mut ok: impl FnMut(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let j = self.job(id);
            if ok(&j) {
                return j;
            }
            let state = j["state"].as_str().unwrap_or("");
            if ["failed", "cancelled"].contains(&state) && !what.contains(state) {
                panic!("job {id} {state} while waiting for {what}: {j:#}");
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}: {j:#}\nlogs in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill_coordinator(&mut self) {
        drop(self.coordinator.take());
    }

    fn restart_coordinator(&mut self) {
        let (d, addr) = start_coordinator(&self.dir, &self.addr, &[]);
        assert_eq!(addr, self.addr);
        self.coordinator = Some(d);
    }

    fn kill_worker(&mut self, name: &str) {
        let w = self.workers.iter_mut().find(|(n, _)| n == name).unwrap();
        drop(w.1.take());
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

#[test]
fn command_jobs_cli_and_bad_input() {
    let dir = common::tempdir("cluster", "cmd");
    let c = Cluster::start(&dir, &[("alpha", 2), ("beta", 2)]);

    let workers = c.json(&["workers"]);
    assert_eq!(workers.as_array().unwrap().len(), 2, "{workers:#}");
    assert!(
        workers[0]["slots"] == 2 && workers[0]["mode"] == "active",
        "{workers:#}"
    );

    // A 3-rank command job gets torchrun's environment.
    let job = dir.join("env.toml");
    std::fs::write(
        &job,
        r#"
name = "env-check"
command = ["sh", "-c", "echo rank=$RANK local=$LOCAL_RANK/$LOCAL_WORLD_SIZE world=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT job=$GANTRY_JOB_ID extra=$EXTRA"]
nproc = 3
env = { EXTRA = "yes" }
"#,
    )
    .unwrap();
    let id = c.submit(&job, &[]);
    let done = c.wait_job(id, "succeeded", Duration::from_secs(60), |j| j["state"] == "succeeded");
    let ranks = done["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    let mut masters = std::collections::BTreeSet::new();
    for r in 0..3 {
        let out = c.cli(&["logs", &id.to_string(), "--rank", &r.to_string()]);
        let log = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            log.contains(&format!("rank={r} ")) && log.contains("world=3"),
            "rank {r}: {log}"
        );
        assert!(
            log.contains(&format!("job={id} ")) && log.contains("extra=yes"),
            "rank {r}: {log}"
        );
        masters.insert(
            log.split("master=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        masters.len(),
        1,
        "every rank got the same MASTER_ADDR:MASTER_PORT: {masters:?}"
    );
    let jobs = c.json(&["jobs"]);
    assert_eq!(jobs[0]["state"], "succeeded");

    // Cancel stops the whole process tree of every rank, on every worker.
    let sleeper = dir.join("sleep.toml");
    std::fs::write(
        &sleeper,
        "command = [\"sh\", \"-c\", \"sleep 600 & wait\"]\nnproc = 4\n",
    )
    .unwrap();
    let id = c.submit(&sleeper, &[]);
    let running = c.wait_job(id, "4 running ranks", Duration::from_secs(60), |j| {
        j["ranks"].as_array().unwrap().iter().all(|r| r["state"] == "running")
    });
    let pids: Vec<u32> = running["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_u64().unwrap() as u32)
        .collect();
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    // The cluster is full: a job that must not wait is refused with the reason.
    let out = c.cli(&["submit", sleeper.to_str().unwrap(), "--no-queue"]);
    assert!(
        !out.status.success() && text(&out).contains("only 0 fit"),
        "{}",
        text(&out)
    );
    let out = c.cli(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    c.wait_for("ranks stopped", Duration::from_secs(30), |_| {
        pids.iter().all(|p| !alive(*p))
    });
    assert_eq!(c.job(id)["state"], "cancelled");

    // Cordon: no new ranks on alpha; the job waits, then runs once alpha is back.
    assert!(c.cli(&["cordon", "alpha"]).status.success());
    let two = dir.join("two.toml");
    std::fs::write(&two, "command = [\"true\"]\nnproc = 3\n").unwrap();
    let id = c.submit(&two, &[]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(c.job(id)["state"], "queued", "beta alone has 2 slots");
    let w = c.json(&["workers"]);
    assert!(w.as_array().unwrap().iter().any(|w| w["mode"] == "cordoned"), "{w:#}");
    assert!(c.cli(&["uncordon", "alpha"]).status.success());
    c.wait_job(id, "succeeded", Duration::from_secs(60), |j| j["state"] == "succeeded");

    // A rank that cannot start fails the job (no restarts asked for) with the reason.
    let missing = dir.join("missing.toml");
    std::fs::write(&missing, "command = [\"/no/such/program\"]\nnproc = 1\n").unwrap();
    let id = c.submit(&missing, &[]);
    let j = c.wait_job(id, "failed", Duration::from_secs(60), |j| j["state"] == "failed");
    assert!(j["reason"].as_str().unwrap().contains("/no/such/program"), "{j:#}");

    // Bad job files: clear errors naming the problem, nothing reaches the coordinator.
    let cases: &[(&str, &str)] = &[
        ("command = [\"x\"\nnproc = 1", "TOML parse error"),
        (
            "command = [\"x\"]\nnproc = 1\ncolour = \"red\"",
            "unknown field `colour`",
        ),
        ("command = [\"x\"]\nnproc = 0", "`nproc` must be at least 1"),
        ("command = []", "`command` is empty"),
        (
            "command = [\"x\"]\n[cluster]\nmax_restart = 1",
            "unknown field `max_restart`",
        ),
        (
            "[model]\nd_model = 64\nn_heads = 3\n[data]\npath = \"/nonexistent\"",
            "data.path",
        ),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&f, body).unwrap();
        let out = c.cli(&["submit", f.to_str().unwrap()]);
        assert!(!out.status.success(), "case {i} was accepted");
        assert!(text(&out).contains(want), "case {i}: want `{want}` in: {}", text(&out));
    }
    // Too big for the cluster and not allowed to wait.
    let big = dir.join("big.toml");
    std::fs::write(&big, "command = [\"true\"]\nnproc = 50\n[cluster]\nqueue = false\n").unwrap();
    let out = c.cli(&["submit", big.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("needs 50 ranks"),
        "{}",
        text(&out)
    );

    // Wrong or missing token: refused; the coordinator keeps serving.
    let out = Command::new(GANTRY)
        .args(["jobs", "--coordinator", &c.addr, "--token", "wrong"])
        .env_remove("GANTRY_TOKEN")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("wrong cluster token"),
        "{}",
        text(&out)
    );
    assert!(c.cli(&["jobs"]).status.success());
    assert!(!c.cli(&["job", "999"]).status.success());
    assert!(text(&c.cli(&["cordon", "nobody"])).contains("no worker named `nobody`"));

    // Prometheus metrics on the gRPC port, plain HTTP/1.1.
    let metrics = common::http_get(&c.addr, "/metrics", &[]);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for want in [
        "gantry_coordinator_workers{state=\"alive\"} 2",
        "gantry_coordinator_jobs{state=\"succeeded\"} 2",
        "gantry_coordinator_jobs{state=\"failed\"} 1",
        "gantry_coordinator_heartbeat_seconds_count",
    ] {
        assert!(metrics.contains(want), "missing `{want}` in:\n{metrics}");
    }
    let w = c.json(&["workers"]);
    let service = w[0]["service_address"].as_str().unwrap().to_string();
    let metrics = common::http_get(&service, "/metrics", &[]);
    assert!(metrics.contains("gantry_worker_"), "{metrics}");
}

const SPEC: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 16
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
[train]
steps = 600
global_batch = 6
micro_batch = 2
threads = 1
[parallel]
dp = 3
"#;

fn training_job(dir: &Path, cluster: &str) -> PathBuf {
    training_job_with(dir, SPEC, cluster)
}

fn training_job_with(dir: &Path, spec: &str, cluster: &str) -> PathBuf {
    let base = common::synth_job(dir, spec, 60_000, 11);
    let text = std::fs::read_to_string(&base).unwrap();
    let path = dir.join("train.toml");
    std::fs::write(
        &path,
        format!(
            "{text}\n[checkpoint]\ndir = \"{}\"\nevery = 50\n{cluster}\n",
            dir.join("ckpt").display()
        ),
    )
    .unwrap();
    path
}

/// The final loss that the reporting rank of the last attempt wrote in its run directory.
fn final_loss(c: &Cluster, job: &Value) -> f64 {
    let attempt = job["attempt"].as_u64().unwrap();
    for (name, _) in &c.workers {
        let p = c.dir.join(format!(
            "worker-{name}/jobs/{}/attempt-{attempt}/summary.json",
            job["id"]
        ));
        if let Ok(bytes) = std::fs::read(&p) {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            return v["final_loss"].as_f64().unwrap();
        }
    }
    panic!("no summary.json for attempt {attempt} under {}", c.dir.display());
}

fn step_of(job: &Value) -> u64 {
    job["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["step"].as_u64())
        .min()
        .unwrap_or(0)
}

#[test]
fn training_survives_a_killed_rank_and_a_killed_coordinator() {
    let dir = common::tempdir("cluster", "train");
    let spec = training_job(&dir, "[cluster]\nmax_restarts = 3\n");
    // The uninterrupted reference, same layout.
    let reference = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "3", "--json", "--checkpoint-dir"])
        .arg(dir.join("reference-ckpt"))
        .arg("--run-dir")
        .arg(dir.join("reference"))
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", text(&reference));
    let want: Value = serde_json::from_slice(&reference.stdout).unwrap();
    let want = want["final_loss"].as_f64().unwrap();

    let mut c = Cluster::start(&dir, &[("n1", 1), ("n2", 1), ("n3", 1)]);
    let id = c.submit(&spec, &[]);
    // Follow rank 0's log for the whole job: through the restart and the coordinator's
    // absence, ending by itself when the job does.
    let follow_out = std::fs::File::create(dir.join("follow.txt")).unwrap();
    let mut follower = Command::new(GANTRY)
        .args(["logs", &id.to_string(), "--rank", "0", "--follow"])
        .env("GANTRY_COORDINATOR", &c.addr)
        .env("GANTRY_TOKEN", TOKEN)
        .stdout(follow_out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill one rank once a checkpoint exists and training has moved past it.
    let j = c.wait_job(id, "step 120", Duration::from_secs(300), |j| step_of(j) >= 120);
    let victim = j["ranks"][1]["pid"].as_u64().unwrap() as i32;
    // SAFETY: a plain kill of a rank process this test's cluster started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let j = c.wait_job(id, "a restart", Duration::from_secs(120), |j| {
        j["restarts"] == 1 && j["state"] == "running"
    });
    // The restart names the first rank to fail; the killed one is named either there or in
    // a follow-up event of the ended attempt, once its worker reports it.
    assert!(j["events"].to_string().contains("restart 1: rank "), "{j:#}");
    c.wait_job(id, "the killed rank named", Duration::from_secs(30), |j| {
        j["events"].to_string().contains("rank 1 on worker n")
            && j["events"].to_string().contains("was killed by signal 9")
    });

    // Kill the coordinator mid-training, then restart it on the same state.
    let j = c.wait_job(id, "attempt 2 training", Duration::from_secs(300), |j| {
        j["attempt"] == 2 && step_of(j) >= 250
    });
    assert!(step_of(&j) < 500, "the coordinator is to be killed mid-training: {j:#}");
    c.kill_coordinator();
    std::thread::sleep(Duration::from_secs(1));
    c.restart_coordinator();
    let j = c.job(id);
    assert_eq!(
        (j["state"].as_str(), j["attempt"].as_u64()),
        (Some("running"), Some(2)),
        "{j:#}"
    );

    let done = c.wait_job(id, "succeeded", Duration::from_secs(600), |j| j["state"] == "succeeded");
    assert_eq!(done["attempt"], 2, "the coordinator restart cost no restart: {done:#}");
    let got = final_loss(&c, &done);
    assert_eq!(
        got.to_bits(),
        want.to_bits(),
        "final loss {got} vs uninterrupted {want}"
    );

    let start = Instant::now();
    let status = loop {
        if let Some(s) = follower.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "`gantry logs --follow` did not end with the job"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    follower.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let followed = std::fs::read_to_string(dir.join("follow.txt")).unwrap();
    assert!(status.success(), "logs --follow: {err}");
    assert!(
        followed.contains("restarted, attempt 2"),
        "followed into the new attempt:\n{followed}\n{err}"
    );
    assert!(
        followed.contains("resuming from the latest committed checkpoint"),
        "{followed}"
    );
}

#[test]
fn lost_worker_is_detected_and_elastic_job_finishes_smaller() {
    let dir = common::tempdir("cluster", "elastic");
    let spec = training_job(&dir, "[cluster]\nmax_restarts = 6\nelastic = true\nmin_dp = 1\n");
    let mut c = Cluster::start(&dir, &[("e1", 1), ("e2", 1), ("e3", 1)]);
    let id = c.submit(&spec, &[]);
    let j = c.wait_job(id, "step 60", Duration::from_secs(300), |j| step_of(j) >= 60);
    let victim = j["ranks"][2]["worker"].as_str().unwrap().to_string();
    let killed_at = Instant::now();
    c.kill_worker(&victim);
    let j = c.wait_job(id, "worker lost", Duration::from_secs(60), |j| {
        j["events"].to_string().contains("lost")
    });
    // Detected within the 3 s heartbeat deadline (plus polling slack).
    assert!(killed_at.elapsed() < Duration::from_secs(30), "{j:#}");
    let w = c.json(&["workers"]);
    let lost: Vec<&Value> = w.as_array().unwrap().iter().filter(|w| w["alive"] == false).collect();
    assert_eq!(lost.len(), 1, "{w:#}");
    assert_eq!(lost[0]["name"], victim.as_str());
    let done = c.wait_job(id, "succeeded", Duration::from_secs(600), |j| j["state"] == "succeeded");
    assert_eq!(
        done["dp"], 1,
        "elastic: 2 workers left, dp 3 → 1 (a divisor of 3): {done:#}"
    );
    assert!(
        done["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["worker"] != victim.as_str())
    );
    assert!(final_loss(&c, &done).is_finite());
}

/// Two data-parallel ranks, one per worker.
const PAIR_SPEC: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 16
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
[train]
steps = 400
global_batch = 8
micro_batch = 2
threads = 1
[parallel]
dp = 2
"#;

/// Issue 15: SIGKILL one of the two workers running a 2-rank job. Its rank dies with it and
/// the surviving rank fails naming it; the coordinator must blame that rank and worker,
/// keep the restart off the dead worker (still "alive" until its heartbeat deadline), and
/// so restart exactly once, on the spare worker.
#[test]
fn killed_worker_costs_one_restart_that_names_it() {
    let dir = common::tempdir("cluster", "peer");
    let spec = training_job_with(&dir, PAIR_SPEC, "[cluster]\nmax_restarts = 3\n");
    let mut c = Cluster::start(&dir, &[("p1", 1), ("p2", 1), ("p3", 1)]);
    // Saves every 50 steps, so one may be in flight when the worker dies: the surviving rank
    // cancels it as it fails (Saver's drop) instead of waiting out `commit_timeout_s`, so it
    // exits, and is blamed, before the victim's heartbeat deadline passes.
    let id = c.submit(&spec, &[]);
    let j = c.wait_job(id, "step 60", Duration::from_secs(300), |j| step_of(j) >= 60);
    assert_eq!(j["restarts"], 0, "{j:#}");
    let victim = j["ranks"][1]["worker"].as_str().unwrap().to_string();
    let survivor = j["ranks"][0]["worker"].as_str().unwrap().to_string();
    assert_ne!(victim, survivor, "one rank per worker: {j:#}");
    c.kill_worker(&victim);

    // The restart happens at once, off the victim.
    let j = c.wait_job(id, "a restart", Duration::from_secs(120), |j| {
        j["restarts"] == 1 && j["state"] == "running"
    });
    assert!(
        j["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["worker"] != victim.as_str()),
        "the restart was placed on the killed worker {victim}: {j:#}"
    );
    // The victim's deadline passes; that is no second failure of the job.
    c.wait_for("the killed worker declared lost", Duration::from_secs(120), |c| {
        c.json(&["workers"])
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == victim.as_str() && w["alive"] == false)
    });
    let done = c.wait_job(id, "succeeded", Duration::from_secs(600), |j| j["state"] == "succeeded");
    let restarts: Vec<&str> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "restart")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(restarts.len(), 1, "one failure, one restart: {done:#}");
    assert_eq!(
        (done["restarts"].as_u64(), done["attempt"].as_u64()),
        (Some(1), Some(2)),
        "{done:#}"
    );
    let want = format!("restart 1: rank 1 on worker {victim} failed");
    assert!(
        restarts[0].starts_with(&want),
        "the restart names the rank and worker that died: want `{want}…`, got `{}`",
        restarts[0]
    );
    assert!(
        done["events"].to_string().contains(&format!("worker {victim} lost")),
        "the loss confirms the blame in the job's events: {done:#}"
    );
    assert!(final_loss(&c, &done).is_finite());
}

#[test]
fn tls_between_the_cli_the_coordinator_and_workers() {
    let dir = common::tempdir("cluster", "tls");
    if tls::make_certs(&dir).is_none() {
        eprintln!("skipped: the openssl command is not available to make test certificates");
        return;
    }
    let path = |f: &str| dir.join(f).display().to_string();
    let (cert, key, ca) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
    let (_coordinator, addr) = start_coordinator(&dir, "127.0.0.1:0", &["--tls-cert", &cert, "--tls-key", &key]);
    let log = std::fs::File::create(dir.join("worker-tls.log")).unwrap();
    let _worker = Daemon {
        child: Command::new(GANTRY)
            .args([
                "worker",
                "--coordinator",
                &addr,
                "--token",
                TOKEN,
                "--name",
                "secure",
                "--slots",
                "1",
            ])
            .args(["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key, "--state"])
            .arg(dir.join("worker-secure"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    };
    let cli = |args: &[&str], tls: bool| {
        let mut c = Command::new(GANTRY);
        c.args(args).env("GANTRY_COORDINATOR", &addr).env("GANTRY_TOKEN", TOKEN);
        if tls {
            c.args(["--tls-ca", &ca]);
        }
        c.output().unwrap()
    };
    let job = dir.join("hello.toml");
    std::fs::write(&job, "command = [\"echo\", \"hello over tls\"]\nnproc = 1\n").unwrap();
    let start = Instant::now();
    // Accepted now; it waits in the queue until the worker has registered over TLS.
    let out = cli(&["submit", job.to_str().unwrap(), "--json"], true);
    assert!(out.status.success(), "{}", text(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["job"]
        .as_u64()
        .unwrap();
    loop {
        let out = cli(&["job", &id.to_string(), "--json"], true);
        let j: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if j["state"] == "succeeded" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job over TLS did not finish: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Logs come from the worker's own TLS service.
    let out = cli(&["logs", &id.to_string()], true);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello over tls"),
        "{}",
        text(&out)
    );
    // A client that does not speak TLS gets an error, not an answer.
    let out = cli(&["jobs"], false);
    assert!(!out.status.success(), "plaintext was answered: {}", text(&out));
}

/// The README's setup (`export GANTRY_TOKEN=…; gantry worker …`) with cloud and registry
/// secrets in the worker's environment: a command job that prints its environment sees
/// torchrun's and gantry's variables and the worker's plain ones, none of the secrets
/// except the one its `[cluster] env_pass` names. The coordinator and the CLI read the
/// cluster token from a file; `/metrics` on both daemons needs the metrics token.
#[test]
fn secrets_stay_out_of_jobs_tokens_from_files_metrics_behind_a_token() {
    let dir = common::tempdir("cluster", "secrets");
    let token_file = dir.join("cluster.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let metrics_file = dir.join("metrics.token");
    std::fs::write(&metrics_file, "scrape-token-5150\n").unwrap();
    let scrub = |c: &mut Command| {
        for k in [
            "GANTRY_TOKEN",
            "GANTRY_TOKEN_FILE",
            "GANTRY_METRICS_TOKEN",
            "GANTRY_METRICS_TOKEN_FILE",
            "GANTRY_ENV_PASS",
            "GANTRY_COORDINATOR",
        ] {
            c.env_remove(k);
        }
    };

    let mut coordinator = Command::new(GANTRY);
    coordinator
        .args(["coordinator", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token_file)
        .arg("--metrics-token-file")
        .arg(&metrics_file)
        .args(["--heartbeat-ms", "200", "--state"])
        .arg(dir.join("coordinator-state"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap());
    scrub(&mut coordinator);
    let mut child = coordinator.spawn().unwrap();
    let addr = common::listening_address(&mut child).unwrap_or_else(|| {
        panic!(
            "coordinator did not start; see {}",
            dir.join("coordinator.log").display()
        )
    });
    let _coordinator = Daemon { child };

    let mut worker = Command::new(GANTRY);
    scrub(&mut worker);
    worker
        .args([
            "worker",
            "--coordinator",
            &addr,
            "--name",
            "keeper",
            "--slots",
            "1",
            "--state",
        ])
        .arg(dir.join("worker-keeper"))
        .env("GANTRY_TOKEN", TOKEN)
        .env("GANTRY_METRICS_TOKEN", "scrape-token-5150")
        .env("GANTRY_REGISTRY_TOKEN", "registry-secret-7734")
        .env("AWS_ACCESS_KEY_ID", "AKIAPASSEDBYNAME")
        .env("AWS_SECRET_ACCESS_KEY", "aws-secret-9921")
        .env("AWS_SESSION_TOKEN", "aws-session-4410")
        .env("GANTRY_TEST_PLAIN", "kept")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker-keeper.log")).unwrap());
    let _worker = Daemon {
        child: worker.spawn().unwrap(),
    };

    let cli = |args: &[&str]| {
        let mut c = Command::new(GANTRY);
        c.args(args)
            .args(["--coordinator", &addr, "--token-file"])
            .arg(&token_file);
        scrub(&mut c);
        c.output().unwrap()
    };
    let json = |args: &[&str]| -> Value {
        let out = cli(args);
        assert!(out.status.success(), "gantry {args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    };
    let start = Instant::now();
    while json(&["workers", "--json"])
        .as_array()
        .is_none_or(|w| !w.iter().any(|w| w["alive"] == true))
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker did not register; logs in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let job = dir.join("env.toml");
    std::fs::write(
        &job,
        "name = \"print-env\"\ncommand = [\"env\"]\nnproc = 1\n[cluster]\nenv_pass = [\"AWS_ACCESS_KEY_ID\"]\n",
    )
    .unwrap();
    let id = json(&["submit", job.to_str().unwrap(), "--json"])["job"]
        .as_u64()
        .unwrap();
    loop {
        let j = json(&["job", &id.to_string(), "--json"]);
        if j["state"] == "succeeded" {
            break;
        }
        assert!(
            j["state"] != "failed" && start.elapsed() < Duration::from_secs(120),
            "job {id}: {j:#}; logs in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cli(&["logs", &id.to_string(), "--rank", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    let env = String::from_utf8_lossy(&out.stdout).to_string();
    let has = |line: &str| env.lines().any(|l| l == line);
    let has_var = |name: &str| env.lines().any(|l| l.starts_with(&format!("{name}=")));
    for line in [
        "RANK=0",
        "LOCAL_RANK=0",
        "WORLD_SIZE=1",
        "LOCAL_WORLD_SIZE=1",
        "TORCHELASTIC_RESTART_COUNT=0",
        &format!("GANTRY_JOB_ID={id}"),
        "GANTRY_JOB_NAME=print-env",
        "GANTRY_ATTEMPT=1",
        "GANTRY_TEST_PLAIN=kept",
        "AWS_ACCESS_KEY_ID=AKIAPASSEDBYNAME",
        "GANTRY_ENV_PASS=AWS_ACCESS_KEY_ID",
    ] {
        assert!(has(line), "missing `{line}` in the job's environment:\n{env}");
    }
    for name in ["MASTER_ADDR", "MASTER_PORT", "GANTRY_PROGRESS_FILE", "PATH"] {
        assert!(has_var(name), "missing {name} in the job's environment:\n{env}");
    }
    for name in [
        "GANTRY_TOKEN",
        "GANTRY_METRICS_TOKEN",
        "GANTRY_REGISTRY_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        assert!(!has_var(name), "{name} reached the job:\n{env}");
    }
    for secret in [
        TOKEN,
        "scrape-token-5150",
        "registry-secret-7734",
        "aws-secret-9921",
        "aws-session-4410",
    ] {
        assert!(!env.contains(secret), "`{secret}` reached the job:\n{env}");
    }

    // A token file with the wrong token is refused by the coordinator, naming the reason.
    let wrong = dir.join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let mut c = Command::new(GANTRY);
    c.args(["jobs", "--coordinator", &addr, "--token-file"]).arg(&wrong);
    scrub(&mut c);
    let out = c.output().unwrap();
    assert!(
        !out.status.success() && text(&out).contains("wrong cluster token"),
        "{}",
        text(&out)
    );

    // /metrics on the coordinator and on the worker: 401 without the metrics token (the
    // cluster token is not it), 200 with it.
    let service = json(&["workers", "--json"])[0]["service_address"]
        .as_str()
        .unwrap()
        .to_string();
    for (daemon, at, family) in [
        ("coordinator", addr.as_str(), "gantry_coordinator_"),
        ("worker", service.as_str(), "gantry_worker_"),
    ] {
        let cluster_auth = format!("Bearer {TOKEN}");
        for (auth, status) in [
            (None, "401"),
            (Some("Bearer wrong"), "401"),
            (Some(cluster_auth.as_str()), "401"),
            (Some("Bearer scrape-token-5150"), "200"),
        ] {
            let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
            let reply = common::http_get(at, "/metrics", &headers);
            assert!(
                reply.starts_with(&format!("HTTP/1.1 {status}")),
                "{daemon} with {auth:?}: {reply}"
            );
            assert_eq!(
                reply.contains(family),
                status == "200",
                "{daemon} with {auth:?}: {reply}"
            );
        }
    }
}
