//! Save and load through the public API, against a local directory and a real S3 server
//! (s3s-fs): three ranks (threads, each with its own store and Saver) save slices cut one way,
//! the checkpoint is loaded back cut other ways and compared byte for byte; uncommitted steps
//! do not exist for readers; retention; a second attempt over a crashed one's leftovers.

mod common;

use common::backend::{Backend, RankSave, save_ranks};
use common::model::{self, WORLD};
use common::pattern::{first_difference, slice_bytes, splitmix64};
use gantry_checkpoint::format::{
    ChunkEntry, FORMAT_VERSION, ObjectInfo, RankIndex, chunk_name, rank_index_name, xxh3_hex,
};
use gantry_checkpoint::{Checkpoint, CheckpointError, Retention, Saver, SliceSpec, Store, Which, committed_steps};
use std::collections::BTreeSet;
use std::time::Duration;

fn seed(step: u64) -> u64 {
    splitmix64(step)
}

/// A crashed attempt's contents for `step`: different from [`seed`]'s.
fn stale_seed(step: u64) -> u64 {
    splitmix64(step ^ 0x5eed_0000_0000)
}

/// Load `requests` from `ck` and compare every one with the contents `seed` gives it.
fn assert_loads(ck: &Checkpoint, requests: &[SliceSpec], seed: u64, what: &str) {
    let got = ck
        .load(requests)
        .unwrap_or_else(|e| panic!("{what}: loading step {}: {e}", ck.step()));
    assert_eq!(got.len(), requests.len());
    for (req, bytes) in requests.iter().zip(&got) {
        let want = slice_bytes(seed, req);
        if let Some(i) = first_difference(bytes, &want) {
            panic!(
                "{what}: step {} tensor {} at {:?}+{:?}: {} bytes loaded, {} expected, first difference at byte {i}",
                ck.step(),
                req.name,
                req.offsets,
                req.lengths,
                bytes.len(),
                want.len()
            );
        }
    }
}

/// Open `step`, check its manifest records what the ranks handed in, verify every byte and
/// load every tensor cut other ways.
fn check_step(store: &Store, step: u64, big: bool, seed: u64) -> Checkpoint {
    let ck = Checkpoint::open(store, Which::Step(step)).unwrap_or_else(|e| panic!("opening step {step}: {e}"));
    let m = &ck.manifest;
    assert_eq!(m.step, step);
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.world_size, WORLD);
    assert_eq!(m.job, model::job(step), "job state round-trips");
    let ranks: Vec<_> = (0..WORLD).map(|r| model::rank_state(step, r)).collect();
    assert_eq!(m.ranks, ranks, "rank states, in rank order");
    let names: Vec<String> = m.tensors().into_iter().map(|(n, _, _)| n).collect();
    let want: BTreeSet<String> = model::tensors(big).into_iter().map(|t| t.name).collect();
    assert_eq!(names.iter().cloned().collect::<BTreeSet<_>>(), want);
    let report = ck
        .verify(&mut |_| {})
        .unwrap_or_else(|e| panic!("verifying step {step}: {e}"));
    assert_eq!(report.objects, m.objects.len());
    assert_eq!(report.entries, m.entries.len());
    assert_eq!(report.bytes, m.total_bytes());
    assert_loads(&ck, &model::other_cuts(big), seed, "resharded load");
    ck
}

/// The objects stored under `step`'s prefix, relative to it.
fn objects_under(store: &Store, step: u64) -> Vec<String> {
    let dir = format!("step-{step:08}/");
    store
        .list(&dir)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.strip_prefix(&dir).unwrap_or(&k).to_string())
        .collect()
}

