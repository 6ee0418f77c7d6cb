//! A real registry server on 127.0.0.1:0 over real committed checkpoints, for the HTTP tests
//! (with the client of `http_client.rs`).

use super::{TempDir, save_steps};
use gantry_checkpoint::S3Options;
use gantry_registry::http::{Scope, ServeConfig, ServeError, TokenEntry, serve};
use serde_json::{Value, json};
use std::net::SocketAddr;

use super::http_client::send_json;

pub const READ: &str = "read-token-0123456789";
pub const WRITE: &str = "write-token-0123456789";

pub struct Server {
    pub rt: tokio::runtime::Runtime,
    /// Ends the server (dropped or sent: the shutdown future completes).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
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
        Server::serve_with(dir, ckpt, |c| {
            c.open_reads = open_reads;
            c.s3 = s3;
        })
    }

    /// A server over checkpoint root `ckpt` with the test tokens and `edit`'s changes to the
    /// configuration.
    pub fn serve_with(dir: TempDir, ckpt: String, edit: impl FnOnce(&mut ServeConfig)) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = ServeConfig {
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
            ..ServeConfig::default()
        };
        let mut config = config;
        edit(&mut config);
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Server {
            rt,
            stop: Some(stop),
            task: Some(task),
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
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            self.rt.block_on(task).expect("server task").expect("clean stop");
        }
    }
}
