//! Uploading a finished local dataset directory to a dataset location, `manifest.json` last.
//!
//! Order and restart: every file the manifest names (and the tokenizer file) is hashed from
//! a read-only map and compared with the manifest before anything is sent, so a damaged
//! local copy is never published. Each file then goes up as one object (multipart when
//! large); after it, a record `.gantry-upload/NAME.json` (size and xxh3) says that object is
//! complete. The record is deleted before its object is (re)written, so a record is only
//! ever found next to the object it describes. A rerun of an interrupted upload skips each
//! file whose object has the right size and whose record has the right checksum, and sends
//! the rest. Only when every file is up is `manifest.json` written, then the records are
//! removed: readers see no dataset until it is whole.
//!
//! Just before the manifest goes the **index pack** ([`INDEX_PACK`]): every shard's `.idx`
//! back to back in manifest order, the sizes the manifest's. A streaming reader needs every
//! `.idx` before its first step, and with many small shards one GET per file is most of that
//! wait; the pack brings them in a few ranged GETs. It is no part of the dataset's checked
//! contents: a reader hashes each `.idx` cut from it against the manifest, and fetches one
//! that does not match (or every one, for a prefix uploaded without a pack) from its own
//! object. It is written again by every run that writes the manifest, so it is this
//! manifest's.
//!
//! After the pack go the **block checksums** ([`super::BLOCK_SUMS`]): the xxh3 of every
//! block of every `.bin` ([`RemoteOptions::block_bytes`]), bound to this manifest by its fingerprint, so a streaming
//! reader can fetch and check byte ranges of a shard ([`super::block_sums`]). A prefix that
//! already holds this dataset but no block checksums (uploaded before there were any) gets
//! them from a rerun.

use super::block_sums::{BLOCK_SUMS, BlockSums};
use super::retry::{no_bucket, with_retry};
use super::{RemoteError, RemoteOptions, bucket_of, io_err, open_store};
use crate::indexed::paths;
use crate::manifest::{MANIFEST, Manifest, ManifestError, TokenizerInfo};
use bytes::Bytes;
use gantry_checkpoint::Store;
use gantry_checkpoint::location::StorageLocation;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The prefix (under the dataset's) of the per-file records of an unfinished upload.
pub const UPLOAD_RECORDS: &str = ".gantry-upload";
/// The object (under the dataset's prefix) holding every `.idx`, back to back in manifest
/// order (see the module documentation).
pub const INDEX_PACK: &str = ".gantry-index-pack";

/// What [`upload`] did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Uploaded {
    /// The dataset location written.
    pub location: String,
    /// Files of the dataset, the manifest included.
    pub files: usize,
    /// Names uploaded by this run, in the order they completed (the manifest last).
    pub uploaded: Vec<String>,
    /// Names an earlier, interrupted run had already uploaded (right size and checksum).
    pub skipped: Vec<String>,
    pub bytes_uploaded: u64,
    /// The location already held this very dataset (same manifest): nothing was sent.
    pub already_complete: bool,
    pub seconds: f64,
}

/// One file to upload.
struct Item {
    name: String,
    path: PathBuf,
    bytes: u64,
    /// The manifest's xxh3 (none for the tokenizer file, which it does not record).
    xxh3: Option<String>,
}

/// The record left after a file's object is complete.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    bytes: u64,
    xxh3: String,
}

fn record_key(name: &str) -> String {
    format!("{UPLOAD_RECORDS}/{name}.json")
}

/// The files of the dataset in `dir` that `manifest` names, `.idx` files first.
fn items(dir: &Path, manifest: &Manifest) -> Result<Vec<Item>, RemoteError> {
    let mut idx = Vec::new();
    let mut data = Vec::new();
    for s in &manifest.shards {
        let (bin, idx_path) = paths(&dir.join(&s.prefix));
        let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        idx.push(Item {
            name: name(&idx_path),
            path: idx_path,
            bytes: s.idx_bytes,
            xxh3: Some(s.idx_xxh3.clone()),
        });
        let has_bin = bin.exists();
        if has_bin {
            data.push(Item {
                name: name(&bin),
                path: bin.clone(),
                bytes: s.bin_bytes,
                xxh3: Some(s.bin_xxh3.clone()),
            });
        }
        match &s.zstd {
            Some(z) => {
                for (file, bytes, xxh3) in [(&z.file, z.bytes, &z.xxh3), (&z.index, z.index_bytes, &z.index_xxh3)] {
                    data.push(Item {
                        name: file.clone(),
                        path: dir.join(file),
                        bytes,
                        xxh3: Some(xxh3.clone()),
                    });
                }
            }
            None if !has_bin => {
                return Err(ManifestError::MissingShard {
                    dir: dir.to_path_buf(),
                    prefix: s.prefix.clone(),
                    bin: bin.display().to_string(),
                }
                .into());
            }
            None => {}
        }
    }
    if let TokenizerInfo::File { path } = &manifest.tokenizer {
        let p = dir.join(path);
        let bytes = std::fs::metadata(&p).map_err(io_err(&p))?.len();
        idx.push(Item {
            name: path.clone(),
            path: p,
            bytes,
            xxh3: None,
        });
    }
    idx.extend(data);
    Ok(idx)
}