/// Under a committed step there is the manifest, one index per rank and exactly the chunk
/// objects the manifest lists: nothing of another attempt.
fn assert_only_committed_objects(store: &Store, ck: &Checkpoint) {
    let mut want: BTreeSet<String> = ck.manifest.objects.iter().map(|o| o.object.clone()).collect();
    want.insert("manifest.json".to_string());
    for r in 0..ck.manifest.world_size {
        want.insert(rank_index_name(r));
    }
    let found: BTreeSet<String> = objects_under(store, ck.step()).into_iter().collect();
    assert_eq!(found, want, "objects under step {}", ck.step());
}

fn expect_ok(results: Vec<Result<Vec<gantry_checkpoint::SaveReport>, CheckpointError>>, steps: &[u64]) {
    for (rank, r) in results.into_iter().enumerate() {
        let reports = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        let saved: Vec<u64> = reports.iter().map(|r| r.step).collect();
        assert_eq!(saved, steps, "rank {rank}'s reports");
        assert!(reports.iter().all(|r| r.bytes > 0), "rank {rank}: {reports:?}");
    }
}

/// (a) Three ranks save two steps (the second handed off while the first may still be in
/// flight); both load back in other layouts, byte for byte.
fn reshard_round_trip(b: &Backend) {
    let store = b.store();
    let steps = [10, 20];
    expect_ok(
        save_ranks(b, model::world_saves(true, "attemptA", &steps, seed)),
        &steps,
    );

    assert_eq!(committed_steps(&store).unwrap(), steps);
    let latest = store.get("latest").unwrap().expect("a latest pointer");
    assert_eq!(&latest[..], b"step-00000020");
    let ck = Checkpoint::open(&store, Which::Latest).unwrap();
    assert_eq!(ck.step(), 20);

    // Several chunk objects per rank, the big slice a multipart upload larger than one part.
    for r in 0..WORLD {
        let prefix = format!("rank-{r:05}/");
        let mine: Vec<&ObjectInfo> = ck
            .manifest
            .objects
            .iter()
            .filter(|o| o.object.starts_with(&prefix))
            .collect();
        assert!(mine.len() >= 3, "rank {r} wrote {} chunk objects: {mine:?}", mine.len());
        assert!(mine.iter().all(|o| o.object.contains("attemptA")), "{mine:?}");
        assert!(
            mine.iter().any(|o| o.size == 6 << 20),
            "rank {r}: no 6 MiB object: {mine:?}"
        );
    }
    for step in steps {
        let ck = check_step(&store, step, true, seed(step));
        assert_only_committed_objects(&store, &ck);
    }

    // A replicated tensor written by every rank is stored by each, loaded from one; a tensor
    // written by one rank only is stored once.
    let count = |name: &str| ck.manifest.entries.iter().filter(|e| e.slice.name == name).count();
    assert_eq!(count("pos"), WORLD);
    assert_eq!(count("ln"), 1);
    assert_eq!(count("count"), 1);
    assert_eq!(count("mask"), 2);
}

/// (b) Only ranks 0 and 2 save step 2: the committer times out naming rank 1, nothing is
/// committed, and step 2 does not exist for readers although two indexes were written.
fn uncommitted_step_is_invisible(b: &Backend) {
    let store = b.store();
    expect_ok(save_ranks(b, model::world_saves(false, "attemptA", &[1], seed)), &[1]);

    let partial: Vec<RankSave> = [0, 2]
        .into_iter()
        .map(|rank| {
            let mut config = model::config(rank, "attemptA");
            config.commit_timeout = Duration::from_secs(2);
            RankSave {
                config,
                requests: vec![model::request(false, rank, 2, seed(2))],
            }
        })
        .collect();
    let results = save_ranks(b, partial);
    match &results[0] {
        Err(e @ CheckpointError::CommitTimeout { step: 2, missing, .. }) => {
            assert_eq!(missing, &vec![1], "{e}");
            assert!(e.to_string().contains("ranks [1]"), "{e}");
        }
        other => panic!("committer: expected a commit timeout naming rank 1, got {other:?}"),
    }
    assert!(
        matches!(&results[1], Err(CheckpointError::CommitNotSeen { step: 2, .. })),
        "rank 2: {:?}",
        results[1]
    );

    let written = objects_under(&store, 2);
    for r in [0, 2] {
        assert!(written.contains(&rank_index_name(r)), "{written:?}");
    }
    assert!(!written.iter().any(|o| o == "manifest.json"), "{written:?}");

    assert_eq!(committed_steps(&store).unwrap(), vec![1]);
    match Checkpoint::open(&store, Which::Step(2)) {
        Err(e @ CheckpointError::NotCommitted { step: 2, .. }) => {
            assert!(e.to_string().contains("not committed"), "{e}")
        }
        other => panic!("opening uncommitted step 2: {other:?}"),
    }
    let latest = Checkpoint::open(&store, Which::Latest).unwrap();
    assert_eq!(latest.step(), 1);
    assert_eq!(&store.get("latest").unwrap().unwrap()[..], b"step-00000001");
    check_step(&store, 1, false, seed(1));
}

