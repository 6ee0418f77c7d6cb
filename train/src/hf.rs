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
    tensors: HashMap<String, (Vec<u64>, Vec<u8>)>,
) -> Result<(Vec<ExportTensor>, serde_json::Value), String> {
    if m.arch != Arch::Gpt2 {
        return Err(format!(
            "Hugging Face GPT-2 export needs arch = \"gpt2\", this model is {:?}",
            m.arch
        ));
    }
    let (d, v) = (m.d_model, m.vocab_size);
    let mut w = Gpt2Writer {
        sources: tensors,
        out: Vec::new(),
    };
    w.copy("embed.wte", "transformer.wte.weight".into(), &[v, d])?;
    w.copy("embed.wpe", "transformer.wpe.weight".into(), &[m.seq_len, d])?;
    for l in 0..m.n_layers {
        w.layer(m, l)?;
    }
    w.copy("final_norm.weight", "transformer.ln_f.weight".into(), &[d])?;
    w.copy("final_norm.bias", "transformer.ln_f.bias".into(), &[d])?;
    if !m.tie_embeddings {
        w.copy("head.weight", "lm_head.weight".into(), &[v, d])?;
    }
    Ok((w.out, gpt2_config(m)))
}

/// The gantry tensors not yet exported and the GPT-2 tensors made so far, in the order GPT-2
/// lists them. Taking a source removes it, so no tensor is exported twice.
struct Gpt2Writer {
    sources: HashMap<String, (Vec<u64>, Vec<u8>)>,
    out: Vec<ExportTensor>,
}

impl Gpt2Writer {
    /// The bytes of source `name`, which must have exactly `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>, String> {
        let (s, b) = self
            .sources
            .remove(name)
            .ok_or_else(|| format!("tensor {name} is not in the checkpoint"))?;
        let want: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
        if s != want {
            return Err(format!("tensor {name} has shape {s:?}, expected {want:?}"));
        }
        Ok(b)
    }

    fn put(&mut self, name: String, shape: Vec<usize>, bytes: Vec<u8>) {
        self.out.push(ExportTensor {
            name,
            dtype: DType::F32,
            shape,
            bytes,
        })
    }

    /// Export a tensor whose layout GPT-2 shares (vectors, embeddings).
    fn copy(&mut self, from: &str, to: String, shape: &[usize]) -> Result<(), String> {
        let bytes = self.take(from, shape)?;
        self.put(to, shape.to_vec(), bytes);
        Ok(())
    }

    /// Export a linear layer's `[out, in]` weight as `Conv1D`'s `[in, out]`.
    fn transposed(&mut self, from: &str, to: String, rows: usize, cols: usize) -> Result<(), String> {
        let bytes = self.take(from, &[rows, cols])?;
        self.put(to, vec![cols, rows], transpose(&bytes, rows, cols));
        Ok(())
    }

    /// One transformer block. The fused `qkv [3, d, d]` is transposed as one `[3d, d]` matrix,
    /// which puts q, k and v side by side in `c_attn`.
    fn layer(&mut self, m: &ModelSpec, l: usize) -> Result<(), String> {
        let (d, f) = (m.d_model, m.ffn());
        let (g, h) = (format!("layers.{l}"), format!("transformer.h.{l}"));
        self.copy(&format!("{g}.attn.norm.weight"), format!("{h}.ln_1.weight"), &[d])?;
        self.copy(&format!("{g}.attn.norm.bias"), format!("{h}.ln_1.bias"), &[d])?;
        let qkv = self.take(&format!("{g}.attn.qkv.weight"), &[3, d, d])?;
        self.put(
            format!("{h}.attn.c_attn.weight"),
            vec![d, 3 * d],
            transpose(&qkv, 3 * d, d),
        );
        let qkv_bias = self.take(&format!("{g}.attn.qkv.bias"), &[3, d])?;
        self.put(format!("{h}.attn.c_attn.bias"), vec![3 * d], qkv_bias);
        self.transposed(&format!("{g}.attn.out.weight"), format!("{h}.attn.c_proj.weight"), d, d)?;
        self.copy(&format!("{g}.attn.out.bias"), format!("{h}.attn.c_proj.bias"), &[d])?;
        self.copy(&format!("{g}.mlp.norm.weight"), format!("{h}.ln_2.weight"), &[d])?;
        self.copy(&format!("{g}.mlp.norm.bias"), format!("{h}.ln_2.bias"), &[d])?;
        self.transposed(&format!("{g}.mlp.fc.weight"), format!("{h}.mlp.c_fc.weight"), f, d)?;
        self.copy(&format!("{g}.mlp.fc.bias"), format!("{h}.mlp.c_fc.bias"), &[f])?;
        self.transposed(&format!("{g}.mlp.down.weight"), format!("{h}.mlp.c_proj.weight"), d, f)?;
        self.copy(&format!("{g}.mlp.down.bias"), format!("{h}.mlp.c_proj.bias"), &[d])?;
        Ok(())
    }
}

/// GPT-2's `config.json` for `m`; dropout is off because the export is for inference.
fn gpt2_config(m: &ModelSpec) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.seq_len,
        "n_ctx": m.seq_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.ffn(),
        "activation_function": "gelu_new",
        "layer_norm_epsilon": m.norm_eps,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    })
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
