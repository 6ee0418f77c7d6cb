//! Datasets in object storage: `s3://bucket/prefix` holding the files of a dataset directory
//! (`manifest.json`, each shard's `.idx` and `.bin`, or its `.bin.zst` and `.zidx` for
//! compressed-only copies, and the tokenizer file), under the same names.
//!
//! - **Where**: a dataset location is a [`StorageLocation`] (the checkpoint location type, one
//!   parser for both: a local path, `file://…` or `s3://…`; any other scheme refused by name).
//! - **Writing** ([`upload`]): the files of a finished local dataset are uploaded (large ones
//!   as multipart uploads, through [`gantry_checkpoint::Store`]), every file hashed on the way
//!   and refused if it does not match the manifest, and `manifest.json` goes **last**: a
//!   prefix without a manifest is not a dataset, so an interrupted upload is never taken for
//!   a finished one. Each uploaded file leaves a small record (`.gantry-upload/NAME.json`:
//!   size and xxh3) after its object, so rerunning an interrupted upload skips the files
//!   already there with the right size and checksum; the records are removed once the
//!   manifest is up. Just before the manifest go the index pack ([`INDEX_PACK`]): every
//!   `.idx` back to back, so a streaming reader gets them in a few GETs rather than one per
//!   shard; and the block checksums ([`BLOCK_SUMS`], [`BlockSums`]): the xxh3 of every
//!   fixed-size block of every `.bin`, bound to the manifest by its fingerprint, so a reader
//!   can fetch and check byte ranges of a shard. A prefix that already holds a different
//!   manifest is refused.
//! - **Reading** ([`fetch`]): a dataset is copied into the host's data cache,
//!   `CACHE/<fingerprint>/` (the fingerprint is the xxh3 of `manifest.json`, the key sampler
//!   cursors, materialized shards and verdicts already use), which then is a dataset
//!   directory like any other. The `.idx` files come first, then the shard files, each by
//!   parallel ranged GETs, hashed in order as they arrive, written under a temporary name,
//!   fsynced and renamed only when size and xxh3 match the manifest; `manifest.json` is
//!   written last. Ranks of one host take a lock on the cache entry (the data cache's lock
//!   files, [`crate::materialize`]), so each file is fetched once per host. A cached file
//!   that no longer matches the manifest is fetched again. A finished copy is checked with
//!   [`crate::verify::check_on_host`], whose remembered verdict lets later opens skip all of
//!   this after one GET of the manifest.
//! - **Streaming** ([`prepare_stream`], [`Streamer`]): what training ranks do instead of a
//!   complete fetch. Only the manifest and the `.idx` files are fetched first (from the index
//!   pack when the prefix has one, each checked against the manifest; packing the samples
//!   needs every document's length, so all of them come before the first step), without a
//!   listing of the prefix unless a shard may come from its zstd frames, and kept in the
//!   cache as one file mapped once rather than a file per shard; the dataset
//!   opens with the streamer as its shard source, which fetches the shards in the order the
//!   rank's steps read them ([`Plan`], a pure state machine) and, with a budget, evicts them
//!   behind the readers; the ranks of a host share the cache through per-shard leases and
//!   reservations made under one lock (`cache.rs`). A streamed shard is renamed into place
//!   without an fsync where the kernel's boot id is known: its stamp names the boot, so after
//!   a host crash it is hashed again before it is used. A dataset whose shards do not fit its
//!   budget streams in **range mode** instead when its upload left block checksums: only the
//!   blocks of the bytes the coming steps read are fetched ([`RangePlan`], pure too),
//!   neighbouring ones in one ranged GET, each checked against its checksum, held in memory
//!   within the rank's share of the budget and released once the reader is past every step
//!   that reads them; nothing of a shard is written to disk, and a read waits only for the
//!   blocks of its own bytes. A global shuffle then costs about the bytes its samples read
//!   (rounded out to blocks) rather than whole shards per sample.
//! - **Faults** ([`Retry`]): transient failures (connection refused or reset, timeouts, 5xx,
//!   after object_store's own short retries) are retried with exponential backoff until a
//!   deadline, then reported naming the object. Permanent ones are reported at once, naming
//!   what is missing or refused: the manifest, the bucket, an object, the credentials.
//!
//! This crate reads no environment: S3 settings come in as [`S3Options`] and the cache root
//! as a path, from the binary.

mod ahead;
mod block_sums;
mod cache;
mod fetch;
mod plan;
mod ranges;
mod retry;
mod stream;
mod upload;

pub use block_sums::{BLOCK_BYTES, BLOCK_SUMS, BlockSums};
pub use fetch::{Fetched, RemoteManifest, fetch, read_manifest};
pub use plan::{Held, Plan, PlanConfig, PlanError};
pub use ranges::{Get, RangeConfig, RangePlan};
pub use retry::Retry;
pub use stream::{
    StepShards, StreamConfig, StreamDir, StreamSetup, StreamStats, Streamer, fetch_block_sums, prepare_stream,
};
pub use upload::{INDEX_PACK, UPLOAD_RECORDS, Uploaded, upload};

use crate::manifest::ManifestError;
use crate::materialize::MaterializeError;
use gantry_checkpoint::location::StorageLocation;
use gantry_checkpoint::{CheckpointError, S3Options, Store, StoreConfig};
use std::path::PathBuf;

