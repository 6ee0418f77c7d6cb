//! `gantry launch --nproc N -- PROGRAM ARGS…`: run any command as N ranks with torchrun's
//! environment, so an existing PyTorch script (or anything reading RANK / WORLD_SIZE /
//! MASTER_ADDR / MASTER_PORT) runs unchanged; and, under Slurm, `gantry launch -- PROGRAM`
//! becomes that program with the task's torchrun environment.
//!
//! Like torchrun, the launcher hosts no store: it picks a free port and rank 0 of the program
//! serves the store there (torch's `env://` init; gantry's `Fabric::from_env`). Like torchrun's
//! agent, it stops every rank when one fails and exits with that rank's code. Like torchrun,
//! the program inherits the user's whole environment (the worker's scrubbing of secrets is
//! for ranks a daemon starts on someone's behalf).

use crate::slurm::SlurmEnv;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long ranks get between SIGTERM and SIGKILL (torchrun's default is 30 s; a rank that
/// lingers this long after a peer died is only holding its devices).
const GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// One rank's place, as torchrun's elastic agent describes it to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    pub local_world: usize,
    /// The node's index (torchrun's `GROUP_RANK`) and the number of nodes.
    pub group_rank: usize,
    pub group_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The same for every rank of a run.
    pub run_id: String,
}

impl TorchEnv {
    pub fn from_slurm(s: &SlurmEnv, master_port: u16) -> TorchEnv {
        TorchEnv {
            rank: s.rank,
            local_rank: s.local_rank,
            world: s.world,
            local_world: s.local_world,
            group_rank: s.node_rank,
            group_world: s.nodes,
            master_addr: s.master_addr.clone(),
            master_port,
            run_id: s.job_id.clone(),
        }
    }

    /// The variables torchrun sets for a worker.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world.to_string()),
            ("GROUP_RANK", self.group_rank.to_string()),
            ("GROUP_WORLD_SIZE", self.group_world.to_string()),
            ("ROLE_NAME", "default".into()),
            ("ROLE_RANK", self.rank.to_string()),
            ("ROLE_WORLD_SIZE", self.world.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("TORCHELASTIC_RESTART_COUNT", "0".into()),
            ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
            ("TORCHELASTIC_RUN_ID", self.run_id.clone()),
            // No agent store here: rank 0 creates the store itself, as with plain env:// init.
            ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
        ]
    }

    /// The complete environment of the rank: the launcher's `parent` environment, then
    /// torchrun's variables. The user's own secrets stay (the user started these processes,
    /// as with torchrun: `HF_TOKEN` and the AWS keys are what a training script reads); the
    /// scrubbing rule is for ranks a daemon starts on someone's behalf (`gantry_worker::scrub`).
    pub fn environment<I>(&self, parent: I) -> Vec<(OsString, OsString)>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let mut env: BTreeMap<OsString, OsString> = parent.into_iter().collect();
        // Set by gantry's own launcher for ranks that join its store; here rank 0 serves it.
        env.remove(OsStr::new("GANTRY_STORE_EXTERNAL"));
        // torchrun's rule: several ranks on a node each spawning one OpenMP thread per core
        // would oversubscribe it, so one thread each unless the user chose.
        if self.local_world > 1 {
            env.entry("OMP_NUM_THREADS".into()).or_insert_with(|| "1".into());
        }
        env.extend(self.vars().into_iter().map(|(k, v)| (k.into(), v.into())));
        env.into_iter().collect()
    }

    /// A command of `program args…` with this environment (and nothing else inherited).
    fn command(&self, program: &[OsString]) -> Command {
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..])
            .env_clear()
            .envs(self.environment(std::env::vars_os()));
        cmd
    }
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
    let err = TorchEnv::from_slurm(slurm, master_port).command(program).exec();
    bail!("cannot run `{}`: {err}", program[0].to_string_lossy())
}

// ---------------------------------------------------------------- local ranks

/// The last SIGINT/SIGTERM the launcher received (0: none), and how many.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGNALS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomics here: async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Catch SIGINT and SIGTERM so they reach the ranks: each rank has its own process group
/// (so a terminal's Ctrl-C reaches only the launcher), and the launcher forwards.
fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only touches atomics; SA_RESTART so
        // the launcher's own system calls are not interrupted.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!(
                "cannot install a handler for {}: {}",
                signal_name(sig),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

/// How a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Code(i32),
    Signal(i32),
}

impl End {
    fn success(self) -> bool {
        self == End::Code(0)
    }

    /// The launcher's exit code for a rank that ended this way (the shell's 128 + signal).
    fn exit_code(self) -> u8 {
        match self {
            End::Code(c) => c.clamp(0, 255) as u8,
            End::Signal(s) => (128 + s).clamp(0, 255) as u8,
        }
    }

    fn describe(self) -> String {
        match self {
            End::Code(c) => format!("exit code {c}"),
            End::Signal(s) => format!("killed by {}", signal_name(s)),
        }
    }
}

struct Rank {
    child: Child,
    end: Option<End>,
    /// The launcher signalled it (a peer failed, or the launcher was told to stop).
    stopped: bool,
}

