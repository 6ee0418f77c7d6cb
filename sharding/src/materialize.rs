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
//! same dataset at once (several ranks on one host) take the copy's build lock (a byte of the
//! directory's one lock file, [`crate::entry_lock`]) around the check-and-build, so one of
//! them builds and the others reuse; the lock is released by the kernel if the holder dies. Partial files found while holding
//! the lock belong to an interrupted run and are removed.

use crate::entry_lock::{self, Lock, Mode};
use crate::frames::{FrameDecoder, FrameError, FramedBin};
use crate::indexed::with_suffix;
use memmap2::Mmap;
use std::fs::File;
use std::ops::Range;
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

/// xxh3-64 of a file through a read-only map, lowercase hex.
pub(crate) fn map_xxh3(path: &Path) -> Result<String, MaterializeError> {
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
pub(crate) fn check_existing(dest: &Path, bytes: u64, xxh3: &str) -> Result<Option<String>, MaterializeError> {
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
pub(crate) struct RemoveOnDrop(pub(crate) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Remove `PREFIX.bin.partial-*` files left next to `dest` by interrupted runs (call only
/// while holding the lock: every writer holds it while its partial file exists).
pub(crate) fn remove_leftovers(dest: &Path) -> Result<(), MaterializeError> {
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
    let lock = lock_cache_entry(dest)?;
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

    let (tmp, file, mut guard) = create_partial(dest)?;
    let threads = decode_threads(threads, frames.index().frames.len());
    decode_into(frames, &file, &tmp, threads)?;
    file.sync_all().map_err(|e| write_error(&tmp, frames, e))?;
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
    sync_parent(dest)?;
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

/// Create `dest`'s directory and take `dest`'s build lock ([`crate::entry_lock`]), held until
/// the returned file is dropped (or the process dies), so one process per host builds the copy.
pub(crate) fn lock_cache_entry(dest: &Path) -> Result<File, MaterializeError> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| MaterializeError::CacheDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    entry_lock::lock(dest, Lock::Build, Mode::Exclusive).map_err(io_err(&entry_lock::locks_file(dest)))
}

/// A new `PREFIX.bin.partial-PID-N` next to `dest`, removed when the guard drops unless the
/// guard is disarmed (after the rename).
pub(crate) fn create_partial(dest: &Path) -> Result<(PathBuf, File, RemoveOnDrop), MaterializeError> {
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
    let guard = RemoveOnDrop(Some(tmp.clone()));
    Ok((tmp, file, guard))
}

/// A failed write to the partial copy `tmp`: a full disk is named as such, with the bytes the
/// copy needs.
fn write_error(tmp: &Path, frames: &FramedBin, source: std::io::Error) -> MaterializeError {
    if source.kind() == std::io::ErrorKind::StorageFull {
        MaterializeError::DiskFull {
            path: tmp.to_path_buf(),
            from: frames.path().to_path_buf(),
            needed: frames.len(),
            source,
        }
    } else {
        MaterializeError::Io {
            path: tmp.to_path_buf(),
            source,
        }
    }
}

/// Threads to decode `frames` frames with: `requested`, or every available core when 0, but
/// at least one and no more than there are frames.
fn decode_threads(requested: usize, frames: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        requested
    }
    .clamp(1, frames.max(1))
}

/// `count` frames cut into `threads` contiguous ranges as even as they can be, in order.
fn frame_ranges(count: usize, threads: usize) -> Vec<Range<usize>> {
    (0..threads)
        .map(|t| count * t / threads..count * (t + 1) / threads)
        .collect()
}

/// Decompress every frame of `frames` into `file` (the partial copy `tmp`) at its offset,
/// one contiguous range of frames per thread. A failure stops the other threads; the error
/// returned is the first in file order (later ones may only be reactions to the stop).
fn decode_into(frames: &FramedBin, file: &File, tmp: &Path, threads: usize) -> Result<(), MaterializeError> {
    let stop = AtomicBool::new(false);
    let work = |range: Range<usize>| -> Result<(), MaterializeError> {
        let mut decoder = FrameDecoder::new()?;
        for i in range {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let at = frames.index().frames[i].uncompressed_offset;
            let result = decoder
                .decode(frames, i)
                .map_err(MaterializeError::from)
                .and_then(|b| file.write_all_at(b, at).map_err(|e| write_error(tmp, frames, e)));
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
                return result;
            }
        }
        Ok(())
    };
    let ranges = frame_ranges(frames.index().frames.len(), threads);
    let results: Vec<Result<(), MaterializeError>> = if threads == 1 {
        vec![work(ranges[0].clone())]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranges.iter().map(|r| scope.spawn(|| work(r.clone()))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    };
    results.into_iter().collect()
}

/// Make a rename in `path`'s directory durable; a directory that cannot be opened for fsync
/// is not fatal.
pub(crate) fn sync_parent(path: &Path) -> Result<(), MaterializeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        d.sync_all().map_err(io_err(dir))?;
    }
    Ok(())
}

/// The cache root when none is configured: `gantry-data-cache` in the system temporary
/// directory. The binary passes `$GANTRY_DATA_CACHE` ([`CACHE_ENV`]) as the configured root;
/// this library reads no environment of its own.
pub fn default_cache_root() -> PathBuf {
    std::env::temp_dir().join("gantry-data-cache")
}

/// Where the materialized shards of the dataset with `fingerprint` live under `root`.
pub fn dataset_cache_dir(root: &Path, fingerprint: u64) -> PathBuf {
    root.join(format!("{fingerprint:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_threads_stay_between_one_and_the_frame_count() {
        assert_eq!(decode_threads(4, 10), 4);
        assert_eq!(decode_threads(16, 3), 3);
        assert_eq!(decode_threads(8, 0), 1);
        assert!((1..=5).contains(&decode_threads(0, 5)));
    }

    #[test]
    fn frame_ranges_cover_every_frame_once_in_order() {
        assert_eq!(frame_ranges(10, 3), vec![0..3, 3..6, 6..10]);
        assert_eq!(frame_ranges(2, 1), vec![0..2]);
        assert_eq!(frame_ranges(0, 1), vec![0..0]);
        for (count, threads) in [(7, 7), (100, 16), (5, 2)] {
            let ranges = frame_ranges(count, threads);
            assert_eq!(ranges.len(), threads);
            assert_eq!(ranges.first().map(|r| r.start), Some(0));
            assert_eq!(ranges.last().map(|r| r.end), Some(count));
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
