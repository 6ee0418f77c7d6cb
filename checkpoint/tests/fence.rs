//! Fenced commits, against a local directory and a real S3 server:
//!
//! - with real processes (`ckpt-test-rank`): the ranks of attempt 1 of a job resume, then
//!   wait while attempt 2 claims the directory and commits the steps after it; when attempt 1
//!   goes on to save, its rank 0 is refused the commit naming both attempts, and every step on
//!   storage is attempt 2's and loads exactly;
//! - in process: a newer attempt replaces the commit an older attempt of the job slipped in
//!   before the claim (its other ranks wait for that rather than fail), an older attempt can
//!   neither start saving nor commit afterwards, and other jobs' claims do not matter.

mod common;

use common::backend::{Backend, RankSave, TempDir, save_ranks};
use common::pattern::{self, crash_job, crash_rank_slices, crash_rank_state, crash_seed, slice_bytes};
use common::ranks::RankProcesses;
use gantry_checkpoint::{
    Checkpoint, CheckpointError, Fence, SaveRequest, SaverConfig, TensorData, Which, committed_steps, fence,
};
use std::time::Duration;

const WORLD: usize = pattern::CRASH_WORLD;
const LIMIT: Duration = Duration::from_secs(120);

/// The ranks of save attempt `attempt` fenced as `fence` (`JOB/ATTEMPT`), saving `steps`
/// steps; with `go`, each prints `waiting` after resuming and waits until `logs/GO` exists.
fn start_ranks(b: &Backend, logs: &TempDir, attempt: &str, fence: &str, steps: u64, go: Option<&str>) -> RankProcesses {
    RankProcesses::start(b, logs, attempt, steps, |cmd| {
        cmd.env("CKPT_FENCE", fence);
        if let Some(go) = go {
            cmd.env("CKPT_GO_FILE", logs.0.join(go));
        }
    })
}

/// Each rank's exit code, once all have ended.
fn exit_codes(ranks: &mut RankProcesses) -> Vec<Option<i32>> {
    ranks.finish(LIMIT).iter().map(|s| s.code()).collect()
}

/// Every listed step opens, names the expected save attempt and fence, and loads exactly
/// its step's contents.
fn check_steps(b: &Backend, want: &[(u64, &str, u32)]) {
    let store = b.store();
    let steps: Vec<u64> = want.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(committed_steps(&store).unwrap(), steps);
    for (step, attempt, fenced) in want {
        let ck = Checkpoint::open(&store, Which::Step(*step)).unwrap();
        assert_eq!(ck.manifest.attempt, *attempt, "step {step}");
        assert_eq!(
            ck.manifest.fence,
            Some(Fence::new("j", *fenced).unwrap()),
            "step {step}"
        );
        for rank in 0..WORLD {
            let mine = crash_rank_slices(rank);
            let got = ck.load(&mine).unwrap();
            for (s, bytes) in mine.iter().zip(&got) {
                assert!(*bytes == slice_bytes(crash_seed(*step), s), "step {step} {}", s.name);
            }
        }
    }
}

fn a_replaced_attempt_cannot_commit_over_the_new_one(b: &Backend) {
    let logs = TempDir::new("fence-logs");
    let mut first = start_ranks(b, &logs, "a1", "j/1", 2, None);
    assert_eq!(exit_codes(&mut first), vec![Some(0); WORLD], "{}", first.describe());

    // Attempt 1's ranks again (a partition's survivors): resumed, about to save step 3.
    let mut stale = start_ranks(b, &logs, "s1", "j/1", 1, Some("go"));
    stale.wait_all("resumed 2", LIMIT);
    stale.wait_all("waiting", LIMIT);
    // Attempt 2 claims the directory and commits steps 3 and 4.
    let mut second = start_ranks(b, &logs, "b2", "j/2", 2, None);
    assert_eq!(exit_codes(&mut second), vec![Some(0); WORLD], "{}", second.describe());

    std::fs::write(logs.0.join("go"), b"").unwrap();
    let codes = exit_codes(&mut stale);
    assert_eq!(
        codes,
        vec![Some(3); WORLD],
        "every stale rank fails: {}",
        stale.describe()
    );
    let refusal = stale.said(0).join("\n");
    assert!(
        refusal.contains("step 3 not committed: attempt 1 of job j is fenced off")
            && refusal.contains("attempt 2 of the job has claimed it"),
        "{refusal}"
    );
    for rank in 1..WORLD {
        let said = stale.said(rank).join("\n");
        assert!(said.contains("step 3 is already committed"), "rank {rank}: {said}");
    }
    check_steps(b, &[(1, "a1", 1), (2, "a1", 1), (3, "b2", 2), (4, "b2", 2)]);
}

