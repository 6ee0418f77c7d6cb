//! Reading a checkpoint that lies on this host's disk, the fast path of
//! [`Checkpoint::load`] and [`Checkpoint::verify`]: each saved entry that lands in its
//! request as one contiguous run is `pread` straight into the output and hashed there, on one
//! thread per core (page-cache copies are CPU-bound); other entries go through one reused
//! buffer. Every byte is read once and copied out of the page cache once; `verify` reads
//! through one [`PIECE`] per thread, hashing each piece while it is still in the core's cache.
//! Files are opened through [`crate::plain::open_plain`] (no symlink, only regular files).

use crate::boxes::{Region, copy_region};
use crate::error::CheckpointError;
use crate::format::{ChunkEntry, SliceSpec, xxh3_hex};
use crate::reader::{Checkpoint, VerifyReport};
use std::collections::HashMap;
use xxhash_rust::xxh3::Xxh3;

/// Bytes `verify` reads and hashes at a time: the hash reads each piece from the core's L2
/// cache right after `pread` copied it there, and the scratch buffer is faulted in once (an
/// entry-sized buffer cost a page fault per 4 KiB; 2.6x less CPU for 1 GiB). Loads read each
/// entry whole, since their destination is fresh memory anyway: reading it in pieces, hashed
/// as they came, measured 10-20% more CPU (more syscalls, the streaming hash).
const PIECE: usize = 256 << 10;

impl Checkpoint {
    /// [`Checkpoint::load`] from this host's disk: each saved entry that lands in its request
    /// as one contiguous run (a shard split along its first dimension, or the same layout) is
    /// read with `pread` straight there and hashed there, on a few threads at once (page-cache
    /// copies are CPU-bound); any other entry goes through one reused buffer and is copied
    /// region by region. Each byte is read once, and only once copied out of the page cache.
    pub(crate) fn load_local(
        &self,
        root: &std::path::Path,
        p: &crate::planner::Plan,
        requests: &[SliceSpec],
        out: &mut [Vec<u8>],
    ) -> Result<(), CheckpointError> {
        let mut direct: Vec<(usize, usize, std::ops::Range<usize>)> = Vec::new();
        let mut files = LocalFiles::default();
        let mut buf: Vec<u8> = Vec::new();
        for (index, read) in p.reads.iter().enumerate() {
            let e = &self.manifest.entries[read.entry];
            let entry_box = Region::new(e.slice.offsets.clone(), e.slice.lengths.clone());
            let elem = e.slice.dtype.size();
            if let [c] = read.copies.as_slice()
                && c.region == entry_box
            {
                let r = &requests[c.request];
                let span = contiguous_span(&Region::new(r.offsets.clone(), r.lengths.clone()), &c.region, elem);
                if let Some(span) = span.filter(|s| s.len() as u64 == read.len) {
                    direct.push((index, c.request, span));
                    continue;
                }
            }
            let len = read.len as usize;
            if buf.len() < len {
                // Fresh memory (zeroed by the kernel as it is touched), not a user-space
                // fill of bytes the read overwrites at once.
                buf = vec![0u8; len];
            }
            let data = &mut buf[..len];
            self.read_checked(files.open(self, root, &read.object)?, read.entry, data)?;
            for c in &read.copies {
                let r = &requests[c.request];
                let dst_box = Region::new(r.offsets.clone(), r.lengths.clone());
                copy_region(data, &entry_box, &mut out[c.request], &dst_box, &c.region, elem);
            }
        }
        let (jobs, overlapping) = carve(out, direct);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(jobs.len())
            .max(1);
        let mut lanes: Vec<Vec<(usize, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
        for (n, job) in jobs.into_iter().enumerate() {
            lanes[n % threads].push(job);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|lane| {
                    scope.spawn(move || -> Result<(), CheckpointError> {
                        let mut files = LocalFiles::default();
                        for (index, dst) in lane {
                            let read = &p.reads[index];
                            self.read_checked(files.open(self, root, &read.object)?, read.entry, dst)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CheckpointError::Io("a load thread panicked".into())))
            })
        })?;
        for (index, request, span) in overlapping {
            let read = &p.reads[index];
            let dst = &mut out[request][span];
            self.read_checked(files.open(self, root, &read.object)?, read.entry, dst)?;
        }
        Ok(())
    }

    /// Read manifest entry `entry` into `dst` (its length) and check its checksum.
    fn read_checked(&self, file: &std::fs::File, entry: usize, dst: &mut [u8]) -> Result<(), CheckpointError> {
        let e = &self.manifest.entries[entry];
        self.read_at(file, e, e.offset, dst)?;
        self.check_found(entry, xxh3_hex(dst))
    }

