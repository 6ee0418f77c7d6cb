//! The host's data cache as several streaming ranks share it: leases on shards, a stamp that
//! spares re-hashing a checked shard, and the space budget.
//!
//! - **Leases.** A rank that needs shard `P` holds a shared `flock` on `P.bin.lease` (taken
//!   before it looks whether `P.bin` is there, kept while it may read it). Evicting `P.bin`
//!   takes an exclusive `flock` on the lease without waiting: it fails while any rank of the
//!   host (this process included, through another descriptor) holds it. The kernel drops the
//!   locks of a killed process, and the lease files are never removed, so there is no race
//!   between a lock and the file it locks.
//! - **Stamps.** A `.bin` that was fetched or hashed and matched the manifest gets a stamp,
//!   written into its lease file `P.bin.lease` (which every shard a stream reads has anyway:
//!   creating a file is what a streamed shard costs most on a busy file system, and the lease
//!   is open already when the stamp is read, so a warm shard costs no other open): its size,
//!   xxh3, device, inode, modification and change times, and the kernel's boot id. A later
//!   lease whose file still stats the same, in the same boot, skips the hash; anything else
//!   re-hashes it. (Stamps once lived in `P.bin.lock`: those are not read, so such a shard is
//!   hashed once more.)
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
//!   temporary files whose writer is gone (its `P.bin.lock` is free) are removed. When
//!   nothing more can go the reservation waits for the other ranks to let go, up to a
//!   deadline.

use super::{RemoteError, io_err};
use crate::materialize::{RemoveOnDrop, create_partial};
use serde::{Deserialize, Serialize};
use std::fs::{File, TryLockError};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The lock file that serializes reservations of one dataset's cache directory.
pub(super) const SPACE_LOCK: &str = "space.lock";
/// Room reserved with each shard for the small files that come with it: its stamp (at most
/// [`Stamp::MAX_BYTES`], in its `.lease` file; its `.lock` file is empty).
pub(super) const SMALL_FILES: u64 = 512;

/// Bytes one shard's entry takes in a dataset's cache directory at most: `sizes`, the files
/// its fetch writes (the `.bin`; for a compressed-only shard also its frames and frame index,
/// there until it is decompressed), and its small files. The one figure the plan holds a rank
/// to and a reservation makes room for, so the two agree by construction.
pub(super) fn entry_cost(sizes: &[u64]) -> u64 {
    sizes.iter().sum::<u64>() + SMALL_FILES
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Open (creating) the lock or lease file `path`; readable, for the stamp a lease holds.
fn lock_file(path: &Path) -> Result<File, RemoteError> {
    File::options()
        .read(true)
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

/// This rank's lease on the shard whose `.bin` is `bin`: shared, waits while the shard is
/// being evicted.
pub(super) fn lease(bin: &Path) -> Result<File, RemoteError> {
    let path = with_suffix(bin, ".lease");
    let file = lock_file(&path)?;
    file.lock_shared().map_err(io_err(&path))?;
    Ok(file)
}

/// Remove the shard files `files` (its `.bin` is `bin`) when no rank of the host holds the
/// shard; the bytes removed, `None` when it is held.
pub(super) fn evict(bin: &Path, files: &[PathBuf]) -> Result<Option<u64>, RemoteError> {
    let path = with_suffix(bin, ".lease");
    let lease = lock_file(&path)?;
    match lease.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => return Err(io_err(&path)(e)),
    }
    // The stamp first: it goes with the shard (its lease file stays, empty); and one an
    // earlier version left in the lock file.
    let mut freed = clear_stamp(bin, STAMP)? + clear_stamp(bin, ".lock")?;
    // `P.bin.ok`: where stamps were kept before they moved into the lock file.
    for f in files.iter().chain([&with_suffix(bin, ".ok")]) {
        if let Ok(meta) = std::fs::metadata(f) {
            std::fs::remove_file(f).map_err(io_err(f))?;
            freed += meta.len();
        }
    }
    Ok(Some(freed))
}

/// What a stamp records of a checked `.bin`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    bytes: u64,
    xxh3: String,
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    /// The boot the check was made in (empty where unknown): a stamp of an earlier boot may
    /// describe a file whose unsynced pages a crash lost.
    #[serde(default)]
    boot: String,
}

