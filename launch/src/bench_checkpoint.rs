//! `gantry bench checkpoint`: save, load and verify throughput of the real gantry-checkpoint
//! code next to a raw peer writing and reading the same bytes in the same place, in one run.
//!
//! - **Save**: `--ranks` in-process ranks (threads), each with its own [`Store`] (its own I/O
//!   runtime, as a rank process would have) and [`Saver`], save `--gib / --ranks` GiB of f32
//!   slices each: rank r holds row block r of every global `[rows, 1024]` tensor, the per-rank
//!   slices cycling through 256, 64, 192 and 128 MiB. Timed from the first `save()` hand-off until
//!   every rank's `wait()` returned (committed). The snapshot copy (a memcpy of the rank's
//!   slices, what the trainer does off the device) and the `save()` call itself are reported
//!   as the stall.
//! - **Load**: a fresh store, `Checkpoint::open(Latest)` and `load` of every whole tensor
//!   (resharded from R ranks to 1), checked element by element; then `verify()`.
//! - **Raw peer**, local: R threads write R files with `write_all` (without and with a final
//!   `sync_all`, like `dd conv=fdatasync`) and read them back. gantry's Store fsyncs every
//!   object it writes on local disks, so the save's peer is the synced raw write.
//!   S3: one object of the same total size through a plain multipart `Store::put`, and a
//!   plain `Store::get` of it.
//! - **Diagnostic**: the same slices put as one object each through `Store::put_many` (R
//!   stores in parallel): object_store's own path, without the Saver's chunking, checksums
//!   and commit, to show where a gap to the raw peer comes from.
//!
//! With `--repeat N` every write-side operation runs N times round-robin (so all of them see the
//! machine's slow and fast phases alike), then every read-side one; the table shows medians, the
//! ratio of medians and the median of the per-repetition ratios.
//!
//! Everything lives under a fresh `gantry-bench-<pid>-<time>` prefix of `--url`, removed at the
//! end unless `--keep`.

