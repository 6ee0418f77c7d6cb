//! # gantry-sharding
//!
//! Training data for gantry's rank processes: token shards on disk in the Megatron indexed
//! dataset format (byte-compatible, so Megatron-LM can read what gantry writes and the other
//! way round), read through memory maps with zero-copy token slices, packed into fixed-length
//! samples and handed out to data-parallel ranks by a deterministic, resumable sampler.
//!
//! # Layout
//! - [`indexed`]: the `.idx` / `.bin` format (MMIDIDX version 1): a streaming
//!   [`indexed::IndexedWriter`] and a validating, memory-mapped [`indexed::IndexedDataset`].
//!   Every malformed input is a typed error naming the file and, where it applies, the byte
//!   offset; nothing is trusted before it is checked against the file sizes. Split into
//!   `indexed/writer.rs`, `indexed/reader.rs` and `indexed/tokens.rs` (the zero-copy views).
//! - [`frames`]: the zstd variant of a `.bin` (independent frames of ~4 MiB and a checked
//!   frame index) and [`frames::FramedBin`], which serves byte ranges from the frames with a
//!   small cache of decompressed ones. Both index formats open with the checks and
//!   little-endian reads of `index_header.rs`, each mapping its faults to its own error.
//! - [`materialize`]: decompressing a shard's frames once, in parallel, into a checked local
//!   `.bin` in a cache directory (renamed into place when complete), read like any `.bin`.
//! - [`gpt`]: the shards of a dataset directory as one document stream, fixed-length samples
//!   through the sampler, micro-batches for a DP rank (read a batch at a time, every level of
//!   the lookup prefetched for all samples before the next: `gpt/gather.rs`, `cache_hint.rs`),
//!   and a background [`gpt::Prefetcher`].
//! - [`manifest`]: `manifest.json` (shards, counts, xxh3 checksums, tokenizer, format
//!   version) and building a dataset directory under a temporary name, renamed when complete.
//! - [`prepare`]: text corpora (.txt, JSON lines, stdin) → a loaded or freshly trained
//!   byte-level BPE tokenizer → token shards with a manifest (`gantry data prepare`), with a
//!   fast exact encoder for byte-level BPE tokenizers ([`prepare::fast`]) and progress
//!   reporting.
//! - [`codec`]: text ↔ ids with a dataset's tokenizer, for evaluation and serving.
//! - [`vocab`]: whether a model can read a dataset's token ids (declared vocabulary, each
//!   shard's largest id recorded in the manifest or scanned once, the first offending
//!   document named).
//! - [`remote`]: datasets at `s3://` locations: uploading a finished dataset with its
//!   manifest last ([`remote::upload`]), and fetching one into the host's data cache,
//!   every byte checked against the manifest, once per host ([`remote::fetch`]).
//! - [`verify`]: checking a dataset's files against the manifest's xxh3 once per host, the
//!   verdict remembered in the data cache by fingerprint.
//! - [`synth`]: synthetic data from a Markov chain whose entropy rate is known exactly.
//! - [`splitmix`]: gantry's one SplitMix64 (the frozen finalizer the sampler hashes with, and
//!   the seeded stream synthetic data and token sampling draw from).
//! - [`next_token`]: the one token sampler (temperature, top-k, top-p, seed; greedy at
//!   temperature 0) over `f32` logits, used by serving and by end-of-run samples.
//! - [`sampler`]: packing documents into samples of `seq_len + 1` tokens across document
//!   boundaries, the seeded global shuffle, partitioning over DP ranks and micro-batches, and
//!   the serializable [`sampler::Cursor`] that resumes the global sample stream with any DP size.
//!
//! Data flows: documents → `IndexedWriter` → `.bin` + `.idx` → `IndexedDataset` (mmap) →
//! sample spans from `sampler` → token slices for the trainer.

mod cache_hint;
pub mod codec;
pub mod entry_lock;
pub mod frames;
pub mod gpt;
mod index_header;
pub mod indexed;
pub mod manifest;
pub mod materialize;
pub mod next_token;
pub mod prepare;
pub mod remote;
pub mod sampler;
pub mod splitmix;
pub mod synth;
pub mod verify;
pub mod vocab;
