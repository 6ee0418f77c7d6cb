//! How one rank process is started: where its files go, what environment it gets (the
//! worker's scrubbed environment, then what `gantry_collectives::rank_env` writes for every
//! launcher, then the job's own), which program runs, and the per-rank thread that spawns it
//! and waits for it.
//!
//! Each rank gets its own OS thread that spawns the process and then blocks in `wait()`.
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process,
//! so the spawning thread must outlive the rank: a thread that waits for its child does
//! exactly that, and a runtime worker thread (which a runtime may retire) would not.

use crate::error::StartError;
use crate::reconcile::RankKey;
use crate::scrub;
use gantry_collectives::auth::{JobAuth, JobSecret};
use gantry_collectives::rank_env::{
    Bootstrap, Elastic, HostCores, JobEnv, OmpWait, RankEnv, RankProgram, thread_defaults,
};
use gantry_coordinator::proto::{RankAssignment, job_program};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// `<state_dir>/jobs/<job>/attempt-<attempt>`: the rank's working files and, for commands
/// without a `workdir`, its working directory.
pub fn run_dir(state_dir: &Path, job: u64, attempt: u32) -> PathBuf {
    state_dir
        .join("jobs")
        .join(job.to_string())
        .join(format!("attempt-{attempt}"))
}

/// Where the rank's stdout and stderr go.
pub fn log_path(state_dir: &Path, key: RankKey) -> PathBuf {
    run_dir(state_dir, key.job, key.attempt).join(format!("rank-{}.log", key.rank))
}

/// Where the rank writes its progress (`GANTRY_PROGRESS_FILE`).
pub fn progress_path(state_dir: &Path, key: RankKey) -> PathBuf {
    run_dir(state_dir, key.job, key.attempt).join(format!("rank-{}.progress.json", key.rank))
}

/// What every launch on this worker shares.
#[derive(Clone, Debug)]
pub struct LaunchContext {
    pub state_dir: PathBuf,
    /// The `gantry` binary that runs training ranks (`gantry rank …`).
    pub rank_program: PathBuf,
    /// The worker has GPUs, so a rank without GPUs is hidden from them.
    pub has_gpus: bool,
    /// Passed as `GANTRY_ADVERTISE_HOST` (the address peers reach ranks at) when the worker
    /// was told its address explicitly; otherwise ranks find their route themselves.
    pub advertise_host: Option<String>,
    /// The environment ranks start from: the worker's own, as the binary read it at start.
    /// Secrets are removed from it for every rank ([`rank_env`]).
    pub env: Arc<[(OsString, OsString)]>,
}

/// The complete environment of a rank: what it inherits from `ctx.env` (the worker's own
/// environment) minus secrets ([`crate::scrub`]; the job's [`scrub::ENV_PASS`] keeps the ones
/// it names), then the variables [`torchrun_and_gantry`] describes and `CUDA_VISIBLE_DEVICES`,
/// then the job's own `env`. `host` is this host's cores as the worker measured them just
/// before starting the rank (the thread policy's input).
///
/// Gantry's variables replace inherited ones of the same name; `GANTRY_LOG`,
/// `OMP_WAIT_POLICY` (training ranks) and `GANTRY_ADVERTISE_HOST` are only defaults, so the
/// worker's own settings win; the job's `env` wins over everything.
pub fn rank_env(a: &RankAssignment, ctx: &LaunchContext, host: HostCores) -> Vec<(OsString, OsString)> {
    let pass = a
        .env
        .get(scrub::ENV_PASS)
        .map(|l| scrub::parse_pass(l))
        .unwrap_or_default();
    let mut env: BTreeMap<OsString, OsString> = scrub::inherited(ctx.env.iter().cloned(), &pass).into_iter().collect();
    let parent_visible = env.get(OsStr::new("CUDA_VISIBLE_DEVICES")).cloned();
    torchrun_and_gantry(a, ctx, host).apply(&mut env);
    let parent_visible = parent_visible.as_deref().and_then(OsStr::to_str);
    if let Some(visible) = visible_devices(&a.gpus, ctx.has_gpus, parent_visible) {
        env.insert("CUDA_VISIBLE_DEVICES".into(), visible.into());
    }
    // The job's own variables last, so they win over gantry's and the worker's.
    for (k, v) in &a.env {
        env.insert(k.into(), v.into());
    }
    env.into_iter().collect()
}

