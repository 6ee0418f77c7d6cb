//! Crash safety with real processes: three `ckpt-test-rank` processes resume from and save to
//! one checkpoint root (a local directory, or a prefix on a real S3 server); a random rank is
//! SIGKILLed at a random moment, then the others. Run after run on the same root, so crashed
//! attempts' leftovers pile up and every run resumes from what the last one committed. After
//! every run: each listed step opens, verifies and loads exactly its step's contents; the
//! newest is at least the newest any rank saw committed; nothing retention should keep is
//! gone. A final run goes to completion and must clean up after the crashed ones.
//!
//! `GANTRY_CRASH_SEED=<n>` replays a particular sequence of kills.
//!
//! `abandoned_save_*`: a rank killed before its share of a save, and the others failing with
//! that save in flight: they exit at once instead of waiting out the commit timeout.

mod common;

use common::backend::{Backend, TempDir};
use common::pattern::{self, first_difference, slice_bytes, splitmix64};
use common::ranks::RankProcesses;
use gantry_checkpoint::format::{MANIFEST, parse_step_dir, rank_index_name, step_dir};
use gantry_checkpoint::retention::doomed;
use gantry_checkpoint::{Checkpoint, Retention, Store, Which, committed_steps};
use std::collections::{BTreeSet, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

const WORLD: usize = pattern::CRASH_WORLD;
const KEEP_LAST: usize = 2;
const KEEP_EVERY: u64 = 4;
const POLICY: Retention = Retention {
    keep_last: Some(KEEP_LAST),
    keep_every: Some(KEEP_EVERY),
};
/// Steps each run saves if nothing kills it.
const STEPS_PER_RUN: u64 = 8;
/// How long a run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// splitmix64 as a sequence: std-only and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(splitmix64(seed ^ 0xc4a5_4000))
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0) % n
    }
}

/// The ranks of save attempt `attempt`, saving `steps` steps with the test's retention;
/// `env` adds more `CKPT_*` variables.
fn start_ranks(b: &Backend, logs: &TempDir, attempt: &str, steps: u64, env: &[(&str, &Path)]) -> RankProcesses {
    RankProcesses::start(b, logs, attempt, steps, |cmd| {
        cmd.env("CKPT_KEEP_LAST", KEEP_LAST.to_string())
            .env("CKPT_KEEP_EVERY", KEEP_EVERY.to_string())
            .envs(env.iter().copied());
    })
}

/// What the test knows across runs.
#[derive(Default)]
struct History {
    /// Every step seen committed (listed, or printed by a rank).
    ever: BTreeSet<u64>,
    /// Steps whose contents were loaded and compared once.
    loaded: HashSet<u64>,
}

/// Every listed step opens, records the right job and rank state, verifies, and loads exactly
/// its contents (compared once per step; later runs only re-verify it); the steps gone were
/// retention's to delete. Returns the listed steps.
fn check_store(store: &Store, history: &mut History, context: &str) -> Vec<u64> {
    let listed = committed_steps(store).unwrap();
    let whole = pattern::crash_tensors();
    for &step in &listed {
        let ck = Checkpoint::open(store, Which::Step(step))
            .unwrap_or_else(|e| panic!("{context}: opening step {step}: {e}"));
        assert_eq!(
            ck.manifest.job,
            pattern::crash_job(step),
            "{context}: step {step}'s job state"
        );
        let ranks: Vec<_> = (0..WORLD).map(|r| pattern::crash_rank_state(step, r)).collect();
        assert_eq!(ck.manifest.ranks, ranks, "{context}: step {step}'s rank states");
        ck.verify(&mut |_| {})
            .unwrap_or_else(|e| panic!("{context}: verifying step {step}: {e}"));
        if history.loaded.insert(step) {
            let got = ck
                .load(&whole)
                .unwrap_or_else(|e| panic!("{context}: loading step {step}: {e}"));
            for (t, bytes) in whole.iter().zip(&got) {
                let want = slice_bytes(pattern::crash_seed(step), t);
                if let Some(i) = first_difference(bytes, &want) {
                    panic!(
                        "{context}: step {step} tensor {} differs from its contents at byte {i}",
                        t.name
                    );
                }
            }
        }
    }
    if let Some(latest) = store.get("latest").unwrap() {
        let step = parse_step_dir(std::str::from_utf8(&latest).unwrap());
        assert!(
            step.is_some_and(|s| listed.contains(&s)),
            "{context}: latest names {latest:?}, not one of the committed steps {listed:?}"
        );
    }
    history.ever.extend(&listed);
    for &gone in history.ever.difference(&listed.iter().copied().collect()) {
        let newer = listed.iter().filter(|&&s| s > gone).count();
        assert!(
            gone % KEEP_EVERY != 0 && newer >= KEEP_LAST,
            "{context}: committed step {gone} is gone but retention keeps it (committed now: {listed:?})"
        );
    }
    listed
}

