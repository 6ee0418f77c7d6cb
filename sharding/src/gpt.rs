//! The GPT dataset: every shard of a dataset directory as one stream of documents (shards in
//! manifest order, documents in shard order), packed into samples of `seq_len + 1` tokens by
//! [`crate::sampler::PackedIndex`], shuffled and split over data-parallel ranks by
//! [`crate::sampler::Sampler`], read zero-copy from the memory maps, and prefetched on a
//! background thread so the training loop never waits on page faults.
//!
//! Shards whose `.bin` is absent but which have a zstd variant ([`crate::frames`]) are read
//! from their frames instead ([`TokenSource::Auto`]), or always ([`TokenSource::Zstd`]). By
//! default ([`FrameMode::Materialize`]) such a shard's frames are decompressed once, in
//! parallel, into a checked local `.bin` in a cache directory ([`crate::materialize`]), which
//! is then mapped and read like any `.bin`; [`FrameMode::Lru`] instead decompresses the frames
//! a span touches and keeps the most recently used ones (sequential scans, no disk to spare).
//!
//! Opened for a model ([`OpenOptions::vocab_size`]), a dataset refuses token ids the model
//! cannot embed ([`crate::vocab`]): shards whose largest id is known (the manifest, or a
//! current per-host verdict of [`crate::verify`]) are checked when opened; the others are
//! scanned once, on their first read.

use crate::frames::{FrameError, FramedBin};
use crate::indexed::{IndexedDataset, IndexedError, IndexedIndex, paths, tokens_of};
use crate::manifest::{Manifest, ManifestError};
use crate::materialize::{MaterializeError, Materialized, dataset_cache_dir, default_cache_root, materialize};
use crate::sampler::{Blend, Cursor, PackedIndex, SampleRef, Sampler, SamplerError, Span, split_documents};
use crate::vocab::{self, VocabError};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

mod gather;
mod streamed;

pub use streamed::{ShardBytes, ShardSource, Shards, shards_of};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Indexed(#[from] IndexedError),
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    #[error(transparent)]
    Frames(#[from] FrameError),
    #[error(transparent)]
    Materialize(#[from] MaterializeError),
    #[error(transparent)]
    Vocab(#[from] VocabError),
    #[error("{dir}: shard {prefix} has no zstd variant in the manifest (written with --compress zstd?)")]
    NoZstd { dir: PathBuf, prefix: String },
    #[error("{dir}: document {doc} has {tokens} tokens; documents are limited to 2^32 - 1 tokens")]
    DocumentTooLong { dir: PathBuf, doc: usize, tokens: u64 },
    #[error("the prefetch thread stopped: {0}")]
    PrefetchStopped(String),
    /// A streamed shard that could not be had (fetch failed, or waited for past the deadline).
    #[error(transparent)]
    Remote(Arc<crate::remote::RemoteError>),
}

/// Where a dataset's tokens are read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenSource {
    /// A shard's `.bin` when it is there, else its zstd frames.
    #[default]
    Auto,
    /// The `.bin` files only.
    Bin,
    /// The zstd frames only (every shard must have them).
    Zstd,
}

/// How shards read from zstd frames are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrameMode {
    /// Decompress every frame once into a local `.bin` in the cache directory (checked
    /// against the manifest's xxh3, renamed into place when complete, reused by later opens),
    /// then read it like any `.bin`: uncompressed speed for shuffled reads.
    #[default]
    Materialize,
    /// Decompress the frames a span touches, keeping the `cache_frames` most recently used
    /// per shard: no disk used, fine for sequential scans, hopeless for shuffled reads of a
    /// shard larger than the cache (each ~2 KB sample costs a 4 MiB frame).
    Lru,
}

/// How [`TokenDataset::open_with`] reads the shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    pub source: TokenSource,
    pub frames: FrameMode,
    /// [`FrameMode::Lru`]: decompressed frames kept per zstd shard (4 MiB each by default).
    pub cache_frames: usize,
    /// [`FrameMode::Materialize`]: the cache root; shards go to
    /// `ROOT/<dataset fingerprint, 16 hex digits>/PREFIX.bin`. `None`: the system
    /// temporary directory's `gantry-data-cache` ([`crate::materialize::default_cache_root`]).
    pub cache_dir: Option<PathBuf>,
    /// [`FrameMode::Materialize`]: decompression threads, 0 for every available core.
    pub threads: usize,
    /// The vocabulary of the model that reads the tokens: the dataset's declared vocabulary
    /// must fit it and every token id must be below it ([`crate::vocab`]). Checked when
    /// opened for shards whose largest id is known (recorded in the manifest, or found by a
    /// current per-host check in the cache root, [`crate::verify`]); other shards are scanned
    /// once, on their first read. `None`: ids are not checked.
    pub vocab_size: Option<u64>,
    /// Where the shards' `.bin` files come from when the directory does not hold them all:
    /// a streaming fetcher ([`crate::remote::Streamer`]) that brings each into the directory
    /// when a read needs it and maps it, the read waiting until then. Only the manifest and
    /// the `.idx` files must be in the directory. `None`: every shard is there (or in frames).
    pub shards: Option<Shards>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            source: TokenSource::Auto,
            frames: FrameMode::Materialize,
            cache_frames: 16,
            cache_dir: None,
            threads: 0,
            vocab_size: None,
            shards: None,
        }
    }
}

