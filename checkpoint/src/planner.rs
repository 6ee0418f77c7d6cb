//! The reshard planner: a pure function from what was saved (chunk entries, each a slice of a
//! global tensor) and what a rank asks for (slices in its own layout) to which byte ranges
//! to read and which rectangles to copy where. It knows nothing about layouts: TP, PP, DP
//! and ZeRO-1 all reduce to "this rectangle of that tensor".
//!
//! A saved entry is read whole (its checksum covers the entry, and entries are a rank's
//! shard, so a reader never fetches another chunk object's unrelated bytes).

use crate::boxes::Region;
use crate::format::{ChunkEntry, DType, SliceSpec};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("tensor {name} is not in the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name}: the checkpoint has global shape {saved:?}, the model wants {requested:?}")]
    ShapeMismatch {
        name: String,
        saved: Vec<u64>,
        requested: Vec<u64>,
    },
    #[error("tensor {name}: the checkpoint stores {saved:?}, the model wants {requested:?}")]
    DTypeMismatch {
        name: String,
        saved: DType,
        requested: DType,
    },
    #[error("tensor {name}: {missing} of {wanted} requested elements at {offsets:?}+{lengths:?} are in no saved chunk")]
    Uncovered {
        name: String,
        offsets: Vec<u64>,
        lengths: Vec<u64>,
        missing: u64,
        wanted: u64,
    },
    #[error("tensor {name}: saved slices overlap ({first} and {second})")]
    Overlap {
        name: String,
        first: String,
        second: String,
    },
    #[error("bad requested slice: {0}")]
    BadRequest(String),
}

/// Copy `region` (global coordinates) of a read entry into request `request`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    pub request: usize,
    pub region: Region,
}

/// Read entry `entry` of the manifest (bytes `offset..offset+len` of `object`) and copy parts
/// of it into requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRead {
    pub entry: usize,
    pub object: String,
    pub offset: u64,
    pub len: u64,
    pub copies: Vec<Copy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ordered by object, then offset, so adjacent reads of one object can be merged.
    pub reads: Vec<EntryRead>,
}

impl Plan {
    pub fn bytes_to_read(&self) -> u64 {
        self.reads.iter().map(|r| r.len).sum()
    }
}

fn region_of(s: &SliceSpec) -> Region {
    Region::new(s.offsets.clone(), s.lengths.clone())
}

/// Saved entries per tensor name, identical slices (replicas) dropped, overlaps rejected.
fn index_entries(entries: &[ChunkEntry]) -> Result<HashMap<&str, Vec<usize>>, PlanError> {
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let list = by_name.entry(e.slice.name.as_str()).or_default();
        let r = region_of(&e.slice);
        let mut duplicate = false;
        for &j in list.iter() {
            let other = &entries[j].slice;
            if other.offsets == e.slice.offsets && other.lengths == e.slice.lengths {
                duplicate = true;
                break;
            }
            if region_of(other).intersect(&r).is_some() {
                return Err(PlanError::Overlap {
                    name: e.slice.name.clone(),
                    first: format!("{:?}+{:?}", other.offsets, other.lengths),
                    second: format!("{:?}+{:?}", e.slice.offsets, e.slice.lengths),
                });
            }
        }
        if !duplicate {
            list.push(i);
        }
    }
    Ok(by_name)
}

/// Check that the saved slices of every tensor are consistent (same shape and dtype, no
/// overlaps) and tile the whole tensor.
pub fn check_complete(entries: &[ChunkEntry]) -> Result<(), PlanError> {
    let mut wanted: Vec<SliceSpec> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in entries {
        if seen.insert(e.slice.name.as_str()) {
            wanted.push(SliceSpec::full(&e.slice.name, e.slice.dtype, &e.slice.global_shape));
        }
    }
    plan(entries, &wanted).map(|_| ())
}

