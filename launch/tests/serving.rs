//! The registry end to end with real processes: a training run registers its checkpoints
//! itself (`[registry]`), `gantry eval` loads weights from the registry at TP 1 and TP 2 and
//! records the result, and `generate` serves the model: deterministic for a seed, the same
//! tokens as the trainer's own forward pass, batched when concurrent, streamed as server-sent
//! events, split between versions by a weighted alias with per-version `/metrics`, cached
//! under a byte limit; bad requests get JSON errors and the server keeps serving.

mod common;

use common::registry::{RegistryProcess, serve_registry, shakespeare_dataset};
use common::{GANTRY, Reply, http, post_json, text};
use gantry_checkpoint::{Checkpoint, S3Options, Store, Which};
use gantry_train::comm::{CommClock, TensorComm};
use gantry_train::model::{MicroBatch, Model};
use gantry_train::pipeline::forward_stage;
use gantry_train::spec::ModelSpec;
use gantry_train::tch::{self, Tensor};
use gantry_train::weights;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

const WRITE: &str = "writer-token-0123456789";

const SPEC: &str = r#"
name = "serving"
[model]
arch = "llama"
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 64
[parallel]
dp = 1
tp = 2
[optim]
lr = 3e-3
warmup_steps = 5
[train]
steps = 40
global_batch = 8
micro_batch = 8
threads = 1
[checkpoint]
every = 20
[registry]
model = "shakespeare"
register = "every"
alias = "staging"
"#;

fn serve(dir: &Path, tag: &str, extra: &[&str]) -> RegistryProcess {
    let mut flags = vec!["--batch-slots", "4"];
    flags.extend_from_slice(extra);
    serve_registry(dir, tag, &format!("write {WRITE}\n"), &flags)
}

fn generate(addr: &str, model: &str, body: Value) -> Reply {
    post_json(addr, &format!("/v1/models/{model}/generate"), None, &body)
}

fn tokens_of(r: &Reply) -> Vec<u64> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// Greedy continuation by the trainer's own forward pass (the whole window each token).
fn trainer_greedy(ckpt_root: &Path, step: u64, prompt: &[u64], n: usize) -> Vec<u64> {
    let store = Store::open(ckpt_root.to_str().unwrap(), &S3Options::default()).unwrap();
    let ckpt = Checkpoint::open(&store, Which::Step(step)).unwrap();
    let spec: ModelSpec = serde_json::from_value(ckpt.manifest.job.model.clone()).unwrap();
    let model = Model::whole_for_loading(&spec, 1, 0, tch::Device::Cpu).unwrap();
    weights::load_from_checkpoint(&model, &ckpt).unwrap();
    let mut tp = TensorComm::new(None, CommClock::default());
    let mut seq: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = Tensor::from_slice(&seq).view([1, seq.len() as i64]);
        let batch = MicroBatch {
            tokens: t.shallow_clone(),
            targets: t,
        };
        let (logits, _) = tch::no_grad(|| {
            forward_stage(&model, None, &batch, &mut tp, false, false, true).map_err(|e| e.to_string())
        })
        .unwrap();
        let next = logits.view([-1]).argmax(0, false).int64_value(&[]);
        out.push(next as u64);
        seq.push(next);
    }
    out
}

