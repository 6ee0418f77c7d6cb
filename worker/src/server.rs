//! The worker's own port: the `WorkerLogs` gRPC service (behind the cluster token) and
//! `GET /metrics` (behind the metrics token when one is set), one listener, TLS when the
//! worker has a certificate and key.
//!
//! The CLI reads rank logs from here directly, so log bytes never pass through the
//! coordinator. gRPC and the plain HTTP metrics endpoint share one tonic server with
//! HTTP/1 enabled (tonic's routes are an axum router, so `/metrics` is one more route).

use crate::error::WorkerError;
use crate::launch;
use crate::metrics::Metrics;
use crate::reconcile::RankKey;
use crate::supervisor::LiveRanks;
use axum::http::{HeaderMap, StatusCode};
use gantry_coordinator::auth::RequireToken;
use gantry_coordinator::proto::worker_logs_server::{WorkerLogs, WorkerLogsServer};
use gantry_coordinator::proto::{ReadLogReply, ReadLogRequest};
use gantry_coordinator::server::MetricsAccess;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// Bytes returned when the request asks for 0.
pub const DEFAULT_READ_BYTES: u32 = 64 * 1024;
/// The most bytes one `ReadLog` returns.
pub const MAX_READ_BYTES: u32 = 1024 * 1024;

/// Serves `ReadLog` from the rank log files under the state directory.
#[derive(Clone, Debug)]
pub struct LogService {
    state_dir: PathBuf,
    live: Arc<LiveRanks>,
}

impl LogService {
    pub fn new(state_dir: PathBuf, live: Arc<LiveRanks>) -> LogService {
        LogService { state_dir, live }
    }
}

/// The highest attempt of `job` with a log for `rank` on this worker.
async fn latest_attempt(state_dir: &Path, job: u64, rank: u32) -> Option<u32> {
    let dir = state_dir.join("jobs").join(job.to_string());
    let mut entries = tokio::fs::read_dir(&dir).await.ok()?;
    let mut best = None;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        let Some(attempt) = name
            .to_str()
            .and_then(|n| n.strip_prefix("attempt-"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if best.is_some_and(|b| b >= attempt) {
            continue;
        }
        let key = RankKey { job, attempt, rank };
        if tokio::fs::metadata(launch::log_path(state_dir, key)).await.is_ok() {
            best = Some(attempt);
        }
    }
    best
}

#[tonic::async_trait]
impl WorkerLogs for LogService {
    async fn read_log(&self, request: Request<ReadLogRequest>) -> Result<Response<ReadLogReply>, Status> {
        let r = request.into_inner();
        let not_found = |attempt: Option<u32>| {
            let which = attempt.map_or(String::new(), |a| format!(" attempt {a}"));
            Status::not_found(format!(
                "no log for job {} rank {}{which} on this worker",
                r.job, r.rank
            ))
        };
        let attempt = match r.attempt {
            0 => latest_attempt(&self.state_dir, r.job, r.rank)
                .await
                .ok_or_else(|| not_found(None))?,
            a => a,
        };
        let key = RankKey {
            job: r.job,
            attempt,
            rank: r.rank,
        };
        let path = launch::log_path(&self.state_dir, key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found(Some(attempt))),
            Err(e) => return Err(Status::internal(format!("cannot open {}: {e}", path.display()))),
        };
        let io = |e: std::io::Error| Status::internal(format!("cannot read {}: {e}", path.display()));
        let len = file.metadata().await.map_err(io)?.len();
        if r.offset > len {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of the log of {key} ({len} bytes)",
                r.offset
            )));
        }
        let want = match r.max_bytes {
            0 => DEFAULT_READ_BYTES,
            n => n.min(MAX_READ_BYTES),
        };
        // Read what is there now; a rank still writing just makes the next call return more.
        let n = (len - r.offset).min(u64::from(want));
        file.seek(std::io::SeekFrom::Start(r.offset)).await.map_err(io)?;
        let mut data = Vec::with_capacity(n as usize);
        (&mut file).take(n).read_to_end(&mut data).await.map_err(io)?;
        Ok(Response::new(ReadLogReply {
            next_offset: r.offset + data.len() as u64,
            data,
            attempt,
            running: self.live.contains(key),
        }))
    }
}

/// Unknown paths get a plain 404, which gRPC clients read as a missing method (gRPC maps
/// HTTP 404 that way), and a person or scraper with a wrong path can read as text.
async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found (this gantry worker serves /metrics and the WorkerLogs gRPC service)\n",
    )
}

/// What the worker's port serves, and how.
pub struct ServerConfig {
    /// Callers of the log service must present this cluster token.
    pub token: String,
    /// Serve TLS with this (loaded by the caller with
    /// [`gantry_coordinator::auth::TlsFiles::server_config`], so unreadable files are refused
    /// before anything starts); `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
    pub logs: LogService,
    pub metrics: Arc<Metrics>,
    /// Who may read `/metrics`.
    pub access: MetricsAccess,
}

/// Serves the log service and `/metrics` on `listener` (bound by the caller, e.g. on
/// `127.0.0.1:0`) until `shutdown` completes, then lets open calls finish.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("(no local address: {e})"), |a| a.to_string());
    let serve_err = |reason: String| WorkerError::Serve {
        addr: addr.clone(),
        reason,
    };
    let ServerConfig {
        token,
        tls,
        logs,
        metrics,
        access,
    } = config;
    let logs = WorkerLogsServer::with_interceptor(logs, RequireToken::new(&token));
    let router = Routes::new(logs)
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move |headers: HeaderMap| {
                let reply = access.respond(&headers, || metrics.render());
                async move { reply }
            }),
        )
        .fallback(not_found);
    // HTTP/1 for plain `GET /metrics` (scrapers, curl); gRPC clients speak HTTP/2.
    let mut server = Server::builder().accept_http1(true);
    if let Some(tls) = tls {
        server = server.tls_config(tls).map_err(|e| serve_err(e.to_string()))?;
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    server
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| serve_err(e.to_string()))
}