impl OpenOptions {
    /// Read frames through the LRU frame cache of `cache_frames` frames per shard.
    pub fn lru(source: TokenSource, cache_frames: usize) -> OpenOptions {
        OpenOptions {
            source,
            frames: FrameMode::Lru,
            cache_frames,
            ..OpenOptions::default()
        }
    }

    /// The default options, for a model of `vocab_size` tokens.
    pub fn for_vocab(vocab_size: u64) -> OpenOptions {
        OpenOptions {
            vocab_size: Some(vocab_size),
            ..OpenOptions::default()
        }
    }
}

/// One shard: a mapped `.bin`, the `.idx` and the zstd frames standing in for the `.bin`,
/// or the `.idx` of a shard whose `.bin` a [`ShardSource`] maps when a read needs it.
enum Shard {
    Mapped(IndexedDataset),
    Framed {
        index: IndexedIndex,
        frames: Box<FramedBin>,
    },
    Streamed(IndexedIndex),
}

impl Shard {
    fn index(&self) -> &IndexedIndex {
        match self {
            Shard::Mapped(ds) => ds.index(),
            Shard::Framed { index, .. } => index,
            Shard::Streamed(index) => index,
        }
    }
}

/// All shards of a dataset directory, opened and validated.
pub struct TokenDataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// `doc_base[s]` = global index of shard `s`'s first document; last = total documents.
    doc_base: Vec<usize>,
    fingerprint: u64,
    materialized: Vec<Materialized>,
    /// The file each shard's tokens come from (named in errors): the `.bin` or the `.bin.zst`.
    sources: Vec<PathBuf>,
    /// [`OpenOptions::vocab_size`].
    vocab: Option<u64>,
    /// Per shard, once its ids have been checked against `vocab`: the verdict.
    vetted: Vec<OnceLock<Result<(), VocabError>>>,
    /// [`OpenOptions::shards`].
    streamer: Option<Shards>,
}

impl TokenDataset {
    pub fn open(dir: &Path) -> Result<TokenDataset, DatasetError> {
        Self::open_with(dir, &OpenOptions::default())
    }