impl Rank {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it exited, without reaping it: its pid (and so its process group id) stays
    /// reserved until `reap`, so signalling the group can never reach a reused id.
    fn poll(&mut self) -> Option<End> {
        if self.end.is_none() {
            // SAFETY: waitid on our own child with a zeroed siginfo; WNOWAIT leaves it waitable.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid and si_status are valid for a SIGCHLD-style siginfo from waitid.
            if rc == 0 && unsafe { info.si_pid() } != 0 {
                let status = unsafe { info.si_status() };
                self.end = Some(match info.si_code {
                    libc::CLD_EXITED => End::Code(status),
                    _ => End::Signal(status),
                });
            }
        }
        self.end
    }

    /// Signal the rank's whole process group (its own children too).
    fn signal_group(&mut self, sig: i32) {
        // SAFETY: kill on a process group id that is our unreaped child's pid.
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }
}

/// Why the launcher is stopping the ranks.
#[derive(Clone, Copy)]
enum Stop {
    Failed(usize),
    Signal(i32),
}

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
    install_signal_handlers()?;
    let parent = std::process::id() as libc::pid_t;
    let mut ranks: Vec<Rank> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let env = TorchEnv {
            rank,
            local_rank: rank,
            world: nproc,
            local_world: nproc,
            group_rank: 0,
            group_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port,
            run_id: run_id.clone(),
        };
        let mut cmd = env.command(program);
        // stdin is not shared: a rank in a background process group reading the terminal
        // would be stopped by SIGTTIN and the run would hang.
        cmd.stdin(Stdio::null()).process_group(0);
        // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
        // A rank must not outlive the launcher (it would wait on its peers until their
        // deadlines); if the launcher already died before prctl, give up on this child.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => ranks.push(Rank {
                child,
                end: None,
                stopped: false,
            }),
            Err(e) => {
                for r in &mut ranks {
                    r.signal_group(libc::SIGKILL);
                    let _ = r.child.wait();
                }
                bail!("cannot start rank {rank} (`{}`): {e}", program[0].to_string_lossy());
            }
        }
    }

    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    let mut forwarded = 0;
    loop {
        let received = SIGNALS.load(Ordering::SeqCst);
        if received > forwarded {
            forwarded = received;
            let sig = SIGNAL.load(Ordering::SeqCst);
            // A second signal means: do not wait for the grace period.
            let sig = if received > 1 { libc::SIGKILL } else { sig };
            eprintln!("gantry: got {}; passing it to the ranks", signal_name(sig));
            for r in ranks.iter_mut().filter(|r| r.end.is_none()) {
                r.signal_group(sig);
                r.stopped = true;
            }
            if stop.is_none() {
                stop = Some(Stop::Signal(sig));
            }
            kill_at.get_or_insert(Instant::now() + GRACE);
        }
        for i in 0..ranks.len() {
            if let Some(end) = ranks[i].poll()
                && !end.success()
                && stop.is_none()
            {
                stop = Some(Stop::Failed(i));
                eprintln!("gantry: rank {i} failed ({}); stopping the other ranks", end.describe());
                for (j, r) in ranks.iter_mut().enumerate() {
                    // The failed rank's group too: it may have left children behind.
                    r.signal_group(libc::SIGTERM);
                    r.stopped |= j != i && r.end.is_none();
                }
                kill_at = Some(Instant::now() + GRACE);
            }
        }
        if ranks.iter().all(|r| r.end.is_some()) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for r in ranks.iter_mut().filter(|r| r.end.is_none()) {
                r.signal_group(libc::SIGKILL);
            }
            kill_at = None;
        }
        std::thread::sleep(POLL);
    }
    if stop.is_some() {
        // Whatever the ranks started and left behind in their groups goes with them.
        for r in &mut ranks {
            r.signal_group(libc::SIGKILL);
        }
    }
    for r in &mut ranks {
        let _ = r.child.wait();
    }

    if json {
        let summary = serde_json::json!({
            "nproc": nproc,
            "master_addr": "127.0.0.1",
            "master_port": master_port,
            "run_id": run_id,
            "failed_rank": match stop { Some(Stop::Failed(r)) => Some(r), _ => None },
            "signal": match stop { Some(Stop::Signal(s)) => Some(s), _ => None },
            "ranks": ranks.iter().enumerate().map(|(i, r)| {
                let end = r.end.expect("every rank ended");
                serde_json::json!({
                    "rank": i,
                    "pid": r.child.id(),
                    "exit_code": match end { End::Code(c) => Some(c), End::Signal(_) => None },
                    "signal": match end { End::Signal(s) => Some(s), End::Code(_) => None },
                    "stopped_by_launcher": r.stopped,
                    "status": end.describe(),
                })
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(match stop {
        None => ExitCode::SUCCESS,
        Some(Stop::Failed(i)) => {
            let end = ranks[i].end.expect("the failed rank ended");
            let others: Vec<String> = ranks
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(j, r)| format!("rank {j} {}", r.end.expect("every rank ended").describe()))
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
    })
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
        let t = TorchEnv {
            rank: 1,
            local_rank: 1,
            world: 2,
            local_world: 2,
            group_rank: 0,
            group_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 29400,
            run_id: "r".into(),
        };
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
