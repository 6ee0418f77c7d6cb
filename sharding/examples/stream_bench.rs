//! A dataset streamed from S3 into a fresh data cache, measured against raw GETs of the same
//! bytes from the same server in the same process (`scripts/bench-data-s3.sh` runs it):
//!
//! - first step: the shards step 0 reads, by raw ranged GETs, next to a cold stream's time to
//!   its first batch (manifest and `.idx` files, then those shards, then the batch);
//! - one pass (every sample once, global batch `--batch`, one reader): raw GETs of every
//!   shard next to the cold stream (no budget), the same cache warm, the copy read in place
//!   as a local dataset, and a cold stream within a budget of `--budget-frac` of the
//!   dataset's footprint in the cache (1.0: every shard fits at once).
//!
//! Rates are the dataset's tokens over the seconds each took. Prints one JSON object.
//!
//! ```sh
//! stream_bench s3://bucket/corpus WORK_DIR [--seq-len 1023] [--batch 64] [--budget-frac 0.25] [--shards-too 1] [--warm-more N]
//! ```
//!
//! `--warm-more N` runs N more rounds of a warm pass and a local one, alternating, after the
//! local pass (`"more_s"` of each: their seconds), to profile or average them; the cache
//! directory then holds the `.idx` files too. `--budget-frac 0` leaves the budgeted pass out (`"budget": null`). The budgeted pass
//! streams in range mode (byte ranges of shards, checked against the upload's block
//! checksums, held in memory) when the dataset does not fit; `--shards-too` runs it a second
//! time streaming whole shards (`"budget_shards"`), the mode before range mode, for the
//! before/after comparison in one session.
//!
//! S3 settings come from the `AWS_*` variables (this is a program; the library reads none).

use gantry_checkpoint::location::{Role, StorageLocation};
use gantry_checkpoint::{S3Options, Store, StoreConfig};
use gantry_sharding::gpt::{GptDataset, OpenOptions, Split, shards_of};
use gantry_sharding::remote::{INDEX_PACK, RemoteOptions, StreamConfig, Streamer, prepare_stream, read_manifest};
use gantry_sharding::sampler::Sampler;
use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn Error>>;

struct Args {
    url: String,
    work: String,
    seq_len: usize,
    batch: usize,
    budget_frac: f64,
    shards_too: bool,
    /// Extra warm passes after the report's (for profiling a warm pass): their seconds.
    warm_more: usize,
    /// Fetcher threads of each stream ([`StreamConfig::fetchers`]; 0: the default).
    fetchers: usize,
}

fn args() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let usage = "usage: stream_bench s3://bucket/prefix WORK_DIR [--seq-len N] [--batch N] [--budget-frac F] [--shards-too 0|1] [--warm-more N] [--fetchers N]";
    let (url, work) = (it.next().ok_or(usage)?, it.next().ok_or(usage)?);
    let mut a = Args {
        url,
        work,
        seq_len: 1023,
        batch: 64,
        budget_frac: 0.25,
        shards_too: false,
        warm_more: 0,
        fetchers: 0,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(usage)?;
        match flag.as_str() {
            "--seq-len" => a.seq_len = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--budget-frac" => a.budget_frac = value.parse()?,
            "--shards-too" => a.shards_too = value == "1",
            "--warm-more" => a.warm_more = value.parse()?,
            "--fetchers" => a.fetchers = value.parse()?,
            _ => return Err(usage.into()),
        }
    }
    if a.fetchers == 0 {
        a.fetchers = StreamConfig::default().fetchers;
    }
    Ok(a)
}

/// CPU seconds this process has used so far, every thread, user and system (from
/// `/proc/self/stat`, in clock ticks of 10 ms): on a machine the server shares, what a pass
/// leaves the server is what its client does not use.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which ends at the last ')': utime and stime are the
    // 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    (ticks.get(11).copied().unwrap_or(0) + ticks.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// Raw ranged GETs of whole objects (8 MiB ranges, as many in flight as the stream has
/// fetchers: the same parallelism, so the two differ only in what a stream does besides its
/// GETs); seconds and bytes.
fn raw_get(store: &Store, objects: &[(String, u64)]) -> Res<(f64, u64)> {
    let step = 8u64 << 20;
    let ranges: Vec<(String, std::ops::Range<u64>)> = objects
        .iter()
        .flat_map(|(key, bytes)| {
            (0..bytes.div_ceil(step)).map(move |i| (key.clone(), i * step..((i + 1) * step).min(*bytes)))
        })
        .collect();
    let started = Instant::now();
    let got: u64 = store.get_ranges(&ranges)?.iter().map(|b| b.len() as u64).sum();
    Ok((started.elapsed().as_secs_f64(), got))
}

