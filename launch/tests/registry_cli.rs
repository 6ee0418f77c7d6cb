//! `gantry registry serve` as a process: serves on the printed address, reads its token file,
//! refuses a bad token file naming the line, and stops on SIGTERM.

mod common;

use common::{GANTRY, text};
use std::io::{Read, Write};
use std::process::{Command, Stdio};

fn http(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
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
    let mut child = Command::new(GANTRY)
        .args(["registry", "serve", "--listen", "127.0.0.1:0", "--closed-reads", "--db"])
        .arg(dir.join("registry.redb"))
        .arg("--token-file")
        .arg(&tokens)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::listening_address(&mut child).expect("the registry announces its address");

    let health = http(
        &addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let closed = http(
        &addr,
        &format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    );
    assert!(
        closed.starts_with("HTTP/1.1 401") && closed.contains("\"error\""),
        "{closed}"
    );
    let open = http(
        &addr,
        &format!(
            "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer reader-token-0123456789\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(
        open.starts_with("HTTP/1.1 200") && open.contains("\"models\""),
        "{open}"
    );

    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "stops cleanly on SIGTERM: {status}");

    std::fs::write(&tokens, "read ok-token-0123456789\nadmin nope\n").unwrap();
    let out = Command::new(GANTRY)
        .args(["registry", "serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.join("registry.redb"))
        .arg("--token-file")
        .arg(&tokens)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("line 2"), "{}", text(&out));
}
