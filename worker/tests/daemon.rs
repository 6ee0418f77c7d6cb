//! The daemon without a coordinator: configuration errors come back at once; an unreachable
//! coordinator is retried while the worker keeps serving, and shutdown still returns.

mod common;

use common::*;
use gantry_worker::{WorkerConfig, WorkerError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(dir: &TempDir, coordinator: String) -> WorkerConfig {
    WorkerConfig {
        coordinator,
        token: "tok".into(),
        state_dir: dir.path().join("state"),
        grace: Duration::from_secs(2),
        ..WorkerConfig::default()
    }
}

/// A listener on a free loopback port, as the binary binds `--listen`.
async fn any_port() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn a_bad_configuration_is_refused_before_anything_starts() {
    let dir = TempDir::new("daemon-config");
    let mut c = config(&dir, "http://127.0.0.1:1".into());
    c.token = String::new();
    let e = gantry_worker::serve(any_port().await, c, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, WorkerError::Auth(_)), "{e}");
    let mut c = config(&dir, "http://127.0.0.1:1".into());
    c.port_range = (2000, 1000);
    let e = gantry_worker::serve(any_port().await, c, std::future::pending())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("port_range"), "{e}");
    assert!(
        !dir.path().join("state").exists(),
        "nothing created for a refused configuration"
    );
}

#[tokio::test]
async fn without_a_coordinator_the_worker_retries_serves_and_stops() {
    let dir = TempDir::new("daemon-alone");
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listener = any_port().await;
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(gantry_worker::serve(
        listener,
        config(&dir, format!("http://{closed}")),
        async move {
            let _ = stopped.await;
        },
    ));

    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = metrics(addr).await;
        if metric(&text, "gantry_worker_heartbeat_failures_total").is_some_and(|n| n >= 2) {
            assert_eq!(metric(&text, "gantry_worker_connected"), Some(0), "{text}");
            assert_eq!(metric(&text, "gantry_worker_heartbeats_total"), Some(0), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no retries seen within {PATIENCE:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.send(()).unwrap();
    let result = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("run returns after shutdown")
        .unwrap();
    result.unwrap();
    assert!(dir.path().join("state").is_dir());
}
