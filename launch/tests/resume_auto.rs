//! `gantry rank --resume-auto` (how a worker restarts a job's ranks): with an empty checkpoint
//! directory it starts at step 0; after a checkpointed run it resumes from the newest
//! committed step, here on a different data-parallel size set with `--set`.
//! Resuming a checkpoint past the run's end is refused, at its end trains nothing (and prints
//! no loss); absurd numbers are refused before any rank starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;

use common::{GANTRY, text};

/// Resolved by hand (vocabulary, threads): `gantry rank` takes a spec as the launcher wrote it.
const SPEC: &str = r#"
[model]
d_model = 32
n_layers = 1
n_heads = 4
seq_len = 16
vocab_size = 512
[optim]
lr = 1e-2
warmup_steps = 1
[train]
steps = 4
global_batch = 8
micro_batch = 4
threads = 1
"#;

/// `world` rank processes of `gantry rank --spec SPEC --run-dir RUN ARGS…`.
fn ranks(world: usize, spec: &Path, run: &Path, args: &[&str]) -> Vec<Child> {
    let port = common::free_port().to_string();
    (0..world)
        .map(|r| {
            Command::new(GANTRY)
                .arg("rank")
                .arg("--spec")
                .arg(spec)
                .arg("--run-dir")
                .arg(run)
                .args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                // Ranks started by hand, as torchrun would: the user gives the job secret.
                .env("GANTRY_JOB_SECRET", "resume-auto-test-secret-0123")
                .env("GANTRY_LOG", "info")
                .env("OMP_WAIT_POLICY", "PASSIVE")
                .env_remove("GANTRY_STORE_EXTERNAL")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Wait for every rank; all must succeed. Returns rank 0's stderr.
fn finish(children: Vec<Child>) -> String {
    let mut first = String::new();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r}: {}", text(&out));
        if r == 0 {
            first = String::from_utf8_lossy(&out.stderr).into_owned();
        }
    }
    first
}

fn steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["step"].as_u64())
        .collect()
}

#[test]
fn resume_auto_starts_fresh_then_resumes_the_latest() {
    let dir = common::tempdir("resume-auto", "main");
    let spec = common::synth_job(&dir, SPEC, 200_000, 9);
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let set_dir = format!("checkpoint.dir={}", ckpt.display());
    let run_of = |name: &str| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };

    // Empty directory: step 0, and the log says why. Saves at step 2.
    let first = run_of("first");
    let log = finish(ranks(
        1,
        &spec,
        &first,
        &["--set", &set_dir, "--set", "train.stop_after=2", "--resume-auto"],
    ));
    assert!(log.contains("no committed checkpoint; starting from step 0"), "{log}");
    assert_eq!(steps(&first), vec![1, 2]);
    assert!(ckpt.join("step-00000002/manifest.json").exists(), "step 2 committed");

    // Resumed on two data-parallel ranks: steps 3 and 4 only.
    let second = run_of("second");
    let log = finish(ranks(
        2,
        &spec,
        &second,
        &["--set", &set_dir, "--set", "parallel.dp=2", "--resume-auto"],
    ));
    assert!(log.contains("resuming from the latest committed checkpoint"), "{log}");
    assert_eq!(steps(&second), vec![3, 4]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(second.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 4);

    // Without a checkpoint directory the flag has nothing to do: a fresh run.
    let third = run_of("third");
    finish(ranks(
        1,
        &spec,
        &third,
        &["--set", "train.stop_after=1", "--resume-auto"],
    ));
    assert_eq!(steps(&third), vec![1]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_values_are_checked_by_name() {
    let dir = common::tempdir("resume-auto", "bad");
    let spec = common::synth_job(&dir, SPEC, 20_000, 9);
    let out = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "1", "--resume", "newest", "--checkpoint-dir"])
        .arg(dir.join("ckpt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("checkpoint.resume") && msg.contains("`auto`"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gantry launch --local 1` of the test spec with `args`.
fn launch(spec: &Path, run: &Path, args: &[&str]) -> std::process::Output {
    Command::new(GANTRY)
        .arg("launch")
        .arg(spec)
        .args(["--local", "1", "--run-dir"])
        .arg(run)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn resuming_past_the_end_is_refused_and_at_the_end_trains_nothing() {
    let dir = common::tempdir("resume-auto", "past-end");
    let spec = common::synth_job(&dir, SPEC, 200_000, 9);
    let ckpt = dir.join("ckpt");
    let ckpt_arg = ckpt.to_str().unwrap();
    let out = launch(
        &spec,
        &dir.join("first"),
        &["--checkpoint-dir", ckpt_arg, "--set", "train.stop_after=2"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(ckpt.join("step-00000002/manifest.json").exists(), "step 2 committed");

    // A step-2 checkpoint and a run of 1 step: refused, nothing trained, no loss printed.
    let past = dir.join("past");
    let out = launch(
        &spec,
        &past,
        &[
            "--checkpoint-dir",
            ckpt_arg,
            "--resume",
            "latest",
            "--set",
            "train.steps=1",
        ],
    );
    let msg = text(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains("the checkpoint is at step 2, past the end of this run (train.steps = 1)"),
        "{msg}"
    );
    assert!(
        !msg.contains("final train loss") && !past.join("summary.json").exists(),
        "{msg}"
    );

    // At the end already: nothing to do, said so, and no loss that was not measured.
    let at_end = dir.join("at-end");
    let out = launch(
        &spec,
        &at_end,
        &[
            "--checkpoint-dir",
            ckpt_arg,
            "--resume",
            "latest",
            "--set",
            "train.steps=2",
        ],
    );
    let msg = text(&out);
    assert!(out.status.success(), "{msg}");
    assert!(msg.contains("nothing trained: the run resumed at step 2"), "{msg}");
    assert!(!msg.contains("final train loss"), "{msg}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(at_end.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        (summary["steps"].as_u64(), summary["final_loss"].is_null()),
        (Some(2), true)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn absurd_numbers_are_refused_before_any_rank_starts() {
    let dir = common::tempdir("resume-auto", "absurd");
    let spec = common::synth_job(&dir, SPEC, 20_000, 9);
    for (set, want) in [
        (
            "parallel.timeout_s=inf",
            "`parallel.timeout_s`: inf is not a number of seconds",
        ),
        (
            "checkpoint.commit_timeout_s=1e300",
            "`checkpoint.commit_timeout_s`: 1e300 is not a number of seconds",
        ),
        // No explicit limit: this machine's memory, shared by its one rank.
        (
            "model.n_layers=1000000000000",
            "this machine's memory divided among its ranks",
        ),
        ("model.seq_len=1000000000", "seq_len 1000000000"),
    ] {
        let run = dir.join("run");
        let out = launch(&spec, &run, &["--set", set]);
        let msg = text(&out);
        assert!(!out.status.success(), "{set}: {msg}");
        assert!(msg.contains(want), "{set}: {msg}");
        assert!(
            !run.join("logs").exists(),
            "{set}: refused before the run directory is made"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
