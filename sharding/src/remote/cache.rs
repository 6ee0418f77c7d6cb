//! The host's data cache as several streaming ranks share it: leases on shards, a stamp that
//! spares re-hashing a checked shard, and the space budget.
//!
//! - **Leases.** A rank that needs shard `P` holds `P.bin`'s lease shared (taken before it
//!   looks whether `P.bin` is there, kept while it may read it). Evicting `P.bin` takes the
//!   lease exclusively without waiting: it fails while any rank of the host (this process
//!   included, through another open) holds it. Leases and the build locks that make one rank
//!   of the host fetch a shard are byte-range locks on the directory's one lock file
//!   ([`crate::entry_lock`]): the kernel drops them when their holder dies, and no file is
//!   created per shard for them (creating files was most of what a cold shard cost).
//! - **Stamps.** A `.bin` that was fetched or hashed and matched the manifest gets a stamp:
//!   its size, xxh3, device, inode, modification and change times, and the kernel's boot id,
//!   in a fixed 64-byte record (sealed by its own xxh3) at the shard's slot of the directory's
//!   [`STAMPS`] file. A later lease whose file still stats the same, in the same boot, skips
//!   the hash; anything else re-hashes it. A record torn by a concurrent write does not match
//!   its seal and counts as no stamp. (Stamps once lived in `P.bin.lease` or `P.bin.lock`:
//!   those are not read, so such a shard is hashed once more; eviction removes those files.)
//! - **No fsync.** A streamed shard is written, checked and renamed into place without an
//!   fsync of the file or the directory (on Linux, where the boot id is known): a killed
//!   process cannot tear a file the kernel holds, and what a host crash can tear (a renamed
//!   `.bin` whose pages never reached the disk, its stamp intact) is from an earlier boot, so
//!   its stamp no longer counts and the first lease after the reboot hashes it, fetching it
//!   again if it does not match. A complete fetch that keeps such a file fsyncs it before the
//!   host's verdict, which does outlive a reboot, can vouch for it. Where the boot id cannot
//!   be read, every shard is fsynced as before ([`durable`]).
//! - **Space.** With a budget, every byte written into the dataset's cache directory is
//!   reserved first, under the exclusive lock `space.lock`: the usage is the sum of the
//!   sizes of the files there (the temporary files are created at their full size when they
//!   are reserved, so what is being fetched counts too), and while the reservation does not
//!   fit, shards no rank holds are evicted, least soon needed by this rank first, and
//!   temporary files whose writer is gone (their build lock is free) are removed. When
//!   nothing more can go the reservation waits for the other ranks to let go, up to a
//!   deadline.

use super::{RemoteError, io_err};
use crate::entry_lock::{self, Lock, Mode};
use crate::materialize::{RemoveOnDrop, create_partial};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The lock file that serializes reservations of one dataset's cache directory.
pub(super) const SPACE_LOCK: &str = "space.lock";
/// The file of a dataset's cache directory that holds every shard's stamp, one
/// [`STAMP_BYTES`] record per shard (created at its full size with the directory: a fixed
/// file, like the manifest).
pub(super) const STAMPS: &str = ".gantry-stamps";
/// Bytes of one stamp record.
pub(super) const STAMP_BYTES: u64 = 64;

