//! The daemon shape end to end: [`serve`] on a listener bound to `127.0.0.1:0` answers gRPC
//! (behind the cluster token) and `/metrics` on that one port, returns once its shutdown
//! future completes, and leaves the state closed so the next start opens it.

use gantry_coordinator::auth::{self, AddToken, TlsFiles};
use gantry_coordinator::proto::ListWorkersRequest;
use gantry_coordinator::proto::admin_client::AdminClient;
use gantry_coordinator::server::{CoordinatorConfig, serve};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Liveness bound for anything the test waits for; never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(20);
const TOKEN: &str = "serve-test-token";

fn config(state_dir: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        state_dir,
        token: TOKEN.into(),
        ..CoordinatorConfig::default()
    }
}

async fn list_workers(addr: SocketAddr, token: &str) -> Result<usize, tonic::Status> {
    let channel = auth::channel(&format!("http://{addr}"), &TlsFiles::default()).unwrap();
    let mut admin = AdminClient::with_interceptor(channel, AddToken::new(token).unwrap());
    let reply = admin.list_workers(ListWorkersRequest {}).await?;
    Ok(reply.into_inner().workers.len())
}

async fn metrics(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("a complete /metrics response")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn serves_on_a_bound_listener_until_shutdown_then_releases_the_state() {
    let dir = std::env::temp_dir().join(format!("gantry-coordinator-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for round in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, config(dir.clone()), async move {
            let _ = stopped.await;
        }));

        assert_eq!(list_workers(addr, TOKEN).await.unwrap(), 0, "round {round}");
        let refused = list_workers(addr, "wrong-token").await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
        let text = metrics(addr).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("gantry_coordinator_"),
            "{text}"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(PATIENCE, served)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
            .expect("served cleanly");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_bad_configuration_is_refused_before_serving() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = std::env::temp_dir().join(format!("gantry-coordinator-serve-bad-{}", std::process::id()));
    let bad = CoordinatorConfig {
        token: String::new(),
        ..config(dir.clone())
    };
    let e = serve(listener, bad, std::future::pending()).await.unwrap_err();
    assert!(e.to_string().contains("cluster token is required"), "{e}");
    assert!(!dir.exists(), "no state created for a refused configuration");
}
