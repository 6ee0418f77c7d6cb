//! `gantry launch` end to end: a tiny model learns and prints samples; bad job specs fail
//! with messages naming the field and the numbers; a killed or stalled rank turns into an
//! error naming that rank instead of a hang.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{GANTRY, text};

const SPEC: &str = r#"
[model]
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 32
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 5
[train]
steps = 60
global_batch = 16
micro_batch = 4
threads = 1
eval_every = 30
"#;

fn tempdir(tag: &str) -> PathBuf {
    common::tempdir("training", tag)
}

/// A job spec and a small synthetic dataset in `dir`.
fn setup(dir: &Path) -> PathBuf {
    common::synth_job(dir, SPEC, 200_000, 3)
}

fn launch(spec: &Path, local: usize, run: &Path, sets: &[&str]) -> Command {
    let mut c = Command::new(GANTRY);
    c.arg("launch")
        .arg(spec)
        .args(["--local", &local.to_string(), "--run-dir"])
        .arg(run)
        .args(sets.iter().flat_map(|s| ["--set", s]));
    c
}

#[test]
fn a_tiny_model_learns_and_reports() {
    let dir = tempdir("learns");
    let spec = setup(&dir);
    let run = dir.join("run");
    let out = launch(&spec, 2, &run, &["parallel.tp=2", "train.sample_tokens=8"])
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 60);
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["step"].as_u64(), Some(i as u64 + 1));
        for key in ["loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "comm_ms"] {
            assert!(m[key].as_f64().is_some_and(f64::is_finite), "step {i}: {key} in {m}");
        }
        assert_eq!(m["tokens"].as_u64(), Some(16 * 32 * (i as u64 + 1)));
    }
    // Validation every 30 steps (and so at the end).
    let evaluated: Vec<u64> = metrics
        .iter()
        .filter(|m| m.get("val_loss").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evaluated, vec![30, 60]);
    let first = metrics[0]["loss"].as_f64().unwrap();
    let val = summary["val_loss"].as_f64().unwrap();
    let floor = summary["entropy_floor"].as_f64().unwrap();
    assert!(
        val < first - 0.3,
        "validation loss {val} did not fall below the first step's {first}"
    );
    assert!(
        val > floor,
        "validation loss {val} below the entropy floor {floor}: impossible"
    );
    assert_eq!(summary["samples"].as_array().map(Vec::len), Some(2), "{summary}");
    let resolved = std::fs::read_to_string(run.join("spec.toml")).unwrap();
    assert!(
        resolved.contains("vocab_size = 512"),
        "the resolved spec records the vocabulary:\n{resolved}"
    );
    assert!(run.join("logs/rank-0.log").exists() && run.join("logs/rank-1.log").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_specs_name_the_field_and_the_numbers() {
    let dir = tempdir("bad");
    let spec = setup(&dir);
    let run = dir.join("run");
    let cases: &[(usize, &[&str], &[&str])] = &[
        (3, &["parallel.dp=2"], &["dp 2 × tp 1 × pp 1 = 2 ranks", "world has 3"]),
        (3, &["parallel.tp=3"], &["n_heads 4 is not divisible by tp 3"]),
        (4, &["parallel.pp=4"], &["pp 4 is more than n_layers 2"]),
        (
            2,
            &["parallel.dp=2", "train.global_batch=12"],
            &["global_batch 12", "micro_batch 4 × dp 2 = 8"],
        ),
        (1, &["model.d_modle=8"], &["d_modle"]),
        (1, &["model.vocab_size=100"], &["vocab_size", "100", "512"]),
    ];
    for (local, sets, needles) in cases {
        let out = launch(&spec, *local, &run, sets).output().unwrap();
        let msg = text(&out);
        assert!(!out.status.success(), "{sets:?} should fail");
        for n in *needles {
            assert!(msg.contains(n), "{sets:?}: expected `{n}` in:\n{msg}");
        }
        assert!(!msg.contains("panicked"), "{msg}");
    }
    let out = Command::new(GANTRY)
        .arg("launch")
        .arg(dir.join("missing.toml"))
        .args(["--local", "1"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("missing.toml"),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pid of the rank process `rank` whose command line names `run`.
fn rank_pid(run: &Path, rank: usize) -> Option<u32> {
    let want_arg = run.join("spec.toml").display().to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !(args.iter().any(|a| a == "rank") && args.contains(&want_arg)) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|&b| b == 0)
            .any(|kv| kv == format!("RANK={rank}").as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// Start a long job on 4 ranks, wait until it has trained a few steps, send `signal` to rank 3,
/// and return the launcher's output and how long it took to give up.
fn disturb_rank_3(tag: &str, signal: i32) -> (Output, Duration, PathBuf) {
    let dir = tempdir(tag);
    let spec = setup(&dir);
    let run = dir.join("run");
    let child: Child = launch(
        &spec,
        4,
        &run,
        &[
            "parallel.dp=2",
            "parallel.tp=2",
            "train.steps=100000",
            "parallel.timeout_s=5",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let metrics = run.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "the job never trained 3 steps");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(&run, 3).expect("rank 3 is running");
    // SAFETY: sending a signal to a process this test started (through the launcher).
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    (out, t0.elapsed(), run)
}

#[test]
fn a_killed_rank_is_named_and_nothing_hangs() {
    let (out, took, run) = disturb_rank_3("kill", libc::SIGKILL);
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(msg.contains("rank 3 failed"), "{msg}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    // The survivors' own errors blame rank 3 too.
    let logs: String = (0..3)
        .map(|r| std::fs::read_to_string(run.join(format!("logs/rank-{r}.log"))).unwrap_or_default())
        .collect();
    assert!(logs.contains("rank 3"), "no survivor named rank 3:\n{logs}");
    let _ = std::fs::remove_dir_all(run.parent().unwrap());
}

#[test]
fn a_stalled_rank_is_named_within_the_deadline() {
    let (out, took, run) = disturb_rank_3("stall", libc::SIGSTOP);
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(msg.contains("rank 3 did not respond"), "{msg}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let _ = std::fs::remove_dir_all(run.parent().unwrap());
}
