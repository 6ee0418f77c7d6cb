//! Real rank processes for the multi-process tests (`crash.rs`, `fence.rs`): one run of
//! `CRASH_WORLD` `ckpt-test-rank` processes resuming from and saving to one [`Backend`], their
//! stdout lines gathered as (rank, line) while they run.

#![allow(dead_code)]

use super::backend::{Backend, TempDir};
use super::pattern::CRASH_WORLD;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RANK_BIN: &str = env!("CARGO_BIN_EXE_ckpt-test-rank");

/// The rank processes of one run; killed on drop.
pub struct RankProcesses {
    attempt: String,
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, String)>,
    /// Every (rank, stdout line) gathered so far, in the order they came.
    pub seen: Vec<(usize, String)>,
    stderr_logs: Vec<PathBuf>,
}

impl RankProcesses {
    /// Start every rank of save attempt `attempt`: each resumes from the newest step committed
    /// on `b` and saves the next `steps`. Their stderr goes to `logs/ATTEMPT-rankN.stderr`;
    /// `configure` adds to each rank's command (the optional `CKPT_*` variables).
    pub fn start(b: &Backend, logs: &TempDir, attempt: &str, steps: u64, configure: impl Fn(&mut Command)) -> Self {
        let (tx, lines) = mpsc::channel();
        let mut children = Vec::new();
        let mut stderr_logs = Vec::new();
        for rank in 0..CRASH_WORLD {
            let log = logs.0.join(format!("{attempt}-rank{rank}.stderr"));
            let stderr = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
            let mut cmd = Command::new(RANK_BIN);
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", CRASH_WORLD.to_string())
                .env("CKPT_URL", b.url())
                .env("CKPT_ATTEMPT", attempt)
                .env("CKPT_STEPS", steps.to_string())
                .envs(b.env())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr);
            configure(&mut cmd);
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {RANK_BIN}: {e}"));
            let out = child.stdout.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send((rank, line)).is_err() {
                        break;
                    }
                }
            });
            children.push(child);
            stderr_logs.push(log);
        }
        RankProcesses {
            attempt: attempt.to_string(),
            children,
            lines,
            seen: Vec::new(),
            stderr_logs,
        }
    }

    /// Gather lines until `enough` says so, every rank's stdout has closed, or `limit`.
    pub fn watch(&mut self, limit: Duration, enough: impl Fn(&[(usize, String)]) -> bool) {
        let until = Instant::now() + limit;
        while !enough(&self.seen) {
            match self.lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected | mpsc::RecvTimeoutError::Timeout) => return,
            }
        }
    }

    /// Gather lines until every rank has printed `line`; fail if one has not within `limit`.
    pub fn wait_all(&mut self, line: &str, limit: Duration) {
        let all_said =
            |seen: &[(usize, String)]| (0..CRASH_WORLD).all(|rank| seen.iter().any(|(r, l)| *r == rank && l == line));
        self.watch(limit, all_said);
        assert!(
            all_said(&self.seen),
            "not every rank printed {line:?} within {limit:?}:\n{}",
            self.describe()
        );
    }

    /// SIGKILL `rank`; an error means the process already exited, which a wait will report.
    pub fn kill(&mut self, rank: usize) {
        let _ = self.children[rank].kill();
    }

    /// Wait for `rank` to exit; how it did.
    pub fn wait(&mut self, rank: usize) -> ExitStatus {
        self.children[rank]
            .wait()
            .unwrap_or_else(|e| panic!("waiting for rank {rank} of {}: {e}", self.attempt))
    }

    /// Wait (at most `limit` in all) for every rank to exit, then for the rest of their
    /// output; each rank's exit status.
    pub fn finish(&mut self, limit: Duration) -> Vec<ExitStatus> {
        let until = Instant::now() + limit;
        let mut statuses = Vec::new();
        for rank in 0..CRASH_WORLD {
            loop {
                if let Some(s) = self.children[rank].try_wait().unwrap() {
                    statuses.push(s);
                    break;
                }
                if Instant::now() > until {
                    panic!("rank {rank} did not exit within {limit:?}:\n{}", self.describe());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.watch(Duration::from_secs(30), |_| false);
        statuses
    }

    /// The lines `rank` printed, in order.
    pub fn said(&self, rank: usize) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|(r, _)| *r == rank)
            .map(|(_, l)| l.as_str())
            .collect()
    }

    /// Steps printed as committed, by any rank.
    pub fn committed_lines(&self) -> Vec<u64> {
        self.seen
            .iter()
            .filter_map(|(_, l)| l.strip_prefix("committed ")?.parse().ok())
            .collect()
    }

    /// Every rank's stdout so far and stderr, for failure messages.
    pub fn describe(&self) -> String {
        let mut s = format!("attempt {}:\n", self.attempt);
        for rank in 0..CRASH_WORLD {
            let err = std::fs::read_to_string(&self.stderr_logs[rank]).unwrap_or_default();
            s += &format!("rank {rank} stdout: {:?}\nrank {rank} stderr: {err}\n", self.said(rank));
        }
        s
    }
}

impl Drop for RankProcesses {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
