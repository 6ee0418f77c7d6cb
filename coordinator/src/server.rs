//! Wiring: open the state, restore the scheduler, serve `Cluster` + `Admin` (behind the
//! cluster token) and `/metrics` on one port (HTTP/2 for gRPC, HTTP/1.1 for scrapers), run
//! the timer that declares silent workers lost.

use crate::auth::{RequireToken, TlsFiles};
use crate::core::{Scheduler, SchedulerConfig};
use crate::metrics::{Counters, render};
use crate::proto::admin_server::AdminServer;
use crate::proto::cluster_server::ClusterServer;
use crate::service::{Coordinator, Inner, now_ms};
use crate::state::{StateError, StateStore};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub listen: String,
    pub state_dir: PathBuf,
    pub token: String,
    pub tls: TlsFiles,
    /// How often workers heartbeat.
    pub heartbeat_ms: u32,
    pub scheduler: SchedulerConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:7070".into(),
            state_dir: PathBuf::from("gantry-coordinator"),
            token: String::new(),
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
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("gRPC server: {0}")]
    Serve(String),
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |m: &str| Err(CoordinatorError::Config(m.to_string()));
        if self.token.is_empty() {
            return bad("a cluster token is required (--token or GANTRY_TOKEN); workers and clients must present it");
        }
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

/// A started coordinator: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub coordinator: Coordinator,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

impl Running {
    /// Stop serving and wait for the server to finish.
    pub async fn stop(self) -> Result<(), CoordinatorError> {
        let _ = self.shutdown.send(());
        self.task.await.map_err(|e| CoordinatorError::Serve(e.to_string()))?
    }

    /// Wait until the server stops on its own (an error); cancellable.
    pub async fn wait_ref(&mut self) -> Result<(), CoordinatorError> {
        (&mut self.task)
            .await
            .map_err(|e| CoordinatorError::Serve(e.to_string()))?
    }
}

/// Open the state, bind, and serve in the background.
pub async fn start(config: CoordinatorConfig) -> Result<Running, CoordinatorError> {
    config.validate()?;
    let (store, loaded) = StateStore::open(&config.state_dir)?;
    let (n_workers, n_jobs) = (loaded.workers.len(), loaded.jobs.len());
    let sched = Scheduler::restore(config.scheduler.clone(), loaded.workers, loaded.jobs, now_ms());
    if n_workers + n_jobs > 0 {
        tracing::info!(workers = n_workers, jobs = n_jobs, state = %store.path().display(), "restored state");
    }
    let coordinator = Coordinator::new(Inner {
        sched,
        store,
        counters: Counters::default(),
        heartbeat_ms: config.heartbeat_ms,
    });
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| CoordinatorError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| CoordinatorError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    let tls = config.tls.server_config()?;
    let token = RequireToken::new(&config.token);
    let mut routes = tonic::service::Routes::new(ClusterServer::with_interceptor(coordinator.clone(), token.clone()))
        .add_service(AdminServer::with_interceptor(coordinator.clone(), token));
    let scrape = coordinator.clone();
    let router = std::mem::take(routes.axum_router_mut()).route(
        "/metrics",
        axum::routing::get(move || {
            let c = scrape.clone();
            async move {
                let g = c.lock();
                (
                    [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    render(&g.sched, &g.counters),
                )
            }
        }),
    );
    let routes = tonic::service::Routes::from(router);
    let mut builder = tonic::transport::Server::builder().accept_http1(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Config(format!("TLS: {e}")))?;
    }
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let ticker = coordinator.clone();
    let tick_every = Duration::from_millis((config.heartbeat_ms as u64 / 2).clamp(50, 1000));
    let task = tokio::spawn(async move {
        let timer = tokio::spawn(async move {
            let mut every = tokio::time::interval(tick_every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let _ = ticker.tick();
            }
        });
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let result = builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
            .map_err(|e| CoordinatorError::Serve(e.to_string()));
        timer.abort();
        result
    });
    Ok(Running {
        addr,
        coordinator,
        shutdown,
        task,
    })
}
