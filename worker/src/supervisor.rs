//! The rank processes of this worker: start them, stop them (the whole process group,
//! SIGTERM then SIGKILL after the grace period), notice their exits, and describe them as
//! `RankReport`s.
//!
//! The [`Supervisor`] is owned by one task (the daemon loop, or a test) and never blocks it:
//! each rank's process is spawned and waited for on its own thread ([`crate::launch`]),
//! which sends the exit back over a channel that [`Supervisor::next_event`] drains.

use crate::blame;
use crate::error::StartError;
use crate::launch::{self, ExitEvent, LaunchContext};
use crate::metrics::{Metrics, Outcome};
use crate::reconcile::{Phase, RankKey, reconcile};
use gantry_coordinator::proto::{RankAssignment, RankReport, RankState as WireState, RankStats};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Sends `signal` to the process group `pid` leads. Errors are ignored: the usual one is
/// ESRCH, a group that is already gone.
pub fn kill_group(pid: u32, signal: i32) {
    // kill(-1) would signal every process we may signal, kill(0) our own group.
    let Ok(pgid) = libc::pid_t::try_from(pid) else { return };
    if pgid <= 1 {
        return;
    }
    // SAFETY: plain syscall on a number; no memory involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Ranks whose process is alive right now; shared with the log server (`running` in
/// `ReadLog` replies).
#[derive(Debug, Default)]
pub struct LiveRanks {
    set: Mutex<BTreeSet<RankKey>>,
}

impl LiveRanks {
    pub fn contains(&self, key: RankKey) -> bool {
        self.set.lock().unwrap_or_else(PoisonError::into_inner).contains(&key)
    }

    pub fn len(&self) -> usize {
        self.set.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, key: RankKey) {
        self.set.lock().unwrap_or_else(PoisonError::into_inner).insert(key);
    }

    fn remove(&self, key: RankKey) {
        self.set.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
    }
}

/// What the supervisor knows about one rank.
#[derive(Clone, Debug, PartialEq)]
pub enum RankState {
    Running {
        pid: u32,
        /// When SIGKILL follows the SIGTERM already sent; `None` while not being stopped.
        kill_at: Option<Instant>,
    },
    Exited {
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
        /// The worker stopped it (it was no longer desired, or the worker shut down).
        stopped: bool,
        message: String,
    },
    FailedToStart {
        message: String,
    },
}

struct Entry {
    state: RankState,
    stats: Option<RankStats>,
    /// Exited, and the progress file has been read once since.
    stats_final: bool,
    /// The peer rank a failed rank's last error names (read with the final stats).
    blamed: Option<u32>,
    /// A coordinator acknowledged a report of its final state (exited, failed to start).
    delivered: bool,
}

/// Something that happened to the ranks; the daemon heartbeats promptly after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Exited(RankKey),
    /// These ranks outlived their grace period and were sent SIGKILL.
    Killed(Vec<RankKey>),
}

#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub launch: LaunchContext,
    /// Time between SIGTERM and SIGKILL when stopping a rank.
    pub grace: Duration,
}

pub struct Supervisor {
    config: SupervisorConfig,
    ranks: BTreeMap<RankKey, Entry>,
    /// Every key ever started (or tried) here: a rank starts at most once.
    started: BTreeSet<RankKey>,
    exits_tx: mpsc::UnboundedSender<ExitEvent>,
    exits_rx: mpsc::UnboundedReceiver<ExitEvent>,
    live: Arc<LiveRanks>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(config: SupervisorConfig, live: Arc<LiveRanks>, metrics: Arc<Metrics>) -> Supervisor {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Supervisor {
            config,
            ranks: BTreeMap::new(),
            started: BTreeSet::new(),
            exits_tx,
            exits_rx,
            live,
            metrics,
        }
    }

    pub fn state(&self, key: RankKey) -> Option<&RankState> {
        self.ranks.get(&key).map(|e| &e.state)
    }

    /// Ranks whose process is alive (including those being stopped).
    pub fn running(&self) -> usize {
        self.ranks
            .values()
            .filter(|e| matches!(e.state, RankState::Running { .. }))
            .count()
    }

