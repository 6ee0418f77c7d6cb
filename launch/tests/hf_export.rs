//! `gantry checkpoint export` against Hugging Face transformers itself: a GPT-2 (tied head)
//! and a Llama (untied head, its own rotary base and RMSNorm epsilon, its data's tokenizer from
//! a Hugging Face style folder with a chat template) trained by `gantry launch` on
//! tinyshakespeare are exported, loaded by `AutoModelForCausalLM` and `AutoTokenizer` with no
//! extra arguments (`bench/peers/hf_check.py`), and must give `gantry eval`'s loss on the same
//! token windows within 1e-4, the registry's greedy tokens token for token, the ids and text of
//! gantry's tokenizer on real lines, the end-of-document token as BOS / EOS everywhere and the
//! folder's chat template. A checkpoint trained on synthetic token ids exports without
//! tokenizer files and with no BOS / EOS ids (never GPT-2's 50256).
//!
//! The Python side is the torch peer venv (`GANTRY_TORCH_PY`, else `.tools/torch-peer`, made
//! by `scripts/setup.sh`). Where it is missing the tests skip with one line, except in CI
//! (`CI=true`), where that is a failure.

mod common;

use common::registry::{RegistryProcess, peer_python, repo, serve_registry, shakespeare_dataset, shakespeare_text};
use common::{GANTRY, Reply, post_json, text};
use gantry_sharding::codec::TextCodec;
use gantry_sharding::gpt::{GptDataset, OpenOptions, Split};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

const WRITE: &str = "writer-token-0123456789";
const SEQ: usize = 64;
const WINDOWS: u64 = 6;
const NEW_TOKENS: usize = 20;

const GPT2: &str = r#"
[model]
arch = "gpt2"
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 64
"#;

const LLAMA: &str = r#"
[model]
arch = "llama"
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 64
tie_embeddings = false
rope_theta = 50000.0
norm_eps = 1e-6
"#;

const TRAIN: &str = r#"
[optim]
lr = 3e-3
warmup_steps = 5
[train]
steps = 30
global_batch = 8
micro_batch = 8
threads = 1
"#;

/// The torch peer's Python (`GANTRY_TORCH_PY`, else `.tools/torch-peer`), where torch and
/// transformers import.
fn torch_python() -> Option<PathBuf> {
    peer_python(
        "GANTRY_TORCH_PY",
        ".tools/torch-peer/bin/python",
        "torch, transformers, safetensors",
    )
}

/// `hf_check.py` on `request`; its JSON report.
fn hf_check(py: &Path, dir: &Path, request: &Value) -> Value {
    let path = dir.join("hf-request.json");
    std::fs::write(&path, request.to_string()).unwrap();
    let out = Command::new(py)
        .arg(repo().join("bench/peers/hf_check.py"))
        .arg(&path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .unwrap();
    assert!(out.status.success(), "hf_check.py failed: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("hf_check.py output ({e}): {}", text(&out)))
}

fn serve(dir: &Path) -> RegistryProcess {
    serve_registry(dir, "registry", &format!("write {WRITE}\n"), &["--device", "cpu"])
}

/// Train `model` (a `[model]` section) on `data` for a few steps; the checkpoint directory.
fn train(dir: &Path, model: &str, data: &Path) -> PathBuf {
    let spec = dir.join("job.toml");
    std::fs::write(&spec, format!("{model}{TRAIN}[data]\npath = \"{}\"\n", data.display())).unwrap();
    let ckpt = dir.join("ckpt");
    let run = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "1", "--checkpoint-dir"])
        .arg(&ckpt)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    ckpt
}