impl Stamp {
    /// The longest a stamp's JSON can be (every number at its widest, the xxh3 as the
    /// manifest writes it: 16 hex digits, the boot id a 36-character UUID): what
    /// [`SMALL_FILES`] must cover.
    const MAX_BYTES: u64 = 280;
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

const _: () = assert!(Stamp::MAX_BYTES <= SMALL_FILES);

fn stamp_of(path: &Path, xxh3: &str) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Some(Stamp {
        bytes: m.len(),
        xxh3: xxh3.to_string(),
        dev: m.dev(),
        ino: m.ino(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        boot: boot_id().unwrap_or_default().to_string(),
    })
}

/// Whether `bin` was checked against `bytes` / `xxh3` and has not changed since, by the
/// stamp in `lease` (its lease file, open: [`lease`]).
pub(super) fn stamped(lease: &File, bin: &Path, bytes: u64, xxh3: &str) -> bool {
    // One read: a stamp is never longer than this, so a longer file is no stamp.
    let mut raw = [0u8; SMALL_FILES as usize + 1];
    let Ok(n) = lease.read_at(&mut raw, 0) else {
        return false;
    };
    let Ok(recorded) = serde_json::from_slice::<Stamp>(&raw[..n]) else {
        return false;
    };
    recorded.bytes == bytes && stamp_of(bin, xxh3).is_some_and(|now| now == recorded)
}

/// Record that `bin` matches the manifest's `xxh3` now. Not fatal when it cannot be written
/// (the next lease hashes the file again).
fn stamp(bin: &Path, xxh3: &str) {
    let path = with_suffix(bin, STAMP);
    let written = stamp_of(bin, xxh3)
        .and_then(|s| serde_json::to_vec(&s).ok())
        .map(|raw| {
            // Not truncated first: a reader sees the old stamp, the new one, or bytes that
            // parse as neither (then it hashes the file), never an empty file it would have
            // to tell from a missing stamp.
            let file = lock_file(&path)?;
            file.write_all_at(&raw, 0)
                .and_then(|()| file.set_len(raw.len() as u64))
                .map_err(io_err(&path))
        });
    if let Some(Err(e)) = written {
        tracing::debug!(path = %path.display(), error = %e, "cannot write a shard stamp");
    }
}

/// Remove `bin`'s stamp from its file `bin` + `suffix` (emptied, kept); the bytes it took.
fn clear_stamp(bin: &Path, suffix: &str) -> Result<u64, RemoteError> {
    let path = with_suffix(bin, suffix);
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(0);
    };
    if meta.len() > 0 {
        lock_file(&path)?.set_len(0).map_err(io_err(&path))?;
    }
    Ok(meta.len())
}

/// Where a shard's stamp is kept: its lease file (`P.bin.lease`, which every streamed shard
/// has anyway), so a stamp costs no file of its own and is read through the open lease.
const STAMP: &str = ".lease";

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
/// `.bin`, the frames of one, its stamp in the lease or lock file) or a temporary file.
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

