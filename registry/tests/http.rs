//! The HTTP service end to end: a real server on 127.0.0.1:0, real committed checkpoints, and
//! a minimal HTTP/1.1 client over `std::net::TcpStream`.

mod common;

use common::chunk_files;
use common::http_client::{get, http, send_json};
use common::server::{READ, Server, WRITE};
use gantry_registry::http::ROUTES;
use serde_json::json;
use std::path::Path;

/// The object name (relative to the step dir) of a chunk file.
fn object_name(ckpt: &Path, step: u64, file: &Path) -> String {
    let step_dir = ckpt.join(format!("step-{step:08}"));
    file.strip_prefix(&step_dir).unwrap().to_string_lossy().into_owned()
}

#[test]
fn register_alias_resolve_download_and_eval() {
    let srv = Server::start("http-flow", true);
    let a = srv.addr;
    assert_eq!(get(a, "/healthz").status, 200);
    let v1 = srv.register("gpt", 10);
    assert_eq!((v1["version"].as_u64(), v1["step"].as_u64()), (Some(1), Some(10)));
    srv.register("gpt", 20);
    // Registering the same step again is a conflict.
    let again = send_json(
        a,
        "POST",
        "/v1/models/gpt/versions",
        Some(WRITE),
        &json!({ "checkpoint": srv.ckpt, "step": 20 }),
    );
    assert_eq!((again.status, again.error_code().as_str()), (409, "already_registered"));

    let set = send_json(
        a,
        "PUT",
        "/v1/models/gpt/aliases/prod",
        Some(WRITE),
        &json!({ "version": 1 }),
    );
    assert_eq!(set.status, 200, "{}", String::from_utf8_lossy(&set.body));
    let resolved = get(a, "/v1/models/gpt@prod").json();
    assert_eq!(
        (resolved["version"].as_u64(), resolved["resolved_from"].as_str()),
        (Some(1), Some("gpt@prod"))
    );
    assert_eq!(get(a, "/v1/models/gpt@2").json()["step"], 20);
    let model = get(a, "/v1/models/gpt").json();
    assert_eq!(
        (model["name"].as_str(), model["latest_version"].as_u64()),
        (Some("gpt"), Some(2))
    );
    assert_eq!(model["aliases"][0]["name"], "prod");
    assert_eq!(
        get(a, "/v1/models/gpt/aliases").json()["aliases"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Listings page.
    srv.register("bert", 10);
    let page = get(a, "/v1/registry/models?limit=1").json();
    assert_eq!(
        (page["models"][0]["name"].as_str(), page["next"].as_str()),
        (Some("bert"), Some("bert"))
    );
    let page2 = get(a, "/v1/registry/models?limit=1&after=bert").json();
    assert_eq!(
        (page2["models"][0]["name"].as_str(), page2["next"].is_null()),
        (Some("gpt"), true)
    );
    assert_eq!(
        get(a, "/v1/registry/models?filter=er").json()["models"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let versions = get(a, "/v1/models/gpt/versions?limit=1").json();
    assert_eq!(
        (versions["versions"][0]["version"].as_u64(), versions["next"].as_str()),
        (Some(1), Some("1"))
    );

    // A chunk of the version behind `prod`, by range.
    let chunk = &chunk_files(Path::new(&srv.ckpt), 10)[0];
    let bytes = std::fs::read(chunk).unwrap();
    let object = object_name(Path::new(&srv.ckpt), 10, chunk);
    let url = format!("/v1/models/gpt/versions/prod/files/{object}");
    let full = get(a, &url);
    assert_eq!((full.status, full.body.as_slice()), (200, bytes.as_slice()));
    assert_eq!(full.header("x-gantry-version"), Some("1"));
    let part = http(a, "GET", &url, &[("Range", "bytes=100-299")], None);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, bytes[100..300]);
    let n = bytes.len();
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 100-299/{n}").as_str())
    );
    let tail = http(a, "GET", &url, &[("Range", "bytes=-10")], None);
    assert_eq!((tail.status, tail.body.as_slice()), (206, &bytes[n - 10..]));
    let open_end = http(a, "GET", &url, &[("Range", "bytes=5-")], None);
    assert_eq!((open_end.status, open_end.body.as_slice()), (206, &bytes[5..]));
    let beyond = http(a, "GET", &url, &[("Range", &format!("bytes={n}-"))], None);
    assert_eq!(
        (beyond.status, beyond.header("content-range")),
        (416, Some(format!("bytes */{n}").as_str()))
    );
    let etag = full.header("etag").expect("an ETag").to_string();
    assert!(etag.starts_with('"'), "strong ETag {etag}");
    let cached = http(a, "GET", &url, &[("If-None-Match", &etag)], None);
    assert_eq!((cached.status, cached.body.len()), (304, 0));
    assert_eq!(
        http(a, "GET", &url, &[("If-None-Match", "\"other\"")], None).status,
        200
    );
    // Same object name at step 20 (version 2): different bytes, different ETag.
    let v2 = get(a, &format!("/v1/models/gpt/versions/2/files/{object}"));
    assert_eq!(
        v2.body,
        std::fs::read(chunk_files(Path::new(&srv.ckpt), 20)[0].clone()).unwrap()
    );
    assert_ne!(v2.header("etag"), Some(etag.as_str()));
    let manifest = get(a, "/v1/models/gpt/versions/1/files/manifest.json");
    assert_eq!(manifest.status, 200);
    assert!(manifest.json()["objects"].is_array());

    // An eval, visible on the version.
    let eval = json!({ "dataset": "wiki", "loss": 2.5, "perplexity": 12.2, "tokens": 1000, "tp": 2 });
    let posted = send_json(a, "POST", "/v1/models/gpt/versions/prod/evals", Some(WRITE), &eval);
    assert_eq!(posted.status, 201, "{}", String::from_utf8_lossy(&posted.body));
    let v = get(a, "/v1/models/gpt/versions/1").json();
    assert_eq!(
        (v["evals"][0]["dataset"].as_str(), v["evals"][0]["loss"].as_f64()),
        (Some("wiki"), Some(2.5))
    );

    // Weighted split: the per-request counter follows the weights.
    let split = json!({ "targets": [{ "version": 1, "weight": 1 }, { "version": 2, "weight": 1 }] });
    assert_eq!(
        send_json(a, "PUT", "/v1/models/gpt/aliases/canary", Some(WRITE), &split).status,
        200
    );
    let seen: std::collections::BTreeSet<u64> = (0..4)
        .map(|_| get(a, "/v1/models/gpt@canary").json()["version"].as_u64().unwrap())
        .collect();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2]);
    let del = http(
        a,
        "DELETE",
        "/v1/models/gpt/aliases/canary",
        &[("Authorization", &format!("Bearer {WRITE}"))],
        None,
    );
    assert_eq!(del.status, 200);
    assert_eq!(get(a, "/v1/models/gpt@canary").error_code(), "unknown_alias");
}