/// The rank as the collectives' environment writer describes it: torchrun's place and restart
/// variables (no node or role variables: the coordinator places ranks, not nodes), the
/// attempt's job secret ([`job_auth`]), gantry's job variables, `GANTRY_LOG=info` and the
/// advertised host as defaults, and for training ranks the thread policy (their threads per
/// rank are not known here: the spec's, else libtorch's every core).
fn torchrun_and_gantry(a: &RankAssignment, ctx: &LaunchContext, host: HostCores) -> RankEnv {
    let key = RankKey {
        job: a.job,
        attempt: a.attempt,
        rank: a.rank,
    };
    let is_train = matches!(
        a.program.as_ref().and_then(|p| p.kind.as_ref()),
        Some(job_program::Kind::TrainSpecToml(_))
    );
    let local_world = a.local_world_size as usize;
    RankEnv {
        place: Bootstrap {
            rank: a.rank as usize,
            world: a.world_size as usize,
            local_rank: a.local_rank as usize,
            local_world,
            master_addr: a.master_addr.clone(),
            // The coordinator hands out ports of the worker's lent range (u16).
            master_port: u16::try_from(a.master_port).unwrap_or(0),
            store_external: false,
            // rank_env narrows CUDA_VISIBLE_DEVICES to the GPUs the coordinator gave this rank.
            own_gpus: ctx.has_gpus && !a.gpus.is_empty(),
            auth: job_auth(a),
        },
        elastic: Some(Elastic {
            run_id: format!("gantry-{}", a.job),
            // torchelastic counts restarts from 0; gantry counts attempts from 1.
            restart_count: a.attempt.saturating_sub(1),
            node: None,
        }),
        job: Some(JobEnv {
            job_id: a.job,
            job_name: a.job_name.clone(),
            attempt: a.attempt,
            progress_file: progress_path(&ctx.state_dir, key),
        }),
        threads: is_train.then(|| {
            thread_defaults(
                // The job's `train.omp_wait` reaches here as `OMP_WAIT_POLICY` in its env
                // (`gantry submit` puts it there), which wins over this default.
                RankProgram::Gantry {
                    threads_per_rank: 0,
                    wait: OmpWait::Auto,
                },
                local_world,
                host,
            )
        }),
        log: Some("info".into()),
        advertise_host: ctx.advertise_host.clone(),
    }
}

/// The attempt's data-plane secret from the coordinator, bound to the job id and attempt
/// (`GANTRY_JOB_SECRET`, `GANTRY_AUTH_JOB`, `GANTRY_AUTH_ATTEMPT`). An empty one (a
/// coordinator from before job secrets) gives the rank none: a gantry rank then refuses to
/// start unless the job's env sets `GANTRY_INSECURE_NO_AUTH=1`.
fn job_auth(a: &RankAssignment) -> Option<JobAuth> {
    if a.job_secret.is_empty() {
        return None;
    }
    match JobSecret::parse(&a.job_secret) {
        Ok(secret) => Some(JobAuth::new(secret, a.job.to_string(), a.attempt)),
        Err(e) => {
            tracing::warn!(
                job = a.job,
                attempt = a.attempt,
                "the coordinator's job secret is unusable ({e}); the rank gets none"
            );
            None
        }
    }
}

