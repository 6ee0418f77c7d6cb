//! Llama style gantry models → `LlamaForCausalLM`.
//!
//! Both use `nn.Linear`'s `[out, in]` layout, so weights are copied; the fused tensors are cut
//! into their parts (`qkv [3, d, d]` → `q_proj`, `k_proj`, `v_proj`; `gate_up [2, f, d]` →
//! `gate_proj`, `up_proj`, and SwiGLU is `down(silu(gate(x)) · up(x))` in both). No row
//! permutation is needed: gantry's rotary embedding is the rotate-half convention on heads laid
//! out `[head, head_dim]`, with frequencies `theta^(-2i / head_dim)`, exactly Hugging Face
//! Llama's (`apply_rotary_pos_emb`). Checkpoints converted from Meta's interleaved layout need
//! the permutation; gantry's never were in it.

use super::HfError;
use super::tensors::Tensors;
use crate::spec::ModelSpec;
use serde_json::{Value, json};

/// The gantry tensors a Llama export reads, with their global shapes.
pub fn sources(m: &ModelSpec) -> Vec<(String, Vec<u64>)> {
    let (d, f, v) = (m.d_model as u64, m.ffn() as u64, m.vocab_size as u64);
    let mut out = vec![("embed.wte".to_string(), vec![v, d])];
    for l in 0..m.n_layers {
        let g = format!("layers.{l}");
        for (n, s) in [
            ("attn.norm.weight", vec![d]),
            ("attn.qkv.weight", vec![3, d, d]),
            ("attn.out.weight", vec![d, d]),
            ("mlp.norm.weight", vec![d]),
            ("mlp.gate_up.weight", vec![2, f, d]),
            ("mlp.down.weight", vec![d, f]),
        ] {
            out.push((format!("{g}.{n}"), s));
        }
    }
    out.push(("final_norm.weight".into(), vec![d]));
    if !m.tie_embeddings {
        out.push(("head.weight".into(), vec![v, d]));
    }
    out
}

/// Map the tensors in `w` to Llama's names, in the order `LlamaForCausalLM` lists them.
pub(super) fn tensors(m: &ModelSpec, w: &mut Tensors) -> Result<(), HfError> {
    let (d, f, v) = (m.d_model, m.ffn(), m.vocab_size);
    w.copy("embed.wte", "model.embed_tokens.weight".into(), &[v, d])?;
    for l in 0..m.n_layers {
        let (g, h) = (format!("layers.{l}"), format!("model.layers.{l}"));
        w.copy(
            &format!("{g}.attn.norm.weight"),
            format!("{h}.input_layernorm.weight"),
            &[d],
        )?;
        let qkv = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{h}.self_attn.{p}.weight"));
        w.split(&format!("{g}.attn.qkv.weight"), &qkv, d, d)?;
        w.copy(
            &format!("{g}.attn.out.weight"),
            format!("{h}.self_attn.o_proj.weight"),
            &[d, d],
        )?;
        w.copy(
            &format!("{g}.mlp.norm.weight"),
            format!("{h}.post_attention_layernorm.weight"),
            &[d],
        )?;
        let gate_up = ["gate_proj", "up_proj"].map(|p| format!("{h}.mlp.{p}.weight"));
        w.split(&format!("{g}.mlp.gate_up.weight"), &gate_up, f, d)?;
        w.copy(
            &format!("{g}.mlp.down.weight"),
            format!("{h}.mlp.down_proj.weight"),
            &[d, f],
        )?;
    }
    w.copy("final_norm.weight", "model.norm.weight".into(), &[d])?;
    if !m.tie_embeddings {
        w.copy("head.weight", "lm_head.weight".into(), &[v, d])?;
    }
    Ok(())
}

/// `LlamaForCausalLM`'s `config.json` for `m` without the special token ids (the caller adds
/// them). Every head has its own keys and values (`num_key_value_heads` = heads). The rotary
/// base is written both ways transformers has read it: `rope_theta` (4.x) and
/// `rope_parameters` (5.x).
pub(super) fn config(m: &ModelSpec) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn(),
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": { "rope_type": "default", "rope_theta": m.rope_theta },
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": true,
        "dtype": "float32",
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, fake_sources};
    use super::super::{HfError, export};
    use crate::spec::{Arch, ModelSpec};

    fn tiny(tie: bool) -> ModelSpec {
        ModelSpec {
            arch: Arch::Llama,
            vocab_size: 8,
            d_model: 4,
            n_layers: 2,
            n_heads: 2,
            ffn_hidden: 6,
            seq_len: 3,
            tie_embeddings: tie,
            rope_theta: 500000.0,
            norm_eps: 1e-6,
            ..ModelSpec::default()
        }
    }

    #[test]
    fn fused_tensors_are_cut_in_order_and_the_config_has_llama_sizes() {
        let m = tiny(true);
        let out = export(&m, fake_sources(&super::sources(&m)), None).unwrap();
        // Embedding, 2 × (2 norms + q k v o + gate up down), final norm; tied: no lm_head.
        assert_eq!(out.tensors.len(), 1 + 2 * 9 + 1);
        let get = |n: &str| {
            out.tensors
                .iter()
                .find(|t| t.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        // k_proj is block 1 of gantry's qkv: its [0, 0] is element 16 of the fused tensor.
        let k = get("model.layers.1.self_attn.k_proj.weight");
        assert_eq!((k.shape.clone(), at(&k.bytes, 0)), (vec![4, 4], 16.0));
        let v = get("model.layers.0.self_attn.v_proj.weight");
        assert_eq!(at(&v.bytes, 5), 32.0 + 5.0);
        // up_proj is block 1 of gate_up [2, 6, 4].
        let up = get("model.layers.0.mlp.up_proj.weight");
        assert_eq!((up.shape.clone(), at(&up.bytes, 1)), (vec![6, 4], 24.0 + 1.0));
        assert_eq!(get("model.layers.0.mlp.down_proj.weight").shape, vec![4, 6]);
        assert!(!out.tensors.iter().any(|t| t.name == "lm_head.weight"));
        let c = &out.config;
        assert_eq!(
            (
                &c["model_type"],
                &c["intermediate_size"],
                &c["num_key_value_heads"],
                &c["head_dim"]
            ),
            (&"llama".into(), &6.into(), &2.into(), &2.into())
        );
        assert_eq!(
            (c["rope_theta"].as_f64(), c["rms_norm_eps"].as_f64()),
            (Some(500000.0), Some(1e-6))
        );
        assert_eq!(c["rope_parameters"]["rope_theta"].as_f64(), Some(500000.0));
        assert_eq!(c["tie_word_embeddings"], true);

        let untied = tiny(false);
        let out = export(&untied, fake_sources(&super::sources(&untied)), None).unwrap();
        assert!(out.tensors.iter().any(|t| t.name == "lm_head.weight"));
        assert_eq!(out.config["tie_word_embeddings"], false);
    }

    #[test]
    fn a_gpt2_checkpoint_is_not_read_as_llama() {
        // The failure the other way round: the error names the missing tensor.
        let m = tiny(true);
        let gpt = ModelSpec {
            arch: Arch::Gpt2,
            ..m.clone()
        };
        let Err(e) = export(&m, fake_sources(&super::super::gpt2::sources(&gpt)), None) else {
            panic!("exported a GPT-2 checkpoint as Llama")
        };
        assert!(
            matches!(&e, HfError::MissingTensor { name } if name == "layers.0.mlp.gate_up.weight"),
            "{e}"
        );
    }
}
