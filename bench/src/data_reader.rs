//! `gantry data bench`: what one reader thread delivers, next to a memcpy of the same bytes
//! and, for zstd shards, the raw frame decompression rate and the cost of materializing the
//! frames into a local `.bin`.

use crate::error::Result;
use crate::{host, stats};
use gantry_sharding::gpt::{DatasetError, FrameMode, GptDataset, OpenOptions, Split, TokenDataset, TokenSource};
use gantry_sharding::sampler::{Sampler, Span};
use std::path::Path;
use std::time::Instant;

/// What `gantry data bench` measures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReadBench {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub seq_len: usize,
    pub batch: usize,
    pub samples: u64,
    pub tokens: u64,
    pub seconds: f64,
    /// Tokens delivered as ready `batch × (seq_len + 1)` i64 batches per second, one thread.
    pub tokens_per_s: f64,
    /// A plain memcpy of as many bytes as the reader read from the `.bin` files.
    pub memcpy_gbps: f64,
    pub memcpy_tokens_per_s: f64,
}

/// One reader thread assembling batches of shuffled samples for about `seconds`, after a pass
/// that warms the page cache; then a memcpy of the same number of token bytes. Batches are
/// made the way the trainer's prefetch thread makes them ([`GptDataset::micro_batch`], one DP
/// rank, the cursor advancing a step per batch).
pub fn bench_reader(ds: &GptDataset, batch: usize, seconds: f64, seed: u64) -> Result<ReadBench> {
    let sampler = Sampler::new(ds.num_samples(), seed, batch).map_err(DatasetError::from)?;
    // Warm the page cache: touch every token once.
    let mut sink = Vec::new();
    for (doc, len) in ds.data().document_lengths()?.into_iter().enumerate() {
        sink.clear();
        ds.data().read_span(
            Span {
                doc: doc as u32,
                offset: 0,
                len,
            },
            &mut sink,
        )?;
    }
    let row = ds.seq_len() + 1;
    let mut cursor = sampler.start(ds.data().fingerprint());
    let mut samples = 0u64;
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let ready = ds.micro_batch(&sampler, &cursor, 0, 1, 1, 0)?;
        debug_assert_eq!(ready.tokens.len(), batch * row);
        std::hint::black_box(&ready.tokens);
        cursor.advance(1).map_err(DatasetError::from)?;
        samples += batch as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total_tokens = samples * row as u64;

    let token_bytes = ds.data().manifest().dtype.size();
    let bytes = (total_tokens as usize * token_bytes).max(1);
    let block = bytes.min(256 << 20);
    let src = vec![1u8; block];
    let mut dst = vec![0u8; block];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let copy_start = Instant::now();
    let mut copied = 0;
    while copied < bytes {
        let n = block.min(bytes - copied);
        dst[..n].copy_from_slice(&src[..n]);
        std::hint::black_box(&dst);
        copied += n;
    }
    let memcpy_gbps = stats::gbps(bytes as u64, copy_start.elapsed().as_secs_f64());
    Ok(ReadBench {
        implementation: if ds.data().reads_zstd() {
            "gantry-zstd"
        } else if !ds.data().materialized().is_empty() {
            "gantry-materialized"
        } else {
            "gantry"
        },
        seq_len: ds.seq_len(),
        batch,
        samples,
        tokens: total_tokens,
        seconds: elapsed,
        tokens_per_s: total_tokens as f64 / elapsed,
        memcpy_gbps,
        memcpy_tokens_per_s: memcpy_gbps * 1e9 / token_bytes as f64,
    })
}

/// Decompressing every zstd frame of a dataset in order, one thread (the ceiling for any
/// reader of the frames).
#[derive(Clone, Debug, serde::Serialize)]
pub struct FrameBench {
    pub frames: u64,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    /// uncompressed / compressed
    pub ratio: f64,
    pub passes: u64,
    pub seconds: f64,
    /// Uncompressed bytes out per second.
    pub gbps: f64,
    pub tokens_per_s: f64,
}

