//! Checkpoints end to end through `gantry launch` and `gantry checkpoint`: a run stopped at a
//! checkpoint and resumed in new processes reproduces the uninterrupted run bit for bit in the
//! same layout and within 1e-4 in other layouts, on local disk and on a real S3 server, with
//! the same global sample stream; a checkpoint of another model is refused by field; export
//! writes a GPT-2 safetensors file.

mod common;
#[path = "../../checkpoint/tests/common/s3_server.rs"]
mod s3_server;

use common::{GANTRY, text};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SPEC: &str = r#"
[model]
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 32
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
[train]
steps = 8
global_batch = 16
micro_batch = 2
threads = 1
"#;

/// The layout the reference and the stopped run use: DP, TP and ZeRO-1 shards all in play.
const SAVED: &[&str] = &["parallel.dp=2", "parallel.tp=2", "parallel.zero1=true"];

fn tempdir(tag: &str) -> PathBuf {
    common::tempdir("ckpt", tag)
}

fn setup(dir: &Path) -> PathBuf {
    common::synth_job(dir, SPEC, 100_000, 5)
}

/// Run `gantry launch` with `sets` and extra arguments; sample logging on.
fn launch(spec: &Path, local: usize, run: &Path, sets: &[&str], extra: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(GANTRY);
    c.arg("launch")
        .arg(spec)
        .args(["--local", &local.to_string(), "--json", "--run-dir"])
        .arg(run)
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .args(extra)
        .env("GANTRY_LOG_SAMPLES", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn losses(run: &Path) -> BTreeMap<u64, f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| Some((m.get("step")?.as_u64()?, m["loss"].as_f64()?)))
        .collect()
}

/// Step → the sorted global samples consumed (every DP rank's log together).
fn samples(run: &Path) -> BTreeMap<u64, Vec<(u64, u64)>> {
    let mut out: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for e in std::fs::read_dir(run).unwrap() {
        let p = e.unwrap().path();
        if !p.file_name().unwrap().to_string_lossy().starts_with("samples-rank-") {
            continue;
        }
        for l in std::fs::read_to_string(&p).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            out.entry(v["step"].as_u64().unwrap())
                .or_default()
                .push((v["epoch"].as_u64().unwrap(), v["sample"].as_u64().unwrap()));
        }
    }
    for s in out.values_mut() {
        s.sort_unstable();
    }
    out
}

/// Reference run, stopped run (checkpoint at step 4) and a same-layout resume into
/// `ckpt`; checks bit-exactness and returns the reference run directory.
fn stop_and_resume_bit_exact(dir: &Path, spec: &Path, ckpt: &str, env: &[(&str, String)]) -> PathBuf {
    let reference = dir.join("reference");
    let out = launch(spec, 4, &reference, SAVED, &[], env);
    assert!(out.status.success(), "{}", text(&out));

    let stopped = dir.join("stopped");
    let mut sets = SAVED.to_vec();
    sets.extend(["train.stop_after=4", "checkpoint.every=2", "checkpoint.keep_last=1"]);
    let out = launch(spec, 4, &stopped, &sets, &["--checkpoint-dir", ckpt], env);
    assert!(out.status.success(), "{}", text(&out));
    let metrics = std::fs::read_to_string(stopped.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"ckpt_stall_ms\""),
        "stall reported per checkpoint:\n{metrics}"
    );
    assert!(metrics.contains("\"ckpt_committed\""), "commit reported:\n{metrics}");

    let resumed = dir.join("resumed");
    let out = launch(
        spec,
        4,
        &resumed,
        SAVED,
        &["--checkpoint-dir", ckpt, "--resume", "latest"],
        env,
    );
    assert!(out.status.success(), "{}", text(&out));

    let (a, b, c) = (losses(&reference), losses(&stopped), losses(&resumed));
    assert_eq!(a.len(), 8);
    assert_eq!(b.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), vec![5, 6, 7, 8]);
    for (step, loss) in b.iter().chain(&c) {
        assert_eq!(
            loss.to_bits(),
            a[step].to_bits(),
            "step {step}: resumed loss {loss} is not bit-identical to {}",
            a[step]
        );
    }
    let (sa, mut sbc) = (samples(&reference), samples(&stopped));
    sbc.extend(samples(&resumed));
    assert_eq!(sa.len(), 8);
    assert_eq!(sa, sbc, "the resumed run saw other samples than the uninterrupted one");
    reference
}

/// `gantry checkpoint list --json` of `ckpt`.
fn list_json(ckpt: &Path) -> Vec<serde_json::Value> {
    let listed = Command::new(GANTRY)
        .args(["checkpoint", "list", "--json"])
        .arg(ckpt)
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", text(&listed));
    serde_json::from_slice(&listed.stdout).unwrap()
}