/// Remove the temporary files in `dir` whose writer is gone: their `NAME.lock` (NAME being
/// what is before `.partial-`) is free. Every writer holds that lock while its temporary file
/// exists, this process's other threads included (another descriptor conflicts).
pub(super) fn sweep_partials(dir: &Path) -> Result<u64, RemoteError> {
    let mut freed = 0;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(at) = name.find(".partial-") else { continue };
        let lock = lock_file(&dir.join(format!("{}.lock", &name[..at])))?;
        if lock.try_lock().is_ok() {
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

/// Create the temporary files for `sizes` bytes next to `bin` (whose `.lock` the caller
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

    /// Rename the checked temporary file `partial` into place at `bin` and stamp it as
    /// matching `xxh3`.
    pub(super) fn commit(&self, partial: Partial, bin: &Path, xxh3: &str) -> Result<(), RemoteError> {
        let _lock = self.lock()?;
        partial.commit(bin)?;
        stamp(bin, xxh3);
        Ok(())
    }

    /// Stamp `bin`, found in place and hashed, as matching `xxh3`.
    pub(super) fn stamp(&self, bin: &Path, xxh3: &str) -> Result<(), RemoteError> {
        let _lock = self.lock()?;
        stamp(bin, xxh3);
        Ok(())
    }

    /// Reserve temporary files of `sizes` bytes (and room for the shard's small files: its
    /// [`entry_cost`]) for the shard whose `.bin` is `bin` (its `.lock` held by the caller),
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
                if let Some(freed) = evict(&c.bin, &c.files)? {
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

    #[test]
    fn a_held_shard_is_never_evicted_and_a_free_one_is() {
        let dir = tempdir("lease");
        let (a, b) = (dir.join("a.bin"), dir.join("b.bin"));
        std::fs::write(&a, vec![1u8; 1000]).unwrap();
        std::fs::write(&b, vec![2u8; 1000]).unwrap();
        let held = lease(&a).unwrap();
        let stop = AtomicBool::new(false);
        let space = Space {
            dir: &dir,
            budget: Some(1500 + SMALL_FILES),
            deadline: Duration::from_millis(100),
            stop: &stop,
        };
        let candidates = [
            Evictable {
                bin: a.clone(),
                files: vec![a.clone()],
            },
            Evictable {
                bin: b.clone(),
                files: vec![b.clone()],
            },
        ];
        // Reservations are made holding the shard's lock (what tells a live temporary file).
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
        assert_eq!(usage(&dir).unwrap(), 1500);
        // Nothing else can go: the next reservation waits, then says why.
        let e = space
            .reserve(&dir.join("d.bin"), &[500], &candidates)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no room in the data cache budget") && e.contains("d.bin (1012 bytes)"),
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
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_waiting_reservation_evicts_what_was_let_go_of_after_it_began() {
        let dir = tempdir("late");
        let a = dir.join("a.bin");
        std::fs::write(&a, vec![1u8; 1000]).unwrap();
        let stop = AtomicBool::new(false);
        let space = Space {
            dir: &dir,
            budget: Some(1500 + SMALL_FILES),
            deadline: Duration::from_secs(30),
            stop: &stop,
        };
        // The first try finds nothing to evict (the shard is still held then); by the next one
        // the rank has let go of it.
        let tries = std::cell::Cell::new(0);
        let candidates = || {
            tries.set(tries.get() + 1);
            match tries.get() {
                1 => Vec::new(),
                _ => vec![Evictable {
                    bin: a.clone(),
                    files: vec![a.clone()],
                }],
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
    fn the_widest_stamp_fits_the_room_reserved_for_it() {
        let widest = Stamp {
            bytes: u64::MAX,
            xxh3: "f".repeat(16),
            dev: u64::MAX,
            ino: u64::MAX,
            mtime_ns: i128::from(i64::MIN) * 1_000_000_000 - 999_999_999,
            ctime_ns: i128::from(i64::MIN) * 1_000_000_000 - 999_999_999,
            boot: "ffffffff-ffff-ffff-ffff-ffffffffffff".into(),
        };
        let len = serde_json::to_vec(&widest).unwrap().len() as u64;
        assert!(len <= Stamp::MAX_BYTES && Stamp::MAX_BYTES <= SMALL_FILES, "{len}");
    }

    /// A shard written without an fsync may have lost its pages in a host crash while its
    /// stamp survived: a stamp made in another boot (or before stamps named the boot) is not
    /// taken, so the shard is hashed again.
    #[test]
    fn a_stamp_from_another_boot_is_not_taken() {
        let dir = tempdir("boot");
        let bin = dir.join("s.bin");
        std::fs::write(&bin, b"tokens").unwrap();
        stamp(&bin, "abc");
        let held = lease(&bin).unwrap();
        let stamped = |bin: &Path, bytes, xxh3| stamped(&held, bin, bytes, xxh3);
        assert!(stamped(&bin, 6, "abc"));
        assert_eq!(durable(), boot_id().is_none());
        let ok = with_suffix(&bin, STAMP);
        let mut recorded: Stamp = serde_json::from_slice(&std::fs::read(&ok).unwrap()).unwrap();
        assert_eq!(recorded.boot, boot_id().unwrap_or_default());
        recorded.boot = "00000000-0000-0000-0000-000000000000".into();
        std::fs::write(&ok, serde_json::to_vec(&recorded).unwrap()).unwrap();
        assert!(!stamped(&bin, 6, "abc"), "another boot's stamp");
        let mut old = serde_json::to_value(&recorded).unwrap();
        old.as_object_mut().unwrap().remove("boot");
        std::fs::write(&ok, serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(
            stamped(&bin, 6, "abc"),
            boot_id().is_none(),
            "a stamp that names no boot"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stamp_holds_until_the_file_changes() {
        let dir = tempdir("stamp");
        let bin = dir.join("s.bin");
        std::fs::write(&bin, b"tokens").unwrap();
        let held = lease(&bin).unwrap();
        let stamped = |bin: &Path, bytes, xxh3| stamped(&held, bin, bytes, xxh3);
        assert!(!stamped(&bin, 6, "abc"));
        stamp(&bin, "abc");
        assert!(stamped(&bin, 6, "abc"));
        assert!(!stamped(&bin, 6, "abd"), "another checksum");
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&bin, b"tokenz").unwrap();
        assert!(!stamped(&bin, 6, "abc"), "rewritten: hashed again");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
