//! `gantry data …`: thin wiring over `gantry_sharding`; where a dataset location resolves on
//! this host is `dataset_location.rs`.

use crate::checkpoint_cmd::S3Args;
use crate::dataset_location::{
    data_cache_root, dataset_dir, parse_dataset_location, staging_for, upload_summary, upload_to,
};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gantry_bench::data_reader::{
    FrameBench, MaterializeBench, ReadBench, bench_frames, bench_materialize, bench_reader,
};
use gantry_checkpoint::location::StorageLocation;
use gantry_sharding::frames::ZstdOptions;
use gantry_sharding::gpt::{FrameMode, GptDataset, OpenOptions, Split, TokenDataset, TokenSource};
use gantry_sharding::manifest::{Manifest, TokenizerInfo};
use gantry_sharding::prepare::{PrepareConfig, ProgressMode, SplitBy, TokenizerSource, decode_with, prepare};
use gantry_sharding::sampler::Span;
use gantry_sharding::synth::{SynthConfig, synthesize_with};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write synthetic token shards whose entropy rate is known exactly.
    ///
    /// The tokens come from a seeded Markov chain (next = current + k mod V, k drawn from a
    /// fixed distribution over `--support` offsets); its entropy rate, the lowest loss any
    /// model can reach on it, is written to manifest.json as entropy_nats_per_token.
    Synth(SynthArgs),
    /// Summarize a dataset directory, verify its checksums and indexes, show a sample.
    Inspect(InspectArgs),
    /// Tokens per second one reader delivers as ready batches (warm page cache), next to a
    /// plain memcpy of the same bytes measured in the same run; with --zstd also from the
    /// zstd frames (batches through the frame cache, raw frame decompression, and
    /// materializing the frames into a local .bin then reading batches from it).
    Bench(BenchArgs),
    /// Tokenize text files into token shards (train a byte-level BPE or load a tokenizer.json).
    ///
    /// Inputs are files or directories (searched recursively, in sorted order) of plain text
    /// (`.txt`) and JSON lines (`.jsonl` / `.json`, the text in `--text-field`). Text files are
    /// cut into documents per file, per blank-line-separated block or per line; every JSON record
    /// is a document. Each document ends with the end-of-document token (`<|endoftext|>` unless
    /// `--eod-token` names another) and never spans two shards.
    ///
    /// With `--vocab-size` a byte-level BPE is trained on the inputs first (one extra pass);
    /// with `--tokenizer` a Hugging Face tokenizer.json is used as is. Either way it is saved as
    /// tokenizer.json next to the shards and named in manifest.json. Byte-level BPE tokenizers
    /// are encoded by gantry's fast path (the same ids as the HF encoder) on every core.
    /// `--input -` reads standard input as one stream (text cut per --split-by, or JSON lines
    /// with --split-by record; needs --tokenizer). `--compress zstd` also writes each shard's
    /// tokens as independent zstd frames with a frame index, listed in manifest.json. The
    /// directory is built under a temporary name and renamed when complete. Progress goes to
    /// stderr: a bar on a terminal, a log line every ~2 s otherwise.
    ///
    /// Example: gantry data prepare --input corpus/ --output data/corpus --vocab-size 32000
    ///          cat corpus/*.txt | gantry data prepare --input - --output data/c2 --tokenizer data/corpus/tokenizer.json
    #[command(verbatim_doc_comment)]
    Prepare(PrepareArgs),
    /// Copy a finished local dataset to s3://bucket/prefix, manifest.json last.
    ///
    /// Every file is hashed against the manifest before it is sent (large ones go up as
    /// multipart uploads); manifest.json goes last, so a prefix without it is no dataset and
    /// readers never see half an upload. Rerunning an interrupted upload skips the files
    /// already there with the right size and checksum.
    Upload(UploadArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SplitArg {
    /// One document per file.
    File,
    /// One document per non-empty line.
    Line,
    /// Documents separated by blank lines.
    BlankLine,
    /// One document per JSON record (plain-text files: one per file).
    Record,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("tok").required(true).args(["vocab_size", "tokenizer"])))]
