//! Helpers shared by the `gantry` end-to-end tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const GANTRY: &str = env!("CARGO_BIN_EXE_gantry");

pub mod netns;
pub mod registry;
pub mod s3;

/// A fresh, empty `gantry-<suite>-<tag>-<pid>` under the system temp dir.
pub fn tempdir(suite: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-{suite}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `gantry data synth` of `tokens` tokens with `seed` into `out`.
pub fn synth(out: &Path, tokens: u64, seed: u64) {
    let result = Command::new(GANTRY)
        .args([
            "data",
            "synth",
            "--tokens",
            &tokens.to_string(),
            "--seed",
            &seed.to_string(),
            "--output",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// A synthetic dataset in `dir/data` and `dir/job.toml`: `spec` plus its `[data]` path.
pub fn synth_job(dir: &Path, spec: &str, tokens: u64, seed: u64) -> PathBuf {
    synth(&dir.join("data"), tokens, seed);
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!("{spec}\n[data]\npath = \"{}\"\n", dir.join("data").display()),
    )
    .unwrap();
    path
}

/// A port that was free a moment ago (bound to port 0 and released), for MASTER_PORT.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The address a daemon started with piped stdout announces first (`listening on ADDR`);
/// `None` when it exited or printed something else.
pub fn listening_address(child: &mut std::process::Child) -> Option<String> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take()?)
        .read_line(&mut line)
        .ok()?;
    line.trim().strip_prefix("listening on ").map(str::to_string)
}

/// A plain HTTP/1.1 GET over a fresh connection with extra `headers`; the whole response
/// (status line, headers, body) as text.
pub fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[path = "../../../registry/tests/common/http_client.rs"]
mod http_client;
#[allow(unused_imports)] // each test binary uses its own subset
pub use http_client::{Reply, http, send_json};

/// POST a JSON body.
pub fn post_json(addr: &str, path: &str, token: Option<&str>, body: &serde_json::Value) -> Reply {
    send_json(addr, "POST", path, token, body)
}