use crate::checkpoint::S3Args;
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use gantry_checkpoint::{
    Checkpoint, DType, JobState, S3Options, SaveReport, SaveRequest, Saver, SaverConfig, SliceSpec, Store, StoreConfig,
    TensorData, Which,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct CheckpointBenchArgs {
    /// Where to write: a directory, file:///… or s3://bucket[/prefix]. The bench works in a
    /// fresh `gantry-bench-<pid>-<time>` sub-directory / prefix of it.
    #[arg(long)]
    url: String,
    /// Total checkpoint size in GiB, split evenly over the ranks.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// In-process ranks (threads), each with its own Store and Saver.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Chunk object size of the Saver in MiB (SaverConfig::chunk_bytes).
    #[arg(long, default_value_t = 256)]
    chunk_mib: usize,
    /// Multipart part size in MiB [default: the Store's]
    #[arg(long)]
    part_mib: Option<usize>,
    /// Requests in flight per Store [default: the Store's]
    #[arg(long)]
    concurrency: Option<usize>,
    /// Local disks: also read everything back cold (each file fsynced and dropped from the
    /// page cache with posix_fadvise(DONTNEED) before each read).
    #[arg(long)]
    cold: bool,
    /// Repetitions of every measurement (interleaved); the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Leave what it wrote in place.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

/// Columns of f32 in every global tensor.
const COLS: u64 = 1024;
const ROW_BYTES: u64 = COLS * 4;
/// Per-rank slice sizes, cycled, in MiB.
const SLICE_MIB: [u64; 4] = [256, 64, 192, 128];
const MIB: u64 = 1 << 20;

/// One global tensor: `rows_per_rank × ranks` rows of `COLS` f32, rank r holding row block r.
struct TensorPlan {
    name: String,
    rows_per_rank: u64,
    seed: u64,
}

impl TensorPlan {
    fn global_shape(&self, ranks: usize) -> Vec<u64> {
        vec![self.rows_per_rank * ranks as u64, COLS]
    }
    fn slice(&self, rank: usize, ranks: usize) -> SliceSpec {
        SliceSpec {
            name: self.name.clone(),
            dtype: DType::F32,
            global_shape: self.global_shape(ranks),
            offsets: vec![self.rows_per_rank * rank as u64, 0],
            lengths: vec![self.rows_per_rank, COLS],
        }
    }
    fn slice_bytes(&self) -> u64 {
        self.rows_per_rank * ROW_BYTES
    }
}

fn plan_tensors(per_rank: u64) -> Vec<TensorPlan> {
    let mut out = Vec::new();
    let mut left = per_rank / ROW_BYTES;
    while left > 0 {
        let rows = (SLICE_MIB[out.len() % SLICE_MIB.len()] * MIB / ROW_BYTES).min(left);
        out.push(TensorPlan {
            name: format!("layers.{}.weight", out.len()),
            rows_per_rank: rows,
            seed: 0x5eed_0000 + out.len() as u64,
        });
        left -= rows;
    }
    out
}

/// Deterministic, non-constant f32 content: element `first + i` of the tensor with `seed`
/// (a SplitMix64-style hash of the global element index, mapped to [-0.5, 0.5)).
fn fill(seed: u64, first: u64, out: &mut [u8]) {
    let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, c) in out.chunks_exact_mut(4).enumerate() {
        let mut x = (first + i as u64) ^ s;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let v = (x >> 40) as f32 * (1.0 / (1u64 << 24) as f32) - 0.5;
        c.copy_from_slice(&v.to_le_bytes());
    }
}

/// Compare a whole loaded tensor with what was generated, 4 MiB at a time.
fn check_tensor(t: &TensorPlan, ranks: usize, bytes: &[u8]) -> Result<()> {
    let total = t.slice_bytes() * ranks as u64;
    ensure!(
        bytes.len() as u64 == total,
        "tensor {}: loaded {} bytes, expected {total}",
        t.name,
        bytes.len()
    );
    let mut want = vec![0u8; 4 << 20];
    for (k, got) in bytes.chunks(want.len()).enumerate() {
        let want = &mut want[..got.len()];
        fill(t.seed, (k * (4 << 20) / 4) as u64, want);
        if got != &want[..] {
            let at = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(0);
            bail!(
                "tensor {}: loaded bytes differ from the saved ones at byte {}",
                t.name,
                k * (4 << 20) + at
            );
        }
    }
    Ok(())
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    op: String,
    bytes: u64,
    /// Median of the samples.
    seconds: f64,
    /// GB/s (10^9 bytes per second) at the median.
    gbps: f64,
    /// This row's GB/s over the `vs` row's.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vs: Option<String>,
    /// Median over repetitions of the per-repetition ratio to `vs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    paired_ratio: Option<f64>,
    /// Seconds of every repetition, in order.
    samples: Vec<f64>,
}

#[derive(Serialize, Clone, Debug)]
struct RankSave {
    rank: usize,
    step: u64,
    bytes: u64,
    /// memcpy of the rank's slices into a fresh snapshot (what the trainer copies off the device).
    snapshot_s: f64,
    /// The `save()` call: the hand-off to the writer thread.
    handoff_s: f64,
    /// Packing, checksumming and uploading (SaveReport::write_s).
    write_s: f64,
    /// Hand-off until committed (SaveReport::commit_s).
    commit_s: f64,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Samples per operation, in the order operations were first measured.
#[derive(Default)]
struct Samples(Vec<(&'static str, Vec<f64>)>);

impl Samples {
    fn push(&mut self, op: &'static str, seconds: f64) {
        match self.0.iter_mut().find(|(o, _)| *o == op) {
            Some((_, v)) => v.push(seconds),
            None => self.0.push((op, vec![seconds])),
        }
    }
    /// One row per operation (median seconds), compared with `vs[op]` where given.
    fn rows(&self, bytes: u64, vs: &[(&str, &str)]) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .0
            .iter()
            .map(|(op, v)| {
                let seconds = median(v);
                Row {
                    op: op.to_string(),
                    bytes,
                    seconds,
                    gbps: bytes as f64 / seconds.max(1e-9) / 1e9,
                    ratio: None,
                    vs: None,
                    paired_ratio: None,
                    samples: v.clone(),
                }
            })
            .collect();
        for i in 0..rows.len() {
            // The first listed baseline that was measured in this run.
            let found = vs
                .iter()
                .filter(|(op, _)| *op == rows[i].op)
                .find_map(|(_, base)| Some((*base, rows.iter().find(|r| r.op == *base)?.gbps)));
            if let Some((base, gbps)) = found {
                rows[i].ratio = Some(rows[i].gbps / gbps);
                rows[i].vs = Some(base.to_string());
                // Repetition i of both ran back to back: their ratio cancels the machine's
                // slow and fast phases better than the ratio of medians.
                let b = &rows.iter().find(|r| r.op == base).expect("found above").samples;
                let a = &rows[i].samples;
                if a.len() == b.len() {
                    let paired: Vec<f64> = a.iter().zip(b).map(|(x, y)| y / x.max(1e-9)).collect();
                    rows[i].paired_ratio = Some(median(&paired));
                }
            }
        }
        rows
    }
}

const RAW_WRITE: &str = "raw write (write_all, no fsync)";
const RAW_WRITE_SYNC: &str = "raw write + fsync (dd conv=fdatasync style)";
const RAW_READ: &str = "raw read";
const RAW_READ_COLD: &str = "raw read, cold";
const RAW_PUT: &str = "raw put (1 object, Store::put multipart)";
const RAW_GET: &str = "raw get (1 object, Store::get)";
const PUT_MANY: &str = "Store::put_many of the slices (one object each, no checksums)";
const SAVE: &str = "checkpoint save (save() -> all committed)";
const LOAD: &str = "checkpoint load (open latest + load, R->1)";
const LOAD_COLD: &str = "checkpoint load, cold";
const VERIFY: &str = "checkpoint verify";
const VERIFY_COLD: &str = "checkpoint verify, cold";

fn secs(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

/// Wall time of a timed phase run by several threads: first start to last end.
fn span(times: &[(Instant, Instant)]) -> f64 {
    let start = times.iter().map(|t| t.0).min().expect("at least one rank");
    let end = times.iter().map(|t| t.1).max().expect("at least one rank");
    secs(start, end)
}

/// Every directory (including `dir`) and every regular file under `dir`, recursively.
fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                pending.push(e.path());
            } else if t.is_file() {
                files.push(e.path());
            }
        }
        dirs.push(d);
    }
    files.sort();
    Ok((dirs, files))
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(walk(dir)?.1)
}

