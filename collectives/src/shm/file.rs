//! A file under the shared-memory directory, sized and mapped `MAP_SHARED`: what a ring file
//! ([`super::ring`]) and a group segment ([`super::group`]) are both built on. Opening is
//! open-or-create, so the processes sharing a file open it symmetrically in any order.

use super::io_err;
use crate::error::LinkError;
use memmap2::MmapMut;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64};

/// Bytes of an abort's reason kept in a shared file (longer ones are cut at a char boundary).
pub(super) const REASON_BYTES: usize = 256;
/// An abort note's `state` while its poster fills in culprit and reason.
const ABORT_CLAIMED: u32 = 1;

/// One mapped file of a fixed size.
pub(super) struct SharedFile {
    path: PathBuf,
    /// (device, inode) of the file, so we never unlink a newer file with the same name.
    id: (u64, u64),
    base: NonNull<u8>,
    len: usize,
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, which this struct owns and which stays mapped until drop;
// a mapping is not tied to a thread, and shared state is only touched through atomics or raw
// copies of the ranges the protocols give to this side.
unsafe impl Send for SharedFile {}

impl SharedFile {
    /// Open (creating it if needed) and map `path`, sized to `len` bytes. A fresh file is all
    /// zeroes. `posix_fallocate` sizes it, so a full directory is an error here rather than a
    /// `SIGBUS` on first touch; every opener calls it (it is idempotent) before mapping, so
    /// nobody maps a file another created but has not sized yet.
    pub(super) fn open(path: PathBuf, len: usize) -> Result<SharedFile, LinkError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_err(e, "opening", &path))?;
        // SAFETY: the fd is valid while `file` lives. posix_fallocate returns the error number.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc != 0 {
            return Err(io_err(io::Error::from_raw_os_error(rc), "allocating", &path));
        }
        let meta = file.metadata().map_err(|e| io_err(e, "stat of", &path))?;
        let (size, id) = (meta.len(), (meta.dev(), meta.ino()));
        if size != len as u64 {
            let msg = format!("{} has {size} bytes, expected {len}", path.display());
            return Err(LinkError::Protocol(msg));
        }
        // SAFETY: mapping is unsafe because others may modify or truncate the file. Modification
        // is the point (all shared access goes through atomics or protocol-owned ranges); the
        // file has its full size, and only our peers, which never truncate, have it open.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_err(e, "mapping", &path))?;
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap returned null");
        Ok(SharedFile {
            path,
            id,
            base,
            len,
            _map: map,
        })
    }

    /// Start of the mapping (page-aligned, [`Self::len`] bytes).
    pub(super) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Remove our file from the directory, if it is still there (a peer may have been first).
    pub(super) fn unlink(&self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours
            && let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("could not unlink {}: {e}", self.path.display());
        }
    }

    /// Set a zero (fresh) header word to `want`, or check that it already holds `want`.
    pub(super) fn claim(&self, field: &AtomicU64, want: u64, what: &str) -> Result<(), LinkError> {
        match field.compare_exchange(0, want, AcqRel, Acquire) {
            Ok(_) => Ok(()),
            Err(have) if have == want => Ok(()),
            Err(have) => Err(LinkError::Protocol(format!(
                "{}: {what} is {have:#x}, expected {want:#x}",
                self.path.display()
            ))),
        }
    }
}

/// Where a shared file keeps an abort: who aborted (`state`, a tag the file's protocol gives
/// each side; 0 while none), whom it blames and why. The first poster wins.
pub(super) struct AbortNote<'a> {
    pub(super) state: &'a AtomicU32,
    pub(super) reason_len: &'a AtomicU32,
    pub(super) culprit: &'a AtomicI64,
    pub(super) reason: &'a [AtomicU8; REASON_BYTES],
}

impl AbortNote<'_> {
    /// Post an abort tagged `by` (never 0 or 1) unless one is already posted.
    pub(super) fn post(&self, by: u32, culprit: Option<usize>, reason: &str) {
        debug_assert!(by > ABORT_CLAIMED);
        if self.state.compare_exchange(0, ABORT_CLAIMED, Acquire, Relaxed).is_err() {
            return;
        }
        let mut len = reason.len().min(REASON_BYTES);
        while !reason.is_char_boundary(len) {
            len -= 1;
        }
        for (slot, &b) in self.reason.iter().zip(&reason.as_bytes()[..len]) {
            slot.store(b, Relaxed);
        }
        self.reason_len.store(len as u32, Relaxed);
        let culprit = culprit.and_then(|c| i64::try_from(c).ok()).unwrap_or(-1);
        self.culprit.store(culprit, Relaxed);
        self.state.store(by, Release); // publishes culprit and reason
    }

    /// The posted abort; call once `state` (loaded with `Acquire`) holds a poster's tag.
    pub(super) fn read(&self) -> LinkError {
        let len = (self.reason_len.load(Relaxed) as usize).min(REASON_BYTES);
        let reason: Vec<u8> = self.reason[..len].iter().map(|b| b.load(Relaxed)).collect();
        LinkError::Aborted {
            culprit: usize::try_from(self.culprit.load(Relaxed)).ok(),
            reason: String::from_utf8_lossy(&reason).into_owned(),
        }
    }
}
