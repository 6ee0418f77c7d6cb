//! Reading committed checkpoints: listing, opening (latest or a step), loading any set of
//! slices through the planner with ranged reads and checksums, and full verification.

use crate::boxes::{Region, copy_region};
use crate::error::CheckpointError;
use crate::format::{FORMAT_VERSION, MANIFEST, Manifest, SliceSpec, parse_step_dir, step_dir, xxh3_hex};
use crate::planner::{check_complete, coalesce, plan};
use crate::store::Store;
use std::collections::HashMap;

/// Which checkpoint to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Latest,
    Step(u64),
}

impl std::str::FromStr for Which {
    type Err = String;
    fn from_str(s: &str) -> Result<Which, String> {
        if s == "latest" {
            return Ok(Which::Latest);
        }
        s.strip_prefix("step-")
            .unwrap_or(s)
            .parse()
            .map(Which::Step)
            .map_err(|_| format!("{s:?} is neither `latest` nor a step number"))
    }
}

/// Steps with a committed manifest, ascending.
pub fn committed_steps(store: &Store) -> Result<Vec<u64>, CheckpointError> {
    let mut out = Vec::new();
    for d in store.list_dirs("")? {
        if let Some(step) = parse_step_dir(&d)
            && store.size(&format!("{d}/{MANIFEST}"))?.is_some()
        {
            out.push(step);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A committed checkpoint: its store and parsed manifest.
#[derive(Debug)]
pub struct Checkpoint {
    pub store: Store,
    pub manifest: Manifest,
    /// Each object's entries in byte order ([`object_tiles`]), found once when opened.
    tiles: HashMap<String, Vec<usize>>,
}

/// A committed step passed over by [`Checkpoint::open_latest`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SkippedStep {
    pub step: u64,
    pub reason: String,
}

/// What [`Checkpoint::verify`] checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub objects: usize,
    pub entries: usize,
    pub bytes: u64,
}

impl Checkpoint {
    /// Open a committed checkpoint. `Latest` is the newest committed step that opens (see
    /// [`Checkpoint::open_latest`]), not the `latest` pointer (kept for other tools): the
    /// pointer lags behind a commit if the committer died between the two writes.
    pub fn open(store: &Store, which: Which) -> Result<Checkpoint, CheckpointError> {
        match which {
            Which::Step(step) => Checkpoint::open_step(store, step),
            Which::Latest => {
                let (ckpt, skipped) = Checkpoint::open_latest(store)?;
                for s in &skipped {
                    tracing::warn!(url = store.url(), step = s.step, reason = %s.reason, "skipped an unreadable checkpoint");
                }
                Ok(ckpt)
            }
        }
    }

    /// The newest committed step whose manifest reads and checks, with the newer ones skipped
    /// on the way and why (a garbled manifest must not hide every older checkpoint).
    pub fn open_latest(store: &Store) -> Result<(Checkpoint, Vec<SkippedStep>), CheckpointError> {
        let mut skipped = Vec::new();
        let mut only_error = None;
        for step in committed_steps(store)?.into_iter().rev() {
            match Checkpoint::open_step(store, step) {
                Ok(ckpt) => return Ok((ckpt, skipped)),
                Err(e @ CheckpointError::Store { .. }) => return Err(e),
                Err(e) => {
                    skipped.push(SkippedStep {
                        step,
                        reason: e.to_string(),
                    });
                    only_error = Some(e);
                }
            }
        }
        match (skipped.len(), only_error) {
            (0, _) => Err(CheckpointError::NoCheckpoint {
                url: store.url().to_string(),
            }),
            // One step, and it does not read: its own error says the most.
            (1, Some(e)) => Err(e),
            _ => Err(CheckpointError::NoReadableCheckpoint {
                url: store.url().to_string(),
                skipped: skipped
                    .iter()
                    .map(|s| format!("step {}: {}", s.step, s.reason))
                    .collect(),
            }),
        }
    }

    fn open_step(store: &Store, step: u64) -> Result<Checkpoint, CheckpointError> {
        let object = format!("{}/{}/{MANIFEST}", store.url(), step_dir(step));
        let bytes =
            store
                .get(&format!("{}/{MANIFEST}", step_dir(step)))?
                .ok_or_else(|| CheckpointError::NotCommitted {
                    url: store.url().to_string(),
                    step,
                })?;
        let (manifest, tiles) = parse_checked(&bytes, &object)?;
        if manifest.step != step {
            return Err(CheckpointError::Manifest {
                object,
                message: format!("says step {} but lives under step {step}", manifest.step),
            });
        }
        Ok(Checkpoint {
            store: store.clone(),
            manifest,
            tiles,
        })
    }

    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    fn dir(&self) -> String {
        step_dir(self.manifest.step)
    }

    fn object_url(&self, object: &str) -> String {
        format!("{}/{}/{object}", self.store.url(), self.dir())
    }

    /// Check the objects a read will touch exist with their committed sizes.
    fn check_sizes<'a>(&self, objects: impl Iterator<Item = &'a str>) -> Result<(), CheckpointError> {
        let sizes: HashMap<&str, u64> = self
            .manifest
            .objects
            .iter()
            .map(|o| (o.object.as_str(), o.size))
            .collect();
        for object in objects {
            let expected = sizes[object];
            match self.store.size(&format!("{}/{object}", self.dir()))? {
                None => {
                    return Err(CheckpointError::MissingObject {
                        object: self.object_url(object),
                    });
                }
                Some(found) if found != expected => {
                    return Err(CheckpointError::Truncated {
                        object: self.object_url(object),
                        expected,
                        found,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The bytes of each requested slice (row-major over the slice), in request order.
    /// Only the saved entries that overlap a request are read, each checked against its
    /// checksum before any byte of it is used.
    pub fn load(&self, requests: &[SliceSpec]) -> Result<Vec<Vec<u8>>, CheckpointError> {
        let entries = &self.manifest.entries;
        let p = plan(entries, requests).map_err(|e| CheckpointError::Plan {
            url: format!("{}/{}", self.store.url(), self.dir()),
            source: e,
        })?;
        let mut objects: Vec<&str> = p.reads.iter().map(|r| r.object.as_str()).collect();
        objects.dedup();
        self.check_sizes(objects.into_iter())?;
        let mut out: Vec<Vec<u8>> = requests.iter().map(|r| vec![0u8; r.nbytes() as usize]).collect();
        if let Some(root) = self.store.local_root() {
            self.load_local(root, &p, requests, &mut out)?;
            return Ok(out);
        }
        let gets = coalesce(&p, 0);
        let ranges: Vec<(String, std::ops::Range<u64>)> = gets
            .iter()
            .map(|(o, off, len, _)| (format!("{}/{o}", self.dir()), *off..off + len))
            .collect();
        let fetched = self.store.get_ranges(&ranges)?;
        for ((object, start, len, members), bytes) in gets.iter().zip(fetched) {
            if bytes.len() as u64 != *len {
                return Err(CheckpointError::Truncated {
                    object: self.object_url(object),
                    expected: start + len,
                    found: start + bytes.len() as u64,
                });
            }
            for &m in members {
                let read = &p.reads[m];
                let e = &entries[read.entry];
                let a = (read.offset - start) as usize;
                let data = &bytes[a..a + read.len as usize];
                let found = xxh3_hex(data);
                if found != e.xxh3 {
                    return Err(self.checksum_error(object, read.entry, found));
                }
                let src_box = Region::new(e.slice.offsets.clone(), e.slice.lengths.clone());
                for c in &read.copies {
                    let r = &requests[c.request];
                    let dst_box = Region::new(r.offsets.clone(), r.lengths.clone());
                    copy_region(
                        data,
                        &src_box,
                        &mut out[c.request],
                        &dst_box,
                        &c.region,
                        e.slice.dtype.size(),
                    );
                }
            }
        }
        Ok(out)
    }

    /// [`Checkpoint::load`] from this host's disk: each saved entry that lands in its request
    /// as one contiguous run (a shard split along its first dimension, or the same layout) is
    /// read with `pread` straight there and hashed there, on a few threads at once (page-cache
    /// copies are CPU-bound); any other entry goes through one reused buffer and is copied
    /// region by region. Each byte is read once, and only once copied out of the page cache.
    fn load_local(
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
                buf.resize(len, 0);
            }
            let data = &mut buf[..len];
            self.read_entry(files.open(self, root, &read.object)?, read, data)?;
            self.check_entry(&read.object, read.entry, data)?;
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
                            self.read_entry(files.open(self, root, &read.object)?, read, dst)?;
                            self.check_entry(&read.object, read.entry, dst)?;
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
            self.read_entry(files.open(self, root, &read.object)?, read, dst)?;
            self.check_entry(&read.object, read.entry, dst)?;
        }
        Ok(())
    }

    fn read_entry(
        &self,
        file: &std::fs::File,
        read: &crate::planner::EntryRead,
        dst: &mut [u8],
    ) -> Result<(), CheckpointError> {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(dst, read.offset).map_err(|err| match err.kind() {
            std::io::ErrorKind::UnexpectedEof => CheckpointError::Truncated {
                object: self.object_url(&read.object),
                expected: read.offset + read.len,
                found: read.offset,
            },
            _ => CheckpointError::Io(format!("{}: {err}", self.object_url(&read.object))),
        })
    }

    fn check_entry(&self, object: &str, entry: usize, data: &[u8]) -> Result<(), CheckpointError> {
        let found = xxh3_hex(data);
        if found != self.manifest.entries[entry].xxh3 {
            return Err(self.checksum_error(object, entry, found));
        }
        Ok(())
    }

    /// Re-read every chunk object and check every entry's checksum and every object's size;
    /// in a local store, also refuse symlinks and special files anywhere under the step (a
    /// registry serves these files). `progress` gets the bytes checked so far.
    pub fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, CheckpointError> {
        if let Some(root) = self.store.local_root() {
            check_plain_files(&root.join(self.dir()))?;
        }
        self.check_sizes(self.manifest.objects.iter().map(|o| o.object.as_str()))?;
        if let Some(root) = self.store.local_root() {
            return self.verify_local(root, progress);
        }
        let mut report = VerifyReport::default();
        for info in &self.manifest.objects {
            let key = format!("{}/{}", self.dir(), info.object);
            let bytes = self.store.get(&key)?.ok_or_else(|| CheckpointError::MissingObject {
                object: self.object_url(&info.object),
            })?;
            if bytes.len() as u64 != info.size {
                return Err(CheckpointError::Truncated {
                    object: self.object_url(&info.object),
                    expected: info.size,
                    found: bytes.len() as u64,
                });
            }
            for &i in &self.tiles[info.object.as_str()] {
                let e = &self.manifest.entries[i];
                let found = xxh3_hex(&bytes[e.offset as usize..(e.offset + e.len) as usize]);
                if found != e.xxh3 {
                    return Err(self.checksum_error(&info.object, i, found));
                }
                report.entries += 1;
            }
            report.objects += 1;
            report.bytes += info.size;
            progress(report.bytes);
        }
        Ok(report)
    }

    /// [`Checkpoint::verify`] of a step on this host's disk: objects are read on one thread per
    /// core, each entry with `pread` into that thread's reused buffer and hashed there.
    fn verify_local(
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
                    let (mut files, mut buf) = (LocalFiles::default(), Vec::new());
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(info) = objects.get(i) else { break };
                        let checked = self.verify_object(root, &info.object, &mut files, &mut buf);
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
        buf: &mut Vec<u8>,
    ) -> Result<usize, CheckpointError> {
        let file = files.open(self, root, object)?;
        let tiles = &self.tiles[object];
        for &i in tiles {
            let e = &self.manifest.entries[i];
            let len = e.len as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut buf[..len], e.offset)
                .map_err(|err| match err.kind() {
                    std::io::ErrorKind::UnexpectedEof => CheckpointError::Truncated {
                        object: self.object_url(object),
                        expected: e.offset + e.len,
                        found: e.offset,
                    },
                    _ => CheckpointError::Io(format!("{}: {err}", self.object_url(object))),
                })?;
            self.check_entry(object, i, &buf[..len])?;
        }
        Ok(tiles.len())
    }

    /// The error for entry `entry` of `object` hashing to `found`.
    pub fn checksum_error(&self, object: &str, entry: usize, found: String) -> CheckpointError {
        let e = &self.manifest.entries[entry];
        CheckpointError::Checksum {
            object: self.object_url(object),
            tensor: e.slice.name.clone(),
            offset: e.offset,
            end: e.offset + e.len,
            expected: e.xxh3.clone(),
            found,
        }
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

fn check_plain_files(dir: &std::path::Path) -> Result<(), CheckpointError> {
    let io = |p: &std::path::Path, e: std::io::Error| CheckpointError::Io(format!("{}: {e}", p.display()));
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io(dir, e))?;
    if !meta.is_dir() {
        return Err(CheckpointError::NotPlainFile {
            path: dir.display().to_string(),
            kind: file_kind(&meta),
        });
    }
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        if meta.is_dir() {
            check_plain_files(&path)?;
        } else if !meta.is_file() {
            return Err(CheckpointError::NotPlainFile {
                path: path.display().to_string(),
                kind: file_kind(&meta),
            });
        }
    }
    Ok(())
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a directory"
    }
}

/// Parse and sanity-check a manifest: version, slices inside their shapes, object names that
/// stay inside the step, entries that tile their objects exactly (no gap, overlap or object
/// that no slice references: every byte served or loaded is covered by a checksum), every
/// tensor tiled by its slices. Every offset and size is checked arithmetic: a manifest is
/// data, not trusted to be sane.
pub fn parse_manifest(bytes: &[u8], object: &str) -> Result<Manifest, CheckpointError> {
    parse_checked(bytes, object).map(|(m, _)| m)
}

/// [`parse_manifest`], keeping each object's entries in byte order.
fn parse_checked(bytes: &[u8], object: &str) -> Result<(Manifest, HashMap<String, Vec<usize>>), CheckpointError> {
    let bad = |message: String| CheckpointError::Manifest {
        object: object.to_string(),
        message,
    };
    let m: Manifest =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a gantry checkpoint manifest: {e}")))?;
    if m.format_version > FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} is newer than this gantry reads ({FORMAT_VERSION})",
            m.format_version
        )));
    }
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for o in &m.objects {
        if !is_safe_key(&o.object) {
            return Err(bad(format!("object name {:?} leaves the step directory", o.object)));
        }
        if sizes.insert(o.object.as_str(), o.size).is_some() {
            return Err(bad(format!("object {} is listed twice", o.object)));
        }
    }
    for e in &m.entries {
        e.slice.check().map_err(bad)?;
        let size = sizes.get(e.object.as_str()).ok_or_else(|| {
            bad(format!(
                "tensor {} points at unlisted object {}",
                e.slice.name, e.object
            ))
        })?;
        let fits = e.offset.checked_add(e.len).is_some_and(|end| end <= *size);
        if e.len != e.slice.nbytes() || !fits {
            return Err(bad(format!(
                "tensor {}: bytes {}+{} do not fit its slice ({} bytes) or object {} ({size} bytes)",
                e.slice.name,
                e.offset,
                e.len,
                e.slice.nbytes(),
                e.object
            )));
        }
    }
    let tiles = object_tiles(&m)
        .map_err(bad)?
        .into_iter()
        .map(|(o, list)| (o.to_string(), list))
        .collect();
    check_complete(&m.entries).map_err(|e| bad(e.to_string()))?;
    Ok((m, tiles))
}