    /// Brings the ranks in line with the coordinator's complete desired set (see
    /// [`crate::reconcile`] for the rules).
    pub async fn apply(&mut self, desired: &[RankAssignment]) {
        let mut wanted: BTreeMap<RankKey, &RankAssignment> = BTreeMap::new();
        for a in desired {
            wanted
                .entry(RankKey {
                    job: a.job,
                    attempt: a.attempt,
                    rank: a.rank,
                })
                .or_insert(a);
        }
        let keys: BTreeSet<RankKey> = wanted.keys().copied().collect();
        let plan = reconcile(&keys, &self.phases(), &self.started);
        for key in plan.stop {
            self.stop(key);
        }
        for key in plan.forget {
            self.ranks.remove(&key);
        }
        for key in plan.refuse {
            let message = StartError::AlreadyRan { key }.to_string();
            tracing::warn!("{message}");
            self.insert(key, RankState::FailedToStart { message });
        }
        for key in plan.start {
            self.start(wanted[&key]).await;
        }
    }

    fn phases(&self) -> BTreeMap<RankKey, Phase> {
        let phase = |s: &RankState| match s {
            RankState::Running { kill_at: None, .. } => Phase::Running,
            RankState::Running { kill_at: Some(_), .. } => Phase::Stopping,
            RankState::Exited { .. } | RankState::FailedToStart { .. } => Phase::Done,
        };
        self.ranks
            .iter()
            .map(|(k, e)| match phase(&e.state) {
                Phase::Done if !e.delivered => (*k, Phase::Unreported),
                p => (*k, p),
            })
            .collect()
    }

    /// The ranks whose final state (exited, failed to start) `reports` carry: once a
    /// coordinator has answered the call that sent them, pass them to [`Supervisor::delivered`].
    pub fn finals(reports: &[RankReport]) -> Vec<RankKey> {
        reports
            .iter()
            .filter(|r| matches!(r.state(), WireState::Exited | WireState::FailedToStart))
            .map(|r| RankKey {
                job: r.job,
                attempt: r.attempt,
                rank: r.rank,
            })
            .collect()
    }

    /// A coordinator acknowledged a call carrying these ranks' final states: those no longer
    /// desired may now be forgotten.
    pub fn delivered(&mut self, keys: &[RankKey]) {
        for key in keys {
            if let Some(e) = self.ranks.get_mut(key)
                && !matches!(e.state, RankState::Running { .. })
            {
                e.delivered = true;
            }
        }
    }

    fn insert(&mut self, key: RankKey, state: RankState) {
        let stats_final = !matches!(state, RankState::Running { .. });
        self.ranks.insert(
            key,
            Entry {
                state,
                stats: None,
                stats_final,
                blamed: None,
                delivered: false,
            },
        );
    }

    /// Starts one rank (once: a key already started is ignored). A rank that cannot start
    /// is recorded as failed to start, with the reason.
    pub async fn start(&mut self, a: &RankAssignment) {
        let key = RankKey {
            job: a.job,
            attempt: a.attempt,
            rank: a.rank,
        };
        if !self.started.insert(key) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let ctx = self.config.launch.clone();
        let outcome = match launch::spawn_rank(key, a.clone(), ctx, tx, self.exits_tx.clone()) {
            Ok(()) => rx.await.unwrap_or(Err(StartError::Lost { key })),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(pid) => {
                tracing::info!(pid, log = %launch::log_path(&self.config.launch.state_dir, key).display(), "started {key}");
                self.live.insert(key);
                self.metrics.rank_started();
                self.insert(key, RankState::Running { pid, kill_at: None });
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!("rank failed to start: {message}");
                self.metrics.rank_failed_to_start();
                self.insert(key, RankState::FailedToStart { message });
            }
        }
        self.metrics.set_ranks_running(self.running());
    }

    /// Stops a running rank: SIGTERM to its process group now, SIGKILL once the grace
    /// period has passed (see [`Supervisor::next_event`]).
    pub fn stop(&mut self, key: RankKey) {
        let grace = self.config.grace;
        let Some(Entry {
            state: RankState::Running { pid, kill_at },
            ..
        }) = self.ranks.get_mut(&key)
        else {
            return;
        };
        if kill_at.is_some() {
            return;
        }
        let signal = if grace.is_zero() { libc::SIGKILL } else { libc::SIGTERM };
        tracing::info!(pid = *pid, grace_s = grace.as_secs_f64(), "stopping {key}");
        kill_group(*pid, signal);
        *kill_at = Some(Instant::now() + grace);
    }

