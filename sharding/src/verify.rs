//! Checking a dataset's files against its manifest once per host, so a flipped byte is an
//! error before training rather than silent training on it, and later runs pay nothing.
//!
//! [`check_on_host`] hashes every file training reads (each shard's `.idx`, and its `.bin`, or
//! its zstd frames and frame index when the `.bin` is absent) with xxh3 and compares sizes and
//! checksums with the manifest; in the same pass over each `.bin` it finds the largest token
//! id ([`crate::vocab`] checks it against the model). A success is remembered in
//! `CACHE/<fingerprint>/verified.json` (the data cache materialized shards use; the
//! fingerprint is the xxh3 of `manifest.json`) together with each file's device, inode, size
//! and modification and change times. A later check whose files stat the same reads the
//! verdict instead of the files; any difference (a rewritten or copied file, a touched one)
//! and everything is hashed again. Failures are not remembered. An advisory lock on
//! `verified.lock` makes ranks or tasks starting together on one host hash once.
//!
//! The stat comparison cannot see a byte that rots on disk after a successful check without
//! the file being written (no change time moves); that is what deleting the verdict, or
//! `gantry data inspect` (which re-hashes everything), is for.

use crate::indexed::{TokenDType, paths, tokens_of};
use crate::manifest::{Manifest, ManifestError};
use crate::materialize::dataset_cache_dir;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The verdict's file name in the dataset's cache directory.
pub const VERDICT: &str = "verified.json";
const VERDICT_VERSION: u32 = 1;

/// One file training reads, what the manifest says of it, and (for a `.bin`) its token type.
struct Expected {
    path: PathBuf,
    bytes: u64,
    xxh3: String,
    /// For a shard's `.bin`: the shard's index and token type (its largest id is found).
    bin_of: Option<(usize, TokenDType)>,
}

/// What identifies a file's contents without reading them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    /// The file's name in the dataset directory (where a copy lives does not matter: its
    /// device and inode differ).
    name: String,
    dev: u64,
    ino: u64,
    bytes: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

#[derive(Debug, Serialize, Deserialize)]
struct Verdict {
    version: u32,
    /// The dataset's fingerprint, 16 hex digits.
    fingerprint: String,
    dataset: PathBuf,
    checked_by: String,
    checked_unix_s: u64,
    files: Vec<Stamp>,
    /// Per shard, in manifest order: the largest token id of its `.bin` (`None` when the
    /// `.bin` was not read: a compressed-only shard).
    max_token_ids: Vec<Option<u64>>,
}

