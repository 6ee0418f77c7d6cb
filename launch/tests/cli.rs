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
fn data_prepare_from_stdin_with_zstd_then_inspect_and_bench() {
    use std::io::Write;
    use std::process::Stdio;
    let root = std::env::temp_dir().join(format!("gantry-cli-prepare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let text: String = (0..300)
        .map(|i| {
            format!(
                "Paragraph {i}: it's a small test, naïve but fine.\nSecond line {}.\n\n",
                i * 7
            )
        })
        .collect();
    let input = root.join("t.txt");
    std::fs::write(&input, &text).unwrap();
    let from_file = root.join("file");
    let out = gantry()
        .args([
            "data",
            "prepare",
            "--vocab-size",
            "400",
            "--split-by",
            "blank-line",
            "--input",
        ])
        .arg(&input)
        .arg("--output")
        .arg(&from_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // stderr is not a terminal here: plain log lines, no bar.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prepare: done:"), "{stderr}");

    let from_stdin = root.join("stdin");
    let mut child = gantry()
        .args([
            "data",
            "prepare",
            "--input",
            "-",
            "--split-by",
            "blank-line",
            "--compress",
            "zstd",
            "--json",
        ])
        .arg("--tokenizer")
        .arg(from_file.join("tokenizer.json"))
        .arg("--output")
        .arg(&from_stdin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["documents"], 300);
    assert_eq!(report["fast_path"], true);
    let manifest = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let (a, b) = (manifest(&from_file), manifest(&from_stdin));
    assert_eq!(
        a["shards"][0]["bin_xxh3"], b["shards"][0]["bin_xxh3"],
        "stdin gives the same tokens"
    );
    assert!(b["shards"][0]["zstd"]["xxh3"].is_string());

    // Inspect verifies the frames, also with the .bin gone.
    std::fs::remove_file(from_stdin.join("shard-00000.bin")).unwrap();
    let out = gantry().args(["data", "inspect"]).arg(&from_stdin).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("zstd frames: 1 of 1 shard(s)") && stdout.contains("Paragraph 0"),
        "{stdout}"
    );

    let out = gantry()
        .args([
            "data",
            "bench",
            "--zstd",
            "--json",
            "--seconds",
            "0.1",
            "--seq-len",
            "64",
            "--cache-dir",
        ])
        .arg(root.join("cache"))
        .arg(&from_stdin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bench: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(bench["uncompressed"].is_null(), "no .bin left");
    assert_eq!(bench["zstd"]["impl"], "gantry-zstd");
    assert!(bench["zstd_decode"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    // Materialized into a fresh directory under --cache-dir, read from there, then removed.
    let cache = root.join("cache");
    let made = &bench["zstd_materialize"];
    assert_eq!(made["shards"], 1);
    assert!(made["bytes"].as_u64().unwrap() > 0 && made["mb_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(bench["materialized"]["impl"], "gantry-materialized");
    assert!(bench["materialized"]["tokens_per_s"].as_f64().unwrap() > 0.0);

    // Without --zstd, a compressed-only dataset is read through a materialized copy, made
    // under --cache-dir on the first run and reused by the next.
    for _ in 0..2 {
        let out = gantry()
            .args([
                "data",
                "bench",
                "--json",
                "--seconds",
                "0.1",
                "--seq-len",
                "64",
                "--cache-dir",
            ])
            .arg(&cache)
            .arg(&from_stdin)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let bench: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(bench["impl"], "gantry-materialized");
    }
    let copies: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(copies.len(), 1, "one dataset directory: {copies:?}");
    assert!(copies[0].join("shard-00000.bin").is_file());

    // A damaged frame file: inspect names it.
    let zst = from_stdin.join("shard-00000.bin.zst");
    let mut z = std::fs::read(&zst).unwrap();
    let mid = z.len() / 2;
    z[mid] ^= 0xff;
    std::fs::write(&zst, z).unwrap();
    let out = gantry().args(["data", "inspect"]).arg(&from_stdin).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shard-00000.bin.zst") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&root);
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

/// `--token-file` errors name the file: missing, empty, several lines; `--token` with
/// `--token-file` is refused. Nothing needs a coordinator: the token is read first.
#[test]
fn token_files_are_checked_before_anything_connects() {
    let dir = std::env::temp_dir().join(format!("gantry-cli-token-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--coordinator", "127.0.0.1:9"]);
        run_without(&all, &["GANTRY_TOKEN", "GANTRY_TOKEN_FILE", "GANTRY_COORDINATOR"])
    };
    let path = |f: &str| dir.join(f).display().to_string();
    std::fs::write(dir.join("empty"), "\n").unwrap();
    std::fs::write(dir.join("two-lines"), "read a\nwrite b\n").unwrap();
    std::fs::write(dir.join("good"), "tok\n").unwrap();

    let missing = path("missing");
    let (ok, text) = run(&["jobs", "--token-file", &missing]);
    assert!(
        !ok && text.contains("cannot read the cluster token file") && text.contains(&missing),
        "{text}"
    );
    let empty = path("empty");
    let (ok, text) = run(&["jobs", "--token-file", &empty]);
    assert!(
        !ok && text.contains(&format!("the cluster token file {empty} is empty")),
        "{text}"
    );
    let two = path("two-lines");
    let (ok, text) = run(&["jobs", "--token-file", &two]);
    assert!(
        !ok && text.contains("more than one line") && text.contains(&two),
        "{text}"
    );
    let (ok, text) = run(&["jobs", "--token", "x", "--token-file", &path("good")]);
    assert!(!ok && text.contains("cannot be used with"), "{text}");
    let (ok, text) = run(&["jobs"]);
    assert!(!ok && text.contains("a cluster token is required"), "{text}");
    // The daemons check it before they serve.
    let (ok, text) = run(&["worker", "--token-file", &missing, "--state", &path("state")]);
    assert!(!ok && text.contains(&missing), "{text}");
    let mut c = gantry();
    c.args(["coordinator", "--listen", "127.0.0.1:0", "--state", &path("cstate")])
        .args(["--token-file", &path("good"), "--metrics-token-file", &missing]);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("cannot read the metrics token file") && text.contains(&missing),
        "{text}"
    );
    // The registry client too.
    let (ok, text) = run_models(&[
        "models",
        "list",
        "--registry",
        "http://127.0.0.1:9",
        "--token-file",
        &empty,
    ]);
    assert!(
        !ok && text.contains(&format!("the registry token file {empty} is empty")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_models(args: &[&str]) -> (bool, String) {
    run_without(
        args,
        &["GANTRY_REGISTRY_TOKEN", "GANTRY_REGISTRY_TOKEN_FILE", "GANTRY_REGISTRY"],
    )
}

/// `gantry ARGS` without the variables `unset`: did it succeed, and stdout + stderr.
fn run_without(args: &[&str], unset: &[&str]) -> (bool, String) {
    let mut c = gantry();
    c.args(args);
    for k in unset {
        c.env_remove(k);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn durations_that_are_not_numbers_of_seconds_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("gantry-cli-durations-{}", std::process::id()));
    let db = dir.join("registry.redb").display().to_string();
    for (flag, value) in [
        ("--header-timeout-s", "inf"),
        ("--idle-timeout-s", "-1"),
        ("--header-timeout-s", "1e300"),
    ] {
        let out = gantry()
            .args([
                "registry",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                &db,
                "--no-generate",
            ])
            .arg(format!("{flag}={value}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(flag), "{flag} {value}: {text}");
    }
    let out = gantry()
        .args([
            "worker",
            "--coordinator",
            "127.0.0.1:9",
            "--token",
            "t",
            "--grace-s",
            "1e300",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("--grace-s"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
