//! Helpers shared by the worker's integration tests: temporary state directories, rank
//! assignments, and waiting for rank states with generous liveness bounds.
#![allow(dead_code)]

use gantry_coordinator::proto::{CommandProgram, JobProgram, RankAssignment, job_program};
use gantry_worker::launch::LaunchContext;
use gantry_worker::metrics::Metrics;
use gantry_worker::{Event, LiveRanks, RankKey, RankState, Supervisor, SupervisorConfig};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Liveness bound for anything a test waits for; never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("gantry-worker-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Harness {
    pub supervisor: Supervisor,
    pub live: Arc<LiveRanks>,
    pub metrics: Arc<Metrics>,
    pub dir: TempDir,
}

pub fn harness(tag: &str, grace: Duration, has_gpus: bool) -> Harness {
    harness_with_env(tag, grace, has_gpus, std::env::vars_os().collect())
}

/// A harness whose ranks start from `env` instead of this test process's environment.
pub fn harness_with_env(tag: &str, grace: Duration, has_gpus: bool, env: Vec<(OsString, OsString)>) -> Harness {
    let dir = TempDir::new(tag);
    let launch = LaunchContext {
        state_dir: dir.path().join("state"),
        rank_program: PathBuf::from("gantry"),
        has_gpus,
        advertise_host: None,
        env: env.into(),
    };
    let live = Arc::new(LiveRanks::default());
    let metrics = Arc::new(Metrics::new());
    let supervisor = Supervisor::new(SupervisorConfig { launch, grace }, live.clone(), metrics.clone());
    Harness {
        supervisor,
        live,
        metrics,
        dir,
    }
}

impl Harness {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

pub fn key(job: u64, attempt: u32, rank: u32) -> RankKey {
    RankKey { job, attempt, rank }
}

pub fn command(key: RankKey, argv: &[&str], workdir: &str) -> RankAssignment {
    let program = CommandProgram {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        workdir: workdir.to_string(),
    };
    RankAssignment {
        job: key.job,
        attempt: key.attempt,
        rank: key.rank,
        world_size: 2,
        local_rank: key.rank,
        local_world_size: 2,
        master_addr: "127.0.0.1".into(),
        master_port: 29611,
        gpus: Vec::new(),
        program: Some(JobProgram {
            kind: Some(job_program::Kind::Command(program)),
        }),
        dp: 2,
        tp: 1,
        pp: 1,
        resume: false,
        job_name: "test-job".into(),
        env: [("GANTRY_TEST_JOB_ENV".to_string(), "from-the-job".to_string())].into(),
        job_secret: "worker-test-job-secret-0123456789".into(),
    }
}

pub fn shell(key: RankKey, script: &str) -> RankAssignment {
    command(key, &["sh", "-c", script], "")
}

pub fn train(key: RankKey, spec: &str, resume: bool) -> RankAssignment {
    RankAssignment {
        program: Some(JobProgram {
            kind: Some(job_program::Kind::TrainSpecToml(spec.to_string())),
        }),
        resume,
        ..command(key, &["unused"], "")
    }
}

/// Drives the supervisor until `key` has exited; returns its final state.
pub async fn wait_exit(sup: &mut Supervisor, key: RankKey) -> RankState {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(state @ RankState::Exited { .. }) = sup.state(key) {
            return state.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sup.next_event()).await {
            Ok(_) => {}
            Err(_) => panic!("{key} did not exit within {PATIENCE:?}; state {:?}", sup.state(key)),
        }
    }
}

/// Drives the supervisor until `key` has exited, collecting events.
pub async fn wait_exit_events(sup: &mut Supervisor, key: RankKey) -> (RankState, Vec<Event>) {
    let deadline = Instant::now() + PATIENCE;
    let mut events = Vec::new();
    loop {
        if let Some(state @ RankState::Exited { .. }) = sup.state(key) {
            return (state.clone(), events);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sup.next_event()).await {
            Ok(e) => events.push(e),
            Err(_) => panic!("{key} did not exit within {PATIENCE:?}; state {:?}", sup.state(key)),
        }
    }
}

/// Polls `check` (every 20 ms) until it holds, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Whether `pid` is gone: no such process, or a zombie nobody reaped yet (in a container
/// without an init that reaps, orphans stay zombies; they no longer run).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}