#[test]
fn resume_is_bit_exact_and_any_layout_continues_the_same_stream() {
    let dir = tempdir("local");
    let spec = setup(&dir);
    let ckpt = dir.join("ckpt");
    let reference = stop_and_resume_bit_exact(&dir, &spec, ckpt.to_str().unwrap(), &[]);
    // keep_last = 1 removed the stopped run's step 2; the resumed run saved step 8.
    let rows = list_json(&ckpt);
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 8]);

    // A fresh step-4 checkpoint (no resumed run's saves next to it), loaded in other layouts.
    let ckpt2 = dir.join("ckpt2");
    let mut sets = SAVED.to_vec();
    sets.push("train.stop_after=4");
    let out = launch(
        &spec,
        4,
        &dir.join("stopped2"),
        &sets,
        &["--checkpoint-dir", ckpt2.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let a = losses(&reference);
    let sa = samples(&reference);
    for (tag, local, layout) in [
        ("pp2-tp2", 4, &["parallel.pp=2", "parallel.tp=2"][..]),
        ("single", 1, &[][..]),
        ("dp4-zero1", 4, &["parallel.dp=4", "parallel.zero1=true"][..]),
    ] {
        let run = dir.join(format!("resumed-{tag}"));
        let mut sets = layout.to_vec();
        sets.push("checkpoint.at_end=false");
        let out = launch(
            &spec,
            local,
            &run,
            &sets,
            &["--checkpoint-dir", ckpt2.to_str().unwrap(), "--resume", "4"],
            &[],
        );
        assert!(out.status.success(), "{tag}: {}", text(&out));
        let c = losses(&run);
        assert_eq!(c.keys().copied().collect::<Vec<_>>(), vec![5, 6, 7, 8], "{tag}");
        for (step, loss) in &c {
            let rel = (loss - a[step]).abs() / a[step].abs();
            assert!(
                rel <= 1e-4,
                "{tag} step {step}: {loss} vs {} ({rel:e} relative)",
                a[step]
            );
        }
        let s = samples(&run);
        for step in 5..=8 {
            assert_eq!(s[&step], sa[&step], "{tag} step {step}: samples repeated or skipped");
        }
    }

    // Step 8's manifest garbled: `list` shows it as damaged beside step 4, and `--resume
    // latest` falls back to step 4 (saying which step it skipped) and continues the stream.
    std::fs::write(ckpt.join("step-00000008/manifest.json"), b"{\"garbled").unwrap();
    let rows = list_json(&ckpt);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0]["damaged"].is_null() && rows[0]["step"] == 4, "{rows:?}");
    assert!(
        rows[1]["damaged"].as_str().is_some_and(|d| d.contains("manifest")),
        "{rows:?}"
    );
    let run = dir.join("resumed-past-damage");
    let mut sets = SAVED.to_vec();
    sets.push("checkpoint.at_end=false");
    let out = launch(
        &spec,
        4,
        &run,
        &sets,
        &["--checkpoint-dir", ckpt.to_str().unwrap(), "--resume", "latest"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(losses(&run).keys().copied().collect::<Vec<_>>(), vec![5, 6, 7, 8]);
    let logs = std::fs::read_to_string(run.join("logs/rank-0.log")).unwrap_or_default();
    assert!(logs.contains("skipped an unreadable checkpoint"), "{logs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_from_s3_is_bit_exact_and_verifies() {
    let server = s3_server::S3Server::start();
    let env = vec![
        ("AWS_ENDPOINT_URL", server.endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", server.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", server.secret_key.clone()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let dir = tempdir("s3");
    let spec = setup(&dir);
    let url = format!("s3://{}/runs/tiny", server.bucket);
    stop_and_resume_bit_exact(&dir, &spec, &url, &env);
    let mut verify = Command::new(GANTRY);
    verify.args(["checkpoint", "verify", "--json", &url]);
    for (k, v) in &env {
        verify.env(k, v);
    }
    let out = verify.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["step"].as_u64(), Some(8), "{report}");
    assert!(report["entries"].as_u64().unwrap() > 10, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_model_is_refused_and_export_writes_gpt2_safetensors() {
    let dir = tempdir("export");
    let spec = setup(&dir);
    let ckpt = dir.join("ckpt");
    let out = launch(
        &spec,
        2,
        &dir.join("run"),
        &["parallel.tp=2", "train.stop_after=2"],
        &["--checkpoint-dir", ckpt.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));

    let out = launch(
        &spec,
        2,
        &dir.join("other"),
        &["parallel.tp=2", "model.d_model=32"],
        &["--checkpoint-dir", ckpt.to_str().unwrap(), "--resume", "latest"],
        &[],
    );
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(
        msg.contains("different model") && msg.contains("model.d_model: checkpoint 64, job 32"),
        "{msg}"
    );

    let export = dir.join("hf");
    let out = Command::new(GANTRY)
        .args(["checkpoint", "export", "--format", "safetensors", "--out"])
        .arg(&export)
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let bytes = std::fs::read(export.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(
        header["transformer.h.1.attn.c_attn.weight"]["shape"],
        serde_json::json!([64, 192])
    );
    assert_eq!(
        header["transformer.h.0.mlp.c_fc.weight"]["shape"],
        serde_json::json!([64, 256])
    );
    assert_eq!(header["transformer.wte.weight"]["dtype"], "F32");
    assert_eq!(header["__metadata__"]["gantry_step"], "2");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(export.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_layer"], 2);

    // A missing checkpoint is an error naming the place, not a crash.
    let out = Command::new(GANTRY)
        .args(["checkpoint", "inspect"])
        .arg(dir.join("nothing-here"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("no committed checkpoint"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