/// Bytes one shard's entry takes in a dataset's cache directory at most: `sizes`, the files
/// its fetch writes (the `.bin`; for a compressed-only shard also its frames and frame index,
/// there until it is decompressed). Its locks and stamp take no room of their own (a byte
/// range of the lock file, a slot of [`STAMPS`]). The one figure the plan holds a rank to and
/// a reservation makes room for, so the two agree by construction.
pub(super) fn entry_cost(sizes: &[u64]) -> u64 {
    sizes.iter().sum::<u64>()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Open (creating) the lock file `path`.
fn lock_file(path: &Path) -> Result<File, RemoteError> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

/// This rank's lease on the shard whose `.bin` is `bin`: shared, waits while the shard is
/// being evicted.
pub(super) fn lease(bin: &Path) -> Result<File, RemoteError> {
    entry_lock::lock(bin, Lock::Lease, Mode::Shared).map_err(io_err(&entry_lock::locks_file(bin)))
}

/// Remove the files of the evictable shard `entry` when no rank of the host holds it; the
/// bytes removed, `None` when it is held. Its stamp goes with it.
pub(super) fn evict(entry: &Evictable, stamps: &Stamps) -> Result<Option<u64>, RemoteError> {
    match entry_lock::lock(&entry.bin, Lock::Lease, Mode::TryExclusive) {
        Ok(_held) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(io_err(&entry_lock::locks_file(&entry.bin))(e)),
    }
    stamps.clear(entry.shard)?;
    let mut freed = 0;
    // Where earlier versions kept a shard's locks and stamps: no longer used, so they go too.
    let legacy = [".lease", ".lock", ".ok"].map(|s| with_suffix(&entry.bin, s));
    for f in entry.files.iter().chain(&legacy) {
        if let Ok(meta) = std::fs::metadata(f) {
            std::fs::remove_file(f).map_err(io_err(f))?;
            freed += meta.len();
        }
    }
    Ok(Some(freed))
}

/// What a stamp records of a checked `.bin`: everything that changes when the file is
/// replaced or rewritten, and the boot it was checked in (0 where unknown: a stamp of an
/// earlier boot may describe a file whose unsynced pages a crash lost).
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    bytes: u64,
    xxh3: u64,
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    boot: u64,
}

