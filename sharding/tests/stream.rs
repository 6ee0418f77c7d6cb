//! Streaming a dataset from a real S3 server (s3s-fs) while it is read: reads equal the
//! local copy's, in the sampler's order, from a cache that never holds more than its budget
//! (shards evicted behind the reader, or, for a dataset larger than its budget, byte ranges
//! fetched into memory and checked against the upload's block checksums); compressed-only
//! shards decompressed on arrival; a read of a shard that is not there waits for it, and when
//! the server is gone the error names the shard's object; a partial file is never mapped; the
//! `.idx` files come from the upload's index pack, each checked against the manifest (a
//! damaged pack falls back on the file's own object, a prefix without a pack is read file by
//! file) and are kept in the cache as one file; a damaged cached shard is fetched again.

#[path = "../../checkpoint/tests/common/s3_server.rs"]
mod s3_server;
#[path = "common/stream.rs"]
mod setup;

use gantry_checkpoint::location::{Role, StorageLocation};
use gantry_sharding::frames::FrameIndex;
use gantry_sharding::gpt::{DatasetError, GptDataset, OpenOptions, Split, shards_of};
use gantry_sharding::remote::{
    BLOCK_SUMS, BlockSums, INDEX_PACK, RemoteError, RemoteOptions, StreamConfig, StreamDir, StreamStats, Streamer,
    fetch, fetch_block_sums, prepare_stream, upload,
};
use gantry_sharding::sampler::Sampler;
use s3_server::S3Server;
use setup::{SEQ, Uploaded, follow, open_streamed, options, read_steps, sum_of_files, synth, tempdir};
use std::path::Path;
use std::time::Duration;

#[test]
fn a_stream_within_a_quarter_budget_reads_what_the_local_copy_holds() {
    let up = Uploaded::new("budget");
    let cache = up.dir.join("cache");
    let prepared = prepare_stream(&up.loc, &cache, &up.opts).unwrap();
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
    let (streamer, ds) = open_streamed(prepared, up.opts.clone(), cfg);
    assert!(
        streamer.is_ranged(),
        "a dataset 4× its budget, with block checksums: range mode"
    );
    let sampler = Sampler::new(ds.num_samples(), 9, 4).unwrap();
    // Rank 1 of 2, 2 samples a step, over more shards than the budget holds several times.
    let steps = 300;
    follow(&streamer, &ds, &sampler, 1, 2);
    let fixed = sum_of_files(&cached);
    let got = read_steps(&ds, &sampler, 1, 2, steps, |_| {
        let used = sum_of_files(&cached);
        assert!(
            used == fixed && used + streamer.stats().peak_held <= budget,
            "the cache holds {used} bytes and the blocks {:?}, over the budget of {budget}",
            streamer.stats()
        );
    });
    assert_eq!(got, read_steps(&up.here(), &sampler, 1, 2, steps, |_| {}));
    let stats = streamer.stats();
    assert!(stats.ranged && stats.peak_held > 0, "{stats:?}");
    assert!(
        stats.peak_usage <= budget && stats.peak_usage == fixed + stats.peak_held,
        "the stream's own accounting ({stats:?}) is the directory ({fixed}) and the blocks, within the budget ({budget})"
    );
    assert!(!cached.join("shard-00000.bin").exists(), "nothing of a shard on disk");
    drop(ds);
    drop(streamer);
}