/// A file's bytes as a read-only map (zero-copy into the upload) and their xxh3, checked
/// against the manifest's size and checksum.
fn load(item: &Item) -> Result<(Bytes, String), RemoteError> {
    let file = File::open(&item.path).map_err(io_err(&item.path))?;
    let len = file.metadata().map_err(io_err(&item.path))?.len();
    if len != item.bytes {
        return Err(ManifestError::Size {
            path: item.path.clone(),
            expected: item.bytes,
            actual: len,
        }
        .into());
    }
    let bytes = if len == 0 {
        Bytes::new()
    } else {
        // SAFETY: a read-only map of a finished dataset file (datasets are written once,
        // under a temporary name, and renamed); the bytes are hashed before they are sent.
        Bytes::from_owner(unsafe { Mmap::map(&file) }.map_err(io_err(&item.path))?)
    };
    let actual = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
    if let Some(expected) = &item.xxh3
        && *expected != actual
    {
        return Err(ManifestError::Checksum {
            path: item.path.clone(),
            expected: expected.clone(),
            actual,
        }
        .into());
    }
    Ok((bytes, actual))
}

/// Where an upload goes: the store, its settings, and what the prefix held when it started.
struct Target<'a> {
    store: &'a Store,
    opts: &'a RemoteOptions,
    location: &'a StorageLocation,
    /// Every object under the prefix, with its size (the files and records of earlier runs).
    listed: HashMap<String, u64>,
}

impl Target<'_> {
    /// Whether the object `name` is already complete: listed with the right size, and its
    /// record says the right checksum.
    fn already_there(&self, name: &str, bytes: u64, xxh3: &str) -> Result<bool, RemoteError> {
        let key = record_key(name);
        if self.listed.get(name) != Some(&bytes) || !self.listed.contains_key(&key) {
            return Ok(false);
        }
        let raw = with_retry(&self.opts.retry, &self.location.child(&key), || self.store.get(&key))?;
        Ok(raw
            .and_then(|r| serde_json::from_slice::<Record>(&r).ok())
            .is_some_and(|r| r.bytes == bytes && r.xxh3 == xxh3))
    }

    /// Send one file (checked against the manifest first) and then its record, unless it is
    /// already complete; whether it was sent. An old record goes before the object is
    /// rewritten, so a run killed in between never leaves a record vouching for other bytes.
    fn send_file(&self, item: &Item) -> Result<bool, RemoteError> {
        let (store, retry, location) = (self.store, &self.opts.retry, self.location);
        let (bytes, xxh3) = load(item)?;
        if self.already_there(&item.name, item.bytes, &xxh3)? {
            return Ok(false);
        }
        let record = record_key(&item.name);
        if self.listed.contains_key(&record) {
            with_retry(retry, &location.child(&record), || store.delete(&record))?;
        }
        with_retry(retry, &location.child(&item.name), || {
            store.put(&item.name, bytes.clone())
        })?;
        let note = Record {
            bytes: item.bytes,
            xxh3,
        };
        let note = Bytes::from(serde_json::to_vec(&note).expect("a record serializes"));
        with_retry(retry, &location.child(&record), || store.put(&record, note.clone()))?;
        Ok(true)
    }

    /// Every file through [`Self::send_file`] on up to `threads` threads, each taking the next
    /// file; after a failure no new file starts, and the first failure in file order is the one
    /// reported.
    fn send_files(&self, items: &[Item], threads: usize) -> Result<Sent, RemoteError> {
        let sent = Mutex::new(Sent::default());
        let next = AtomicUsize::new(0);
        let failed = Mutex::new(None::<(usize, RemoteError)>);
        let work = || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                if failed.lock().expect("no panics while held").is_some() {
                    return;
                }
                match self.send_file(item) {
                    Ok(true) => {
                        let mut sent = sent.lock().expect("no panics while held");
                        sent.bytes += item.bytes;
                        sent.uploaded.push(item.name.clone());
                    }
                    Ok(false) => sent
                        .lock()
                        .expect("no panics while held")
                        .skipped
                        .push(item.name.clone()),
                    Err(e) => {
                        let mut f = failed.lock().expect("no panics while held");
                        if f.as_ref().is_none_or(|(j, _)| i < *j) {
                            *f = Some((i, e));
                        }
                        return;
                    }
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads.clamp(1, items.len().max(1)) {
                s.spawn(work);
            }
            work();
        });
        match failed.into_inner().expect("no panics while held") {
            Some((_, e)) => Err(e),
            None => Ok(sent.into_inner().expect("no panics while held")),
        }
    }
}

/// What [`Target::send_files`] sent and skipped.
#[derive(Default)]
struct Sent {
    uploaded: Vec<String>,
    skipped: Vec<String>,
    bytes: u64,
}

