//! A dataset's cache directory made ready for streaming: the manifest, every `.idx` and the
//! tokenizer in place (what opening the dataset and planning its reads need), the shards'
//! `.bin` left to the [`super::Streamer`].

use super::super::fetch::{check_listed, download, get_manifest, replace_if_different};
use super::super::retry::with_retry;
use super::super::{RemoteError, RemoteOptions, io_err, open_store};
use crate::manifest::{MANIFEST, Manifest, TokenizerInfo};
use crate::materialize::{check_existing, dataset_cache_dir, lock_cache_entry, remove_leftovers};
use gantry_checkpoint::Store;
use gantry_checkpoint::location::StorageLocation;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Where a shard's `.bin` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// The `.bin` object itself.
    Bin,
    /// Its zstd frames and frame index (a compressed-only dataset), decompressed on arrival.
    Frames {
        zst: String,
        zst_bytes: u64,
        zst_xxh3: String,
        zidx: String,
        zidx_bytes: u64,
        zidx_xxh3: String,
    },
}

/// A dataset at an `s3://` location, ready to be streamed into `dir` (see the module
/// documentation): what [`prepare_stream`] returns and [`super::Streamer::start`] takes.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamDir {
    pub location: StorageLocation,
    /// `CACHE/<fingerprint>/`.
    pub dir: PathBuf,
    pub fingerprint: u64,
    pub manifest: Manifest,
    pub(super) origins: Vec<Origin>,
    /// Bytes of the files kept whatever the budget: the manifest, the `.idx` files and the
    /// tokenizer.
    pub fixed_bytes: u64,
    /// Files this call fetched (the `.idx` files missing or damaged in the cache).
    pub fetched: Vec<String>,
    pub seconds: f64,
}

impl StreamDir {
    pub fn shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Where shard `shard`'s `.bin` goes.
    pub fn bin(&self, shard: usize) -> PathBuf {
        self.dir.join(format!("{}.bin", self.manifest.shards[shard].prefix))
    }

    pub(super) fn idx(&self, shard: usize) -> PathBuf {
        self.dir.join(format!("{}.idx", self.manifest.shards[shard].prefix))
    }

    /// The object shard `shard`'s bytes are fetched from (its `.bin`, or its `.bin.zst`).
    pub fn object(&self, shard: usize) -> String {
        match &self.origins[shard] {
            Origin::Bin => self
                .location
                .child(&format!("{}.bin", self.manifest.shards[shard].prefix)),
            Origin::Frames { zst, .. } => self.location.child(zst),
        }
    }

    /// Bytes shard `shard` takes in the cache while it is fetched (a compressed shard's
    /// frames and index sit next to its `.bin` until it is decompressed).
    pub fn cost(&self, shard: usize) -> u64 {
        let bin = self.manifest.shards[shard].bin_bytes;
        match &self.origins[shard] {
            Origin::Bin => bin,
            Origin::Frames {
                zst_bytes, zidx_bytes, ..
            } => bin + zst_bytes + zidx_bytes,
        }
    }

    /// Bytes of every shard's `.bin` and of the fixed files: the whole dataset in the cache.
    pub fn total_bytes(&self) -> u64 {
        self.fixed_bytes + self.manifest.shards.iter().map(|s| s.bin_bytes).sum::<u64>()
    }
}

