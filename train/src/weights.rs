//! Loading a model's weights (parameters only, no optimizer state) for evaluation and
//! serving, from a committed checkpoint or from the registry's per-TP-rank safetensors
//! (`GET …/tensors?tp=T&rank=R`). Either way every parameter this rank holds must arrive
//! with exactly its global shape and slice, or the load fails naming the tensor.

use crate::checkpointing::TOKENIZER_ASSET;
use crate::error::TrainError;
use crate::model::Model;
use gantry_checkpoint::{Checkpoint, DType, SliceSpec};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// The slice of each parameter this rank's model holds (a tied copy shares its name).
pub fn requests(model: &Model) -> Vec<SliceSpec> {
    model
        .params
        .iter()
        .map(|(_, p)| SliceSpec {
            name: p.name.clone(),
            dtype: DType::F32,
            global_shape: p.global_shape.iter().map(|&d| d as u64).collect(),
            offsets: p.offsets.iter().map(|&d| d as u64).collect(),
            lengths: p.local_shape().iter().map(|&d| d as u64).collect(),
        })
        .collect()
}

fn set(model: &Model, index: usize, bytes: &[u8]) -> Result<(), TrainError> {
    let (_, p) = model.params.iter().nth(index).expect("index from requests()");
    if bytes.len() != p.numel() * 4 {
        return Err(TrainError::Internal(format!(
            "tensor {}: {} bytes for {} f32 values",
            p.name,
            bytes.len(),
            p.numel()
        )));
    }
    let src = Tensor::from_data_size(bytes, &p.local_shape(), Kind::Float).to_device(p.tensor.device());
    tch::no_grad(|| {
        p.tensor.shallow_clone().copy_(&src);
    });
    Ok(())
}

/// Load every parameter of `model` from a committed checkpoint (any saved layout).
pub fn load_from_checkpoint(model: &Model, ckpt: &Checkpoint) -> Result<(), TrainError> {
    let wanted = requests(model);
    let loaded = ckpt.load(&wanted)?;
    for (i, bytes) in loaded.iter().enumerate() {
        set(model, i, bytes)?;
    }
    Ok(())
}

/// The tokenizer saved with a checkpoint, if the training data had one.
pub fn tokenizer_from_checkpoint(ckpt: &Checkpoint) -> Result<Option<Vec<u8>>, TrainError> {
    asset_from_checkpoint(ckpt, TOKENIZER_ASSET)
}

/// A file saved beside a checkpoint's tensors ([`TOKENIZER_ASSET`],
/// [`crate::checkpointing::TOKENIZER_CONFIG_ASSET`]), if it has it.
pub fn asset_from_checkpoint(ckpt: &Checkpoint, asset: &str) -> Result<Option<Vec<u8>>, TrainError> {
    let Some((name, dtype, shape)) = ckpt.manifest.tensors().into_iter().find(|(n, _, _)| n == asset) else {
        return Ok(None);
    };
    let mut got = ckpt.load(&[SliceSpec::full(&name, dtype, &shape)])?;
    Ok(got.pop())
}

/// Load every parameter of `model` from a safetensors file holding this rank's share, as the
/// registry sends it: tensors named like the parameters, `gantry.slices` in the metadata
/// giving each one's global shape and offsets.
pub fn load_from_safetensors(model: &Model, bytes: &[u8]) -> Result<(), TrainError> {
    let bad = |m: String| TrainError::Internal(format!("tensor share: {m}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let slices: HashMap<String, serde_json::Value> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("gantry.slices"))
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| bad(format!("gantry.slices is not JSON: {e}")))?
        .ok_or_else(|| bad("no gantry.slices in the metadata".into()))?;
    for (i, want) in requests(model).iter().enumerate() {
        let view = st
            .tensor(&want.name)
            .map_err(|_| bad(format!("{} is missing", want.name)))?;
        let described = &slices.get(&want.name);
        let offsets: Option<Vec<u64>> = described.and_then(|d| serde_json::from_value(d["offsets"].clone()).ok());
        let global: Option<Vec<u64>> = described.and_then(|d| serde_json::from_value(d["global_shape"].clone()).ok());
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        if view.dtype() != safetensors::Dtype::F32
            || shape != want.lengths
            || offsets.as_ref() != Some(&want.offsets)
            || global.as_ref() != Some(&want.global_shape)
        {
            return Err(bad(format!(
                "{}: got {:?} {shape:?} at {offsets:?} of {global:?}, this rank needs F32 {:?} at {:?} of {:?}",
                want.name,
                view.dtype(),
                want.lengths,
                want.offsets,
                want.global_shape
            )));
        }
        set(model, i, view.data())?;
    }
    Ok(())
}
