//! Whole gantry tensors in, Hugging Face tensors out: each source is taken once, checked
//! against the shape the mapping expects, and copied, transposed or cut into row blocks.

use super::HfError;
use gantry_checkpoint::DType;
use gantry_checkpoint::export::ExportTensor;
use std::collections::HashMap;

/// A whole gantry tensor: its global shape and its f32 values as little-endian bytes.
pub type Source = (Vec<u64>, Vec<u8>);

/// The gantry tensors not yet exported and the exported tensors made so far, in the order the
/// mapping wrote them. Taking a source removes it, so no tensor is exported twice.
pub(super) struct Tensors {
    sources: HashMap<String, Source>,
    pub(super) out: Vec<ExportTensor>,
}

impl Tensors {
    pub(super) fn new(sources: HashMap<String, Source>) -> Tensors {
        Tensors {
            sources,
            out: Vec::new(),
        }
    }

    /// The bytes of source `name`, which must have exactly `shape` (and the bytes of it).
    pub(super) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>, HfError> {
        let (got, bytes) = self
            .sources
            .remove(name)
            .ok_or_else(|| HfError::MissingTensor { name: name.to_string() })?;
        let want: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        if got != want {
            return Err(HfError::Shape {
                name: name.to_string(),
                got,
                want,
            });
        }
        let numel = shape.iter().try_fold(1usize, |n, &x| n.checked_mul(x));
        if numel.and_then(|n| n.checked_mul(4)) != Some(bytes.len()) {
            return Err(HfError::Bytes {
                name: name.to_string(),
                bytes: bytes.len(),
                shape: want,
            });
        }
        Ok(bytes)
    }

    pub(super) fn put(&mut self, name: String, shape: Vec<usize>, bytes: Vec<u8>) {
        self.out.push(ExportTensor {
            name,
            dtype: DType::F32,
            shape,
            bytes,
        })
    }

    /// Export a tensor whose layout Hugging Face shares (vectors, embeddings, `[out, in]`
    /// linear weights of `nn.Linear` models).
    pub(super) fn copy(&mut self, from: &str, to: String, shape: &[usize]) -> Result<(), HfError> {
        let bytes = self.take(from, shape)?;
        self.put(to, shape.to_vec(), bytes);
        Ok(())
    }

    /// Export a linear layer's `[out, in]` weight as GPT-2 `Conv1D`'s `[in, out]`.
    pub(super) fn transposed(&mut self, from: &str, to: String, rows: usize, cols: usize) -> Result<(), HfError> {
        let bytes = self.take(from, &[rows, cols])?;
        self.put(to, vec![cols, rows], transpose(&bytes, rows, cols));
        Ok(())
    }

    /// Export a fused `[parts, rows, cols]` weight as one `[rows, cols]` tensor per name in
    /// `to`, in order (`qkv` → q, k, v; `gate_up` → gate, up).
    pub(super) fn split(&mut self, from: &str, to: &[String], rows: usize, cols: usize) -> Result<(), HfError> {
        let bytes = self.take(from, &[to.len(), rows, cols])?;
        let block = rows * cols * 4;
        for (i, name) in to.iter().enumerate() {
            self.put(
                name.clone(),
                vec![rows, cols],
                bytes[i * block..(i + 1) * block].to_vec(),
            );
        }
        Ok(())
    }
}

/// `[rows, cols]` f32 (little-endian bytes) → `[cols, rows]`.
pub(super) fn transpose(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (src, dst) = ((r * cols + c) * 4, (c * rows + r) * 4);
            out[dst..dst + 4].copy_from_slice(&bytes[src..src + 4]);
        }
    }
    out
}
