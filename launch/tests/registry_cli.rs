//! `gantry registry serve` as a process: serves on the printed address, reads its token file,
//! refuses a bad token file naming the line, and stops on SIGTERM.

mod common;

use common::{GANTRY, text};
use std::path::Path;
use std::process::{Command, Stdio};

/// `gantry registry serve` on port 0 with this token file (and extra flags); stdout piped
/// (the address line), stderr discarded unless the caller sets it.
fn serve(dir: &Path, tokens: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(GANTRY);
    c.args(["registry", "serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.join("registry.redb"))
        .arg("--token-file")
        .arg(tokens)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

#[test]
fn serve_answers_checks_tokens_and_stops_on_sigterm() {
    let dir = common::tempdir("registry-cli", "serve");
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        "# registry tokens\nread  reader-token-0123456789\nwrite writer-token-0123456789\n",
    )
    .unwrap();
    let mut child = serve(&dir, &tokens, &["--closed-reads"]).spawn().unwrap();
    let addr = common::listening_address(&mut child).expect("the registry announces its address");

    let health = common::http_get(&addr, "/healthz", &[]);
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let closed = common::http_get(&addr, "/v1/models", &[]);
    assert!(
        closed.starts_with("HTTP/1.1 401") && closed.contains("\"error\""),
        "{closed}"
    );
    let reader = [("Authorization", "Bearer reader-token-0123456789")];
    let open = common::http_get(&addr, "/v1/models", &reader);
    assert!(
        open.starts_with("HTTP/1.1 200") && open.contains("\"object\":\"list\""),
        "the OpenAI list shape: {open}"
    );
    let own = common::http_get(&addr, "/v1/registry/models", &reader);
    assert!(
        own.starts_with("HTTP/1.1 200") && own.contains("\"models\""),
        "gantry's own listing: {own}"
    );

    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "stops cleanly on SIGTERM: {status}");

    std::fs::write(&tokens, "read ok-token-0123456789\nadmin nope\n").unwrap();
    let out = serve(&dir, &tokens, &[]).stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("line 2"), "{}", text(&out));
}

const SPEC: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 16
[train]
steps = 4
global_batch = 4
micro_batch = 2
threads = 1
[parallel]
dp = 2
"#;

#[test]
fn models_cli_registers_aliases_shows_and_downloads_a_verified_checkpoint() {
    let dir = common::tempdir("registry-cli", "models");
    let spec = common::synth_job(&dir, SPEC, 60_000, 3);
    let ckpt = dir.join("ckpt");
    let out = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "2", "--json", "--checkpoint-dir"])
        .arg(&ckpt)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "read reader-token-0123456789\nwrite writer-token-0123456789\n").unwrap();
    let mut server = serve(&dir, &tokens, &[]).spawn().unwrap();
    let addr = common::listening_address(&mut server).expect("the registry announces its address");
    let models = |args: &[&str], token: &str| {
        Command::new(GANTRY)
            .arg("models")
            .args(args)
            .env("GANTRY_REGISTRY", &addr)
            .env("GANTRY_REGISTRY_TOKEN", token)
            .output()
            .unwrap()
    };
    let ck = ckpt.to_str().unwrap();
    let refused = models(&["register", "gpt", "--checkpoint", ck], "reader-token-0123456789");
    assert!(
        !refused.status.success() && text(&refused).contains("403"),
        "{}",
        text(&refused)
    );
    let reg = models(
        &["register", "gpt", "--checkpoint", ck, "--json"],
        "writer-token-0123456789",
    );
    assert!(reg.status.success(), "{}", text(&reg));
    let v: serde_json::Value = serde_json::from_slice(&reg.stdout).unwrap();
    assert_eq!((v["version"].as_u64(), v["step"].as_u64()), (Some(1), Some(4)), "{v}");
    let alias = models(&["alias", "gpt", "prod", "1"], "writer-token-0123456789");
    assert!(alias.status.success(), "{}", text(&alias));
    let show = models(&["show", "gpt@prod", "--json"], "reader-token-0123456789");
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["version"], 1, "{shown}");
    let list = models(&["list", "--json"], "");
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("\"gpt\""),
        "{}",
        text(&list)
    );

    // The download is a checkpoint root: it verifies like the original.
    let copy = dir.join("download");
    let got = models(&["download", "gpt@prod", "--out", copy.to_str().unwrap(), "--json"], "");
    assert!(got.status.success(), "{}", text(&got));
    let verify = Command::new(GANTRY)
        .args(["checkpoint", "verify"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
    // A second download finds every object complete and fetches nothing.
    let again = models(&["download", "gpt@prod", "--out", copy.to_str().unwrap(), "--json"], "");
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["fetched_bytes"], 0, "{report}");
    let missing = models(&["show", "nosuch@prod"], "");
    assert!(
        !missing.status.success() && text(&missing).contains("404"),
        "{}",
        text(&missing)
    );

    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
}
