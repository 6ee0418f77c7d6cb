//! What an attacker (or an accident) can do to a registry and its checkpoints, against a real
//! server on 127.0.0.1:0 over real committed checkpoints: symlinks and extra objects in a
//! checkpoint, files swapped or changed after registration, locations outside the configured
//! roots, probing the file system through registration, closed `/metrics`, and connections
//! that never finish their headers or never go away.

mod common;

use common::chunk_files;
use common::http_client::{get, http, send_json};
use common::server::{READ, Server, WRITE};
use common::{TempDir, save_steps};
use gantry_registry::CheckpointRoot;
use gantry_registry::http::conn::ConnectionLimits;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

fn register(srv: &Server, model: &str, ckpt: &str, step: u64) -> common::http_client::Reply {
    send_json(
        srv.addr,
        "POST",
        &format!("/v1/models/{model}/versions"),
        Some(WRITE),
        &json!({ "checkpoint": ckpt, "step": step }),
    )
}

fn object_of(ckpt: &Path, step: u64, file: &Path) -> String {
    let dir = ckpt.join(format!("step-{step:08}"));
    file.strip_prefix(&dir).unwrap().to_string_lossy().into_owned()
}

/// Status, body bytes received and the announced length of a GET, for bodies that may be cut
/// off (the shared client asserts a complete body).
fn raw_get(addr: SocketAddr, path: &str) -> (u16, usize, Option<usize>) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, 0, None);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap());
    (status, raw.len() - split - 4, len)
}

#[test]
fn symlinks_and_unreferenced_objects_are_refused_at_registration() {
    let srv = Server::start("hard-reg", true);
    let ckpt = Path::new(&srv.ckpt).to_path_buf();
    let secret = srv.dir.0.join("secret.txt");
    std::fs::write(&secret, "token").unwrap();
    // A symlink beside the chunks of step 20: refused, named.
    let link = ckpt.join("step-00000020/rank-00000/extra.bin");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let r = register(&srv, "gpt", &srv.ckpt, 20);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("extra.bin") && r.text().contains("symlink"),
        "{}",
        r.text()
    );
    std::fs::remove_file(&link).unwrap();

    // The manifest of step 10 lists an extra object that no slice references.
    let manifest = ckpt.join("step-00000010/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    std::fs::write(ckpt.join("step-00000010/rank-00000/loot.bin"), "token").unwrap();
    m["objects"]
        .as_array_mut()
        .unwrap()
        .push(json!({"object": "rank-00000/loot.bin", "size": 5}));
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = register(&srv, "gpt", &srv.ckpt, 10);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("loot.bin") && r.text().contains("no tensor slice"),
        "{}",
        r.text()
    );
    // Step 20 is clean again and registers.
    assert_eq!(register(&srv, "gpt", &srv.ckpt, 20).status, 201);
}

