//! Datasets at `s3://` locations end to end, against a real S3 server (s3s-fs): `gantry data
//! synth --output s3://…` then a 2-rank `gantry launch` from S3, streamed into the host's
//! data cache while it trains, trains bit for bit like the same run from a local copy (a
//! damaged cached shard is fetched again); an upload SIGKILLed midway leaves no manifest and
//! a rerun completes it; unsupported schemes, a missing manifest and a missing bucket are
//! refused by name. (Budgets, a restarted server and a killed rank: `s3_stream.rs`.)

mod common;

use common::s3::{BUCKET, Server};
use common::{GANTRY, text};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SPEC: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
[parallel]
dp = 2
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
[train]
steps = 6
global_batch = 8
micro_batch = 2
threads = 1
eval_every = 3
"#;

fn tempdir(tag: &str) -> PathBuf {
    common::tempdir("s3data", tag)
}

/// `gantry ARGS` with the server's S3 settings and `cache` as the host's data cache.
fn gantry(server: &Server, cache: &Path, args: &[&str]) -> Output {
    server.gantry(cache).args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

fn job(dir: &Path, name: &str, data: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{SPEC}\n[data]\npath = \"{data}\"\n")).unwrap();
    path
}

/// Step → every figure of metrics.jsonl that does not depend on timing.
fn figures(run: &Path) -> BTreeMap<u64, BTreeMap<String, String>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let kept = v
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| !k.ends_with("_ms") && !k.ends_with("_per_s"))
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect();
            (v["step"].as_u64().unwrap(), kept)
        })
        .collect()
}

