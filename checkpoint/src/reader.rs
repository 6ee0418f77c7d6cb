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
    pub(crate) tiles: HashMap<String, Vec<usize>>,
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

    pub(crate) fn dir(&self) -> String {
        step_dir(self.manifest.step)
    }

    pub(crate) fn object_url(&self, object: &str) -> String {
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
        // A large `vec![0; n]` is fresh memory the kernel zeroes as the read first touches
        // it (calloc of an mmapped chunk): no pass of user-space zeroing before the read.
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
