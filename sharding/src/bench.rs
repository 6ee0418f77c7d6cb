//! `gantry data bench`: what one reader thread delivers, next to a memcpy of the same bytes
//! and, for zstd shards, the raw frame decompression rate.

use crate::gpt::{DatasetError, GptDataset, TokenDataset};
use crate::sampler::{Sampler, Span};
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
/// that warms the page cache; then a memcpy of the same number of token bytes.
pub fn bench_reader(ds: &GptDataset, batch: usize, seconds: f64, seed: u64) -> Result<ReadBench, DatasetError> {
    let sampler = Sampler::new(ds.num_samples(), seed, 1)?;
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
    let mut tokens = Vec::with_capacity(batch * row);
    let mut spans = Vec::new();
    let (mut position, mut samples) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        tokens.clear();
        for _ in 0..batch {
            ds.sample_into(sampler.at(position).sample, &mut spans, &mut tokens)?;
            position += 1;
        }
        samples += batch as u64;
        std::hint::black_box(&tokens);
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
    let copy_secs = copy_start.elapsed().as_secs_f64().max(1e-9);
    let memcpy_gbps = bytes as f64 / copy_secs / 1e9;
    Ok(ReadBench {
        implementation: if ds.data().reads_zstd() {
            "gantry-zstd"
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
pub fn bench_frames(data: &TokenDataset, seconds: f64) -> Result<FrameBench, DatasetError> {
    let shards: Vec<_> = data.framed_shards().collect();
    let mut frames = 0u64;
    let (mut compressed, mut uncompressed) = (0u64, 0u64);
    for s in &shards {
        frames += s.index().frames.len() as u64;
        compressed += s.index().compressed_bytes;
        uncompressed += s.index().uncompressed_bytes;
    }
    let pass = || -> Result<u64, DatasetError> {
        let mut sum = 0u64;
        for s in &shards {
            // Touch one byte per frame so the work cannot be optimized away.
            s.for_each_frame(|bytes| sum = sum.wrapping_add(u64::from(bytes.first().copied().unwrap_or(0))))?;
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
    let gbps = (uncompressed * passes) as f64 / secs / 1e9;
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
