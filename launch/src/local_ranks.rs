//! The one supervisor of rank processes on this host, used by every local launcher
//! (`gantry launch JOB.toml --local N`, `gantry launch --nproc N -- PROGRAM`, `gantry eval
//! --tp T`, `gantry bench collectives`): spawn each rank with its complete environment (written by
//! `gantry_collectives::rank_env`) and its log file, poll, forward SIGINT/SIGTERM, and on the
//! first failure stop the others as the launcher's [`StopPolicy`] says; then tell who failed
//! and how ([`Outcome`], [`tail`], [`last_error`]). The launchers keep only what differs: the
//! program and environment, where output goes, how long peers may linger, and what they print.
//!
//! Each rank runs in its own process group, so stopping a rank reaches whatever it started,
//! and a terminal's Ctrl-C reaches only the launcher, which forwards it.

use anyhow::bail;
use gantry_collectives::spawn::HostedStore;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);

/// One rank process to start.
pub struct RankCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Its complete environment: nothing else is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// Where its stdout and stderr are appended; `None`: the launcher's own.
    pub log: Option<PathBuf>,
}

/// What the supervisor does once a rank fails.
#[derive(Clone, Copy, Debug)]
pub struct StopPolicy {
    /// How long the other ranks may go on before they are signalled: a peer's own error often
    /// names the rank it blames, and the first rank to exit is often not the culprit.
    pub linger: Duration,
    /// The signal they then get (SIGTERM, as torchrun; or SIGKILL).
    pub signal: i32,
    /// Between that signal (or a forwarded one) and SIGKILL.
    pub grace: Duration,
}

/// How a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Code(i32),
    Signal(i32),
}

impl End {
    pub fn success(self) -> bool {
        self == End::Code(0)
    }

    /// The launcher's exit code for a rank that ended this way (the shell's 128 + signal).
    pub fn exit_code(self) -> u8 {
        match self {
            End::Code(c) => c.clamp(0, 255) as u8,
            End::Signal(s) => (128 + s).clamp(0, 255) as u8,
        }
    }

    pub fn describe(self) -> String {
        match self {
            End::Code(c) => format!("exit code {c}"),
            End::Signal(s) => format!("killed by {}", signal_name(s)),
        }
    }
}

/// Why the supervisor stopped the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// This rank failed first.
    Failed(usize),
    /// The launcher got this signal and passed it on.
    Signal(i32),
    /// The launcher's deadline passed.
    Timeout,
}

/// One rank, once it ended.
#[derive(Clone, Copy, Debug)]
pub struct RankEnd {
    pub pid: u32,
    pub end: End,
    /// The launcher signalled it (a peer failed, a signal was forwarded, or time ran out).
    pub stopped: bool,
}

/// How the ranks ended, in rank order.
pub struct Outcome {
    pub ranks: Vec<RankEnd>,
    pub stop: Option<Stop>,
}

impl Outcome {
    /// The first failing rank and how it ended.
    pub fn failed(&self) -> Option<(usize, End)> {
        match self.stop {
            Some(Stop::Failed(r)) => Some((r, self.ranks[r].end)),
            _ => None,
        }
    }

    /// Ranks that did not exit with code 0.
    pub fn unsuccessful(&self) -> Vec<usize> {
        (0..self.ranks.len())
            .filter(|&r| !self.ranks[r].end.success())
            .collect()
    }
}

struct Rank {
    child: Child,
    end: Option<End>,
    stopped: bool,
}

impl Rank {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it exited, without reaping it: its pid (and so its process group id) stays
    /// reserved until it is waited for, so signalling the group can never reach a reused id.
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

/// Rank processes of this host, started and not yet all ended.
pub struct LocalRanks {
    ranks: Vec<Rank>,
    /// The store the launcher hosts for them, if it does (its leftover ring files are removed
    /// once every rank is gone).
    store: Option<HostedStore>,
}

impl LocalRanks {
    /// Start every rank, in order; if one cannot start, kill those already started.
    pub fn spawn(commands: Vec<RankCommand>, store: Option<HostedStore>) -> anyhow::Result<LocalRanks> {
        install_signal_handlers()?;
        let mut started = LocalRanks {
            ranks: Vec::with_capacity(commands.len()),
            store,
        };
        let cpus = allowed_cpus();
        let cores = pinning(commands.len(), &cpus);
        if let Some(cores) = &cores {
            tracing::warn!(
                "{} ranks on {} CPUs: each rank is pinned to one CPU, round robin (ranks 0.. on CPUs {:?}; \
                 GANTRY_PIN_RANKS=0 leaves them to the kernel)",
                commands.len(),
                cpus.len(),
                cores
            );
        }
        for (rank, c) in commands.into_iter().enumerate() {
            let cpu = cores.as_ref().map(|cores| cores[rank]);
            match command(&c, cpu).and_then(|mut cmd| cmd.spawn()) {
                Ok(child) => started.ranks.push(Rank {
                    child,
                    end: None,
                    stopped: false,
                }),
                Err(e) => {
                    for r in &mut started.ranks {
                        r.signal_group(libc::SIGKILL);
                        let _ = r.child.wait();
                    }
                    bail!("cannot start rank {rank} (`{}`): {e}", c.program.to_string_lossy());
                }
            }
        }
        Ok(started)
    }