    pub fn open_with(dir: &Path, opts: &OpenOptions) -> Result<TokenDataset, DatasetError> {
        let (manifest, fingerprint) = Manifest::read_with_fingerprint(dir)?;
        if let Some(v) = opts.vocab_size {
            vocab::check_declared(&manifest, dir, v)?;
        }
        let cache_dir = match opts.frames {
            FrameMode::Materialize => Some(dataset_cache_dir(
                &opts.cache_dir.clone().unwrap_or_else(default_cache_root),
                fingerprint,
            )),
            FrameMode::Lru => None,
        };
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut materialized = Vec::new();
        let mut doc_base = vec![0usize];
        let mut sources = Vec::with_capacity(manifest.shards.len());
        for s in &manifest.shards {
            let prefix = dir.join(&s.prefix);
            let (bin, idx) = paths(&prefix);
            if opts.shards.is_some() {
                // Checked against the manifest's size of the .bin, which is not here yet.
                let held = opts
                    .shards
                    .as_ref()
                    .and_then(|src| src.0.index(shards.len(), &bin, s.bin_bytes));
                let index = match held {
                    Some(index) => index?,
                    None => IndexedIndex::open(&idx, &bin, s.bin_bytes)?,
                };
                doc_base.push(doc_base.last().copied().unwrap_or(0) + index.num_documents());
                shards.push(Shard::Streamed(index));
                sources.push(bin);
                continue;
            }
            let framed = match (opts.source, &s.zstd) {
                (TokenSource::Bin, _) | (TokenSource::Auto, None) => false,
                (TokenSource::Auto, Some(_)) => !bin.exists(),
                (TokenSource::Zstd, Some(_)) => true,
                (TokenSource::Zstd, None) => {
                    return Err(DatasetError::NoZstd {
                        dir: dir.to_path_buf(),
                        prefix: s.prefix.clone(),
                    });
                }
            };
            sources.push(match &s.zstd {
                Some(z) if framed => dir.join(&z.file),
                _ => bin.clone(),
            });
            let shard = match &s.zstd {
                Some(z) if framed => {
                    let zst = dir.join(&z.file);
                    let frames = FramedBin::open(&zst, &dir.join(&z.index), opts.cache_frames)?;
                    // Check the .idx against the frames before spending time on them.
                    let index = IndexedIndex::open(&idx, &zst, frames.len())?;
                    match &cache_dir {
                        Some(cache) => {
                            let local = cache.join(format!("{}.bin", s.prefix));
                            let done = materialize(&frames, &local, &s.bin_xxh3, opts.threads)?;
                            drop(index);
                            let shard = Shard::Mapped(IndexedDataset::open_files(&idx, &done.path)?);
                            materialized.push(done);
                            shard
                        }
                        None => Shard::Framed {
                            index,
                            frames: Box::new(frames),
                        },
                    }
                }
                _ => Shard::Mapped(IndexedDataset::open(&prefix)?),
            };
            doc_base.push(doc_base.last().copied().unwrap_or(0) + shard.index().num_documents());
            shards.push(shard);
        }
        let vetted = manifest.shards.iter().map(|_| OnceLock::new()).collect();
        let data = TokenDataset {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            doc_base,
            fingerprint,
            materialized,
            sources,
            vocab: opts.vocab_size,
            vetted,
            streamer: opts.shards.clone(),
        };
        if opts.vocab_size.is_some() {
            data.check_known_ids(&opts.cache_dir.clone().unwrap_or_else(default_cache_root))?;
        }
        Ok(data)
    }

    /// Check every shard whose largest id is known (the manifest's record, else a current
    /// per-host verdict under `cache_root`) against the vocabulary now; the rest wait for their first
    /// read ([`Self::vet`]).
    fn check_known_ids(&self, cache_root: &Path) -> Result<(), DatasetError> {
        let recorded: Vec<Option<u64>> = self.manifest.shards.iter().map(|s| s.max_token_id).collect();
        self.check_largest_ids(&recorded)?;
        if recorded.iter().any(Option::is_none)
            && let Some(cached) =
                crate::verify::cached_max_token_ids(&self.dir, &self.manifest, self.fingerprint, cache_root)
        {
            self.check_largest_ids(&cached)?;
        }
        Ok(())
    }

    /// Check the shards whose largest token id `max_token_ids` gives (per shard, manifest
    /// order; found by a caller, e.g. [`crate::verify::check_on_host`]) against the
    /// vocabulary the dataset was opened for, now. Without [`OpenOptions::vocab_size`],
    /// nothing to do.
    pub fn check_largest_ids(&self, max_token_ids: &[Option<u64>]) -> Result<(), DatasetError> {
        let Some(vocab) = self.vocab else {
            return Ok(());
        };
        for (shard, max) in max_token_ids.iter().enumerate().take(self.shards.len()) {
            if let Some(max) = *max
                && self.vetted[shard].get().is_none()
            {
                let verdict = match vocab::fits(max, vocab) {
                    true => Ok(()),
                    false => self.search(shard, vocab)?,
                };
                self.vetted[shard].get_or_init(|| verdict).clone()?;
            }
        }
        Ok(())
    }