/// When to kill: after a delay, or once rank 0 has committed some steps (plus a little).
#[derive(Debug)]
enum Moment {
    After(Duration),
    AfterCommits(usize, Duration),
}

fn crash_runs(b: &Backend, runs: usize, default_seed: u64) {
    let seed = std::env::var("GANTRY_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("GANTRY_CRASH_SEED is a number"))
        .unwrap_or(default_seed);
    println!(
        "crash test on {}: seed {seed} (GANTRY_CRASH_SEED={seed} replays it)",
        b.name()
    );
    let mut rng = Rng::new(seed);
    let logs = TempDir::new("crash-logs");
    let store = b.store();
    let mut history = History::default();
    let mut printed_max = 0;

    for run in 0..runs {
        let before = committed_steps(&store).unwrap();
        let resume_from = before.last().copied().unwrap_or(0);
        let attempt = format!("run{run:02}-{seed:x}");
        let victim = rng.below(WORLD as u64) as usize;
        let moment = if rng.below(2) == 0 {
            Moment::After(Duration::from_millis(rng.below(1000)))
        } else {
            Moment::AfterCommits(rng.below(5) as usize, Duration::from_millis(rng.below(250)))
        };
        let others_after = Duration::from_millis(rng.below(150));
        let context = format!("run {run} (seed {seed}, attempt {attempt}, kill rank {victim} {moment:?})");
        println!("{context}: resuming from step {resume_from}");

        let mut r = start_ranks(b, &logs, &attempt, STEPS_PER_RUN, &[]);
        let all_done = |seen: &[(usize, String)]| seen.iter().filter(|(_, l)| l == "done").count() == WORLD;
        match moment {
            Moment::After(d) => r.watch(d, all_done),
            Moment::AfterCommits(k, d) => {
                r.watch(RUN_LIMIT, |seen| {
                    all_done(seen)
                        || seen
                            .iter()
                            .filter(|(rank, l)| *rank == 0 && l.starts_with("committed "))
                            .count()
                            >= k
                });
                r.watch(d, all_done);
            }
        }
        r.kill(victim);
        r.watch(others_after, all_done);
        for rank in 0..WORLD {
            r.kill(rank);
        }
        let statuses = r.finish(RUN_LIMIT);
        for (rank, st) in statuses.iter().enumerate() {
            assert!(
                st.success() || st.signal() == Some(libc::SIGKILL),
                "{context}: rank {rank} exited {st:?}\n{}",
                r.describe()
            );
        }
        for (rank, line) in &r.seen {
            if let Some(s) = line.strip_prefix("resumed ") {
                assert_eq!(
                    s.parse::<u64>().ok(),
                    Some(resume_from),
                    "{context}: rank {rank} {line}"
                );
            }
        }
        let printed = r.committed_lines();
        printed_max = printed.iter().copied().chain([printed_max]).max().unwrap();
        history.ever.extend(&printed);
        let listed = check_store(&store, &mut history, &context);
        assert!(
            listed.last().copied().unwrap_or(0) >= printed_max,
            "{context}: ranks printed `committed {printed_max}` but the newest committed step is {listed:?}\n{}",
            r.describe()
        );
        println!("{context}: printed {printed:?}, committed now {listed:?}");
    }

    // A clean run to the end: it commits every step and cleans up after the crashed runs.
    let before = committed_steps(&store).unwrap();
    let from = before.last().copied().unwrap_or(0);
    let context = format!("final clean run from step {from} (seed {seed})");
    let mut r = start_ranks(b, &logs, &format!("final-{seed:x}"), 4, &[]);
    let statuses = r.finish(RUN_LIMIT);
    for (rank, st) in statuses.iter().enumerate() {
        assert!(st.success(), "{context}: rank {rank} exited {st:?}\n{}", r.describe());
        let mine = r.said(rank);
        let want: Vec<String> = std::iter::once(format!("resumed {from}"))
            .chain((from + 1..=from + 4).map(|s| format!("committed {s}")))
            .chain(["done".to_string()])
            .collect();
        assert_eq!(mine, want, "{context}: rank {rank}");
    }
    history.ever.extend(from + 1..=from + 4);
    let listed = check_store(&store, &mut history, &context);
    println!(
        "{context}: committed steps {listed:?}, ever committed {:?}",
        history.ever
    );

    // Exactly what retention keeps: the newest KEEP_LAST and every KEEP_EVERY-th step.
    assert!(listed.ends_with(&[from + 3, from + 4]), "{context}: {listed:?}");
    assert!(
        doomed(&listed, &[], POLICY).committed.is_empty(),
        "{context}: retention left {listed:?}"
    );
    for s in &history.ever {
        if s % KEEP_EVERY == 0 {
            assert!(
                listed.contains(s),
                "{context}: step {s} was committed and is a keeper, but is gone"
            );
        }
    }
    // Abandoned saves older than the newest commit are collected.
    for d in store.list_dirs("").unwrap() {
        let Some(s) = parse_step_dir(&d) else { continue };
        if !listed.contains(&s) {
            assert!(
                store.list(&format!("{d}/")).unwrap().is_empty(),
                "{context}: uncommitted or deleted {d} still holds {:?}",
                store.list(&format!("{d}/")).unwrap()
            );
        }
    }
    // The steps the clean run committed hold nothing of crashed attempts.
    for s in from + 1..=from + 4 {
        if !listed.contains(&s) {
            continue;
        }
        let ck = Checkpoint::open(&store, Which::Step(s)).unwrap();
        let dir = format!("{}/", step_dir(s));
        let mut want: BTreeSet<String> = ck
            .manifest
            .objects
            .iter()
            .map(|o| format!("{dir}{}", o.object))
            .collect();
        want.insert(format!("{dir}{MANIFEST}"));
        want.extend((0..WORLD).map(|r| format!("{dir}{}", rank_index_name(r))));
        let found: BTreeSet<String> = store.list(&dir).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(found, want, "{context}: objects under {dir}");
        assert!(
            ck.manifest.objects.iter().all(|o| o.object.contains("final-")),
            "{context}: step {s}"
        );
    }
}

#[test]
fn crash_local() {
    crash_runs(&Backend::local("crash"), 12, 0x5eed_0001);
}

#[test]
fn crash_s3() {
    crash_runs(&Backend::s3(), 6, 0x5eed_0002);
}

/// Rank 2 is killed before it writes anything of step 1; ranks 0 and 1 hand off step 1's save,
/// write their shares and wait (rank 0 for rank 2's index, rank 1 for the commit), then fail
/// and drop their `Saver`s. Both must exit well within the commit timeout (120 s in
/// `ckpt-test-rank`; `finish` allows `RUN_LIMIT`), and step 1 must not be committed.
fn abandoned_save(b: &Backend) {
    let logs = TempDir::new("abandon-logs");
    let (go, abandon) = (logs.0.join("go"), logs.0.join("abandon"));
    let mut r = start_ranks(
        b,
        &logs,
        "abandon",
        1,
        &[("CKPT_GO_FILE", &go), ("CKPT_ABANDON_FILE", &abandon)],
    );
    let count = |seen: &[(usize, String)], line: &str| seen.iter().filter(|(_, l)| l == line).count();
    r.watch(RUN_LIMIT, |seen| count(seen, "waiting") == WORLD);
    assert_eq!(count(&r.seen, "waiting"), WORLD, "{}", r.describe());
    r.kill(2);
    assert!(r.wait(2).signal() == Some(libc::SIGKILL));
    std::fs::write(&go, b"").unwrap();
    // Abandon only once both shares are written, so the waits for the missing rank are what
    // the cancel has to end.
    let store = b.store();
    let until = Instant::now() + RUN_LIMIT;
    for rank in 0..2 {
        let index = format!("{}/{}", step_dir(1), rank_index_name(rank));
        while store.size(&index).unwrap().is_none() {
            assert!(
                Instant::now() < until,
                "rank {rank} never wrote {index}\n{}",
                r.describe()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::fs::write(&abandon, b"").unwrap();
    let statuses = r.finish(RUN_LIMIT);
    for (rank, st) in statuses.iter().enumerate().take(2) {
        assert_eq!(st.code(), Some(4), "rank {rank} exited {st:?}\n{}", r.describe());
        assert!(
            r.seen.contains(&(rank, "abandoned 1".to_string())),
            "rank {rank}\n{}",
            r.describe()
        );
    }
    assert_eq!(store.size(&format!("{}/{MANIFEST}", step_dir(1))).unwrap(), None);
    assert_eq!(committed_steps(&store).unwrap(), Vec::<u64>::new());
}

#[test]
fn abandoned_save_local() {
    abandoned_save(&Backend::local("abandon"));
}

#[test]
fn abandoned_save_s3() {
    abandoned_save(&Backend::s3());
}
