//! `gantry data prepare`: text corpora → tokenizer → token shards.
//!
//! Inputs are `.txt` files (split into documents per file, per blank-line-separated block or
//! per line) and JSON-lines files (`.jsonl` / `.json`, one document per record, the text in a
//! configurable field), given as files or directories (searched recursively, in sorted order so
//! the output is deterministic). Documents are streamed: files are read line by line and
//! encoded in batches (in parallel, order preserved) while the next batch is being read.
//!
//! The tokenizer is either a Hugging Face `tokenizer.json` or a byte-level BPE trained on the
//! inputs (one extra pass). Either way it is stored as `tokenizer.json` next to the shards.
//! Every document ends with the end-of-document token. Everything is built through
//! [`build_atomically`], so an interrupted prepare leaves no directory that looks finished.

use crate::indexed::{IndexedError, IndexedSummary, IndexedWriter, TokenDType};
use crate::manifest::{Manifest, ManifestError, ShardInfo, TokenizerInfo, build_atomically};
use serde::Serialize;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
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
    /// Progress lines on stderr every ~2 s.
    pub progress: bool,
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
            progress: false,
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
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PrepareError + '_ {
    move |source| PrepareError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    JsonLines,
}

fn kind_of(path: &Path) -> Option<Kind> {
    match path.extension()?.to_str()? {
        "txt" => Some(Kind::Text),
        "jsonl" | "json" => Some(Kind::JsonLines),
        _ => None,
    }
}

/// The input files: explicit files in the order given (each must be .txt/.jsonl/.json),
/// directories searched recursively with their supported files in sorted order.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, PrepareError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PrepareError> {
        let mut entries = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(dir))?;
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out)?;
            } else if kind_of(&path).is_some() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(io(input))?;
        if meta.is_dir() {
            walk(input, &mut files)?;
        } else if kind_of(input).is_some() {
            files.push(input.clone());
        } else {
            return Err(PrepareError::Unsupported { path: input.clone() });
        }
    }
    if files.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(PrepareError::NoInputs {
            inputs: names.join(", "),
        });
    }
    Ok(files)
}

/// One document and the file it came from (index into the file list).
struct Doc {
    file: usize,
    text: String,
}

/// Streams the documents of the input files, line by line.
struct DocReader<'a> {
    files: &'a [PathBuf],
    split_by: SplitBy,
    text_field: &'a str,
    next_file: usize,
    current: Option<(usize, Kind, BufReader<File>)>,
    line_no: u64,
    buf: Vec<u8>,
    bytes: u64,
    skipped_empty: u64,
}

impl<'a> DocReader<'a> {
    fn new(files: &'a [PathBuf], split_by: SplitBy, text_field: &'a str) -> DocReader<'a> {
        DocReader {
            files,
            split_by,
            text_field,
            next_file: 0,
            current: None,
            line_no: 0,
            buf: Vec::new(),
            bytes: 0,
            skipped_empty: 0,
        }
    }

    /// The next line of the current file (with its line ending), or None at its end.
    fn line(&mut self) -> Result<Option<&str>, PrepareError> {
        let (file, _, reader) = self.current.as_mut().expect("a file is open");
        self.buf.clear();
        let n = reader
            .read_until(b'\n', &mut self.buf)
            .map_err(io(&self.files[*file]))?;
        if n == 0 {
            return Ok(None);
        }
        self.bytes += n as u64;
        self.line_no += 1;
        std::str::from_utf8(&self.buf)
            .map(Some)
            .map_err(|_| PrepareError::Utf8 {
                path: self.files[*file].clone(),
                line: self.line_no,
            })
    }

    fn next_doc(&mut self) -> Result<Option<Doc>, PrepareError> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                let reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(io(path))?);
                let kind = kind_of(path).unwrap_or(Kind::Text);
                self.current = Some((self.next_file, kind, reader));
                self.next_file += 1;
                self.line_no = 0;
            }
            let (file, kind) = self.current.as_ref().map(|(f, k, _)| (*f, *k)).expect("a file is open");
            let doc = match (kind, self.split_by) {
                (Kind::JsonLines, _) => self.json_record(file)?,
                (Kind::Text, SplitBy::File | SplitBy::Record) => {
                    let mut text = String::new();
                    while let Some(line) = self.line()? {
                        text.push_str(line);
                    }
                    self.current = None;
                    Some(text)
                }
                (Kind::Text, SplitBy::Line) => self.line()?.map(|line| {
                    let line = line.strip_suffix('\n').unwrap_or(line);
                    line.strip_suffix('\r').unwrap_or(line).to_string()
                }),
                (Kind::Text, SplitBy::BlankLine) => self.block()?,
            };
            match doc {
                None => self.current = None,
                Some(text) if text.is_empty() => self.skipped_empty += 1,
                Some(text) => return Ok(Some(Doc { file, text })),
            }
        }
    }

    /// The next blank-line-separated block, or None at the end of the file.
    fn block(&mut self) -> Result<Option<String>, PrepareError> {
        let mut text = String::new();
        while let Some(line) = self.line()? {
            if line.trim().is_empty() {
                if text.is_empty() {
                    continue;
                }
                break;
            }
            text.push_str(line);
        }
        if text.is_empty() {
            return Ok(None);
        }
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Ok(Some(text))
    }

    /// The text of the next record (blank lines are skipped), or None at the end of the file.
    fn json_record(&mut self, file: usize) -> Result<Option<String>, PrepareError> {
        loop {
            let field = self.text_field;
            let Some(line) = self.line()? else {
                return Ok(None);
            };
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| PrepareError::Json {
                path: self.files[file].clone(),
                line: self.line_no,
                message: e.to_string(),
            })?;
            return match value.get(field) {
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(PrepareError::MissingField {
                    path: self.files[file].clone(),
                    line: self.line_no,
                    field: field.to_string(),
                }),
            };
        }
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
    let mut reader = DocReader::new(files, cfg.split_by, &cfg.text_field);
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
    current: Option<(String, IndexedWriter, u64)>,
    done: Vec<ShardInfo>,
}

