//! `gantry launch --nproc N -- PROGRAM ARGS…`: run any command as N ranks with torchrun's
//! environment, so an existing PyTorch script (or anything reading RANK / WORLD_SIZE /
//! MASTER_ADDR / MASTER_PORT) runs unchanged; and, under Slurm, `gantry launch -- PROGRAM`
//! becomes that program with the task's torchrun environment.
//!
//! Like torchrun, the launcher hosts no store: it picks a free port and rank 0 of the program
//! serves the store there (torch's `env://` init; gantry's `Fabric::from_bootstrap`). Like
//! torchrun's agent, it stops every rank when one fails (SIGTERM, then SIGKILL after a grace
//! period) and exits with that rank's code; the local rank supervisor (`local_ranks.rs`) does
//! the spawning and stopping. Like torchrun, the program inherits the user's whole environment
//! (the worker's scrubbing of secrets is for ranks a daemon starts on someone's behalf); the
//! variables themselves are written by `gantry_collectives::rank_env`, as for every launcher.
//!
//! Job secrets (the data plane's authentication, `gantry_collectives::auth`): `--nproc`
//! generates one per run (bound to its run id). A Slurm task takes the user's
//! ([`slurm_auth`]): `GANTRY_JOB_SECRET`, else the file `GANTRY_JOB_SECRET_FILE` names, else,
//! for a training step, one task 0 generates and shares through the run directory; a
//! command step without either gets none, and gantry ranks in it refuse to start.