#[test]
fn compressed_only_shards_stream_by_frames_within_a_budget_or_whole_and_a_damaged_frame_is_named() {
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
    let stream = |tag: &str, ranges: bool| {
        let prepared = prepare_stream(&loc, &dir.join(tag), &opts).unwrap();
        let cached = prepared.dir.clone();
        let budget = prepared.footprint() / 4;
        let cfg = StreamConfig {
            budget: Some(budget),
            ranges,
            ..StreamConfig::default()
        };
        let (streamer, ds) = open_streamed(prepared, opts.clone(), cfg);
        (streamer, ds, cached, budget)
    };
    // A quarter budget: the frames each step reads (1 KiB each here), decompressed and checked
    // in memory; nothing of a shard is written to disk.
    let (streamer, ds, cached, budget) = stream("frames", true);
    assert!(streamer.is_ranged());
    assert_eq!(read_steps(&ds, &sampler, 0, 1, 6, |_| {}), expected);
    let stats = streamer.stats();
    assert!(stats.peak_usage <= budget && stats.fetched > 0, "{stats:?}");
    let listing = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let names = listing(&cached);
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with(".bin") && !n.ends_with(".zst") && !n.contains(".partial-")),
        "no shard file in range mode: {names:?}"
    );
    assert!(sum_of_files(&cached) <= budget);
    drop((ds, streamer));
    // Ranges off: whole shards, decompressed on arrival; only the `.bin` stays.
    let (streamer, ds, cached, budget) = stream("whole", false);
    assert!(!streamer.is_ranged());
    assert_eq!(read_steps(&ds, &sampler, 0, 1, 6, |_| {}), expected);
    let names = listing(&cached);
    assert!(names.iter().any(|n| n.ends_with(".bin")), "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with(".zst") && !n.ends_with(".zidx") && !n.contains(".partial-")),
        "only the decompressed .bin stays: {names:?}"
    );
    assert!(sum_of_files(&cached) <= budget);
    drop((ds, streamer));
    // One byte of every frame damaged on the server (sizes unchanged): fetched twice, then the
    // error names the object and the frame.
    for e in std::fs::read_dir(&full).unwrap() {
        let p = e.unwrap().path();
        if !p.to_string_lossy().ends_with(".zidx") {
            continue;
        }
        let index = FrameIndex::parse(&std::fs::read(&p).unwrap(), &p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().replace(".zidx", ".bin.zst");
        let object = server.object_path(&format!("z/{name}"));
        let mut zst = std::fs::read(&object).unwrap();
        for f in &index.frames {
            zst[(f.compressed_offset + u64::from(f.compressed_len) / 2) as usize] ^= 0x5a;
        }
        std::fs::write(&object, zst).unwrap();
    }
    let (streamer, ds, _, _) = stream("damaged", true);
    let mut c = sampler.start(ds.data().fingerprint());
    c.advance(0).unwrap();
    let e = ds.micro_batch(&sampler, &c, 0, 1, 1, 0).unwrap_err().to_string();
    assert!(
        e.contains(".bin.zst") && e.contains("frame ") && e.contains("fetched twice"),
        "{e}"
    );
    drop((ds, streamer));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_waits_for_its_shard_and_a_server_gone_for_good_is_named() {
    let mut up = Uploaded::new("wait");
    let (loc, opts) = (up.loc.clone(), up.opts.clone());
    let prepared = prepare_stream(&loc, &up.dir.join("cache"), &opts).unwrap();
    let cached = prepared.dir.clone();
    let cfg = StreamConfig {
        wait: Duration::from_secs(30),
        ..StreamConfig::default()
    };
    // Not following any reader: only what a read asks for is fetched, when it asks.
    let (streamer, ds) = open_streamed(prepared, opts, cfg);
    let here = up.here();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    ds.sample_into(0, &mut a).unwrap();
    here.sample_into(0, &mut b).unwrap();
    assert_eq!(a, b, "the read waited for its shard, then read it");
    assert!(cached.join("shard-00000.bin").exists());
    let last_shard = format!("shard-{:05}.bin", ds.data().manifest().shards.len() - 1);
    assert!(!cached.join(&last_shard).exists(), "nothing it did not ask for");

    drop(up.server.take());
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
    let up = Uploaded::new("pack");
    let (loc, opts, dir) = (&up.loc, &up.opts, &up.dir);
    let indexes = local_indexes(&up.local);
    assert!(indexes.len() > 50, "many small shards: {}", indexes.len());
    let store = up.store();
    let pack = store.get(INDEX_PACK).unwrap().expect("the upload wrote the index pack");
    assert_eq!(
        pack.to_vec(),
        indexes.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<u8>>(),
        "the pack is every .idx back to back, in manifest order"
    );
    let packed: Vec<u8> = indexes.iter().flat_map(|(_, b)| b.clone()).collect();
    let prepare_into = |tag: &str| {
        prepare_stream(loc, &dir.join(tag), opts).map(|p| {
            // The cache keeps them as one file too, not a file per shard.
            assert!(
                std::fs::read(p.dir.join(INDEX_PACK)).unwrap() == packed,
                "the cached pack"
            );
            assert!(!p.dir.join(&indexes[0].0).exists(), "no .idx file per shard");
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
    // One byte of shard 3's piece damaged in the cache: that one is fetched again.
    let cached = prepare_stream(loc, &dir.join("no-pack"), opts)
        .unwrap()
        .dir
        .join(INDEX_PACK);
    let mut bytes = std::fs::read(&cached).unwrap();
    let at: usize = indexes[..3].iter().map(|(_, b)| b.len()).sum();
    bytes[at + 20] ^= 0xff;
    std::fs::write(&cached, bytes).unwrap();
    assert_eq!(prepare_into("no-pack").unwrap(), 1);
}

/// A shard whose cached `.bin` changed since it was checked is hashed again and, not
/// matching, fetched again; a `.bin` gone from the server is not looked for when the stream
/// is prepared (no listing of the prefix when the manifest names every object), but named
/// when a read needs it.
#[test]
fn a_damaged_cached_shard_is_fetched_again_and_a_missing_object_is_named_when_read() {
    let up = Uploaded::new("damaged-cache");
    let here = up.here();
    let shards = here.data().manifest().shards.len() as u64;
    let cache = up.dir.join("cache");
    let pass = || budgeted_pass(&up.loc, &up.opts, &cache, |p| p.footprint(), &here, 16, None, false).1;
    let first = pass();
    assert_eq!(first.fetched, shards, "{first:?}");
    let bin = prepare_stream(&up.loc, &cache, &up.opts).unwrap().bin(2);
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[5] ^= 0xff;
    std::fs::write(&bin, bytes).unwrap();
    // The pass reads what the local copy holds: the damaged shard was not used.
    let second = pass();
    assert!(second.fetched == 1 && second.reused >= shards - 1, "{second:?}");

    up.store().delete("shard-00001.bin").unwrap();
    let prepared = prepare_stream(&up.loc, &up.dir.join("fresh"), &up.opts).unwrap();
    let streamer = Streamer::start(prepared, up.opts.clone(), StreamConfig::default()).unwrap();
    let Err(e) = streamer.shards().0.shard(1) else {
        panic!("shard 1 has no .bin on the server")
    };
    assert_eq!(
        e.to_string(),
        format!("{}/shard-00001.bin is missing, but the manifest lists it", up.loc),
        "{e:?}"
    );
}

/// Stream the first `steps` steps (`None`: a full pass) of rank 0 of 1 (`batch` samples a
/// step) of the dataset at `loc` into `cache` within `budget` (`ranges`: in range mode when it
/// applies), checking every step against `here` and the directory and the blocks held
/// against the budget after each; the budget and the stream's stats.
#[allow(clippy::too_many_arguments)]
fn budgeted_pass(
    loc: &StorageLocation,
    opts: &RemoteOptions,
    cache: &Path,
    budget: impl Fn(&StreamDir) -> u64,
    here: &GptDataset,
    batch: usize,
    steps: Option<u64>,
    ranges: bool,
) -> (u64, StreamStats) {
    let prepared = prepare_stream(loc, cache, opts).unwrap();
    let cached = prepared.dir.clone();
    let budget = budget(&prepared);
    let cfg = StreamConfig {
        budget: Some(budget),
        fetchers: 8,
        ranges,
        // A stall shows as CacheFull after this, rather than a minute's wait.
        room_wait: Duration::from_secs(10),
        ..StreamConfig::default()
    };
    let (streamer, ds) = open_streamed(prepared, opts.clone(), cfg);
    let sampler = Sampler::new(ds.num_samples(), 1, batch).unwrap();
    follow(&streamer, &ds, &sampler, 0, 1);
    let steps = steps.unwrap_or(ds.num_samples() / batch as u64);
    let got = read_steps(&ds, &sampler, 0, 1, steps, |_| {
        let used = sum_of_files(&cached) + streamer.stats().peak_held;
        assert!(
            used <= budget,
            "the cache and the blocks held take {used} bytes, over the budget of {budget}"
        );
    });
    assert_eq!(got, read_steps(here, &sampler, 0, 1, steps, |_| {}));
    let stats = streamer.stats();
    assert_eq!(stats.ranged, streamer.is_ranged());
    drop(ds);
    drop(streamer);
    (budget, stats)
}

#[test]
fn a_budget_of_the_datasets_footprint_streams_a_full_pass_without_stalling() {
    let up = Uploaded::new("footprint");
    let here = up.here();
    let pass = |tag: &str, budget: fn(&StreamDir) -> u64, ranges: bool| {
        budgeted_pass(&up.loc, &up.opts, &up.dir.join(tag), budget, &here, 16, None, ranges)
    };
    // Exactly the footprint: every shard fits at once, so shards stream whole, nothing is
    // evicted and every shard is fetched once.
    let (budget, stats) = pass("exact", |p| p.footprint(), true);
    assert_eq!(
        (stats.ranged, stats.fetched, stats.evicted),
        (false, here.data().manifest().shards.len() as u64, 0),
        "{stats:?}"
    );
    assert!(stats.peak_usage <= budget, "{stats:?}");
    // One byte short of that: streaming whole shards, the stream evicts behind the reader
    // instead of waiting for room; in range mode it holds blocks within the budget.
    for ranges in [false, true] {
        let (budget, stats) = pass(&format!("short-{ranges}"), |p| p.footprint() - 1, ranges);
        assert!(stats.peak_usage <= budget && stats.ranged == ranges, "{stats:?}");
    }
}

#[test]
fn a_full_pass_at_a_quarter_budget_fetches_a_small_multiple_of_the_dataset() {
    let up = Uploaded::new("quarter");
    let here = up.here();
    let bytes: u64 = here.data().manifest().shards.iter().map(|s| s.bin_bytes).sum();
    let quarter = |p: &StreamDir| p.total_bytes() / 4;
    let (budget, stats) = budgeted_pass(&up.loc, &up.opts, &up.dir.join("c"), quarter, &here, 16, None, true);
    assert!(stats.ranged, "{stats:?}");
    // Every sample of the pass once, each a 64-byte read in blocks of 64 bytes: mostly two
    // blocks a sample, some kept for a later step while the budget holds them (1.86× when
    // this was written; whole shards at this budget fetch the dataset many times over).
    let times = stats.bytes_fetched as f64 / bytes as f64;
    assert!(
        (1.0..2.5).contains(&times),
        "fetched {times:.2}× the dataset's {bytes} bytes: {stats:?}"
    );
    assert!(stats.peak_usage <= budget && stats.peak_held > 0, "{stats:?}");
}

#[test]
fn a_budget_below_one_steps_need_fails_at_once_naming_the_smallest_that_works() {
    let up = Uploaded::new("below");
    let (loc, opts, dir) = (&up.loc, &up.opts, &up.dir);
    let here = up.here();
    let cache = dir.join("cache");
    // Step 0 of a 16-sample batch reads many shards; a budget of the fixed files and two
    // shards holds one but not that step.
    let prepared = prepare_stream(loc, &cache, opts).unwrap();
    let largest = (0..prepared.shards()).map(|s| prepared.cost(s)).max().unwrap();
    let budget = prepared.fixed_bytes + 2 * largest;
    // Far below: refused when the stream starts, naming the least any step needs.
    let e = Streamer::start(
        prepared.clone(),
        opts.clone(),
        StreamConfig {
            budget: Some(budget - 1),
            ranges: false,
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
        ranges: false,
        ..StreamConfig::default()
    };
    let (streamer, ds) = open_streamed(prepared, opts.clone(), cfg);
    let batch = 16;
    let sampler = Sampler::new(ds.num_samples(), 1, batch).unwrap();
    let start = sampler.start(ds.data().fingerprint());
    let step0 = shards_of(&ds.step_shards(&sampler, &start, 0, 1, 1).unwrap());
    assert!(step0.len() > 2, "step 0 reads more than the budget holds: {step0:?}");
    follow(&streamer, &ds, &sampler, 0, 1);
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
        largest_step = largest_step.max(cost(&shards_of(&ds.step_shards(&sampler, &c, 0, 1, 1).unwrap())));
        c.advance(1).unwrap();
    }
    let min_budget = streamer.dir().fixed_bytes + largest_step + largest;
    drop(ds);
    drop(streamer);
    let min = |_: &StreamDir| min_budget;
    let (_, stats) = budgeted_pass(loc, opts, &dir.join("min"), min, &here, batch, Some(60), false);
    assert!(stats.evicted > 0, "{stats:?}");
}

/// Rank 0 of 1 reads `steps` steps of 4 samples through a stream of `prepared` within
/// `budget`, checked against the local copy; whether the stream went by byte ranges.
fn stream_steps(up: &Uploaded, prepared: StreamDir, budget: u64, steps: u64) -> bool {
    let cfg = StreamConfig {
        budget: Some(budget),
        ..StreamConfig::default()
    };
    let (streamer, ds) = open_streamed(prepared, up.opts.clone(), cfg);
    let sampler = Sampler::new(ds.num_samples(), 2, 4).unwrap();
    follow(&streamer, &ds, &sampler, 0, 1);
    let got = read_steps(&ds, &sampler, 0, 1, steps, |_| {});
    assert_eq!(got, read_steps(&up.here(), &sampler, 0, 1, steps, |_| {}));
    streamer.is_ranged()
}

#[test]
fn the_upload_writes_block_checksums_that_a_reader_takes_only_undamaged_and_for_its_manifest() {
    let up = Uploaded::new("sums");
    let store = up.store();
    let object = up.loc.child(BLOCK_SUMS);
    let prepare = |tag: &str| prepare_stream(&up.loc, &up.dir.join(tag), &up.opts).unwrap();
    let prepared = prepare("a");
    let sums = fetch_block_sums(&prepared, &up.opts)
        .unwrap()
        .expect("the upload wrote them");
    // They are the local .bin files' blocks.
    assert_eq!(sums.block_bytes(), 64);
    for (s, info) in prepared.manifest.shards.iter().enumerate().step_by(17) {
        let bin = std::fs::read(up.local.join(format!("{}.bin", info.prefix))).unwrap();
        assert_eq!(sums.blocks(s), bin.len().div_ceil(64));
        for b in 0..sums.blocks(s) {
            let r = sums.range(s, b);
            assert!(
                sums.matches(s, b, &bin[r.start as usize..r.end as usize]),
                "shard {s} block {b}"
            );
        }
    }
    let budget = prepared.total_bytes() / 4;
    assert!(stream_steps(&up, prepared, budget, 20), "range mode with them");

    // One byte damaged: refused naming the object, and the stream goes shard by shard.
    let good = store.get(BLOCK_SUMS).unwrap().unwrap();
    let mut bad = good.to_vec();
    bad[100] ^= 1;
    store.put(BLOCK_SUMS, bad.into()).unwrap();
    let prepared = prepare("b");
    let e = fetch_block_sums(&prepared, &up.opts).unwrap_err();
    assert!(
        matches!(e, RemoteError::BlockSums { .. }) && e.to_string().starts_with(&format!("{object}: refused")),
        "{e}"
    );
    assert!(!stream_steps(&up, prepared, budget, 20), "whole shards without them");

    // Written for another dataset (another fingerprint): refused as well.
    let manifest = prepare("c").manifest;
    let other = BlockSums::parse(&good, &manifest, 1, &object).unwrap_err();
    assert!(other.to_string().contains("not this manifest's"), "{other}");

    // A prefix uploaded before there were block checksums streams as it did; uploading the
    // same dataset again adds them, and nothing else.
    store.delete(BLOCK_SUMS).unwrap();
    let prepared = prepare("d");
    assert!(fetch_block_sums(&prepared, &up.opts).unwrap().is_none());
    assert!(!stream_steps(&up, prepared, budget, 20));
    let again = upload(&up.local, &up.loc, &up.opts).unwrap();
    assert!(again.already_complete, "{again:?}");
    assert_eq!(store.get(BLOCK_SUMS).unwrap().as_deref(), Some(&good[..]));
}

#[test]
fn a_damaged_block_on_the_server_is_fetched_again_then_named() {
    let up = Uploaded::new("damaged");
    let store = up.store();
    let prepared = prepare_stream(&up.loc, &up.dir.join("cache"), &up.opts).unwrap();
    // Shard 0's .bin with one byte of its second block flipped (same size).
    let name = format!("{}.bin", prepared.manifest.shards[0].prefix);
    let mut bin = std::fs::read(up.local.join(&name)).unwrap();
    bin[64 + 5] ^= 0x40;
    store.put(&name, bin.into()).unwrap();
    let cfg = StreamConfig {
        budget: Some(prepared.total_bytes() / 4),
        ..StreamConfig::default()
    };
    let (streamer, ds) = open_streamed(prepared, up.opts.clone(), cfg);
    assert!(streamer.is_ranged());
    // Sample 0 reads shard 0's first 64 bytes: block 0, undamaged.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    ds.sample_into(0, &mut a).unwrap();
    up.here().sample_into(0, &mut b).unwrap();
    assert_eq!(a, b);
    // Sample 2 reads bytes 124..188: blocks 1 and 2.
    let gets = streamer.stats().fetched;
    let e = ds.sample_into(2, &mut a).unwrap_err();
    let DatasetError::Remote(remote) = &e else {
        panic!("expected the stream's error, got {e}");
    };
    assert!(
        matches!(
            **remote,
            RemoteError::BlockChecksum {
                shard: 0,
                block: 1,
                start: 64,
                end: 128,
                ..
            }
        ),
        "{e}"
    );
    let said = e.to_string();
    assert!(
        said.starts_with(&format!("{}/{name}: block 1 of shard 0", up.loc)) && said.contains(BLOCK_SUMS),
        "the error names the object, the shard, the block and the checksums: {said}"
    );
    assert_eq!(streamer.stats().fetched, gets + 2, "fetched twice before giving up");
    drop(ds);
    drop(streamer);
}

/// Whether no rank holds the lease of the shard whose `.bin` is `bin` (what eviction needs:
/// its exclusive lock taken without waiting, here let go at once).
fn lease_free(bin: &Path) -> bool {
    !gantry_sharding::entry_lock::held(bin, gantry_sharding::entry_lock::Lock::Lease).unwrap()
}

#[test]
fn a_shard_the_plan_releases_is_evictable_while_the_stream_runs_and_a_held_one_is_not() {
    let up = Uploaded::new("released");
    let here = up.here();
    let prepared = prepare_stream(&up.loc, &up.dir.join("cache"), &up.opts).unwrap();
    // Every shard fits, but with a budget the plan lets go of what the reader is past; two
    // steps ahead at most, so the shards of the first steps leave the window soon.
    let cfg = StreamConfig {
        budget: Some(prepared.footprint()),
        ranges: false,
        horizon: 2,
        fetchers: 2,
        ..StreamConfig::default()
    };
    let (streamer, ds) = open_streamed(prepared, up.opts.clone(), cfg);
    let sampler = Sampler::new(ds.num_samples(), 3, 4).unwrap();
    follow(&streamer, &ds, &sampler, 0, 1);
    let step_shards = |step: u64| {
        let mut c = sampler.start(ds.data().fingerprint());
        c.advance(step).unwrap();
        shards_of(&ds.step_shards(&sampler, &c, 0, 1, 1).unwrap())
    };
    let k = 8;
    // Read (each read of a held shard from its slot, without the stream's lock) …
    let got = read_steps(&ds, &sampler, 0, 1, k, |_| {});
    assert_eq!(got, read_steps(&here, &sampler, 0, 1, k, |_| {}));
    // … then move on: what only the steps before `k` read leaves the window.
    ds.data().reading(k);
    let coming: Vec<usize> = (k..k + 5).flat_map(step_shards).collect();
    let mut past: Vec<usize> = (0..k).flat_map(step_shards).filter(|s| !coming.contains(s)).collect();
    past.sort_unstable();
    past.dedup();
    assert!(past.len() >= 2, "the first steps read shards the next do not: {past:?}");
    for &s in &past {
        assert_eq!(
            streamer.is_held(s),
            !lease_free(&streamer.dir().bin(s)),
            "shard {s}: held by the plan exactly while its lease is"
        );
    }
    // All released but the reader's last demand, which the plan keeps until the next one.
    let released = past.iter().filter(|&&s| !streamer.is_held(s)).count();
    assert!(released + 1 >= past.len(), "{released} of {past:?} released");
    // The step being read holds its shards, leases and all; reads go on, equal to the copy.
    let mut c = sampler.start(ds.data().fingerprint());
    c.advance(k).unwrap();
    let step = ds.micro_batch(&sampler, &c, 0, 1, 1, 0).unwrap().tokens;
    assert_eq!(step, here.micro_batch(&sampler, &c, 0, 1, 1, 0).unwrap().tokens);
    for s in step_shards(k) {
        assert!(streamer.is_held(s) && !lease_free(&streamer.dir().bin(s)), "shard {s}");
    }
    // A released shard read again is fetched (here: leased) again, and held while read.
    let again = past.iter().copied().find(|&s| !streamer.is_held(s)).unwrap();
    let map = streamer.shards().0.shard(again).unwrap();
    assert!(
        streamer.is_held(again) && !lease_free(&streamer.dir().bin(again)),
        "shard {again} read again is leased"
    );
    drop(map);
    drop(ds);
    drop(streamer);
}

/// `fetch` into a cache a stream prepared takes every `.idx` from the cached index pack: no
/// `.idx` object is read (here each is damaged on the server, so reading one would fail),
/// and the copy opens as a local dataset equal to the original.
#[test]
fn a_fetch_after_a_stream_takes_every_idx_from_the_cached_pack() {
    let up = Uploaded::new("fetch-after");
    let store = up.store();
    let cache = up.dir.join("cache");
    let prepared = prepare_stream(&up.loc, &cache, &up.opts).unwrap();
    let manifest = prepared.manifest.clone();
    for s in &manifest.shards {
        let key = format!("{}.idx", s.prefix);
        let mut bad = store.get(&key).unwrap().unwrap().to_vec();
        *bad.last_mut().unwrap() ^= 0xff;
        store.put(&key, bad.into()).unwrap();
    }
    let done = fetch(&up.loc, &cache, &up.opts).unwrap();
    assert!(
        !done.fetched.iter().any(|f| f.ends_with(".idx")),
        "no .idx fetched: {:?}",
        done.fetched
    );
    assert_eq!(
        done.fetched.len(),
        manifest.shards.len(),
        "every .bin, once: {:?}",
        done.fetched
    );
    let copy = GptDataset::open_with(&done.dir, SEQ, Split::All, &OpenOptions::default()).unwrap();
    let here = up.here();
    let sampler = Sampler::new(here.num_samples(), 3, 4).unwrap();
    assert_eq!(
        read_steps(&copy, &sampler, 0, 1, 3, |_| {}),
        read_steps(&here, &sampler, 0, 1, 3, |_| {})
    );
}
