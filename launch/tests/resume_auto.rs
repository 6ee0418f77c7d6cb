//! `gantry rank --resume-auto` (how a worker restarts a job's ranks): with an empty checkpoint
//! directory it starts at step 0; after a checkpointed run it resumes from the newest
//! committed step, here on a different data-parallel size set with `--set`.

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
