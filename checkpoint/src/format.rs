//! The on-storage format (version [`FORMAT_VERSION`], described in docs/checkpoint-format.md).
//!
//! ```text
//! <root>/step-00001200/rank-00003/<attempt>-0000.bin   tensor slices, back to back
//! <root>/step-00001200/rank-00003.json             that rank's index: entries + rank state
//! <root>/step-00001200/manifest.json               written last, create-if-absent: the commit
//! <root>/latest                                    "step-00001200", rewritten after a commit
//! ```
//!
//! A step prefix without `manifest.json` does not exist for readers; rank indexes are how the
//! committing rank learns that every rank's chunks are durable.

use serde::{Deserialize, Serialize};

/// Bumped on any change a reader of the previous version would misread.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const LATEST: &str = "latest";

/// Element type of a saved tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    Bf16,
    F16,
    I64,
    I32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }
}

/// A hyper-rectangle of a named global tensor: `offsets[d] .. offsets[d] + lengths[d]` along
/// each dimension, stored row-major.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SliceSpec {
    pub name: String,
    pub dtype: DType,
    pub global_shape: Vec<u64>,
    pub offsets: Vec<u64>,
    pub lengths: Vec<u64>,
}

impl SliceSpec {
    /// The whole of a tensor.
    pub fn full(name: &str, dtype: DType, global_shape: &[u64]) -> SliceSpec {
        SliceSpec {
            name: name.to_string(),
            dtype,
            global_shape: global_shape.to_vec(),
            offsets: vec![0; global_shape.len()],
            lengths: global_shape.to_vec(),
        }
    }
    pub fn numel(&self) -> u64 {
        self.lengths.iter().product()
    }
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
    /// Ranks agree, the slice lies inside the global shape and the whole tensor's byte count
    /// fits in a `u64` (so every product of its sizes can be computed without overflow).
    pub fn check(&self) -> Result<(), String> {
        let n = self.global_shape.len();
        let global_bytes = self
            .global_shape
            .iter()
            .try_fold(self.dtype.size() as u64, |acc, &d| acc.checked_mul(d));
        if global_bytes.is_none() {
            return Err(format!(
                "tensor {}: global shape {:?} of {:?} is too large to address",
                self.name, self.global_shape, self.dtype
            ));
        }
        if self.offsets.len() != n || self.lengths.len() != n {
            return Err(format!(
                "tensor {}: offsets {:?} / lengths {:?} do not match the {n}-d global shape {:?}",
                self.name, self.offsets, self.lengths, self.global_shape
            ));
        }
        for d in 0..n {
            if self.offsets[d]
                .checked_add(self.lengths[d])
                .is_none_or(|end| end > self.global_shape[d])
            {
                return Err(format!(
                    "tensor {}: slice {:?}+{:?} leaves the global shape {:?} in dimension {d}",
                    self.name, self.offsets, self.lengths, self.global_shape
                ));
            }
        }
        Ok(())
    }
}

/// One saved slice: where its bytes are and their checksum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkEntry {
    #[serde(flatten)]
    pub slice: SliceSpec,
    /// Object key relative to the step prefix, e.g. `rank-00003/5f3a9c-0000.bin`.
    pub object: String,
    /// Byte range `[offset, offset + len)` of the object.
    pub offset: u64,
    pub len: u64,
    /// xxh3-64 of those bytes, as 16 hex digits.
    pub xxh3: String,
}

/// Each chunk object's total size, so a truncated object is caught without reading it all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub object: String,
    pub size: u64,
}

/// What one rank wrote for a step (`rank-NNNNN.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankIndex {
    pub format_version: u32,
    pub step: u64,
    pub rank: usize,
    /// The save attempt that wrote it; the committer ignores indexes of other attempts.
    pub attempt: String,
    pub entries: Vec<ChunkEntry>,
    pub objects: Vec<ObjectInfo>,
    /// Rank-local state to restore (RNG and the like), opaque to this crate.
    pub state: serde_json::Value,
}

/// Who produced a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub job_id: String,
    /// xxh3 of the job spec the run was started with.
    pub spec_hash: String,
    pub gantry_version: String,
}

/// One model parameter and the dimension tensor parallelism splits it along (`None`: every
/// TP rank holds all of it). With this list a reader can cut any TP degree's share of the
/// model without knowing the model's code ([`tp_share`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    pub name: String,
    #[serde(default)]
    pub tp_split: Option<usize>,
}

/// The rectangle of a `global_shape` tensor that TP rank `rank` of `tp` holds when the tensor
/// is split evenly along `split` (or all of it when `split` is `None` or `tp` is 1).
pub fn tp_share(
    global_shape: &[u64],
    split: Option<usize>,
    tp: u64,
    rank: u64,
) -> Result<(Vec<u64>, Vec<u64>), String> {
    let mut offsets = vec![0; global_shape.len()];
    let mut lengths = global_shape.to_vec();
    if tp == 0 || rank >= tp {
        return Err(format!("TP rank {rank} of {tp} does not exist"));
    }
    if let Some(d) = split.filter(|_| tp > 1) {
        let Some(&n) = global_shape.get(d) else {
            return Err(format!("split dimension {d} of a {}-d tensor", global_shape.len()));
        };
        if n % tp != 0 {
            return Err(format!("dimension {d} ({n}) does not divide into {tp} TP parts"));
        }
        lengths[d] = n / tp;
        offsets[d] = rank * lengths[d];
    }
    Ok((offsets, lengths))
}