    /// Stops every running rank.
    pub fn stop_all(&mut self) {
        let keys: Vec<RankKey> = self.ranks.keys().copied().collect();
        for key in keys {
            self.stop(key);
        }
    }

    fn next_kill(&self) -> Option<Instant> {
        self.ranks
            .values()
            .filter_map(|e| match e.state {
                RankState::Running { kill_at, .. } => kill_at,
                _ => None,
            })
            .min()
    }

    /// Waits for the next exit, or the next rank whose grace period ends (it gets SIGKILL).
    /// Cancel-safe: nothing is lost when the future is dropped before it completes.
    pub async fn next_event(&mut self) -> Event {
        let deadline = self.next_kill();
        let grace_over = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = self.exits_rx.recv() => match exit {
                Some(exit) => self.on_exit(exit),
                // Unreachable while we hold a sender; stay quiet rather than spin.
                None => std::future::pending().await,
            },
            () = grace_over => self.escalate(),
        }
    }

    fn escalate(&mut self) -> Event {
        let now = Instant::now();
        let grace = self.config.grace;
        let mut killed = Vec::new();
        for (key, entry) in &mut self.ranks {
            if let RankState::Running { pid, kill_at: Some(at) } = &mut entry.state
                && *at <= now
            {
                tracing::warn!(pid = *pid, "{key} ignored SIGTERM for {grace:?}; sending SIGKILL");
                kill_group(*pid, libc::SIGKILL);
                // SIGKILL cannot be ignored; a later deadline only guards a process stuck
                // in the kernel from being signalled in a loop.
                *at = now + Duration::from_secs(3600);
                killed.push(*key);
            }
        }
        Event::Killed(killed)
    }

    fn on_exit(&mut self, exit: ExitEvent) -> Event {
        let key = exit.key;
        self.live.remove(key);
        if let Some(entry) = self.ranks.get_mut(&key)
            && let RankState::Running { pid, kill_at } = entry.state
        {
            let stopped = kill_at.is_some();
            let outcome = match (stopped, exit.code) {
                (true, _) => Outcome::Killed,
                (false, Some(0)) => Outcome::Success,
                (false, _) => Outcome::Failure,
            };
            self.metrics.rank_exited(outcome);
            let how = match (exit.code, exit.signal) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                (None, None) => "exited".to_string(),
            };
            tracing::info!(pid, "{key} {how}");
            let message = match (&exit.error, stopped) {
                (Some(e), _) => e.clone(),
                (None, true) => "stopped by the worker".to_string(),
                (None, false) => String::new(),
            };
            entry.state = RankState::Exited {
                pid,
                code: exit.code,
                signal: exit.signal,
                stopped,
                message,
            };
            entry.stats_final = false;
            entry.delivered = false;
        }
        self.metrics.set_ranks_running(self.running());
        Event::Exited(key)
    }

    /// Every rank this worker knows, for the next heartbeat or registration. Reads the
    /// progress file of each running rank, and once more for a rank that has exited.
    pub async fn reports(&mut self) -> Vec<RankReport> {
        let state_dir = self.config.launch.state_dir.clone();
        let mut out = Vec::with_capacity(self.ranks.len());
        for (key, entry) in &mut self.ranks {
            if !entry.stats_final {
                entry.stats = read_progress(launch::progress_path(&state_dir, *key)).await;
                entry.stats_final = matches!(entry.state, RankState::Exited { .. });
                if failed_by_itself(&entry.state) {
                    entry.blamed = blame::read_blamed_peer(&launch::log_path(&state_dir, *key)).await;
                }
            }
            let mut r = RankReport {
                job: key.job,
                attempt: key.attempt,
                rank: key.rank,
                stats: entry.stats,
                ..RankReport::default()
            };
            match &entry.state {
                RankState::Running { pid, .. } => {
                    r.set_state(WireState::Running);
                    r.pid = *pid;
                }
                RankState::Exited {
                    pid,
                    code,
                    signal,
                    message,
                    ..
                } => {
                    r.set_state(WireState::Exited);
                    r.pid = *pid;
                    r.exit_code = *code;
                    r.signal = *signal;
                    r.message = message.clone();
                    r.blamed_rank = entry.blamed;
                }
                RankState::FailedToStart { message } => {
                    r.set_state(WireState::FailedToStart);
                    r.message = message.clone();
                }
            }
            out.push(r);
        }
        out
    }

    /// Stops every rank and waits for them to exit: SIGTERM, SIGKILL after the grace
    /// period, then at most a few more seconds for processes stuck in the kernel.
    pub async fn shutdown(&mut self) {
        self.stop_all();
        let give_up = Instant::now() + self.config.grace + Duration::from_secs(5);
        while self.running() > 0 {
            match tokio::time::timeout_at(give_up, self.next_event()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        "{} rank processes did not exit after SIGKILL; leaving them",
                        self.running()
                    );
                    break;
                }
            }
        }
    }
}