use crate::local_ranks::{End, LocalRanks, Outcome, RankCommand, Stop, StopPolicy, signal_name};
use crate::slurm::SlurmEnv;
use anyhow::{Context, bail};
use gantry_collectives::auth::{JobAuth, JobSecret};
use gantry_collectives::rank_env::{Bootstrap, Elastic, HostCores, NodePlace, RankEnv, RankProgram, thread_defaults};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long ranks get between SIGTERM and SIGKILL (torchrun's default is 30 s; a rank that
/// lingers this long after a peer died is only holding its devices).
const GRACE: Duration = Duration::from_secs(5);

/// The environment torchrun's elastic agent gives a worker: the rank's place (with its job
/// secret), the node's, a run id shared by every rank, the restarts before this one, and
/// torchrun's thread rule for a program gantry does not know (one OpenMP thread per rank when
/// several share the node, unless the user chose).
pub fn torchrun_env(place: Bootstrap, node: NodePlace, run_id: String, restart_count: u32) -> RankEnv {
    let ranks_here = place.local_world;
    RankEnv {
        threads: Some(thread_defaults(RankProgram::Foreign, ranks_here, HostCores::measure())),
        elastic: Some(Elastic {
            run_id,
            restart_count,
            node: Some(node),
        }),
        ..RankEnv::new(place)
    }
}

/// This Slurm task as torchrun would place it: rank 0 serves the store at the step's
/// `MASTER_ADDR:master_port`, the node is `SLURM_NODEID` of the nodelist, the run is the job,
/// its restarts Slurm's requeues; `auth` is the step's job secret ([`slurm_auth`]).
pub fn slurm_env(s: &SlurmEnv, master_port: u16, auth: Option<JobAuth>) -> RankEnv {
    let place = Bootstrap {
        rank: s.rank,
        world: s.world,
        local_rank: s.local_rank,
        local_world: s.local_world,
        master_addr: s.master_addr.clone(),
        master_port,
        store_external: false,
        own_gpus: false,
        auth,
    };
    let node = NodePlace {
        group_rank: s.node_rank,
        group_world: s.nodes,
    };
    torchrun_env(place, node, s.job_id.clone(), s.restart_count)
}

/// How long the other tasks wait for task 0's generated secret (the rendezvous's own default).
const SECRET_WAIT: Duration = Duration::from_secs(300);

/// A Slurm step's job secret, bound to the Slurm job id and attempt (requeues + 1):
/// 1. `GANTRY_JOB_SECRET`, exported before `sbatch` (srun passes the environment on);
/// 2. else the file `GANTRY_JOB_SECRET_FILE` names (on a filesystem every node sees, mode
///    0600; surrounding whitespace ignored);
/// 3. else, for a training step (`share_in` = its run directory, which every task must see),
///    one that task 0 generates and writes to `<run dir>/.job-secret-<job>.<step>.<restart>`
///    (mode 0600, written whole then renamed); the other tasks wait for it up to 5 minutes;
/// 4. else (a command step) none: gantry ranks in the command then refuse to start unless
///    `GANTRY_INSECURE_NO_AUTH=1`.
pub fn slurm_auth(s: &SlurmEnv, share_in: Option<&Path>) -> anyhow::Result<Option<JobAuth>> {
    slurm_auth_from(s, share_in, |k| std::env::var(k).ok(), SECRET_WAIT)
}

/// [`slurm_auth`] with the environment read through `get`, waiting up to `wait`.
fn slurm_auth_from(
    s: &SlurmEnv,
    share_in: Option<&Path>,
    get: impl Fn(&str) -> Option<String>,
    wait: Duration,
) -> anyhow::Result<Option<JobAuth>> {
    let bind = |secret| {
        Some(JobAuth::new(
            secret,
            s.job_id.clone(),
            s.restart_count.saturating_add(1),
        ))
    };
    if let Some(text) = get("GANTRY_JOB_SECRET").filter(|v| !v.trim().is_empty()) {
        return Ok(bind(JobSecret::parse(&text).context("GANTRY_JOB_SECRET")?));
    }
    if let Some(path) = get("GANTRY_JOB_SECRET_FILE").filter(|v| !v.is_empty()) {
        return Ok(bind(read_secret_file(Path::new(&path))?));
    }
    let Some(dir) = share_in else { return Ok(None) };
    let path = dir.join(shared_secret_name(s));
    let secret = if s.rank == 0 {
        let secret = JobSecret::generate()?;
        write_secret_file(&path, &secret)?;
        secret
    } else {
        wait_for_secret_file(&path, wait)?
    };
    Ok(bind(secret))
}

/// `.job-secret-<job>.<step>.<restart>`: one per step and requeue, so a task never reads an
/// earlier run's (characters other than letters, digits, `-` and `_` become `_`).
fn shared_secret_name(s: &SlurmEnv) -> String {
    let clean = |v: &str| -> String {
        v.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        ".job-secret-{}.{}.{}",
        clean(&s.job_id),
        clean(&s.step_id),
        s.restart_count
    )
}

/// A secret file the user names: one line; its content never appears in an error.
fn read_secret_file(path: &Path) -> anyhow::Result<JobSecret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "the job secret file is readable by other users; chmod 600 it"
        );
    }
    JobSecret::parse(&text).with_context(|| format!("job secret file {}", path.display()))
}

