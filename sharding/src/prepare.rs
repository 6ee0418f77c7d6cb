//! `gantry data prepare`: text corpora → tokenizer → token shards.
//!
//! Inputs are `.txt` files (split into documents per file, per blank-line-separated block or
//! per line) and JSON-lines files (`.jsonl` / `.json`, one document per record, the text in a
//! configurable field), given as files or directories (searched recursively, in sorted order so
//! the output is deterministic), or `-` for standard input (text split the same way, or JSON
//! lines with [`SplitBy::Record`]). Documents are streamed ([`input`]): a reader thread reads
//! line by line into batches of a few MB while the previous batch is encoded on every core
//! (order preserved) and written; long documents travel in pieces. So memory is bounded by
//! the batch and piece sizes, not by the corpus, a file or a document.
//!
//! The tokenizer is either a Hugging Face `tokenizer.json` or a byte-level BPE trained on the
//! inputs (one extra pass; not possible from standard input, which can be read only once).
//! Either way it is stored as `tokenizer.json` next to the shards. Byte-level BPE tokenizers
//! are encoded by [`fast`], which gives the HF encoder's ids several times faster; others by
//! the HF encoder. Every document ends with the end-of-document token. Each shard can also be
//! written as zstd frames ([`crate::frames`]). Everything is built through
//! [`build_atomically`], so an interrupted prepare leaves no directory that looks finished.

pub mod fast;
pub mod input;
pub mod progress;

pub use input::{STDIN, collect_inputs};
pub use progress::ProgressMode;

use crate::frames::ZstdOptions;
use crate::indexed::{IndexedError, IndexedSummary, IndexedWriter, TokenDType};
use crate::manifest::{Manifest, ManifestError, ShardInfo, TokenizerInfo, build_atomically};
use fast::{FastEncoder, WordCache};
use input::{Doc, DocReader};
use progress::Progress;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::ModelWrapper;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The end-of-document token used when none is named.
pub const DEFAULT_EOD: &str = "<|endoftext|>";
/// The tokenizer's file name inside the dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Hugging Face's tokenizer settings (`chat_template`, special tokens), kept beside
/// [`TOKENIZER_FILE`] when the tokenizer came with one.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// How plain-text files are cut into documents (JSON-lines files: one document per record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBy {
    /// The whole file is one document.
    #[default]
    File,
    /// Each non-empty line is a document (without its line ending).
    Line,
    /// Blocks of lines separated by one or more blank (whitespace-only) lines; the block's
    /// text keeps its inner line endings but not the one after its last line.
    BlankLine,
    /// One document per JSON record; for plain-text files the same as `file`.
    Record,
}

/// Where the tokenizer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// Load a Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// Train a byte-level BPE with this vocabulary size (special tokens included) on the inputs.
    TrainBpe { vocab_size: usize },
}

#[derive(Clone, Debug)]
pub struct PrepareConfig {
    /// Files and directories (directories are searched recursively for .txt/.jsonl/.json).
    pub inputs: Vec<PathBuf>,
    /// Dataset directory to create; must not exist.
    pub output: PathBuf,
    pub tokenizer: TokenizerSource,
    /// End-of-document token appended to every document (default `<|endoftext|>`).
    pub eod_token: Option<String>,
    /// Field holding the text in JSON-lines records.
    pub text_field: String,
    pub split_by: SplitBy,
    /// Most tokens per shard (a document never splits across shards).
    pub shard_tokens: u64,
    /// Documents per encoding batch (also bounded by `batch_bytes`).
    pub batch_docs: usize,
    pub batch_bytes: usize,
    /// Documents longer than this are read, encoded and written in pieces (when that is
    /// exact for the tokenizer; see [`fast::FastEncoder::pieces_are_exact`]).
    pub piece_bytes: usize,
    /// Encoding threads (0: every core).
    pub threads: usize,
    /// Use the fast byte-level BPE encoder when the tokenizer allows it (same ids as HF).
    pub fast: bool,
    /// Also write each shard as zstd frames.
    pub compress: Option<ZstdOptions>,
    pub progress: ProgressMode,
}