/// Plan reading `requests` from `entries`.
pub fn plan(entries: &[ChunkEntry], requests: &[SliceSpec]) -> Result<Plan, PlanError> {
    let by_name = index_entries(entries)?;
    let mut reads: HashMap<usize, Vec<Copy>> = HashMap::new();
    for (ri, req) in requests.iter().enumerate() {
        req.check().map_err(PlanError::BadRequest)?;
        let ids = by_name
            .get(req.name.as_str())
            .ok_or_else(|| PlanError::MissingTensor { name: req.name.clone() })?;
        let want = region_of(req);
        let mut covered = 0u64;
        for &i in ids {
            let saved = &entries[i].slice;
            if saved.global_shape != req.global_shape {
                return Err(PlanError::ShapeMismatch {
                    name: req.name.clone(),
                    saved: saved.global_shape.clone(),
                    requested: req.global_shape.clone(),
                });
            }
            if saved.dtype != req.dtype {
                return Err(PlanError::DTypeMismatch {
                    name: req.name.clone(),
                    saved: saved.dtype,
                    requested: req.dtype,
                });
            }
            if let Some(region) = region_of(saved).intersect(&want) {
                covered += region.numel();
                reads.entry(i).or_default().push(Copy { request: ri, region });
            }
        }
        if covered != want.numel() {
            return Err(PlanError::Uncovered {
                name: req.name.clone(),
                offsets: req.offsets.clone(),
                lengths: req.lengths.clone(),
                missing: want.numel() - covered,
                wanted: want.numel(),
            });
        }
    }
    let mut reads: Vec<EntryRead> = reads
        .into_iter()
        .map(|(i, copies)| EntryRead {
            entry: i,
            object: entries[i].object.clone(),
            offset: entries[i].offset,
            len: entries[i].len,
            copies,
        })
        .collect();
    reads.sort_by(|a, b| (a.object.as_str(), a.offset).cmp(&(b.object.as_str(), b.offset)));
    Ok(Plan { reads })
}