/// Write `secret` to `path` as only its owner may read it: a fresh temporary file, then a rename.
fn write_secret_file(path: &Path, secret: &JobSecret) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(secret.expose().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Wait until task 0's secret file appears (it is renamed into place whole), then read it.
fn wait_for_secret_file(path: &Path, wait: Duration) -> anyhow::Result<JobSecret> {
    let until = Instant::now() + wait;
    while !path.exists() {
        if Instant::now() >= until {
            bail!(
                "waited {}s for task 0's job secret at {}: is the run directory on a filesystem every \
                 node sees? If not, export GANTRY_JOB_SECRET (or GANTRY_JOB_SECRET_FILE) before sbatch",
                wait.as_secs(),
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    read_secret_file(path)
}

/// A port free right now on 127.0.0.1 (bind to 0, read, release), as torchrun picks one for
/// a standalone run; rank 0 binds it again moments later.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port for MASTER_PORT")?;
    Ok(l.local_addr()?.port())
}

/// `gantry launch -- PROGRAM` as one Slurm task: become the program, with this task's
/// torchrun environment (signals and the exit code are then the program's own).
pub fn exec_slurm_task(slurm: &SlurmEnv, master_port: u16, program: &[OsString]) -> anyhow::Result<ExitCode> {
    let auth = slurm_auth(slurm, None)?;
    let err = Command::new(&program[0])
        .args(&program[1..])
        .env_clear()
        .envs(slurm_env(slurm, master_port, auth).environment(std::env::vars_os()))
        .exec();
    bail!("cannot run `{}`: {err}", program[0].to_string_lossy())
}

/// `gantry launch --nproc N -- PROGRAM ARGS…`: N ranks on this host, as torchrun's standalone
/// mode runs them.
pub fn launch_local(
    nproc: usize,
    master_port: Option<u16>,
    json: bool,
    program: &[OsString],
) -> anyhow::Result<ExitCode> {
    let master_port = match master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let run_id = format!("gantry-{}-{:x}", std::process::id(), nanos);
    // One secret per run, replacing any the user's environment has.
    let auth = JobAuth::new(JobSecret::generate()?, run_id.clone(), 1);
    let parent: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let single_node = NodePlace {
        group_rank: 0,
        group_world: 1,
    };
    let commands = (0..nproc)
        .map(|rank| {
            let place = Bootstrap {
                auth: Some(auth.clone()),
                ..Bootstrap::local(rank, nproc, master_port, false)
            };
            RankCommand {
                program: program[0].clone(),
                args: program[1..].to_vec(),
                env: torchrun_env(place, single_node, run_id.clone(), 0).environment(parent.iter().cloned()),
                log: None,
            }
        })
        .collect();
    let policy = StopPolicy {
        linger: Duration::ZERO,
        signal: libc::SIGTERM,
        grace: GRACE,
    };
    let outcome = LocalRanks::spawn(commands, None)?.supervise(policy, None, || {});
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary(&outcome, master_port, &run_id))?
        );
    }
    Ok(exit(&outcome))
}

/// `--json`: the run and each rank's exit status.
fn summary(outcome: &Outcome, master_port: u16, run_id: &str) -> serde_json::Value {
    let ranks: Vec<serde_json::Value> = outcome
        .ranks
        .iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::json!({
                "rank": i,
                "pid": r.pid,
                "exit_code": match r.end { End::Code(c) => Some(c), End::Signal(_) => None },
                "signal": match r.end { End::Signal(s) => Some(s), End::Code(_) => None },
                "stopped_by_launcher": r.stopped,
                "status": r.end.describe(),
            })
        })
        .collect();
    serde_json::json!({
        "nproc": outcome.ranks.len(),
        "master_addr": "127.0.0.1",
        "master_port": master_port,
        "run_id": run_id,
        "failed_rank": outcome.failed().map(|(r, _)| r),
        "signal": match outcome.stop { Some(Stop::Signal(s)) => Some(s), _ => None },
        "ranks": ranks,
    })
}