/// What [`check_on_host`] found or reused.
#[derive(Clone, Debug, PartialEq)]
pub struct HostCheck {
    /// The verdict file (written, or read when `reused`).
    pub verdict: PathBuf,
    /// An earlier check's verdict still held (no file was read).
    pub reused: bool,
    /// Why the verdict could not be kept (an unwritable cache), when it could not.
    pub not_saved: Option<String>,
    /// Files checked and their bytes (hashed, unless `reused`).
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
    /// Per shard, in manifest order: the largest token id found in its `.bin`.
    pub max_token_ids: Vec<Option<u64>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The files training reads from `dir`, shard by shard.
fn expected_files(dir: &Path, manifest: &Manifest) -> Result<Vec<Expected>, ManifestError> {
    let mut out = Vec::new();
    for (i, s) in manifest.shards.iter().enumerate() {
        let (bin, idx) = paths(&dir.join(&s.prefix));
        out.push(Expected {
            path: idx,
            bytes: s.idx_bytes,
            xxh3: s.idx_xxh3.clone(),
            bin_of: None,
        });
        match &s.zstd {
            Some(z) if !bin.exists() => {
                for (name, bytes, xxh3) in [(&z.file, z.bytes, &z.xxh3), (&z.index, z.index_bytes, &z.index_xxh3)] {
                    out.push(Expected {
                        path: dir.join(name),
                        bytes,
                        xxh3: xxh3.clone(),
                        bin_of: None,
                    });
                }
            }
            None if !bin.exists() => {
                return Err(ManifestError::MissingShard {
                    dir: dir.to_path_buf(),
                    prefix: s.prefix.clone(),
                    bin: bin.display().to_string(),
                });
            }
            _ => out.push(Expected {
                path: bin,
                bytes: s.bin_bytes,
                xxh3: s.bin_xxh3.clone(),
                bin_of: Some((i, manifest.dtype)),
            }),
        }
    }
    Ok(out)
}

fn stamp(path: &Path) -> Result<Stamp, ManifestError> {
    let m = std::fs::metadata(path).map_err(io(path))?;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Ok(Stamp {
        name: path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        dev: m.dev(),
        ino: m.ino(),
        bytes: m.len(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
    })
}

/// The verdict in `cache`, when it is for this dataset and its files still stat the same.
fn current_verdict(cache: &Path, fingerprint: u64, stamps: &[Stamp], shards: usize) -> Option<Verdict> {
    let raw = std::fs::read(cache.join(VERDICT)).ok()?;
    let v: Verdict = serde_json::from_slice(&raw).ok()?;
    (v.version == VERDICT_VERSION
        && v.fingerprint == format!("{fingerprint:016x}")
        && v.files == stamps
        && v.max_token_ids.len() == shards)
        .then_some(v)
}

/// The largest token ids a current verdict in `cache_root` recorded for the dataset in `dir`
/// (per shard, manifest order), without reading any shard; `None` when there is no current
/// verdict (never checked on this host, or a file changed since).
pub fn cached_max_token_ids(
    dir: &Path,
    manifest: &Manifest,
    fingerprint: u64,
    cache_root: &Path,
) -> Option<Vec<Option<u64>>> {
    recorded_verdict(dir, manifest, fingerprint, cache_root).map(|(_, _, v)| v.max_token_ids)
}

/// The files of the dataset in `dir`, its cache directory under `cache_root` and the current
/// verdict there, when there is one (every file stats as when it was checked).
fn recorded_verdict(
    dir: &Path,
    manifest: &Manifest,
    fingerprint: u64,
    cache_root: &Path,
) -> Option<(Vec<Expected>, PathBuf, Verdict)> {
    let files = expected_files(dir, manifest).ok()?;
    let stamps = files
        .iter()
        .map(|f| stamp(&f.path))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let cache = dataset_cache_dir(cache_root, fingerprint);
    let verdict = current_verdict(&cache, fingerprint, &stamps, manifest.shards.len())?;
    Some((files, cache, verdict))
}

/// The check a previous [`check_on_host`] remembered for the dataset in `dir`, when it is for
/// this manifest and every file still stats the same: nothing but the manifest, the verdict
/// and the files' metadata is read. `None` when there is no such verdict (never checked on
/// this host, a file missing or changed since, or anything unreadable).
pub fn recorded(dir: &Path, cache_root: &Path) -> Option<HostCheck> {
    let started = Instant::now();
    let (manifest, fingerprint) = Manifest::read_with_fingerprint(dir).ok()?;
    let (files, cache, v) = recorded_verdict(dir, &manifest, fingerprint, cache_root)?;
    Some(HostCheck {
        verdict: cache.join(VERDICT),
        reused: true,
        not_saved: None,
        files: files.len(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
        max_token_ids: v.max_token_ids,
    })
}

/// Size, xxh3 and (for a `.bin`) largest token id of one file, compared with the manifest.
fn check_file(f: &Expected) -> Result<Option<u64>, ManifestError> {
    let file = File::open(&f.path).map_err(io(&f.path))?;
    let actual = file.metadata().map_err(io(&f.path))?.len();
    if actual != f.bytes {
        return Err(ManifestError::Size {
            path: f.path.clone(),
            expected: f.bytes,
            actual,
        });
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut max = f.bin_of.map(|_| 0u64);
    if actual > 0 {
        // SAFETY: a read-only map of a dataset file; datasets are written once, under a
        // temporary name, and renamed (a concurrent truncation could fault, as for any map).
        let map = unsafe { Mmap::map(&file) }.map_err(io(&f.path))?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::Sequential);
        // Blocks of 4 MiB: each is hashed and reduced while it is in cache. Multiples of
        // every token size, and the map is page-aligned, so token slices are aligned.
        for block in map.chunks(4 << 20) {
            hasher.update(block);
            if let (Some(m), Some((_, dtype))) = (max.as_mut(), f.bin_of)
                && block.len().is_multiple_of(dtype.size())
            {
                *m = (*m).max(tokens_of(dtype, block).max_id());
            }
        }
    }
    let hash = format!("{:016x}", hasher.digest());
    if hash != f.xxh3 {
        return Err(ManifestError::Checksum {
            path: f.path.clone(),
            expected: f.xxh3.clone(),
            actual: hash,
        });
    }
    Ok(max)
}

/// Check the dataset in `dir` against its manifest on this host, once: reuse a current
/// verdict from `cache_root` (see the module documentation), else hash every file training
/// reads on `threads` threads (0: every available core) and remember the success. A file
/// whose size or xxh3 differs from the manifest is an error naming it.
pub fn check_on_host(dir: &Path, cache_root: &Path, threads: usize) -> Result<HostCheck, ManifestError> {
    let started = Instant::now();
    let (manifest, fingerprint) = Manifest::read_with_fingerprint(dir)?;
    let files = expected_files(dir, &manifest)?;
    let bytes = files.iter().map(|f| f.bytes).sum();
    let cache = dataset_cache_dir(cache_root, fingerprint);
    let verdict = cache.join(VERDICT);
    // Without a usable cache the check still runs; it is only not remembered.
    let lock = std::fs::create_dir_all(&cache)
        .and_then(|()| {
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(cache.join("verified.lock"))?;
            lock.lock()?;
            Ok(lock)
        })
        .map_err(|e| format!("{}: {e}", cache.display()));
    let stamps = files.iter().map(|f| stamp(&f.path)).collect::<Result<Vec<_>, _>>()?;
    if lock.is_ok()
        && let Some(v) = current_verdict(&cache, fingerprint, &stamps, manifest.shards.len())
    {
        return Ok(HostCheck {
            verdict,
            reused: true,
            not_saved: None,
            files: files.len(),
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            max_token_ids: v.max_token_ids,
        });
    }

    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
    .clamp(1, files.len().max(1));
    let results: Vec<OnceLock<Result<Option<u64>, ManifestError>>> = files.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(f) = files.get(i) else { return };
            let _ = results[i].set(check_file(f));
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    let mut max_token_ids = vec![None; manifest.shards.len()];
    for (f, r) in files.iter().zip(results) {
        let max = r.into_inner().expect("every file was checked")?;
        if let Some((shard, _)) = f.bin_of {
            max_token_ids[shard] = max;
        }
    }

    let record = Verdict {
        version: VERDICT_VERSION,
        fingerprint: format!("{fingerprint:016x}"),
        dataset: dir.to_path_buf(),
        checked_by: format!("gantry {}", env!("CARGO_PKG_VERSION")),
        checked_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        files: stamps,
        max_token_ids: max_token_ids.clone(),
    };
    let not_saved = match lock {
        Ok(_) => save(&verdict, &record).err(),
        Err(why) => Some(why),
    };
    Ok(HostCheck {
        verdict,
        reused: false,
        not_saved,
        files: files.len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        max_token_ids,
    })
}

/// Write the verdict under a temporary name and rename it into place.
fn save(path: &Path, verdict: &Verdict) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(verdict).map_err(|e| e.to_string())?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", path.display())
        })
}
