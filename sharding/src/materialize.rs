//! Materializing a shard's zstd frames into a local `.bin`: decompress every frame once, in
//! parallel (one contiguous range of frames per thread, each written at its offset with
//! `pwrite`), check the result against the manifest's xxh3 of the `.bin`, and rename it into
//! place; afterwards the copy is memory-mapped and read exactly like a plain `.bin`
//! (zero-copy). This is what shuffled training reads of compressed-only shards use: a ~2 KB
//! sample through a small cache of 4 MiB frames costs a whole frame decode, while a local copy
//! costs one decode per frame, once.
//!
//! Crash safety: the copy is written as `PREFIX.bin.partial-PID-N` next to its final name,
//! fsynced, checked, and only then renamed to `PREFIX.bin` (and the directory fsynced), so a
//! file under the final name is always complete. A complete file is still re-checked (size
//! and xxh3) on every open before it is used; a damaged one is rebuilt. Processes opening the
//! same dataset at once (several ranks on one host) take an advisory lock on
//! `PREFIX.bin.lock` around the check-and-build, so one of them builds and the others reuse;
//! the lock is released by the kernel if the holder dies. Partial files found while holding
//! the lock belong to an interrupted run and are removed.

use crate::frames::{FrameDecoder, FrameError, FramedBin};
use memmap2::Mmap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

/// The environment variable naming the root of the materialized-shard cache.
pub const CACHE_ENV: &str = "GANTRY_DATA_CACHE";

#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error(
        "{path}: cannot create the data cache directory: {source} (set {CACHE_ENV} or the cache directory option to a writable place, or read the frames through the frame cache)"
    )]
    CacheDir { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: disk full while materializing {from} ({needed} bytes needed): {source} (free space, or set {CACHE_ENV} to a larger disk)"
    )]
    DiskFull {
        path: PathBuf,
        from: PathBuf,
        needed: u64,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Frames(#[from] FrameError),
    #[error(
        "{path}: the frames of {from} decompress to bytes with xxh3 {actual}, but the manifest says the .bin's is {expected}"
    )]
    Checksum {
        path: PathBuf,
        from: PathBuf,
        expected: String,
        actual: String,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> MaterializeError + '_ {
    move |source| MaterializeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`materialize`] did for one shard.
#[derive(Clone, Debug, PartialEq)]
pub struct Materialized {
    /// The complete local `.bin`.
    pub path: PathBuf,
    pub bytes: u64,
    /// A complete copy was already there and checked out (nothing decompressed).
    pub reused: bool,
    /// Why an existing file under the final name was not reused (wrong size or checksum).
    pub rebuilt_because: Option<String>,
    /// Decompression threads used (0 when reused).
    pub threads: usize,
    /// Wall time of the whole call (lock, checks, decompression, fsync, checksum, rename).
    pub seconds: f64,
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// xxh3-64 of a file through a read-only map, lowercase hex.
fn map_xxh3(path: &Path) -> Result<String, MaterializeError> {
    let file = File::open(path).map_err(io_err(path))?;
    if file.metadata().map_err(io_err(path))?.len() == 0 {
        return Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&[])));
    }
    // SAFETY: read-only map of a file only this process writes while it holds the lock.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&map)))
}

/// Why the file at `dest` is not a complete copy of `bytes` bytes hashing to `xxh3`, or
/// `None` when it is. A missing file is `Some`.
fn check_existing(dest: &Path, bytes: u64, xxh3: &str) -> Result<Option<String>, MaterializeError> {
    let len = match std::fs::metadata(dest) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some("missing".into())),
        Err(e) => return Err(io_err(dest)(e)),
    };
    if len != bytes {
        return Ok(Some(format!("{len} bytes, expected {bytes}")));
    }
    let actual = map_xxh3(dest)?;
    if actual != xxh3 {
        return Ok(Some(format!("xxh3 {actual}, expected {xxh3}")));
    }
    Ok(None)
}

