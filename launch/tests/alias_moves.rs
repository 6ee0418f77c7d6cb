//! Aliases under traffic, end to end with the `gantry` binary and a real (tiny) model trained
//! here: an alias moved 90/10 → 50/50 → 0/100 → a version not yet loaded while six clients
//! send generate, streamed generate, completion and streamed chat requests without pause
//! (every one must succeed, from a version the alias named around the time it started; after
//! the last move only the new version answers); a move to a version that cannot be loaded
//! fails and leaves the alias alone; sticky splits (`user`, `X-Gantry-Route-Key`) follow the
//! documented hash; shadow traffic is compared (a shadow with the primary's weights always
//! agrees), counted per version on `/metrics`, and dropped rather than waited for.

mod common;

use common::registry::{RegistryProcess, serve_registry, shakespeare_dataset};
use common::{GANTRY, Reply, http, post_json, text};
use gantry_registry::split::{mirrors, pick, sticky_draw};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WRITE: &str = "writer-token-0123456789";

/// One rank, 20 steps, a checkpoint every 10: two versions.
const SPEC: &str = r#"
name = "alias-moves"
[model]
arch = "llama"
d_model = 64
n_layers = 2
n_heads = 4
seq_len = 64
[parallel]
dp = 1
tp = 1
[optim]
lr = 3e-3
warmup_steps = 5
[train]
steps = 20
global_batch = 8
micro_batch = 8
threads = 1
[checkpoint]
every = 10
"#;

fn serve(dir: &Path, extra: &[&str]) -> RegistryProcess {
    let mut flags = vec!["--batch-slots", "4"];
    flags.extend_from_slice(extra);
    serve_registry(dir, "registry", &format!("write {WRITE}\n"), &flags)
}

/// Train the tiny model on tinyshakespeare (byte-level BPE of 512) and return its checkpoint
/// root (steps 10 and 20).
fn train(dir: &Path) -> PathBuf {
    let data = shakespeare_dataset(dir);
    let spec = dir.join("job.toml");
    std::fs::write(&spec, format!("{SPEC}[data]\npath = \"{}\"\n", data.display())).unwrap();
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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn register(addr: &str, ckpt: &Path, step: u64) -> u64 {
    let body = json!({ "checkpoint": ckpt.display().to_string(), "step": step });
    let r = common::send_json(addr, "POST", "/v1/models/gpt/versions", Some(WRITE), &body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["version"].as_u64().unwrap()
}

fn put_alias(addr: &str, alias: &str, body: Value) -> Reply {
    common::send_json(
        addr,
        "PUT",
        &format!("/v1/models/gpt/aliases/{alias}"),
        Some(WRITE),
        &body,
    )
}

fn weights(targets: &[(u32, u32)]) -> Value {
    json!({ "targets": targets.iter().map(|&(v, w)| json!({ "version": v, "weight": w })).collect::<Vec<_>>() })
}

/// The value of the `/metrics` line that starts with `prefix` (0 when absent).
fn metric(addr: &str, prefix: &str) -> f64 {
    let m = http(addr, "GET", "/metrics", &[], None).text();
    m.lines()
        .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().parse::<f64>().unwrap()))
        .unwrap_or(0.0)
}

/// Wait (without asserting how long it takes) until `done()`; a generous deadline only turns
/// a hang into a failure that says what was awaited.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "still waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The version that answered, once the answer is checked complete for its kind.
fn checked_version(kind: usize, r: &Reply) -> Result<u64, String> {
    let fail = |why: &str| Err(format!("kind {kind}: {why}: status {} {}", r.status, r.text()));
    if r.status != 200 {
        return fail("not 200");
    }
    let Some(header) = r.header("x-gantry-version").and_then(|v| v.parse::<u64>().ok()) else {
        return fail("no X-Gantry-Version");
    };
    let body = r.text();
    let complete = match kind {
        0 => {
            let j = r.json();
            j["version"].as_u64() == Some(header)
                && j["finish_reason"].is_string()
                && j["tokens"].as_array().is_some_and(|t| !t.is_empty())
        }
        1 => body.contains("event: done") && !body.contains("event: error"),
        2 => {
            let j = r.json();
            j["system_fingerprint"] == format!("gantry:gpt@{header}") && j["choices"][0]["finish_reason"].is_string()
        }
        _ => {
            body.trim_end().ends_with("data: [DONE]")
                && body.contains("\"finish_reason\":\"")
                && !body.contains("\"error\":{")
        }
    };
    if complete {
        Ok(header)
    } else {
        fail("incomplete answer")
    }
}

