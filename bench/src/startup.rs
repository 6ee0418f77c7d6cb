//! `gantry bench startup`: time from `gantry submit` to every rank's first training step, with
//! a real coordinator, worker and rank processes on this host.

use crate::daemons::{Daemon, Harness, TOKEN};
use crate::error::{BenchError, Result};
use crate::stats;
use serde_json::json;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// The settings of `gantry bench startup`.
#[derive(Clone, Debug)]
pub struct StartupBenchConfig {
    /// Ranks of the job (one worker with this many slots).
    pub nproc: u32,
    /// Jobs to time (the median is reported).
    pub repeat: usize,
}

impl Default for StartupBenchConfig {
    fn default() -> Self {
        StartupBenchConfig { nproc: 4, repeat: 3 }
    }
}

impl StartupBenchConfig {
    pub fn validate(&self) -> Result<()> {
        if self.nproc == 0 || self.repeat == 0 {
            return Err(BenchError::setting("--nproc and --repeat", "must be positive"));
        }
        Ok(())
    }
}

/// Everything `gantry bench startup` reports.
#[derive(Clone, Debug)]
pub struct StartupReport {
    pub nproc: u32,
    /// Submit to every rank's first step, per job, in order.
    pub seconds: Vec<f64>,
    pub median_s: f64,
}

impl StartupReport {
    pub fn to_json(&self) -> serde_json::Value {
        json!({"nproc": self.nproc, "submit_to_first_step_s": self.seconds, "median_s": self.median_s})
    }

    pub fn text_line(&self) -> String {
        format!(
            "gantry submit → every rank's first training step, {} ranks on one worker: median {:.2} s of {:?}",
            self.nproc,
            self.median_s,
            self.seconds.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
        )
    }
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

/// A cluster client command (`gantry workers`, `submit`, `job`) against the benchmark's
/// coordinator.
struct Client<'a> {
    harness: &'a Harness,
    addr: &'a str,
}

impl Client<'_> {
    fn run(&self, args: &[&str]) -> Result<Output> {
        self.harness
            .gantry()
            .args(args)
            .env("GANTRY_COORDINATOR", self.addr)
            .env("GANTRY_TOKEN", TOKEN)
            .output()
            .map_err(BenchError::io("cannot run", &self.harness.gantry))
    }

    fn job_state(&self, id: u64) -> Result<serde_json::Value> {
        let o = self.run(&["job", &id.to_string(), "--json"])?;
        Ok(serde_json::from_slice(&o.stdout).unwrap_or_default())
    }

    fn wait_for_worker(&self) -> Result<()> {
        let t = Instant::now();
        loop {
            let o = self.run(&["workers", "--json"])?;
            if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"alive\":true") {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(BenchError::Harness("the worker did not register".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Write the job's data set and spec into `dir`; returns the spec's path.
fn write_job(harness: &Harness, dir: &Path, nproc: u32) -> Result<std::path::PathBuf> {
    let data = dir.join("data");
    let out = harness
        .gantry()
        .args(["data", "synth", "--tokens", "100000", "--seed", "1", "--output"])
        .arg(&data)
        .output()
        .map_err(BenchError::io("cannot run", &harness.gantry))?;
    if !out.status.success() {
        return Err(BenchError::Harness(format!(
            "data synth failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let spec = dir.join("job.toml");
    let text = format!(
        "{STARTUP_SPEC}[parallel]\ndp = {nproc}\n[data]\npath = \"{}\"\n",
        data.display()
    );
    std::fs::write(&spec, text).map_err(BenchError::io("cannot write", &spec))?;
    Ok(spec)
}

/// Submit the job, wait until every rank's progress file shows step 1 (seconds taken), then
/// until the job has succeeded (one worker, all slots: the next job needs them).
fn time_one_job(client: &Client, spec: &Path, worker_state: &Path, nproc: u32) -> Result<f64> {
    let t0 = Instant::now();
    let spec = spec.to_str().ok_or_else(|| BenchError::Harness("path".into()))?;
    let o = client.run(&["submit", spec, "--json"])?;
    if !o.status.success() {
        return Err(BenchError::Harness(format!(
            "submit failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).map_err(|e| BenchError::Harness(format!("submit printed no JSON: {e}")))?;
    let id = v["job"].as_u64().ok_or_else(|| BenchError::Harness("job id".into()))?;
    let run = worker_state.join(format!("jobs/{id}/attempt-1"));
    let mut polls = 0u64;
    loop {
        let stepped = (0..nproc).all(|r| {
            std::fs::read(run.join(format!("rank-{r}.progress.json")))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s >= 1)
        });
        if stepped {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) || (polls % 100 == 99 && client.job_state(id)?["state"] == "failed")
        {
            return Err(BenchError::Harness(format!(
                "job {id} did not reach its first step; see {}",
                run.display()
            )));
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let t = Instant::now();
    while !String::from_utf8_lossy(&client.run(&["job", &id.to_string(), "--json"])?.stdout).contains("\"succeeded\"") {
        if t.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Harness(format!("job {id} did not finish")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(seconds)
}

/// Run `gantry bench startup`: a coordinator and one worker of `harness.gantry`, then
/// `repeat` jobs of `nproc` ranks timed from submit to every rank's first step.
pub fn run(config: &StartupBenchConfig, harness: &Harness) -> Result<StartupReport> {
    config.validate()?;
    let dir = harness.scratch("startup")?;
    let spec = write_job(harness, &dir, config.nproc)?;
    let (coordinator, addr) = harness.start_coordinator(&dir.join("coordinator"), 100, 10.0)?;
    let worker_state = dir.join("worker");
    let worker = Daemon(
        harness
            .gantry()
            .args(["worker", "--coordinator", &addr, "--token", TOKEN, "--name", "bench"])
            .args(["--slots", &config.nproc.to_string()])
            .arg("--state")
            .arg(&worker_state)
            .env("GANTRY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(BenchError::io("cannot start the worker", &harness.gantry))?,
    );
    let client = Client { harness, addr: &addr };
    client.wait_for_worker()?;
    let mut seconds = Vec::new();
    for _ in 0..config.repeat {
        seconds.push(time_one_job(&client, &spec, &worker_state, config.nproc)?);
    }
    drop(worker);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(StartupReport {
        nproc: config.nproc,
        median_s: stats::quantile_rounded(&seconds, 0.5),
        seconds,
    })
}
