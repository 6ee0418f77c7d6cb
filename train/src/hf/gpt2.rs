//! GPT-2 style gantry models → `GPT2LMHeadModel`.
//!
//! GPT-2's `Conv1D` stores weights as `[in, out]`, gantry's linear layers as `[out, in]`, so
//! every matrix is transposed; the fused `qkv [3, d, d]` becomes `c_attn [d, 3d]` with q, k,
//! v side by side, which is the order GPT-2 splits them in.

use super::HfError;
use super::tensors::Tensors;
use crate::spec::ModelSpec;
use serde_json::{Value, json};

/// The gantry tensors a GPT-2 export reads, with their global shapes.
pub fn sources(m: &ModelSpec) -> Vec<(String, Vec<u64>)> {
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

/// Map the tensors in `w` to GPT-2's names, in the order GPT-2 lists them.
pub(super) fn tensors(m: &ModelSpec, w: &mut Tensors) -> Result<(), HfError> {
    let (d, v) = (m.d_model, m.vocab_size);
    w.copy("embed.wte", "transformer.wte.weight".into(), &[v, d])?;
    w.copy("embed.wpe", "transformer.wpe.weight".into(), &[m.seq_len, d])?;
    for l in 0..m.n_layers {
        layer(m, l, w)?;
    }
    w.copy("final_norm.weight", "transformer.ln_f.weight".into(), &[d])?;
    w.copy("final_norm.bias", "transformer.ln_f.bias".into(), &[d])?;
    if !m.tie_embeddings {
        w.copy("head.weight", "lm_head.weight".into(), &[v, d])?;
    }
    Ok(())
}

/// One transformer block. The fused `qkv [3, d, d]` is transposed as one `[3d, d]` matrix,
/// which puts q, k and v side by side in `c_attn`.
fn layer(m: &ModelSpec, l: usize, w: &mut Tensors) -> Result<(), HfError> {
    let (d, f) = (m.d_model, m.ffn());
    let (g, h) = (format!("layers.{l}"), format!("transformer.h.{l}"));
    w.copy(&format!("{g}.attn.norm.weight"), format!("{h}.ln_1.weight"), &[d])?;
    w.copy(&format!("{g}.attn.norm.bias"), format!("{h}.ln_1.bias"), &[d])?;
    let qkv = w.take(&format!("{g}.attn.qkv.weight"), &[3, d, d])?;
    w.put(
        format!("{h}.attn.c_attn.weight"),
        vec![d, 3 * d],
        super::tensors::transpose(&qkv, 3 * d, d),
    );
    let qkv_bias = w.take(&format!("{g}.attn.qkv.bias"), &[3, d])?;
    w.put(format!("{h}.attn.c_attn.bias"), vec![3 * d], qkv_bias);
    w.transposed(&format!("{g}.attn.out.weight"), format!("{h}.attn.c_proj.weight"), d, d)?;
    w.copy(&format!("{g}.attn.out.bias"), format!("{h}.attn.c_proj.bias"), &[d])?;
    w.copy(&format!("{g}.mlp.norm.weight"), format!("{h}.ln_2.weight"), &[d])?;
    w.copy(&format!("{g}.mlp.norm.bias"), format!("{h}.ln_2.bias"), &[d])?;
    w.transposed(&format!("{g}.mlp.fc.weight"), format!("{h}.mlp.c_fc.weight"), f, d)?;
    w.copy(&format!("{g}.mlp.fc.bias"), format!("{h}.mlp.c_fc.bias"), &[f])?;
    w.transposed(&format!("{g}.mlp.down.weight"), format!("{h}.mlp.c_proj.weight"), d, f)?;
    w.copy(&format!("{g}.mlp.down.bias"), format!("{h}.mlp.c_proj.bias"), &[d])?;
    Ok(())
}

/// GPT-2's `config.json` for `m` without the special token ids (the caller adds them);
/// dropout is off because the export is for inference.
pub(super) fn config(m: &ModelSpec) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.seq_len,
        "n_ctx": m.seq_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.ffn(),
        // gantry's GELU is the tanh approximation, which is GPT-2's `gelu_new`.
        "activation_function": "gelu_new",
        "layer_norm_epsilon": m.norm_eps,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "dtype": "float32",
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, fake_sources};
    use super::super::{Exported, export};
    use crate::spec::ModelSpec;

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
        let Exported { tensors, config, .. } = export(&m, fake_sources(&super::sources(&m)), None).unwrap();
        assert_eq!(tensors.len(), 2 + 2 * 12 + 2);
        assert_eq!(config["n_inner"], 16);
        assert!(config["eos_token_id"].is_null(), "{config}");
        let c_attn = tensors
            .iter()
            .find(|t| t.name == "transformer.h.0.attn.c_attn.weight")
            .unwrap();
        assert_eq!(c_attn.shape, vec![4, 12]);
        // Element [i=1, o=5] of c_attn is gantry's qkv row 5 (k, row 1), column 1.
        assert_eq!(at(&c_attn.bytes, 12 + 5), (5 * 4 + 1) as f32);
        let fc = tensors
            .iter()
            .find(|t| t.name == "transformer.h.1.mlp.c_fc.weight")
            .unwrap();
        assert_eq!(fc.shape, vec![4, 16]);
        // [i=2, o=3] of c_fc is gantry's fc row 3, column 2.
        assert_eq!(at(&fc.bytes, 16 * 2 + 3), (3 * 4 + 2) as f32);
        let untied = ModelSpec {
            tie_embeddings: false,
            ..m
        };
        let out = export(&untied, fake_sources(&super::sources(&untied)), None).unwrap();
        assert!(out.tensors.iter().any(|t| t.name == "lm_head.weight"));
        assert_eq!(out.config["tie_word_embeddings"], false);
    }
}