/// Make `CACHE/<fingerprint>/` (under `cache_root`) ready to stream the dataset at the S3
/// `location`: one GET of the manifest, one listing of the prefix (every object the manifest
/// names must be there with its size), then, holding the entry's `fetch.lock` (the one a
/// complete fetch holds, so the ranks of a host do this once), the temporary files of killed
/// fetches removed, each `.idx` that is missing or does not match the manifest fetched and
/// checked as [`super::super::fetch`] does, the tokenizer, and `manifest.json` last.
pub fn prepare_stream(
    location: &StorageLocation,
    cache_root: &Path,
    opts: &RemoteOptions,
) -> Result<StreamDir, RemoteError> {
    let started = Instant::now();
    if location.is_local() {
        return Err(RemoteError::NotRemote {
            location: location.to_string(),
        });
    }
    let store = open_store(location, opts)?;
    let remote = get_manifest(&store, location, opts)?;
    let dir = dataset_cache_dir(cache_root, remote.fingerprint);
    let _lock = lock_cache_entry(&dir.join("fetch"))?;
    // What killed fetches left behind goes now, before the budget counts it.
    super::super::cache::sweep_partials(&dir)?;
    let listed: HashMap<String, u64> = with_retry(&opts.retry, &location.to_string(), || store.list(""))?
        .into_iter()
        .collect();
    let manifest = remote.manifest;
    let mut origins = Vec::with_capacity(manifest.shards.len());
    let mut fixed = remote.raw.len() as u64;
    for s in &manifest.shards {
        let bin = format!("{}.bin", s.prefix);
        let idx = format!("{}.idx", s.prefix);
        check_listed(location, &listed, &idx, s.idx_bytes)?;
        origins.push(match (&s.zstd, listed.contains_key(&bin)) {
            (_, true) => {
                check_listed(location, &listed, &bin, s.bin_bytes)?;
                Origin::Bin
            }
            (Some(z), false) => {
                check_listed(location, &listed, &z.file, z.bytes)?;
                check_listed(location, &listed, &z.index, z.index_bytes)?;
                Origin::Frames {
                    zst: z.file.clone(),
                    zst_bytes: z.bytes,
                    zst_xxh3: z.xxh3.clone(),
                    zidx: z.index.clone(),
                    zidx_bytes: z.index_bytes,
                    zidx_xxh3: z.index_xxh3.clone(),
                }
            }
            (None, false) => {
                return Err(RemoteError::MissingObject {
                    object: location.child(&bin),
                });
            }
        });
        fixed += s.idx_bytes;
    }
    let mut fetched = index_files(&store, opts, location, &dir, &manifest)?;
    if let TokenizerInfo::File { path } = &manifest.tokenizer {
        let object = location.child(path);
        let bytes = with_retry(&opts.retry, &object, || store.get(path))?
            .ok_or_else(|| RemoteError::MissingObject { object: object.clone() })?;
        if replace_if_different(&dir.join(path), &bytes)? {
            fetched.push(path.clone());
        }
        fixed += bytes.len() as u64;
    }
    // Last: with the manifest in place the directory opens as a dataset.
    replace_if_different(&dir.join(MANIFEST), &remote.raw)?;
    Ok(StreamDir {
        location: location.clone(),
        dir,
        fingerprint: remote.fingerprint,
        manifest,
        origins,
        fixed_bytes: fixed,
        fetched,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Make every shard's `.idx` in `dir` match the manifest: each checked, and fetched when it
/// is missing or does not match, `concurrency` files at a time (a dataset of many small
/// shards has as many `.idx` files, and each is a round trip). The names fetched, in shard
/// order.
fn index_files(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    manifest: &Manifest,
) -> Result<Vec<String>, RemoteError> {
    let next = AtomicUsize::new(0);
    let shards = &manifest.shards;
    let one = |i: usize| -> Result<Option<String>, RemoteError> {
        let s = &shards[i];
        let idx = format!("{}.idx", s.prefix);
        let dest = dir.join(&idx);
        let Some(why) = check_existing(&dest, s.idx_bytes, &s.idx_xxh3)? else {
            return Ok(None);
        };
        if why != "missing" {
            tracing::warn!(file = %dest.display(), why, "cached copy does not match the manifest; fetching it again");
            std::fs::remove_file(&dest).map_err(io_err(&dest))?;
        }
        remove_leftovers(&dest)?;
        download(
            store,
            opts,
            &location.child(&idx),
            &idx,
            &dest,
            s.idx_bytes,
            &s.idx_xxh3,
        )?;
        Ok(Some(idx))
    };
    let threads = opts.concurrency.clamp(1, shards.len().max(1));
    let results: Vec<Result<Vec<(usize, String)>, RemoteError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= shards.len() {
                            return Ok(got);
                        }
                        if let Some(name) = one(i).inspect_err(|_| next.store(shards.len(), Ordering::Relaxed))? {
                            got.push((i, name));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    let mut fetched = Vec::new();
    for r in results {
        fetched.extend(r?);
    }
    fetched.sort_unstable();
    Ok(fetched.into_iter().map(|(_, name)| name).collect())
}