#[test]
fn files_swapped_or_changed_after_registration_are_not_served() {
    let srv = Server::start("hard-serve", true);
    let a = srv.addr;
    srv.register("gpt", 20);
    let ckpt = Path::new(&srv.ckpt).to_path_buf();
    let chunks = chunk_files(&ckpt, 20);
    let secret = srv.dir.0.join("secret.txt");
    std::fs::write(&secret, "x".repeat(4096)).unwrap();

    // An object swapped for a symlink (to a file of any size): not served.
    let victim = &chunks[0];
    let object = object_of(&ckpt, 20, victim);
    std::fs::rename(victim, victim.with_extension("orig")).unwrap();
    std::os::unix::fs::symlink(&secret, victim).unwrap();
    let r = get(a, &format!("/v1/models/gpt/versions/1/files/{object}"));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "unknown_file"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains("xxxx"));
    std::fs::remove_file(victim).unwrap();
    std::fs::rename(victim.with_extension("orig"), victim).unwrap();

    // A directory on the way swapped for a symlink.
    let rank_dir = ckpt.join("step-00000020/rank-00000");
    let moved = ckpt.join("step-00000020/moved");
    std::fs::rename(&rank_dir, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &rank_dir).unwrap();
    assert_eq!(get(a, &format!("/v1/models/gpt/versions/1/files/{object}")).status, 404);
    std::fs::remove_file(&rank_dir).unwrap();
    std::fs::rename(&moved, &rank_dir).unwrap();

    // manifest.json swapped for a symlink: not served either.
    let manifest = ckpt.join("step-00000020/manifest.json");
    std::fs::rename(&manifest, manifest.with_extension("orig")).unwrap();
    std::os::unix::fs::symlink(manifest.with_extension("orig"), &manifest).unwrap();
    assert_eq!(get(a, "/v1/models/gpt/versions/1/files/manifest.json").status, 404);
    std::fs::remove_file(&manifest).unwrap();
    std::fs::rename(manifest.with_extension("orig"), &manifest).unwrap();
    assert_eq!(get(a, "/v1/models/gpt/versions/1/files/manifest.json").status, 200);

    // Intact: the whole object is served and checks out.
    let path = format!("/v1/models/gpt/versions/1/files/{object}");
    let size = std::fs::metadata(victim).unwrap().len() as usize;
    assert_eq!(raw_get(a, &path), (200, size, Some(size)));

    // A byte changed in place (same size): a ranged read still answers (size and identity
    // hold), but the whole object is cut off before its end instead of completing.
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[size - 3] ^= 0x5a;
    std::fs::write(victim, &bytes).unwrap();
    let ranged = http(a, "GET", &path, &[("Range", "bytes=0-9")], None);
    assert_eq!((ranged.status, ranged.body.len()), (206, 10));
    // Either the head went out and the body stops short, or the connection ended first.
    let (status, got, announced) = raw_get(a, &path);
    assert!(
        status == 0 || (status, announced) == (200, Some(size)),
        "{status} {announced:?}"
    );
    assert!(
        got < size,
        "a changed object must not be served whole ({got} of {size} bytes)"
    );

    // A different size: 409, named.
    bytes.push(0);
    std::fs::write(victim, &bytes).unwrap();
    let r = get(a, &path);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (409, "checkpoint_changed"),
        "{}",
        r.text()
    );
}

#[test]
fn registration_outside_the_roots_is_forbidden_without_saying_what_is_there() {
    let dir = TempDir::new("hard-roots");
    let inside = dir.0.join("runs/ckpt");
    save_steps(&inside, &[10]);
    let outside = dir.0.join("elsewhere/ckpt");
    save_steps(&outside, &[10]);
    let root = CheckpointRoot::parse(dir.0.join("runs").to_str().unwrap()).unwrap();
    let srv = Server::serve_with(dir, inside.display().to_string(), |c| c.checkpoint_roots = vec![root]);
    let existing = register(&srv, "gpt", &outside.display().to_string(), 10);
    let missing = register(&srv, "gpt", "/nonexistent/ckpt", 10);
    let traversal = register(&srv, "gpt", &format!("{}/../../elsewhere/ckpt", inside.display()), 10);
    for r in [&existing, &missing, &traversal] {
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (403, "outside_checkpoint_roots"),
            "{}",
            r.text()
        );
    }
    let said =
        |r: &common::http_client::Reply, url: &str| r.json()["error"]["message"].as_str().unwrap().replace(url, "URL");
    assert_eq!(
        said(&existing, &outside.display().to_string()),
        said(&missing, "/nonexistent/ckpt")
    );
    // A symlink inside the root that leads out of it.
    std::os::unix::fs::symlink(&outside, inside.parent().unwrap().join("link")).unwrap();
    let via_link = register(
        &srv,
        "gpt",
        &inside.parent().unwrap().join("link").display().to_string(),
        10,
    );
    assert_eq!(via_link.status, 403, "{}", via_link.text());
    assert_eq!(register(&srv, "gpt", &srv.ckpt, 10).status, 201);
    // s3:// outside the roots (none configured for S3): refused before any request.
    assert_eq!(register(&srv, "gpt", "s3://bucket/ckpt", 10).status, 403);
}

