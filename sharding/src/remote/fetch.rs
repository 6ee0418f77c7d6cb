//! Reading a dataset from object storage into the host's data cache, checked byte for byte.
//!
//! [`fetch`] makes `CACHE/<fingerprint>/` a complete copy of the dataset at an `s3://`
//! location and returns that directory, to be opened like any local dataset:
//!
//! 1. `manifest.json` is read (one GET); its xxh3 is the fingerprint, hence the directory.
//! 2. If a copy there was checked before ([`crate::verify::recorded`]: the same manifest and
//!    a verdict whose files still stat the same), nothing else is read or sent.
//! 3. Otherwise, holding the build lock of the entry `CACHE/<fingerprint>/fetch` (the other
//!    ranks of the host wait, then find step 2 true): the prefix is listed once; the `.idx`
//!    files come first, through the index pack (the one a stream left in the cache, else the
//!    upload's, in a few GETs), then each `.bin` (under its own build lock, the one
//!    materialization takes), or
//!    for a compressed-only dataset its `.bin.zst` and `.zidx` (unless a checked `.bin`
//!    materialized from them is already there); the tokenizer file; `manifest.json` last. A
//!    file already in the cache with the manifest's size and xxh3 is kept, a damaged one is
//!    fetched again. Each file is fetched by ranged GETs (`range_bytes` each, `concurrency`
//!    in flight, the next window requested while the last is written), hashed in order,
//!    written under `NAME.partial-PID-N`, fsynced, compared with the manifest and only then
//!    renamed into place.
//! 4. The finished copy is checked once with [`crate::verify::check_on_host`], whose verdict
//!    is what step 2 finds next time.
//!
//! A compressed-only copy is materialized later, by the dataset open, into the same
//! directory (`CACHE/<fingerprint>/PREFIX.bin` is where materialization puts it).

use super::retry::{no_bucket, with_retry, with_retry_unless};
use super::upload::INDEX_PACK;
use super::{RemoteError, RemoteOptions, bucket_of, io_err, open_store};
use crate::manifest::{MANIFEST, Manifest, ManifestError, TokenizerInfo, fingerprint_of};
use crate::materialize::{
    MaterializeError, RemoveOnDrop, check_existing, create_partial, dataset_cache_dir, lock_cache_entry,
    remove_leftovers, sync_parent,
};
use crate::verify::{HostCheck, check_on_host, recorded};
use bytes::Bytes;
use gantry_checkpoint::Store;
use gantry_checkpoint::location::StorageLocation;
use serde::Serialize;
use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

/// A dataset's manifest as read from its location.
#[derive(Clone, Debug)]
pub struct RemoteManifest {
    pub manifest: Manifest,
    /// xxh3 of the bytes of `manifest.json`.
    pub fingerprint: u64,
    /// The bytes of `manifest.json`.
    pub raw: Vec<u8>,
}

/// What [`fetch`] did.
#[derive(Clone, Debug, Serialize)]
pub struct Fetched {
    /// The dataset location.
    pub location: String,
    /// The complete, checked local copy: `CACHE/<fingerprint>/`.
    pub dir: PathBuf,
    pub fingerprint: u64,
    /// A copy checked before was still current: nothing but the manifest was read.
    pub reused: bool,
    /// Files fetched by this call, in order.
    pub fetched: Vec<String>,
    pub bytes_fetched: u64,
    /// Cached files that no longer matched the manifest, and why (fetched again).
    pub refetched: Vec<String>,
    /// Cached files that matched the manifest and were kept.
    pub kept: usize,
    pub seconds: f64,
    /// The host's check of the copy (reused, or made after fetching).
    #[serde(skip)]
    pub check: HostCheck,
}

