//! A real registry server on 127.0.0.1:0 over real committed checkpoints, and a minimal
//! HTTP/1.1 client over `std::net::TcpStream`, for the HTTP tests.

use super::{TempDir, save_steps};
use gantry_checkpoint::S3Options;
use gantry_registry::http::{Running, Scope, ServeConfig, TokenEntry, start};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

pub const READ: &str = "read-token-0123456789";
pub const WRITE: &str = "write-token-0123456789";

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .expect("an error code")
            .to_string()
    }
}

/// One request on a fresh connection (`Connection: close`); the body is read to EOF and
/// checked against `Content-Length`.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    if let Some(b) = body {
        s.write_all(b).expect("send body");
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read reply");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).expect("ascii head");
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let reply = Reply { status, headers, body };
    if let Some(len) = reply.header("content-length") {
        assert_eq!(
            len.parse::<usize>().unwrap(),
            reply.body.len(),
            "Content-Length of {method} {path}"
        );
    }
    reply
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, &[], None)
}

pub fn send_json(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &Value) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        h.push(("Authorization", a.as_str()));
    }
    http(addr, method, path, &h, Some(body.to_string().as_bytes()))
}

pub struct Server {
    pub rt: tokio::runtime::Runtime,
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub dir: TempDir,
    /// The checkpoint root the tests register from (a local path or `s3://…`).
    pub ckpt: String,
}

impl Server {
    /// A server over a local checkpoint with steps 10 and 20.
    pub fn start(tag: &str, open_reads: bool) -> Server {
        let dir = TempDir::new(tag);
        let ckpt = dir.0.join("ckpt");
        save_steps(&ckpt, &[10, 20]);
        let ckpt = ckpt.display().to_string();
        Server::serve(dir, ckpt, open_reads, S3Options::default())
    }

    /// A server over checkpoint root `ckpt` (already saved), reaching S3 with `s3`.
    pub fn serve(dir: TempDir, ckpt: String, open_reads: bool, s3: S3Options) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = ServeConfig {
            listen: "127.0.0.1:0".into(),
            db: dir.0.join("registry.redb"),
            tokens: vec![
                TokenEntry {
                    token: READ.into(),
                    scope: Scope::Read,
                },
                TokenEntry {
                    token: WRITE.into(),
                    scope: Scope::Write,
                },
            ],
            open_reads,
            s3,
            ..ServeConfig::default()
        };
        let running = rt.block_on(start(config)).expect("start");
        let addr = running.addr;
        Server {
            rt,
            running: Some(running),
            addr,
            dir,
            ckpt,
        }
    }

    pub fn register(&self, model: &str, step: u64) -> Value {
        let r = send_json(
            self.addr,
            "POST",
            &format!("/v1/models/{model}/versions"),
            Some(WRITE),
            &json!({ "checkpoint": self.ckpt, "step": step }),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            self.rt.block_on(r.stop()).expect("clean stop");
        }
    }
}
