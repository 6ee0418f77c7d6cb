//! The GPU script cannot rot: `scripts/bench-gpu.sh --cpu-smoke` runs every stage of the
//! one-call GPU check with tiny configs on the CPU (the NCCL stage skipped with its typed
//! error), and the device flags of `gantry eval`, `gantry registry serve` and `gantry bench
//! nccl` fail by name, without a panic, where there is no GPU.

mod common;

use common::{GANTRY, text};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Every stage of the script, in order.
const STAGES: [&str; 9] = [
    "preflight",
    "data",
    "nccl",
    "mfu-124M",
    "mfu-350M",
    "mfu-1.3B",
    "ckpt-1.3B",
    "resume-350M",
    "serve-350M",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// This machine has an NVIDIA GPU (then the "no GPU" checks do not apply).
fn has_gpu() -> bool {
    Path::new("/dev/nvidiactl").exists()
}

/// Processes whose command line mentions `needle`, other than this test.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

/// The words of a progress line after its time: `[  12s] STAGE  STATUS detail`.
fn words(line: &str) -> Vec<&str> {
    line.split_once("] ")
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect())
}

/// The progress line of `stage`.
fn line_of<'a>(progress: &'a str, stage: &str) -> Option<&'a str> {
    progress.lines().find(|l| words(l).first() == Some(&stage))
}

