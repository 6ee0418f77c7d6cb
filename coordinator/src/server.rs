//! Wiring: [`serve`] opens the state, restores the scheduler, serves `Cluster` + `Admin`
//! (behind the cluster token) and `/metrics` on one bound listener (HTTP/2 for gRPC, HTTP/1.1
//! for scrapers) and runs the timer that declares silent workers lost, until its shutdown
//! future completes. The same shape as the worker's and the registry's `serve`.

use crate::auth::{RequireToken, TlsFiles};
use crate::core::{Scheduler, SchedulerConfig};
use crate::metrics::{Counters, render};
use crate::proto::admin_server::AdminServer;
use crate::proto::cluster_server::ClusterServer;
use crate::service::{Coordinator, Inner, now_ms};
use crate::state::{StateError, StateStore};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::Routes;

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    pub token: String,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <this>`.
    pub metrics_token: Option<String>,
    pub tls: TlsFiles,
    /// How often workers heartbeat.
    pub heartbeat_ms: u32,
    pub scheduler: SchedulerConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            state_dir: PathBuf::from("gantry-coordinator"),
            token: String::new(),
            metrics_token: None,
            tls: TlsFiles::default(),
            heartbeat_ms: 1000,
            scheduler: SchedulerConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid coordinator config: {0}")]
    Config(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    MetricsToken(#[from] BadMetricsToken),
    #[error("gRPC server: {0}")]
    Serve(String),
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |m: &str| Err(CoordinatorError::Config(m.to_string()));
        if self.token.is_empty() {
            return bad("a cluster token is required (--token or GANTRY_TOKEN); workers and clients must present it");
        }
        MetricsAccess::new(self.metrics_token.as_deref())?;
        if self.heartbeat_ms == 0 {
            return bad("heartbeat interval must be positive");
        }
        if self.scheduler.heartbeat_deadline_ms <= self.heartbeat_ms as u64 {
            return bad("the heartbeat deadline must be longer than the heartbeat interval");
        }
        if self.scheduler.straggler_factor.is_nan() || self.scheduler.straggler_factor <= 1.0 {
            return bad("straggler factor must be above 1");
        }
        Ok(())
    }
}

/// Serves the coordinator on `listener` until `shutdown` completes, then stops accepting,
/// lets calls in flight finish and returns. The caller binds (port 0, printing the address
/// are its business), so tests bind `127.0.0.1:0` and read `local_addr()`. Nothing is left
/// to flush at the end: every acknowledged change was committed before its reply. Returns
/// early only with an error (bad config, unreadable state or TLS files, the server failing).
pub async fn serve(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    let coordinator = open(&config)?;
    let tls = config.tls.server_config()?;
    let routes = routes(&coordinator, &config)?;
    let mut builder = tonic::transport::Server::builder().accept_http1(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Config(format!("TLS: {e}")))?;
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = builder
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown);
    // The timer lives exactly as long as the server: selecting (not spawning) means nothing
    // keeps ticking once `serve` returns or its caller drops it.
    let tick_every = Duration::from_millis((config.heartbeat_ms as u64 / 2).clamp(50, 1000));
    tokio::select! {
        served = server => served.map_err(|e| CoordinatorError::Serve(e.to_string())),
        never = tick_forever(coordinator, tick_every) => match never {},
    }
}

/// Opens the state and restores the scheduler from it.
fn open(config: &CoordinatorConfig) -> Result<Coordinator, CoordinatorError> {
    let (store, loaded) = StateStore::open(&config.state_dir)?;
    let (n_workers, n_jobs) = (loaded.workers.len(), loaded.jobs.len());
    let sched = Scheduler::restore(config.scheduler.clone(), loaded.workers, loaded.jobs, now_ms());
    if n_workers + n_jobs > 0 {
        tracing::info!(workers = n_workers, jobs = n_jobs, state = %store.path().display(), "restored state");
    }
    Ok(Coordinator::new(Inner {
        sched,
        store,
        counters: Counters::default(),
        heartbeat_ms: config.heartbeat_ms,
    }))
}

/// `Cluster` and `Admin` behind the cluster token, and `/metrics`, as one set of routes.
fn routes(coordinator: &Coordinator, config: &CoordinatorConfig) -> Result<Routes, CoordinatorError> {
    let token = RequireToken::new(&config.token);
    let mut routes = Routes::new(ClusterServer::with_interceptor(coordinator.clone(), token.clone()))
        .add_service(AdminServer::with_interceptor(coordinator.clone(), token));
    let scrape = coordinator.clone();
    let access = MetricsAccess::new(config.metrics_token.as_deref())?;
    let router = std::mem::take(routes.axum_router_mut()).route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let c = scrape.clone();
            let access = access.clone();
            async move {
                access.respond(&headers, || {
                    let g = c.lock();
                    render(&g.sched, &g.counters)
                })
            }
        }),
    );
    Ok(Routes::from(router))
}

/// Declares silent workers lost (the scheduler's `tick`), forever.
async fn tick_forever(coordinator: Coordinator, every: Duration) -> std::convert::Infallible {
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let _ = coordinator.tick();
    }
}

/// The metrics token is empty or cannot travel in a header.
#[derive(Debug, thiserror::Error)]
#[error("the metrics token is empty or not valid in a header (use printable ASCII without spaces)")]
pub struct BadMetricsToken;

/// Who may read `/metrics` on the coordinator and the workers: anyone when no metrics token
/// is set, else only requests with `Authorization: Bearer <metrics token>` (compared in
/// constant time). It is not the cluster token on purpose: a scraper holding that could
/// submit and cancel jobs.
#[derive(Clone, Debug, Default)]
pub struct MetricsAccess {
    token: Option<Arc<[u8]>>,
}

impl MetricsAccess {
    /// `None`: open to anyone. A token must be non-empty printable ASCII without spaces.
    pub fn new(token: Option<&str>) -> Result<MetricsAccess, BadMetricsToken> {
        let Some(token) = token else {
            return Ok(MetricsAccess::default());
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadMetricsToken);
        }
        Ok(MetricsAccess {
            token: Some(token.as_bytes().into()),
        })
    }

    /// Whether a request with these headers may read the metrics.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let Some((scheme, presented)) = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
        else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(presented.trim().as_bytes(), expected)
    }

    /// The reply to `GET /metrics`: `render()` in the Prometheus text format when allowed,
    /// else 401 with `WWW-Authenticate: Bearer` (nothing rendered).
    pub fn respond(&self, headers: &HeaderMap, render: impl FnOnce() -> String) -> Response {
        if !self.allows(headers) {
            return (
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Bearer")],
                "/metrics needs `Authorization: Bearer <metrics token>`\n",
            )
                .into_response();
        }
        ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render()).into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn metrics_access() {
        let open = MetricsAccess::new(None).unwrap();
        assert!(open.allows(&headers(None)));
        assert!(open.allows(&headers(Some("Bearer anything"))));

        let closed = MetricsAccess::new(Some("scrape-me")).unwrap();
        assert!(closed.allows(&headers(Some("Bearer scrape-me"))));
        assert!(closed.allows(&headers(Some("bearer scrape-me"))));
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("scrape-me"),
            Some("Basic scrape-me"),
            Some("Bearer scrape-me2"),
        ] {
            assert!(!closed.allows(&headers(bad)), "{bad:?}");
        }
        let r = closed.respond(&headers(None), || unreachable!("rendered without the token"));
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer");
        let r = closed.respond(&headers(Some("Bearer scrape-me")), || "m 1\n".into());
        assert_eq!(r.status(), StatusCode::OK);

        for bad in ["", "has space", "new\nline"] {
            assert!(MetricsAccess::new(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
