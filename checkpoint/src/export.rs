//! Whole tensors out of gantry: one safetensors file, for tools outside gantry. Which
//! tensors and under which names is the caller's business (the trainer maps its names to
//! Hugging Face GPT-2's); this writes them atomically (temporary name, then rename).

use crate::error::CheckpointError;
use crate::format::DType;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// A whole tensor to export.
pub struct ExportTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::Bf16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
    }
}

/// Write `tensors` to `path` as safetensors with `metadata` in its header.
pub fn write_safetensors(
    tensors: &[ExportTensor],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<u64, CheckpointError> {
    let io = |e: String| CheckpointError::Io(format!("{}: {e}", path.display()));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| io(format!("tensor {}: {e}", t.name)))
        })
        .collect::<Result<_, _>>()?;
    let tmp = path.with_extension("safetensors.partial");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| io(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| io(e.to_string()))?;
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_safetensors_reader() {
        let dir = std::env::temp_dir().join(format!("gantry-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let w: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = ExportTensor {
            name: "h.0.attn.c_attn.weight".into(),
            dtype: DType::F32,
            shape: vec![2, 3],
            bytes: w.clone(),
        };
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&[t], meta, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor("h.0.attn.c_attn.weight").unwrap();
        assert_eq!(v.shape(), &[2, 3]);
        assert_eq!(v.data(), &w[..]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
