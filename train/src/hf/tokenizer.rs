//! The tokenizer files of an export: gantry's tokenizer is already a Hugging Face
//! `tokenizer.json` (the dataset's, saved with every checkpoint), so it is written as it is;
//! `tokenizer_config.json` makes `AutoTokenizer` load it as a plain `PreTrainedTokenizerFast`
//! that encodes and decodes exactly as gantry's codec does. Of the dataset's own
//! `tokenizer_config.json` (saved with the checkpoint when the tokenizer came from a Hugging
//! Face folder) only the chat template is kept, and its EOS token when the tokenizer has no
//! `<|endoftext|>`: its tokenizer class and BOS settings describe how that model was trained,
//! not how gantry encoded the documents.

use super::HfError;
use gantry_sharding::codec::TextCodec;
use gantry_sharding::prepare::DEFAULT_EOD;
use serde_json::{Value, json};

/// The checkpoint's tokenizer as the export reads it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenizerSource<'a> {
    /// `tokenizer.json`.
    pub tokenizer_json: &'a [u8],
    /// The dataset's `tokenizer_config.json`, when the checkpoint has one.
    pub tokenizer_config: Option<&'a [u8]>,
    /// A chat template (Jinja) that replaces the config's.
    pub chat_template: Option<&'a str>,
}

/// The end-of-document token: gantry ends every document with it, so it is both the BOS and
/// the EOS a Hugging Face model sees (as in GPT-2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eod {
    pub token: String,
    pub id: u32,
}

/// The tokenizer files (name, contents) and the end-of-document token, if the tokenizer has it.
pub(super) struct TokenizerFiles {
    pub(super) files: Vec<(&'static str, Vec<u8>)>,
    pub(super) eod: Option<Eod>,
}

/// The files for the checkpoint's tokenizer `src` and a model of context `seq_len`.
pub(super) fn files(src: &TokenizerSource<'_>, seq_len: usize) -> Result<TokenizerFiles, HfError> {
    let bad = |message: String| HfError::Tokenizer { message };
    let codec = TextCodec::from_json_bytes(src.tokenizer_json).map_err(bad)?;
    let source_config: Value = match src.tokenizer_config {
        Some(b) => serde_json::from_slice(b).map_err(|e| HfError::TokenizerConfig { message: e.to_string() })?,
        None => Value::Null,
    };
    let eod = eod(&codec, &source_config);
    let tokenizer_json = without_truncation_or_padding(src.tokenizer_json)?;
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        // gantry decodes exactly what the tokenizer's decoder gives; transformers' clean-up
        // would change spaces before punctuation.
        "clean_up_tokenization_spaces": false,
        // Documents were encoded without special tokens (the EOD is appended after each one), so
        // a tokenizer.json post-processor that adds a BOS is turned off (transformers 5 rebuilds
        // the post-processor when these are given; 4.x's PreTrainedTokenizerFast ignores them).
        "add_bos_token": false,
        "add_eos_token": false,
    });
    let mut special = json!({});
    if let Some(e) = &eod {
        for key in ["bos_token", "eos_token"] {
            config[key] = json!(e.token);
            special[key] = json!(e.token);
        }
    }
    // A string, or transformers' list of named templates: kept as it is.
    let template = src.chat_template.map(|t| json!(t)).or_else(|| {
        source_config
            .get("chat_template")
            .filter(|t| t.is_string() || t.is_array())
            .cloned()
    });
    if let Some(t) = template {
        config["chat_template"] = t;
    }
    Ok(TokenizerFiles {
        files: vec![
            ("tokenizer.json", tokenizer_json),
            ("tokenizer_config.json", pretty(&config)),
            ("special_tokens_map.json", pretty(&special)),
        ],
        eod,
    })
}

/// `<|endoftext|>` (what `gantry data prepare` appends by default and gantry's serving stops
/// at), else the source config's EOS token if the tokenizer has it (a dataset prepared from a
/// Hugging Face folder with `--eod-token` set to that model's EOS).
fn eod(codec: &TextCodec, source_config: &Value) -> Option<Eod> {
    let named = |token: &str| {
        codec.token_id(token).map(|id| Eod {
            token: token.to_string(),
            id,
        })
    };
    // The config writes a token as a string or as an added-token object with its `content`.
    let eos = source_config
        .get("eos_token")
        .and_then(|t| t.as_str().or_else(|| t.get("content")?.as_str()));
    named(DEFAULT_EOD).or_else(|| eos.and_then(named))
}

/// `bytes` unchanged, unless the tokenizer truncates or pads: gantry's codec turns both off, so
/// the exported copy does too.
fn without_truncation_or_padding(bytes: &[u8]) -> Result<Vec<u8>, HfError> {
    let mut v: Value = serde_json::from_slice(bytes).map_err(|e| HfError::Tokenizer {
        message: format!("not JSON: {e}"),
    })?;
    let on = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
    if !on("truncation") && !on("padding") {
        return Ok(bytes.to_vec());
    }
    v["truncation"] = Value::Null;
    v["padding"] = Value::Null;
    Ok(pretty(&v))
}