/// fsync every file and directory under `dir`.
fn fsync_tree(dir: &Path) -> Result<()> {
    let (dirs, files) = walk(dir)?;
    for f in files.iter().chain(&dirs) {
        std::fs::File::open(f)?
            .sync_all()
            .with_context(|| format!("fsync {}", f.display()))?;
    }
    Ok(())
}

/// Write back and drop every file under `dir` from the page cache.
fn evict_tree(dir: &Path) -> Result<()> {
    files_under(dir)?.iter().try_for_each(|f| evict_file(f))
}

/// Write back and drop one file from the page cache.
pub(crate) fn evict_file(f: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(f)?;
    file.sync_all()?;
    // SAFETY: a valid open descriptor; advice only, no memory is touched.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(rc == 0, "posix_fadvise({}) failed: error {rc}", f.display());
    Ok(())
}

/// R threads each write their rank's bytes to `<dir>/<tag>-rank-R.bin` (then `sync_all` if
/// `sync`); wall time from the first start to the last finish.
fn raw_write(dir: &Path, tag: &str, data: &[Vec<Vec<u8>>], sync: bool) -> Result<f64> {
    use std::io::Write;
    let barrier = Barrier::new(data.len());
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .iter()
            .enumerate()
            .map(|(r, slices)| {
                let path = dir.join(format!("{tag}-rank-{r:05}.bin"));
                let barrier = &barrier;
                s.spawn(move || -> Result<(Instant, Instant)> {
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut f = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
                    for b in slices {
                        f.write_all(b).with_context(|| format!("write {}", path.display()))?;
                    }
                    if sync {
                        f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
                    }
                    Ok((t0, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("raw writer thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(span(&times))
}

/// R threads each read `<dir>/<tag>-rank-R.bin` whole; returns (bytes, wall seconds).
fn raw_read(dir: &Path, tag: &str, ranks: usize) -> Result<(u64, f64)> {
    let barrier = Barrier::new(ranks);
    let got = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let path = dir.join(format!("{tag}-rank-{r:05}.bin"));
                let barrier = &barrier;
                s.spawn(move || -> Result<(u64, (Instant, Instant))> {
                    barrier.wait();
                    let t0 = Instant::now();
                    let b = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
                    let t1 = Instant::now();
                    Ok((b.len() as u64, (t0, t1)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("raw reader thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let bytes = got.iter().map(|g| g.0).sum();
    let times: Vec<_> = got.iter().map(|g| g.1).collect();
    Ok((bytes, span(&times)))
}

/// Diagnostic: R threads, each with its own Store on `url`, put their slices as one object each
/// through `Store::put_many`: object_store's path without the Saver's chunking, checksums and
/// commit.
fn store_put_many(url: &str, s3: &S3Options, store_cfg: &StoreConfig, data: &[Vec<Vec<u8>>]) -> Result<f64> {
    let ranks = data.len();
    let stores = (0..ranks)
        .map(|_| Ok(Store::open_with(url, s3, store_cfg.clone())?))
        .collect::<Result<Vec<_>>>()?;
    let barrier = Barrier::new(ranks);
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .into_iter()
            .zip(data)
            .enumerate()
            .map(|(r, (store, slices))| {
                let barrier = &barrier;
                s.spawn(move || -> Result<(Instant, Instant)> {
                    let objects: Vec<_> = slices
                        .iter()
                        .enumerate()
                        .map(|(i, b)| (format!("rank-{r:05}/{i:04}.bin"), vec![b.clone().into()]))
                        .collect();
                    barrier.wait();
                    let t0 = Instant::now();
                    store.put_many(objects)?;
                    Ok((t0, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("put thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(span(&times))
}

/// One Saver (with its own Store) per rank, as rank processes would have.
fn open_savers(
    url: &str,
    s3: &S3Options,
    store_cfg: &StoreConfig,
    chunk_bytes: usize,
    ranks: usize,
) -> Result<Vec<Saver>> {
    let attempt = format!("bench{:x}", std::process::id());
    (0..ranks)
        .map(|r| {
            let store = Store::open_with(url, s3, store_cfg.clone())?;
            let mut cfg = SaverConfig::new(r, ranks, &attempt);
            cfg.chunk_bytes = chunk_bytes;
            Ok(Saver::new(store, cfg))
        })
        .collect()
}

/// Every rank snapshots its slices (a memcpy, untimed by the save), then saves `step`; returns
/// per-rank timings and the save's wall time (first `save()` call to last `wait()` return).
fn save_all(
    savers: &mut [Saver],
    step: u64,
    tensors: &[TensorPlan],
    data: &[Vec<Vec<u8>>],
) -> Result<(Vec<RankSave>, f64)> {
    let ranks = data.len();
    let start = Barrier::new(ranks);
    let go = Barrier::new(ranks);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = savers
            .iter_mut()
            .zip(data)
            .enumerate()
            .map(|(r, (saver, slices))| {
                let (start, go) = (&start, &go);
                s.spawn(move || -> Result<(RankSave, Instant, Instant)> {
                    start.wait();
                    let t = Instant::now();
                    let snapshot: Vec<TensorData> = tensors
                        .iter()
                        .zip(slices)
                        .map(|(p, b)| TensorData {
                            slice: p.slice(r, ranks),
                            bytes: b.clone(),
                        })
                        .collect();
                    let snapshot_s = t.elapsed().as_secs_f64();
                    go.wait();
                    let t0 = Instant::now();
                    saver.save(SaveRequest {
                        step,
                        tensors: snapshot,
                        rank_state: serde_json::json!({ "rank": r }),
                        job: JobState {
                            layout: serde_json::json!({ "bench_ranks": ranks }),
                            ..JobState::default()
                        },
                    })?;
                    let handoff_s = t0.elapsed().as_secs_f64();
                    let report: SaveReport = saver.wait()?.context("the save reported nothing")?;
                    let t1 = Instant::now();
                    Ok((
                        RankSave {
                            rank: r,
                            step,
                            bytes: report.bytes,
                            snapshot_s,
                            handoff_s,
                            write_s: report.write_s,
                            commit_s: report.commit_s,
                        },
                        t0,
                        t1,
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let times: Vec<_> = results.iter().map(|(_, a, b)| (*a, *b)).collect();
    Ok((results.into_iter().map(|(r, _, _)| r).collect(), span(&times)))
}

/// Open the latest checkpoint with a fresh store, load every whole tensor and check it.
fn load_all(url: &str, s3: &S3Options, store_cfg: &StoreConfig, tensors: &[TensorPlan], ranks: usize) -> Result<f64> {
    let store = Store::open_with(url, s3, store_cfg.clone())?;
    let requests: Vec<SliceSpec> = tensors
        .iter()
        .map(|t| SliceSpec::full(&t.name, DType::F32, &t.global_shape(ranks)))
        .collect();
    let t0 = Instant::now();
    let c = Checkpoint::open(&store, Which::Latest)?;
    let loaded = c.load(&requests)?;
    let s = t0.elapsed().as_secs_f64();
    for (t, b) in tensors.iter().zip(&loaded) {
        check_tensor(t, ranks, b)?;
    }
    Ok(s)
}

fn verify_all(url: &str, s3: &S3Options, store_cfg: &StoreConfig, total: u64) -> Result<f64> {
    let store = Store::open_with(url, s3, store_cfg.clone())?;
    let t0 = Instant::now();
    let c = Checkpoint::open(&store, Which::Latest)?;
    let report = c.verify(&mut |_| {})?;
    let s = t0.elapsed().as_secs_f64();
    ensure!(
        report.bytes == total,
        "verify checked {} bytes, {total} were saved",
        report.bytes
    );
    Ok(s)
}

fn generate(tensors: &[TensorPlan], ranks: usize) -> Vec<Vec<Vec<u8>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                s.spawn(move || {
                    tensors
                        .iter()
                        .map(|t| {
                            let mut b = vec![0u8; t.slice_bytes() as usize];
                            fill(t.seed, t.rows_per_rank * r as u64 * COLS, &mut b);
                            b
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread panicked"))
            .collect()
    })
}

pub fn run(args: CheckpointBenchArgs) -> Result<ExitCode> {
    ensure!(args.ranks >= 1, "--ranks must be at least 1");
    ensure!(args.gib > 0.0, "--gib must be positive");
    ensure!(args.repeat >= 1, "--repeat must be at least 1");
    ensure!(args.chunk_mib >= 1, "--chunk-mib must be at least 1");
    let per_rank = ((args.gib * (1u64 << 30) as f64) as u64 / args.ranks as u64) / ROW_BYTES * ROW_BYTES;
    ensure!(per_rank > 0, "--gib {} is too small for {} ranks", args.gib, args.ranks);
    let tensors = plan_tensors(per_rank);
    let total = per_rank * args.ranks as u64;
    let s3 = args.s3.options();
    let mut store_cfg = StoreConfig::default();
    if let Some(p) = args.part_mib {
        ensure!(p >= 5, "--part-mib must be at least 5 (S3's minimum part size)");
        store_cfg.part_size = p << 20;
    }
    if let Some(c) = args.concurrency {
        ensure!(c >= 1, "--concurrency must be at least 1");
        store_cfg.concurrency = c;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let root_url = format!(
        "{}/gantry-bench-{}-{stamp}",
        args.url.trim_end_matches('/'),
        std::process::id()
    );
    let root = Store::open_with(&root_url, &s3, store_cfg.clone())?;
    let setup = Setup {
        args: &args,
        tensors: &tensors,
        total,
        s3: &s3,
        store_cfg: &store_cfg,
        root: &root,
        root_url: &root_url,
    };
    if !args.json {
        println!(
            "# gantry bench checkpoint: {:.2} GiB as {} f32 tensors [rows, {COLS}] split by rows over {} ranks \
             ({:.0} MiB per rank), {}",
            total as f64 / (1u64 << 30) as f64,
            tensors.len(),
            args.ranks,
            per_rank as f64 / MIB as f64,
            root.url()
        );
        println!(
            "# chunk {} MiB, multipart above {} MiB in {} MiB parts, {} requests in flight per store; \
             {} cores, load {}; median of {} interleaved repetitions",
            args.chunk_mib,
            store_cfg.multipart_threshold >> 20,
            store_cfg.part_size >> 20,
            store_cfg.concurrency,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "?".into()),
            args.repeat
        );
    }
    let result = measure(&setup);
    if !args.keep {
        let cleaned = if root.is_local() {
            std::fs::remove_dir_all(root.url()).map_err(anyhow::Error::from)
        } else {
            root.delete_prefix("").map(|_| ()).map_err(anyhow::Error::from)
        };
        if let Err(e) = cleaned {
            eprintln!("gantry bench checkpoint: could not remove {}: {e:#}", root.url());
        }
    } else if !args.json {
        println!("# kept {}", root.url());
    }
    let (samples, saves) = result?;
    print_report(&setup, &samples, &saves)?;
    Ok(ExitCode::SUCCESS)
}

struct Setup<'a> {
    args: &'a CheckpointBenchArgs,
    tensors: &'a [TensorPlan],
    total: u64,
    s3: &'a S3Options,
    store_cfg: &'a StoreConfig,
    root: &'a Store,
    root_url: &'a str,
}

/// The write-side operations round-robin (each repetition runs every one once, so they share
/// the machine's moods), then the read side.
fn measure(x: &Setup) -> Result<(Samples, Vec<RankSave>)> {
    let (args, ranks, total) = (x.args, x.args.ranks, x.total);
    let local = x.root.is_local();
    let root_dir = PathBuf::from(x.root.url());
    let raw_dir = root_dir.join("raw");
    let objects_url = format!("{}/objects", x.root_url);
    let ckpt_url = format!("{}/ckpt", x.root_url);
    let mut samples = Samples::default();
    let mut saves = Vec::new();
    let data = generate(x.tensors, ranks);
    let one = if local {
        std::fs::create_dir_all(&raw_dir).with_context(|| format!("create {}", raw_dir.display()))?;
        None
    } else {
        let mut one = Vec::with_capacity(total as usize);
        for b in data.iter().flatten() {
            one.extend_from_slice(b);
        }
        Some(one)
    };
    let mut savers = open_savers(&ckpt_url, x.s3, x.store_cfg, args.chunk_mib << 20, ranks)?;
    for rep in 0..args.repeat {
        if let Some(one) = &one {
            // The copy (into the byte type Store::put takes) is not timed.
            let payload = one.clone().into();
            let t0 = Instant::now();
            x.root.put("raw/raw.bin", payload)?;
            samples.push(RAW_PUT, t0.elapsed().as_secs_f64());
        } else {
            samples.push(RAW_WRITE, raw_write(&raw_dir, "nosync", &data, false)?);
            // Write it back untimed, so the kernel's writeback does not overlap what follows.
            fsync_tree(&raw_dir)?;
            for r in 0..ranks {
                std::fs::remove_file(raw_dir.join(format!("nosync-rank-{r:05}.bin")))?;
            }
            samples.push(RAW_WRITE_SYNC, raw_write(&raw_dir, "sync", &data, true)?);
        }
        samples.push(PUT_MANY, store_put_many(&objects_url, x.s3, x.store_cfg, &data)?);
        if local {
            fsync_tree(&root_dir.join("objects"))?;
            std::fs::remove_dir_all(root_dir.join("objects"))?;
        } else {
            x.root.delete_prefix("objects/")?;
        }
        let (ranks_save, save_s) = save_all(&mut savers, rep as u64 + 1, x.tensors, &data)?;
        let saved: u64 = ranks_save.iter().map(|r| r.bytes).sum();
        ensure!(saved == total, "the ranks wrote {saved} bytes, {total} were handed in");
        saves.extend(ranks_save);
        samples.push(SAVE, save_s);
    }
    drop(savers);
    drop(data);
    drop(one);
    for _ in 0..args.repeat {
        if local {
            let (bytes, s) = raw_read(&raw_dir, "sync", ranks)?;
            ensure!(bytes == total, "raw read {bytes} bytes of {total}");
            samples.push(RAW_READ, s);
        } else {
            let t0 = Instant::now();
            let got = x.root.get("raw/raw.bin")?.context("the raw object vanished")?;
            let s = t0.elapsed().as_secs_f64();
            ensure!(
                got.len() as u64 == total,
                "raw get returned {} bytes of {total}",
                got.len()
            );
            samples.push(RAW_GET, s);
        }
        samples.push(LOAD, load_all(&ckpt_url, x.s3, x.store_cfg, x.tensors, ranks)?);
        samples.push(VERIFY, verify_all(&ckpt_url, x.s3, x.store_cfg, total)?);
    }
    if local && args.cold {
        for _ in 0..args.repeat {
            evict_tree(&root_dir)?;
            samples.push(RAW_READ_COLD, raw_read(&raw_dir, "sync", ranks)?.1);
            evict_tree(&root_dir)?;
            samples.push(LOAD_COLD, load_all(&ckpt_url, x.s3, x.store_cfg, x.tensors, ranks)?);
            evict_tree(&root_dir)?;
            samples.push(VERIFY_COLD, verify_all(&ckpt_url, x.s3, x.store_cfg, total)?);
        }
    }
    Ok((samples, saves))
}

// The store fsyncs what it writes on local disks (a commit must survive a power loss), so its
// peer is the synced raw write; the unsynced one is shown for scale.
const COMPARISONS: [(&str, &str); 10] = [
    (PUT_MANY, RAW_WRITE_SYNC),
    (SAVE, RAW_WRITE_SYNC),
    (LOAD, RAW_READ),
    (VERIFY, RAW_READ),
    (LOAD_COLD, RAW_READ_COLD),
    (VERIFY_COLD, RAW_READ_COLD),
    (LOAD, RAW_GET),
    (VERIFY, RAW_GET),
    (PUT_MANY, RAW_PUT),
    (SAVE, RAW_PUT),
];

fn print_report(x: &Setup, samples: &Samples, saves: &[RankSave]) -> Result<()> {
    let args = x.args;
    let rows: Vec<Row> = samples.rows(x.total, &COMPARISONS);
    let med = |f: fn(&RankSave) -> f64| {
        // Per save, the slowest rank; then the median over saves.
        let per_save: Vec<f64> = (1..=args.repeat as u64)
            .map(|step| saves.iter().filter(|r| r.step == step).map(f).fold(0.0, f64::max))
            .collect();
        median(&per_save)
    };
    if args.json {
        let out = serde_json::json!({
            "url": x.root.url(),
            "backend": if x.root.is_local() { "local" } else { "s3" },
            "ranks": args.ranks,
            "bytes": x.total,
            "tensors": x.tensors.len(),
            "chunk_mib": args.chunk_mib,
            "part_mib": x.store_cfg.part_size >> 20,
            "concurrency": x.store_cfg.concurrency,
            "repeat": args.repeat,
            "rows": rows,
            "saves": saves,
            "stall_s": { "snapshot": med(|r| r.snapshot_s), "handoff": med(|r| r.handoff_s) },
            "loaded_ok": true,
        });
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let w = rows.iter().map(|r| r.op.len()).max().unwrap_or(10);
    println!(
        "{:<w$}  {:>12}  {:>8}  {:>7}  {:>6}  {:>6}  vs",
        "operation", "bytes", "seconds", "GB/s", "ratio", "paired"
    );
    let num = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    for r in &rows {
        println!(
            "{:<w$}  {:>12}  {:>8.3}  {:>7.3}  {:>6}  {:>6}  {}",
            r.op,
            r.bytes,
            r.seconds,
            r.gbps,
            num(r.ratio),
            num(r.paired_ratio),
            r.vs.as_deref().unwrap_or("")
        );
    }
    println!(
        "# seconds: median of {} repetitions; ratio = GB/s over the vs row's GB/s; paired = median over \
         repetitions of the ratio within each repetition",
        args.repeat
    );
    if args.repeat > 1 {
        for r in &rows {
            let s: Vec<String> = r.samples.iter().map(|s| format!("{s:.3}")).collect();
            println!("# samples (s) {}: {}", r.op, s.join(" "));
        }
    }
    println!(
        "# stall (slowest rank, median over saves): snapshot memcpy {:.3} s, save() hand-off {:.3} ms",
        med(|r| r.snapshot_s),
        med(|r| r.handoff_s) * 1e3
    );
    println!(
        "# inside the save (slowest rank, median): write_s {:.3} s (chunking + checksum + upload + index), \
         commit_s {:.3} s (hand-off to commit)",
        med(|r| r.write_s),
        med(|r| r.commit_s)
    );
    println!("# loaded tensors match the saved ones: ok");
    Ok(())
}
