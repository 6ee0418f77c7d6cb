//! The examples cannot rot: every `examples/*/run.sh` (found by listing the directory, so a
//! new example is covered without touching this file) runs end to end with short settings
//! and the debug `gantry`, must exit 0, and must leave no process behind: no daemon, rank or
//! server it started may outlive it.
//!
//! Each script gets `GANTRY_BIN` (this build's binary; setup then builds nothing),
//! `GANTRY_SKIP_BUILD=1`, `STEPS` (a few training steps) and `RUN_DIR` (a scratch directory
//! for everything the run writes). The examples that train on Tiny Shakespeare read
//! `../shared/data/tinyshakespeare.txt`; the data sets they make go to the repository's
//! `data/`, as when a user runs them.

mod common;

use common::GANTRY;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Training steps per example: a multiple of 3 (registry-serving registers a version every
/// STEPS / 3 steps and needs three of them).
const STEPS: &str = "6";
/// How long one example may run before it is killed and reported.
const LIMIT: Duration = Duration::from_secs(300);
/// How long the processes of an example may take to go away after its script exited.
const GRACE: Duration = Duration::from_secs(10);
/// The variable every process an example starts inherits (unless it clears its environment).
const MARK: &str = "GANTRY_EXAMPLE_TEST";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// Every example with a `run.sh`, by name, sorted.
fn examples() -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path().join("run.sh")))
        .filter(|(_, script)| script.is_file())
        .collect();
    found.sort();
    found
}

/// Processes, other than this test, that carry `mark` in their environment or mention
/// `needle` on their command line: `(pid, command line)`.
fn processes_of(mark: &str, needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let marked = environ.split(|b| *b == 0).any(|var| var == mark.as_bytes());
        if marked || cmd.contains(needle) {
            found.push((pid, cmd));
        }
    }
    found
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn every_example_runs_end_to_end_and_leaves_nothing_running() {
    let examples = examples();
    assert!(
        examples.iter().any(|(name, _)| name == "local-cluster"),
        "no examples found under {}: {examples:?}",
        repo().join("examples").display()
    );
    let scratch = common::tempdir("examples", "run");
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (name, script) in &examples {
        let run_dir = scratch.join(name);
        let log_path = scratch.join(format!("{name}.log"));
        let log = File::create(&log_path).unwrap();
        let token = format!("{}-{name}", std::process::id());
        let mark = format!("{MARK}={token}");
        let started = Instant::now();
        // Output to a file, not a pipe: a process left behind holding the pipe open would
        // make reading it hang instead of failing the test.
        let mut child = Command::new("bash")
            .arg(script)
            .current_dir(repo())
            .env("GANTRY_BIN", GANTRY)
            .env("GANTRY_SKIP_BUILD", "1")
            .env("STEPS", STEPS)
            .env("RUN_DIR", &run_dir)
            .env(MARK, &token)
            .env_remove("KILL_RANK")
            .env_remove("GANTRY_COORDINATOR")
            .env_remove("GANTRY_TOKEN")
            .env_remove("GANTRY_REGISTRY")
            .env_remove("GANTRY_REGISTRY_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > LIMIT {
                // SAFETY: signals the script's own process group (its pid, from spawn).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let seconds = started.elapsed().as_secs_f64();

        // Everything it started must be gone (a moment allowed for daemons to exit).
        let needle = run_dir.to_string_lossy().into_owned();
        let deadline = Instant::now() + GRACE;
        let mut left = processes_of(&mark, &needle);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            left = processes_of(&mark, &needle);
        }
        for (pid, _) in &left {
            // SAFETY: a process this example started and left behind; stop it so it cannot
            // disturb the next example or test.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }

        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        match status {
            None => failures.push(format!(
                "{name}: still running after {LIMIT:?}; killed\n{}",
                tail(&output, 40)
            )),
            Some(s) if !s.success() => failures.push(format!(
                "{name}: run.sh exited with {s} after {seconds:.1} s\n{}",
                tail(&output, 40)
            )),
            Some(_) => {}
        }
        if !left.is_empty() {
            let list: Vec<String> = left.iter().map(|(pid, cmd)| format!("  {pid}: {cmd}")).collect();
            failures.push(format!(
                "{name}: left {} process(es) running after it exited:\n{}",
                left.len(),
                list.join("\n")
            ));
        }
        report.push(format!("{name}: {seconds:.1} s"));
    }
    eprintln!("examples (STEPS={STEPS}):\n  {}", report.join("\n  "));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&scratch);
}