#[test]
fn refusals_auth_and_bad_input_are_json_errors() {
    let srv = Server::start("http-errors", true);
    let a = srv.addr;
    srv.register("gpt", 10);

    // A corrupted checkpoint is refused with the checkpoint message.
    let chunk = &chunk_files(Path::new(&srv.ckpt), 20)[0];
    let mut b = std::fs::read(chunk).unwrap();
    b[0] ^= 0xff;
    std::fs::write(chunk, &b).unwrap();
    let body = json!({ "checkpoint": srv.ckpt, "step": 20 });
    let r = send_json(a, "POST", "/v1/models/gpt/versions", Some(WRITE), &body);
    assert_eq!((r.status, r.error_code().as_str()), (422, "checkpoint_refused"));
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("rank-00000"),
        "names the object"
    );
    let missing = json!({ "checkpoint": srv.dir.0.join("nowhere").display().to_string() });
    assert_eq!(
        send_json(a, "POST", "/v1/models/gpt/versions", Some(WRITE), &missing).status,
        422
    );

    // Auth: no token 401, read token 403, a bad token 401 (even on an open read).
    let alias = json!({ "version": 1 });
    let path = "/v1/models/gpt/aliases/prod";
    let none = send_json(a, "PUT", path, None, &alias);
    assert_eq!((none.status, none.error_code().as_str()), (401, "unauthorized"));
    let read = send_json(a, "PUT", path, Some(READ), &alias);
    assert_eq!((read.status, read.error_code().as_str()), (403, "forbidden"));
    assert_eq!(
        send_json(a, "PUT", path, Some("not-a-token-at-all"), &alias).status,
        401
    );
    let bad_read = http(
        a,
        "GET",
        "/v1/models/gpt",
        &[("Authorization", "Bearer wrong-token-xxxxxxxx")],
        None,
    );
    assert_eq!(bad_read.status, 401);
    assert_eq!(get(a, "/v1/models/gpt").status, 200, "reads are open");

    // Unknown things: 404 with the right code.
    assert_eq!(get(a, "/v1/models/nope").error_code(), "unknown_model");
    assert_eq!(get(a, "/v1/models/nope@3").error_code(), "unknown_model");
    assert_eq!(get(a, "/v1/models/gpt/versions/9").error_code(), "unknown_version");
    assert_eq!(get(a, "/v1/models/gpt@9").status, 404);
    assert_eq!(get(a, "/v1/models/gpt@prod").error_code(), "unknown_alias");
    assert_eq!(
        get(a, "/v1/models/gpt/versions/1/files/nothing.bin").error_code(),
        "unknown_file"
    );
    let unknown_route = get(a, "/v2/elsewhere");
    assert_eq!(
        (unknown_route.status, unknown_route.error_code().as_str()),
        (404, "not_found")
    );
    let wrong_method = http(a, "PATCH", "/v1/models", &[], None);
    assert_eq!(
        (wrong_method.status, wrong_method.error_code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(get(a, "/v1/registry/models?limit=zero").error_code(), "bad_request");
    assert_eq!(get(a, "/v1/models/Bad%20Name").status, 400);

    // Path traversal: 404, whatever the spelling.
    for p in [
        "..%2F..%2Fregistry.redb",
        "../../registry.redb",
        "%2Fetc%2Fpasswd",
        "rank-00000.json",
        "rank-00000/..%2Fmanifest.json",
    ] {
        let r = get(a, &format!("/v1/models/gpt/versions/1/files/{p}"));
        assert_eq!(r.status, 404, "{p}: {}", String::from_utf8_lossy(&r.body));
        assert!(r.json()["error"].is_object());
    }

    // Malformed JSON: 400 JSON errors, and the server keeps answering.
    let auth = format!("Bearer {WRITE}");
    for body in [
        &b"{not json"[..],
        b"",
        b"[1,2]",
        b"{\"version\": \"x\"}",
        b"{\"version\": 1, \"extra\": 2}",
    ] {
        let r = http(
            a,
            "PUT",
            path,
            &[("Content-Type", "application/json"), ("Authorization", &auth)],
            Some(body),
        );
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "bad_json"),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    let both = send_json(a, "PUT", path, Some(WRITE), &json!({ "version": 1, "targets": [] }));
    assert_eq!(both.status, 400);
    let no_type = http(a, "PUT", path, &[("Authorization", &auth)], Some(b"{\"version\":1}"));
    assert_eq!(no_type.status, 415);
    let weights = json!({ "targets": [{ "version": 1, "weight": 0 }] });
    assert_eq!(
        send_json(a, "PUT", path, Some(WRITE), &weights).error_code(),
        "bad_weights"
    );
    assert_eq!(
        send_json(a, "PUT", path, Some(WRITE), &json!({ "version": 7 })).error_code(),
        "unknown_version"
    );
    assert_eq!(get(a, "/healthz").status, 200, "still serving");
    assert_eq!(send_json(a, "PUT", path, Some(WRITE), &alias).status, 200);
}

#[test]
fn closed_reads_need_a_token() {
    let srv = Server::start("http-closed", false);
    let a = srv.addr;
    srv.register("gpt", 10);
    assert_eq!(get(a, "/v1/models/gpt").status, 401);
    let ok = http(
        a,
        "GET",
        "/v1/models/gpt",
        &[("Authorization", &format!("Bearer {READ}"))],
        None,
    );
    assert_eq!(ok.status, 200);
    assert_eq!(get(a, "/healthz").status, 200);
    assert_eq!(get(a, "/openapi.json").status, 200);
}

#[test]
fn openapi_document_lists_every_route_and_the_router_serves_them() {
    let srv = Server::start("http-openapi", true);
    let doc = get(srv.addr, "/openapi.json").json();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    for (method, path) in ROUTES {
        let op = &doc["paths"][*path][*method];
        assert!(op["responses"].is_object(), "{method} {path} documented");
        // The router has the route: whatever the answer, it is not "no such route" / 405.
        let concrete = path
            .replace("{model}", "gpt")
            .replace("{version}", "1")
            .replace("{alias}", "prod")
            .replace("{path}", "manifest.json");
        let r = http(srv.addr, &method.to_uppercase(), &concrete, &[], None);
        assert_ne!(r.status, 405, "{method} {path}");
        if r.status == 404 {
            assert_ne!(r.error_code(), "not_found", "{method} {path} is routed");
        }
    }
}

#[test]
fn concurrent_downloads_while_the_alias_moves() {
    let srv = Server::start("http-concurrent", true);
    let a = srv.addr;
    srv.register("gpt", 10);
    srv.register("gpt", 20);
    assert_eq!(
        send_json(
            a,
            "PUT",
            "/v1/models/gpt/aliases/prod",
            Some(WRITE),
            &json!({ "version": 1 })
        )
        .status,
        200
    );
    let chunk10 = &chunk_files(Path::new(&srv.ckpt), 10)[0];
    let object = object_name(Path::new(&srv.ckpt), 10, chunk10);
    let expected = [
        std::fs::read(chunk10).unwrap(),
        std::fs::read(Path::new(&srv.ckpt).join("step-00000020").join(&object)).unwrap(),
    ];
    assert_ne!(expected[0], expected[1]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut moves = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let v = 1 + moves % 2;
                let r = send_json(
                    a,
                    "PUT",
                    "/v1/models/gpt/aliases/prod",
                    Some(WRITE),
                    &json!({ "version": v }),
                );
                assert_eq!(r.status, 200);
                moves += 1;
            }
            moves
        })
    };
    let downloaders: Vec<_> = (0..4)
        .map(|t| {
            let url = format!("/v1/models/gpt/versions/prod/files/{object}");
            let expected = expected.clone();
            std::thread::spawn(move || {
                let mut seen = [0usize; 2];
                for i in 0..40 {
                    let range = format!("bytes={}-", (t * 7 + i) % 50);
                    let r = http(a, "GET", &url, &[("Range", &range)], None);
                    assert_eq!(r.status, 206);
                    let v: usize = r.header("x-gantry-version").unwrap().parse().unwrap();
                    let start = (t * 7 + i) % 50;
                    assert_eq!(r.body, expected[v - 1][start..], "bytes of version {v}");
                    seen[v - 1] += 1;
                }
                seen
            })
        })
        .collect();
    let mut total = [0usize; 2];
    for d in downloaders {
        let s = d.join().expect("downloader");
        total[0] += s[0];
        total[1] += s[1];
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let moves = mover.join().expect("mover");
    assert_eq!(total[0] + total[1], 160);
    assert!(moves > 1, "the alias moved ({moves} times)");
}