/// The manifest of the dataset at `location` (a local directory, or S3). A missing manifest
/// and a missing bucket are told apart and named.
pub fn read_manifest(location: &StorageLocation, opts: &RemoteOptions) -> Result<RemoteManifest, RemoteError> {
    match location {
        StorageLocation::Local(dir) => {
            let path = dir.join(MANIFEST);
            let raw = std::fs::read(&path).map_err(|source| ManifestError::Io {
                path: path.clone(),
                source,
            })?;
            remote_manifest(raw, &path)
        }
        StorageLocation::S3 { .. } => get_manifest(&open_store(location, opts)?, location, opts),
    }
}

fn remote_manifest(raw: Vec<u8>, origin: &Path) -> Result<RemoteManifest, RemoteError> {
    Ok(RemoteManifest {
        manifest: Manifest::from_json(&raw, origin)?,
        fingerprint: fingerprint_of(&raw),
        raw,
    })
}

pub(super) fn get_manifest(
    store: &Store,
    location: &StorageLocation,
    opts: &RemoteOptions,
) -> Result<RemoteManifest, RemoteError> {
    let object = location.child(MANIFEST);
    match with_retry(&opts.retry, &object, || store.get(MANIFEST))? {
        Some(raw) => remote_manifest(raw.to_vec(), Path::new(&object)),
        // No manifest: is there a bucket at all? (A GET in a missing bucket is a plain 404.)
        None => match with_retry(&opts.retry, &location.to_string(), || store.list_dirs("")) {
            Err(e) if no_bucket(&e) => Err(RemoteError::NoBucket {
                location: location.to_string(),
                bucket: bucket_of(location),
            }),
            Err(e) => Err(e),
            Ok(_) => Err(RemoteError::NoManifest {
                location: location.to_string(),
                manifest: object,
            }),
        },
    }
}

/// The copy in `dir`, when it holds exactly this manifest and a current verdict.
fn current(dir: &Path, cache_root: &Path, raw: &[u8]) -> Option<HostCheck> {
    let cached = std::fs::read(dir.join(MANIFEST)).ok()?;
    (cached == raw).then(|| recorded(dir, cache_root)).flatten()
}

/// One file to bring into the cache.
struct Want {
    name: String,
    bytes: u64,
    xxh3: String,
    /// A `.bin`: taken under its own lock, the one materialization holds while it writes.
    bin: bool,
}

/// Make `CACHE/<fingerprint>/` (under `cache_root`) a complete, checked copy of the dataset
/// at the S3 `location` (see the module documentation) and return it.
pub fn fetch(location: &StorageLocation, cache_root: &Path, opts: &RemoteOptions) -> Result<Fetched, RemoteError> {
    let started = Instant::now();
    if location.is_local() {
        return Err(RemoteError::NotRemote {
            location: location.to_string(),
        });
    }
    let store = open_store(location, opts)?;
    let remote = get_manifest(&store, location, opts)?;
    let dir = dataset_cache_dir(cache_root, remote.fingerprint);
    let mut done = Fetched {
        location: location.to_string(),
        dir: dir.clone(),
        fingerprint: remote.fingerprint,
        reused: true,
        fetched: Vec::new(),
        bytes_fetched: 0,
        refetched: Vec::new(),
        kept: 0,
        seconds: 0.0,
        check: HostCheck {
            verdict: PathBuf::new(),
            reused: true,
            not_saved: None,
            files: 0,
            bytes: 0,
            seconds: 0.0,
            max_token_ids: Vec::new(),
        },
    };
    if let Some(check) = current(&dir, cache_root, &remote.raw) {
        done.check = check;
        done.seconds = started.elapsed().as_secs_f64();
        return Ok(done);
    }
    let _lock = lock_cache_entry(&dir.join("fetch"))?;
    // Another rank of this host may have finished while this one waited.
    if let Some(check) = current(&dir, cache_root, &remote.raw) {
        done.check = check;
        done.seconds = started.elapsed().as_secs_f64();
        return Ok(done);
    }
    done.reused = false;

    let listed: HashMap<String, u64> = with_retry(&opts.retry, &location.to_string(), || store.list(""))?
        .into_iter()
        .collect();
    // The `.idx` files through the index pack: none fetched when a stream left the pack in
    // the cache, a few GETs when the upload has one (not one GET after another per shard).
    let m = &remote.manifest;
    let wants = plan(m, location, &listed, &dir, &mut done)?;
    let idx_total: u64 = m.shards.iter().map(|s| s.idx_bytes).sum();
    let has_pack = listed.get(INDEX_PACK) == Some(&idx_total);
    let (pieces, _) = super::stream::unpacked_index_files(opts, location, &dir, m, has_pack)?;
    done.bytes_fetched += (m.shards.iter())
        .filter(|s| pieces.contains(&format!("{}.idx", s.prefix)))
        .map(|s| s.idx_bytes)
        .sum::<u64>();
    done.fetched.extend(pieces);
    bring_files(&store, opts, location, &dir, &wants, &mut done)?;
    if let Some((path, bytes, written)) = get_tokenizer(&store, opts, location, &dir, m)?
        && written
    {
        done.fetched.push(path);
        done.bytes_fetched += bytes;
    }
    // Last: with the manifest in place the directory is a dataset.
    replace_if_different(&dir.join(MANIFEST), &remote.raw)?;
    done.check = check_on_host(&dir, cache_root, opts.threads)?;
    done.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        location = %location,
        dir = %dir.display(),
        fetched = done.fetched.len(),
        bytes = done.bytes_fetched,
        kept = done.kept,
        seconds = done.seconds,
        "dataset fetched into the data cache"
    );
    Ok(done)
}

