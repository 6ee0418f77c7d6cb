//! Per-TP-rank tensor views and checkpoint files, from local and S3 checkpoints: a real server,
//! real committed checkpoints (saved split along dimension 0 over two ranks), a real s3s-fs
//! server, and the safetensors crate as the reader of what the registry sends.

mod common;

use common::http_client::{get, http};
use common::pattern::slice_bytes;
use common::s3_server::S3Server;
use common::server::Server;
use common::{TempDir, save_steps_to, tensors};
use gantry_checkpoint::format::tp_share;
use gantry_checkpoint::{S3Options, SliceSpec};
use safetensors::SafeTensors;
use serde_json::Value;

/// How the test checkpoint's parameters are split under TP (`common::job`).
fn split_of(name: &str) -> Option<usize> {
    match name {
        "embed" => Some(0),
        "layers.0.w" => Some(1),
        _ => None,
    }
}

/// Check a `tensors?tp=&rank=` body against the deterministic contents of step `step`.
fn check_share(body: &[u8], step: u64, tp: u64, rank: u64) {
    let st = SafeTensors::deserialize(body).expect("a safetensors file");
    let (_, meta) = SafeTensors::read_metadata(body).expect("safetensors metadata");
    let meta = meta.metadata().clone().expect("gantry metadata");
    assert_eq!(
        (meta["gantry.tp"].as_str(), meta["gantry.rank"].as_str()),
        (tp.to_string().as_str(), rank.to_string().as_str())
    );
    let described: Value = serde_json::from_str(&meta["gantry.slices"]).expect("slices JSON");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, ["embed", "layers.0.w", "ln"], "only parameters, every one");
    for full in tensors() {
        let (offsets, lengths) = tp_share(&full.global_shape, split_of(&full.name), tp, rank).unwrap();
        let want = SliceSpec {
            offsets: offsets.clone(),
            lengths: lengths.clone(),
            ..full.clone()
        };
        let view = st.tensor(&full.name).expect("tensor present");
        assert_eq!(
            view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
            lengths,
            "{}",
            full.name
        );
        assert_eq!(
            view.data(),
            slice_bytes(step, &want).as_slice(),
            "{} bytes for tp={tp} rank={rank}",
            full.name
        );
        assert_eq!(
            described[&full.name]["offsets"],
            serde_json::json!(offsets),
            "{}",
            full.name
        );
        assert_eq!(
            described[&full.name]["global_shape"],
            serde_json::json!(full.global_shape)
        );
    }
}

#[test]
fn tp_shares_of_a_local_checkpoint() {
    let srv = Server::start("tensors-local", true);
    srv.register("gpt", 10);
    srv.register("gpt", 20);
    for (tp, rank) in [(1, 0), (2, 0), (2, 1), (4, 3)] {
        let r = get(
            srv.addr,
            &format!("/v1/models/gpt/versions/1/tensors?tp={tp}&rank={rank}"),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-gantry-version"), Some("1"));
        check_share(&r.body, 10, tp, rank);
    }
    // Through `latest`, and a 304 for a repeated request.
    let r = get(srv.addr, "/v1/models/gpt/versions/latest/tensors?tp=2&rank=1");
    check_share(&r.body, 20, 2, 1);
    let etag = r.header("etag").expect("an ETag").to_string();
    let again = http(
        srv.addr,
        "GET",
        "/v1/models/gpt/versions/2/tensors?tp=2&rank=1",
        &[("If-None-Match", &etag)],
        None,
    );
    assert_eq!(again.status, 304);
    // tp that does not divide a split dimension, ranks out of range, unknown parameters.
    let bad = get(srv.addr, "/v1/models/gpt/versions/1/tensors?tp=5&rank=0");
    assert_eq!(bad.status, 400);
    let msg = bad.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("embed") && msg.contains("5 TP parts"), "{msg}");
    for q in ["tp=2&rank=2", "tp=0", "tp=two", "shard=1"] {
        let r = get(srv.addr, &format!("/v1/models/gpt/versions/1/tensors?{q}"));
        assert_eq!((r.status, r.error_code().as_str()), (400, "bad_request"), "{q}");
    }
    assert_eq!(get(srv.addr, "/v1/models/gpt/versions/9/tensors").status, 404);
    assert_eq!(get(srv.addr, "/v1/models/nope/versions/1/tensors").status, 404);
}

#[test]
fn files_and_tp_shares_of_an_s3_checkpoint() {
    let s3 = S3Server::start();
    let opts = S3Options {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key: Some(s3.access_key.clone()),
        secret_key: Some(s3.secret_key.clone()),
        ..Default::default()
    };
    let url = format!("s3://{}/models/run-1", s3.bucket);
    save_steps_to(&url, &opts, &[10]);
    let srv = Server::serve(TempDir::new("tensors-s3"), url, true, opts);
    let v = srv.register("gpt", 10);
    assert_eq!(v["checkpoint_url"].as_str(), Some(srv.ckpt.as_str()));

    let step_file = |object: &str| s3.object_path(&format!("models/run-1/step-00000010/{object}"));
    let manifest = get(srv.addr, "/v1/models/gpt/versions/1/files/manifest.json");
    assert_eq!(manifest.status, 200, "{}", String::from_utf8_lossy(&manifest.body));
    assert_eq!(manifest.body, std::fs::read(step_file("manifest.json")).unwrap());
    let objects: Vec<String> = manifest.json()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["object"].as_str().unwrap().to_string())
        .collect();
    assert!(objects.len() > 2, "chunks are cut at 1 KiB, so there are several");
    for object in &objects {
        let whole = get(srv.addr, &format!("/v1/models/gpt/versions/1/files/{object}"));
        let on_disk = std::fs::read(step_file(object)).unwrap();
        assert_eq!((whole.status, &whole.body), (200, &on_disk), "{object}");
        let end = on_disk.len().min(100) - 1;
        let part = http(
            srv.addr,
            "GET",
            &format!("/v1/models/gpt/versions/1/files/{object}"),
            &[("Range", &format!("bytes=5-{end}"))],
            None,
        );
        assert_eq!(
            (part.status, part.body.as_slice()),
            (206, &on_disk[5..=end]),
            "{object}"
        );
        let etag = whole.header("etag").unwrap().to_string();
        let cached = http(
            srv.addr,
            "GET",
            &format!("/v1/models/gpt/versions/1/files/{object}"),
            &[("If-None-Match", &etag)],
            None,
        );
        assert_eq!(cached.status, 304);
    }
    assert_eq!(
        get(srv.addr, "/v1/models/gpt/versions/1/files/rank-00000/nope.bin").status,
        404
    );
    for (tp, rank) in [(1, 0), (2, 1)] {
        let r = get(
            srv.addr,
            &format!("/v1/models/gpt/versions/1/tensors?tp={tp}&rank={rank}"),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        check_share(&r.body, 10, tp, rank);
    }
    // A chunk that vanished from the bucket after registration: the files route says which.
    std::fs::remove_file(step_file(&objects[0])).unwrap();
    let gone = get(srv.addr, &format!("/v1/models/gpt/versions/1/files/{}", objects[0]));
    assert_eq!((gone.status, gone.error_code().as_str()), (404, "unknown_file"));
    assert!(
        gone.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing in the store")
    );
}