fn eval(addr: &str, data: &Path, tp: usize) -> Value {
    let out = Command::new(GANTRY)
        .args([
            "eval",
            "--model",
            "shakespeare@staging",
            "--max-samples",
            "40",
            "--json",
            "--tp",
        ])
        .arg(tp.to_string())
        .arg("--data")
        .arg(data)
        .env("GANTRY_REGISTRY", addr)
        .env("GANTRY_REGISTRY_TOKEN", WRITE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(addr: &str, line_prefix: &str) -> f64 {
    let m = http(addr, "GET", "/metrics", &[], None).text();
    m.lines()
        .find_map(|l| l.strip_prefix(line_prefix).map(|v| v.trim().parse::<f64>().unwrap()))
        .unwrap_or(0.0)
}

#[test]
fn train_register_eval_and_serve() {
    let dir = common::tempdir("serving", "flow");
    let data = shakespeare_dataset(&dir);
    let reg = serve(&dir, "main", &[]);
    let spec = dir.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "{SPEC}url = \"http://{}\"\n[data]\npath = \"{}\"\n",
            reg.addr,
            data.display()
        ),
    )
    .unwrap();
    let ckpt = dir.join("ckpt");
    let run = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "2", "--checkpoint-dir"])
        .arg(&ckpt)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env("GANTRY_REGISTRY_TOKEN", WRITE)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains("step 40 registered as shakespeare@2 (alias staging)"),
        "{}",
        text(&run)
    );

    // The run registered each commit and moved `staging` to the newest.
    let staging = http(&reg.addr, "GET", "/v1/models/shakespeare@staging", &[], None).json();
    assert_eq!(
        (staging["version"].as_u64(), staging["step"].as_u64()),
        (Some(2), Some(40)),
        "{staging}"
    );

    // Eval at TP 1 and TP 2 from the registry's per-rank shares: the same perplexity.
    let one = eval(&reg.addr, &data, 1);
    let two = eval(&reg.addr, &data, 2);
    let (p1, p2) = (one["perplexity"].as_f64().unwrap(), two["perplexity"].as_f64().unwrap());
    assert!(((p1 - p2) / p1).abs() < 1e-4, "TP 1 {one} vs TP 2 {two}");
    assert!(
        one["tokens"].as_u64() == Some(40 * 64) && p1 > 1.0 && p1 < 512.0,
        "{one}"
    );
    let data_flag = data.to_str().unwrap();
    for (flags, says) in [
        (["--tp", "3", "--data", data_flag], "does not divide model.n_heads"),
        (["--tp", "1", "--data", "/nonexistent"], "is not a token dataset"),
    ] {
        let out = Command::new(GANTRY)
            .args(["eval", "--model", "shakespeare@staging"])
            .args(flags)
            .env("GANTRY_REGISTRY", &reg.addr)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && text(&out).contains(says),
            "{flags:?}: {}",
            text(&out)
        );
    }
    let evals = http(&reg.addr, "GET", "/v1/models/shakespeare/versions/2", &[], None).json()["evals"].clone();
    assert_eq!(evals.as_array().map(Vec::len), Some(2), "{evals}");
    assert_eq!(evals[1]["tp"], 2);

    // Greedy generation equals the trainer's forward pass, token for token.
    let prompt = json!([35, 101, 7, 300, 12]);
    let greedy = generate(
        &reg.addr,
        "shakespeare@2",
        json!({ "tokens": prompt, "max_tokens": 12, "temperature": 0, "stop_at_eod": false }),
    );
    let served = tokens_of(&greedy);
    assert_eq!(served, trainer_greedy(&ckpt, 40, &[35, 101, 7, 300, 12], 12));
    assert_eq!(greedy.header("x-gantry-version"), Some("2"));

    // A seed fixes a sampled answer; concurrent requests (batched) get what they get alone.
    let sampled = json!({ "prompt": "ROMEO:", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 11, "stop_at_eod": false });
    let alone = generate(&reg.addr, "shakespeare@2", sampled.clone());
    let alone_tokens = tokens_of(&alone);
    assert_eq!(
        tokens_of(&generate(&reg.addr, "shakespeare@2", sampled.clone())),
        alone_tokens
    );
    assert!(
        alone.json()["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{}",
        alone.text()
    );
    let steps_before = metric(
        &reg.addr,
        "gantry_registry_decode_steps_total{model=\"shakespeare\",version=\"2\"}",
    );
    let decoded_before = metric(
        &reg.addr,
        "gantry_registry_decoded_sequences_total{model=\"shakespeare\",version=\"2\"}",
    );
    let together: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| tokens_of(&generate(&reg.addr, "shakespeare@2", sampled.clone()))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        together.iter().all(|t| *t == alone_tokens),
        "{together:?} vs {alone_tokens:?}"
    );
    let steps = metric(
        &reg.addr,
        "gantry_registry_decode_steps_total{model=\"shakespeare\",version=\"2\"}",
    ) - steps_before;
    let decoded = metric(
        &reg.addr,
        "gantry_registry_decoded_sequences_total{model=\"shakespeare\",version=\"2\"}",
    ) - decoded_before;
    assert!(
        decoded > steps,
        "concurrent requests shared decode steps: {decoded} sequences in {steps} steps"
    );

    // Streaming: the token events spell the same answer; `done` carries the whole of it.
    let mut streamed = sampled.clone();
    streamed["stream"] = json!(true);
    let sse = generate(&reg.addr, "shakespeare@2", streamed).text();
    let mut events: Vec<(String, Value)> = Vec::new();
    for block in sse.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let event = block
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or("")
            .to_string();
        let data: String = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        events.push((event, serde_json::from_str(&data).unwrap()));
    }
    let (last, done) = events.pop().unwrap();
    assert_eq!(last, "done", "{sse}");
    let streamed_tokens: Vec<u64> = events.iter().map(|(_, d)| d["token"].as_u64().unwrap()).collect();
    assert_eq!(streamed_tokens, alone_tokens);
    let pieces: String = events
        .iter()
        .map(|(_, d)| d["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(done["text"], alone.json()["text"]);
    assert!(
        alone.json()["text"].as_str().unwrap().starts_with(&pieces),
        "{pieces:?}"
    );

    // A stop string ends the text before it.
    let full = alone.json()["text"].as_str().unwrap().to_string();
    if let Some(word) = full.split_whitespace().nth(1) {
        let mut body = sampled.clone();
        body["stop"] = json!(word);
        let stopped = generate(&reg.addr, "shakespeare@2", body).json();
        assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
        assert_eq!(stopped["text"].as_str(), Some(&full[..full.find(word).unwrap()]));
    }

    // A weighted alias splits traffic; responses and /metrics say which version served.
    let split = json!({ "targets": [{ "version": 1, "weight": 1 }, { "version": 2, "weight": 1 }] });
    let auth = format!("Bearer {WRITE}");
    let set = http(
        &reg.addr,
        "PUT",
        "/v1/models/shakespeare/aliases/canary",
        &[("Content-Type", "application/json"), ("Authorization", &auth)],
        Some(split.to_string().as_bytes()),
    );
    assert_eq!(set.status, 200, "{}", set.text());
    let before = metric(
        &reg.addr,
        "gantry_registry_generate_requests_total{model=\"shakespeare\",version=\"1\",outcome=\"ok\"}",
    );
    let mut served_by = [0u32; 3];
    for _ in 0..10 {
        let r = generate(
            &reg.addr,
            "shakespeare@canary",
            json!({ "tokens": [1, 2], "max_tokens": 2 }),
        );
        served_by[r.json()["version"].as_u64().unwrap() as usize] += 1;
    }
    assert_eq!(served_by[1..], [5, 5], "{served_by:?}");
    let after = metric(
        &reg.addr,
        "gantry_registry_generate_requests_total{model=\"shakespeare\",version=\"1\",outcome=\"ok\"}",
    );
    assert_eq!(after - before, 5.0);

    // Bad requests: JSON errors, and the server keeps serving.
    for (model, body, status) in [
        ("nosuch", json!({ "tokens": [1] }), 404),
        ("shakespeare@9", json!({ "tokens": [1] }), 404),
        ("shakespeare", json!({ "tokens": [100000] }), 400),
        ("shakespeare", json!({ "tokens": [1], "max_tokens": 0 }), 400),
        ("shakespeare", json!({ "tokens": [1], "prompt": "x" }), 400),
        ("shakespeare", json!({ "tokens": [1], "temperature": -1 }), 400),
        ("shakespeare", json!({ "tokens": vec![1; 65] }), 400),
        ("shakespeare", json!({ "tokens": [1], "bogus": true }), 400),
    ] {
        let r = generate(&reg.addr, model, body.clone());
        assert_eq!(r.status, status, "{model} {body}: {}", r.text());
        assert!(r.json()["error"]["code"].is_string());
    }
    let garbage = http(
        &reg.addr,
        "POST",
        "/v1/models/shakespeare/generate",
        &[("Content-Type", "application/json")],
        Some(b"{not json"),
    );
    assert_eq!(garbage.status, 400);
    assert_eq!(
        tokens_of(&generate(
            &reg.addr,
            "shakespeare",
            json!({ "tokens": [1], "max_tokens": 1 })
        ))
        .len(),
        1
    );

    // A cache too small for any model refuses it; one that holds one version evicts the other
    // (the same database, served again with other limits).
    drop(reg);
    let small = serve(&dir, "main", &["--model-cache-mb", "0"]);
    let none = generate(&small.addr, "shakespeare@1", json!({ "tokens": [1] }));
    assert_eq!(
        (none.status, none.json()["error"]["code"].as_str()),
        (507, Some("model_too_large"))
    );
    drop(small);
    let one_model = serve(&dir, "main", &["--model-cache-mb", "1"]);
    for v in [1, 2, 1] {
        let r = generate(
            &one_model.addr,
            &format!("shakespeare@{v}"),
            json!({ "tokens": [1], "max_tokens": 2 }),
        );
        assert_eq!(r.json()["version"], v);
    }
    assert_eq!(metric(&one_model.addr, "gantry_registry_model_loads_total "), 3.0);
    assert_eq!(metric(&one_model.addr, "gantry_registry_model_evictions_total "), 2.0);
    assert_eq!(metric(&one_model.addr, "gantry_registry_models_loaded "), 1.0);
}

#[test]
fn eval_refuses_what_it_cannot_do() {
    let dir = common::tempdir("serving", "refusals");
    let reg = serve(&dir, "main", &[]);
    let out = Command::new(GANTRY)
        .args(["eval", "--model", "nosuch", "--data"])
        .arg(&dir)
        .env("GANTRY_REGISTRY", &reg.addr)
        .output()
        .unwrap();
    assert!(!out.status.success() && text(&out).contains("404"), "{}", text(&out));
}