    /// Check manifest entry `entry`'s checksum, reading it through `scratch` a piece at a time.
    fn hash_entry(&self, file: &std::fs::File, entry: usize, scratch: &mut [u8]) -> Result<(), CheckpointError> {
        let e = &self.manifest.entries[entry];
        let mut hasher = Xxh3::new();
        let (mut at, end) = (e.offset, e.offset + e.len);
        while at < end {
            let piece = &mut scratch[..(end - at).min(PIECE as u64) as usize];
            self.read_at(file, e, at, piece)?;
            hasher.update(piece);
            at += piece.len() as u64;
        }
        self.check_found(entry, format!("{:016x}", hasher.digest()))
    }

    /// Fill `dst` from entry `e`'s object at `offset`; a file that ends first is
    /// [`CheckpointError::Truncated`] (short of the entry's end).
    fn read_at(
        &self,
        file: &std::fs::File,
        e: &ChunkEntry,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), CheckpointError> {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(dst, offset).map_err(|err| match err.kind() {
            std::io::ErrorKind::UnexpectedEof => CheckpointError::Truncated {
                object: self.object_url(&e.object),
                expected: e.offset + e.len,
                found: file.metadata().map_or(offset, |m| m.len()),
            },
            _ => CheckpointError::Io(format!("{}: {err}", self.object_url(&e.object))),
        })
    }

    fn check_found(&self, entry: usize, found: String) -> Result<(), CheckpointError> {
        let e = &self.manifest.entries[entry];
        if found != e.xxh3 {
            return Err(self.checksum_error(&e.object, entry, found));
        }
        Ok(())
    }