/// (b') Ranks 0 and 2 save step 1 and rank 1 never does; once both shares are written (the
/// committer waiting for rank 1, rank 2 for the commit) both saves are cancelled: each ends
/// with `Cancelled` long before the commit timeout, and step 1 is not committed.
fn cancelled_save_does_not_commit(b: &Backend) {
    let store = b.store();
    let mut savers: Vec<Saver> = [0, 2]
        .into_iter()
        .map(|rank| {
            let mut config = model::config(rank, "attemptA");
            config.commit_timeout = Duration::from_secs(600);
            let mut saver = Saver::new(b.store(), config);
            assert_eq!(saver.save(model::request(false, rank, 1, seed(1))).unwrap(), None);
            saver
        })
        .collect();
    for r in [0, 2] {
        while !objects_under(&store, 1).contains(&rank_index_name(r)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for saver in &mut savers {
        match saver.cancel() {
            Err(e @ CheckpointError::Cancelled { step: 1 }) => assert!(e.to_string().contains("cancelled"), "{e}"),
            other => panic!("expected the save of step 1 cancelled, got {other:?}"),
        }
    }
    assert!(!objects_under(&store, 1).iter().any(|o| o == "manifest.json"));
    assert_eq!(committed_steps(&store).unwrap(), Vec::<u64>::new());
}

/// A rank of a crashed attempt that wrote its chunks and index for `step`, then gave up
/// waiting for a commit that never came.
fn crashed_rank(rank: usize, attempt: &str, step: u64) -> RankSave {
    let mut config = model::config(rank, attempt);
    config.commit_timeout = Duration::from_secs(1);
    RankSave {
        config,
        requests: vec![model::request(false, rank, step, stale_seed(step))],
    }
}

/// (c) keep_last 2 and keep_every 3 over steps 1..=6 keep 3, 5 and 6; an abandoned save of
/// an older step is collected, a newer one (maybe in flight) left alone.
fn retention(b: &Backend) {
    let store = b.store();
    let abandoned = save_ranks(b, vec![crashed_rank(1, "crashed", 0), crashed_rank(2, "crashed", 9)]);
    for r in &abandoned {
        assert!(matches!(r, Err(CheckpointError::CommitNotSeen { .. })), "{r:?}");
    }
    assert!(!objects_under(&store, 0).is_empty());
    let step9 = objects_under(&store, 9);
    assert!(step9.contains(&rank_index_name(2)), "{step9:?}");

    let policy = Retention {
        keep_last: Some(2),
        keep_every: Some(3),
    };
    let steps: Vec<u64> = (1..=6).collect();
    let mut saves = model::world_saves(false, "run", &steps, seed);
    for s in &mut saves {
        s.config.retention = policy;
    }
    expect_ok(save_ranks(b, saves), &steps);

    assert_eq!(committed_steps(&store).unwrap(), vec![3, 5, 6]);
    for gone in [1, 2, 4] {
        assert_eq!(objects_under(&store, gone), Vec::<String>::new(), "step {gone}");
    }
    assert_eq!(
        objects_under(&store, 0),
        Vec::<String>::new(),
        "the abandoned save of step 0"
    );
    assert_eq!(
        objects_under(&store, 9),
        step9,
        "the newer uncommitted step 9 is left alone"
    );
    for step in [3, 5, 6] {
        check_step(&store, step, false, seed(step));
    }
    assert_eq!(Checkpoint::open(&store, Which::Latest).unwrap().step(), 6);
    assert_eq!(&store.get("latest").unwrap().unwrap()[..], b"step-00000006");
}

/// Plant what rank 0 of a crashed attempt left when it died just before creating the
/// manifest: its chunk object and its index.
fn plant_rank0_leftovers(store: &Store, attempt: &str, step: u64) {
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for s in model::save_slices(false, 0) {
        let bytes = slice_bytes(stale_seed(step), &s);
        entries.push(ChunkEntry {
            object: chunk_name(0, attempt, 0),
            offset: data.len() as u64,
            len: bytes.len() as u64,
            xxh3: xxh3_hex(&bytes),
            slice: s,
        });
        data.extend_from_slice(&bytes);
    }
    let index = RankIndex {
        format_version: FORMAT_VERSION,
        step,
        rank: 0,
        attempt: attempt.to_string(),
        entries,
        objects: vec![ObjectInfo {
            object: chunk_name(0, attempt, 0),
            size: data.len() as u64,
        }],
        state: model::rank_state(step, 0),
    };
    let dir = format!("step-{step:08}");
    store
        .put(&format!("{dir}/{}", chunk_name(0, attempt, 0)), data.into())
        .unwrap();
    store
        .put(
            &format!("{dir}/{}", rank_index_name(0)),
            serde_json::to_vec(&index).unwrap().into(),
        )
        .unwrap();
}

/// (d) Attempt A wrote every rank's chunks and index for step 5 and died before the commit;
/// attempt B saves step 5 again: it commits its own data, and A's chunks are gone.
fn second_attempt_over_leftovers(b: &Backend) {
    let store = b.store();
    let crashed = save_ranks(b, vec![crashed_rank(1, "attemptA", 5), crashed_rank(2, "attemptA", 5)]);
    for r in &crashed {
        assert!(
            matches!(r, Err(CheckpointError::CommitNotSeen { step: 5, .. })),
            "{r:?}"
        );
    }
    plant_rank0_leftovers(&store, "attemptA", 5);
    let leftovers: Vec<String> = objects_under(&store, 5)
        .into_iter()
        .filter(|o| o.contains("attemptA"))
        .collect();
    assert!(leftovers.len() >= 2 * WORLD, "{leftovers:?}");
    assert_eq!(committed_steps(&store).unwrap(), Vec::<u64>::new());

    expect_ok(save_ranks(b, model::world_saves(false, "attemptB", &[5], seed)), &[5]);
    assert_eq!(committed_steps(&store).unwrap(), vec![5]);
    let ck = check_step(&store, 5, false, seed(5));
    assert!(
        ck.manifest.objects.iter().all(|o| o.object.contains("attemptB")),
        "{:?}",
        ck.manifest.objects
    );
    assert_only_committed_objects(&store, &ck);
    for r in 0..WORLD {
        let index: RankIndex = serde_json::from_slice(
            &store
                .get(&format!("step-00000005/{}", rank_index_name(r)))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(index.attempt, "attemptB", "rank {r}'s index");
    }
}

both!(reshard_round_trip_3_ranks, super::reshard_round_trip);
both!(uncommitted_step_is_not_listed, super::uncommitted_step_is_invisible);
both!(retention_keeps_last_and_every, super::retention);
both!(cancelled_save_is_not_committed, super::cancelled_save_does_not_commit);
both!(
    second_attempt_replaces_crashed_leftovers,
    super::second_attempt_over_leftovers
);