/// One request of `kind` (generate, streamed generate, completion, streamed chat) to `alias`.
fn request(addr: &str, alias: &str, kind: usize, seed: u64) -> Reply {
    let model = format!("gpt@{alias}");
    match kind {
        0 | 1 => post_json(
            addr,
            &format!("/v1/models/{model}/generate"),
            None,
            &json!({ "prompt": "ROMEO:", "max_tokens": 6, "temperature": 0.8, "seed": seed, "stop_at_eod": false, "stream": kind == 1 }),
        ),
        2 => post_json(
            addr,
            "/v1/completions",
            None,
            &json!({ "model": model, "prompt": "JULIET:", "max_tokens": 6, "seed": seed }),
        ),
        _ => post_json(
            addr,
            "/v1/chat/completions",
            None,
            &json!({ "model": model, "messages": [{ "role": "user", "content": "Speak." }], "max_tokens": 6, "seed": seed, "stream": true }),
        ),
    }
}

/// What a client thread saw: the move epoch when each request started, and its outcome.
type Seen = Vec<(usize, Result<u64, String>)>;

#[test]
fn aliases_move_under_load_split_sticky_and_shadow() {
    let dir = common::tempdir("alias-moves", "flow");
    let ckpt = train(&dir);
    // Version 3 is version 2's checkpoint again (a copy: the same weights), version 4 one
    // whose files go missing after registration, so it cannot be loaded.
    let (copy, broken) = (dir.join("ckpt-copy"), dir.join("ckpt-broken"));
    copy_dir(&ckpt, &copy);
    copy_dir(&ckpt, &broken);
    let srv = serve(&dir, &[]);
    let a = srv.addr.as_str();
    let versions: Vec<u64> = [(&ckpt, 10), (&ckpt, 20), (&copy, 20), (&broken, 10)]
        .iter()
        .map(|(c, s)| register(a, c, *s))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    std::fs::remove_dir_all(broken.join("step-00000010")).unwrap();

    moves_under_load(a);
    sticky_splits(a);
    shadows(a);
    drop(srv);

    // A restarted server has nothing loaded: a mirror to a shadow that is not loaded yet is
    // dropped, never waited for, and with --max-pending 1 (half of it: no room) every later
    // one too; the primaries all answer.
    let srv = serve(&dir, &["--max-pending", "1"]);
    let a = srv.addr.as_str();
    for seed in 0..4 {
        assert!(checked_version(0, &request(a, "mirrored", 0, seed)).is_ok());
    }
    let dropped =
        "gantry_registry_shadow_requests_total{model=\"gpt\",version=\"2\",shadow_version=\"3\",outcome=\"dropped\"}";
    wait_until("four dropped mirrors", || metric(a, dropped) == 4.0);
    let m = http(a, "GET", "/metrics", &[], None).text();
    assert!(!m.contains("outcome=\"agree\""), "{m}");
}

