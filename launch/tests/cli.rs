//! The `gantry` binary end to end.

use std::process::Command;

fn gantry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gantry"))
}

#[test]
fn data_synth_then_inspect_json() {
    let dir = std::env::temp_dir().join(format!("gantry-cli-synth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = gantry()
        .args([
            "data",
            "synth",
            "--tokens",
            "50000",
            "--seed",
            "3",
            "--vocab-size",
            "1000",
            "--output",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 50000 tokens"));
    let out = gantry().args(["data", "inspect", "--json"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["manifest"]["tokens"], 50000);
    assert_eq!(report["sample_tokens"].as_array().unwrap().len(), 32);
    // Running synth again into the same directory is refused, and nothing is lost.
    let out = gantry()
        .args(["data", "synth", "--tokens", "10", "--output"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_collectives_rejects_bad_input_clearly() {
    let out = gantry()
        .args(["bench", "collectives", "--sizes", "12Q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad size `12Q`"));
    let out = gantry()
        .args(["bench", "collectives", "--op", "scan"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown op `scan`"));
}