    /// Wait for every rank, calling `tick` at each poll; stop them all on the first failure,
    /// on SIGINT/SIGTERM (forwarded), or once `deadline` has passed.
    pub fn supervise(mut self, policy: StopPolicy, deadline: Option<Duration>, mut tick: impl FnMut()) -> Outcome {
        let deadline = deadline.map(|d| Instant::now() + d);
        let mut stop: Option<Stop> = None;
        let mut signal_at: Option<Instant> = None;
        let mut kill_at: Option<Instant> = None;
        let mut forwarded = 0;
        loop {
            tick();
            let received = SIGNALS.load(Ordering::SeqCst);
            if received > forwarded {
                forwarded = received;
                // A second signal means: do not wait for the grace period.
                let sig = if received > 1 {
                    libc::SIGKILL
                } else {
                    SIGNAL.load(Ordering::SeqCst)
                };
                eprintln!("gantry: got {}; passing it to the ranks", signal_name(sig));
                self.signal_running(sig);
                stop.get_or_insert(Stop::Signal(sig));
                kill_at.get_or_insert(Instant::now() + policy.grace);
            }
            let failure = self.first_failure();
            if stop.is_none()
                && let Some(i) = failure
            {
                stop = Some(Stop::Failed(i));
                eprintln!(
                    "gantry: rank {i} failed ({}); stopping the other ranks",
                    self.ranks[i].end.expect("failed").describe()
                );
                signal_at = Some(Instant::now() + policy.linger);
            }
            if self.ranks.iter().all(|r| r.end.is_some()) {
                break;
            }
            let now = Instant::now();
            if stop.is_none() && deadline.is_some_and(|d| now >= d) {
                stop = Some(Stop::Timeout);
                self.signal_running(libc::SIGKILL);
            }
            if signal_at.is_some_and(|t| now >= t) {
                signal_at = None;
                // The failed rank's group too: it may have left children behind.
                for r in &mut self.ranks {
                    r.stopped |= r.end.is_none();
                    r.signal_group(policy.signal);
                }
                kill_at = Some(now + policy.grace);
            }
            if kill_at.is_some_and(|t| now >= t) {
                kill_at = None;
                self.signal_running(libc::SIGKILL);
            }
            std::thread::sleep(POLL);
        }
        self.finish(stop)
    }

    /// Polls every rank; the lowest one that ended unsuccessfully.
    fn first_failure(&mut self) -> Option<usize> {
        let ends: Vec<Option<End>> = self.ranks.iter_mut().map(Rank::poll).collect();
        ends.iter().position(|e| e.is_some_and(|e| !e.success()))
    }

    fn signal_running(&mut self, sig: i32) {
        for r in self.ranks.iter_mut().filter(|r| r.end.is_none()) {
            r.signal_group(sig);
            r.stopped = true;
        }
    }