/// The dataset's tokenizer file, when its manifest names one: GET and written into `dir`
/// unless the same bytes are there. Its path, its bytes, and whether it was written.
pub(super) fn get_tokenizer(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    manifest: &Manifest,
) -> Result<Option<(String, u64, bool)>, RemoteError> {
    let TokenizerInfo::File { path } = &manifest.tokenizer else {
        return Ok(None);
    };
    let object = location.child(path);
    let bytes = with_retry(&opts.retry, &object, || store.get(path))?
        .ok_or_else(|| RemoteError::MissingObject { object: object.clone() })?;
    let written = replace_if_different(&dir.join(path), &bytes)?;
    Ok(Some((path.clone(), bytes.len() as u64, written)))
}

/// Bring every file of `wants` (from [`plan`]) into `dir`: one that checks out is kept (and
/// synced), a damaged one fetched again.
fn bring_files(
    store: &Store,
    opts: &RemoteOptions,
    location: &StorageLocation,
    dir: &Path,
    wants: &[Want],
    done: &mut Fetched,
) -> Result<(), RemoteError> {
    for w in wants {
        let dest = dir.join(&w.name);
        let _bin_lock = if w.bin { Some(lock_cache_entry(&dest)?) } else { None };
        match check_existing(&dest, w.bytes, &w.xxh3)? {
            None => {
                // A shard a stream wrote may not be on disk yet (streams skip the fsync, see
                // `cache`): the host's verdict, which outlives a reboot, must not vouch for it
                // before it is.
                sync_file(&dest)?;
                done.kept += 1;
                continue;
            }
            Some(why) if why == "missing" => {}
            Some(why) => {
                tracing::warn!(file = %dest.display(), why, "cached copy does not match the manifest; fetching it again");
                done.refetched.push(format!("{} ({why})", w.name));
                std::fs::remove_file(&dest).map_err(io_err(&dest))?;
            }
        }
        remove_leftovers(&dest)?;
        download(store, opts, &location.child(&w.name), &w.name, &dest, w.bytes, &w.xxh3)?;
        done.fetched.push(w.name.clone());
        done.bytes_fetched += w.bytes;
    }
    Ok(())
}