    /// Whether shard `shard`'s ids are all below the vocabulary the dataset was opened for:
    /// scanned on the first call (a vectorized max over its tokens, and only when that is too
    /// large a search for the first offender), remembered after.
    fn vet(&self, shard: usize, vocab: u64) -> Result<(), DatasetError> {
        if let Some(verdict) = self.vetted[shard].get() {
            return Ok(verdict.clone()?);
        }
        let max = match &self.shards[shard] {
            Shard::Mapped(ds) => ds.tokens_at(0..ds.bin().len()).max_id(),
            Shard::Framed { index, frames } => {
                let mut max = 0;
                frames.for_each_frame(|bytes| max = max.max(tokens_of(index.dtype(), bytes).max_id()))?;
                max
            }
            Shard::Streamed(_) => {
                let ds = self.streamed(shard)?;
                ds.tokens_at(0..ds.bin().len()).max_id()
            }
        };
        let verdict = match vocab::fits(max, vocab) {
            true => Ok(()),
            false => self.search(shard, vocab)?,
        };
        // A damaged frame above is returned without being remembered; this is not.
        Ok(self.vetted[shard].get_or_init(|| verdict).clone()?)
    }

    /// Search shard `shard` for its first id at or above `vocab`: the error naming it, or
    /// `Ok` when there is none (a recorded largest id that was too cautious).
    fn search(&self, shard: usize, vocab: u64) -> Result<Result<(), VocabError>, DatasetError> {
        let name = &self.sources[shard];
        let found = match &self.shards[shard] {
            Shard::Mapped(ds) => vocab::first_outside(ds.index(), name, vocab, |bytes, sink| {
                sink(ds.tokens_at(bytes));
                Ok::<_, DatasetError>(())
            })?,
            Shard::Framed { index, frames } => vocab::first_outside(index, name, vocab, |bytes, sink| {
                frames.read(bytes.start as u64..bytes.end as u64, |b| {
                    sink(tokens_of(index.dtype(), b))
                })
            })?,
            Shard::Streamed(index) => {
                let ds = self.streamed(shard)?;
                vocab::first_outside(index, name, vocab, |bytes, sink| {
                    sink(ds.tokens_at(bytes));
                    Ok::<_, DatasetError>(())
                })?
            }
        };
        Ok(found.map_or(Ok(()), Err))
    }

    /// Check every shard's ids against the vocabulary the dataset was opened for now, rather
    /// than on each shard's first read. Without [`OpenOptions::vocab_size`], nothing to do.
    pub fn check_all_ids(&self) -> Result<(), DatasetError> {
        match self.vocab {
            Some(v) => (0..self.shards.len()).try_for_each(|s| self.vet(s, v)),
            None => Ok(()),
        }
    }

    /// The shards read from local copies of their zstd frames ([`FrameMode::Materialize`]):
    /// where each copy is and whether this open built or reused it.
    pub fn materialized(&self) -> &[Materialized] {
        &self.materialized
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Identifies the dataset in sampler cursors (xxh3 of `manifest.json`).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn num_documents(&self) -> usize {
        self.doc_base.last().copied().unwrap_or(0)
    }

    /// Whether any shard is read from zstd frames.
    pub fn reads_zstd(&self) -> bool {
        self.shards.iter().any(|s| matches!(s, Shard::Framed { .. }))
    }

    /// The zstd frames of every shard read from them.
    pub fn framed_shards(&self) -> impl Iterator<Item = &FramedBin> {
        self.shards.iter().filter_map(|s| match s {
            Shard::Framed { frames, .. } => Some(&**frames),
            Shard::Mapped(_) | Shard::Streamed(_) => None,
        })
    }

    /// Tokens per document, in stream order.
    pub fn document_lengths(&self) -> Result<Vec<u32>, DatasetError> {
        let mut out = Vec::with_capacity(self.num_documents());
        for shard in &self.shards {
            for len in shard.index().document_lengths() {
                let doc = out.len();
                out.push(u32::try_from(len).map_err(|_| DatasetError::DocumentTooLong {
                    dir: self.dir.clone(),
                    doc,
                    tokens: len,
                })?);
            }
        }
        Ok(out)
    }

    /// Append tokens `offset..offset+len` of global document `doc` to `out`. Only frames can
    /// fail (a damaged frame); mapped shards were fully checked when opened.
    pub fn read_span(&self, span: Span, out: &mut Vec<i64>) -> Result<(), DatasetError> {
        let mut pieces = Vec::with_capacity(1);
        self.locate_span(span, &mut pieces);
        for piece in &pieces {
            self.read_piece(piece, out)?;
        }
        Ok(())
    }
}

/// Fixed-length samples over a [`TokenDataset`].
pub struct GptDataset {
    data: TokenDataset,
    packed: PackedIndex,
}

/// Which documents a [`GptDataset`] packs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Split {
    All,
    /// Documents not drawn for validation by [`crate::sampler::split_documents`].
    Train {
        valid_fraction: f64,
        seed: u64,
    },
    /// Documents drawn for validation (the complement of `Train` with the same settings).
    Valid {
        valid_fraction: f64,
        seed: u64,
    },
}