both!(
    replaced_attempt_cannot_commit,
    crate::a_replaced_attempt_cannot_commit_over_the_new_one
);

/// Every rank's save of `step`, as save attempt `id` of `fence` (commit wait `timeout`).
fn saves(id: &str, fence: Option<&Fence>, step: u64, timeout: Duration) -> Vec<RankSave> {
    (0..WORLD)
        .map(|rank| {
            let mut config = SaverConfig::new(rank, WORLD, id);
            config.fence = fence.cloned();
            config.chunk_bytes = pattern::CRASH_CHUNK_BYTES;
            config.poll = Duration::from_millis(10);
            config.commit_timeout = timeout;
            let seed = crash_seed(step);
            let request = SaveRequest {
                step,
                tensors: crash_rank_slices(rank)
                    .into_iter()
                    .map(|s| TensorData {
                        bytes: slice_bytes(seed, &s).into(),
                        slice: s,
                    })
                    .collect(),
                rank_state: crash_rank_state(step, rank),
                job: crash_job(step),
            };
            RankSave {
                config,
                requests: vec![request],
            }
        })
        .collect()
}

fn a_newer_attempt_replaces_a_stale_commit_and_fences_the_old_one(b: &Backend) {
    let store = b.store();
    let (old, new) = (Fence::new("j", 1).unwrap(), Fence::new("j", 2).unwrap());
    let long = Duration::from_secs(60);
    fence::claim(&store, &old).unwrap();
    for r in save_ranks(b, saves("o", Some(&old), 1, long)) {
        r.unwrap();
    }
    // Attempt 2 claims, then commits step 1 too (the old commit landed after it chose where
    // to resume): the stale commit is replaced, and nobody fails over it.
    fence::claim(&store, &new).unwrap();
    for r in save_ranks(b, saves("n", Some(&new), 1, long)) {
        r.unwrap();
    }
    check_steps(b, &[(1, "n", 2)]);
    // Attempt 1 can no longer start saving, nor commit (its other ranks time out waiting).
    let e = fence::claim(&store, &old).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Fenced { attempt: 1, newer: 2, action, .. } if action == "cannot start saving"),
        "{e}"
    );
    let results = save_ranks(b, saves("o2", Some(&old), 2, Duration::from_secs(2)));
    assert!(
        matches!(
            &results[0],
            Err(CheckpointError::Fenced {
                attempt: 1,
                newer: 2,
                ..
            })
        ),
        "{:?}",
        results[0]
    );
    for r in &results[1..] {
        assert!(
            matches!(r, Err(CheckpointError::CommitNotSeen { step: 2, .. })),
            "{r:?}"
        );
    }
    check_steps(b, &[(1, "n", 2)]);
    // Claims of another job are not compared; an unfenced save cannot replace anything.
    fence::claim(&store, &Fence::new("k", 1).unwrap()).unwrap();
    let results = save_ranks(b, saves("u", None, 1, Duration::from_secs(2)));
    assert!(
        matches!(&results[0], Err(CheckpointError::AlreadyCommitted { step: 1, .. })),
        "{:?}",
        results[0]
    );
    check_steps(b, &[(1, "n", 2)]);
}

both!(
    stale_commit_replaced,
    crate::a_newer_attempt_replaces_a_stale_commit_and_fences_the_old_one
);
