//! Gantry checkpoints → Hugging Face `transformers` folders, for `gantry checkpoint export`.
//! Pure data shuffling, no libtorch: whole gantry tensors and the checkpoint's tokenizer in,
//! the tensors under Hugging Face names and the JSON files of the folder out.
//!
//! # Layout
//! - [`gpt2`]: `arch = "gpt2"` → `GPT2LMHeadModel`; [`llama`]: `arch = "llama"` →
//!   `LlamaForCausalLM`. Each lists the gantry tensors it reads (`sources`), maps them and
//!   writes its `config.json`.
//! - [`tokenizer`]: `tokenizer.json` (gantry's own, already in Hugging Face's format),
//!   `tokenizer_config.json` and `special_tokens_map.json`, and the end-of-document token that
//!   becomes the BOS / EOS ids of `config.json` and `generation_config.json`.
//! - `tensors`: taking each source once with its shape checked; copies, transposes, splits.
//!
//! A checkpoint trained on token ids alone (synthetic data) has no tokenizer: its export has
//! no tokenizer files, and the BOS / EOS ids are written as `null` so that transformers does
//! not fall back to GPT-2's 50256, which is not even in a small vocabulary.

pub mod gpt2;
pub mod llama;
mod tensors;
pub mod tokenizer;

use crate::spec::{Arch, ModelSpec};
use gantry_checkpoint::export::ExportTensor;
use serde_json::{Value, json};
use std::collections::HashMap;
pub use tensors::Source;
pub use tokenizer::{Eod, TokenizerSource};

/// Why a checkpoint cannot be exported; each names the architecture, tensor or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error(
        "architecture {arch:?} has no Hugging Face export (supported: \"gpt2\" as GPT2LMHeadModel, \
         \"llama\" as LlamaForCausalLM)"
    )]
    UnsupportedArch { arch: String },
    #[error("the checkpoint's model section is not a gantry model spec: {message}")]
    ModelSpec { message: String },
    #[error("tensor {name} is not in the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    #[error("tensor {name}: {bytes} bytes are not f32 values of shape {shape:?}")]
    Bytes {
        name: String,
        bytes: usize,
        shape: Vec<u64>,
    },
    #[error("the checkpoint's tokenizer: {message}")]
    Tokenizer { message: String },
    #[error("the checkpoint's tokenizer_config.json is not JSON: {message}")]
    TokenizerConfig { message: String },
}

/// The model section of a checkpoint manifest as a spec, refusing an architecture gantry
/// cannot export by its name before anything else is read (a newer gantry's architecture
/// would otherwise fail as an unknown enum variant).
pub fn model_spec(model: &Value) -> Result<ModelSpec, HfError> {
    match model.get("arch").and_then(Value::as_str) {
        None | Some("gpt2" | "llama") => {}
        Some(other) => {
            return Err(HfError::UnsupportedArch {
                arch: other.to_string(),
            });
        }
    }
    serde_json::from_value(model.clone()).map_err(|e| HfError::ModelSpec { message: e.to_string() })
}

/// The gantry tensors the export of `m` reads, with their global shapes.
pub fn sources(m: &ModelSpec) -> Vec<(String, Vec<u64>)> {
    match m.arch {
        Arch::Gpt2 => gpt2::sources(m),
        Arch::Llama => llama::sources(m),
    }
}

/// The Hugging Face class an export of `m` loads as.
pub fn architecture(m: &ModelSpec) -> &'static str {
    match m.arch {
        Arch::Gpt2 => "GPT2LMHeadModel",
        Arch::Llama => "LlamaForCausalLM",
    }
}

/// Everything an export folder holds.
pub struct Exported {
    /// For `model.safetensors`, in the order the model lists them.
    pub tensors: Vec<ExportTensor>,
    /// `config.json`.
    pub config: Value,
    /// `generation_config.json`.
    pub generation_config: Value,
    /// The tokenizer files (name, contents); empty without a tokenizer.
    pub tokenizer_files: Vec<(&'static str, Vec<u8>)>,
    /// The end-of-document token, when the tokenizer has one.
    pub eod: Option<Eod>,
}

impl Exported {
    /// Every JSON file of the folder (name, contents), `config.json` first.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = vec![
            ("config.json", tokenizer::pretty(&self.config)),
            ("generation_config.json", tokenizer::pretty(&self.generation_config)),
        ];
        out.extend(self.tokenizer_files.iter().cloned());
        out
    }
}