pub(super) fn pretty(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("a serde_json::Value always serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer with `<|endoftext|>` at id 3, truncating at 5 tokens.
    pub(crate) fn word_level(truncation: Value) -> Vec<u8> {
        pretty(&json!({
            "version": "1.0",
            "truncation": truncation,
            "padding": null,
            "added_tokens": [{ "id": 3, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true }],
            "normalizer": null,
            "pre_tokenizer": { "type": "Whitespace" },
            "post_processor": null,
            "decoder": null,
            "model": { "type": "WordLevel", "vocab": { "a": 0, "b": 1, "[UNK]": 2, "<|endoftext|>": 3 }, "unk_token": "[UNK]" }
        }))
    }

    fn source<'a>(json: &'a [u8], config: Option<&'a [u8]>, chat: Option<&'a str>) -> TokenizerSource<'a> {
        TokenizerSource {
            tokenizer_json: json,
            tokenizer_config: config,
            chat_template: chat,
        }
    }

    fn file<'a>(t: &'a TokenizerFiles, name: &str) -> &'a [u8] {
        &t.files.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn the_eod_is_bos_and_eos_and_truncation_is_dropped() {
        let plain = word_level(Value::Null);
        let t = files(&source(&plain, None, Some("{{ messages }}")), 64).unwrap();
        assert_eq!(
            t.eod,
            Some(Eod {
                token: "<|endoftext|>".into(),
                id: 3
            })
        );
        assert_eq!(file(&t, "tokenizer.json"), &plain[..], "copied byte for byte");
        let config: Value = serde_json::from_slice(file(&t, "tokenizer_config.json")).unwrap();
        assert_eq!(
            (&config["bos_token"], &config["eos_token"], &config["model_max_length"]),
            (&json!("<|endoftext|>"), &json!("<|endoftext|>"), &json!(64))
        );
        assert_eq!(config["chat_template"], "{{ messages }}");
        assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");

        let truncating =
            word_level(json!({ "direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0 }));
        let t = files(&source(&truncating, None, None), 64).unwrap();
        let written: Value = serde_json::from_slice(file(&t, "tokenizer.json")).unwrap();
        assert!(written["truncation"].is_null(), "{written}");
        let config: Value = serde_json::from_slice(file(&t, "tokenizer_config.json")).unwrap();
        assert!(config.get("chat_template").is_none());
    }

    #[test]
    fn a_tokenizer_without_the_eod_has_no_special_tokens_and_garbage_is_refused() {
        let no_eod = String::from_utf8(word_level(Value::Null))
            .unwrap()
            .replace("<|endoftext|>", "<eos>");
        let t = files(&source(no_eod.as_bytes(), None, None), 8).unwrap();
        assert_eq!(t.eod, None);
        let config: Value = serde_json::from_slice(file(&t, "tokenizer_config.json")).unwrap();
        assert!(config.get("eos_token").is_none(), "{config}");
        let Err(e) = files(&source(b"{not json", None, None), 8) else {
            panic!("garbage accepted as a tokenizer")
        };
        assert!(matches!(e, HfError::Tokenizer { .. }), "{e}");
        let Err(e) = files(&source(no_eod.as_bytes(), Some(b"[1,"), None), 8) else {
            panic!("a garbage tokenizer_config.json accepted")
        };
        assert!(matches!(e, HfError::TokenizerConfig { .. }), "{e}");
    }

    #[test]
    fn the_datasets_config_gives_the_chat_template_and_a_missing_eod() {
        let no_eod = String::from_utf8(word_level(Value::Null))
            .unwrap()
            .replace("<|endoftext|>", "<eos>");
        let hf_config = json!({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "bos_token": "<s>",
            "eos_token": { "content": "<eos>", "special": true }, "chat_template": "{% for m in messages %}{{ m }}{% endfor %}",
        })
        .to_string();
        let t = files(&source(no_eod.as_bytes(), Some(hf_config.as_bytes()), None), 8).unwrap();
        assert_eq!(
            t.eod,
            Some(Eod {
                token: "<eos>".into(),
                id: 3
            })
        );
        let config: Value = serde_json::from_slice(file(&t, "tokenizer_config.json")).unwrap();
        assert_eq!(
            (
                &config["chat_template"],
                &config["tokenizer_class"],
                &config["add_bos_token"],
                &config["bos_token"]
            ),
            (
                &json!("{% for m in messages %}{{ m }}{% endfor %}"),
                &json!("PreTrainedTokenizerFast"),
                &json!(false),
                &json!("<eos>")
            )
        );
        // The flag's template wins; `<|endoftext|>`, when present, wins over the config's EOS.
        let with_eod = word_level(Value::Null);
        let t = files(&source(&with_eod, Some(hf_config.as_bytes()), Some("mine")), 8).unwrap();
        assert_eq!(t.eod.as_ref().map(|e| e.id), Some(3));
        let config: Value = serde_json::from_slice(file(&t, "tokenizer_config.json")).unwrap();
        assert_eq!(
            (&config["chat_template"], &config["eos_token"]),
            (&json!("mine"), &json!("<|endoftext|>"))
        );
    }
}