/// Decompress all frames of the shards `data` reads from zstd, pass after pass for about
/// `seconds` (at least one pass, after an untimed one that warms the page cache).
pub fn bench_frames(data: &TokenDataset, seconds: f64) -> Result<FrameBench> {
    let shards: Vec<_> = data.framed_shards().collect();
    let mut frames = 0u64;
    let (mut compressed, mut uncompressed) = (0u64, 0u64);
    for s in &shards {
        frames += s.index().frames.len() as u64;
        compressed += s.index().compressed_bytes;
        uncompressed += s.index().uncompressed_bytes;
    }
    let pass = || -> Result<u64> {
        let mut sum = 0u64;
        for s in &shards {
            // Touch one byte per frame so the work cannot be optimized away.
            s.for_each_frame(|bytes| sum = sum.wrapping_add(u64::from(bytes.first().copied().unwrap_or(0))))
                .map_err(DatasetError::from)?;
        }
        Ok(sum)
    };
    std::hint::black_box(pass()?);
    let started = Instant::now();
    let mut passes = 0u64;
    while passes == 0 || started.elapsed().as_secs_f64() < seconds {
        std::hint::black_box(pass()?);
        passes += 1;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let token_bytes = data.manifest().dtype.size() as f64;
    let gbps = stats::gbps(uncompressed * passes, secs);
    Ok(FrameBench {
        frames,
        compressed_bytes: compressed,
        uncompressed_bytes: uncompressed,
        ratio: uncompressed as f64 / compressed.max(1) as f64,
        passes,
        seconds: secs,
        gbps,
        tokens_per_s: gbps * 1e9 / token_bytes,
    })
}

/// Materializing every shard's zstd frames into a fresh cache directory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MaterializeBench {
    pub shards: usize,
    /// Uncompressed bytes written.
    pub bytes: u64,
    pub threads: usize,
    /// Wall time of the open that built the copies (decompression, fsync, xxh3 check,
    /// rename, index validation).
    pub seconds: f64,
    /// CPU time of that open, all threads (`None` without `/proc/self/stat`).
    pub cpu_seconds: Option<f64>,
    /// Uncompressed MB (10^6 bytes) per second of wall time.
    pub mb_per_s: f64,
    /// Uncompressed MB per CPU-second: what one core delivers, whatever else the machine runs.
    pub mb_per_s_per_core: Option<f64>,
    /// Wall time of a second open, which reuses the copies after checking size and xxh3.
    pub reopen_seconds: f64,
}

/// Open `dir`'s zstd frames materialized into `cache_root` (which should hold no copy of this
/// dataset yet, so the copies are built), time that, time a second open that reuses them, and
/// return the second dataset (reading through the copies) with the figures.
pub fn bench_materialize(
    dir: &Path,
    seq_len: usize,
    cache_root: &Path,
    threads: usize,
) -> Result<(GptDataset, MaterializeBench)> {
    let opts = OpenOptions {
        source: TokenSource::Zstd,
        frames: FrameMode::Materialize,
        cache_dir: Some(cache_root.to_path_buf()),
        threads,
        ..OpenOptions::default()
    };
    let cpu0 = host::own_cpu_seconds();
    let started = Instant::now();
    let first = TokenDataset::open_with(dir, &opts)?;
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let cpu_seconds = host::own_cpu_seconds().zip(cpu0).map(|(b, a)| (b - a).max(0.01));
    let built = first.materialized();
    let bytes: u64 = built.iter().map(|m| m.bytes).sum();
    let bench = MaterializeBench {
        shards: built.len(),
        bytes,
        threads: built.iter().map(|m| m.threads).max().unwrap_or(0),
        seconds,
        cpu_seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        mb_per_s_per_core: cpu_seconds.map(|c| bytes as f64 / 1e6 / c),
        reopen_seconds: 0.0,
    };
    drop(first);
    let started = Instant::now();
    let second = GptDataset::open_with(dir, seq_len, Split::All, &opts)?;
    let reopen_seconds = started.elapsed().as_secs_f64();
    Ok((
        second,
        MaterializeBench {
            reopen_seconds,
            ..bench
        },
    ))
}