impl ShardWriter<'_> {
    fn add(&mut self, tokens: &[u32]) -> Result<(), PrepareError> {
        let len = tokens.len() as u64;
        if let Some((_, _, n)) = &self.current
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
        writer.add_document(tokens)?;
        *n += len;
        Ok(())
    }

    fn close(&mut self) -> Result<(), PrepareError> {
        if let Some((prefix, writer, _)) = self.current.take() {
            let summary: IndexedSummary = writer.finish()?;
            self.done.push(ShardInfo::describe(self.dir, &prefix, &summary)?);
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
    if cfg.output.exists() {
        return Err(PrepareError::OutputExists {
            path: cfg.output.clone(),
        });
    }
    let files = collect_inputs(&cfg.inputs)?;
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

fn prepare_into(cfg: &PrepareConfig, files: &[PathBuf], tmp: &Path) -> Result<PrepareReport, PrepareError> {
    let started = Instant::now();
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
            if cfg.progress {
                eprintln!(
                    "prepare: training a byte-level BPE (vocabulary {vocab_size}) on {} file(s)",
                    files.len()
                );
            }
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
    let dtype = TokenDType::for_vocab(vocab_size as usize);

    let encode_started = Instant::now();
    let mut shards = ShardWriter {
        dir: tmp,
        dtype,
        shard_tokens: cfg.shard_tokens,
        current: None,
        done: Vec::new(),
    };
    let (mut documents, mut tokens, mut bytes, mut skipped_empty) = (0u64, 0u64, 0u64, 0u64);
    let mut last_log = Instant::now();
    std::thread::scope(|scope| -> Result<(), PrepareError> {
        // Read the next batch while this one is encoded. The reader reports the bytes read so far
        // with each batch, and its error (if any) ends the stream.
        type Batch = (Vec<Doc>, u64, u64);
        let (tx, rx) = mpsc::sync_channel::<Result<Batch, PrepareError>>(2);
        scope.spawn(move || {
            let mut reader = DocReader::new(files, cfg.split_by, &cfg.text_field);
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
                        if (!batch.is_empty() || end)
                            && tx.send(Ok((batch, reader.bytes, reader.skipped_empty))).is_err()
                        {
                            return;
                        }
                        if end {
                            return;
                        }
                    }
                }
            }
        });
        for msg in rx {
            let (batch, read, skipped) = msg?;
            bytes = read;
            skipped_empty = skipped;
            if batch.is_empty() {
                continue;
            }
            let first_file = batch[0].file;
            let texts: Vec<String> = batch.into_iter().map(|d| d.text).collect();
            let encodings = tokenizer.encode_batch(texts, false).map_err(|e| PrepareError::Encode {
                path: files[first_file].clone(),
                message: e.to_string(),
            })?;
            let mut ids = Vec::new();
            for enc in &encodings {
                ids.clear();
                ids.extend_from_slice(enc.get_ids());
                ids.push(eod_id);
                shards.add(&ids)?;
                documents += 1;
                tokens += ids.len() as u64;
            }
            if cfg.progress && last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                let secs = encode_started.elapsed().as_secs_f64();
                eprintln!(
                    "prepare: {:.1} MB, {documents} documents, {tokens} tokens in {secs:.1}s ({:.2} MB/s, {:.0} documents/s, {:.2}M tokens/s)",
                    bytes as f64 / 1e6,
                    bytes as f64 / 1e6 / secs,
                    documents as f64 / secs,
                    tokens as f64 / 1e6 / secs
                );
            }
        }
        Ok(())
    })?;
    if documents == 0 {
        return Err(PrepareError::NoDocuments);
    }
    shards.close()?;
    let shard_infos = shards.done;
    let manifest = Manifest::new(
        dtype,
        vocab_size,
        TokenizerInfo::File {
            path: TOKENIZER_FILE.into(),
        },
        shard_infos,
    );
    manifest.write(tmp)?;
    let encode_seconds = encode_started.elapsed().as_secs_f64();
    let seconds = started.elapsed().as_secs_f64();
    let report = PrepareReport {
        output: cfg.output.display().to_string(),
        files: files.len(),
        documents,
        skipped_empty,
        tokens,
        bytes,
        shards: manifest.shards.len(),
        vocab_size,
        dtype,
        eod_token,
        eod_id,
        trained_tokenizer: trained,
        train_seconds,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
        encode_mb_per_s: bytes as f64 / 1e6 / encode_seconds.max(1e-9),
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
    };
    if cfg.progress {
        eprintln!(
            "prepare: done: {:.1} MB, {documents} documents, {tokens} tokens, {} shard(s) in {seconds:.1}s ({:.2} MB/s)",
            bytes as f64 / 1e6,
            report.shards,
            report.mb_per_s
        );
    }
    Ok(report)
}