    /// [`Checkpoint::verify`] of a step on this host's disk: objects are read on one thread per
    /// core, each entry a [`PIECE`] at a time with `pread` into that thread's scratch piece
    /// and hashed there.
    pub(crate) fn verify_local(
        &self,
        root: &std::path::Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VerifyReport, CheckpointError> {
        let objects = &self.manifest.objects;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(objects.len())
            .max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(u64, usize), CheckpointError>>();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (next, done_tx) = (&next, done_tx.clone());
                scope.spawn(move || {
                    let (mut files, mut scratch) = (LocalFiles::default(), vec![0u8; PIECE]);
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(info) = objects.get(i) else { break };
                        let checked = self.verify_object(root, &info.object, &mut files, &mut scratch);
                        let failed = checked.is_err();
                        if done_tx.send(checked.map(|entries| (info.size, entries))).is_err() || failed {
                            break;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut report = VerifyReport::default();
            for checked in done_rx {
                let (bytes, entries) = checked?;
                report.objects += 1;
                report.entries += entries;
                report.bytes += bytes;
                progress(report.bytes);
            }
            Ok(report)
        })
    }

    /// Hash every entry of one local object; returns how many.
    fn verify_object(
        &self,
        root: &std::path::Path,
        object: &str,
        files: &mut LocalFiles,
        scratch: &mut [u8],
    ) -> Result<usize, CheckpointError> {
        let file = files.open(self, root, object)?;
        let tiles = &self.tiles[object];
        for &i in tiles {
            self.hash_entry(file, i, scratch)?;
        }
        Ok(tiles.len())
    }
}

/// Everything under `dir` is a directory or a regular file: a symlink or a special file
/// (FIFO, socket, device) in a checkpoint is refused by name, without following it.
/// Open chunk files of one step, each once (through [`crate::plain::open_plain`]: no symlink,
/// only a regular file).
#[derive(Default)]
struct LocalFiles(HashMap<String, std::fs::File>);

impl LocalFiles {
    fn open(
        &mut self,
        ckpt: &Checkpoint,
        root: &std::path::Path,
        object: &str,
    ) -> Result<&std::fs::File, CheckpointError> {
        if !self.0.contains_key(object) {
            let key = format!("{}/{}", ckpt.dir(), object);
            let file = crate::plain::open_plain(root, &key)
                .map_err(|err| CheckpointError::Io(format!("{}: {err}", ckpt.object_url(object))))?;
            self.0.insert(object.to_string(), file);
        }
        Ok(&self.0[object])
    }
}

type DirectRead = (usize, usize, std::ops::Range<usize>);

/// The output ranges of the direct reads `(read, request, span)` as disjoint mutable slices,
/// largest first. A span that overlaps an earlier one (only a manifest listing one region
/// twice could do that) is handed back, to be read after the others.
fn carve(out: &mut [Vec<u8>], mut direct: Vec<DirectRead>) -> (Vec<(usize, &mut [u8])>, Vec<DirectRead>) {
    direct.sort_by_key(|(_, request, span)| (*request, span.start));
    let mut jobs = Vec::with_capacity(direct.len());
    let mut overlapping = Vec::new();
    let mut rest: Vec<(usize, &mut [u8])> = out.iter_mut().map(|v| (0usize, v.as_mut_slice())).collect();
    for (index, request, span) in direct {
        let (at, tail) = std::mem::take(&mut rest[request]);
        match span.start.checked_sub(at) {
            Some(skip) if skip + span.len() <= tail.len() => {
                let (mine, after) = tail[skip..].split_at_mut(span.len());
                rest[request] = (span.end, after);
                jobs.push((index, mine));
            }
            _ => {
                rest[request] = (at, tail);
                overlapping.push((index, request, span));
            }
        }
    }
    jobs.sort_by_key(|(_, dst)| std::cmp::Reverse(dst.len()));
    (jobs, overlapping)
}

/// Where `region` (global coordinates, inside `dst_box`) lies in `dst_box`'s row-major bytes
/// when it is one contiguous run: every dimension after the last one it cuts is whole, every
/// one before that has length 1.
fn contiguous_span(dst_box: &Region, region: &Region, elem: usize) -> Option<std::ops::Range<usize>> {
    let dims = dst_box.lengths.len();
    if region.lengths.len() != dims || region.offsets.len() != dims {
        return None;
    }
    let cut = (0..dims)
        .rev()
        .find(|&d| region.lengths[d] != dst_box.lengths[d] || region.offsets[d] != dst_box.offsets[d]);
    if let Some(k) = cut
        && region.lengths[..k].iter().any(|&l| l != 1)
    {
        return None;
    }
    let mut start: u64 = 0;
    let mut stride: u64 = 1;
    for d in (0..dims).rev() {
        start = start.checked_add(region.offsets[d].checked_sub(dst_box.offsets[d])?.checked_mul(stride)?)?;
        stride = stride.checked_mul(dst_box.lengths[d])?;
    }
    let start = usize::try_from(start.checked_mul(elem as u64)?).ok()?;
    let len = usize::try_from(region.numel().checked_mul(elem as u64)?).ok()?;
    Some(start..start.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offsets: &[u64], lengths: &[u64]) -> Region {
        Region::new(offsets.to_vec(), lengths.to_vec())
    }

    #[test]
    fn carving_gives_disjoint_slices_and_hands_back_overlaps() {
        let mut out = vec![vec![0u8; 10], vec![0u8; 4]];
        let direct = vec![(0, 0, 5..10), (1, 0, 0..5), (2, 1, 0..4), (3, 0, 3..6)];
        let (jobs, overlapping) = carve(&mut out, direct);
        let mut got: Vec<(usize, usize)> = jobs.iter().map(|(i, d)| (*i, d.len())).collect();
        got.sort();
        assert_eq!(got, vec![(0, 5), (1, 5), (2, 4)]);
        assert_eq!(overlapping, vec![(3, 0, 3..6)]);
        for (i, dst) in jobs {
            dst.fill(i as u8 + 1);
        }
        assert_eq!(out[0], [2, 2, 2, 2, 2, 1, 1, 1, 1, 1]);
        assert_eq!(out[1], [3, 3, 3, 3]);
    }

    #[test]
    fn contiguous_spans_are_found_and_others_refused() {
        let whole = r(&[0, 0], &[4, 6]);
        // Rows 1..3 of a 4×6 tensor of 2-byte elements: bytes 12..36.
        assert_eq!(contiguous_span(&whole, &r(&[1, 0], &[2, 6]), 2), Some(12..36));
        // The whole box, and one row's tail.
        assert_eq!(contiguous_span(&whole, &whole, 4), Some(0..96));
        assert_eq!(contiguous_span(&whole, &r(&[2, 3], &[1, 3]), 1), Some(15..18));
        // Columns cut across two rows: not one run.
        assert_eq!(contiguous_span(&whole, &r(&[0, 0], &[2, 3]), 1), None);
        // A request that is itself a slice: offsets are relative to it.
        assert_eq!(
            contiguous_span(&r(&[4, 0], &[4, 6]), &r(&[5, 0], &[1, 6]), 1),
            Some(6..12)
        );
        // Scalars and mismatched ranks.
        assert_eq!(contiguous_span(&r(&[], &[]), &r(&[], &[]), 8), Some(0..8));
        assert_eq!(contiguous_span(&whole, &r(&[0], &[4]), 1), None);
    }
}
