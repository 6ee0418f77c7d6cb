//! What the checkpoint benchmark saves: f32 tensors split by rows over the ranks, filled with
//! deterministic content so every loaded element can be checked.

use crate::error::{BenchError, Result};
use gantry_checkpoint::{DType, SliceSpec};
use gantry_sharding::splitmix::{GOLDEN_GAMMA, mix64};

/// Columns of f32 in every global tensor.
pub(crate) const COLS: u64 = 1024;
pub(crate) const ROW_BYTES: u64 = COLS * 4;
/// Per-rank slice sizes, cycled, in MiB.
const SLICE_MIB: [u64; 4] = [256, 64, 192, 128];
pub(crate) const MIB: u64 = 1 << 20;

/// One global tensor: `rows_per_rank × ranks` rows of `COLS` f32, rank r holding row block r.
pub(crate) struct TensorPlan {
    pub(crate) name: String,
    pub(crate) rows_per_rank: u64,
    seed: u64,
}

impl TensorPlan {
    pub(crate) fn global_shape(&self, ranks: usize) -> Vec<u64> {
        vec![self.rows_per_rank * ranks as u64, COLS]
    }

    pub(crate) fn slice(&self, rank: usize, ranks: usize) -> SliceSpec {
        SliceSpec {
            name: self.name.clone(),
            dtype: DType::F32,
            global_shape: self.global_shape(ranks),
            offsets: vec![self.rows_per_rank * rank as u64, 0],
            lengths: vec![self.rows_per_rank, COLS],
        }
    }

    pub(crate) fn slice_bytes(&self) -> u64 {
        self.rows_per_rank * ROW_BYTES
    }
}

/// Tensors whose row blocks add up to `per_rank` bytes on every rank.
pub(crate) fn plan_tensors(per_rank: u64) -> Vec<TensorPlan> {
    let mut out = Vec::new();
    let mut left = per_rank / ROW_BYTES;
    while left > 0 {
        let rows = (SLICE_MIB[out.len() % SLICE_MIB.len()] * MIB / ROW_BYTES).min(left);
        out.push(TensorPlan {
            name: format!("layers.{}.weight", out.len()),
            rows_per_rank: rows,
            seed: 0x5eed_0000 + out.len() as u64,
        });
        left -= rows;
    }
    out
}

/// Deterministic, non-constant f32 content: element `first + i` of the tensor with `seed`
/// (SplitMix64's finalizer over the global element index, mapped to [-0.5, 0.5)).
fn fill(seed: u64, first: u64, out: &mut [u8]) {
    let s = seed.wrapping_mul(GOLDEN_GAMMA);
    for (i, c) in out.chunks_exact_mut(4).enumerate() {
        let x = mix64((first + i as u64) ^ s);
        let v = (x >> 40) as f32 * (1.0 / (1u64 << 24) as f32) - 0.5;
        c.copy_from_slice(&v.to_le_bytes());
    }
}

/// Compare a whole loaded tensor with what was generated.
pub(crate) fn check_tensor(t: &TensorPlan, ranks: usize, bytes: &[u8]) -> Result<()> {
    check_rows(t, 0, t.rows_per_rank * ranks as u64, bytes)
}

/// Compare rank `rank`'s loaded row block with what was generated.
pub(crate) fn check_slice(t: &TensorPlan, rank: usize, bytes: &[u8]) -> Result<()> {
    check_rows(t, t.rows_per_rank * rank as u64, t.rows_per_rank, bytes)
}

/// Compare `rows` loaded rows starting at row `first_row` with what was generated, 4 MiB at a
/// time.
fn check_rows(t: &TensorPlan, first_row: u64, rows: u64, bytes: &[u8]) -> Result<()> {
    let expected = rows * ROW_BYTES;
    if bytes.len() as u64 != expected {
        return Err(BenchError::Mismatch(format!(
            "tensor {}: loaded {} bytes, expected {expected}",
            t.name,
            bytes.len()
        )));
    }
    let first = first_row * COLS;
    let mut want = vec![0u8; 4 << 20];
    for (k, got) in bytes.chunks(want.len()).enumerate() {
        let want = &mut want[..got.len()];
        fill(t.seed, first + (k * (4 << 20) / 4) as u64, want);
        if got != &want[..] {
            let at = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(0);
            return Err(BenchError::Mismatch(format!(
                "tensor {}: loaded bytes differ from the saved ones at byte {} of rows from {first_row}",
                t.name,
                k * (4 << 20) + at
            )));
        }
    }
    Ok(())
}

/// Every rank's slices of every tensor (`[rank][tensor]`), one generator thread per rank.
pub(crate) fn generate(tensors: &[TensorPlan], ranks: usize) -> Vec<Vec<Vec<u8>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                s.spawn(move || {
                    tensors
                        .iter()
                        .map(|t| {
                            let mut b = vec![0u8; t.slice_bytes() as usize];
                            fill(t.seed, t.rows_per_rank * r as u64 * COLS, &mut b);
                            b
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_cover_the_rank_share_in_cycling_slices() {
        let per_rank = 600 * MIB + 8 * ROW_BYTES;
        let plan = plan_tensors(per_rank);
        let sizes: Vec<u64> = plan.iter().map(|t| t.slice_bytes() / MIB).collect();
        assert_eq!(&sizes[..3], &[256, 64, 192]);
        assert_eq!(plan.iter().map(TensorPlan::slice_bytes).sum::<u64>(), per_rank);
        assert_eq!(plan[1].slice(1, 2).offsets, vec![plan[1].rows_per_rank, 0]);
    }

    #[test]
    fn generated_slices_check_out_and_a_flipped_byte_is_found() {
        let plan = plan_tensors(8 * ROW_BYTES);
        let data = generate(&plan, 2);
        let mut whole: Vec<u8> = data.iter().flat_map(|r| r[0].clone()).collect();
        check_tensor(&plan[0], 2, &whole).unwrap();
        whole[4 * ROW_BYTES as usize + 1] ^= 1;
        let err = check_tensor(&plan[0], 2, &whole).unwrap_err().to_string();
        assert!(err.contains(&format!("at byte {}", 4 * ROW_BYTES + 1)), "{err}");
    }
}