#[test]
fn synth_to_s3_then_a_two_rank_launch_matches_the_local_copy_bit_for_bit() {
    let dir = tempdir("train");
    let server = Server::start(&dir);
    let cache = dir.join("cache");
    let synth = |output: &str| {
        ok(gantry(
            &server,
            &cache,
            &[
                "data",
                "synth",
                "--tokens",
                "60000",
                "--seed",
                "11",
                "--shard-tokens",
                "20000",
                "--output",
                output,
            ],
        ))
    };
    let local = dir.join("local");
    synth(local.to_str().unwrap());
    let url = format!("s3://{BUCKET}/corpora/synth");
    let said = synth(&url);
    assert!(said.contains("(manifest.json last)"), "{said}");
    assert!(server.object_path("corpora/synth/manifest.json").is_file());
    // A second synth to the same prefix is refused before any work.
    let out = gantry(
        &server,
        &cache,
        &["data", "synth", "--tokens", "60000", "--output", &url],
    );
    assert!(
        !out.status.success() && text(&out).contains("already holds a dataset"),
        "{}",
        text(&out)
    );

    let run = |spec: &Path, run: &Path| {
        ok(gantry(
            &server,
            &cache,
            &[
                "launch",
                spec.to_str().unwrap(),
                "--local",
                "2",
                "--run-dir",
                run.to_str().unwrap(),
            ],
        ))
    };
    let from_local = dir.join("run-local");
    run(&job(&dir, "local.toml", local.to_str().unwrap()), &from_local);
    let from_s3 = dir.join("run-s3");
    let said = run(&job(&dir, "s3.toml", &url), &from_s3);
    assert!(
        said.contains(&format!("dataset {url} (4 shards")) && said.contains("streamed by the ranks"),
        "{said}"
    );
    for r in 0..2 {
        let log = std::fs::read_to_string(from_s3.join(format!("logs/rank-{r}.log"))).unwrap();
        assert!(
            log.contains("first step's data ready") && log.contains("streamed=true"),
            "rank {r}: {log}"
        );
    }
    let (a, b) = (figures(&from_local), figures(&from_s3));
    assert_eq!(a.len(), 6, "{a:?}");
    assert_eq!(
        a, b,
        "the run from s3:// must be bit-identical to the run from the local copy"
    );
    assert!(a[&6].contains_key("val_loss"), "{:?}", a[&6]);
    // The resolved spec keeps the location, not the cache path.
    let spec = std::fs::read_to_string(from_s3.join("spec.toml")).unwrap();
    assert!(spec.contains(&format!("path = \"{url}\"")), "{spec}");

    // The ranks streamed what they read (and, without a budget, the rest while they could);
    // `data inspect` completes the copy. A flipped byte in it: detected, fetched again, the
    // copy whole again.
    ok(gantry(&server, &cache, &["data", "inspect", &url]));
    let cached = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path().join("shard-00001.bin"))
        .find(|p| p.is_file())
        .expect("the cached copy in GANTRY_DATA_CACHE/<fingerprint>/");
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(&cached, &bytes).unwrap();
    let said = ok(gantry(&server, &cache, &["data", "inspect", &url]));
    assert!(
        said.contains("fetched again (cached copy damaged): shard-00001.bin (xxh3"),
        "{said}"
    );
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(local.join("shard-00001.bin")).unwrap()
    );
    let said = ok(gantry(&server, &cache, &["data", "inspect", &url]));
    assert!(said.contains("nothing fetched"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_upload_killed_midway_leaves_no_manifest_and_a_rerun_completes_it() {
    let dir = tempdir("kill");
    let server = Server::start(&dir);
    let cache = dir.join("cache");
    let local = dir.join("big");
    ok(gantry(
        &server,
        &cache,
        &[
            "data",
            "synth",
            "--tokens",
            "16000000",
            "--shard-tokens",
            "500000",
            "--output",
            local.to_str().unwrap(),
        ],
    ));
    let url = format!("s3://{BUCKET}/big");
    // One file at a time: the .idx files, then 33 shards of 1 MB. Killed as soon as the first
    // shard's .bin is complete (its upload record appears).
    let mut child = server
        .command()
        .args(["data", "upload", local.to_str().unwrap(), &url, "--files", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let record = server.object_path("big/.gantry-upload/shard-00000.bin.json");
    let started = Instant::now();
    while !record.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upload ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no upload record after 30 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !server.object_path("big/manifest.json").exists(),
        "an interrupted upload must not publish its manifest"
    );
    let out = gantry(&server, &cache, &["data", "inspect", &url]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("{url}/manifest.json does not exist")),
        "{}",
        text(&out)
    );

    let out = gantry(
        &server,
        &cache,
        &["data", "upload", local.to_str().unwrap(), &url, "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = report["skipped"].as_array().unwrap();
    assert!(
        skipped.iter().any(|n| n == "shard-00000.bin"),
        "the rerun must skip what was complete: {report}"
    );
    let uploaded = report["uploaded"].as_array().unwrap();
    assert_eq!(uploaded.last().unwrap(), "manifest.json", "{report}");
    assert_eq!(skipped.len() + uploaded.len(), 67, "{report}");
    let said = ok(gantry(&server, &cache, &["data", "inspect", &url, "--sample", "4"]));
    assert!(said.contains("16000000 tokens"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_schemes_missing_manifests_and_missing_buckets_are_named() {
    let dir = tempdir("refused");
    let server = Server::start(&dir);
    let cache = dir.join("cache");
    let out = Command::new(GANTRY)
        .args(["data", "synth", "--tokens", "1000", "--output", "ftp://x/ds"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("bad dataset location \"ftp://x/ds\": scheme \"ftp://\""),
        "{}",
        text(&out)
    );
    assert!(
        !dir.join("ftp:").exists(),
        "never a local directory named after the scheme"
    );

    let launch = |data: &str| {
        let spec = job(&dir, "job.toml", data);
        gantry(&server, &cache, &["launch", spec.to_str().unwrap(), "--local", "2"])
    };
    let out = launch("ftp://x/ds");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("bad dataset location \"ftp://x/ds\": scheme \"ftp://\""),
        "{}",
        text(&out)
    );

    let out = launch(&format!("s3://{BUCKET}/nothing"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("s3://{BUCKET}/nothing/manifest.json does not exist")),
        "{}",
        text(&out)
    );
    let out = launch("s3://no-such-bucket/ds");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("bucket \"no-such-bucket\" does not exist"),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
