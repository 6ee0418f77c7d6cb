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

/// A dataset of two shards of 12 documents of 100 tokens, declaring a vocabulary of 128,
/// written through the crate's writer; document 7 of shard 1 holds `bad_id` at position 40.
/// `old`: the manifest as older gantry versions wrote it (no largest ids recorded).
fn bad_dataset(dir: &Path, bad_id: u32, old: bool) -> PathBuf {
    use gantry_sharding::indexed::{IndexedWriter, TokenDType};
    use gantry_sharding::manifest::{MANIFEST, Manifest, ShardInfo, TokenizerInfo};
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut shards = Vec::new();
    for s in 0..2usize {
        let prefix = format!("shard-{s:05}");
        let mut w = IndexedWriter::create(&data.join(&prefix), TokenDType::U16).unwrap();
        for d in 0..12usize {
            let mut doc: Vec<u32> = (0..100).map(|i| ((i * 5 + d * 3 + s) % 128) as u32).collect();
            if (s, d) == (1, 7) {
                doc[40] = bad_id;
            }
            w.add_document(&doc).unwrap();
        }
        shards.push(ShardInfo::describe(&data, &prefix, &w.finish().unwrap()).unwrap());
    }
    let m = Manifest::new(TokenDType::U16, 128, TokenizerInfo::Bytes, shards);
    m.write(&data).unwrap();
    if old {
        let path = data.join(MANIFEST);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("max_token_id");
        for s in v["shards"].as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("max_token_id");
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
    let spec = dir.join("job.toml");
    std::fs::write(&spec, format!("{SPEC}\n[data]\npath = \"{}\"\n", data.display())).unwrap();
    spec
}

/// Steps recorded in a run's metrics.jsonl (none when it is missing).
fn steps_done(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
}

/// `gantry launch --nproc N -- gantry rank`: the ranks open the dataset themselves, with no
/// launcher check before them.
fn ranks_only(spec: &Path, n: usize, run: &Path, sets: &[&str], cache: &Path) -> Output {
    std::fs::create_dir_all(run).unwrap();
    Command::new(GANTRY)
        .args(["launch", "--nproc", &n.to_string(), "--", GANTRY, "rank", "--spec"])
        .arg(spec)
        .arg("--run-dir")
        .arg(run)
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .env("GANTRY_DATA_CACHE", cache)
        .output()
        .unwrap()
}

#[test]
fn a_token_id_outside_the_vocabulary_fails_before_any_step_naming_shard_document_and_id() {
    let dir = tempdir("badid");
    let spec = bad_dataset(&dir, 65_535, false);
    let cache = dir.join("cache");
    let needles = ["shard-00001.bin", "document 7", "token id 65535", "vocabulary is 128"];
    for tp in [1usize, 2] {
        // The launcher refuses before starting a rank.
        let run = dir.join(format!("run-tp{tp}"));
        let out = launch(&spec, tp, &run, &[&format!("parallel.tp={tp}")])
            .env("GANTRY_DATA_CACHE", &cache)
            .output()
            .unwrap();
        let msg = text(&out);
        assert!(!out.status.success(), "tp {tp}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "tp {tp}: expected `{n}` in:\n{msg}");
        }
        assert!(!run.join("logs").exists(), "tp {tp}: no rank started");
        // Ranks started without the launcher's check refuse it when they open the dataset.
        let run = dir.join(format!("ranks-tp{tp}"));
        let sets = [format!("parallel.tp={tp}"), "model.vocab_size=128".into()];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let out = ranks_only(&spec, tp, &run, &sets, &cache);
        let msg = text(&out);
        assert!(!out.status.success(), "tp {tp}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "ranks, tp {tp}: expected `{n}` in:\n{msg}");
        }
        assert!(
            !msg.contains("panicked") && !msg.contains("index out of range"),
            "{msg}"
        );
        assert_eq!(steps_done(&run), 0, "tp {tp}: no step ran");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_manifest_without_largest_ids_is_scanned() {
    let dir = tempdir("oldmanifest");
    let spec = bad_dataset(&dir, 200, true);
    let needles = [
        "shard-00001.bin",
        "document 7",
        "token id 200",
        "(token 40 of the document)",
    ];
    // The launcher's check finds the largest ids while hashing the shards.
    let run = dir.join("run");
    let out = launch(&spec, 2, &run, &["parallel.tp=2"])
        .env("GANTRY_DATA_CACHE", dir.join("cache"))
        .output()
        .unwrap();
    let msg = text(&out);
    assert!(!out.status.success(), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "expected `{n}` in:\n{msg}");
    }
    assert!(!run.join("logs").exists(), "no rank started");
    // Ranks on a host that never checked the dataset scan each shard on its first read:
    // the first micro-batch touching shard 1 fails, before the first step completes.
    for tp in [1usize, 2] {
        let run = dir.join(format!("ranks-tp{tp}"));
        // No validation split: the training reads are what meets shard 1 first.
        let sets = [
            format!("parallel.tp={tp}"),
            "model.vocab_size=128".into(),
            "data.valid_fraction=0.0".into(),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let out = ranks_only(&spec, tp, &run, &sets, &dir.join(format!("fresh-cache-{tp}")));
        let msg = text(&out);
        assert!(!out.status.success(), "tp {tp}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "ranks, tp {tp}: expected `{n}` in:\n{msg}");
        }
        assert_eq!(steps_done(&run), 0, "tp {tp}: no step ran");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn launch_checks_the_shards_once_per_host_and_a_flipped_byte_is_named() {
    let dir = tempdir("verify");
    let spec = setup(&dir);
    let cache = dir.join("cache");
    let run = |tag: &str| {
        let out = launch(&spec, 1, &dir.join(tag), &["train.steps=2"])
            .env("GANTRY_DATA_CACHE", &cache)
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    let verdicts = || -> Vec<PathBuf> {
        std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("verified.json"))
            .filter(|p| p.exists())
            .collect()
    };
    let (ok, msg) = run("first");
    assert!(ok, "{msg}");
    assert!(
        msg.contains("against its manifest (xxh3"),
        "the first launch hashes:\n{msg}"
    );
    let found = verdicts();
    assert_eq!(found.len(), 1, "one verdict in {}", cache.display());
    let verdict = std::fs::read(&found[0]).unwrap();
    // The second launch reads the verdict, not the shards.
    let (ok, msg) = run("second");
    assert!(ok, "{msg}");
    assert!(
        msg.contains("matches its manifest (checked on this host before"),
        "the second launch reuses the verdict:\n{msg}"
    );
    assert!(!msg.contains("(xxh3"), "the second launch hashed again:\n{msg}");
    assert_eq!(
        std::fs::read(&found[0]).unwrap(),
        verdict,
        "the verdict is kept as it was"
    );
    // One flipped byte in a shard, written in place: the shard changed since the verdict,
    // it is hashed again, and the launch fails naming it before any rank starts.
    let bin = dir.join("data/shard-00000.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[1001] ^= 0x10;
    std::fs::write(&bin, &bytes).unwrap();
    let (ok, msg) = run("flipped");
    assert!(!ok, "{msg}");
    assert!(
        msg.contains("shard-00000.bin") && msg.contains("checksum mismatch"),
        "the flipped shard is named:\n{msg}"
    );
    assert!(!dir.join("flipped/logs").exists(), "no rank started");
    let _ = std::fs::remove_dir_all(&dir);
}
