//! Streaming `s3://` datasets into the host's data cache while 2 ranks train, against a real
//! S3 server (s3s-fs, in a process of its own): with `--data-cache-gb` at a quarter of the
//! dataset the run completes bit for bit like the run from the local copy (in range mode:
//! byte ranges of shards checked against the upload's block checksums, held in memory), and
//! the cache directory (sampled all along) with the blocks held (by the fetchers' own
//! accounting) never takes more than the budget; the S3 server stopped mid-run and started
//! again, and a rank SIGKILLed in the middle of a shard download (a prefix without block
//! checksums, streamed shard by shard) then resumed from its checkpoint, give the same
//! losses too; a run checkpointed at dp 2 and resumed at dp 1 reads the same samples from
//! `s3://` as from the local copy.

mod common;

use common::s3::{BUCKET, Server};
use common::{GANTRY, text};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One rank reads 2 samples a step (global batch 4 over dp 2).
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
global_batch = 4
micro_batch = 2
threads = 1
eval_every = 10
"#;

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// A dataset of `tokens` tokens in shards of `shard_tokens` in `dir/local`, uploaded to
/// `s3://BUCKET/NAME`; the location and the dataset's size (the `.bin` and `.idx` files and
/// the manifest).
fn dataset(server: &Server, dir: &Path, cache: &Path, name: &str, tokens: u64, shard_tokens: u64) -> (String, u64) {
    dataset_with(server, dir, cache, name, tokens, shard_tokens, false)
}

/// [`dataset`], compressed-only when `zstd` (frames of 1 KiB, the `.bin` files removed before
/// the upload: the local copy reads its frames, the bucket holds no `.bin`).
fn dataset_with(
    server: &Server,
    dir: &Path,
    cache: &Path,
    name: &str,
    tokens: u64,
    shard_tokens: u64,
    zstd: bool,
) -> (String, u64) {
    let local = dir.join("local");
    let compress: &[&str] = match zstd {
        true => &["--compress", "zstd", "--zstd-frame-bytes", "1024"],
        false => &[],
    };
    ok(Command::new(GANTRY)
        .args([
            "data",
            "synth",
            "--tokens",
            &tokens.to_string(),
            "--seed",
            "7",
            "--doc-tokens",
            "300",
        ])
        .args(compress)
        .args(["--shard-tokens", &shard_tokens.to_string(), "--output"])
        .arg(&local)
        .output()
        .unwrap());
    if zstd {
        for e in std::fs::read_dir(&local).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "bin") {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let url = format!("s3://{BUCKET}/{name}");
    ok(server
        .gantry(cache)
        .args(["data", "upload"])
        .arg(&local)
        .arg(&url)
        .output()
        .unwrap());
    let bytes = std::fs::read_dir(&local)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    (url, bytes)
}

fn job(dir: &Path, name: &str, data: &str, steps: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{SPEC}steps = {steps}\n[data]\npath = \"{data}\"\n")).unwrap();
    path
}

fn launch(server: &Server, cache: &Path, spec: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut c = server.gantry(cache);
    c.arg("launch")
        .arg(spec)
        .args(["--local", "2", "--run-dir"])
        .arg(run)
        .args(extra);
    c
}

/// Step → loss, learning rate, gradient norm, tokens, validation loss (what does not depend
/// on timing), as the run's metrics.jsonl recorded them.
fn figures(run: &Path) -> BTreeMap<u64, BTreeMap<String, String>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let kept = ["loss", "lr", "grad_norm", "tokens", "val_loss"]
                .iter()
                .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.to_string())))
                .collect();
            // (A checkpoint committed after the last step has a line of its own.)
            Some((v.get("step")?.as_u64()?, kept))
        })
        .collect()
}

fn steps_done(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count())
}

