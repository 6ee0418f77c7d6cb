//! The locks on a cache directory's entries, all held in one file of the directory.
//!
//! Each entry `NAME` of a cache directory (a shard's `.bin`, the index pack, a whole fetch)
//! has two locks: its **build** lock, held exclusively by the one process of the host that
//! checks, fetches or writes it (and by every writer while its `NAME.partial-*` file exists,
//! which is how a sweep tells a live temporary file from a killed writer's), and its **lease**,
//! held shared by every reader that may still read it and taken exclusively, without waiting,
//! by an eviction.
//!
//! They used to be `flock`s on two files per entry (`NAME.lock`, `NAME.lease`). On a cold
//! stream of many small shards, creating those two files per shard was most of the fetchers'
//! CPU (ext4's inode allocation). Here they are open-file-description byte-range locks (Linux
//! `F_OFD_SETLK`) on two bytes of a lock file of the directory, at an offset taken from a hash
//! of the entry's name; the file stays empty (a lock may lie past its end). The kernel keeps an
//! inode's record locks in a list it walks on every lock taken, and a stream holds a lease on
//! every shard it has read: the entries are spread over [`STRIPES`] files
//! (`.gantry-locks.00` …), picked by the same hash, so a dataset of 100,000 shards walks lists
//! of about 1,600 rather than one of 100,000. Like
//! `flock` and unlike classic POSIX record locks, they belong to the open file: two opens in
//! one process conflict, closing the file (dropping the returned [`File`]) releases them, and
//! the kernel drops them when the holder dies. Two names whose hashes meet share their locks:
//! a build waits for an unrelated one, or an eviction skips a shard; never a wrong read.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The name the lock files of a cache directory start with: `.gantry-locks.` and the stripe
/// in two hex digits.
pub const LOCKS_FILE: &str = ".gantry-locks";
/// Lock files per cache directory.
pub const STRIPES: u64 = 64;

/// Which of an entry's two locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lock {
    /// Held while the entry is checked, fetched or written: one holder per host.
    Build,
    /// Held (shared) while the entry may be read; exclusive to evict it.
    Lease,
}

/// Shared or exclusive; waiting for it, or failing at once with `WouldBlock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
    TryExclusive,
}

fn key(path: &Path) -> u64 {
    let name = path.file_name().unwrap_or(path.as_os_str());
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// The byte of its lock file that `which` lock of the entry at `path` lies on: two
/// neighbouring bytes per name, below `i64::MAX` (`off_t`).
fn offset(path: &Path, which: Lock) -> i64 {
    let at = key(path) & ((1 << 58) - 1) & !1;
    (at + u64::from(which == Lock::Lease)) as i64
}

/// Where the locks of the entry at `path` are kept: one of its directory's [`STRIPES`] lock
/// files (the hash's top bits pick it; its low bits, the offset).
pub(crate) fn locks_file(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let stripe = (key(path) >> 58) & (STRIPES - 1);
    dir.unwrap_or(Path::new(".")).join(format!("{LOCKS_FILE}.{stripe:02x}"))
}

/// Take `which` lock of the entry at `path` in `mode`. The lock lives as long as the returned
/// file (its own open of [`LOCKS_FILE`], so it conflicts with every other, this process's
/// included). `Mode::TryExclusive` fails with [`io::ErrorKind::WouldBlock`] while it is held.
pub(crate) fn lock(path: &Path, which: Lock, mode: Mode) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(locks_file(path))?;
    // SAFETY: `flock` is plain old data; zeroed is a valid value of every field.
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = if mode == Mode::Shared {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    range.l_whence = libc::SEEK_SET as libc::c_short;
    range.l_start = offset(path, which);
    range.l_len = 1;
    let cmd = if mode == Mode::TryExclusive {
        libc::F_OFD_SETLK
    } else {
        libc::F_OFD_SETLKW
    };
    loop {
        // SAFETY: a valid descriptor and a pointer to an initialized `flock` that outlives the
        // call; F_OFD_SETLK(W) only reads it. `l_pid` must be 0 for OFD locks: zeroed.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &range as *const libc::flock) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::EACCES) => return Err(io::ErrorKind::WouldBlock.into()),
            _ => return Err(e),
        }
    }
}

/// Whether any open file holds `which` lock of the entry at `path` (shared or exclusive):
/// taken exclusively without waiting and let go at once. For tests and diagnostics.
pub fn held(path: &Path, which: Lock) -> io::Result<bool> {
    match lock(path, which, Mode::TryExclusive) {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gantry-entry-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn leases_share_evictions_exclude_and_closing_releases() {
        let d = dir("lease");
        let a = d.join("a.bin");
        let r1 = lock(&a, Lock::Lease, Mode::Shared).unwrap();
        let _r2 = lock(&a, Lock::Lease, Mode::Shared).unwrap();
        let busy = lock(&a, Lock::Lease, Mode::TryExclusive).unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::WouldBlock, "a held lease blocks eviction");
        // Another entry's lease and this entry's build lock are other bytes.
        lock(&d.join("b.bin"), Lock::Lease, Mode::TryExclusive).unwrap();
        lock(&a, Lock::Build, Mode::TryExclusive).unwrap();
        drop(r1);
        assert!(held(&a, Lock::Lease).unwrap(), "one reader still holds it");
        drop(_r2);
        assert!(!held(&a, Lock::Lease).unwrap());
        assert_eq!(std::fs::metadata(locks_file(&a)).unwrap().len(), 0, "nothing written");
        let files = std::fs::read_dir(&d).unwrap().count();
        assert!(files <= 2, "no file per entry: {files} lock files for 2 entries");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_build_lock_waits_for_its_holder_in_this_process_too() {
        let d = dir("build");
        let a = d.join("a.bin");
        let held_now = lock(&a, Lock::Build, Mode::Exclusive).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || {
                let got = lock(&a, Lock::Build, Mode::Exclusive).unwrap();
                tx.send(()).unwrap();
                drop(got);
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(),
            "the second holder waits"
        );
        drop(held_now);
        rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        waiter.join().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_killed_holders_locks_are_released() {
        let d = dir("killed");
        let a = d.join("a.bin");
        // Another process holds the lease (Python's fcntl takes the same OFD lock), then dies.
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import fcntl,os,struct,time\n\
                 fd=os.open({:?},os.O_RDWR|os.O_CREAT)\n\
                 fcntl.fcntl(fd,fcntl.F_OFD_SETLK,struct.pack('hhqqi4x',fcntl.F_RDLCK,0,{},1,0))\n\
                 print('held',flush=True)\ntime.sleep(60)",
                locks_file(&a),
                offset(&a, Lock::Lease)
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        assert!(held(&a, Lock::Lease).unwrap(), "another process's lease");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            !held(&a, Lock::Lease).unwrap(),
            "released by the kernel when its holder died"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
