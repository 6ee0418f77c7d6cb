//! Gantry's parameter names and layouts → Hugging Face `transformers` GPT-2
//! (`GPT2LMHeadModel`), for `gantry checkpoint export`. Pure data shuffling, no libtorch.
//!
//! GPT-2's `Conv1D` stores weights as `[in, out]`, gantry's linear layers as `[out, in]`, so
//! every matrix is transposed; the fused `qkv [3, d, d]` becomes `c_attn [d, 3d]` with q, k,
//! v side by side, which is the order GPT-2 splits them in.

use crate::spec::{Arch, ModelSpec};
use gantry_checkpoint::DType;
use gantry_checkpoint::export::ExportTensor;
use std::collections::HashMap;

/// `[rows, cols]` f32 (little-endian bytes) → `[cols, rows]`.
fn transpose(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (src, dst) = ((r * cols + c) * 4, (c * rows + r) * 4);
            out[dst..dst + 4].copy_from_slice(&bytes[src..src + 4]);
        }
    }
    out
}

/// Map whole gantry tensors (`name → (shape, f32 bytes)`) to GPT-2's names, plus its
/// `config.json`. Errors name the tensor that is missing or misshapen.
pub fn to_gpt2(
    m: &ModelSpec,
    mut tensors: HashMap<String, (Vec<u64>, Vec<u8>)>,
) -> Result<(Vec<ExportTensor>, serde_json::Value), String> {
    if m.arch != Arch::Gpt2 {
        return Err(format!(
            "Hugging Face GPT-2 export needs arch = \"gpt2\", this model is {:?}",
            m.arch
        ));
    }
    let (d, f) = (m.d_model, m.ffn());
    let mut out = Vec::new();
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<u8>, String> {
        let (s, b) = tensors
            .remove(name)
            .ok_or_else(|| format!("tensor {name} is not in the checkpoint"))?;
        let want: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        if s != want {
            return Err(format!("tensor {name} has shape {s:?}, expected {want:?}"));
        }
        Ok(b)
    };
    let mut put = |name: String, shape: Vec<usize>, bytes: Vec<u8>| {
        out.push(ExportTensor {
            name,
            dtype: DType::F32,
            shape,
            bytes,
        })
    };
    let v = m.vocab_size;
    put("transformer.wte.weight".into(), vec![v, d], take("embed.wte", &[v, d])?);
    put(
        "transformer.wpe.weight".into(),
        vec![m.seq_len, d],
        take("embed.wpe", &[m.seq_len, d])?,
    );
    for l in 0..m.n_layers {
        let (g, h) = (format!("layers.{l}"), format!("transformer.h.{l}"));
        put(
            format!("{h}.ln_1.weight"),
            vec![d],
            take(&format!("{g}.attn.norm.weight"), &[d])?,
        );
        put(
            format!("{h}.ln_1.bias"),
            vec![d],
            take(&format!("{g}.attn.norm.bias"), &[d])?,
        );
        let qkv = take(&format!("{g}.attn.qkv.weight"), &[3, d, d])?;
        put(
            format!("{h}.attn.c_attn.weight"),
            vec![d, 3 * d],
            transpose(&qkv, 3 * d, d),
        );
        put(
            format!("{h}.attn.c_attn.bias"),
            vec![3 * d],
            take(&format!("{g}.attn.qkv.bias"), &[3, d])?,
        );
        let o = take(&format!("{g}.attn.out.weight"), &[d, d])?;
        put(format!("{h}.attn.c_proj.weight"), vec![d, d], transpose(&o, d, d));
        put(
            format!("{h}.attn.c_proj.bias"),
            vec![d],
            take(&format!("{g}.attn.out.bias"), &[d])?,
        );
        put(
            format!("{h}.ln_2.weight"),
            vec![d],
            take(&format!("{g}.mlp.norm.weight"), &[d])?,
        );
        put(
            format!("{h}.ln_2.bias"),
            vec![d],
            take(&format!("{g}.mlp.norm.bias"), &[d])?,
        );
        let fc = take(&format!("{g}.mlp.fc.weight"), &[f, d])?;
        put(format!("{h}.mlp.c_fc.weight"), vec![d, f], transpose(&fc, f, d));
        put(
            format!("{h}.mlp.c_fc.bias"),
            vec![f],
            take(&format!("{g}.mlp.fc.bias"), &[f])?,
        );
        let down = take(&format!("{g}.mlp.down.weight"), &[d, f])?;
        put(format!("{h}.mlp.c_proj.weight"), vec![f, d], transpose(&down, d, f));
        put(
            format!("{h}.mlp.c_proj.bias"),
            vec![d],
            take(&format!("{g}.mlp.down.bias"), &[d])?,
        );
    }
    put(
        "transformer.ln_f.weight".into(),
        vec![d],
        take("final_norm.weight", &[d])?,
    );
    put("transformer.ln_f.bias".into(), vec![d], take("final_norm.bias", &[d])?);
    if !m.tie_embeddings {
        put("lm_head.weight".into(), vec![v, d], take("head.weight", &[v, d])?);
    }
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": v,
        "n_positions": m.seq_len,
        "n_ctx": m.seq_len,
        "n_embd": d,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": f,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": m.norm_eps,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    });
    Ok((out, config))
}