/// The failing rank's exit code (the shell's 128 + signal for a signal), after saying how
/// every rank ended.
fn exit(outcome: &Outcome) -> ExitCode {
    match outcome.stop {
        None => ExitCode::SUCCESS,
        Some(Stop::Failed(i)) => {
            let end = outcome.ranks[i].end;
            let others: Vec<String> = (0..outcome.ranks.len())
                .filter(|&j| j != i)
                .map(|j| format!("rank {j} {}", outcome.ranks[j].end.describe()))
                .collect();
            eprintln!(
                "gantry: rank {i} failed ({}); the others: {}",
                end.describe(),
                if others.is_empty() {
                    "none".to_string()
                } else {
                    others.join(", ")
                }
            );
            ExitCode::from(end.exit_code())
        }
        Some(Stop::Signal(s)) => {
            eprintln!("gantry: stopped by {}", signal_name(s));
            ExitCode::from(End::Signal(s).exit_code())
        }
        // No deadline is given to the supervisor here.
        Some(Stop::Timeout) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(env: &[(OsString, OsString)], k: &str) -> Option<String> {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn environment_keeps_the_users_own_and_sets_torchruns() {
        let node = NodePlace {
            group_rank: 0,
            group_world: 1,
        };
        let t = torchrun_env(Bootstrap::local(1, 2, 29400, false), node, "r".into(), 0);
        let parent = |pairs: &[(&str, &str)]| -> Vec<(OsString, OsString)> {
            pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
        };
        let env = t.environment(parent(&[
            ("PATH", "/bin"),
            ("RANK", "7"),
            ("GANTRY_STORE_EXTERNAL", "1"),
            ("HF_TOKEN", "hf"),
        ]));
        assert_eq!(get(&env, "PATH").as_deref(), Some("/bin"));
        assert_eq!(get(&env, "RANK").as_deref(), Some("1"));
        assert_eq!(get(&env, "MASTER_PORT").as_deref(), Some("29400"));
        assert_eq!(get(&env, "OMP_NUM_THREADS").as_deref(), Some("1"));
        assert_eq!(
            get(&env, "HF_TOKEN").as_deref(),
            Some("hf"),
            "the user's own, as torchrun"
        );
        assert_eq!(get(&env, "GANTRY_STORE_EXTERNAL"), None);
        let env = t.environment(parent(&[("OMP_NUM_THREADS", "4")]));
        assert_eq!(get(&env, "OMP_NUM_THREADS").as_deref(), Some("4"), "the user's choice");
    }

    fn task(rank: usize, job_id: &str) -> SlurmEnv {
        SlurmEnv {
            rank,
            world: 2,
            local_rank: rank,
            local_world: 2,
            node_rank: 0,
            nodes: 1,
            master_addr: "localhost".into(),
            master_port: 29500,
            job_id: job_id.into(),
            step_id: "3".into(),
            restart_count: 1,
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gantry-slurm-auth-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_slurm_steps_secret_comes_from_the_environment_a_file_or_task_0() {
        let none = |_: &str| None;
        let wait = Duration::from_secs(30);
        // The environment's, bound to the job and attempt (requeues + 1).
        let secret = "sbatch-exported-secret-123";
        let auth = slurm_auth_from(
            &task(1, "77"),
            None,
            |k| (k == "GANTRY_JOB_SECRET").then(|| secret.into()),
            wait,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (auth.secret.expose(), auth.job.as_str(), auth.attempt),
            (secret, "77", 2)
        );
        let e = slurm_auth_from(
            &task(0, "77"),
            None,
            |k| (k == "GANTRY_JOB_SECRET").then(|| "short".into()),
            wait,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("at least 16") && !format!("{e:#}").contains("short"),
            "{e:#}"
        );

        // A file the user names (its content never in an error).
        let dir = temp("file");
        let file = dir.join("secret");
        std::fs::write(&file, "from-a-shared-file-0123\n").unwrap();
        let named = |k: &str| (k == "GANTRY_JOB_SECRET_FILE").then(|| file.display().to_string());
        let auth = slurm_auth_from(&task(1, "77"), None, named, wait).unwrap().unwrap();
        assert_eq!(auth.secret.expose(), "from-a-shared-file-0123");
        std::fs::write(&file, "two\nlines-of-secret-material").unwrap();
        let e = format!("{:#}", slurm_auth_from(&task(1, "77"), None, named, wait).unwrap_err());
        assert!(
            e.contains(&file.display().to_string()) && !e.contains("secret-material"),
            "{e}"
        );

        // Neither: a command step gets none; a training step's tasks share task 0's.
        assert!(slurm_auth_from(&task(0, "77"), None, none, wait).unwrap().is_none());
        let run = temp("run");
        let waiter = {
            let run = run.clone();
            std::thread::spawn(move || slurm_auth_from(&task(1, "78"), Some(&run), none, wait))
        };
        let first = slurm_auth_from(&task(0, "78"), Some(&run), none, wait)
            .unwrap()
            .unwrap();
        let second = waiter.join().unwrap().unwrap().unwrap();
        assert_eq!(first, second);
        let shared = run.join(".job-secret-78.3.1");
        assert_eq!(std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777, 0o600);
        // Another step or requeue never reads it; a task whose run directory nobody shares
        // says what to do instead.
        let e = slurm_auth_from(&task(1, "79"), Some(&run), none, Duration::ZERO).unwrap_err();
        assert!(format!("{e:#}").contains("GANTRY_JOB_SECRET_FILE"), "{e:#}");
        for d in [dir, run] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