/// Six clients without pause while `live` moves 1 → 90/10 → 50/50 → 0/100 → 3 (not loaded).
fn moves_under_load(a: &str) {
    let moves: [&[(u32, u32)]; 5] = [
        &[(1, 1)],
        &[(1, 90), (2, 10)],
        &[(1, 50), (2, 50)],
        &[(2, 1)],
        &[(3, 1)],
    ];
    assert_eq!(put_alias(a, "live", weights(moves[0])).status, 200);
    let epoch = Arc::new(AtomicUsize::new(0));
    let (done, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..6).map(|_| Arc::default()).collect();
    std::thread::scope(|s| {
        for (t, log) in seen.iter().enumerate() {
            let (epoch, done, stop) = (epoch.clone(), done.clone(), stop.clone());
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let kind = (t + i) % 4;
                    let started = epoch.load(Ordering::SeqCst);
                    let outcome = checked_version(kind, &request(a, "live", kind, (t * 1000 + i) as u64));
                    log.lock().unwrap().push((started, outcome));
                    done.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            });
        }
        for (e, targets) in moves.iter().enumerate().skip(1) {
            let before = done.load(Ordering::SeqCst);
            wait_until("traffic before the move", || done.load(Ordering::SeqCst) >= before + 24);
            let r = put_alias(a, "live", weights(targets));
            assert_eq!(r.status, 200, "move {e}: {}", r.text());
            if e == 4 {
                // Loaded before the alias moved to it: its engine is on /metrics already.
                let m = http(a, "GET", "/metrics", &[], None).text();
                assert!(
                    m.contains("gantry_registry_decode_steps_total{model=\"gpt\",version=\"3\"}"),
                    "{m}"
                );
            }
            epoch.store(e, Ordering::SeqCst);
        }
        let before = done.load(Ordering::SeqCst);
        wait_until("traffic after the last move", || {
            done.load(Ordering::SeqCst) >= before + 36
        });
        stop.store(true, Ordering::SeqCst);
    });
    // Every request succeeded, from a version the alias named when it started or right after
    // (a request that started during a move may resolve on either side of it); after the last
    // move, only the new version answers.
    let mut per_epoch = vec![BTreeSet::new(); moves.len()];
    for log in &seen {
        for (started, outcome) in log.lock().unwrap().iter() {
            let version = outcome
                .clone()
                .unwrap_or_else(|e| panic!("a request failed during the moves: {e}"));
            let allowed: BTreeSet<u64> = moves[*started..moves.len().min(started + 2)]
                .iter()
                .flat_map(|t| t.iter().map(|&(v, _)| u64::from(v)))
                .collect();
            assert!(
                allowed.contains(&version),
                "epoch {started}: version {version}, alias named {allowed:?}"
            );
            per_epoch[*started].insert(version);
        }
    }
    assert_eq!(
        per_epoch[4],
        BTreeSet::from([3]),
        "after the last move only version 3 answers"
    );
    assert!(
        per_epoch.iter().all(|v| !v.is_empty()),
        "traffic in every epoch: {per_epoch:?}"
    );

    // A version that cannot be loaded: the PUT fails and the alias stays where it was.
    let refused = put_alias(a, "live", json!({ "version": 4 }));
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (422, "model_unavailable"),
        "{}",
        refused.text()
    );
    assert!(refused.text().contains("not moved"), "{}", refused.text());
    let live = http(a, "GET", "/v1/models/gpt/aliases/live", &[], None).json();
    assert_eq!(live["targets"], json!([[3, 1]]));
    assert_eq!(checked_version(0, &request(a, "live", 0, 1)), Ok(3));
}