/// `gantry checkpoint export`; its output.
fn export(ckpt: &Path, out: &Path) -> String {
    let o = Command::new(GANTRY)
        .args(["checkpoint", "export", "--out"])
        .arg(out)
        .arg(ckpt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The first `WINDOWS` samples of the whole dataset, as `gantry eval --valid-fraction 0` reads
/// them (`SEQ + 1` tokens each).
fn windows(data: &Path, vocab: u64) -> Vec<Vec<i64>> {
    let ds = GptDataset::open_with(data, SEQ, Split::All, &OpenOptions::for_vocab(vocab)).unwrap();
    (0..WINDOWS)
        .map(|s| {
            let mut ids = Vec::new();
            ds.sample_into(s, &mut ids).unwrap();
            ids
        })
        .collect()
}

/// `gantry eval`'s loss over those windows, through the registry.
fn gantry_loss(reg: &RegistryProcess, model: &str, data: &Path) -> f64 {
    let out = Command::new(GANTRY)
        .args([
            "eval",
            "--model",
            model,
            "--valid-fraction",
            "0",
            "--batch",
            "4",
            "--no-record",
            "--json",
        ])
        .args(["--device", "cpu", "--max-samples", &WINDOWS.to_string(), "--data"])
        .arg(data)
        .env("GANTRY_REGISTRY", &reg.addr)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tokens"].as_u64(), Some(WINDOWS * SEQ as u64), "{report}");
    report["loss"].as_f64().unwrap()
}

/// The registry's greedy continuation (temperature 0, ending at the EOD like transformers).
fn gantry_greedy(reg: &RegistryProcess, model: &str, prompt: &[u32]) -> Vec<u64> {
    let r: Reply = post_json(
        &reg.addr,
        &format!("/v1/models/{model}/generate"),
        None,
        &json!({ "tokens": prompt, "max_tokens": NEW_TOKENS, "temperature": 0 }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// Lines of tinyshakespeare and the awkward cases: spaces, Unicode, the EOD inside text.
fn texts() -> Vec<String> {
    let corpus = std::fs::read_to_string(shakespeare_text()).unwrap();
    let mut out: Vec<String> = corpus.lines().take(300).map(str::to_string).collect();
    out.extend(corpus.split("\n\n").skip(40).take(20).map(str::to_string));
    out.extend(
        [
            "  two  spaces , and ' quotes ' ! ",
            "héllo wörld, 日本語 🙂",
            "before<|endoftext|>after",
            "tabs\tand\nnew lines\n\n",
            "",
        ]
        .map(str::to_string),
    );
    out
}

/// A chat template that shows which EOS token the tokenizer has.
const CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{{ eos_token }}";

/// tinyshakespeare again, through `--tokenizer` from a Hugging Face style folder whose
/// tokenizer_config.json has a chat template and settings (BOS added, another class) that
/// gantry's encoding did not use: the checkpoint carries the config, the export keeps only the
/// template.
fn shakespeare_from_a_tokenizer_folder(dir: &Path) -> PathBuf {
    let trained = shakespeare_dataset(dir);
    let folder = dir.join("tokenizer-folder");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(trained.join("tokenizer.json"), folder.join("tokenizer.json")).unwrap();
    let config = json!({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": true, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(folder.join("tokenizer_config.json"), config.to_string()).unwrap();
    let data = dir.join("ts-folder");
    let out = Command::new(GANTRY)
        .args(["data", "prepare", "--split-by", "blank-line", "--tokenizer"])
        .arg(folder.join("tokenizer.json"))
        .arg("--input")
        .arg(shakespeare_text())
        .arg("--output")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    data
}

/// Train, register, export and compare one architecture; `folder`: the data's tokenizer comes
/// from a Hugging Face style folder with a chat template.
fn matches_transformers(tag: &str, model: &str, hf_class: &str, folder: bool) {
    let Some(py) = torch_python() else { return };
    let dir = common::tempdir("hf-export", tag);
    let data = if folder {
        shakespeare_from_a_tokenizer_folder(&dir)
    } else {
        shakespeare_dataset(&dir)
    };
    let ckpt = train(&dir, model, &data);
    let out = dir.join("hf");
    let said = export(&ckpt, &out);
    assert!(
        said.contains(&format!("as {hf_class}")) && said.contains("<|endoftext|> (id 0) is the BOS and EOS token"),
        "{said}"
    );

    // The ids: the tokenizer's end-of-document token is BOS and EOS in every file.
    let codec = TextCodec::from_json_bytes(&std::fs::read(data.join("tokenizer.json")).unwrap()).unwrap();
    let eod = codec.eod().expect("a prepared dataset's tokenizer has the EOD");
    let config = read_json(&out.join("config.json"));
    let generation = read_json(&out.join("generation_config.json"));
    let tok_config = read_json(&out.join("tokenizer_config.json"));
    for c in [&config, &generation] {
        assert_eq!(
            (&c["bos_token_id"], &c["eos_token_id"]),
            (&json!(eod), &json!(eod)),
            "{c}"
        );
    }
    assert_eq!(
        (&tok_config["bos_token"], &tok_config["eos_token"]),
        (&json!("<|endoftext|>"), &json!("<|endoftext|>"))
    );
    assert_eq!(tok_config.get("chat_template").is_some(), folder, "{tok_config}");

    let reg = serve(&dir);
    let registered = Command::new(GANTRY)
        .args(["models", "register", tag, "--checkpoint"])
        .arg(&ckpt)
        .env("GANTRY_REGISTRY", &reg.addr)
        .env("GANTRY_REGISTRY_TOKEN", WRITE)
        .output()
        .unwrap();
    assert!(registered.status.success(), "{}", text(&registered));

    let vocab = config["vocab_size"].as_u64().unwrap();
    let windows = windows(&data, vocab);
    let prompts: Vec<Vec<u32>> = vec![
        vec![eod],
        codec.encode("ROMEO:\nWhat").unwrap(),
        windows[2][..12].iter().map(|&t| t as u32).collect(),
    ];
    let texts = texts();
    let hf = hf_check(
        &py,
        &dir,
        &json!({
            "model_dir": out, "windows": windows, "prompts": prompts,
            "max_new_tokens": NEW_TOKENS, "texts": texts,
            "chat": [{ "role": "user", "content": "Hi" }, { "role": "assistant", "content": "Ho" }],
        }),
    );
    assert_eq!(hf["architecture"], hf_class, "{hf}");
    for key in [
        "config_bos_token_id",
        "config_eos_token_id",
        "generation_bos_token_id",
        "generation_eos_token_id",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert_eq!(hf[key], json!(eod), "{key}: {hf}");
    }

    // The same loss on the same windows.
    let gantry = gantry_loss(&reg, tag, &data);
    let theirs = hf["loss"].as_f64().unwrap();
    eprintln!("{tag}: loss over {WINDOWS} windows: gantry eval {gantry}, transformers {theirs}");
    assert_eq!(hf["tokens"].as_u64(), Some(WINDOWS * SEQ as u64));
    assert!(
        (gantry - theirs).abs() < 1e-4,
        "{tag}: gantry eval {gantry}, transformers {theirs}"
    );
    // A trained model, not one that is uniform over the vocabulary (ln 512 = 6.24).
    assert!(gantry < 6.0, "{tag}: loss {gantry} after training");

    // The same greedy tokens.
    for (i, p) in prompts.iter().enumerate() {
        let ours = gantry_greedy(&reg, tag, p);
        let got: Vec<u64> = serde_json::from_value(hf["generations"][i].clone()).unwrap();
        assert_eq!(got, ours, "{tag}: greedy continuation of prompt {i} {p:?}");
    }

    // The same ids and text as gantry's codec, line for line.
    for (i, t) in texts.iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(hf["encoded"][i].clone()).unwrap();
        assert_eq!(ids, codec.encode(t).unwrap(), "{tag}: encoding {t:?}");
        assert_eq!(
            hf["decoded"][i],
            json!(codec.decode(&ids).unwrap()),
            "{tag}: decoding {t:?}"
        );
    }
    let chat = folder.then_some("<|user|>Hi\n<|assistant|>Ho\n<|endoftext|>");
    assert_eq!(hf["chat"].as_str(), chat, "{tag}: the chat template");
    drop(reg);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpt2_export_matches_transformers() {
    matches_transformers("gpt2", GPT2, "GPT2LMHeadModel", false);
}

#[test]
fn llama_export_from_a_tokenizer_folder_matches_transformers() {
    matches_transformers("llama", LLAMA, "LlamaForCausalLM", true);
}

#[test]
fn token_id_checkpoints_export_without_a_tokenizer() {
    let dir = common::tempdir("hf-export", "synthetic");
    let spec = common::synth_job(
        &dir,
        &format!(
            "{}\n[train]\nsteps = 2\nglobal_batch = 2\nmicro_batch = 2\nthreads = 1\n",
            LLAMA.replace("seq_len = 64", "seq_len = 16")
        ),
        60_000,
        3,
    );
    let ckpt = dir.join("ckpt");
    let run = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "1", "--checkpoint-dir"])
        .arg(&ckpt)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    // A folder an earlier export left a tokenizer in: it must not survive as this model's.
    let out = dir.join("hf");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), "{}").unwrap();
    let said = export(&ckpt, &out);
    assert!(said.contains("no tokenizer") && said.contains("synthetic"), "{said}");
    assert!(said.contains("removed"), "{said}");
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        assert!(!out.join(name).exists(), "{name} written without a tokenizer");
    }
    let config = read_json(&out.join("config.json"));
    assert!(
        config["eos_token_id"].is_null() && config["bos_token_id"].is_null(),
        "{config}"
    );

    let Some(py) = torch_python() else { return };
    let hf = hf_check(
        &py,
        &dir,
        &json!({ "model_dir": out, "windows": [], "prompts": [[1, 2, 3]], "max_new_tokens": 5 }),
    );
    assert_eq!(hf["architecture"], "LlamaForCausalLM", "{hf}");
    assert!(
        hf["config_eos_token_id"].is_null() && hf["generation_eos_token_id"].is_null(),
        "{hf}"
    );
    assert_eq!(hf["generations"][0].as_array().map(Vec::len), Some(5), "{hf}");
    assert!(hf.get("encoded").is_none(), "{hf}");
    let _ = std::fs::remove_dir_all(&dir);
}