/// The files [`bring_files`] fetches into `dir` (`.bin`, or a compressed-only shard's frames
/// and frame index), each checked against the listing (present, with the manifest's size), as
/// is every `.idx` (those come through the index pack). A compressed-only shard whose
/// materialized `.bin` is already in `dir` and checks out needs no frames (counted as kept);
/// one that does not is removed (the dataset open materializes it again from the frames).
fn plan(
    manifest: &Manifest,
    location: &StorageLocation,
    listed: &HashMap<String, u64>,
    dir: &Path,
    done: &mut Fetched,
) -> Result<Vec<Want>, RemoteError> {
    let mut data = Vec::new();
    for s in &manifest.shards {
        // The `.idx` files come through the index pack, but one missing from the upload (or of
        // another size) is named here, before anything is fetched.
        check_listed(location, listed, &format!("{}.idx", s.prefix), s.idx_bytes)?;
        let bin = format!("{}.bin", s.prefix);
        if listed.contains_key(&bin) {
            data.push(Want {
                name: bin,
                bytes: s.bin_bytes,
                xxh3: s.bin_xxh3.clone(),
                bin: true,
            });
            continue;
        }
        let Some(z) = &s.zstd else {
            return Err(RemoteError::MissingObject {
                object: location.child(&bin),
            });
        };
        let local_bin = dir.join(&bin);
        if local_bin.exists() {
            let _lock = lock_cache_entry(&local_bin)?;
            match check_existing(&local_bin, s.bin_bytes, &s.bin_xxh3)? {
                None => {
                    done.kept += 1;
                    continue;
                }
                Some(why) if why == "missing" => {}
                Some(why) => {
                    tracing::warn!(file = %local_bin.display(), why, "materialized copy does not match the manifest; removed");
                    done.refetched.push(format!("{bin} ({why})"));
                    std::fs::remove_file(&local_bin).map_err(io_err(&local_bin))?;
                }
            }
        }
        data.push(Want {
            name: z.file.clone(),
            bytes: z.bytes,
            xxh3: z.xxh3.clone(),
            bin: false,
        });
        data.push(Want {
            name: z.index.clone(),
            bytes: z.index_bytes,
            xxh3: z.index_xxh3.clone(),
            bin: false,
        });
    }
    for w in &data {
        check_listed(location, listed, &w.name, w.bytes)?;
    }
    Ok(data)
}

/// The listing has `name` with the manifest's size, or the error naming the object.
pub(super) fn check_listed(
    location: &StorageLocation,
    listed: &HashMap<String, u64>,
    name: &str,
    bytes: u64,
) -> Result<(), RemoteError> {
    match listed.get(name) {
        None => Err(RemoteError::MissingObject {
            object: location.child(name),
        }),
        Some(&actual) if actual != bytes => Err(RemoteError::Size {
            object: location.child(name),
            expected: bytes,
            actual,
        }),
        Some(_) => Ok(()),
    }
}

/// A failed write into the cache: a full disk is named as such.
pub(super) fn write_error(tmp: &Path, object: &str, needed: u64, source: std::io::Error) -> RemoteError {
    if source.kind() == std::io::ErrorKind::StorageFull {
        MaterializeError::DiskFull {
            path: tmp.to_path_buf(),
            from: PathBuf::from(object),
            needed,
            source,
        }
        .into()
    } else {
        io_err(tmp)(source)
    }
}

/// Make what is written of `path` durable (cheap when it already is).
fn sync_file(path: &Path) -> Result<(), RemoteError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Fetch the object `key` (`object` names it) of `bytes` bytes into `dest` by ranged GETs,
/// hashing it in order, fsynced; renamed into place only when its size and xxh3 are the manifest's.
pub(super) fn download(
    store: &Store,
    opts: &RemoteOptions,
    object: &str,
    key: &str,
    dest: &Path,
    bytes: u64,
    xxh3: &str,
) -> Result<(), RemoteError> {
    let (tmp, file, mut guard): (PathBuf, std::fs::File, RemoveOnDrop) = create_partial(dest)?;
    let wanted = Wanted {
        object,
        key,
        bytes,
        xxh3,
    };
    download_to(store, opts, &wanted, &file, &tmp, None)?;
    file.sync_all().map_err(|e| write_error(&tmp, object, bytes, e))?;
    drop(file);
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    guard.0 = None;
    sync_parent(dest)?;
    Ok(())
}