#[test]
fn the_cpu_smoke_runs_every_stage() {
    let dir = common::tempdir("gpu-script", "smoke");
    let (out, work) = (dir.join("out"), dir.join("work"));
    let started = Instant::now();
    let run = Command::new("bash")
        .arg(repo().join("scripts/bench-gpu.sh"))
        .arg("--cpu-smoke")
        .current_dir(repo())
        .env("GANTRY_BIN", GANTRY)
        .env("OUT", &out)
        .env("GANTRY_GPU_WORK", &work)
        .env_remove("GANTRY_GPU_BUDGET_S")
        .env_remove("GANTRY_GPU_HARD_S")
        .env_remove("GANTRY_BENCH_STEPS")
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let progress = std::fs::read_to_string(out.join("progress.txt")).unwrap_or_default();
    let failures = std::fs::read_to_string(out.join("failures.log")).unwrap_or_default();
    assert!(
        run.status.success(),
        "exit {:?}\n{progress}\n{failures}\n{}",
        run.status,
        text(&run)
    );

    // A line per stage, in order, none failed.
    let mut last = 0;
    for stage in STAGES {
        let line = line_of(&progress, stage).unwrap_or_else(|| panic!("no {stage} line:\n{progress}"));
        let at = progress.find(line).unwrap();
        assert!(at >= last, "{stage} out of order:\n{progress}");
        last = at;
        let status = words(line)[1];
        assert!(status == "ok" || status == "skipped", "{line}\n{progress}\n{failures}");
    }
    // Nothing skipped for the budget in a run this small.
    assert!(!progress.contains("budget:"), "{progress}");
    // NCCL: skipped with its typed error (where there is no GPU).
    let nccl = line_of(&progress, "nccl").unwrap();
    if !has_gpu() {
        assert!(
            nccl.contains("skipped") && nccl.contains("typed error: NCCL is not available on this machine:"),
            "{nccl}"
        );
    }
    // Every other stage ran.
    for stage in STAGES.iter().filter(|s| **s != "nccl") {
        let line = line_of(&progress, stage).unwrap();
        assert!(line.contains(" ok "), "{line}");
    }
    // The rows have gantry's figures; the peer's, or the line saying why it was skipped.
    for size in ["124M", "350M", "1.3B"] {
        let line = line_of(&progress, &format!("mfu-{size}")).unwrap();
        assert!(line.contains("gantry ") && line.contains("tok/s"), "{line}");
        assert!(
            line.contains("pytorch-eager ") || line.contains("peer skipped: "),
            "{line}"
        );
    }
    assert!(
        line_of(&progress, "ckpt-1.3B").unwrap().contains("stall "),
        "{progress}"
    );
    assert!(
        line_of(&progress, "resume-350M")
            .unwrap()
            .contains("resumed at step 5; checkpoint verify ok"),
        "{progress}"
    );
    let serve = line_of(&progress, "serve-350M").unwrap();
    if !has_gpu() {
        for says in [
            "serve: generation on cpu in f32 (--device auto: no CUDA device is visible)",
            "generate: 8 greedy tokens",
            "on cpu (f32)",
            "eval --device cuda refused",
        ] {
            assert!(serve.contains(says), "{says:?} not in {serve}");
        }
    }
    assert!(progress.lines().last().unwrap().contains("done"), "{progress}");

    // summary.json: every stage, none failed.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["mode"], "smoke");
    assert_eq!(summary["failed"], serde_json::json!([]), "{summary}");
    let names: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, STAGES);
    let serve = summary["stages"][8]["figures"].clone();
    assert_eq!(serve["eval_cpu"]["device"], "cpu", "{serve}");
    assert_eq!(serve["generate"]["tokens"].as_array().map(Vec::len), Some(8), "{serve}");

    // At most 8 result files, nothing but files; checkpoints gone from the scratch space.
    let files: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
    assert!(
        files.len() <= 8,
        "{:?}",
        files.iter().map(|f| f.file_name()).collect::<Vec<_>>()
    );
    assert!(files.iter().all(|f| f.file_type().unwrap().is_file()));
    for ckpt in ["ckpt-1.3B", "ckpt-350M"] {
        assert!(!work.join(ckpt).exists(), "{ckpt} left behind");
    }
    // Nothing left running: no rank, server or command mentions the scratch space.
    let left = processes_mentioning(&work.to_string_lossy());
    assert!(left.is_empty(), "still running: {left:#?}");
    eprintln!("bench-gpu.sh --cpu-smoke: {seconds:.1} s\n{progress}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn device_flags_fail_by_name_without_a_gpu() {
    if has_gpu() {
        return;
    }
    let dir = common::tempdir("gpu-script", "flags");
    // Refused before anything is fetched or bound: no registry is running at all.
    let eval = Command::new(GANTRY)
        .args([
            "eval",
            "--model",
            "m",
            "--device",
            "cuda",
            "--registry",
            "http://127.0.0.1:9",
        ])
        .arg("--data")
        .arg(dir.join("nodata"))
        .output()
        .unwrap();
    let serve = Command::new(GANTRY)
        .args([
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cuda",
            "--db",
        ])
        .arg(dir.join("r.redb"))
        .output()
        .unwrap();
    for (what, out) in [("eval", &eval), ("registry serve", &serve)] {
        let t = text(out);
        assert_eq!(out.status.code(), Some(1), "{what}: {t}");
        assert!(t.contains("--device cuda: no CUDA device is visible"), "{what}: {t}");
        assert!(!t.contains("panicked"), "{what}: {t}");
    }
    assert!(
        !dir.join("r.redb").exists(),
        "the registry opened its database before refusing"
    );
    // Unknown devices are clap errors that list the choices.
    let bad = Command::new(GANTRY)
        .args(["eval", "--model", "m", "--data", "d", "--device", "gpu"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("cpu, cuda, auto"), "{}", text(&bad));

    // gantry bench nccl: exit 3 and the typed error as JSON.
    let nccl = Command::new(GANTRY)
        .args(["bench", "nccl", "--json", "--count", "1024"])
        .output()
        .unwrap();
    assert_eq!(nccl.status.code(), Some(3), "{}", text(&nccl));
    let v: serde_json::Value = serde_json::from_slice(&nccl.stdout).unwrap();
    let msg = v["unavailable"].as_str().unwrap();
    assert!(msg.starts_with("NCCL is not available on this machine: "), "{msg}");
    let bad_dtype = Command::new(GANTRY)
        .args(["bench", "nccl", "--dtype", "i64"])
        .output()
        .unwrap();
    assert_eq!(bad_dtype.status.code(), Some(1), "{}", text(&bad_dtype));
    assert!(
        text(&bad_dtype).contains("measures f32 and bf16"),
        "{}",
        text(&bad_dtype)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