/// Job-wide facts the committing rank supplies; opaque JSON where it belongs to the trainer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub tokens_seen: u64,
    /// The model section of the job spec: what the tensors mean.
    pub model: serde_json::Value,
    /// The parallel layout that wrote the checkpoint (dp, tp, pp, ...).
    pub layout: serde_json::Value,
    /// How optimizer state is named and laid out (which tensors, ZeRO or not).
    pub optimizer: serde_json::Value,
    /// The data sampler's position after `step` steps.
    pub data_cursor: serde_json::Value,
    pub lineage: Lineage,
    /// The model's parameters (not optimizer state) and how TP splits each; empty in
    /// checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamLayout>,
    /// What the model was trained on, for evaluation and serving (the trainer's: dataset
    /// path, validation split, tokenizer kind); `null` when unknown.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `manifest.json`: the commit record of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    /// Seconds since the Unix epoch when it was committed.
    pub committed_at: f64,
    pub world_size: usize,
    /// The save attempt that committed it.
    #[serde(default)]
    pub attempt: String,
    /// The job's attempt that committed it, when the save was fenced ([`crate::fence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<crate::fence::Fence>,
    #[serde(flatten)]
    pub job: JobState,
    /// Per-rank state, indexed by rank.
    pub ranks: Vec<serde_json::Value>,
    pub entries: Vec<ChunkEntry>,
    pub objects: Vec<ObjectInfo>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }
    /// Distinct tensor names with their dtype and global shape, in first-seen order.
    pub fn tensors(&self) -> Vec<(String, DType, Vec<u64>)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for e in &self.entries {
            if seen.insert(e.slice.name.clone()) {
                out.push((e.slice.name.clone(), e.slice.dtype, e.slice.global_shape.clone()));
            }
        }
        out
    }
}

/// Files a model needs beside its tensors (its tokenizer) are stored as whole `u8` tensors
/// under this prefix (`asset/tokenizer.json`), so chunking, checksums, verification,
/// downloads and retention treat them like any tensor.
pub const ASSET_PREFIX: &str = "asset/";

/// `step-00001200`.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-NNNNNNNN` directory name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn rank_index_name(rank: usize) -> String {
    format!("rank-{rank:05}.json")
}

/// A chunk object of one save attempt. The attempt id keeps a restarted job's writes apart
/// from a crashed attempt's leftovers under the same step.
pub fn chunk_name(rank: usize, attempt: &str, chunk: usize) -> String {
    format!("rank-{rank:05}/{attempt}-{chunk:04}.bin")
}

pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dirs_round_trip_and_reject_lookalikes() {
        assert_eq!(step_dir(1200), "step-00001200");
        assert_eq!(parse_step_dir("step-00001200"), Some(1200));
        assert_eq!(parse_step_dir("step-123456789"), Some(123_456_789));
        for bad in ["step-12", "step-0000120x", "steps-00001200", "step-", "latest"] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
    }

    #[test]
    fn slice_checks_name_the_tensor() {
        let mut s = SliceSpec::full("w", DType::F32, &[4, 6]);
        assert!(s.check().is_ok());
        s.offsets = vec![2, 0];
        let e = s.check().unwrap_err();
        assert!(e.contains("tensor w") && e.contains("dimension 0"), "{e}");
        s.lengths = vec![1];
        assert!(s.check().unwrap_err().contains("do not match"));
    }

    #[test]
    fn tp_shares_tile_the_split_dimension() {
        assert_eq!(tp_share(&[8, 6], None, 4, 3).unwrap(), (vec![0, 0], vec![8, 6]));
        assert_eq!(tp_share(&[8, 6], Some(1), 1, 0).unwrap(), (vec![0, 0], vec![8, 6]));
        assert_eq!(
            tp_share(&[3, 8, 6], Some(1), 2, 1).unwrap(),
            (vec![0, 4, 0], vec![3, 4, 6])
        );
        for tp in [1u64, 2, 3, 6] {
            let mut next = 0;
            for r in 0..tp {
                let (o, l) = tp_share(&[4, 6], Some(1), tp, r).unwrap();
                assert_eq!((o[1], o[0], l[0]), (next, 0, 4));
                next += l[1];
            }
            assert_eq!(next, 6);
        }
        assert!(
            tp_share(&[4, 6], Some(1), 4, 0)
                .unwrap_err()
                .contains("does not divide")
        );
        assert!(tp_share(&[4], Some(1), 2, 0).unwrap_err().contains("split dimension 1"));
        assert!(tp_share(&[4], Some(0), 2, 2).unwrap_err().contains("does not exist"));
    }

    #[test]
    fn manifest_round_trips_through_json() {
        let entry = ChunkEntry {
            slice: SliceSpec::full("w", DType::Bf16, &[2, 3]),
            object: chunk_name(1, "a1", 0),
            offset: 0,
            len: 12,
            xxh3: xxh3_hex(&[0; 12]),
        };
        let m = Manifest {
            format_version: FORMAT_VERSION,
            step: 7,
            committed_at: 1.5,
            world_size: 2,
            attempt: "a1".into(),
            fence: Some(crate::fence::Fence::new("12", 3).unwrap()),
            job: JobState {
                tokens_seen: 99,
                model: serde_json::json!({"d_model": 8}),
                ..JobState::default()
            },
            ranks: vec![serde_json::json!({}), serde_json::json!({"rng": 3})],
            entries: vec![entry],
            objects: vec![ObjectInfo {
                object: chunk_name(1, "a1", 0),
                size: 12,
            }],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"dtype\":\"bf16\""), "{text}");
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        // A manifest from before fences reads as unfenced, and an unfenced one writes none.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("fence");
        let back: Manifest = serde_json::from_value(old).unwrap();
        assert_eq!(back.fence, None);
        assert!(!serde_json::to_string(&back).unwrap().contains("fence"));
        assert_eq!(back.tensors(), vec![("w".to_string(), DType::Bf16, vec![2, 3])]);
    }
}