impl PrepareConfig {
    pub fn new(inputs: Vec<PathBuf>, output: PathBuf, tokenizer: TokenizerSource) -> PrepareConfig {
        PrepareConfig {
            inputs,
            output,
            tokenizer,
            eod_token: None,
            text_field: "text".into(),
            split_by: SplitBy::File,
            shard_tokens: 256 << 20,
            batch_docs: 4096,
            batch_bytes: 8 << 20,
            piece_bytes: 4 << 20,
            threads: 0,
            fast: true,
            compress: None,
            progress: ProgressMode::Off,
        }
    }
}

/// What a prepare run did.
#[derive(Clone, Debug, Serialize)]
pub struct PrepareReport {
    pub output: String,
    pub files: usize,
    pub documents: u64,
    /// Documents with no text, which were left out.
    pub skipped_empty: u64,
    pub tokens: u64,
    /// Bytes of input read in the encoding pass.
    pub bytes: u64,
    pub shards: usize,
    pub vocab_size: u64,
    pub dtype: TokenDType,
    pub eod_token: String,
    pub eod_id: u32,
    /// Whether the tokenizer was trained here (rather than loaded).
    pub trained_tokenizer: bool,
    /// Time spent training the tokenizer (0 when loaded).
    pub train_seconds: f64,
    /// Wall-clock time of the whole run.
    pub seconds: f64,
    /// Input megabytes (10^6 bytes) per second over the whole run.
    pub mb_per_s: f64,
    /// Input megabytes per second in the encoding pass alone.
    pub encode_mb_per_s: f64,
    pub tokens_per_s: f64,
    /// Threads that encoded.
    pub threads: usize,
    /// Whether the fast byte-level BPE encoder was used; if not, why.
    pub fast_path: bool,
    pub fast_path_unavailable: Option<String>,
    /// Documents (or pieces) that held an added token's text and went to the HF encoder.
    pub hf_fallback_docs: u64,
    /// Total size of the zstd frame files, when written.
    pub zstd_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: line {line}: not valid UTF-8")]
    Utf8 { path: PathBuf, line: u64 },
    #[error("{path}: line {line}: not a JSON object: {message}")]
    Json { path: PathBuf, line: u64, message: String },
    #[error("{path}: line {line}: no string field `{field}`")]
    MissingField { path: PathBuf, line: u64, field: String },
    #[error("{path}: unsupported input (expected .txt, .jsonl or .json)")]
    Unsupported { path: PathBuf },
    #[error("no input files found in {inputs}")]
    NoInputs { inputs: String },
    #[error("{path}: output directory already exists (prepare never replaces a dataset)")]
    OutputExists { path: PathBuf },
    #[error("the inputs hold no documents")]
    NoDocuments,
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: the tokenizer has no end-of-document token `{token}` (name one that it has with --eod-token)")]
    MissingEod { path: PathBuf, token: String },
    #[error("training the tokenizer failed: {message}")]
    Train { message: String },
    #[error("{path}: encoding failed: {message}")]
    Encode { path: PathBuf, message: String },
    #[error("invalid settings: {0}")]
    Config(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Indexed(#[from] IndexedError),
    #[error(
        "cannot train a tokenizer on standard input: it can be read only once (give --tokenizer, or save the input to a file)"
    )]
    TrainOnStdin,
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> PrepareError + '_ {
    move |source| PrepareError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A byte-level BPE trained on the documents of `files`, with `special` as its first token.
fn train_bpe(
    files: &[PathBuf],
    cfg: &PrepareConfig,
    vocab_size: usize,
    special: &str,
) -> Result<Tokenizer, PrepareError> {
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(special.to_string(), true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    // The trained tokenizer is a plain byte-level BPE, for which pieces are exact.
    let mut reader = DocReader::new(files, cfg.split_by, &cfg.text_field, cfg.piece_bytes);
    let mut failure = None;
    let docs = std::iter::from_fn(|| match reader.next_doc() {
        Ok(Some(doc)) => Some(doc.text),
        Ok(None) => None,
        Err(e) => {
            failure = Some(e);
            None
        }
    });
    let trained = tokenizer
        .train(&mut trainer, docs)
        .map(|_| ())
        .map_err(|e| PrepareError::Train { message: e.to_string() });
    if let Some(e) = failure {
        return Err(e);
    }
    trained?;
    Ok(tokenizer)
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, PrepareError> {
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| PrepareError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    // Documents are encoded whole: no truncation, no padding.
    tokenizer
        .with_truncation(None)
        .map_err(|e| PrepareError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .with_padding(None);
    Ok(tokenizer)
}

/// Decode token ids with a `tokenizer.json` (special tokens kept), e.g. to show a sample of a
/// prepared dataset.
pub fn decode_with(tokenizer_json: &Path, ids: &[u32]) -> Result<String, PrepareError> {
    let tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| PrepareError::Tokenizer {
        path: tokenizer_json.to_path_buf(),
        message: e.to_string(),
    })?;
    tokenizer.decode(ids, false).map_err(|e| PrepareError::Tokenizer {
        path: tokenizer_json.to_path_buf(),
        message: format!("cannot decode: {e}"),
    })
}

/// Shards of at most `shard_tokens` tokens, whole documents only.
struct ShardWriter<'a> {
    dir: &'a Path,
    dtype: TokenDType,
    shard_tokens: u64,
    compress: Option<ZstdOptions>,
    current: Option<(String, IndexedWriter, u64)>,
    done: Vec<ShardInfo>,
}

impl ShardWriter<'_> {
    /// Add a document's tokens, or a piece of them. A document begins a new shard when its
    /// first piece would overflow the current one; its later pieces follow it there.
    fn add(&mut self, tokens: &[u32], continued: bool, last: bool) -> Result<(), PrepareError> {
        let len = tokens.len() as u64;
        if !continued
            && let Some((_, _, n)) = &self.current
            && *n > 0
            && n + len > self.shard_tokens
        {
            self.close()?;
        }
        if self.current.is_none() {
            let prefix = format!("shard-{:05}", self.done.len());
            let writer = IndexedWriter::create(&self.dir.join(&prefix), self.dtype)?;
            self.current = Some((prefix, writer, 0));
        }
        let (_, writer, n) = self.current.as_mut().expect("open shard");
        writer.extend_sequence(tokens)?;
        if last {
            writer.end_sequence()?;
            writer.end_document();
        }
        *n += len;
        Ok(())
    }

    fn close(&mut self) -> Result<(), PrepareError> {
        if let Some((prefix, writer, _)) = self.current.take() {
            let summary: IndexedSummary = writer.finish()?;
            self.done.push(match &self.compress {
                Some(z) => ShardInfo::describe_compressed(self.dir, &prefix, &summary, z)?,
                None => ShardInfo::describe(self.dir, &prefix, &summary)?,
            });
        }
        Ok(())
    }
}

/// Prepare a dataset directory from text; see the module docs.
pub fn prepare(cfg: &PrepareConfig) -> Result<PrepareReport, PrepareError> {
    if cfg.shard_tokens == 0 {
        return Err(PrepareError::Config("--shard-tokens must be at least 1".into()));
    }
    if let TokenizerSource::TrainBpe { vocab_size } = cfg.tokenizer
        && vocab_size < 258
    {
        return Err(PrepareError::Config(format!(
            "--vocab-size {vocab_size} is too small for a byte-level BPE (at least 258: 256 bytes, the end-of-document token and one merge)"
        )));
    }
    if cfg.text_field.is_empty() {
        return Err(PrepareError::Config("--text-field must not be empty".into()));
    }
    if let Some(z) = &cfg.compress {
        z.validate().map_err(PrepareError::Config)?;
    }
    if cfg.output.exists() {
        return Err(PrepareError::OutputExists {
            path: cfg.output.clone(),
        });
    }
    let files = collect_inputs(&cfg.inputs)?;
    if matches!(cfg.tokenizer, TokenizerSource::TrainBpe { .. }) && files.iter().any(|f| input::is_stdin(f)) {
        return Err(PrepareError::TrainOnStdin);
    }
    // build_atomically wants a ManifestError to clean up; keep the real error aside.
    let mut failure = None;
    let result = build_atomically(&cfg.output, |tmp| match prepare_into(cfg, &files, tmp) {
        Ok(report) => Ok(report),
        Err(e) => {
            failure = Some(e);
            Err(ManifestError::Invalid {
                path: tmp.to_path_buf(),
                message: "prepare failed".into(),
            })
        }
    });
    match result {
        Ok(report) => Ok(report),
        Err(e) => Err(failure.take().unwrap_or(PrepareError::Manifest(e))),
    }
}

/// How documents become ids.
enum Encoder<'t> {
    Fast(Box<FastEncoder<'t>>),
    Hf(&'t Tokenizer),
}

/// One thread's share of a batch: the ids of its documents back to back.
#[derive(Default)]
struct Encoded {
    ids: Vec<u32>,
    /// End of each document's ids in `ids`.
    ends: Vec<usize>,
    hf_docs: u64,
}

impl Encoder<'_> {
    fn encode_into(&self, docs: &[Doc], cache: &mut WordCache, files: &[PathBuf]) -> Result<Encoded, PrepareError> {
        let mut out = Encoded::default();
        for doc in docs {
            let failed = |message: String| PrepareError::Encode {
                path: files[doc.file].clone(),
                message,
            };
            match self {
                Encoder::Fast(fast) => {
                    if !fast.encode(&doc.text, cache, &mut out.ids).map_err(failed)? {
                        out.hf_docs += 1;
                    }
                }
                Encoder::Hf(tokenizer) => {
                    let enc = tokenizer
                        .encode(doc.text.as_str(), false)
                        .map_err(|e| failed(e.to_string()))?;
                    out.ids.extend_from_slice(enc.get_ids());
                }
            }
            out.ends.push(out.ids.len());
        }
        Ok(out)
    }

    /// Encode a batch on `caches.len()` threads, each taking a contiguous run of documents
    /// of about equal bytes; results in document order.
    fn encode_batch(
        &self,
        docs: &[Doc],
        caches: &mut [WordCache],
        files: &[PathBuf],
    ) -> Result<Vec<Encoded>, PrepareError> {
        let total: usize = docs.iter().map(|d| d.text.len()).sum();
        let share = total.div_ceil(caches.len()).max(1);
        let mut chunks = Vec::with_capacity(caches.len());
        let (mut start, mut bytes) = (0, 0);
        for (i, d) in docs.iter().enumerate() {
            bytes += d.text.len();
            if bytes >= share && chunks.len() + 1 < caches.len() {
                chunks.push(&docs[start..=i]);
                (start, bytes) = (i + 1, 0);
            }
        }
        chunks.push(&docs[start..]);
        if chunks.len() == 1 {
            return Ok(vec![self.encode_into(chunks[0], &mut caches[0], files)?]);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .into_iter()
                .zip(caches.iter_mut())
                .map(|(chunk, cache)| scope.spawn(move || self.encode_into(chunk, cache, files)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    }
}

/// The tokenizer the dataset is encoded with, as stored in it, and what its vocabulary decides.
struct DatasetTokenizer {
    tokenizer: Tokenizer,
    trained: bool,
    /// Seconds spent training it (0 when loaded from a file).
    train_seconds: f64,
    eod_token: String,
    eod_id: u32,
    vocab_size: u64,
    dtype: TokenDType,
}

/// Load or train the tokenizer and store it in the dataset directory `tmp`: the ids mean
/// nothing without it, so it travels with the shards. `started` is when the prepare began.
fn dataset_tokenizer(
    cfg: &PrepareConfig,
    files: &[PathBuf],
    tmp: &Path,
    progress: &Progress,
    started: Instant,
) -> Result<DatasetTokenizer, PrepareError> {
    let eod_token = cfg.eod_token.clone().unwrap_or_else(|| DEFAULT_EOD.to_string());
    let (tokenizer, trained) = match &cfg.tokenizer {
        TokenizerSource::File(path) => {
            let t = load_tokenizer(path)?;
            if t.token_to_id(&eod_token).is_none() {
                return Err(PrepareError::MissingEod {
                    path: path.clone(),
                    token: eod_token,
                });
            }
            (t, false)
        }
        TokenizerSource::TrainBpe { vocab_size } => {
            progress.message(&format!(
                "prepare: training a byte-level BPE (vocabulary {vocab_size}) on {} file(s)",
                files.len()
            ));
            (train_bpe(files, cfg, *vocab_size, &eod_token)?, true)
        }
    };
    let train_seconds = if trained { started.elapsed().as_secs_f64() } else { 0.0 };
    let eod_id = tokenizer.token_to_id(&eod_token).ok_or_else(|| PrepareError::Train {
        message: format!("the trained tokenizer lacks `{eod_token}`"),
    })?;
    let tok_path = tmp.join(TOKENIZER_FILE);
    match &cfg.tokenizer {
        TokenizerSource::File(src) => {
            std::fs::copy(src, &tok_path).map_err(io(src))?;
            // A Hugging Face model folder keeps its chat template and special tokens in
            // tokenizer_config.json beside tokenizer.json: it travels with the tokenizer.
            let config = src.with_file_name(TOKENIZER_CONFIG_FILE);
            if config.is_file() {
                std::fs::copy(&config, tmp.join(TOKENIZER_CONFIG_FILE)).map_err(io(&config))?;
            }
        }
        TokenizerSource::TrainBpe { .. } => {
            tokenizer.save(&tok_path, true).map_err(|e| PrepareError::Io {
                path: tok_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
    }
    let max_id = tokenizer.get_vocab(true).values().copied().max().unwrap_or(0);
    let vocab_size = (tokenizer.get_vocab_size(true) as u64).max(u64::from(max_id) + 1);
    Ok(DatasetTokenizer {
        dtype: TokenDType::for_vocab(vocab_size as usize),
        tokenizer,
        trained,
        train_seconds,
        eod_token,
        eod_id,
        vocab_size,
    })
}

/// How the documents will be encoded: which encoder, on how many threads, in which pieces.
struct EncodePlan<'t> {
    encoder: Encoder<'t>,
    /// Why the fast encoder is not used, when it is not.
    fast_path_unavailable: Option<String>,
    /// Largest piece of a document read at once (0: whole documents).
    piece_bytes: usize,
    threads: usize,
}

impl<'t> EncodePlan<'t> {
    fn new(cfg: &PrepareConfig, tokenizer: &'t Tokenizer) -> EncodePlan<'t> {
        let fast_path_unavailable = if cfg.fast {
            fast::unsupported_reason(tokenizer)
        } else {
            Some("disabled".to_string())
        };
        let encoder = match (cfg.fast, FastEncoder::new(tokenizer)) {
            (true, Some(fast)) => Encoder::Fast(Box::new(fast)),
            _ => Encoder::Hf(tokenizer),
        };
        // Pieces are exact only where the fast encoder vouches for the pre-tokenizer.
        let piece_bytes = match &encoder {
            Encoder::Fast(f) if f.pieces_are_exact() => cfg.piece_bytes,
            _ => 0,
        };
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.threads
        };
        EncodePlan {
            encoder,
            fast_path_unavailable,
            piece_bytes,
            threads,
        }
    }
}

/// What the encoding pass counted.
#[derive(Default)]
struct Tally {
    documents: u64,
    tokens: u64,
    /// Input bytes read.
    bytes: u64,
    skipped_empty: u64,
    /// Documents the fast encoder handed to the HF encoder.
    hf_docs: u64,
}

/// A batch of documents, with the reader's running counts of bytes read and empty documents
/// skipped when it was sent.
type Batch = (Vec<Doc>, u64, u64);

/// The reader thread: batches of documents into `tx` until the inputs end (an empty batch
/// may mark the end) or fail (the error ends the stream), or the receiver hangs up.
fn read_batches(
    cfg: &PrepareConfig,
    files: &[PathBuf],
    piece_bytes: usize,
    tx: mpsc::SyncSender<Result<Batch, PrepareError>>,
) {
    let mut reader = DocReader::new(files, cfg.split_by, &cfg.text_field, piece_bytes);
    loop {
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let end = loop {
            match reader.next_doc() {
                Ok(Some(doc)) => {
                    batch_bytes += doc.text.len();
                    batch.push(doc);
                    if batch.len() >= cfg.batch_docs.max(1) || batch_bytes >= cfg.batch_bytes {
                        break Ok(false);
                    }
                }
                Ok(None) => break Ok(true),
                Err(e) => break Err(e),
            }
        };
        match end {
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
            Ok(end) => {
                if (!batch.is_empty() || end) && tx.send(Ok((batch, reader.bytes, reader.skipped_empty))).is_err() {
                    return;
                }
                if end {
                    return;
                }
            }
        }
    }
}

/// Read, encode and write every document: the next batch is read on a thread while this one
/// is encoded (two batches in flight at most), so reading overlaps encoding.
fn encode_all(
    cfg: &PrepareConfig,
    files: &[PathBuf],
    plan: &EncodePlan,
    eod_id: u32,
    shards: &mut ShardWriter,
    progress: &mut Progress,
) -> Result<Tally, PrepareError> {
    let mut caches: Vec<WordCache> = (0..plan.threads).map(|_| WordCache::default()).collect();
    let mut tally = Tally::default();
    std::thread::scope(|scope| -> Result<(), PrepareError> {
        let (tx, rx) = mpsc::sync_channel::<Result<Batch, PrepareError>>(1);
        let piece_bytes = plan.piece_bytes;
        scope.spawn(move || read_batches(cfg, files, piece_bytes, tx));
        for msg in rx {
            let (batch, read, skipped) = msg?;
            tally.bytes = read;
            tally.skipped_empty = skipped;
            if batch.is_empty() {
                continue;
            }
            let encoded = plan.encoder.encode_batch(&batch, &mut caches, files)?;
            write_batch(&batch, &encoded, eod_id, shards, &mut tally)?;
            progress.update(tally.bytes, tally.documents, tally.tokens);
        }
        Ok(())
    })?;
    Ok(tally)
}

/// Write one batch's ids into the shards in document order, each document's last piece
/// followed by the end-of-document token.
fn write_batch(
    batch: &[Doc],
    encoded: &[Encoded],
    eod_id: u32,
    shards: &mut ShardWriter,
    tally: &mut Tally,
) -> Result<(), PrepareError> {
    let mut with_eod = Vec::new();
    let mut docs = batch.iter();
    for part in encoded {
        tally.hf_docs += part.hf_docs;
        let mut from = 0;
        for &end in &part.ends {
            let doc = docs.next().expect("one result per document");
            let ids = &part.ids[from..end];
            from = end;
            if doc.last {
                // The EOD token counts when deciding whether the document starts a shard.
                with_eod.clear();
                with_eod.extend_from_slice(ids);
                with_eod.push(eod_id);
                shards.add(&with_eod, doc.continued, true)?;
                tally.documents += 1;
            } else {
                shards.add(ids, doc.continued, false)?;
            }
            tally.tokens += ids.len() as u64 + u64::from(doc.last);
        }
    }
    Ok(())
}

fn prepare_into(cfg: &PrepareConfig, files: &[PathBuf], tmp: &Path) -> Result<PrepareReport, PrepareError> {
    let started = Instant::now();
    let mut progress = Progress::new(cfg.progress, input::total_bytes(files));
    let tok = dataset_tokenizer(cfg, files, tmp, &progress, started)?;
    let plan = EncodePlan::new(cfg, &tok.tokenizer);
    let encode_started = Instant::now();
    progress.restart();
    let mut shards = ShardWriter {
        dir: tmp,
        dtype: tok.dtype,
        shard_tokens: cfg.shard_tokens,
        compress: cfg.compress,
        current: None,
        done: Vec::new(),
    };
    let tally = encode_all(cfg, files, &plan, tok.eod_id, &mut shards, &mut progress)?;
    progress.finish();
    if tally.documents == 0 {
        return Err(PrepareError::NoDocuments);
    }
    shards.close()?;
    let manifest = Manifest::new(
        tok.dtype,
        tok.vocab_size,
        TokenizerInfo::File {
            path: TOKENIZER_FILE.into(),
        },
        shards.done,
    );
    manifest.write(tmp)?;
    let encode_seconds = encode_started.elapsed().as_secs_f64();
    let seconds = started.elapsed().as_secs_f64();
    let zstd_bytes = cfg.compress.map(|_| {
        manifest
            .shards
            .iter()
            .filter_map(|s| s.zstd.as_ref())
            .map(|z| z.bytes)
            .sum()
    });
    let Tally {
        documents,
        tokens,
        bytes,
        skipped_empty,
        hf_docs,
    } = tally;
    let report = PrepareReport {
        output: cfg.output.display().to_string(),
        files: files.len(),
        documents,
        skipped_empty,
        tokens,
        bytes,
        shards: manifest.shards.len(),
        vocab_size: tok.vocab_size,
        dtype: tok.dtype,
        eod_token: tok.eod_token,
        eod_id: tok.eod_id,
        trained_tokenizer: tok.trained,
        train_seconds: tok.train_seconds,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
        encode_mb_per_s: bytes as f64 / 1e6 / encode_seconds.max(1e-9),
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        threads: plan.threads,
        fast_path: matches!(plan.encoder, Encoder::Fast(_)),
        fast_path_unavailable: plan.fast_path_unavailable,
        hf_fallback_docs: hf_docs,
        zstd_bytes,
    };
    progress.message(&format!(
        "prepare: done: {:.1} MB, {documents} documents, {tokens} tokens, {} shard(s) in {seconds:.1}s ({:.2} MB/s)",
        bytes as f64 / 1e6,
        report.shards,
        report.mb_per_s
    ));
    Ok(report)
}