#[test]
fn without_roots_missing_and_non_checkpoint_paths_answer_alike() {
    let srv = Server::start("hard-probe", true);
    let empty = srv.dir.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let file = srv.dir.0.join("plain.txt");
    std::fs::write(&file, "x").unwrap();
    let answers: Vec<(u16, String)> = [
        empty.display().to_string(),
        file.display().to_string(),
        srv.dir.0.join("missing").display().to_string(),
    ]
    .iter()
    .map(|p| {
        let r = send_json(
            srv.addr,
            "POST",
            "/v1/models/gpt/versions",
            Some(WRITE),
            &json!({ "checkpoint": p }),
        );
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .replace(p.as_str(), "URL");
        (r.status, msg)
    })
    .collect();
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[0].0, 422);
}

#[test]
fn s3_registration_without_configured_credentials_is_refused_at_once() {
    // No endpoint or keys configured: the server must not fall back to the AWS environment or
    // probe instance metadata; it answers at once.
    let srv = Server::start("hard-s3", true);
    let started = std::time::Instant::now();
    let r = register(&srv, "gpt", "s3://some-bucket/ckpt", 10);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("no S3 endpoint and credentials configured"),
        "{}",
        r.text()
    );
    // Not a timing assertion on the answer itself: a metadata probe would take seconds of
    // retries; this only guards against that order of magnitude.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn metrics_need_the_read_token_when_reads_are_closed() {
    let closed = Server::start("hard-metrics", false);
    assert_eq!(get(closed.addr, "/metrics").status, 401);
    let ok = http(
        closed.addr,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {READ}"))],
        None,
    );
    assert_eq!(ok.status, 200);
    let open = Server::start("hard-metrics-open", true);
    assert_eq!(get(open.addr, "/metrics").status, 200);
}

/// Wait until the server closes `s` (a read returns 0 or an error), up to `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A server over a one-step checkpoint with these connection limits.
fn limited_server(tag: &str, header_read_timeout: Duration, idle_timeout: Duration, max_connections: usize) -> Server {
    let dir = TempDir::new(tag);
    let ckpt = dir.0.join("ckpt");
    save_steps(&ckpt, &[10]);
    Server::serve_with(dir, ckpt.display().to_string(), |c| {
        c.connections = ConnectionLimits {
            header_read_timeout,
            idle_timeout,
            max_connections,
            ..ConnectionLimits::default()
        }
    })
}

#[test]
fn slow_headers_and_idle_connections_are_closed_and_the_cap_keeps_serving() {
    let srv = limited_server("hard-conn", Duration::from_millis(400), Duration::from_millis(800), 4);
    let a = srv.addr;
    // A client that sends half a request head and stops.
    let mut slow = TcpStream::connect(a).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(20)),
        "slow headers not closed"
    );
    // A kept-alive connection that stays idle after its request.
    let mut idle = TcpStream::connect(a).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(20)),
        "idle connection not closed"
    );

    drop(srv);

    // The cap, with timeouts too long to help: 4 connections that send nothing hold every
    // slot; ordinary clients are still served (the idlest hog is closed to make room).
    let srv = limited_server("hard-cap", Duration::from_secs(120), Duration::from_secs(120), 4);
    let mut hogs: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(srv.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..6 {
        assert_eq!(get(srv.addr, "/healthz").status, 200);
    }
    let mut evicted = 0;
    for h in hogs.iter_mut() {
        evicted += usize::from(closed_within(h, Duration::from_millis(200)));
    }
    assert!(evicted >= 1, "room was made by closing idle connections");
}

#[test]
fn a_checkpoint_deleted_after_registration_is_not_recreated_by_a_read() {
    let srv = Server::start("hard-gone", true);
    srv.register("gpt", 10);
    std::fs::remove_dir_all(&srv.ckpt).unwrap();
    let r = get(srv.addr, "/v1/models/gpt/versions/1/files/manifest.json");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (422, "checkpoint_unavailable"),
        "{}",
        r.text()
    );
    assert!(
        !Path::new(&srv.ckpt).exists(),
        "a read must not create the checkpoint directory"
    );
}
