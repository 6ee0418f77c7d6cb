//! The worker's port end to end: `ReadLog` through a real tonic client (token, offsets,
//! latest attempt, running flag, errors) and `GET /metrics` over plain HTTP/1.1.

mod common;
#[path = "common/tls.rs"]
mod tls;

use common::*;
use gantry_coordinator::auth::{self, AddToken, TlsFiles};
use gantry_coordinator::proto::cluster_client::ClusterClient;
use gantry_coordinator::proto::worker_logs_client::WorkerLogsClient;
use gantry_coordinator::proto::{HeartbeatRequest, ReadLogRequest};
use gantry_coordinator::server::MetricsAccess;
use gantry_worker::launch::log_path;
use gantry_worker::server::{self, LogService, ServerConfig};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::ServerTlsConfig;

const TOKEN: &str = "s3cret-token";

/// The worker's port serving in the background until [`Served::stop`].
struct Served {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), gantry_worker::WorkerError>>>,
}

impl Served {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let served = tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stops")
                .expect("server task");
            served.expect("server ran cleanly");
        }
    }
}

async fn serve(h: &Harness) -> Served {
    serve_metrics(h, MetricsAccess::default()).await
}

async fn serve_metrics(h: &Harness, access: MetricsAccess) -> Served {
    serve_with(h, access, None).await
}