impl GptDataset {
    pub fn open(dir: &Path, seq_len: usize) -> Result<GptDataset, DatasetError> {
        Self::open_split(dir, seq_len, Split::All)
    }

    /// Pack only one side of a train/validation split by documents (no document is in both).
    pub fn open_split(dir: &Path, seq_len: usize, split: Split) -> Result<GptDataset, DatasetError> {
        Self::open_with(dir, seq_len, split, &OpenOptions::default())
    }

    /// [`GptDataset::open_split`] with a choice of token source (e.g. zstd frames only).
    pub fn open_with(dir: &Path, seq_len: usize, split: Split, opts: &OpenOptions) -> Result<GptDataset, DatasetError> {
        let data = TokenDataset::open_with(dir, opts)?;
        let lengths = data.document_lengths()?;
        let packed = match split {
            Split::All => PackedIndex::new(&lengths, seq_len)?,
            Split::Train { valid_fraction, seed } | Split::Valid { valid_fraction, seed } => {
                let (train, valid) = split_documents(lengths.len(), valid_fraction, seed)?;
                let docs = if matches!(split, Split::Train { .. }) {
                    train
                } else {
                    valid
                };
                PackedIndex::from_documents(&lengths, &docs, seq_len)?
            }
        };
        Ok(GptDataset { data, packed })
    }

    pub fn data(&self) -> &TokenDataset {
        &self.data
    }

    pub fn num_samples(&self) -> u64 {
        self.packed.num_samples()
    }

    pub fn seq_len(&self) -> usize {
        self.packed.seq_len() as usize
    }

    /// The document ranges sample `sample` is made of, in order.
    pub fn spans(&self, sample: u64) -> Result<Vec<Span>, DatasetError> {
        Ok(self.packed.spans(sample)?)
    }

    /// Append sample `sample`'s `seq_len + 1` tokens to `out` (several at once:
    /// [`GptDataset::samples_into`]).
    pub fn sample_into(&self, sample: u64, out: &mut Vec<i64>) -> Result<(), DatasetError> {
        self.samples_into(&[sample], out)
    }

    /// The tokens of one micro-batch of one DP rank at `cursor`'s step, row-major
    /// (`micro_batch_size × (seq_len + 1)`).
    pub fn micro_batch(
        &self,
        sampler: &Sampler,
        cursor: &Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
        micro: usize,
    ) -> Result<Batch, DatasetError> {
        let refs = sampler.micro_batch(cursor, dp_rank, dp_size, micro_batches, micro)?;
        let samples: Vec<u64> = refs.iter().map(|r| r.sample).collect();
        let mut tokens = Vec::new();
        self.samples_into(&samples, &mut tokens)?;
        Ok(Batch {
            step: cursor.step(),
            micro,
            datasets: vec![0; refs.len()],
            samples: refs,
            tokens,
        })
    }
}

/// Several datasets interleaved by weight ([`crate::sampler::Blend`]): blended position `p`
/// goes to dataset `d` as the next position of `d`'s own shuffled stream (seed `seed + d`).
/// DP partitioning and resumption work on the blended positions exactly as for one dataset.
pub struct BlendedGptDataset {
    parts: Vec<GptDataset>,
    blend: Blend,
    samplers: Vec<Sampler>,
    /// Batch geometry and cursor identity of the blended stream.
    top: Sampler,
    fingerprint: u64,
}