impl Stamp {
    /// The record: the fields in order, little-endian, then the xxh3 of those 56 bytes.
    fn encode(&self) -> [u8; STAMP_BYTES as usize] {
        let mut raw = [0u8; STAMP_BYTES as usize];
        let fields = [
            self.bytes,
            self.xxh3,
            self.dev,
            self.ino,
            self.mtime_ns as u64,
            self.ctime_ns as u64,
            self.boot,
        ];
        for (at, v) in fields.into_iter().enumerate() {
            raw[at * 8..at * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let seal = xxhash_rust::xxh3::xxh3_64(&raw[..56]);
        raw[56..].copy_from_slice(&seal.to_le_bytes());
        raw
    }

    /// The stamp a record holds; `None` for an empty, cleared or torn one.
    fn decode(raw: &[u8; STAMP_BYTES as usize]) -> Option<Stamp> {
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if word(7) != xxhash_rust::xxh3::xxh3_64(&raw[..56]) {
            return None;
        }
        Some(Stamp {
            bytes: word(0),
            xxh3: word(1),
            dev: word(2),
            ino: word(3),
            mtime_ns: word(4) as i64,
            ctime_ns: word(5) as i64,
            boot: word(6),
        })
    }
}

/// The kernel's id of this boot, read once; `None` where there is none to read.
fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// Whether a streamed shard must be fsynced before it is renamed into place and stamped:
/// only where stamps cannot tell an earlier boot's (see the module documentation).
pub(super) fn durable() -> bool {
    boot_id().is_none()
}

/// The stamp `path` would get now as matching the manifest's `xxh3` (hex, as the manifest
/// writes it); `None` when it cannot be stat'ed or the checksum is not hex.
fn stamp_of(path: &Path, xxh3: &str) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Some(Stamp {
        bytes: m.len(),
        xxh3: u64::from_str_radix(xxh3, 16).ok()?,
        dev: m.dev(),
        ino: m.ino(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        boot: boot_id().map_or(0, |b| xxhash_rust::xxh3::xxh3_64(b.as_bytes()).max(1)),
    })
}

/// A dataset cache directory's stamps ([`STAMPS`]), open.
pub(super) struct Stamps {
    file: File,
    path: PathBuf,
}

impl Stamps {
    /// Open `dir`'s stamps file, creating it or growing it to hold `shards` records.
    pub(super) fn open(dir: &Path, shards: usize) -> Result<Stamps, RemoteError> {
        let path = dir.join(STAMPS);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let want = shards as u64 * STAMP_BYTES;
        if file.metadata().map_err(io_err(&path))?.len() < want {
            file.set_len(want).map_err(io_err(&path))?;
        }
        Ok(Stamps { file, path })
    }

    fn at(shard: usize) -> u64 {
        shard as u64 * STAMP_BYTES
    }

    /// Whether `bin` (shard `shard`) was checked against `bytes` / `xxh3` and has not changed
    /// since. Call holding its lease: the lease keeps the file from eviction, and a stamp
    /// matches only the inode and change time it was made for.
    pub(super) fn matches(&self, shard: usize, bin: &Path, bytes: u64, xxh3: &str) -> bool {
        let mut raw = [0u8; STAMP_BYTES as usize];
        if self.file.read_exact_at(&mut raw, Self::at(shard)).is_err() {
            return false;
        }
        Stamp::decode(&raw)
            .is_some_and(|recorded| recorded.bytes == bytes && stamp_of(bin, xxh3).is_some_and(|now| now == recorded))
    }

    /// Record that `bin` (shard `shard`) matches the manifest's `xxh3` now. Not fatal when it
    /// cannot be written (the next lease hashes the file again).
    fn record(&self, shard: usize, bin: &Path, xxh3: &str) {
        let Some(stamp) = stamp_of(bin, xxh3) else { return };
        if let Err(e) = self.file.write_all_at(&stamp.encode(), Self::at(shard)) {
            tracing::debug!(path = %self.path.display(), shard, error = %e, "cannot write a shard stamp");
        }
    }

    /// Forget shard `shard`'s stamp (its files are being removed).
    fn clear(&self, shard: usize) -> Result<(), RemoteError> {
        let zero = [0u8; STAMP_BYTES as usize];
        self.file
            .write_all_at(&zero, Self::at(shard))
            .map_err(io_err(&self.path))
    }
}

/// Bytes of the files in `dir` (not recursive: a dataset's cache directory is flat).
pub(super) fn usage(dir: &Path) -> Result<u64, RemoteError> {
    let mut sum = 0;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let Ok(entry) = entry else { continue };
        if let Ok(meta) = entry.metadata()
            && meta.is_file()
        {
            sum += meta.len();
        }
    }
    Ok(sum)
}

/// Whether a file of a dataset's cache directory is shard data the budget may evict (a
/// `.bin`, the frames of one, an earlier version's lease, lock or stamp file) or a temporary
/// file.
fn shard_data(name: &str) -> bool {
    name.contains(".partial-")
        || [".bin", ".bin.zst", ".zidx", ".bin.lease", ".bin.lock", ".bin.ok"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Bytes of the files in `dir` the budget never evicts: the manifest, the `.idx` files, the
/// tokenizer, a host check's verdict.
pub(super) fn kept_files(dir: &Path) -> Result<u64, RemoteError> {
    let mut sum = 0;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let Ok(entry) = entry else { continue };
        if !shard_data(&entry.file_name().to_string_lossy())
            && let Ok(meta) = entry.metadata()
            && meta.is_file()
        {
            sum += meta.len();
        }
    }
    Ok(sum)
}

/// Remove the temporary files in `dir` whose writer is gone: the build lock of NAME (what is
/// before `.partial-`) is free. Every writer holds that lock while its temporary file exists,
/// this process's other threads included (another open conflicts).
pub(super) fn sweep_partials(dir: &Path) -> Result<u64, RemoteError> {
    let mut freed = 0;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(at) = name.find(".partial-") else { continue };
        let entry_path = dir.join(&name[..at]);
        let free = match entry_lock::lock(&entry_path, Lock::Build, Mode::TryExclusive) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(io_err(&entry_lock::locks_file(&entry_path))(e)),
        };
        if free {
            let size = entry.metadata().map_or(0, |m| m.len());
            if std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(file = %entry.path().display(), "removed the temporary file of a fetch that was interrupted");
                freed += size;
            }
        }
    }
    Ok(freed)
}

/// A temporary file reserved at its full size, removed when dropped unless renamed.
pub(super) struct Partial {
    pub path: PathBuf,
    pub file: File,
    pub guard: RemoveOnDrop,
}

impl Partial {
    /// Rename into place at `dest`, durably when [`durable`] says so.
    pub(super) fn commit(mut self, dest: &Path) -> Result<(), RemoteError> {
        std::fs::rename(&self.path, dest).map_err(io_err(dest))?;
        self.guard.0 = None;
        if durable() {
            crate::materialize::sync_parent(dest)?;
        }
        Ok(())
    }
}

/// Create the temporary files for `sizes` bytes next to `bin` (whose build lock the caller
/// holds), each at its full size.
fn create(bin: &Path, sizes: &[u64]) -> Result<Vec<Partial>, RemoteError> {
    sizes
        .iter()
        .map(|&bytes| {
            let (path, file, guard) = create_partial(bin)?;
            file.set_len(bytes).map_err(io_err(&path))?;
            Ok(Partial { path, file, guard })
        })
        .collect()
}