/// One object to fetch: its key under the dataset's prefix (`object` names it in full), its
/// size and xxh3 from the manifest.
pub(super) struct Wanted<'a> {
    pub object: &'a str,
    pub key: &'a str,
    pub bytes: u64,
    pub xxh3: &'a str,
}

/// Write the object into `file` (the temporary file `tmp`) by ranged GETs (`range_bytes`
/// each, `concurrency` in flight, the next window requested while the last is written),
/// hashing it in order; an error unless its size and xxh3 are the manifest's. Not fsynced:
/// whether the copy must be durable before it is renamed is the caller's to say.
/// `stop`: give up between windows (and during backoffs) once it is set.
pub(super) fn download_to(
    store: &Store,
    opts: &RemoteOptions,
    w: &Wanted<'_>,
    file: &std::fs::File,
    tmp: &Path,
    stop: Option<&AtomicBool>,
) -> Result<(), RemoteError> {
    let (object, bytes) = (w.object, w.bytes);
    let step = opts.range_bytes.max(1);
    let ranges: Vec<Range<u64>> = (0..bytes.div_ceil(step))
        .map(|i| i * step..((i + 1) * step).min(bytes))
        .collect();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut at = 0u64;
    std::thread::scope(|s| -> Result<(), RemoteError> {
        // One window of GETs in flight while the previous one is hashed and written.
        let (tx, rx) = sync_channel::<Result<Vec<Bytes>, RemoteError>>(1);
        let windows: Vec<&[Range<u64>]> = ranges.chunks(opts.concurrency.max(1)).collect();
        s.spawn(move || {
            for win in windows {
                let request: Vec<(String, Range<u64>)> = win.iter().map(|r| (w.key.to_string(), r.clone())).collect();
                let got = with_retry_unless(&opts.retry, object, stop, || store.get_ranges(&request));
                let failed = got.is_err();
                if tx.send(got).is_err() || failed {
                    return;
                }
            }
        });
        let mut next = ranges.iter();
        for got in rx {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Err(RemoteError::Stopped {
                    object: object.to_string(),
                });
            }
            for piece in got? {
                let expected = next.next().map_or(0, |r| r.end - r.start);
                if piece.len() as u64 != expected {
                    return Err(RemoteError::Size {
                        object: object.to_string(),
                        expected: bytes,
                        actual: at + piece.len() as u64,
                    });
                }
                hasher.update(&piece);
                file.write_all_at(&piece, at)
                    .map_err(|e| write_error(tmp, object, bytes, e))?;
                at += piece.len() as u64;
            }
        }
        Ok(())
    })?;
    if at != bytes {
        return Err(RemoteError::Size {
            object: object.to_string(),
            expected: bytes,
            actual: at,
        });
    }
    let actual = format!("{:016x}", hasher.digest());
    if actual != w.xxh3 {
        return Err(RemoteError::Checksum {
            object: object.to_string(),
            expected: w.xxh3.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Make `dest` hold exactly `bytes` (written under a temporary name and renamed); `false`
/// when it already did.
pub(super) fn replace_if_different(dest: &Path, bytes: &[u8]) -> Result<bool, RemoteError> {
    if std::fs::read(dest).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    let (tmp, file, mut guard) = create_partial(dest)?;
    file.write_all_at(bytes, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| write_error(&tmp, &dest.display().to_string(), bytes.len() as u64, e))?;
    drop(file);
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    guard.0 = None;
    sync_parent(dest)?;
    Ok(true)
}