impl Drop for Supervisor {
    /// Ranks die with their worker, also when the daemon's future is dropped mid-way.
    fn drop(&mut self) {
        for entry in self.ranks.values() {
            if let RankState::Running { pid, .. } = entry.state {
                kill_group(pid, libc::SIGKILL);
            }
        }
    }
}

/// Exited with a failure that the worker did not cause by stopping it.
fn failed_by_itself(state: &RankState) -> bool {
    matches!(state, RankState::Exited { stopped: false, code, .. } if *code != Some(0))
}

/// The rank's progress file: `{"step":u64,"step_ms":f64,"tokens_per_s":f64,"loss":f64}`,
/// written atomically by the rank. Missing or unreadable means no statistics.
pub async fn read_progress(path: PathBuf) -> Option<RankStats> {
    let bytes = tokio::fs::read(&path).await.ok()?;
    parse_progress(&bytes)
}

fn parse_progress(bytes: &[u8]) -> Option<RankStats> {
    #[derive(serde::Deserialize)]
    struct Progress {
        step: u64,
        #[serde(default)]
        step_ms: Option<f64>,
        #[serde(default)]
        tokens_per_s: Option<f64>,
        #[serde(default)]
        loss: Option<f64>,
    }
    // An object only: serde would also take `[step, step_ms, …]` for the struct.
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if !value.is_object() {
        return None;
    }
    let p: Progress = serde_json::from_value(value).ok()?;
    // JSON has no NaN; a rank writes null for a loss it does not have yet. The coordinator
    // stores stats as JSON, so only finite numbers go out.
    let finite = |v: Option<f64>| v.filter(|x| x.is_finite()).unwrap_or(0.0);
    Some(RankStats {
        step: p.step,
        step_ms: finite(p.step_ms),
        tokens_per_s: finite(p.tokens_per_s),
        loss: finite(p.loss),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_files() {
        let s = parse_progress(br#"{"step":12,"step_ms":80.5,"tokens_per_s":1000.0,"loss":3.25}"#).unwrap();
        assert_eq!((s.step, s.step_ms, s.tokens_per_s, s.loss), (12, 80.5, 1000.0, 3.25));
        let s = parse_progress(br#"{"step":3,"loss":null,"extra":"ignored"}"#).unwrap();
        assert_eq!((s.step, s.step_ms, s.loss), (3, 0.0, 0.0));
        assert!(parse_progress(b"").is_none());
        assert!(parse_progress(br#"{"step":"#).is_none());
        assert!(parse_progress(br#"{"loss":1.0}"#).is_none());
        assert!(parse_progress(br#"[1,2]"#).is_none());
        assert!(parse_progress(br#"{"step":-1}"#).is_none());
    }

    #[test]
    fn kill_group_never_signals_everyone() {
        // Would be kill(-1)/kill(0): must be no-ops (this test process survives).
        kill_group(0, libc::SIGKILL);
        kill_group(1, libc::SIGKILL);
        kill_group(u32::MAX, libc::SIGKILL);
    }
}
