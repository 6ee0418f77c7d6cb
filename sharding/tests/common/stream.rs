//! The setup the streaming tests share: a real S3 server (s3s-fs), a small synthetic dataset
//! uploaded to it, and readers that walk a rank's steps through a dataset.

use super::s3_server::S3Server;
use gantry_checkpoint::location::{Role, StorageLocation};
use gantry_checkpoint::{S3Options, Store, StoreConfig};
use gantry_sharding::frames::ZstdOptions;
use gantry_sharding::gpt::{GptDataset, OpenOptions, Split};
use gantry_sharding::remote::{RemoteOptions, Retry, StreamConfig, StreamDir, Streamer, upload};
use gantry_sharding::sampler::Sampler;
use gantry_sharding::synth::{SynthConfig, synthesize_with};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const SEQ: usize = 31;

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-stream-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Options for `server`: short retries, small ranged GETs, and block checksums of 64 bytes
/// (about one sample of [`SEQ`] + 1 two-byte tokens, as the default is for real sequences).
pub fn options(server: &S3Server) -> RemoteOptions {
    RemoteOptions {
        range_bytes: 16 << 10,
        block_bytes: 64,
        retry: Retry {
            deadline: Duration::from_secs(3),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        },
        ..RemoteOptions::with_s3(S3Options {
            endpoint: Some(server.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key: Some(server.access_key.clone()),
            secret_key: Some(server.secret_key.clone()),
            ..S3Options::default()
        })
    }
}

/// About 100 shards of 2500 tokens (5 KB each), with zstd frames when asked.
pub fn synth(dir: &Path, zstd: bool) -> PathBuf {
    let out = dir.join("ds");
    let cfg = SynthConfig {
        tokens: 240_000,
        seed: 3,
        shard_tokens: 2500,
        doc_tokens: 300,
        ..SynthConfig::default()
    };
    let z = ZstdOptions {
        level: 1,
        frame_bytes: 1 << 10,
    };
    synthesize_with(&out, &cfg, zstd.then_some(&z)).unwrap();
    out
}

/// A server holding the synthetic dataset (no zstd) at `s3://BUCKET/ds`, and its local copy.
pub struct Uploaded {
    /// `None` once a test has stopped it.
    pub server: Option<S3Server>,
    pub dir: PathBuf,
    pub local: PathBuf,
    pub opts: RemoteOptions,
    pub loc: StorageLocation,
}

impl Uploaded {
    pub fn new(tag: &str) -> Uploaded {
        let server = S3Server::start();
        let dir = tempdir(tag);
        let local = synth(&dir, false);
        let opts = options(&server);
        let loc = StorageLocation::parse_as(&format!("s3://{}/ds", server.bucket), Role::Dataset).unwrap();
        upload(&local, &loc, &opts).unwrap();
        Uploaded {
            server: Some(server),
            dir,
            local,
            opts,
            loc,
        }
    }

    /// The dataset's store, keys relative to its prefix.
    pub fn store(&self) -> Store {
        Store::open_location(&self.loc, &self.opts.s3, StoreConfig::default()).unwrap()
    }

    /// The local copy, read in place.
    pub fn here(&self) -> GptDataset {
        GptDataset::open_with(&self.local, SEQ, Split::All, &OpenOptions::default()).unwrap()
    }
}

impl Drop for Uploaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn sum_of_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Every sample of `steps` steps of rank `rank` of `dp`, through `ds`, in step order, each
/// step announced to the dataset first (as the prefetch thread does).
pub fn read_steps(
    ds: &GptDataset,
    sampler: &Sampler,
    rank: usize,
    dp: usize,
    steps: u64,
    each: impl Fn(u64),
) -> Vec<i64> {
    let mut cursor = sampler.start(ds.data().fingerprint());
    let mut out = Vec::new();
    for step in 0..steps {
        ds.data().reading(step);
        out.extend(ds.micro_batch(sampler, &cursor, rank, dp, 1, 0).unwrap().tokens);
        each(step);
        cursor.advance(1).unwrap();
    }
    out
}

/// Start streaming `prepared` with `cfg` and open its dataset (samples of [`SEQ`] tokens)
/// through the stream's shards, as a rank does.
pub fn open_streamed(prepared: StreamDir, opts: RemoteOptions, cfg: StreamConfig) -> (Streamer, Arc<GptDataset>) {
    let cached = prepared.dir.clone();
    let streamer = Streamer::start(prepared, opts, cfg).unwrap();
    let open = OpenOptions {
        shards: Some(streamer.shards()),
        ..OpenOptions::default()
    };
    let ds = Arc::new(GptDataset::open_with(&cached, SEQ, Split::All, &open).unwrap());
    (streamer, ds)
}

/// Make `streamer` follow rank `rank` of `dp` reading `ds` with `sampler` from step 0, as
/// the trainer does (holding the dataset weakly).
pub fn follow(streamer: &Streamer, ds: &Arc<GptDataset>, sampler: &Sampler, rank: usize, dp: usize) {
    let start = sampler.start(ds.data().fingerprint());
    let (weak, sampler) = (Arc::downgrade(ds), sampler.clone());
    streamer.follow(
        0,
        Box::new(move |step| {
            let Some(ds) = weak.upgrade() else {
                return Ok(Vec::new());
            };
            let mut c = start.clone();
            c.advance(step).map_err(|e| e.to_string())?;
            ds.step_shards(&sampler, &c, rank, dp, 1).map_err(|e| e.to_string())
        }),
    );
}