/// `CUDA_VISIBLE_DEVICES` for a rank given GPU indices `gpus` as this worker numbers them.
/// The worker numbers the devices it sees, so when it runs under a `CUDA_VISIBLE_DEVICES`
/// of its own, index i means the i-th entry of that list, not physical GPU i.
fn visible_devices(gpus: &[u32], has_gpus: bool, parent: Option<&str>) -> Option<String> {
    if gpus.is_empty() {
        // A CPU rank must not grab a GPU (CUDA libraries default to device 0).
        return has_gpus.then(String::new);
    }
    let parent: Vec<&str> = parent
        .map(|p| p.split(',').map(str::trim).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let mapped: Vec<String> = gpus
        .iter()
        .map(|&i| match parent.get(i as usize) {
            Some(entry) => (*entry).to_string(),
            None => i.to_string(),
        })
        .collect();
    Some(mapped.join(","))
}

/// How a rank process ended, as the per-rank thread saw it.
#[derive(Debug)]
pub(crate) struct ExitEvent {
    pub key: RankKey,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when waiting for the process failed (the status is then unknown).
    pub error: Option<String>,
}

/// Starts the rank on its own thread. Replies with the pid (or why it could not start) on
/// `started`; when the process ends, sends its status on `exits`.
pub(crate) fn spawn_rank(
    key: RankKey,
    assignment: RankAssignment,
    ctx: LaunchContext,
    started: oneshot::Sender<Result<u32, StartError>>,
    exits: mpsc::UnboundedSender<ExitEvent>,
) -> Result<(), StartError> {
    let body = move || {
        let mut child = match prepare(key, &assignment, &ctx)
            .and_then(|(mut cmd, program)| cmd.spawn().map_err(|source| StartError::Spawn { key, program, source }))
        {
            Ok(child) => child,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let pid = child.id();
        let _ = started.send(Ok(pid));
        let (code, signal, error) = match child.wait() {
            Ok(status) => (status.code(), status.signal(), None),
            Err(e) => (None, None, Some(format!("cannot wait for pid {pid}: {e}"))),
        };
        // The rank is over; whatever it left running in its process group goes with it.
        crate::supervisor::kill_group(pid, libc::SIGKILL);
        let _ = exits.send(ExitEvent {
            key,
            code,
            signal,
            error,
        });
    };
    std::thread::Builder::new()
        .name(format!("rank-{}-{}-{}", key.job, key.attempt, key.rank))
        .spawn(body)
        .map(drop)
        .map_err(|source| StartError::Thread { key, source })
}

/// Creates the run directory and log file and builds the command; returns it with the
/// program's name (for error messages).
fn prepare(key: RankKey, a: &RankAssignment, ctx: &LaunchContext) -> Result<(Command, String), StartError> {
    let dir = run_dir(&ctx.state_dir, key.job, key.attempt);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StartError::Io { key, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // A progress file left by an earlier run in a reused state directory is not this rank's.
    let progress = progress_path(&ctx.state_dir, key);
    match std::fs::remove_file(&progress) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&progress)(e)),
        _ => {}
    }
    let log = log_path(&ctx.state_dir, key);
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io(&log))?;
    let err = out.try_clone().map_err(io(&log))?;

    let kind = a
        .program
        .as_ref()
        .and_then(|p| p.kind.as_ref())
        .ok_or(StartError::NoProgram { key })?;
    let (mut cmd, program) = match kind {
        job_program::Kind::TrainSpecToml(toml) => {
            let spec = write_spec(&dir, key, toml).map_err(io(&dir.join("spec.toml")))?;
            let mut cmd = Command::new(&ctx.rank_program);
            cmd.arg("rank").arg("--spec").arg(&spec).arg("--run-dir").arg(&dir);
            cmd.arg("--set").arg(format!("parallel.dp={}", a.dp));
            if a.resume {
                cmd.arg("--resume-auto");
            }
            cmd.current_dir(&dir);
            (cmd, ctx.rank_program.display().to_string())
        }
        job_program::Kind::Command(c) => {
            let (program, args) = c.argv.split_first().ok_or(StartError::EmptyArgv { key })?;
            let workdir = if c.workdir.is_empty() {
                dir.clone()
            } else {
                PathBuf::from(&c.workdir)
            };
            // Checked here because spawn reports a missing directory as ENOENT, which reads
            // as if the program were missing.
            let bad_dir = |reason: String| StartError::Workdir {
                key,
                program: program.clone(),
                path: workdir.clone(),
                reason,
            };
            match std::fs::metadata(&workdir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(bad_dir("not a directory".into())),
                Err(e) => return Err(bad_dir(e.to_string())),
            }
            let mut cmd = Command::new(program);
            cmd.args(args).current_dir(&workdir);
            (cmd, program.clone())
        }
    };
    // Nothing inherited implicitly: the daemon's secrets must not reach the job.
    cmd.env_clear().envs(rank_env(a, ctx, HostCores::measure()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let worker = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (setsid, prctl, getppid), no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session, so its own process group (stopping the rank reaches every
            // process it started) and, where the kernel shares CPU time per session
            // (sched_autogroup), a share of its own rather than a slice of the daemon's, as
            // torchrun gives its workers.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Ranks die with their worker: a killed worker daemon is a lost node, and ranks
            // left behind would hold GPUs and ports the next attempt needs.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The worker may have died between fork and prctl; then nobody would kill us.
            if libc::getppid() != worker {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    Ok((cmd, program))
}

/// Writes the spec to `<dir>/spec.toml` through a per-rank temporary file and a rename, so
/// ranks of one attempt starting together never read each other's half-written copy.
fn write_spec(dir: &Path, key: RankKey, toml: &str) -> std::io::Result<PathBuf> {
    let path = dir.join("spec.toml");
    let tmp = dir.join(format!(".spec.toml.rank-{}.tmp", key.rank));
    let mut f = File::create(&tmp)?;
    f.write_all(toml.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_coordinator::proto::{CommandProgram, JobProgram};

    fn ctx(has_gpus: bool) -> LaunchContext {
        with_env(has_gpus, &[])
    }

    fn with_env(has_gpus: bool, env: &[(&str, &str)]) -> LaunchContext {
        LaunchContext {
            state_dir: PathBuf::from("/state"),
            rank_program: PathBuf::from("gantry"),
            has_gpus,
            advertise_host: None,
            env: env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }

    fn assignment(gpus: Vec<u32>, train: bool) -> RankAssignment {
        let kind = if train {
            job_program::Kind::TrainSpecToml("[model]\n".into())
        } else {
            job_program::Kind::Command(CommandProgram {
                argv: vec!["true".into()],
                workdir: String::new(),
            })
        };
        RankAssignment {
            job: 12,
            attempt: 3,
            rank: 5,
            world_size: 8,
            local_rank: 1,
            local_world_size: 4,
            master_addr: "10.0.0.7".into(),
            master_port: 29517,
            gpus,
            program: Some(JobProgram { kind: Some(kind) }),
            dp: 2,
            tp: 2,
            pp: 2,
            resume: true,
            job_name: "tiny".into(),
            env: [("JOB_VAR".to_string(), "from-the-job".to_string())].into(),
            job_secret: SECRET.into(),
        }
    }

    const SECRET: &str = "0123456789abcdef-attempt-secret";

    fn get(env: &[(OsString, OsString)], k: &str) -> Option<String> {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn torchrun_and_gantry_variables() {
        let env = rank_env(&assignment(vec![], false), &ctx(false), HostCores::idle(8));
        let want = [
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29517"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_RUN_ID", "gantry-12"),
            ("GANTRY_JOB_ID", "12"),
            ("GANTRY_JOB_NAME", "tiny"),
            ("GANTRY_ATTEMPT", "3"),
            ("GANTRY_PROGRESS_FILE", "/state/jobs/12/attempt-3/rank-5.progress.json"),
            ("GANTRY_LOG", "info"),
            ("JOB_VAR", "from-the-job"),
            ("GANTRY_JOB_SECRET", SECRET),
            ("GANTRY_AUTH_JOB", "12"),
            ("GANTRY_AUTH_ATTEMPT", "3"),
        ];
        for (k, v) in want {
            assert_eq!(get(&env, k).as_deref(), Some(v), "{k}");
        }
        // Nothing else: an empty worker environment gives nothing more.
        assert_eq!(env.len(), want.len(), "{env:?}");
        // No GPUs anywhere: leave CUDA_VISIBLE_DEVICES alone; commands get no OMP policy.
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES"), None);
        assert_eq!(get(&env, "OMP_WAIT_POLICY"), None);
        assert_eq!(get(&env, "GANTRY_ADVERTISE_HOST"), None);
    }

    #[test]
    fn the_workers_own_settings_win() {
        let mut c = with_env(
            false,
            &[
                ("GANTRY_LOG", "debug"),
                ("OMP_WAIT_POLICY", "ACTIVE"),
                ("GANTRY_ADVERTISE_HOST", "10.9.9.9"),
            ],
        );
        c.advertise_host = Some("10.0.0.1".into());
        let env = rank_env(&assignment(vec![], true), &c, HostCores::idle(8));
        assert_eq!(
            get(&env, "GANTRY_LOG").as_deref(),
            Some("debug"),
            "inherited, not overridden"
        );
        assert_eq!(get(&env, "OMP_WAIT_POLICY").as_deref(), Some("ACTIVE"));
        assert_eq!(get(&env, "GANTRY_ADVERTISE_HOST").as_deref(), Some("10.9.9.9"));
        c.env = Arc::from([]);
        let env = rank_env(&assignment(vec![], true), &c, HostCores::idle(8));
        assert_eq!(get(&env, "OMP_WAIT_POLICY").as_deref(), Some("PASSIVE"));
        assert_eq!(get(&env, "GANTRY_ADVERTISE_HOST").as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn inherited_variables_without_secrets() {
        let c = with_env(
            false,
            &[
                ("PATH", "/usr/bin"),
                ("NCCL_DEBUG", "INFO"),
                ("RANK", "99"),
                ("GANTRY_TOKEN", "cluster-secret"),
                ("GANTRY_TOKEN_FILE", "/etc/gantry/token"),
                ("GANTRY_METRICS_TOKEN", "scrape-secret"),
                ("GANTRY_REGISTRY_TOKEN", "registry-secret"),
                ("AWS_ACCESS_KEY_ID", "AKIA"),
                ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
                ("AWS_SESSION_TOKEN", "aws-session"),
            ],
        );
        let mut a = assignment(vec![], false);
        let env = rank_env(&a, &c, HostCores::idle(8));
        assert_eq!(get(&env, "PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(get(&env, "NCCL_DEBUG").as_deref(), Some("INFO"));
        assert_eq!(
            get(&env, "RANK").as_deref(),
            Some("5"),
            "gantry's own replaces the worker's"
        );
        for secret in [
            "GANTRY_TOKEN",
            "GANTRY_TOKEN_FILE",
            "GANTRY_METRICS_TOKEN",
            "GANTRY_REGISTRY_TOKEN",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            assert_eq!(get(&env, secret), None, "{secret} reached the rank");
        }
        // The worker's own job secret (if it has one) is not the attempt's: the coordinator's is.
        let own = with_env(false, &[("GANTRY_JOB_SECRET", "the-workers-own-secret")]);
        let env = rank_env(&a, &own, HostCores::idle(8));
        assert_eq!(get(&env, "GANTRY_JOB_SECRET").as_deref(), Some(SECRET));
        // An assignment without one (an older coordinator) gives the rank none at all.
        let older = RankAssignment {
            job_secret: String::new(),
            ..a.clone()
        };
        let env = rank_env(&older, &own, HostCores::idle(8));
        assert_eq!(get(&env, "GANTRY_JOB_SECRET"), None);
        assert_eq!(get(&env, "GANTRY_AUTH_JOB"), None);
        // The job asks for the AWS key pair by name: those two pass, nothing else does.
        a.env.insert(
            scrub::ENV_PASS.into(),
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY".into(),
        );
        let env = rank_env(&a, &c, HostCores::idle(8));
        assert_eq!(get(&env, "AWS_ACCESS_KEY_ID").as_deref(), Some("AKIA"));
        assert_eq!(get(&env, "AWS_SECRET_ACCESS_KEY").as_deref(), Some("aws-secret"));
        assert_eq!(get(&env, "AWS_SESSION_TOKEN"), None);
        assert_eq!(get(&env, "GANTRY_TOKEN"), None);
        // A value the job sets itself is the job's, secret-looking name or not.
        a.env.insert("HF_TOKEN".into(), "the-jobs-own".into());
        let env = rank_env(&a, &c, HostCores::idle(8));
        assert_eq!(get(&env, "HF_TOKEN").as_deref(), Some("the-jobs-own"));
    }

    #[test]
    fn cuda_visible_devices() {
        let env = rank_env(&assignment(vec![2, 3], false), &ctx(true), HostCores::idle(8));
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES").as_deref(), Some("2,3"));
        // A CPU rank on a GPU worker sees no GPU.
        let env = rank_env(&assignment(vec![], false), &ctx(true), HostCores::idle(8));
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES").as_deref(), Some(""));
        // The worker itself runs under a mask: index i is the i-th visible device.
        let masked = with_env(true, &[("CUDA_VISIBLE_DEVICES", "4,6")]);
        let env = rank_env(&assignment(vec![1], false), &masked, HostCores::idle(8));
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES").as_deref(), Some("6"));
        assert_eq!(visible_devices(&[0, 1], true, Some("4, 6")).as_deref(), Some("4,6"));
        assert_eq!(
            visible_devices(&[1], true, Some("GPU-aa,GPU-bb")).as_deref(),
            Some("GPU-bb")
        );
        assert_eq!(visible_devices(&[1], true, Some("")).as_deref(), Some("1"));
    }

    #[test]
    fn paths() {
        let key = RankKey {
            job: 4,
            attempt: 2,
            rank: 7,
        };
        assert_eq!(
            log_path(Path::new("/s"), key),
            PathBuf::from("/s/jobs/4/attempt-2/rank-7.log")
        );
        assert_eq!(run_dir(Path::new("/s"), 4, 2), PathBuf::from("/s/jobs/4/attempt-2"));
    }
}