/// Every object under `location` with its size, in one listing; a missing bucket is named.
fn list_prefix(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
) -> Result<HashMap<String, u64>, RemoteError> {
    let shown = location.to_string();
    match with_retry(&opts.retry, &shown, || store.list("")) {
        Ok(list) => Ok(list.into_iter().collect()),
        Err(e) if no_bucket(&e) => Err(RemoteError::NoBucket {
            location: shown,
            bucket: bucket_of(location),
        }),
        Err(e) => Err(e),
    }
}

/// Write the index pack (see the module documentation) of the dataset in `dir`: its `.idx`
/// files, each checked against the manifest, sent as one object. They are read rather than
/// mapped: a dataset may have more shards than a process may hold maps.
fn put_index_pack(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    manifest: &Manifest,
) -> Result<(), RemoteError> {
    let mut parts = Vec::with_capacity(manifest.shards.len());
    for s in &manifest.shards {
        let (_, path) = paths(&dir.join(&s.prefix));
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        if bytes.len() as u64 != s.idx_bytes {
            return Err(ManifestError::Size {
                path,
                expected: s.idx_bytes,
                actual: bytes.len() as u64,
            }
            .into());
        }
        let actual = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
        if actual != s.idx_xxh3 {
            return Err(ManifestError::Checksum {
                path,
                expected: s.idx_xxh3.clone(),
                actual,
            }
            .into());
        }
        parts.push(Bytes::from(bytes));
    }
    let object = location.child(INDEX_PACK);
    with_retry(&opts.retry, &object, || {
        store.put_many(vec![(INDEX_PACK.to_string(), parts.clone())])
    })
}

/// Write the dataset's block checksums ([`BLOCK_SUMS`]) for the manifest `raw`, summed from
/// the `.bin` files in `dir` (none for a compressed-only dataset).
fn put_block_sums(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    manifest: &Manifest,
    raw: &[u8],
) -> Result<(), RemoteError> {
    let Some(sums) = BlockSums::compute(dir, manifest, opts.block_bytes)? else {
        return Ok(());
    };
    let bytes = Bytes::from(sums.encode(crate::manifest::fingerprint_of(raw)));
    with_retry(&opts.retry, &location.child(BLOCK_SUMS), || {
        store.put(BLOCK_SUMS, bytes.clone())
    })
}

/// Upload the finished dataset in `dir` to `location` (see the module documentation). A
/// location that already holds this dataset is left alone; one that holds another dataset
/// is refused. Errors name the local file (a mismatch with the manifest) or the object.
pub fn upload(dir: &Path, location: &StorageLocation, opts: &RemoteOptions) -> Result<Uploaded, RemoteError> {
    let started = Instant::now();
    let manifest_path = dir.join(MANIFEST);
    let raw = std::fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let manifest = Manifest::from_json(&raw, &manifest_path)?;
    let items = items(dir, &manifest)?;
    let store = open_store(location, opts)?;
    let shown = location.to_string();

    // The whole prefix at once: sizes of what is there, records of an earlier run. A missing
    // bucket is named here, before anything is hashed.
    let target = Target {
        store: &store,
        opts,
        location,
        listed: list_prefix(&store, opts, location)?,
    };
    if target.listed.contains_key(MANIFEST) {
        let object = location.child(MANIFEST);
        let there = with_retry(&opts.retry, &object, || store.get(MANIFEST))?;
        if there.as_deref() == Some(raw.as_slice()) {
            // A dataset uploaded before there were block sums gets them now: readers take
            // them only for this manifest, and go shard by shard without them.
            if !target.listed.contains_key(BLOCK_SUMS) {
                put_block_sums(&store, opts, location, dir, &manifest, &raw)?;
            }
            return Ok(Uploaded {
                location: shown,
                files: items.len() + 1,
                uploaded: Vec::new(),
                skipped: Vec::new(),
                bytes_uploaded: 0,
                already_complete: true,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        if there.is_some() {
            return Err(RemoteError::Exists {
                location: shown,
                dir: dir.to_path_buf(),
            });
        }
    }
    let mut sent = target.send_files(&items, opts.upload_files)?;
    put_index_pack(&store, opts, location, dir, &manifest)?;
    put_block_sums(&store, opts, location, dir, &manifest, &raw)?;

    // Every file is up: the manifest makes it a dataset.
    let object = location.child(MANIFEST);
    let manifest_bytes = Bytes::from(raw.clone());
    with_retry(&opts.retry, &object, || store.put(MANIFEST, manifest_bytes.clone()))?;
    sent.uploaded.push(MANIFEST.to_string());
    // The records served their purpose; one left behind costs nothing but a listing entry.
    for item in &items {
        let _ = store.delete(&record_key(&item.name));
    }
    Ok(Uploaded {
        location: shown,
        files: items.len() + 1,
        uploaded: sent.uploaded,
        skipped: sent.skipped,
        bytes_uploaded: sent.bytes + raw.len() as u64,
        already_complete: false,
        seconds: started.elapsed().as_secs_f64(),
    })
}