    fn finish(mut self, stop: Option<Stop>) -> Outcome {
        if stop.is_some() {
            // Whatever the ranks started and left behind in their groups goes with them.
            for r in &mut self.ranks {
                r.signal_group(libc::SIGKILL);
            }
        }
        for r in &mut self.ranks {
            let _ = r.child.wait();
        }
        if let Some(store) = &self.store {
            store.remove_ring_files();
        }
        let ranks = self
            .ranks
            .iter()
            .map(|r| RankEnd {
                pid: r.child.id(),
                end: r.end.expect("every rank ended"),
                stopped: r.stopped,
            })
            .collect();
        Outcome { ranks, stop }
    }
}

/// The command of one rank: its environment only, stdin closed (a rank in a background
/// process group reading the terminal would be stopped by SIGTTIN and the run would hang), its
/// own session (so its own process group, which the supervisor signals, and no controlling
/// terminal), and death with the launcher.
///
/// Its own session as torchrun gives each worker: where the kernel shares CPU time between
/// sessions first (`sched_autogroup_enabled`, the default on many distributions and on these
/// VMs), ranks sharing the launcher's session split one share between them while every other
/// session on the host gets one each; measured with `scripts/bench-train-cpu.sh --peer` on a
/// busy 2-core host, DDP under torchrun ran ~1.4x faster than the same DDP in one session.
///
/// `cpu`: the one CPU the rank may run on (see [`pinning`]).
fn command(c: &RankCommand, cpu: Option<usize>) -> std::io::Result<Command> {
    let mut cmd = Command::new(&c.program);
    cmd.args(&c.args).env_clear().envs(c.env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(Stdio::null());
    if let Some(path) = &c.log {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        cmd.stdout(file.try_clone()?).stderr(file);
    }
    let parent = std::process::id() as libc::pid_t;
    let affinity = cpu.map(|cpu| {
        // SAFETY: cpu_set_t is plain data, valid all zeroes; CPU_SET ignores an index past
        // its size (`cpu` comes from sched_getaffinity, so it is within).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            set
        }
    });
    // SAFETY: setsid, sched_setaffinity, prctl and getppid are async-signal-safe; the closure
    // allocates nothing.
    // A rank must not outlive the launcher (it would wait on its peers until their
    // deadlines); if the launcher already died before prctl, give up on this child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(set) = &affinity
                && libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The CPUs this launcher may run on, in order (its ranks inherit the same set).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Where to pin each of `ranks` ranks, given the CPUs they may run on: nowhere while every rank
/// can have a CPU of its own (the kernel places them best, and other work can move them);
/// when there are more ranks than CPUs, rank `i` on `cpus[i % cpus.len()]`, unless
/// `GANTRY_PIN_RANKS=0`.
///
/// Ranks sharing CPUs wait for each other by yielding, which hands the CPU only to ranks on the
/// same one; left to the kernel, 4 ranks on 2 CPUs often settled 3 and 1 (it does not migrate
/// tasks that ran microseconds ago), and the lone rank yielded to nobody while the other
/// three queued: a 1 KiB all_reduce took 10–14 µs instead of 5–8 (76k yields against 11k
/// context switches in one such run).
fn pinning(ranks: usize, cpus: &[usize]) -> Option<Vec<usize>> {
    let off = std::env::var("GANTRY_PIN_RANKS").is_ok_and(|v| v.trim() == "0");
    pin_round_robin(ranks, cpus, !off)
}

fn pin_round_robin(ranks: usize, cpus: &[usize], allowed: bool) -> Option<Vec<usize>> {
    (allowed && !cpus.is_empty() && ranks > cpus.len()).then(|| (0..ranks).map(|i| cpus[i % cpus.len()]).collect())
}

/// The last SIGINT/SIGTERM the launcher received (0: none), and how many.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGNALS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomics here: async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Catch SIGINT and SIGTERM so they reach the ranks, which sit in their own process groups.
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

/// The last `lines` lines of a rank's log.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    tail_of(&text, lines)
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `gantry: error:` line of a rank's log, without the prefix.
pub fn last_error(path: &Path) -> Option<String> {
    last_error_of(&std::fs::read_to_string(path).ok()?)
}

fn last_error_of(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("gantry: error: "))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_descriptions() {
        assert_eq!(End::Code(3).exit_code(), 3);
        assert_eq!(End::Signal(libc::SIGKILL).exit_code(), 137);
        assert_eq!(End::Code(-1).exit_code(), 0);
        assert_eq!(End::Signal(15).describe(), "killed by signal 15 (SIGTERM)");
        assert!(End::Code(0).success() && !End::Signal(0).success());
    }

    #[test]
    fn log_tail_and_last_error() {
        let log = "start\ngantry: error: first\nmore\ngantry: error: rank 3 did not respond\nbye";
        assert_eq!(tail_of(log, 2), "gantry: error: rank 3 did not respond\nbye");
        assert_eq!(tail_of(log, 99), log);
        assert_eq!(last_error_of(log).as_deref(), Some("rank 3 did not respond"));
        assert_eq!(last_error_of("fine\n"), None);
    }

    #[test]
    fn ranks_are_pinned_round_robin_only_when_they_outnumber_the_cpus() {
        assert_eq!(pin_round_robin(2, &[0, 1], true), None);
        assert_eq!(pin_round_robin(4, &[0, 1, 2, 3, 4], true), None);
        assert_eq!(pin_round_robin(4, &[2, 5], true), Some(vec![2, 5, 2, 5]));
        assert_eq!(pin_round_robin(3, &[7], true), Some(vec![7, 7, 7]));
        assert_eq!(pin_round_robin(4, &[2, 5], false), None, "turned off");
        assert_eq!(pin_round_robin(4, &[], true), None, "affinity unknown");
    }

    #[test]
    fn ranks_that_outnumber_the_cpus_each_run_on_one() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let dir = std::env::temp_dir().join(format!("gantry-pin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ranks = cpus.len() + 1;
        let commands = (0..ranks)
            .map(|r| RankCommand {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "grep Cpus_allowed_list /proc/self/status".into()],
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                log: Some(dir.join(format!("rank{r}"))),
            })
            .collect();
        let policy = StopPolicy {
            linger: Duration::from_secs(5),
            signal: libc::SIGTERM,
            grace: Duration::from_secs(5),
        };
        let outcome =
            LocalRanks::spawn(commands, None)
                .unwrap()
                .supervise(policy, Some(Duration::from_secs(60)), || {});
        assert!(outcome.unsuccessful().is_empty());
        for r in 0..ranks {
            let text = std::fs::read_to_string(dir.join(format!("rank{r}"))).unwrap();
            let want = cpus[r % cpus.len()];
            assert_eq!(
                text.split_whitespace().last(),
                Some(want.to_string().as_str()),
                "rank {r}: {text}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
