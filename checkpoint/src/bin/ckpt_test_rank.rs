//! Rank program for the crash-safety tests in `checkpoint/tests/crash.rs` (not a user tool).
//!
//! Like a restarted training job, it resumes from the newest committed checkpoint under
//! `CKPT_URL` (loading its own slices back and checking them, then printing `resumed STEP`,
//! 0 when there is none) and saves the next `CKPT_STEPS` steps, each with contents that
//! depend only on (step, tensor, element) (see `tests/common/pattern.rs`), waiting for every
//! commit and printing `committed STEP` once it is committed (rank 0: written; the others:
//! seen). `done` at the end.
//!
//! Environment: `RANK`, `WORLD_SIZE` (must be 3, the test model's), `CKPT_URL`,
//! `CKPT_ATTEMPT` (the same on every rank of a run), `CKPT_STEPS`, optional `CKPT_KEEP_LAST`
//! and `CKPT_KEEP_EVERY` (retention), `CKPT_FENCE=JOB/ATTEMPT` (a fenced save: rank 0 claims
//! the root before resuming; tests/fence.rs) and `CKPT_GO_FILE` (after resuming, print
//! `waiting` and wait until that file exists before saving) and `CKPT_ABANDON_FILE` (a rank
//! whose training fails mid-save: after handing off its first save it prints `saving STEP`,
//! waits until that file exists, then drops its `Saver` without waiting for the commit, prints
//! `abandoned STEP` and exits with status 4; tests/crash.rs). For `s3://` roots the store
//! reads the standard `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_REGION`.
//!
//! A failure prints `ERROR <message>` and exits with status 3.

#[path = "../../tests/common/pattern.rs"]
mod pattern;

use gantry_checkpoint::{
    Checkpoint, CheckpointError, Fence, Retention, S3Options, SaveRequest, Saver, SaverConfig, Store, StoreConfig,
    TensorData, Which, fence,
};
use std::io::Write;
use std::time::Duration;

fn fail(message: impl std::fmt::Display) -> ! {
    println!("ERROR {message}");
    let _ = std::io::stdout().flush();
    std::process::exit(3)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(format!("{name} is not set")))
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| fail(format!("{name}={v:?} is not a number")))
    })
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Load this rank's slices of the newest committed step and check them; the step, 0 if none.
fn resume(store: &Store, rank: usize) -> u64 {
    let ck = match Checkpoint::open(store, Which::Latest) {
        Ok(ck) => ck,
        Err(CheckpointError::NoCheckpoint { .. }) => return 0,
        Err(e) => fail(format!("resume: {e}")),
    };
    let step = ck.step();
    let mine = pattern::crash_rank_slices(rank);
    let got = ck
        .load(&mine)
        .unwrap_or_else(|e| fail(format!("resume from step {step}: {e}")));
    for (s, bytes) in mine.iter().zip(&got) {
        if *bytes != pattern::slice_bytes(pattern::crash_seed(step), s) {
            fail(format!(
                "resume from step {step}: tensor {} loaded wrong contents",
                s.name
            ));
        }
    }
    if ck.manifest.ranks.get(rank) != Some(&pattern::crash_rank_state(step, rank)) {
        fail(format!(
            "resume from step {step}: wrong rank state {:?}",
            ck.manifest.ranks.get(rank)
        ));
    }
    step
}

fn main() {
    let rank: usize = env_num("RANK").unwrap_or_else(|| fail("RANK is not set"));
    let world: usize = env_num("WORLD_SIZE").unwrap_or_else(|| fail("WORLD_SIZE is not set"));
    if world != pattern::CRASH_WORLD || rank >= world {
        fail(format!(
            "rank {rank} of {world}: the test model has {} ranks",
            pattern::CRASH_WORLD
        ));
    }
    let url = env("CKPT_URL");
    let attempt = env("CKPT_ATTEMPT");
    let steps: u64 = env_num("CKPT_STEPS").unwrap_or_else(|| fail("CKPT_STEPS is not set"));
    // Small parts, so the chunk objects (2 MiB) go up as multipart uploads a kill can cut.
    let config = StoreConfig {
        multipart_threshold: 1 << 20,
        part_size: 5 << 20,
        concurrency: 4,
        ..StoreConfig::default()
    };
    let store = Store::open_with(&url, &S3Options::with_environment(std::env::vars_os()), config)
        .unwrap_or_else(|e| fail(format!("opening {url}: {e}")));
    let fence = std::env::var("CKPT_FENCE").ok().map(|v| {
        let (job, attempt) = v
            .split_once('/')
            .unwrap_or_else(|| fail(format!("CKPT_FENCE={v:?} is not JOB/ATTEMPT")));
        let attempt = attempt
            .parse()
            .unwrap_or_else(|_| fail(format!("CKPT_FENCE={v:?}: the attempt is not a number")));
        Fence::new(job, attempt).unwrap_or_else(|e| fail(e))
    });
    if let Some(f) = &fence
        && rank == 0
    {
        fence::claim(&store, f).unwrap_or_else(|e| fail(e));
    }

    let resumed = resume(&store, rank);
    say(format!("resumed {resumed}"));
    if let Ok(go) = std::env::var("CKPT_GO_FILE") {
        say("waiting".to_string());
        while !std::path::Path::new(&go).exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    let mut saver_config = SaverConfig::new(rank, world, &attempt);
    saver_config.fence = fence;
    saver_config.chunk_bytes = pattern::CRASH_CHUNK_BYTES;
    saver_config.poll = Duration::from_millis(10);
    saver_config.commit_timeout = Duration::from_secs(120);
    saver_config.retention = Retention {
        keep_last: env_num("CKPT_KEEP_LAST"),
        keep_every: env_num("CKPT_KEEP_EVERY"),
    };
    let mut saver = Saver::new(store, saver_config);
    let slices = pattern::crash_rank_slices(rank);
    for step in resumed + 1..=resumed + steps {
        let seed = pattern::crash_seed(step);
        let req = SaveRequest {
            step,
            tensors: slices
                .iter()
                .map(|s| TensorData {
                    slice: s.clone(),
                    bytes: pattern::slice_bytes(seed, s).into(),
                })
                .collect(),
            rank_state: pattern::crash_rank_state(step, rank),
            job: pattern::crash_job(step),
        };
        if let Err(e) = saver.save(req) {
            fail(format!("save of step {step}: {e}"));
        }
        if let Ok(abandon) = std::env::var("CKPT_ABANDON_FILE") {
            say(format!("saving {step}"));
            while !std::path::Path::new(&abandon).exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
            // What a failing training loop does: its Saver goes out of scope mid-save.
            drop(saver);
            say(format!("abandoned {step}"));
            std::process::exit(4);
        }
        match saver.wait() {
            Ok(Some(report)) if report.step == step => say(format!("committed {step}")),
            Ok(other) => fail(format!("save of step {step}: reported {other:?}")),
            Err(e) => fail(format!("save of step {step}: {e}")),
        }
    }
    say("done".to_string());
}
