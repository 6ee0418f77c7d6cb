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
}

/// What [`Checkpoint::verify`] checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub objects: usize,
    pub entries: usize,
    pub bytes: u64,
}

impl Checkpoint {
    /// Open a committed checkpoint. `Latest` is the newest committed step found by listing,
    /// not the `latest` pointer (kept for other tools): the pointer lags behind a commit if
    /// the committer died between the two writes.
    pub fn open(store: &Store, which: Which) -> Result<Checkpoint, CheckpointError> {
        let step = match which {
            Which::Step(s) => s,
            Which::Latest => *committed_steps(store)?
                .last()
                .ok_or_else(|| CheckpointError::NoCheckpoint {
                    url: store.url().to_string(),
                })?,
        };
        let object = format!("{}/{}/{MANIFEST}", store.url(), step_dir(step));
        let bytes =
            store
                .get(&format!("{}/{MANIFEST}", step_dir(step)))?
                .ok_or_else(|| CheckpointError::NotCommitted {
                    url: store.url().to_string(),
                    step,
                })?;
        let manifest = parse_manifest(&bytes, &object)?;
        if manifest.step != step {
            return Err(CheckpointError::Manifest {
                object,
                message: format!("says step {} but lives under step {step}", manifest.step),
            });
        }
        Ok(Checkpoint {
            store: store.clone(),
            manifest,
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
                    return Err(CheckpointError::Checksum {
                        object: self.object_url(object),
                        tensor: e.slice.name.clone(),
                        offset: e.offset,
                        end: e.offset + e.len,
                        expected: e.xxh3.clone(),
                        found,
                    });
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

    /// Re-read every chunk object and check every entry's checksum and every object's size.
    /// `progress` gets the bytes checked so far.
    pub fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, CheckpointError> {
        self.check_sizes(self.manifest.objects.iter().map(|o| o.object.as_str()))?;
        let mut by_object: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, e) in self.manifest.entries.iter().enumerate() {
            by_object.entry(e.object.as_str()).or_default().push(i);
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
            for &i in by_object.get(info.object.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
                let e = &self.manifest.entries[i];
                let found = xxh3_hex(&bytes[e.offset as usize..(e.offset + e.len) as usize]);
                if found != e.xxh3 {
                    return Err(CheckpointError::Checksum {
                        object: self.object_url(&info.object),
                        tensor: e.slice.name.clone(),
                        offset: e.offset,
                        end: e.offset + e.len,
                        expected: e.xxh3.clone(),
                        found,
                    });
                }
                report.entries += 1;
            }
            report.objects += 1;
            report.bytes += info.size;
            progress(report.bytes);
        }
        Ok(report)
    }
}

/// Parse and sanity-check a manifest: version, slices inside their shapes, entries inside
/// their objects, every tensor tiled by its slices.
pub fn parse_manifest(bytes: &[u8], object: &str) -> Result<Manifest, CheckpointError> {
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
    let sizes: HashMap<&str, u64> = m.objects.iter().map(|o| (o.object.as_str(), o.size)).collect();
    for e in &m.entries {
        e.slice.check().map_err(bad)?;
        let size = sizes.get(e.object.as_str()).ok_or_else(|| {
            bad(format!(
                "tensor {} points at unlisted object {}",
                e.slice.name, e.object
            ))
        })?;
        if e.len != e.slice.nbytes() || e.offset + e.len > *size {
            return Err(bad(format!(
                "tensor {}: bytes {}..{} do not fit its slice or object {}",
                e.slice.name,
                e.offset,
                e.offset + e.len,
                e.object
            )));
        }
    }
    check_complete(&m.entries).map_err(|e| bad(e.to_string()))?;
    Ok(m)
}