/// The names of every tokenizer file an export may write (a re-export without a tokenizer
/// removes stale ones, which `AutoTokenizer` would otherwise load).
pub const TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Export `m` from its whole tensors (`sources(m)` → (shape, f32 bytes)), with the
/// checkpoint's tokenizer if it has one.
pub fn export(
    m: &ModelSpec,
    tensors: HashMap<String, Source>,
    tokenizer: Option<TokenizerSource<'_>>,
) -> Result<Exported, HfError> {
    let mut w = tensors::Tensors::new(tensors);
    let mut config = match m.arch {
        Arch::Gpt2 => {
            gpt2::tensors(m, &mut w)?;
            gpt2::config(m)
        }
        Arch::Llama => {
            llama::tensors(m, &mut w)?;
            llama::config(m)
        }
    };
    let tok = tokenizer.map(|t| tokenizer::files(&t, m.seq_len)).transpose()?;
    let eod = tok.as_ref().and_then(|t| t.eod.clone());
    let id = eod.as_ref().map(|e| e.id);
    config["bos_token_id"] = json!(id);
    config["eos_token_id"] = json!(id);
    // No `max_length`: transformers warns on every `generate(max_new_tokens=…)` when the
    // generation config sets one. The context length is `config.json`'s.
    let mut generation_config = json!({ "bos_token_id": id, "eos_token_id": id });
    if id.is_some() {
        // No pad token of its own: padding finished sequences with the EOD is what GPT-2 does.
        generation_config["pad_token_id"] = json!(id);
    }
    Ok(Exported {
        tensors: w.out,
        config,
        generation_config,
        tokenizer_files: tok.map(|t| t.files).unwrap_or_default(),
        eod,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Model;

    /// Source tensors of these names and shapes holding `0, 1, 2, …` each.
    pub(crate) fn fake_sources(list: &[(String, Vec<u64>)]) -> HashMap<String, Source> {
        list.iter()
            .map(|(n, s)| {
                let len = s.iter().product::<u64>() as usize;
                let bytes = (0..len).flat_map(|i| (i as f32).to_le_bytes()).collect();
                (n.clone(), (s.clone(), bytes))
            })
            .collect()
    }

    /// Element `i` of little-endian f32 bytes.
    pub(crate) fn at(b: &[u8], i: usize) -> f32 {
        f32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap())
    }

    #[test]
    fn the_sources_are_exactly_the_models_parameters() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            for tie_embeddings in [true, false] {
                let m = ModelSpec {
                    arch,
                    tie_embeddings,
                    vocab_size: 16,
                    d_model: 8,
                    n_layers: 3,
                    n_heads: 2,
                    seq_len: 4,
                    ..ModelSpec::default()
                };
                let mut want: Vec<String> = Model::parameter_layout(&m).into_iter().map(|(n, _)| n).collect();
                let mut got: Vec<String> = sources(&m).into_iter().map(|(n, _)| n).collect();
                want.sort();
                got.sort();
                assert_eq!(got, want, "{arch:?} tied {tie_embeddings}");
                // Every source is exported; llama cuts qkv in 3 and gate_up in 2.
                let out = export(&m, fake_sources(&sources(&m)), None).unwrap();
                let cut = if arch == Arch::Llama { 3 * (2 + 1) } else { 0 };
                assert_eq!(out.tensors.len(), got.len() + cut);
            }
        }
    }

    #[test]
    fn unsupported_architectures_are_named_and_token_ids_are_never_gpt2s() {
        let Err(e) = model_spec(&json!({ "arch": "mixtral", "d_model": 8 })) else {
            panic!("an unknown architecture was accepted")
        };
        assert!(e.to_string().contains("\"mixtral\""), "{e}");
        assert!(matches!(
            model_spec(&json!({ "arch": "llama", "bogus": 1 })),
            Err(HfError::ModelSpec { .. })
        ));
        let m = model_spec(&json!({ "arch": "llama", "vocab_size": 16, "d_model": 8, "n_heads": 2 })).unwrap();
        assert_eq!(m.arch, Arch::Llama);
        // Without a tokenizer the ids are null, not absent (transformers would pick 50256).
        let out = export(&m, fake_sources(&sources(&m)), None).unwrap();
        for c in [&out.config, &out.generation_config] {
            assert!(c["bos_token_id"].is_null() && c["eos_token_id"].is_null(), "{c}");
            assert!(c.as_object().unwrap().contains_key("eos_token_id"));
        }
        assert!(out.tokenizer_files.is_empty());
        assert_eq!(out.files().len(), 2);
        let Err(e) = export(&m, HashMap::new(), None) else {
            panic!("an empty checkpoint exported")
        };
        assert!(e.to_string().contains("embed.wte"), "{e}");

        // With a tokenizer, its end-of-document id is BOS, EOS and the generation pad.
        let tok = tokenizer::tests::word_level(Value::Null);
        let src = TokenizerSource {
            tokenizer_json: &tok,
            ..TokenizerSource::default()
        };
        let out = export(&m, fake_sources(&sources(&m)), Some(src)).unwrap();
        for c in [&out.config, &out.generation_config] {
            assert_eq!((&c["bos_token_id"], &c["eos_token_id"]), (&json!(3), &json!(3)), "{c}");
        }
        assert_eq!(out.generation_config["pad_token_id"], 3);
        let names: Vec<&str> = out.files().iter().map(|(n, _)| *n).collect();
        assert_eq!(names[..2], ["config.json", "generation_config.json"]);
        assert_eq!(names[2..], TOKENIZER_FILES);
    }
}