/// Serves on `127.0.0.1:0`, the address read back from the listener.
async fn serve_with(h: &Harness, access: MetricsAccess, tls: Option<ServerTlsConfig>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert_ne!(addr.port(), 0, "the real port is reported");
    let config = ServerConfig {
        token: TOKEN.into(),
        tls,
        logs: LogService::new(h.state_dir(), h.live.clone()),
        metrics: h.metrics.clone(),
        access,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, config, async move {
        let _ = stopped.await;
    }));
    Served {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

type Client = WorkerLogsClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddToken>>;

fn client(addr: SocketAddr, token: &str) -> Client {
    let channel = auth::channel(&format!("http://{addr}"), &TlsFiles::default()).unwrap();
    WorkerLogsClient::with_interceptor(channel, AddToken::new(token).unwrap())
}

fn req(job: u64, rank: u32, attempt: u32, offset: u64, max_bytes: u32) -> ReadLogRequest {
    ReadLogRequest {
        job,
        rank,
        attempt,
        offset,
        max_bytes,
    }
}

#[tokio::test]
async fn read_log_with_offsets_latest_attempt_and_running_flag() {
    let mut h = harness("server-logs", Duration::from_secs(10), false);
    // An older attempt's log on disk, and the current attempt running for real.
    let old = log_path(&h.state_dir(), key(7, 1, 0));
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, "attempt one\n").unwrap();
    let k = key(7, 2, 0);
    h.supervisor
        .start(&shell(k, "echo hello; echo world >&2; exec sleep 1000"))
        .await;
    let log = log_path(&h.state_dir(), k);
    eventually("the rank's output", || read(&log).len() == "hello\nworld\n".len()).await;

    let server = serve(&h).await;
    let mut c = client(server.addr, TOKEN);

    // attempt 0 = the latest attempt with a log for this rank.
    let r = c.read_log(req(7, 0, 0, 0, 0)).await.unwrap().into_inner();
    assert_eq!(r.attempt, 2);
    assert_eq!(r.data, b"hello\nworld\n");
    assert_eq!(r.next_offset, 12);
    assert!(r.running);

    // A window in the middle, then the end (nothing new yet, still running).
    let r = c.read_log(req(7, 0, 2, 6, 3)).await.unwrap().into_inner();
    assert_eq!((r.data.as_slice(), r.next_offset), (&b"wor"[..], 9));
    let r = c.read_log(req(7, 0, 2, 12, 0)).await.unwrap().into_inner();
    assert_eq!((r.data.len(), r.next_offset, r.running), (0, 12, true));

    // An explicit older attempt.
    let r = c.read_log(req(7, 0, 1, 0, 0)).await.unwrap().into_inner();
    assert_eq!(
        (r.data.as_slice(), r.attempt, r.running),
        (&b"attempt one\n"[..], 1, false)
    );

    // Once stopped, `running` turns false.
    h.supervisor.stop(k);
    wait_exit(&mut h.supervisor, k).await;
    let r = c.read_log(req(7, 0, 0, 0, 0)).await.unwrap().into_inner();
    assert!(!r.running);
    assert_eq!(r.data, b"hello\nworld\n");

    // Past the end.
    let e = c.read_log(req(7, 0, 2, 1000, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    server.stop().await;
}

#[tokio::test]
async fn read_log_caps_the_reply_size() {
    let h = harness("server-cap", Duration::from_secs(10), false);
    let path = log_path(&h.state_dir(), key(3, 1, 4));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![b'x'; 3 << 20]).unwrap();
    let server = serve(&h).await;
    let mut c = client(server.addr, TOKEN);
    let r = c.read_log(req(3, 4, 1, 0, 0)).await.unwrap().into_inner();
    assert_eq!(r.data.len(), server::DEFAULT_READ_BYTES as usize);
    let r = c.read_log(req(3, 4, 1, 0, u32::MAX)).await.unwrap().into_inner();
    assert_eq!(r.data.len(), server::MAX_READ_BYTES as usize);
    assert_eq!(r.next_offset, u64::from(server::MAX_READ_BYTES));
    server.stop().await;
}

#[tokio::test]
async fn wrong_token_and_unknown_logs_are_refused() {
    let h = harness("server-refuse", Duration::from_secs(10), false);
    let path = log_path(&h.state_dir(), key(1, 1, 0));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "secret output\n").unwrap();
    let server = serve(&h).await;

    let e = client(server.addr, "wrong-token")
        .read_log(req(1, 0, 0, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    let mut c = client(server.addr, TOKEN);
    let e = c.read_log(req(99, 0, 0, 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(
        e.message().contains("job 99") && e.message().contains("rank 0"),
        "{}",
        e.message()
    );
    let e = c.read_log(req(1, 5, 0, 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("rank 5"), "{}", e.message());
    let e = c.read_log(req(1, 0, 9, 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("attempt 9"), "{}", e.message());

    // Other gRPC services are not here: a clean error, not a hang or a crash.
    let channel = auth::channel(&format!("http://{}", server.addr), &TlsFiles::default()).unwrap();
    let mut cluster = ClusterClient::with_interceptor(channel, AddToken::new(TOKEN).unwrap());
    let e = cluster.heartbeat(HeartbeatRequest::default()).await.unwrap_err();
    assert!(e.message().contains("404"), "{e}");
    server.stop().await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_get_with(addr, path, "").await
}

/// A GET with `extra` header lines (each ending in CRLF).
async fn http_get_with(addr: SocketAddr, path: &str, extra: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("response")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn metrics_over_plain_http() {
    let mut h = harness("server-metrics", Duration::from_secs(10), false);
    let k = key(1, 1, 0);
    h.supervisor.start(&shell(k, "exit 0")).await;
    wait_exit(&mut h.supervisor, k).await;
    let server = serve(&h).await;

    let response = http_get(server.addr, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("content-type: text/plain"),
        "{response}"
    );
    for line in [
        "gantry_worker_ranks_running 0",
        "gantry_worker_rank_starts_total 1",
        "gantry_worker_rank_exits_total{outcome=\"success\"} 1",
        "gantry_worker_heartbeats_total 0",
        "gantry_worker_heartbeat_failures_total 0",
        "gantry_worker_connected 0",
        "gantry_worker_heartbeat_latency_seconds_count 0",
    ] {
        assert!(response.lines().any(|l| l == line), "missing `{line}` in\n{response}");
    }
    // Metrics need no token; the log service's paths do.
    let response = http_get(server.addr, "/nothing-here").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn metrics_behind_a_metrics_token() {
    let h = harness("server-metrics-token", Duration::from_secs(10), false);
    let server = serve_metrics(&h, MetricsAccess::new(Some("scrape-token")).unwrap()).await;
    for (extra, status) in [
        ("", "401"),
        ("Authorization: Bearer wrong\r\n", "401"),
        // The cluster token is not the metrics token.
        (&format!("Authorization: Bearer {TOKEN}\r\n") as &str, "401"),
        ("Authorization: Bearer scrape-token\r\n", "200"),
    ] {
        let response = http_get_with(server.addr, "/metrics", extra).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{extra:?}: {response}"
        );
        assert_eq!(
            response.contains("gantry_worker_ranks_running"),
            status == "200",
            "{extra:?}: {response}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn read_log_over_tls() {
    let h = harness("server-tls", Duration::from_secs(10), false);
    if tls::make_certs(h.dir.path()).is_none() {
        eprintln!("skipped: the openssl command is not available to make test certificates");
        return;
    }
    let path = log_path(&h.state_dir(), key(2, 1, 0));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "over tls\n").unwrap();
    let server_tls = TlsFiles {
        cert: Some(h.dir.path().join("cert.pem")),
        key: Some(h.dir.path().join("key.pem")),
        ..TlsFiles::default()
    };
    let server = serve_with(&h, MetricsAccess::default(), server_tls.server_config().unwrap()).await;
    let addr = server.addr;

    let client_tls = TlsFiles {
        ca: Some(h.dir.path().join("ca.pem")),
        domain: Some("localhost".into()),
        ..TlsFiles::default()
    };
    let channel = auth::channel(&format!("https://{addr}"), &client_tls).unwrap();
    let mut c = WorkerLogsClient::with_interceptor(channel, AddToken::new(TOKEN).unwrap());
    let r = c.read_log(req(2, 0, 0, 0, 0)).await.unwrap().into_inner();
    assert_eq!(r.data, b"over tls\n");

    // A plaintext client gets no answer from a TLS port.
    let e = client(addr, TOKEN).read_log(req(2, 0, 0, 0, 0)).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    server.stop().await;
}