/// One shard the cache may evict: its `.bin` and every file of it that takes room.
#[derive(Clone, Debug)]
pub(super) struct Evictable {
    pub shard: usize,
    pub bin: PathBuf,
    pub files: Vec<PathBuf>,
}

/// A dataset cache directory's budget.
pub(super) struct Space<'a> {
    pub dir: &'a Path,
    /// `None`: no budget (nothing is evicted, reservations only create the files).
    pub budget: Option<u64>,
    /// How long a reservation may wait for room.
    pub deadline: Duration,
    pub stop: &'a AtomicBool,
    pub stamps: &'a Stamps,
}

/// What a reservation did.
#[derive(Debug, Default)]
pub(super) struct Reserved {
    /// The directory's usage once the reservation was made (budget only).
    pub usage: u64,
    /// Shards evicted to make room.
    pub evicted: usize,
}

impl Space<'_> {
    /// Take `space.lock` when there is a budget: what changes the directory's usage other
    /// than a reservation (a rename, a new stamp) happens under it too, so a reservation's
    /// count of the directory never misses a file being renamed.
    fn lock(&self) -> Result<Option<File>, RemoteError> {
        if self.budget.is_none() {
            return Ok(None);
        }
        let path = self.dir.join(SPACE_LOCK);
        let lock = lock_file(&path)?;
        lock.lock().map_err(io_err(&path))?;
        Ok(Some(lock))
    }

    /// Rename the checked temporary file `partial` into place at `bin` (shard `shard`) and
    /// stamp it as matching `xxh3`.
    pub(super) fn commit(&self, partial: Partial, shard: usize, bin: &Path, xxh3: &str) -> Result<(), RemoteError> {
        let _lock = self.lock()?;
        partial.commit(bin)?;
        self.stamps.record(shard, bin, xxh3);
        Ok(())
    }

    /// Stamp `bin` (shard `shard`), found in place and hashed, as matching `xxh3`.
    pub(super) fn stamp(&self, shard: usize, bin: &Path, xxh3: &str) -> Result<(), RemoteError> {
        let _lock = self.lock()?;
        self.stamps.record(shard, bin, xxh3);
        Ok(())
    }

    /// Reserve temporary files of `sizes` bytes (its [`entry_cost`]) for the shard whose
    /// `.bin` is `bin` (its build lock held by the caller),
    /// evicting from `candidates()` (in that order) what no rank holds, as the module
    /// documentation says. The candidates are asked for again on every try: a shard this
    /// rank lets go of while the reservation waits (its reader moved on) is one it may evict.
    pub(super) fn reserve(
        &self,
        bin: &Path,
        sizes: &[u64],
        candidates: &dyn Fn() -> Vec<Evictable>,
    ) -> Result<(Vec<Partial>, Reserved), RemoteError> {
        let Some(budget) = self.budget else {
            return Ok((create(bin, sizes)?, Reserved::default()));
        };
        let need = entry_cost(sizes);
        let started = Instant::now();
        let mut evicted = 0;
        let mut pause = Duration::from_millis(20);
        loop {
            let candidates = candidates();
            let lock = self.lock()?;
            let mut usage = usage(self.dir)?;
            if usage + need > budget {
                usage -= sweep_partials(self.dir)?.min(usage);
            }
            for c in &candidates {
                if usage + need <= budget {
                    break;
                }
                if let Some(freed) = evict(c, self.stamps)? {
                    if freed > 0 {
                        evicted += 1;
                        tracing::debug!(file = %c.bin.display(), freed, "evicted from the data cache");
                    }
                    usage -= freed.min(usage);
                }
            }
            if usage + need <= budget {
                let partials = create(bin, sizes)?;
                return Ok((
                    partials,
                    Reserved {
                        usage: usage + need,
                        evicted,
                    },
                ));
            }
            drop(lock);
            let waited = started.elapsed();
            if waited > self.deadline || self.stop.load(Ordering::Relaxed) {
                return Err(RemoteError::CacheFull {
                    dir: self.dir.to_path_buf(),
                    file: bin
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    budget,
                    usage,
                    need,
                    waited_s: waited.as_secs_f64(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gantry-cache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn evictable(shard: usize, bin: &Path) -> Evictable {
        Evictable {
            shard,
            bin: bin.to_path_buf(),
            files: vec![bin.to_path_buf()],
        }
    }

    #[test]
    fn a_held_shard_is_never_evicted_and_a_free_one_is() {
        let dir = tempdir("lease");
        let (a, b) = (dir.join("a.bin"), dir.join("b.bin"));
        std::fs::write(&a, vec![1u8; 1000]).unwrap();
        std::fs::write(&b, vec![2u8; 1000]).unwrap();
        let stamps = Stamps::open(&dir, 4).unwrap();
        let fixed = 4 * STAMP_BYTES;
        let held = lease(&a).unwrap();
        let stop = AtomicBool::new(false);
        let space = Space {
            dir: &dir,
            budget: Some(1500 + fixed),
            deadline: Duration::from_millis(100),
            stop: &stop,
            stamps: &stamps,
        };
        let candidates = [evictable(0, &a), evictable(1, &b)];
        // Reservations are made holding the shard's build lock (what tells a live temporary file).
        let c_lock = crate::materialize::lock_cache_entry(&dir.join("c.bin")).unwrap();
        let candidates = || candidates.to_vec();
        let (partials, done) = space.reserve(&dir.join("c.bin"), &[500], &candidates).unwrap();
        assert_eq!(done.evicted, 1);
        assert!(a.exists() && !b.exists(), "the held shard stays, the free one goes");
        assert_eq!(
            std::fs::metadata(&partials[0].path).unwrap().len(),
            500,
            "reserved at full size"
        );
        assert_eq!(usage(&dir).unwrap(), 1500 + fixed, "no file per shard besides its own");
        // Nothing else can go: the next reservation waits, then says why.
        let e = space
            .reserve(&dir.join("d.bin"), &[500], &candidates)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no room in the data cache budget") && e.contains("d.bin (500 bytes)"),
            "{e}"
        );
        drop((partials, c_lock, held));
        let _d_lock = crate::materialize::lock_cache_entry(&dir.join("d.bin")).unwrap();
        let (_, done) = space.reserve(&dir.join("d.bin"), &[1000], &candidates).unwrap();
        assert_eq!(done.evicted, 1, "once let go, it can go");
        assert!(!a.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_temporary_file_of_a_gone_writer_is_swept_and_a_live_ones_kept() {
        let dir = tempdir("sweep");
        let live = dir.join("live.bin");
        let held = crate::materialize::lock_cache_entry(&live).unwrap();
        std::fs::write(dir.join("live.bin.partial-1-0"), [0u8; 10]).unwrap();
        std::fs::write(dir.join("dead.bin.partial-999999-0"), [0u8; 20]).unwrap();
        assert_eq!(sweep_partials(&dir).unwrap(), 20);
        assert!(dir.join("live.bin.partial-1-0").exists());
        assert!(!dir.join("dead.bin.partial-999999-0").exists());
        drop(held);
        assert_eq!(sweep_partials(&dir).unwrap(), 10, "its writer let go");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_waiting_reservation_evicts_what_was_let_go_of_after_it_began() {
        let dir = tempdir("late");
        let a = dir.join("a.bin");
        std::fs::write(&a, vec![1u8; 1000]).unwrap();
        let stamps = Stamps::open(&dir, 2).unwrap();
        let stop = AtomicBool::new(false);
        let space = Space {
            dir: &dir,
            budget: Some(1500 + 2 * STAMP_BYTES),
            deadline: Duration::from_secs(30),
            stop: &stop,
            stamps: &stamps,
        };
        // The first try finds nothing to evict (the shard is still held then); by the next one
        // the rank has let go of it.
        let tries = std::cell::Cell::new(0);
        let candidates = || {
            tries.set(tries.get() + 1);
            match tries.get() {
                1 => Vec::new(),
                _ => vec![evictable(0, &a)],
            }
        };
        let _lock = crate::materialize::lock_cache_entry(&dir.join("b.bin")).unwrap();
        let (partials, done) = space.reserve(&dir.join("b.bin"), &[1000], &candidates).unwrap();
        assert_eq!((done.evicted, tries.get()), (1, 2));
        assert!(!a.exists());
        drop(partials);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_evicted_shard_loses_its_stamp_and_an_earlier_versions_small_files() {
        let dir = tempdir("evict");
        let a = dir.join("a.bin");
        std::fs::write(&a, b"tokens").unwrap();
        for legacy in ["a.bin.lease", "a.bin.lock", "a.bin.ok"] {
            std::fs::write(dir.join(legacy), b"{}").unwrap();
        }
        let stamps = Stamps::open(&dir, 3).unwrap();
        stamps.record(2, &a, "00000000000000ab");
        assert!(stamps.matches(2, &a, 6, "00000000000000ab"));
        assert_eq!(evict(&evictable(2, &a), &stamps).unwrap(), Some(6 + 3 * 2));
        std::fs::write(&a, b"tokens").unwrap();
        assert!(!stamps.matches(2, &a, 6, "00000000000000ab"), "the stamp went with it");
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let locks = entry_lock::locks_file(&a);
        let locks = locks.file_name().unwrap().to_str().unwrap();
        assert_eq!(left, [locks, STAMPS, "a.bin"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A shard written without an fsync may have lost its pages in a host crash while its
    /// stamp survived: a stamp made in another boot (or one that names no boot, where this
    /// one is known) is not taken, so the shard is hashed again.
    #[test]
    fn a_stamp_from_another_boot_is_not_taken() {
        let dir = tempdir("boot");
        let bin = dir.join("s.bin");
        std::fs::write(&bin, b"tokens").unwrap();
        let stamps = Stamps::open(&dir, 1).unwrap();
        stamps.record(0, &bin, "abc");
        let _held = lease(&bin).unwrap();
        assert!(stamps.matches(0, &bin, 6, "abc"));
        assert_eq!(durable(), boot_id().is_none());
        let rewrite = |boot: u64| {
            let mut s = stamp_of(&bin, "abc").unwrap();
            s.boot = boot;
            std::fs::write(dir.join(STAMPS), s.encode()).unwrap();
        };
        rewrite(12345);
        assert!(!stamps.matches(0, &bin, 6, "abc"), "another boot's stamp");
        rewrite(0);
        assert_eq!(
            stamps.matches(0, &bin, 6, "abc"),
            boot_id().is_none(),
            "a stamp that names no boot"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stamp_holds_until_the_file_changes_and_a_torn_one_never() {
        let dir = tempdir("stamp");
        let (s0, s1) = (dir.join("s0.bin"), dir.join("s1.bin"));
        std::fs::write(&s0, b"tokens").unwrap();
        std::fs::write(&s1, b"tokens").unwrap();
        let stamps = Stamps::open(&dir, 2).unwrap();
        assert!(!stamps.matches(0, &s0, 6, "abc"), "a fresh file holds no stamp");
        stamps.record(0, &s0, "abc");
        assert!(stamps.matches(0, &s0, 6, "abc"));
        assert!(!stamps.matches(1, &s1, 6, "abc"), "slots are the shards'");
        assert!(!stamps.matches(0, &s1, 6, "abc"), "another file in the slot");
        assert!(!stamps.matches(0, &s0, 6, "abd"), "another checksum");
        assert!(!stamps.matches(0, &s0, 7, "abc"), "another size");
        // Half of a record written over another's (a concurrent write): no stamp, so a hash.
        let mut torn = stamp_of(&s0, "abc").unwrap().encode();
        torn[8] ^= 1;
        std::fs::File::options()
            .write(true)
            .open(dir.join(STAMPS))
            .unwrap()
            .write_all_at(&torn, 0)
            .unwrap();
        assert!(!stamps.matches(0, &s0, 6, "abc"), "a torn record");
        stamps.record(0, &s0, "abc");
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&s0, b"tokenz").unwrap();
        assert!(!stamps.matches(0, &s0, 6, "abc"), "rewritten: hashed again");
        // Reopening with more shards grows the file and keeps what it holds.
        stamps.record(1, &s1, "abc");
        let more = Stamps::open(&dir, 5).unwrap();
        assert!(more.matches(1, &s1, 6, "abc"));
        assert_eq!(std::fs::metadata(dir.join(STAMPS)).unwrap().len(), 5 * STAMP_BYTES);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
