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

use crate::local_ranks::{End, LocalRanks, Outcome, RankCommand, Stop, StopPolicy, signal_name};
use crate::slurm::SlurmEnv;
use anyhow::{Context, bail};
use gantry_collectives::rank_env::{Bootstrap, Elastic, HostCores, NodePlace, RankEnv, RankProgram, thread_defaults};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long ranks get between SIGTERM and SIGKILL (torchrun's default is 30 s; a rank that
/// lingers this long after a peer died is only holding its devices).
const GRACE: Duration = Duration::from_secs(5);

/// The environment torchrun's elastic agent gives a worker: the rank's place, the node's, a run
/// id shared by every rank, no restarts, and torchrun's thread rule for a program gantry does
/// not know (one OpenMP thread per rank when several share the node, unless the user chose).
pub fn torchrun_env(place: Bootstrap, node: NodePlace, run_id: String) -> RankEnv {
    let ranks_here = place.local_world;
    RankEnv {
        threads: Some(thread_defaults(RankProgram::Foreign, ranks_here, HostCores::measure())),
        elastic: Some(Elastic {
            run_id,
            restart_count: 0,
            node: Some(node),
        }),
        ..RankEnv::new(place)
    }
}

/// This Slurm task as torchrun would place it: rank 0 serves the store at the step's
/// `MASTER_ADDR:master_port`, the node is `SLURM_NODEID` of the nodelist, the run is the job.
pub fn slurm_env(s: &SlurmEnv, master_port: u16) -> RankEnv {
    let place = Bootstrap {
        rank: s.rank,
        world: s.world,
        local_rank: s.local_rank,
        local_world: s.local_world,
        master_addr: s.master_addr.clone(),
        master_port,
        store_external: false,
        own_gpus: false,
    };
    let node = NodePlace {
        group_rank: s.node_rank,
        group_world: s.nodes,
    };
    torchrun_env(place, node, s.job_id.clone())
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
    let err = Command::new(&program[0])
        .args(&program[1..])
        .env_clear()
        .envs(slurm_env(slurm, master_port).environment(std::env::vars_os()))
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
    let parent: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let single_node = NodePlace {
        group_rank: 0,
        group_world: 1,
    };
    let commands = (0..nproc)
        .map(|rank| {
            let place = Bootstrap::local(rank, nproc, master_port, false);
            RankCommand {
                program: program[0].clone(),
                args: program[1..].to_vec(),
                env: torchrun_env(place, single_node, run_id.clone()).environment(parent.iter().cloned()),
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
        let t = torchrun_env(Bootstrap::local(1, 2, 29400, false), node, "r".into());
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
}