/// How datasets are moved to and from object storage.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteOptions {
    /// Endpoint, region and credentials (the binary fills them from flags and `AWS_*`).
    pub s3: S3Options,
    /// Bytes per ranged GET when fetching.
    pub range_bytes: u64,
    /// Requests in flight at once (ranged GETs of one file, parts of one multipart upload).
    pub concurrency: usize,
    /// Files uploaded at once.
    pub upload_files: usize,
    /// Transient failures: backoff and deadline.
    pub retry: Retry,
    /// Threads hashing a fetched copy for the host's verdict (0: every core).
    pub threads: usize,
    /// Bytes per block of the block checksums an upload writes ([`BlockSums`]): the unit a
    /// stream in range mode fetches and checks, best near the bytes of one sample (a
    /// multiple of 8; rounded down to one).
    pub block_bytes: u32,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            s3: S3Options::default(),
            range_bytes: 8 << 20,
            concurrency: 8,
            upload_files: 4,
            retry: Retry::default(),
            threads: 0,
            block_bytes: BLOCK_BYTES,
        }
    }
}

impl RemoteOptions {
    /// The default options with these S3 settings.
    pub fn with_s3(s3: S3Options) -> RemoteOptions {
        RemoteOptions {
            s3,
            ..RemoteOptions::default()
        }
    }
}

/// What went wrong moving a dataset, naming the object, bucket, file or credentials at fault.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "{manifest} does not exist: {location} holds no finished dataset (not a gantry dataset, or its upload has not completed: rerun `gantry data upload`)"
    )]
    NoManifest { location: String, manifest: String },
    #[error("bucket {bucket:?} does not exist (dataset location {location})")]
    NoBucket { location: String, bucket: String },
    #[error(
        "{object}: access denied by the S3 server ({detail}); check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --access-key / --secret-key) and their rights on the bucket"
    )]
    Denied { object: String, detail: String },
    #[error("{object} is missing, but the manifest lists it")]
    MissingObject { object: String },
    #[error("{object} has {actual} bytes, but the manifest says {expected}")]
    Size { object: String, expected: u64, actual: u64 },
    #[error("{object}: the bytes fetched hash to xxh3 {actual}, but the manifest says {expected}")]
    Checksum {
        object: String,
        expected: String,
        actual: String,
    },
    #[error("{object}: S3 still failing after {attempts} attempts over {waited_s:.0} s, giving up: {last}")]
    GaveUp {
        object: String,
        attempts: u32,
        waited_s: f64,
        last: String,
    },
    #[error("{object}: {source}")]
    Store {
        object: String,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error(
        "{location} already holds a different dataset (its manifest.json differs from {dir}'s): upload to another prefix, or delete that one first"
    )]
    Exists { location: String, dir: PathBuf },
    #[error("{location} is a local directory: it is read in place, not fetched")]
    NotRemote { location: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Cache(#[from] MaterializeError),
    #[error("{object}: the fetch was stopped (the reader is shutting down)")]
    Stopped { object: String },
    #[error("shard {shard} ({object}) is still not in the data cache after waiting {waited_s:.0} s for it; giving up")]
    WaitTimeout {
        shard: usize,
        object: String,
        waited_s: f64,
    },
    #[error(
        "{dir}: no room in the data cache budget of {budget} bytes for {file} ({need} bytes): the cache holds {usage} bytes that this host's ranks still need (waited {waited_s:.0} s); raise data.cache_gb"
    )]
    CacheFull {
        dir: PathBuf,
        file: String,
        budget: u64,
        usage: u64,
        need: u64,
        waited_s: f64,
    },
    #[error(
        "{dir}: the data cache budget of {budget} bytes is too small: it must hold the manifest and the .idx files ({fixed} bytes) and, for each of {sharers} rank(s), a step's shards and room for one more; the smallest budget that can work is {min_budget} bytes: raise data.cache_gb"
    )]
    BudgetTooSmall {
        dir: PathBuf,
        budget: u64,
        fixed: u64,
        sharers: usize,
        min_budget: u64,
    },
    #[error(
        "{dir}: the data cache budget of {budget} bytes is too small: step {step} reads {shards} shard(s) taking {bytes} bytes in the cache, and each of {sharers} rank(s) needs that much beside the manifest, the .idx files and room for one more shard; the smallest budget that holds this step is {min_budget} bytes: raise data.cache_gb, write smaller shards or lower the global batch"
    )]
    BudgetBelowStep {
        dir: PathBuf,
        budget: u64,
        step: u64,
        shards: usize,
        bytes: u64,
        sharers: usize,
        min_budget: u64,
    },
    #[error("streaming {location}: {cause}")]
    Plan { location: String, cause: PlanError },
    #[error("{object}: {message}")]
    Shard { object: String, message: String },
    #[error("{object}: refused as the dataset's block checksums: {message}")]
    BlockSums { object: String, message: String },
    #[error(
        "{object}: block {block} of shard {shard} (bytes {start}..{end}) does not match its checksum in {sums}, fetched twice"
    )]
    BlockChecksum {
        object: String,
        shard: usize,
        block: usize,
        start: u64,
        end: u64,
        sums: String,
    },
    #[error("streaming {location}: which shards step {step} reads: {message}")]
    Needs {
        location: String,
        step: u64,
        message: String,
    },
}

fn io_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The store for a dataset location: keys relative to the dataset's prefix (or directory).
fn open_store(location: &StorageLocation, opts: &RemoteOptions) -> Result<Store, RemoteError> {
    let config = StoreConfig {
        concurrency: opts.concurrency.max(1),
        // `retry::with_retry` is the layer that waits out an outage, logging each wait.
        request_retry_timeout: Some(std::time::Duration::from_secs(2)),
        ..StoreConfig::default()
    };
    Store::open_location(location, &opts.s3, config).map_err(|source| RemoteError::Store {
        object: location.to_string(),
        source: Box::new(source),
    })
}

/// The bucket of an S3 location (empty for a local one).
fn bucket_of(location: &StorageLocation) -> String {
    match location {
        StorageLocation::S3 { bucket, .. } => bucket.clone(),
        StorageLocation::Local(_) => String::new(),
    }
}