/// The gantry tensors a GPT-2 export reads.
pub fn gpt2_sources(m: &ModelSpec) -> Vec<(String, Vec<u64>)> {
    let (d, f, v, t) = (m.d_model as u64, m.ffn() as u64, m.vocab_size as u64, m.seq_len as u64);
    let mut out = vec![
        ("embed.wte".to_string(), vec![v, d]),
        ("embed.wpe".to_string(), vec![t, d]),
    ];
    for l in 0..m.n_layers {
        let g = format!("layers.{l}");
        for (n, s) in [
            ("attn.norm.weight", vec![d]),
            ("attn.norm.bias", vec![d]),
            ("attn.qkv.weight", vec![3, d, d]),
            ("attn.qkv.bias", vec![3, d]),
            ("attn.out.weight", vec![d, d]),
            ("attn.out.bias", vec![d]),
            ("mlp.norm.weight", vec![d]),
            ("mlp.norm.bias", vec![d]),
            ("mlp.fc.weight", vec![f, d]),
            ("mlp.fc.bias", vec![f]),
            ("mlp.down.weight", vec![d, f]),
            ("mlp.down.bias", vec![d]),
        ] {
            out.push((format!("{g}.{n}"), s));
        }
    }
    out.push(("final_norm.weight".into(), vec![d]));
    out.push(("final_norm.bias".into(), vec![d]));
    if !m.tie_embeddings {
        out.push(("head.weight".into(), vec![v, d]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(n: usize, base: f32) -> Vec<u8> {
        (0..n).flat_map(|i| (base + i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn every_source_maps_and_matrices_are_transposed() {
        let m = ModelSpec {
            vocab_size: 8,
            d_model: 4,
            n_layers: 2,
            n_heads: 2,
            seq_len: 3,
            ..ModelSpec::default()
        };
        let tensors: HashMap<String, (Vec<u64>, Vec<u8>)> = gpt2_sources(&m)
            .into_iter()
            .map(|(n, s)| {
                let len = s.iter().product::<u64>() as usize;
                (n, (s, f32s(len, 0.0)))
            })
            .collect();
        let (out, config) = to_gpt2(&m, tensors).unwrap();
        assert_eq!(out.len(), 2 + 2 * 12 + 2);
        assert_eq!(config["n_inner"], 16);
        let c_attn = out
            .iter()
            .find(|t| t.name == "transformer.h.0.attn.c_attn.weight")
            .unwrap();
        assert_eq!(c_attn.shape, vec![4, 12]);
        // Element [i=1, o=5] of c_attn is gantry's qkv row 5 (k, row 1), column 1.
        let at = |b: &[u8], i: usize| f32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(at(&c_attn.bytes, 12 + 5), (5 * 4 + 1) as f32);
        let Err(missing) = to_gpt2(&m, HashMap::new()) else {
            panic!("an empty checkpoint exported")
        };
        assert!(missing.contains("embed.wte"), "{missing}");
    }
}