/// A key relative to a step directory that cannot name anything outside it: no empty, `.`
/// or `..` segments, no absolute path, no backslash.
pub fn is_safe_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && !key.contains('\\')
        && !key.contains('\0')
        && key.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// Each object's entries in byte order, checked to cover `[0, size)` exactly: the writer packs
/// slices back to back, so a gap, an overlap or an object no slice references means the
/// manifest lists bytes no checksum covers.
pub fn object_tiles(m: &Manifest) -> Result<HashMap<&str, Vec<usize>>, String> {
    let mut by_object: HashMap<&str, Vec<usize>> = m.objects.iter().map(|o| (o.object.as_str(), Vec::new())).collect();
    for (i, e) in m.entries.iter().enumerate() {
        if let Some(list) = by_object.get_mut(e.object.as_str()) {
            list.push(i);
        }
    }
    for o in &m.objects {
        let list = by_object.get_mut(o.object.as_str()).expect("every object has a list");
        if list.is_empty() {
            return Err(format!("object {} is referenced by no tensor slice", o.object));
        }
        list.sort_by_key(|&i| (m.entries[i].offset, m.entries[i].len));
        let mut at = 0u64;
        for &i in list.iter() {
            let e = &m.entries[i];
            if e.offset != at {
                return Err(format!(
                    "object {}: bytes {at}..{} are covered by no tensor slice (or slices overlap at tensor {})",
                    o.object,
                    e.offset.max(at),
                    e.slice.name
                ));
            }
            at += e.len; // cannot overflow: offset + len <= size was checked
        }
        if at != o.size {
            return Err(format!(
                "object {}: bytes {at}..{} are covered by no tensor slice",
                o.object, o.size
            ));
        }
    }
    Ok(by_object)
}