pub struct PrepareArgs {
    /// Input files and directories (.txt, .jsonl, .json).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Directory to create (must not exist), or s3://bucket/prefix (written to a temporary
    /// directory, then uploaded with manifest.json last).
    #[arg(long, value_parser = parse_dataset_location)]
    output: StorageLocation,
    /// Train a byte-level BPE with this many tokens (special tokens included) on the inputs.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Use this Hugging Face tokenizer.json instead of training one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// End-of-document token appended to every document [default: <|endoftext|>]; a loaded
    /// tokenizer must contain it.
    #[arg(long)]
    eod_token: Option<String>,
    /// Field of a JSON record that holds its text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// How plain-text files are cut into documents.
    #[arg(long, value_enum, default_value = "file")]
    split_by: SplitArg,
    /// Most tokens per shard (documents never split across shards).
    #[arg(long, default_value_t = 256 << 20)]
    shard_tokens: u64,
    /// Encoding threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Encode with the Hugging Face encoder even where gantry's fast path applies.
    #[arg(long)]
    no_fast: bool,
    #[command(flatten)]
    zstd: CompressArgs,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Compression {
    /// Independent zstd frames plus a frame index, next to the .bin/.idx.
    Zstd,
}

#[derive(Args)]
struct CompressArgs {
    /// Also write each shard's tokens compressed.
    #[arg(long, value_enum)]
    compress: Option<Compression>,
    /// zstd level.
    #[arg(long, default_value_t = 3, requires = "compress")]
    zstd_level: i32,
    /// Uncompressed bytes per zstd frame (a multiple of 8).
    #[arg(long, default_value_t = 4 << 20, requires = "compress")]
    zstd_frame_bytes: u64,
}

impl CompressArgs {
    fn options(&self) -> Result<Option<ZstdOptions>> {
        let Some(Compression::Zstd) = self.compress else {
            return Ok(None);
        };
        let opts = ZstdOptions {
            level: self.zstd_level,
            frame_bytes: self.zstd_frame_bytes,
        };
        opts.validate()
            .map_err(anyhow::Error::msg)
            .context("invalid zstd settings")?;
        Ok(Some(opts))
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Dataset directory (with manifest.json), or s3://bucket/prefix (fetched into the data
    /// cache first).
    #[arg(value_parser = parse_dataset_location)]
    location: StorageLocation,
    /// The directory read: the location itself, or its copy in the data cache.
    #[arg(skip)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// How long to read.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also read from the zstd frames (the dataset must have them): batches through the frame
    /// cache, the raw decompression rate, and the time to materialize the frames into a
    /// local .bin (in a fresh directory under the cache root, removed afterwards) followed by
    /// batches read from it, next to the uncompressed figure.
    #[arg(long)]
    zstd: bool,
    /// Decompressed frames each zstd shard keeps (the frame-cache reader).
    #[arg(long, default_value_t = 16)]
    cache_frames: usize,
    /// Root of the materialized-shard cache [default: $GANTRY_DATA_CACHE, else
    /// $TMPDIR/gantry-data-cache].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Threads decompressing frames when materializing (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Directory to create (must not exist; built under a temporary name, then renamed), or
    /// s3://bucket/prefix (written to a temporary directory, then uploaded, manifest.json last).
    #[arg(long, value_parser = parse_dataset_location)]
    output: StorageLocation,
    /// Number of tokens to generate.
    #[arg(long)]
    tokens: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    vocab_size: u32,
    /// Offsets reachable from each token (more = higher entropy).
    #[arg(long, default_value_t = 32)]
    support: u32,
    /// Tokens per document.
    #[arg(long, default_value_t = 2048)]
    doc_tokens: u32,
    /// Tokens per shard.
    #[arg(long, default_value_t = 64 << 20)]
    shard_tokens: u64,
    #[command(flatten)]
    zstd: CompressArgs,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Args)]
pub struct UploadArgs {
    /// A finished local dataset directory (with manifest.json).
    dir: PathBuf,
    /// Where to: s3://bucket/prefix.
    #[arg(value_parser = parse_dataset_location)]
    location: StorageLocation,
    /// Files uploaded at once (each large one also in parallel parts).
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Dataset directory (with manifest.json), or s3://bucket/prefix (fetched into the data
    /// cache first, every byte checked against the manifest).
    #[arg(value_parser = parse_dataset_location)]
    location: StorageLocation,
    /// Skip re-hashing the shard files.
    #[arg(long)]
    no_verify: bool,
    /// Tokens of the first document to show.
    #[arg(long, default_value_t = 32)]
    sample: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

pub fn run(cmd: DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Synth(a) => synth(a),
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Bench(a) => bench(a),
        DataCommand::Prepare(a) => prepare_cmd(a),
        DataCommand::Upload(a) => upload_cmd(a),
    }
}

fn upload_cmd(a: UploadArgs) -> Result<ExitCode> {
    if a.location.is_local() {
        bail!(
            "{} is a local directory: `gantry data upload` writes to s3://bucket/prefix (copy local datasets with cp -r)",
            a.location
        );
    }
    let u = upload_to(&a.dir, &a.location, &a.s3, a.files)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&u)?);
    } else {
        println!("{}", upload_summary(&u));
    }
    Ok(ExitCode::SUCCESS)
}