/// What one streamed pass did.
struct Pass {
    /// Seconds to the prepared cache directory, and on to the opened dataset.
    prepare_s: f64,
    open_s: f64,
    first_step_s: f64,
    seconds: f64,
    bytes_fetched: u64,
    peak_usage: u64,
    ranged: bool,
    gets: u64,
    peak_held: u64,
    /// Reads that waited for their shard (or blocks), and the seconds they waited.
    waits: u64,
    wait_s: f64,
}

/// Stream the dataset into `cache` (within `budget`), read one pass over it; `first` gets the
/// shards step 0 reads.
fn stream_pass(
    a: &Args,
    loc: &StorageLocation,
    opts: &RemoteOptions,
    cache: &Path,
    budget: Option<u64>,
    ranges: bool,
) -> Res<Pass> {
    let started = Instant::now();
    let prepared = prepare_stream(loc, cache, opts)?;
    let prepare_s = started.elapsed().as_secs_f64();
    let dir = prepared.dir.clone();
    let streamer = Streamer::start(
        prepared,
        opts.clone(),
        StreamConfig {
            budget,
            ranges,
            fetchers: a.fetchers,
            ..StreamConfig::default()
        },
    )?;
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = Arc::new(GptDataset::open_with(&dir, a.seq_len, Split::All, &open)?);
    let open_s = started.elapsed().as_secs_f64();
    let sampler = Sampler::new(ds.num_samples(), 1, a.batch)?;
    let start = sampler.start(ds.data().fingerprint());
    let (data, s2, origin) = (Arc::downgrade(&ds), sampler.clone(), start.clone());
    streamer.follow(
        0,
        Box::new(move |step| {
            let Some(ds) = data.upgrade() else {
                return Ok(Vec::new());
            };
            let mut c = origin.clone();
            c.advance(step).map_err(|e| e.to_string())?;
            ds.step_shards(&s2, &c, 0, 1, 1).map_err(|e| e.to_string())
        }),
    );
    let steps = ds.num_samples() / a.batch as u64;
    let mut cursor = start;
    let mut first_step_s = 0.0;
    for step in 0..steps {
        ds.data().reading(step);
        std::hint::black_box(ds.micro_batch(&sampler, &cursor, 0, 1, 1, 0)?);
        if step == 0 {
            first_step_s = started.elapsed().as_secs_f64();
        }
        cursor.advance(1)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = streamer.stats();
    drop(ds);
    drop(streamer);
    Ok(Pass {
        prepare_s,
        open_s,
        first_step_s,
        seconds,
        bytes_fetched: stats.bytes_fetched,
        peak_usage: stats.peak_usage,
        ranged: stats.ranged,
        gets: stats.fetched,
        peak_held: stats.peak_held,
        waits: stats.waits,
        wait_s: stats.wait_s,
    })
}

/// Write each shard's `.idx` into `dir` from the cache's index pack (a stream keeps them in
/// that one file), so that the directory opens as a local dataset.
fn unpack_indexes(dir: &Path, m: &gantry_sharding::manifest::Manifest) -> Res<()> {
    let pack = std::fs::read(dir.join(INDEX_PACK))?;
    let mut at = 0usize;
    for s in &m.shards {
        let end = at + s.idx_bytes as usize;
        std::fs::write(
            dir.join(format!("{}.idx", s.prefix)),
            pack.get(at..end).ok_or("short index pack")?,
        )?;
        at = end;
    }
    Ok(())
}

/// One pass over the dataset in `dir`, read in place; seconds.
fn local_pass(a: &Args, dir: &Path) -> Res<f64> {
    let started = Instant::now();
    let ds = GptDataset::open_with(dir, a.seq_len, Split::All, &OpenOptions::default())?;
    let sampler = Sampler::new(ds.num_samples(), 1, a.batch)?;
    let mut cursor = sampler.start(ds.data().fingerprint());
    for _ in 0..ds.num_samples() / a.batch as u64 {
        std::hint::black_box(ds.micro_batch(&sampler, &cursor, 0, 1, 1, 0)?);
        cursor.advance(1)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The shards step 0 reads, from the `.idx` files alone (nothing else is fetched), and the
/// dataset's cache footprint.
fn first_step_shards(a: &Args, loc: &StorageLocation, opts: &RemoteOptions, cache: &Path) -> Res<(Vec<usize>, u64)> {
    let prepared = prepare_stream(loc, cache, opts)?;
    let dir = prepared.dir.clone();
    let footprint = prepared.footprint();
    let streamer = Streamer::start(prepared, opts.clone(), StreamConfig::default())?;
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = GptDataset::open_with(&dir, a.seq_len, Split::All, &open)?;
    let sampler = Sampler::new(ds.num_samples(), 1, a.batch)?;
    let first = ds.step_shards(&sampler, &sampler.start(ds.data().fingerprint()), 0, 1, 1)?;
    drop((ds, streamer));
    Ok((shards_of(&first), footprint))
}

fn main() -> Res<()> {
    let a = args()?;
    let loc = StorageLocation::parse_as(&a.url, Role::Dataset)?;
    let s3 = S3Options::with_environment(std::env::vars_os());
    let opts = RemoteOptions::with_s3(s3.clone());
    let work = Path::new(&a.work);
    let remote = read_manifest(&loc, &opts)?;
    let m = &remote.manifest;
    let token_bytes = m.dtype.size() as f64;
    let bins: Vec<(String, u64)> = m
        .shards
        .iter()
        .map(|s| (format!("{}.bin", s.prefix), s.bin_bytes))
        .collect();
    let total: u64 = bins.iter().map(|b| b.1).sum();
    let tokens = total as f64 / token_bytes;
    let raw = StoreConfig {
        concurrency: a.fetchers,
        ..StoreConfig::default()
    };
    let store = Store::open_location(&loc, &s3, raw)?;

    let (first, footprint) = first_step_shards(&a, &loc, &opts, &work.join("plan-cache"))?;
    let first_objects: Vec<(String, u64)> = first.iter().map(|&s| bins[s].clone()).collect();

    // Raw GETs first (the server's page cache is then warm for every case alike).
    let cpu_before = cpu_s();
    let (raw_all_s, raw_bytes) = raw_get(&store, &bins)?;
    let raw_cpu_s = cpu_s() - cpu_before;
    let (raw_first_s, raw_first_bytes) = raw_get(&store, &first_objects)?;
    let cpu_before = cpu_s();
    let cold = stream_pass(&a, &loc, &opts, &work.join("cold"), None, true)?;
    let cold_cpu_s = cpu_s() - cpu_before;
    let warm = stream_pass(&a, &loc, &opts, &work.join("cold"), None, true)?;
    let copy = work.join("cold").join(format!("{:016x}", remote.fingerprint));
    unpack_indexes(&copy, m)?;
    let local_s = local_pass(&a, &copy)?;
    // More rounds of a warm pass and a local one, alternating.
    let more = (0..a.warm_more)
        .map(|_| {
            let warm = stream_pass(&a, &loc, &opts, &work.join("cold"), None, true)?.seconds;
            Ok((warm, local_pass(&a, &copy)?))
        })
        .collect::<Res<Vec<(f64, f64)>>>()?;
    // A fraction of what the whole dataset may take in the cache: 1.0 holds every shard at once.
    let budget = (footprint as f64 * a.budget_frac) as u64;
    let tight = match a.budget_frac > 0.0 {
        true => Some(stream_pass(&a, &loc, &opts, &work.join("budget"), Some(budget), true)?),
        false => None,
    };
    let whole = match a.budget_frac > 0.0 && a.shards_too {
        true => Some(stream_pass(
            &a,
            &loc,
            &opts,
            &work.join("budget-shards"),
            Some(budget),
            false,
        )?),
        false => None,
    };
    let budgeted = |t: Pass| {
        serde_json::json!({
            "fraction": a.budget_frac, "budget_bytes": budget, "s": t.seconds,
            "ranged": t.ranged, "gets": t.gets,
            "bytes_fetched": t.bytes_fetched, "fetched_x_dataset": t.bytes_fetched as f64 / total.max(1) as f64,
            "peak_usage": t.peak_usage, "peak_held": t.peak_held,
            "tokens_per_s": tokens / t.seconds.max(1e-9),
        })
    };

    let rate = |s: f64| tokens / s.max(1e-9);
    let report = serde_json::json!({
        "dataset": {"url": a.url, "shards": m.shards.len(), "bytes": total, "tokens": tokens as u64},
        "first_step": {
            "shards": first.len(), "bytes": raw_first_bytes,
            "raw_get_s": raw_first_s, "cold_stream_s": cold.first_step_s,
            "cold_prepared_s": cold.prepare_s, "cold_opened_s": cold.open_s,
        },
        "pass": {
            "raw_get": {"s": raw_all_s, "cpu_s": raw_cpu_s, "bytes": raw_bytes, "tokens_per_s": rate(raw_all_s)},
            "cold_stream": {
                "s": cold.seconds, "cpu_s": cold_cpu_s, "bytes_fetched": cold.bytes_fetched, "tokens_per_s": rate(cold.seconds),
                "waits": cold.waits, "wait_s": cold.wait_s,
            },
            "warm_stream": {
                "s": warm.seconds, "prepared_s": warm.prepare_s, "opened_s": warm.open_s, "first_step_s": warm.first_step_s,
                "tokens_per_s": rate(warm.seconds), "waits": warm.waits, "wait_s": warm.wait_s, "more_s": more.iter().map(|m| m.0).collect::<Vec<_>>(),
            },
            "local": {
                "s": local_s, "tokens_per_s": rate(local_s),
                "more_s": more.iter().map(|m| m.1).collect::<Vec<_>>(),
            },
            "budget": tight.map(budgeted),
            "budget_shards": whole.map(budgeted),
        },
    });
    println!("{report}");
    Ok(())
}
