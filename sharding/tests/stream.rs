//! Streaming a dataset from a real S3 server (s3s-fs) while it is read: reads equal the
//! local copy's, in the sampler's order, from a cache that never holds more than its budget
//! (shards evicted behind the reader); compressed-only shards decompressed on arrival; a read
//! of a shard that is not there waits for it, and when the server is gone the error names
//! the shard's object; a partial file is never mapped; the `.idx` files come from the
//! upload's index pack, each checked against the manifest (a damaged pack falls back on the
//! file's own object, a prefix without a pack is read file by file).

#[path = "../../checkpoint/tests/common/s3_server.rs"]
mod s3_server;

use gantry_checkpoint::location::{Role, StorageLocation};
use gantry_checkpoint::{S3Options, Store, StoreConfig};
use gantry_sharding::frames::ZstdOptions;
use gantry_sharding::gpt::{DatasetError, GptDataset, OpenOptions, Split};
use gantry_sharding::remote::{
    INDEX_PACK, RemoteError, RemoteOptions, Retry, StreamConfig, Streamer, prepare_stream, upload,
};
use gantry_sharding::sampler::Sampler;
use gantry_sharding::synth::{SynthConfig, synthesize_with};
use s3_server::S3Server;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const SEQ: usize = 31;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-stream-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn options(server: &S3Server) -> RemoteOptions {
    RemoteOptions {
        range_bytes: 16 << 10,
        retry: Retry {
            deadline: Duration::from_secs(3),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        },
        ..RemoteOptions::with_s3(S3Options {
            endpoint: Some(server.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key: Some(server.access_key.clone()),
            secret_key: Some(server.secret_key.clone()),
            ..S3Options::default()
        })
    }
}

/// About 100 shards of 2500 tokens (5 KB each), with zstd frames when asked.
fn synth(dir: &Path, zstd: bool) -> PathBuf {
    let out = dir.join("ds");
    let cfg = SynthConfig {
        tokens: 240_000,
        seed: 3,
        shard_tokens: 2500,
        doc_tokens: 300,
        ..SynthConfig::default()
    };
    let z = ZstdOptions {
        level: 1,
        frame_bytes: 1 << 10,
    };
    synthesize_with(&out, &cfg, zstd.then_some(&z)).unwrap();
    out
}

fn sum_of_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Every sample of `steps` steps of rank `rank` of `dp`, through `ds`, in step order, each
/// step announced to the dataset first (as the prefetch thread does).
fn read_steps(ds: &GptDataset, sampler: &Sampler, rank: usize, dp: usize, steps: u64, each: impl Fn(u64)) -> Vec<i64> {
    let mut cursor = sampler.start(ds.data().fingerprint());
    let mut out = Vec::new();
    for step in 0..steps {
        ds.data().reading(step);
        out.extend(ds.micro_batch(sampler, &cursor, rank, dp, 1, 0).unwrap().tokens);
        each(step);
        cursor.advance(1).unwrap();
    }
    out
}

#[test]
fn a_stream_within_a_quarter_budget_reads_what_the_local_copy_holds() {
    let server = S3Server::start();
    let dir = tempdir("budget");
    let local = synth(&dir, false);
    let opts = options(&server);
    let loc = StorageLocation::parse_as(&format!("s3://{}/ds", server.bucket), Role::Dataset).unwrap();
    upload(&local, &loc, &opts).unwrap();

    let cache = dir.join("cache");
    let prepared = prepare_stream(&loc, &cache, &opts).unwrap();
    let shards = prepared.shards();
    assert!(shards >= 90, "{shards}");
    assert_eq!(
        prepared.fetched.len(),
        shards,
        "the .idx files first: {:?}",
        prepared.fetched
    );
    let cached = prepared.dir.clone();
    assert!(
        !cached.join("shard-00000.bin").exists(),
        "no shard before the reader asks"
    );
    let budget = prepared.total_bytes() / 4;
    let cfg = StreamConfig {
        budget: Some(budget),
        fetchers: 2,
        ..StreamConfig::default()
    };
    let streamer = Streamer::start(prepared, opts.clone(), cfg).unwrap();
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = Arc::new(GptDataset::open_with(&cached, SEQ, Split::All, &open).unwrap());
    let here = GptDataset::open_with(&local, SEQ, Split::All, &OpenOptions::default()).unwrap();
    let sampler = Sampler::new(ds.num_samples(), 9, 4).unwrap();
    // Rank 1 of 2, 2 samples a step, over more shards than the budget holds several times.
    let steps = 300;
    let start = sampler.start(ds.data().fingerprint());
    let (weak, s2) = (Arc::downgrade(&ds), sampler.clone());
    streamer.follow(
        0,
        Box::new(move |step| {
            let mut c = start.clone();
            c.advance(step).unwrap();
            Ok(weak.upgrade().unwrap().step_shards(&s2, &c, 1, 2, 1).unwrap())
        }),
    );
    let peak = std::cell::Cell::new(0);
    let got = read_steps(&ds, &sampler, 1, 2, steps, |_| {
        let used = sum_of_files(&cached);
        peak.set(peak.get().max(used));
        assert!(
            used <= budget,
            "the cache holds {used} bytes, over its budget of {budget}"
        );
    });
    assert_eq!(got, read_steps(&here, &sampler, 1, 2, steps, |_| {}));
    let stats = streamer.stats();
    assert!(stats.evicted > 0, "a pass over 4× the budget evicts: {stats:?}");
    assert!(
        stats.peak_usage <= budget && stats.peak_usage >= peak.get(),
        "the stream's own accounting ({}) is what the directory held at most ({}) and within the budget ({budget})",
        stats.peak_usage,
        peak.get()
    );
    assert!(stats.fetched >= 12, "{stats:?}");
    drop(ds);
    drop(streamer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compressed_only_shards_are_decompressed_on_arrival() {
    let server = S3Server::start();
    let dir = tempdir("zstd");
    let full = synth(&dir, true);
    let here = GptDataset::open_with(&full, SEQ, Split::All, &OpenOptions::default()).unwrap();
    let sampler = Sampler::new(here.num_samples(), 5, 8).unwrap();
    let expected = read_steps(&here, &sampler, 0, 1, 6, |_| {});
    for e in std::fs::read_dir(&full).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "bin") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let opts = options(&server);
    let loc = StorageLocation::parse_as(&format!("s3://{}/z", server.bucket), Role::Dataset).unwrap();
    upload(&full, &loc, &opts).unwrap();
    let prepared = prepare_stream(&loc, &dir.join("cache"), &opts).unwrap();
    let cached = prepared.dir.clone();
    let streamer = Streamer::start(prepared, opts, StreamConfig::default()).unwrap();
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = GptDataset::open_with(&cached, SEQ, Split::All, &open).unwrap();
    assert_eq!(read_steps(&ds, &sampler, 0, 1, 6, |_| {}), expected);
    let names: Vec<String> = std::fs::read_dir(&cached)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".bin")), "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with(".zst") && !n.ends_with(".zidx") && !n.contains(".partial-")),
        "only the decompressed .bin stays: {names:?}"
    );
    drop(ds);
    drop(streamer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_waits_for_its_shard_and_a_server_gone_for_good_is_named() {
    let server = S3Server::start();
    let dir = tempdir("wait");
    let local = synth(&dir, false);
    let opts = options(&server);
    let loc = StorageLocation::parse_as(&format!("s3://{}/ds", server.bucket), Role::Dataset).unwrap();
    upload(&local, &loc, &opts).unwrap();
    let prepared = prepare_stream(&loc, &dir.join("cache"), &opts).unwrap();
    let cached = prepared.dir.clone();
    let cfg = StreamConfig {
        wait: Duration::from_secs(30),
        ..StreamConfig::default()
    };
    // Not following any reader: only what a read asks for is fetched, when it asks.
    let streamer = Streamer::start(prepared, opts, cfg).unwrap();
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = GptDataset::open_with(&cached, SEQ, Split::All, &open).unwrap();
    let here = GptDataset::open_with(&local, SEQ, Split::All, &OpenOptions::default()).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    ds.sample_into(0, &mut a).unwrap();
    here.sample_into(0, &mut b).unwrap();
    assert_eq!(a, b, "the read waited for its shard, then read it");
    assert!(cached.join("shard-00000.bin").exists());
    let last_shard = format!("shard-{:05}.bin", ds.data().manifest().shards.len() - 1);
    assert!(!cached.join(&last_shard).exists(), "nothing it did not ask for");

    drop(server);
    let last = ds.num_samples() - 1;
    let e = ds.sample_into(last, &mut a).unwrap_err();
    let DatasetError::Remote(remote) = &e else {
        panic!("expected the stream's error, got {e}");
    };
    assert!(
        matches!(**remote, RemoteError::GaveUp { .. }) && e.to_string().starts_with(&format!("{loc}/{last_shard}")),
        "the error names the shard's object: {e}"
    );
    assert!(
        !cached.join(&last_shard).exists(),
        "never a partial file under the shard's name"
    );
    drop(ds);
    drop(streamer);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every `.idx` of `dir`'s dataset, in manifest order, and their names.
fn local_indexes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let manifest = gantry_sharding::manifest::Manifest::read_with_fingerprint(dir)
        .unwrap()
        .0;
    manifest
        .shards
        .iter()
        .map(|s| {
            let name = format!("{}.idx", s.prefix);
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

#[test]
fn the_idx_files_come_from_the_index_pack_and_every_one_is_checked() {
    let server = S3Server::start();
    let dir = tempdir("pack");
    let local = synth(&dir, false);
    let opts = options(&server);
    let loc = StorageLocation::parse_as(&format!("s3://{}/ds", server.bucket), Role::Dataset).unwrap();
    upload(&local, &loc, &opts).unwrap();
    let indexes = local_indexes(&local);
    assert!(indexes.len() > 50, "many small shards: {}", indexes.len());
    let store = Store::open_location(&loc, &opts.s3, StoreConfig::default()).unwrap();
    let pack = store.get(INDEX_PACK).unwrap().expect("the upload wrote the index pack");
    assert_eq!(
        pack.to_vec(),
        indexes.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<u8>>(),
        "the pack is every .idx back to back, in manifest order"
    );
    let prepare_into = |tag: &str| {
        prepare_stream(&loc, &dir.join(tag), &opts).map(|p| {
            for (name, bytes) in &indexes {
                assert_eq!(&std::fs::read(p.dir.join(name)).unwrap(), bytes, "{name}");
            }
            p.fetched.len()
        })
    };
    // Shard 0's own .idx object damaged (same size): read from the pack, it is not needed.
    let (first, good) = &indexes[0];
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0xff;
    store.put(first, bad.clone().into()).unwrap();
    assert_eq!(prepare_into("from-pack").unwrap(), indexes.len(), "every .idx fetched");
    // The pack damaged at shard 0 too: its bytes are checked, it falls back on the object,
    // which is checked as well, and the error names that object.
    let mut bad_pack = pack.to_vec();
    bad_pack[0] ^= 0xff;
    store.put(INDEX_PACK, bad_pack.into()).unwrap();
    let e = prepare_into("both-bad").unwrap_err();
    assert!(
        matches!(e, RemoteError::Checksum { .. }) && e.to_string().starts_with(&format!("{loc}/{first}:")),
        "{e}"
    );
    // The object put right: the damaged pack costs one GET more, nothing else.
    store.put(first, good.clone().into()).unwrap();
    assert_eq!(prepare_into("bad-pack").unwrap(), indexes.len());
    // No pack at all (a prefix uploaded before there were packs): one GET per .idx.
    store.delete(INDEX_PACK).unwrap();
    assert_eq!(prepare_into("no-pack").unwrap(), indexes.len());
    // A second prepare finds them all in place and fetches nothing.
    assert_eq!(prepare_into("no-pack").unwrap(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stream the first `steps` steps (`None`: a full pass) of rank 0 of 1 (`batch` samples a
/// step) of the dataset at `loc` into `cache` within `budget`, checking every step against
/// `here` and the directory against the budget after each; the budget and the stream's stats.
fn budgeted_pass(
    loc: &StorageLocation,
    opts: &RemoteOptions,
    cache: &Path,
    budget: impl Fn(&gantry_sharding::remote::StreamDir) -> u64,
    here: &GptDataset,
    batch: usize,
    steps: Option<u64>,
) -> (u64, gantry_sharding::remote::StreamStats) {
    let prepared = prepare_stream(loc, cache, opts).unwrap();
    let cached = prepared.dir.clone();
    let budget = budget(&prepared);
    let cfg = StreamConfig {
        budget: Some(budget),
        fetchers: 8,
        // A stall shows as CacheFull after this, rather than a minute's wait.
        room_wait: Duration::from_secs(10),
        ..StreamConfig::default()
    };
    let streamer = Streamer::start(prepared, opts.clone(), cfg).unwrap();
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = Arc::new(GptDataset::open_with(&cached, SEQ, Split::All, &open).unwrap());
    let sampler = Sampler::new(ds.num_samples(), 1, batch).unwrap();
    let start = sampler.start(ds.data().fingerprint());
    let (weak, s2) = (Arc::downgrade(&ds), sampler.clone());
    streamer.follow(
        0,
        Box::new(move |step| {
            let Some(ds) = weak.upgrade() else {
                return Ok(Vec::new());
            };
            let mut c = start.clone();
            c.advance(step).map_err(|e| e.to_string())?;
            ds.step_shards(&s2, &c, 0, 1, 1).map_err(|e| e.to_string())
        }),
    );
    let steps = steps.unwrap_or(ds.num_samples() / batch as u64);
    let got = read_steps(&ds, &sampler, 0, 1, steps, |_| {
        let used = sum_of_files(&cached);
        assert!(
            used <= budget,
            "the cache holds {used} bytes, over its budget of {budget}"
        );
    });
    assert_eq!(got, read_steps(here, &sampler, 0, 1, steps, |_| {}));
    let stats = streamer.stats();
    drop(ds);
    drop(streamer);
    (budget, stats)
}

#[test]
fn a_budget_of_the_datasets_footprint_streams_a_full_pass_without_stalling() {
    let server = S3Server::start();
    let dir = tempdir("footprint");
    let local = synth(&dir, false);
    let opts = options(&server);
    let loc = StorageLocation::parse_as(&format!("s3://{}/ds", server.bucket), Role::Dataset).unwrap();
    upload(&local, &loc, &opts).unwrap();
    let here = GptDataset::open_with(&local, SEQ, Split::All, &OpenOptions::default()).unwrap();
    // Exactly the footprint: every shard fits at once, so nothing is evicted and every shard
    // is fetched once.
    let (budget, stats) = budgeted_pass(&loc, &opts, &dir.join("exact"), |p| p.footprint(), &here, 16, None);
    assert_eq!(
        (stats.fetched, stats.evicted),
        (here.data().manifest().shards.len() as u64, 0),
        "{stats:?}"
    );
    assert!(stats.peak_usage <= budget, "{stats:?}");
    // The bytes of the files alone (the stamps not counted, as the bench's --budget-frac 1.0
    // did): the stream evicts behind the reader instead of waiting for room.
    let (budget, stats) = budgeted_pass(&loc, &opts, &dir.join("bytes"), |p| p.total_bytes(), &here, 16, None);
    assert!(stats.peak_usage <= budget, "{stats:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_budget_below_one_steps_need_fails_at_once_naming_the_smallest_that_works() {
    let server = S3Server::start();
    let dir = tempdir("below");
    let local = synth(&dir, false);
    let opts = options(&server);
    let loc = StorageLocation::parse_as(&format!("s3://{}/ds", server.bucket), Role::Dataset).unwrap();
    upload(&local, &loc, &opts).unwrap();
    let here = GptDataset::open_with(&local, SEQ, Split::All, &OpenOptions::default()).unwrap();
    let cache = dir.join("cache");
    // Step 0 of a 16-sample batch reads many shards; a budget of the fixed files and two
    // shards holds one but not that step.
    let prepared = prepare_stream(&loc, &cache, &opts).unwrap();
    let cached = prepared.dir.clone();
    let largest = (0..prepared.shards()).map(|s| prepared.cost(s)).max().unwrap();
    let budget = prepared.fixed_bytes + 2 * largest;
    // Far below: refused when the stream starts, naming the least any step needs.
    let e = Streamer::start(
        prepared.clone(),
        opts.clone(),
        StreamConfig {
            budget: Some(budget - 1),
            ..StreamConfig::default()
        },
    )
    .err()
    .expect("a budget below one shard and its reserve is refused");
    assert!(
        matches!(e, RemoteError::BudgetTooSmall { min_budget, .. } if min_budget == budget),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("smallest budget that can work is {budget} bytes")),
        "{e}"
    );
    // Below step 0's need: the read fails as soon as the step is planned (a minute's wait for
    // room would show as CacheFull), naming the budget that holds it.
    let cfg = StreamConfig {
        budget: Some(budget),
        room_wait: Duration::from_secs(600),
        ..StreamConfig::default()
    };
    let streamer = Streamer::start(prepared, opts.clone(), cfg).unwrap();
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = Arc::new(GptDataset::open_with(&cached, SEQ, Split::All, &open).unwrap());
    let batch = 16;
    let sampler = Sampler::new(ds.num_samples(), 1, batch).unwrap();
    let start = sampler.start(ds.data().fingerprint());
    let step0 = ds.step_shards(&sampler, &start, 0, 1, 1).unwrap();
    assert!(step0.len() > 2, "step 0 reads more than the budget holds: {step0:?}");
    let (weak, s2, c0) = (Arc::downgrade(&ds), sampler.clone(), start.clone());
    streamer.follow(
        0,
        Box::new(move |step| {
            let Some(ds) = weak.upgrade() else {
                return Ok(Vec::new());
            };
            let mut c = c0.clone();
            c.advance(step).map_err(|e| e.to_string())?;
            ds.step_shards(&s2, &c, 0, 1, 1).map_err(|e| e.to_string())
        }),
    );
    ds.data().reading(0);
    let e = ds.micro_batch(&sampler, &start, 0, 1, 1, 0).unwrap_err();
    let DatasetError::Remote(remote) = &e else {
        panic!("expected the stream's error, got {e}");
    };
    let RemoteError::BudgetBelowStep { step, min_budget, .. } = **remote else {
        panic!("expected BudgetBelowStep, got {remote}");
    };
    assert_eq!(step, 0);
    assert!(e.to_string().contains(&format!("{min_budget} bytes")), "{e}");
    let cost = |shards: &[usize]| shards.iter().map(|&s| streamer.dir().cost(s)).sum::<u64>();
    assert_eq!(min_budget, streamer.dir().fixed_bytes + cost(&step0) + largest);
    // The smallest budget for a pass is that of its largest step, and it streams without
    // stalling (the first steps of the pass: with room for one step, each waits for its
    // shards).
    let mut c = start.clone();
    let mut largest_step = 0;
    for _ in 0..ds.num_samples() / batch as u64 {
        largest_step = largest_step.max(cost(&ds.step_shards(&sampler, &c, 0, 1, 1).unwrap()));
        c.advance(1).unwrap();
    }
    let min_budget = streamer.dir().fixed_bytes + largest_step + largest;
    drop(ds);
    drop(streamer);
    let (_, stats) = budgeted_pass(&loc, &opts, &dir.join("min"), |_| min_budget, &here, batch, Some(60));
    assert!(stats.evicted > 0, "{stats:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
