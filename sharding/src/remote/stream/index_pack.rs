//! A streamed dataset's `.idx` files in its cache directory: one file, [`INDEX_PACK`] (every
//! `.idx` back to back in manifest order, as the upload's index pack holds them), mapped once,
//! rather than one file per shard. Creating a file is a round trip through the file system's
//! journal (about 1 ms each on the benchmark host), and a dataset of many small shards needs
//! every `.idx` before its first step; one file and one mapping instead of hundreds of each
//! took most of the time to the first step.
//!
//! The file is written without an fsync, pieces in place: every [`super::prepare_stream`]
//! hashes each piece against the manifest before the dataset opens (a piece a crash cut short
//! is fetched again), only the holder of the entry's `fetch` build lock writes it, and a file of the
//! wrong size is replaced by a rename (never truncated under a reader's mapping).

use super::super::upload::INDEX_PACK;
use super::super::{RemoteError, io_err};
use crate::indexed::{IndexedError, IndexedIndex};
use crate::manifest::Manifest;
use crate::materialize::{RemoveOnDrop, create_partial, lock_cache_entry};
use memmap2::Mmap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where each shard's `.idx` lies in the pack: `offsets[s]..offsets[s + 1]`.
pub(super) fn offsets(manifest: &Manifest) -> Vec<u64> {
    let mut at = 0;
    let mut out = Vec::with_capacity(manifest.shards.len() + 1);
    out.push(0);
    for s in &manifest.shards {
        at += s.idx_bytes;
        out.push(at);
    }
    out
}

/// The shards whose `.idx` in the cached pack at `path` does not match the manifest (all of
/// them when the file is missing or not the size the manifest implies).
pub(super) fn damaged(path: &Path, manifest: &Manifest) -> Result<Vec<usize>, RemoteError> {
    let all = || (0..manifest.shards.len()).collect();
    let at = offsets(manifest);
    let total = at[manifest.shards.len()];
    let Some(map) = map_sized(path, total)? else {
        return Ok(all());
    };
    let mut out = Vec::new();
    for (i, s) in manifest.shards.iter().enumerate() {
        let piece = &map[at[i] as usize..at[i + 1] as usize];
        if format!("{:016x}", xxhash_rust::xxh3::xxh3_64(piece)) != s.idx_xxh3 {
            if map.len() as u64 == total {
                tracing::warn!(file = %path.display(), shard = %s.prefix, "cached .idx does not match the manifest; fetching it again");
            }
            out.push(i);
        }
    }
    Ok(out)
}

/// Write every shard's `.idx` into `dir` as a file of its own from the checked pack at
/// `path` (what a fetched copy, read as a local dataset, needs): each one missing or not
/// matching the manifest, under a temporary name, fsynced (a host's verdict, which outlives a
/// reboot, will vouch for it) and renamed. The names written.
pub(super) fn unpack(path: &Path, dir: &Path, manifest: &Manifest) -> Result<Vec<String>, RemoteError> {
    let at = offsets(manifest);
    let map = map_sized(path, at[manifest.shards.len()])?.ok_or_else(|| RemoteError::Shard {
        object: path.display().to_string(),
        message: "the index pack is missing or not the size the manifest gives".into(),
    })?;
    let mut written = Vec::new();
    for (i, s) in manifest.shards.iter().enumerate() {
        let name = format!("{}.idx", s.prefix);
        let dest = dir.join(&name);
        if crate::materialize::check_existing(&dest, s.idx_bytes, &s.idx_xxh3)?.is_none() {
            continue;
        }
        let piece = &map[at[i] as usize..at[i + 1] as usize];
        let actual = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(piece));
        if actual != s.idx_xxh3 {
            return Err(RemoteError::Checksum {
                object: format!("{} ({name})", path.display()),
                expected: s.idx_xxh3.clone(),
                actual,
            });
        }
        let (tmp, file, mut guard) = create_partial(&dest)?;
        std::io::Write::write_all(&mut &file, piece)
            .and_then(|()| file.sync_all())
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        guard.0 = None;
        written.push(name);
    }
    if let Some(first) = written.first() {
        crate::materialize::sync_parent(&dir.join(first))?;
    }
    Ok(written)
}