/// A route key always gets the version its hash draws; without one, requests interleave.
fn sticky_splits(a: &str) {
    let targets = [(1, 50), (2, 50)];
    assert_eq!(put_alias(a, "ab", weights(&targets)).status, 200);
    let expect = |key: &str| u64::from(pick(&targets, sticky_draw(key.as_bytes())).unwrap());
    let keys: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let drawn: BTreeSet<u64> = keys.iter().map(|k| expect(k)).collect();
    assert_eq!(drawn, BTreeSet::from([1, 2]), "these keys reach both versions");
    for key in &keys {
        for seed in 0..2 {
            let completion = post_json(
                a,
                "/v1/completions",
                None,
                &json!({ "model": "gpt@ab", "prompt": "ROMEO:", "max_tokens": 2, "seed": seed, "user": key }),
            );
            assert_eq!(checked_version(2, &completion), Ok(expect(key)), "user {key}");
            let generated = http(
                a,
                "POST",
                "/v1/models/gpt@ab/generate",
                &[("Content-Type", "application/json"), ("X-Gantry-Route-Key", key)],
                Some(
                    json!({ "prompt": "ROMEO:", "max_tokens": 2, "seed": seed })
                        .to_string()
                        .as_bytes(),
                ),
            );
            assert_eq!(checked_version(0, &generated), Ok(expect(key)), "header {key}");
        }
    }
    // The header wins over `user`.
    let (k1, k2) = (
        keys.iter().find(|k| expect(k) == 1).unwrap(),
        keys.iter().find(|k| expect(k) == 2).unwrap(),
    );
    let both = http(
        a,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json"), ("X-Gantry-Route-Key", k2)],
        Some(json!({ "model": "gpt@ab", "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 2, "user": k1 }).to_string().as_bytes()),
    );
    assert_eq!(both.status, 200, "{}", both.text());
    assert_eq!(both.header("x-gantry-version"), Some("2"));
    // Without a key: the counter's interleaving, both versions in four requests.
    let plain: BTreeSet<u64> = (0..4)
        .map(|s| checked_version(0, &request(a, "ab", 0, s)).unwrap())
        .collect();
    assert_eq!(plain, BTreeSet::from([1, 2]));
}

/// Shadows: one with the primary's own weights always agrees; one with other weights is
/// compared on exactly its share of the requests.
fn shadows(a: &str) {
    let line = |primary: u32, shadow: u32, outcome: &str| {
        format!(
            "gantry_registry_shadow_requests_total{{model=\"gpt\",version=\"{primary}\",shadow_version=\"{shadow}\",outcome=\"{outcome}\"}}"
        )
    };
    // Version 3 holds version 2's weights: every greedy answer is the same, whatever the route.
    let set = put_alias(
        a,
        "mirrored",
        json!({ "version": 2, "shadow": { "version": 3, "percent": 100 } }),
    );
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(set.json()["shadow"], json!({ "version": 3, "percent": 100 }));
    for i in 0..6u32 {
        let r = match i % 3 {
            0 => post_json(
                a,
                "/v1/models/gpt@mirrored/generate",
                None,
                &json!({ "tokens": [5 + i, 40, 7], "max_tokens": 8, "temperature": 0, "stop_at_eod": false }),
            ),
            1 => post_json(
                a,
                "/v1/completions",
                None,
                &json!({ "model": "gpt@mirrored", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0 }),
            ),
            _ => post_json(
                a,
                "/v1/chat/completions",
                None,
                &json!({ "model": "gpt@mirrored", "messages": [{ "role": "user", "content": "Speak." }], "max_tokens": 8, "temperature": 0, "stream": true }),
            ),
        };
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-gantry-version"),
            Some("2"),
            "the client gets the primary's answer"
        );
        // One at a time, so each side decodes alone and the two are computed alike.
        let want = f64::from(i + 1);
        wait_until("the mirror compared", || {
            metric(a, &line(2, 3, "agree")) + metric(a, &line(2, 3, "differ")) == want
        });
    }
    assert_eq!(
        metric(a, &line(2, 3, "agree")),
        6.0,
        "{}",
        http(a, "GET", "/metrics", &[], None).text()
    );
    let m = http(a, "GET", "/metrics", &[], None).text();
    for outcome in ["differ", "error", "dropped", "no_primary"] {
        assert!(!m.contains(&line(2, 3, outcome)), "{outcome}:\n{m}");
    }
    assert!(
        m.contains("gantry_registry_shadow_seconds_count{model=\"gpt\",version=\"2\",shadow_version=\"3\"} 6"),
        "{m}"
    );

    // Version 2 shadowing version 1 on half the requests: exactly the drawn ones are compared,
    // and every greedy difference has its position recorded.
    let set = put_alias(
        a,
        "half",
        json!({ "version": 1, "shadow": { "version": 2, "percent": 50 } }),
    );
    assert_eq!(set.status, 200, "{}", set.text());
    let n = 10u64;
    for i in 0..n {
        let r = post_json(
            a,
            "/v1/models/gpt@half/generate",
            None,
            &json!({ "tokens": [3 + i, 9, 27, 81], "max_tokens": 8, "temperature": 0, "stop_at_eod": false }),
        );
        assert_eq!(r.header("x-gantry-version"), Some("1"), "{}", r.text());
    }
    let mirrored = (0..n).filter(|&d| mirrors(50, d)).count() as f64;
    let compared = || metric(a, &line(1, 2, "agree")) + metric(a, &line(1, 2, "differ"));
    wait_until("the drawn mirrors compared", || compared() == mirrored);
    let differ = metric(a, &line(1, 2, "differ"));
    let positions = metric(
        a,
        "gantry_registry_shadow_first_difference_count{model=\"gpt\",version=\"1\",shadow_version=\"2\"}",
    );
    assert_eq!(positions, differ, "one first-difference position per greedy difference");
    let m = http(a, "GET", "/metrics", &[], None).text();
    assert!(
        !m.contains(&line(1, 2, "error")) && !m.contains(&line(1, 2, "dropped")),
        "{m}"
    );
}