fn prepare_cmd(a: PrepareArgs) -> Result<ExitCode> {
    let tokenizer = match (a.vocab_size, a.tokenizer) {
        (Some(vocab_size), None) => TokenizerSource::TrainBpe { vocab_size },
        (None, Some(path)) => TokenizerSource::File(path),
        _ => bail!("give exactly one of --vocab-size and --tokenizer"),
    };
    // An s3:// output is built in a staging directory, then uploaded.
    let staging = staging_for(&a.output, &a.s3)?;
    let local_out = match (&a.output, &staging) {
        (StorageLocation::Local(dir), _) => dir.clone(),
        (_, Some(s)) => s.dataset(),
        (_, None) => unreachable!("a staging directory for every remote output"),
    };
    let mut cfg = PrepareConfig::new(a.input, local_out.clone(), tokenizer);
    cfg.eod_token = a.eod_token;
    cfg.text_field = a.text_field;
    cfg.split_by = match a.split_by {
        SplitArg::File => SplitBy::File,
        SplitArg::Line => SplitBy::Line,
        SplitArg::BlankLine => SplitBy::BlankLine,
        SplitArg::Record => SplitBy::Record,
    };
    cfg.shard_tokens = a.shard_tokens;
    cfg.threads = a.threads;
    cfg.fast = !a.no_fast;
    cfg.compress = a.zstd.options()?;
    cfg.progress = ProgressMode::Auto;
    let mut r = prepare(&cfg).with_context(|| format!("preparing {}", a.output))?;
    let uploaded = match &staging {
        Some(_) => {
            r.output = a.output.to_string();
            Some(upload_to(&local_out, &a.output, &a.s3, 4)?)
        }
        None => None,
    };
    if a.json {
        let mut report = serde_json::to_value(&r)?;
        if let (Some(u), Some(map)) = (&uploaded, report.as_object_mut()) {
            map.insert("upload".into(), serde_json::to_value(u)?);
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {} documents, {} tokens ({:?}, vocabulary {}) in {} shard(s) to {} from {} file(s), {:.1} MB in {:.2}s ({:.2} MB/s on {} thread(s), {:.2}M tokens/s, {}){}{}",
            r.documents,
            r.tokens,
            r.dtype,
            r.vocab_size,
            r.shards,
            r.output,
            r.files,
            r.bytes as f64 / 1e6,
            r.seconds,
            r.mb_per_s,
            r.threads,
            r.tokens_per_s / 1e6,
            match &r.fast_path_unavailable {
                None => "fast byte-level BPE".to_string(),
                Some(why) => format!("HF encoder: fast path {why}"),
            },
            r.zstd_bytes
                .map(|b| format!("; zstd frames {:.1} MB", b as f64 / 1e6))
                .unwrap_or_default(),
            if r.trained_tokenizer {
                format!("; tokenizer trained in {:.2}s", r.train_seconds)
            } else {
                String::new()
            }
        );
        if let Some(u) = &uploaded {
            println!("{}", upload_summary(u));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn synth(a: SynthArgs) -> Result<ExitCode> {
    let cfg = SynthConfig {
        tokens: a.tokens,
        seed: a.seed,
        vocab_size: a.vocab_size,
        support: a.support,
        doc_tokens: a.doc_tokens,
        shard_tokens: a.shard_tokens,
    };
    cfg.validate().map_err(anyhow::Error::msg).context("invalid settings")?;
    let zstd = a.zstd.options()?;
    let started = Instant::now();
    // An s3:// output is built in a staging directory, then uploaded.
    let staging = staging_for(&a.output, &a.s3)?;
    let local_out = match (&a.output, &staging) {
        (StorageLocation::Local(dir), _) => dir.clone(),
        (_, Some(s)) => s.dataset(),
        (_, None) => unreachable!("a staging directory for every remote output"),
    };
    let manifest = synthesize_with(&local_out, &cfg, zstd.as_ref()).with_context(|| format!("writing {}", a.output))?;
    let secs = started.elapsed().as_secs_f64();
    let uploaded = match &staging {
        Some(_) => Some(upload_to(&local_out, &a.output, &a.s3, 4)?),
        None => None,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
        if let Some(u) = &uploaded {
            eprintln!("{}", upload_summary(u));
        }
    } else {
        println!(
            "wrote {} tokens in {} shard(s) to {} in {secs:.2}s ({:.1}M tokens/s); entropy rate {:.4} nats/token",
            manifest.tokens,
            manifest.shards.len(),
            a.output,
            manifest.tokens as f64 / secs / 1e6,
            manifest.entropy_nats_per_token.unwrap_or(f64::NAN)
        );
        if let Some(u) = &uploaded {
            println!("{}", upload_summary(u));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct InspectReport<'a> {
    dir: String,
    /// For an `s3://` dataset: its checked copy in the host's data cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_dir: Option<String>,
    manifest: &'a Manifest,
    verified: bool,
    sample_tokens: Vec<i64>,
    sample_text: Option<String>,
}

fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let dir = dataset_dir(&a.location, &a.s3.options(), &data_cache_root(), false)?;
    let manifest = Manifest::read(&dir)?;
    // A fetched copy was checked against the manifest byte for byte on its way in (and holds
    // only the files training reads: a compressed dataset's frames stay in S3).
    if !a.no_verify && a.location.is_local() {
        manifest.verify(&dir).context("verification failed")?;
    }
    if manifest.shards.is_empty() {
        bail!("{}: the manifest lists no shards", a.location)
    }
    let sample = first_tokens(&dir, a.sample)?;
    let report = InspectReport {
        dir: a.location.to_string(),
        cache_dir: (!a.location.is_local()).then(|| dir.display().to_string()),
        manifest: &manifest,
        verified: !a.no_verify,
        sample_text: sample_text(&dir, &manifest, &sample),
        sample_tokens: sample,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_inspect(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Up to `n` tokens of the dataset's first document. Read through the frame cache from the
/// .bin where present, else from the zstd frames (compressed-only copies): a sample needs a
/// few frames, not a local copy.
fn first_tokens(dir: &std::path::Path, n: usize) -> Result<Vec<i64>> {
    let data = TokenDataset::open_with(dir, &OpenOptions::lru(TokenSource::Auto, 4))
        .with_context(|| format!("opening {}", dir.display()))?;
    let first_len = data.document_lengths()?.first().copied().unwrap_or(0);
    let mut sample = Vec::new();
    let span = Span {
        doc: 0,
        offset: 0,
        len: first_len.min(u32::try_from(n).unwrap_or(u32::MAX)),
    };
    data.read_span(span, &mut sample)?;
    Ok(sample)
}

/// The sample as text where the dataset's tokenizer can say (a warning, not a failure, when
/// its tokenizer file cannot decode it).
fn sample_text(dir: &std::path::Path, manifest: &Manifest, sample: &[i64]) -> Option<String> {
    match &manifest.tokenizer {
        TokenizerInfo::Bytes => {
            Some(String::from_utf8_lossy(&sample.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned())
        }
        TokenizerInfo::File { path } => {
            let ids: Vec<u32> = sample.iter().map(|&t| t as u32).collect();
            match decode_with(&dir.join(path), &ids) {
                Ok(text) => Some(text),
                Err(e) => {
                    eprintln!("warning: cannot show the sample as text: {e}");
                    None
                }
            }
        }
        TokenizerInfo::Synthetic { .. } => None,
    }
}

/// The report for a person: sizes, tokenizer, compression, entropy, verification, sample.
fn print_inspect(report: &InspectReport) {
    let m = report.manifest;
    println!(
        "{}: {} v{}, {:?} tokens, vocabulary {}{}",
        report.dir,
        m.format,
        m.format_version,
        m.dtype,
        m.vocab_size,
        m.max_token_id
            .map(|id| format!(" (largest id {id})"))
            .unwrap_or_default()
    );
    println!(
        "  {} shard(s), {} documents, {} sequences, {} tokens",
        m.shards.len(),
        m.documents,
        m.sequences,
        m.tokens
    );
    println!("  tokenizer: {:?}", m.tokenizer);
    let zstd: Vec<_> = m.shards.iter().filter_map(|s| s.zstd.as_ref()).collect();
    if !zstd.is_empty() {
        let bin: u64 = m.shards.iter().filter(|s| s.zstd.is_some()).map(|s| s.bin_bytes).sum();
        let packed: u64 = zstd.iter().map(|z| z.bytes).sum();
        println!(
            "  zstd frames: {} of {} shard(s), {} frames, {:.1} MB for {:.1} MB of tokens ({:.2}x)",
            zstd.len(),
            m.shards.len(),
            zstd.iter().map(|z| z.frames).sum::<u64>(),
            packed as f64 / 1e6,
            bin as f64 / 1e6,
            bin as f64 / packed.max(1) as f64
        );
    }
    if let Some(h) = m.entropy_nats_per_token {
        println!("  entropy rate: {h:.4} nats/token (the loss floor for a perfect model)");
    }
    println!(
        "  checksums and indexes: {}",
        match (&report.cache_dir, report.verified) {
            (Some(_), _) => "verified while fetching into the data cache (size and xxh3 of every file)",
            (None, true) => "verified (zstd frames: files hashed and decompressed to the .bin's checksum)",
            (None, false) => "not checked (--no-verify)",
        }
    );
    if let Some(cache) = &report.cache_dir {
        println!("  local copy: {cache}");
    }
    println!("  first tokens: {:?}", report.sample_tokens);
    if let Some(t) = &report.sample_text {
        println!("  as text: {t:?}");
    }
}

fn bench(mut a: BenchArgs) -> Result<ExitCode> {
    if a.batch == 0 || a.seq_len == 0 || a.seconds.is_nan() || a.seconds <= 0.0 {
        bail!("--batch and --seq-len must be at least 1 and --seconds positive");
    }
    let root = a.cache_dir.clone().unwrap_or_else(data_cache_root);
    a.dir = dataset_dir(&a.location, &a.s3.options(), &root, a.json)?;
    if a.zstd {
        let report = bench_zstd(&a)?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_zstd_bench(&a, &report);
        }
    } else {
        let r = bench_reader(
            &open_for_bench(&a, TokenSource::Auto, FrameMode::Materialize)?,
            a.batch,
            a.seconds,
            a.seed,
        )?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let label = match r.implementation {
                "gantry" => ".bin",
                "gantry-materialized" => ".bin materialized from zstd frames",
                _ => "zstd frames",
            };
            print_read_bench(&a.dir, label, &r);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `gantry data bench --zstd` measures, in the order it prints.
#[derive(serde::Serialize)]
struct ZstdBench {
    uncompressed: Option<ReadBench>,
    zstd: ReadBench,
    zstd_decode: FrameBench,
    zstd_materialize: MaterializeBench,
    materialized: ReadBench,
}

fn open_for_bench(a: &BenchArgs, source: TokenSource, frames: FrameMode) -> Result<GptDataset> {
    let opts = OpenOptions {
        source,
        frames,
        cache_frames: a.cache_frames,
        cache_dir: Some(a.cache_dir.clone().unwrap_or_else(data_cache_root)),
        threads: a.threads,
        vocab_size: None,
        shards: None,
    };
    GptDataset::open_with(&a.dir, a.seq_len, Split::All, &opts).with_context(|| format!("opening {}", a.dir.display()))
}

/// Batches from the .bin files (when every shard has one), through the frame cache, the raw
/// decompression rate, and materializing the frames into a fresh cache root then reading it.
fn bench_zstd(a: &BenchArgs) -> Result<ZstdBench> {
    let manifest = Manifest::read(&a.dir)?;
    let have_bin = manifest
        .shards
        .iter()
        .all(|s| a.dir.join(format!("{}.bin", s.prefix)).exists());
    let uncompressed = if have_bin {
        Some(bench_reader(
            &open_for_bench(a, TokenSource::Bin, FrameMode::Lru)?,
            a.batch,
            a.seconds,
            a.seed,
        )?)
    } else {
        None
    };
    let framed = open_for_bench(a, TokenSource::Zstd, FrameMode::Lru)?;
    let zstd = bench_reader(&framed, a.batch, a.seconds, a.seed)?;
    let zstd_decode = bench_frames(framed.data(), a.seconds)?;
    drop(framed);
    // A fresh cache root, so the copies are built (and timed), removed afterwards.
    let root = a
        .cache_dir
        .clone()
        .unwrap_or_else(data_cache_root)
        .join(format!("bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let measured = bench_materialize(&a.dir, a.seq_len, &root, a.threads)
        .with_context(|| format!("materializing {} under {}", a.dir.display(), root.display()))
        .and_then(|(ds, m)| Ok((bench_reader(&ds, a.batch, a.seconds, a.seed)?, m)));
    let _ = std::fs::remove_dir_all(&root);
    let (materialized, zstd_materialize) = measured?;
    Ok(ZstdBench {
        uncompressed,
        zstd,
        zstd_decode,
        zstd_materialize,
        materialized,
    })
}

fn print_read_bench(dir: &std::path::Path, label: &str, r: &ReadBench) {
    println!(
        "{} ({label}): {} samples of {} tokens in batches of {} in {:.2}s: {:.1}M tokens/s (one thread); \
         memcpy of the same bytes: {:.2} GB/s = {:.1}M tokens/s",
        dir.display(),
        r.samples,
        r.seq_len + 1,
        r.batch,
        r.seconds,
        r.tokens_per_s / 1e6,
        r.memcpy_gbps,
        r.memcpy_tokens_per_s / 1e6
    );
}

fn print_zstd_bench(a: &BenchArgs, r: &ZstdBench) {
    if let Some(bin) = &r.uncompressed {
        print_read_bench(&a.dir, ".bin", bin);
    }
    print_read_bench(
        &a.dir,
        &format!("zstd frames, {} cached per shard", a.cache_frames),
        &r.zstd,
    );
    let decode = &r.zstd_decode;
    println!(
        "{} (zstd decode): {} frames, {:.1} MB -> {:.1} MB ({:.2}x), {} pass(es) in {:.2}s: {:.2} GB/s = {:.1}M tokens/s (one thread)",
        a.dir.display(),
        decode.frames,
        decode.compressed_bytes as f64 / 1e6,
        decode.uncompressed_bytes as f64 / 1e6,
        decode.ratio,
        decode.passes,
        decode.seconds,
        decode.gbps,
        decode.tokens_per_s / 1e6
    );
    let made = &r.zstd_materialize;
    let per_core = match (made.cpu_seconds, made.mb_per_s_per_core) {
        (Some(cpu), Some(rate)) => format!(", {cpu:.2} CPU-s: {rate:.0} MB/s per core"),
        _ => String::new(),
    };
    println!(
        "{} (zstd materialize): {} shard(s), {:.1} MB on {} thread(s) in {:.2}s: {:.0} MB/s{per_core}; \
         reopen (size + xxh3 check) {:.2}s",
        a.dir.display(),
        made.shards,
        made.bytes as f64 / 1e6,
        made.threads,
        made.seconds,
        made.mb_per_s,
        made.reopen_seconds
    );
    print_read_bench(&a.dir, ".bin materialized from zstd frames", &r.materialized);
}