/// The file at `path` mapped, when it is there with `bytes` bytes; `None` otherwise.
fn map_sized(path: &Path, bytes: u64) -> Result<Option<Mmap>, RemoteError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    if file.metadata().map_err(io_err(path))?.len() != bytes || bytes == 0 {
        return Ok(None);
    }
    // SAFETY: read-only; the pack is never truncated, only replaced by a rename.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    Ok(Some(map))
}

/// Where fetched `.idx` pieces are written: the cached pack in place, or (when it was missing
/// or the wrong size) a new one under a temporary name, renamed into place by [`Self::finish`].
pub(super) struct Target {
    pub file: File,
    path: PathBuf,
    renamed: Option<(PathBuf, RemoveOnDrop)>,
    /// The pack's `.lock`, held while a temporary file of it exists (a sweep of killed
    /// fetches' temporary files leaves those whose lock is held).
    _lock: File,
}

impl Target {
    /// Open the cached pack at `path` for writing pieces of a pack of `total` bytes.
    pub(super) fn open(path: &Path, total: u64) -> Result<Target, RemoteError> {
        let lock = lock_cache_entry(path)?;
        let in_place = std::fs::metadata(path).is_ok_and(|m| m.len() == total);
        if in_place {
            let file = File::options().write(true).open(path).map_err(io_err(path))?;
            return Ok(Target {
                file,
                path: path.to_path_buf(),
                renamed: None,
                _lock: lock,
            });
        }
        let (tmp, file, guard) = create_partial(path)?;
        file.set_len(total).map_err(io_err(&tmp))?;
        Ok(Target {
            file,
            path: path.to_path_buf(),
            renamed: Some((tmp, guard)),
            _lock: lock,
        })
    }

    /// Put a new pack into place (nothing to do for one written in place).
    pub(super) fn finish(self) -> Result<(), RemoteError> {
        if let Some((tmp, mut guard)) = self.renamed {
            std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
            guard.0 = None;
        }
        Ok(())
    }
}

/// The cached pack of a prepared dataset, mapped once: each shard's `.idx` a piece of it.
pub(super) struct IndexPack {
    map: Arc<Mmap>,
    offsets: Vec<u64>,
    /// How errors name each shard's `.idx`: the pack and the piece.
    names: Vec<PathBuf>,
}

impl IndexPack {
    /// Map the pack in `dir` (which [`super::prepare_stream`] checked against `manifest`).
    pub(super) fn open(dir: &Path, manifest: &Manifest) -> Result<IndexPack, RemoteError> {
        let path = dir.join(INDEX_PACK);
        let offsets = offsets(manifest);
        let total = offsets[manifest.shards.len()];
        let map = match map_sized(&path, total)? {
            Some(map) => map,
            // No shards, or no bytes of `.idx`: an empty map; every piece is then refused.
            None if total == 0 => memmap2::MmapOptions::new()
                .len(1)
                .map_anon()
                .and_then(|m| m.make_read_only())
                .map_err(io_err(&path))?,
            None => {
                return Err(RemoteError::Io {
                    path,
                    source: std::io::Error::other("the cached index pack is missing or not the manifest's size"),
                });
            }
        };
        let names = manifest
            .shards
            .iter()
            .map(|s| PathBuf::from(format!("{} ({}.idx)", path.display(), s.prefix)))
            .collect();
        Ok(IndexPack {
            map: Arc::new(map),
            offsets,
            names,
        })
    }

    /// Shard `shard`'s `.idx`, checked against a `.bin` of `bin_len` bytes (`bin`).
    pub(super) fn index(&self, shard: usize, bin: &Path, bin_len: u64) -> Result<IndexedIndex, IndexedError> {
        let (Some(&start), Some(&end), Some(name)) = (
            self.offsets.get(shard),
            self.offsets.get(shard + 1),
            self.names.get(shard),
        ) else {
            return Err(IndexedError::Truncated {
                path: bin.to_path_buf(),
                what: "a shard the manifest lists",
                needed: shard as u64 + 1,
                got: self.names.len() as u64,
            });
        };
        let at: Range<usize> = start as usize..end as usize;
        IndexedIndex::from_shared(self.map.clone(), at, name, bin, bin_len)
    }
}