/// Removes a file when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Remove `PREFIX.bin.partial-*` files left next to `dest` by interrupted runs (call only
/// while holding the lock: every writer holds it while its partial file exists).
fn remove_leftovers(dest: &Path) -> Result<(), MaterializeError> {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Ok(());
    };
    let mut stem = name.to_os_string();
    stem.push(".partial-");
    let stem = stem.to_string_lossy().into_owned();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_name().to_string_lossy().starts_with(&stem) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Make `dest` a complete, checked copy of the uncompressed bytes of `frames`, whose xxh3-64
/// (lowercase hex, as in the manifest's `bin_xxh3`) is `expected_xxh3`. Reuses a complete
/// file already at `dest`; otherwise decompresses on `threads` threads (0: every available
/// core). Errors name the file concerned: the cache directory, the file being written (disk
/// full, I/O), the `.bin.zst` and frame (damaged frames: zstd's per-frame content checksum
/// or a wrong length), or both files (the whole copy does not hash to the manifest's value).
pub fn materialize(
    frames: &FramedBin,
    dest: &Path,
    expected_xxh3: &str,
    threads: usize,
) -> Result<Materialized, MaterializeError> {
    let started = Instant::now();
    let bytes = frames.len();
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| MaterializeError::CacheDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let lock_path = with_suffix(dest, ".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    let rebuilt_because = match check_existing(dest, bytes, expected_xxh3)? {
        None => {
            return Ok(Materialized {
                path: dest.to_path_buf(),
                bytes,
                reused: true,
                rebuilt_because: None,
                threads: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Some(why) if why == "missing" => None,
        Some(why) => {
            std::fs::remove_file(dest).map_err(io_err(dest))?;
            Some(why)
        }
    };
    remove_leftovers(dest)?;

    static N: AtomicUsize = AtomicUsize::new(0);
    let tmp = with_suffix(
        dest,
        &format!(".partial-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)),
    );
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let mut guard = RemoveOnDrop(Some(tmp.clone()));
    let write_err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::StorageFull {
            MaterializeError::DiskFull {
                path: tmp.clone(),
                from: frames.path().to_path_buf(),
                needed: bytes,
                source,
            }
        } else {
            MaterializeError::Io {
                path: tmp.clone(),
                source,
            }
        }
    };

    let count = frames.index().frames.len();
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
    .clamp(1, count.max(1));
    let stop = AtomicBool::new(false);
    let work = |range: std::ops::Range<usize>| -> Result<(), MaterializeError> {
        let mut decoder = FrameDecoder::new()?;
        for i in range {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let at = frames.index().frames[i].uncompressed_offset;
            let result = decoder
                .decode(frames, i)
                .map_err(MaterializeError::from)
                .and_then(|b| file.write_all_at(b, at).map_err(write_err));
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
                return result;
            }
        }
        Ok(())
    };
    let ranges: Vec<_> = (0..threads)
        .map(|t| count * t / threads..count * (t + 1) / threads)
        .collect();
    let results: Vec<Result<(), MaterializeError>> = if threads == 1 {
        vec![work(0..count)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranges.iter().map(|r| scope.spawn(|| work(r.clone()))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    };
    // The first failure in file order (later ones may only be reactions to the stop flag).
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    file.sync_all().map_err(write_err)?;
    drop(file);

    let actual = map_xxh3(&tmp)?;
    if actual != expected_xxh3 {
        return Err(MaterializeError::Checksum {
            path: dest.to_path_buf(),
            from: frames.path().to_path_buf(),
            expected: expected_xxh3.to_string(),
            actual,
        });
    }
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    guard.0 = None;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the rename durable; a directory that cannot be opened for fsync is not fatal.
        if let Ok(d) = File::open(dir) {
            d.sync_all().map_err(io_err(dir))?;
        }
    }
    drop(lock);
    Ok(Materialized {
        path: dest.to_path_buf(),
        bytes,
        reused: false,
        rebuilt_because,
        threads,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The cache root: `$GANTRY_DATA_CACHE` when set and not empty, else
/// `$TMPDIR/gantry-data-cache` (the system temporary directory).
pub fn default_cache_root() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => std::env::temp_dir().join("gantry-data-cache"),
    }
}

/// Where the materialized shards of the dataset with `fingerprint` live under `root`.
pub fn dataset_cache_dir(root: &Path, fingerprint: u64) -> PathBuf {
    root.join(format!("{fingerprint:016x}"))
}