/// Merge reads of one object whose byte ranges touch into ranged GETs of at most `max_gap`
/// wasted bytes between them: `(object, offset, len, indices into plan.reads)`.
pub fn coalesce(plan: &Plan, max_gap: u64) -> Vec<(String, u64, u64, Vec<usize>)> {
    let mut out: Vec<(String, u64, u64, Vec<usize>)> = Vec::new();
    for (i, r) in plan.reads.iter().enumerate() {
        if let Some(last) = out.last_mut()
            && last.0 == r.object
            && r.offset >= last.1 + last.2
            && r.offset - (last.1 + last.2) <= max_gap
        {
            last.2 = r.offset + r.len - last.1;
            last.3.push(i);
            continue;
        }
        out.push((r.object.clone(), r.offset, r.len, vec![i]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::xxh3_hex;

    /// Entries of a tensor cut into `parts` along `dim`, one object per part.
    fn split(name: &str, shape: &[u64], dim: usize, parts: u64) -> Vec<ChunkEntry> {
        let step = shape[dim] / parts;
        (0..parts)
            .map(|p| {
                let mut offsets = vec![0; shape.len()];
                offsets[dim] = p * step;
                let mut lengths = shape.to_vec();
                lengths[dim] = step;
                let slice = SliceSpec {
                    name: name.into(),
                    dtype: DType::F32,
                    global_shape: shape.to_vec(),
                    offsets,
                    lengths,
                };
                let len = slice.nbytes();
                ChunkEntry {
                    slice,
                    object: format!("rank-{p:05}/chunk-0000.bin"),
                    offset: 0,
                    len,
                    xxh3: xxh3_hex(&[]),
                }
            })
            .collect()
    }

    fn want(name: &str, shape: &[u64], offsets: &[u64], lengths: &[u64]) -> SliceSpec {
        SliceSpec {
            name: name.into(),
            dtype: DType::F32,
            global_shape: shape.to_vec(),
            offsets: offsets.to_vec(),
            lengths: lengths.to_vec(),
        }
    }

    /// (request, offsets, lengths) of one copy.
    type CopySummary = (usize, Vec<u64>, Vec<u64>);

    fn summary(p: &Plan) -> Vec<(String, Vec<CopySummary>)> {
        p.reads
            .iter()
            .map(|r| {
                (
                    r.object.clone(),
                    r.copies
                        .iter()
                        .map(|c| (c.request, c.region.offsets.clone(), c.region.lengths.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn tp2_rows_to_tp4_rows_reads_one_part_each() {
        let saved = split("w", &[8, 4], 0, 2);
        let p = plan(&saved, &[want("w", &[8, 4], &[6, 0], &[2, 4])]).unwrap();
        assert_eq!(
            summary(&p),
            vec![("rank-00001/chunk-0000.bin".into(), vec![(0, vec![6, 0], vec![2, 4])])]
        );
        assert_eq!(p.bytes_to_read(), 4 * 4 * 4);
    }

    #[test]
    fn tp2_columns_to_tp1_reads_both_parts() {
        let saved = split("w", &[8, 4], 1, 2);
        let p = plan(&saved, &[want("w", &[8, 4], &[0, 0], &[8, 4])]).unwrap();
        assert_eq!(
            summary(&p),
            vec![
                ("rank-00000/chunk-0000.bin".into(), vec![(0, vec![0, 0], vec![8, 2])]),
                ("rank-00001/chunk-0000.bin".into(), vec![(0, vec![0, 2], vec![8, 2])]),
            ]
        );
    }

    #[test]
    fn tp4_columns_to_tp2_rows_crosses_cuts() {
        let saved = split("w", &[4, 8], 1, 4);
        let p = plan(&saved, &[want("w", &[4, 8], &[2, 0], &[2, 8])]).unwrap();
        let s = summary(&p);
        assert_eq!(s.len(), 4);
        for (i, (_, copies)) in s.iter().enumerate() {
            assert_eq!(copies, &vec![(0, vec![2, 2 * i as u64], vec![2, 2])]);
        }
    }

    #[test]
    fn zero1_flat_shards_load_into_whole_tensors() {
        // A [3,4] tensor saved as three ZeRO shards of a flat bucket: 0..5, 5..9, 9..12.
        let shape = [3u64, 4];
        let mut entries = Vec::new();
        for (rank, (a, b)) in [(0u64, 5u64), (5, 9), (9, 12)].into_iter().enumerate() {
            for r in crate::boxes::flat_range_to_regions(&shape, a, b) {
                let slice = want("m", &shape, &r.offsets, &r.lengths);
                entries.push(ChunkEntry {
                    len: slice.nbytes(),
                    slice,
                    object: format!("rank-{rank:05}/chunk-0000.bin"),
                    offset: 0,
                    xxh3: String::new(),
                });
            }
        }
        check_complete(&entries).unwrap();
        let p = plan(&entries, &[want("m", &shape, &[0, 0], &[3, 4])]).unwrap();
        let copied: u64 = p.reads.iter().flat_map(|r| &r.copies).map(|c| c.region.numel()).sum();
        assert_eq!(copied, 12);
    }

    #[test]
    fn replicas_are_read_once_and_gaps_are_named() {
        let mut saved = split("w", &[4, 4], 0, 2);
        saved.push(saved[0].clone()); // a DP replica wrote the same slice
        let p = plan(&saved, &[want("w", &[4, 4], &[0, 0], &[4, 4])]).unwrap();
        assert_eq!(p.reads.len(), 2);
        saved.remove(1);
        saved.pop();
        let e = plan(&saved, &[want("w", &[4, 4], &[0, 0], &[4, 4])]).unwrap_err();
        assert_eq!(
            e,
            PlanError::Uncovered {
                name: "w".into(),
                offsets: vec![0, 0],
                lengths: vec![4, 4],
                missing: 8,
                wanted: 16
            }
        );
        assert!(check_complete(&saved).is_err());
    }

    #[test]
    fn mismatches_are_errors_not_wrong_loads() {
        let saved = split("w", &[8, 4], 0, 2);
        assert!(matches!(
            plan(&saved, &[want("v", &[8, 4], &[0, 0], &[8, 4])]),
            Err(PlanError::MissingTensor { .. })
        ));
        assert!(matches!(
            plan(&saved, &[want("w", &[8, 8], &[0, 0], &[8, 4])]),
            Err(PlanError::ShapeMismatch { .. })
        ));
        let mut bf = want("w", &[8, 4], &[0, 0], &[8, 4]);
        bf.dtype = DType::Bf16;
        assert!(matches!(plan(&saved, &[bf]), Err(PlanError::DTypeMismatch { .. })));
        assert!(matches!(
            plan(&saved, &[want("w", &[8, 4], &[6, 0], &[4, 4])]),
            Err(PlanError::BadRequest(_))
        ));
        let mut overlapping = saved.clone();
        overlapping[1].slice.offsets = vec![2, 0];
        assert!(matches!(check_complete(&overlapping), Err(PlanError::Overlap { .. })));
    }

    #[test]
    fn adjacent_reads_of_an_object_coalesce() {
        let mut saved = split("w", &[4, 4], 0, 2);
        saved[1].object = saved[0].object.clone();
        saved[1].offset = saved[0].len;
        let p = plan(&saved, &[want("w", &[4, 4], &[0, 0], &[4, 4])]).unwrap();
        let merged = coalesce(&p, 0);
        assert_eq!(merged.len(), 1);
        assert_eq!((merged[0].1, merged[0].2), (0, 64));
    }
}