/// The rank logs' `data stream done` lines: (peak_usage, evicted, budget, ranged) of each
/// rank.
fn stream_reports(run: &Path) -> Vec<(u64, u64, u64, bool)> {
    let field = |line: &str, name: &str| -> u64 {
        let at = line
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("{name} in {line}"))
            + name.len()
            + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (0..2)
        .flat_map(|r| {
            let log = std::fs::read_to_string(run.join(format!("logs/rank-{r}.log"))).unwrap();
            log.lines()
                .filter(|l| l.contains("data stream done"))
                .map(|l| {
                    let ranged = l.contains("ranged=true");
                    (field(l, "peak_usage"), field(l, "evicted"), field(l, "budget"), ranged)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sum of the file sizes in each directory under `cache`, the largest one. Each file once,
/// by inode: a file renamed while the directory is read may show under both names.
fn largest_entry(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(cache) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            std::fs::read_dir(e.path()).map_or(0, |files| {
                let sizes: BTreeMap<u64, u64> = files
                    .filter_map(|f| f.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| (m.ino(), m.len()))
                    .collect();
                sizes.values().sum()
            })
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_quarter_budget_run_matches_the_local_run_and_the_cache_stays_within_it() {
    quarter_budget_run("budget", false);
}

/// The same with a compressed-only dataset: range mode reads its zstd frames (a budget of half
/// the compressed copy, far below the decompressed footprint).
#[test]
fn a_quarter_budget_run_of_compressed_only_shards_matches_the_local_run() {
    quarter_budget_run("budget-zstd", true);
}

fn quarter_budget_run(tag: &str, zstd: bool) {
    let dir = common::tempdir("s3stream", tag);
    let server = Server::start(&dir);
    let cache = dir.join("cache");
    let (url, bytes) = dataset_with(&server, &dir, &cache, "ds", 240_000, 2500, zstd);
    // Compressed, the frames are a small part of the copy and the `.idx` files (which the
    // budget holds whole) most of it: half of it is still far below what whole shards take.
    let budget = if zstd { bytes / 2 } else { bytes / 4 };
    let gb = format!("{:?}", budget as f64 / 1e9);

    let from_local = dir.join("run-local");
    let local_spec = job(&dir, "local.toml", dir.join("local").to_str().unwrap(), 20);
    // A cache of its own: a compressed-only local copy materializes its `.bin` files there,
    // under the same fingerprint as the streamed copy's.
    let local_cache = dir.join("local-cache");
    ok(launch(&server, &local_cache, &local_spec, &from_local, &[])
        .output()
        .unwrap());

    // Sample the cache directory's size all along the streamed run.
    let done = Arc::new(AtomicBool::new(false));
    let largest = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, largest, cache) = (done.clone(), largest.clone(), cache.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                largest.fetch_max(largest_entry(&cache), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let from_s3 = dir.join("run-s3");
    let s3_spec = job(&dir, "s3.toml", &url, 20);
    let said = ok(launch(&server, &cache, &s3_spec, &from_s3, &["--data-cache-gb", &gb])
        .output()
        .unwrap());
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(said.contains("within a cache budget of"), "{said}");

    let (a, b) = (figures(&from_local), figures(&from_s3));
    assert_eq!(a.len(), 20);
    assert!(a[&20].contains_key("val_loss"), "{:?}", a[&20]);
    assert_eq!(
        a, b,
        "the run within a quarter budget must be bit-identical to the local run"
    );

    let sampled = largest.load(Ordering::Relaxed);
    let reports = stream_reports(&from_s3);
    assert_eq!(reports.len(), 2, "{reports:?}");
    let peak = reports.iter().map(|r| r.0).max().unwrap();
    assert!(
        reports.iter().all(|r| r.2 == budget),
        "the ranks' budget is the flag's: {reports:?}"
    );
    assert!(
        sampled <= budget,
        "the cache held {sampled} bytes, over its budget of {budget}"
    );
    assert!(
        sampled < peak && peak <= budget,
        "the fetchers' accounting ({peak}: the directory and the blocks held) covers what the directory held ({sampled}) and stays within {budget}"
    );
    assert!(
        reports.iter().all(|r| r.3 && r.1 == 0),
        "a dataset 4× the budget streams by byte ranges, nothing of a shard on disk to evict: {reports:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_s3_server_stopped_mid_run_and_started_again_changes_nothing() {
    let dir = common::tempdir("s3stream", "restart");
    let mut server = Server::start(&dir);
    let cache = dir.join("cache");
    let (url, bytes) = dataset(&server, &dir, &cache, "ds", 240_000, 2500);
    let gb = format!("{:?}", (bytes / 4) as f64 / 1e9);
    let from_local = dir.join("run-local");
    ok(launch(
        &server,
        &cache,
        &job(&dir, "local.toml", dir.join("local").to_str().unwrap(), 20),
        &from_local,
        &[],
    )
    .output()
    .unwrap());

    // Within a budget the shards keep coming all run long: stop the server after step 4.
    let run = dir.join("run-s3");
    let mut child = launch(
        &server,
        &cache,
        &job(&dir, "s3.toml", &url, 20),
        &run,
        &["--data-cache-gb", &gb],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let started = Instant::now();
    while steps_done(&run) < 4 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step 4");
        assert!(started.elapsed() < Duration::from_secs(60), "no step 4 after 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Keep it down until the ranks have met it (a quarter budget must fetch again before the
    // end) and retried; the fetcher's own client gives up on a request within seconds, so the
    // retry layer's log shows the outage long before its 300 s deadline.
    server.down();
    let rank_logs = || -> String {
        (0..2)
            .map(|r| std::fs::read_to_string(run.join(format!("logs/rank-{r}.log"))).unwrap_or_default())
            .collect()
    };
    let down_since = Instant::now();
    while !rank_logs().contains("S3 request failed; retrying") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended without meeting the stopped server: {}",
            rank_logs()
        );
        assert!(
            down_since.elapsed() < Duration::from_secs(60),
            "no retry logged in 60 s without a server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stalled_at = steps_done(&run);
    server.up();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(stalled_at < 20, "the run went on without S3: it did not need it");
    assert_eq!(
        figures(&from_local),
        figures(&run),
        "same losses as the uninterrupted run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_killed_mid_download_resumes_to_the_same_losses() {
    let dir = common::tempdir("s3stream", "kill");
    let server = Server::start(&dir);
    let cache = dir.join("cache");
    // Larger shards (50 KB): a download takes long enough to be caught in the act. Without
    // block checksums (a prefix uploaded before there were any) shards stream whole.
    let (url, bytes) = dataset(&server, &dir, &cache, "ds", 2_400_000, 25_000);
    std::fs::remove_file(server.object_path("ds/.gantry-block-sums")).unwrap();
    let gb = format!("{:?}", (bytes / 4) as f64 / 1e9);
    let from_local = dir.join("run-local");
    ok(launch(
        &server,
        &cache,
        &job(&dir, "local.toml", dir.join("local").to_str().unwrap(), 30),
        &from_local,
        &[],
    )
    .output()
    .unwrap());

    let spec = job(&dir, "s3.toml", &url, 30);
    let ckpt = dir.join("ckpt");
    let ckpt_flags = [
        "--checkpoint-dir",
        ckpt.to_str().unwrap(),
        "--set",
        "checkpoint.every=2",
    ];
    let run = dir.join("run-killed");
    let mut flags = vec!["--data-cache-gb", gb.as_str()];
    flags.extend(ckpt_flags);
    let mut child = launch(&server, &cache, &spec, &run, &flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once a checkpoint is committed, the first temporary file of a shard download names its
    // rank's pid.
    let started = Instant::now();
    let committed = || std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.contains("ckpt_committed"));
    let (victim, partial) = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a download could be caught"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no download caught in 60 s"
        );
        if committed()
            && let Some(found) = partial_file(&cache)
        {
            break found;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    // SAFETY: kill(2) on the pid of a rank this test's launcher started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0, "rank pid {victim}");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the launcher reports the killed rank");

    let resumed = dir.join("run-resumed");
    let mut flags = vec!["--data-cache-gb", gb.as_str(), "--resume", "latest"];
    flags.extend(ckpt_flags);
    let said = ok(launch(&server, &cache, &spec, &resumed, &flags).output().unwrap());
    let after = figures(&resumed);
    let first = *after.keys().next().expect("the resumed run trains");
    assert!(
        first > 1 && first <= 30,
        "resumed from a checkpoint: first step {first}; {said}"
    );
    let reference: BTreeMap<_, _> = figures(&from_local).into_iter().filter(|(s, _)| *s >= first).collect();
    assert_eq!(reference, after, "same losses as the uninterrupted run");
    assert!(
        !partial.exists(),
        "the killed rank's temporary file was swept, never used"
    );
    // What is in the cache is what the dataset holds, byte for byte.
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("manifest.json").is_file())
        .unwrap();
    for e in std::fs::read_dir(&entry).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "bin") {
            let name = p.file_name().unwrap();
            assert_eq!(
                std::fs::read(&p).unwrap(),
                std::fs::read(dir.join("local").join(name)).unwrap()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shard download's temporary file in the data cache (`NAME.partial-PID-N`): its writer's
/// pid and path.
fn partial_file(cache: &Path) -> Option<(libc::pid_t, PathBuf)> {
    for entry in std::fs::read_dir(cache).ok()?.flatten() {
        for f in std::fs::read_dir(entry.path()).ok()?.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.split(".bin.partial-").nth(1)
                && let Some(pid) = rest.split('-').next().and_then(|p| p.parse().ok())
            {
                return Some((pid, f.path()));
            }
        }
    }
    None
}

/// A run checkpointed at dp 2 and resumed at dp 1 reads the same global sample stream from
/// `s3://` as the same two runs from the local copy (the cursor's guarantee, through the
/// stream): equal losses, step for step, after the resume.
#[test]
fn a_run_resumed_at_another_dp_size_reads_the_same_samples_from_s3_as_from_the_local_copy() {
    let dir = common::tempdir("s3stream", "elastic");
    let server = Server::start(&dir);
    let cache = dir.join("cache");
    let (url, _) = dataset(&server, &dir, &cache, "ds", 400_000, 25_000);
    let local = dir.join("local").to_str().unwrap().to_string();
    let mut resumed = Vec::new();
    for (tag, data) in [("local", local.as_str()), ("s3", url.as_str())] {
        let spec = job(&dir, &format!("{tag}.toml"), data, 8);
        let ckpt = dir.join(format!("ckpt-{tag}"));
        let ckpt = ckpt.to_str().unwrap();
        let first = dir.join(format!("run-{tag}-dp2"));
        let flags = [
            "--checkpoint-dir",
            ckpt,
            "--set",
            "checkpoint.every=4",
            "--set",
            "train.steps=4",
        ];
        ok(launch(&server, &cache, &spec, &first, &flags).output().unwrap());
        let second = dir.join(format!("run-{tag}-dp1"));
        let mut c = server.gantry(&cache);
        c.arg("launch")
            .arg(&spec)
            .args(["--local", "1", "--run-dir"])
            .arg(&second)
            .args(["--checkpoint-dir", ckpt, "--resume", "latest", "--set", "parallel.dp=1"]);
        let said = ok(c.output().unwrap());
        let after = figures(&second);
        assert_eq!(
            after.keys().copied().collect::<Vec<_>>(),
            (5..=8).collect::<Vec<_>>(),
            "{tag}: resumed after step 4 at dp 1; {said}"
        );
        resumed.push(after);
    }
    assert_eq!(
        resumed[0], resumed[1],
        "the same samples from s3:// as from the local copy"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