impl BlendedGptDataset {
    pub fn open(
        dirs: &[(PathBuf, f64)],
        seq_len: usize,
        seed: u64,
        global_batch: usize,
    ) -> Result<BlendedGptDataset, DatasetError> {
        let parts = dirs
            .iter()
            .map(|(d, _)| GptDataset::open(d, seq_len))
            .collect::<Result<Vec<_>, _>>()?;
        let weights: Vec<f64> = dirs.iter().map(|(_, w)| *w).collect();
        let sizes: Vec<u64> = parts.iter().map(GptDataset::num_samples).collect();
        let blend = Blend::new(&weights, &sizes)?;
        let samplers = parts
            .iter()
            .enumerate()
            .map(|(d, p)| Sampler::new(p.num_samples(), seed.wrapping_add(d as u64), 1))
            .collect::<Result<Vec<_>, _>>()?;
        let top = Sampler::new(sizes.iter().sum(), seed, global_batch)?;
        let mut key = Vec::new();
        for (part, w) in parts.iter().zip(&weights) {
            key.extend_from_slice(&part.data().fingerprint().to_le_bytes());
            key.extend_from_slice(&w.to_bits().to_le_bytes());
        }
        let fingerprint = xxhash_rust::xxh3::xxh3_64(&key);
        Ok(BlendedGptDataset {
            parts,
            blend,
            samplers,
            top,
            fingerprint,
        })
    }

    /// The sampler whose cursors this blend takes (`start`, `check_cursor`, `advance`).
    pub fn sampler(&self) -> &Sampler {
        &self.top
    }

    /// Identifies the datasets and their weights in cursors.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Which dataset and sample blended position `p` reads.
    pub fn at(&self, position: u64) -> (usize, SampleRef) {
        let (d, q) = self.blend.at(position);
        (d, self.samplers[d].at(q))
    }

    pub fn micro_batch(
        &self,
        cursor: &Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
        micro: usize,
    ) -> Result<Batch, DatasetError> {
        let positions = self
            .top
            .micro_batch_positions(cursor, dp_rank, dp_size, micro_batches, micro)?;
        let mut batch = Batch {
            step: cursor.step(),
            micro,
            samples: Vec::new(),
            datasets: Vec::new(),
            tokens: Vec::new(),
        };
        let mut picks = Vec::new();
        for p in positions {
            let (d, r) = self.at(p);
            picks.push((d, r.sample));
            batch.samples.push(r);
            batch.datasets.push(d);
        }
        self.samples_into(&picks, &mut batch.tokens)?;
        Ok(batch)
    }
}

/// One micro-batch, ready for the trainer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub step: u64,
    pub micro: usize,
    pub samples: Vec<SampleRef>,
    /// Which dataset each sample came from (all 0 without blending).
    pub datasets: Vec<usize>,
    /// `samples.len() × (seq_len + 1)` tokens, row-major.
    pub tokens: Vec<i64>,
}

/// Builds the next micro-batches on a background thread, `depth` ahead of the consumer.
/// Dropping it stops the thread.
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch, DatasetError>>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Stream micro-batches for this DP rank starting at `cursor`, step by step, micro-batch
    /// by micro-batch, without end (epochs roll over).
    pub fn spawn(
        dataset: Arc<GptDataset>,
        sampler: Sampler,
        mut cursor: Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
        depth: usize,
    ) -> Prefetcher {
        let (tx, rx): (SyncSender<Result<Batch, DatasetError>>, _) = sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("gantry-prefetch".into())
            .spawn(move || {
                loop {
                    // A streamed dataset keeps the shards of this step and the next ones.
                    dataset.data().reading(cursor.step());
                    for micro in 0..micro_batches {
                        let batch = dataset.micro_batch(&sampler, &cursor, dp_rank, dp_size, micro_batches, micro);
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                    if let Err(e) = cursor.advance(1) {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                }
            })
            .ok();
        Prefetcher { rx: Some(rx), thread }
    }

    /// The next micro-batch (blocks only if the thread has fallen behind).
    pub fn next_batch(&self) -> Result<Batch, DatasetError> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| DatasetError::PrefetchStopped("already shut down".into()))?;
        rx.recv()
            .map_err(|_| DatasetError::PrefetchStopped("the prefetch thread is gone".into()))?
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        drop(self.rx.take()); // the thread's next send fails and it returns
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