/// Checks a whole object's bytes against the manifest's checksums as they stream past (a
/// server sending an object checks it without holding it): feed the pieces in order from
/// byte 0; each entry is checked the moment its last byte arrives.
pub struct ObjectCheck {
    ckpt: std::sync::Arc<Checkpoint>,
    object: String,
    /// The object's entries in byte order (they tile it: [`object_tiles`]).
    entries: Vec<usize>,
    next: usize,
    at: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
}

impl ObjectCheck {
    /// `None` when the manifest does not list `object`.
    pub fn new(ckpt: std::sync::Arc<Checkpoint>, object: &str) -> Option<ObjectCheck> {
        let entries = ckpt.tiles.get(object)?.clone();
        Some(ObjectCheck {
            ckpt,
            object: object.to_string(),
            entries,
            next: 0,
            at: 0,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
        })
    }

    /// The next bytes of the object.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), CheckpointError> {
        while !bytes.is_empty() || self.entry_done() {
            let Some(&i) = self.entries.get(self.next) else {
                return Err(CheckpointError::Truncated {
                    object: self.ckpt.object_url(&self.object),
                    expected: self.at,
                    found: self.at + bytes.len() as u64,
                });
            };
            let e = &self.ckpt.manifest.entries[i];
            let take = ((e.offset + e.len - self.at) as usize).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.at += take as u64;
            bytes = &bytes[take..];
            if self.at == e.offset + e.len {
                let found = format!("{:016x}", self.hasher.digest());
                if found != e.xxh3 {
                    return Err(self.ckpt.checksum_error(&self.object, i, found));
                }
                self.hasher.reset();
                self.next += 1;
            }
        }
        Ok(())
    }

    /// Is the entry at `next` complete without more bytes (a zero-length slice)?
    fn entry_done(&self) -> bool {
        self.entries
            .get(self.next)
            .is_some_and(|&i| self.ckpt.manifest.entries[i].offset + self.ckpt.manifest.entries[i].len == self.at)
    }

    /// All bytes were fed and every entry checked.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        self.feed(&[])?;
        if self.next != self.entries.len() {
            let size = self
                .ckpt
                .manifest
                .objects
                .iter()
                .find(|o| o.object == self.object)
                .map_or(0, |o| o.size);
            return Err(CheckpointError::Truncated {
                object: self.ckpt.object_url(&self.object),
                expected: size,
                found: self.at,
            });
        }
        Ok(())
    }
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
