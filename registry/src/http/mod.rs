//! The registry as an HTTP/JSON service (axum): `gantry registry serve --listen ADDR --db PATH
//! [--token-file FILE]`.
//!
//! - [`ServeConfig`] / [`start`] / [`Running`]: bind, serve in the background, stop gracefully.
//! - [`conn`]: the accept loop: header-read and idle timeouts, a cap on open connections
//!   (idle ones are closed first when it is reached).
//! - [`auth`]: bearer tokens with `read` or `write` scope ([`parse_token_file`]).
//! - [`error`]: every error is `{"error": {"code", "message"}}` with a fitting status, including
//!   axum's own rejections (malformed JSON, unknown routes, wrong methods).
//! - [`routes`]: the JSON API over [`crate::Registry`]; every registry call runs on the blocking
//!   pool (redb is synchronous).
//! - [`files`]: a version's checkpoint files (`manifest.json` and its chunk objects) with range
//!   requests, strong ETags and `If-None-Match`.
//! - [`tensors`]: the parameter slices one tensor-parallel rank needs, as one safetensors
//!   file, cut by the checkpoint reader's reshard planner.
//! - [`opened`]: opened checkpoints shared across requests.
//! - [`generate`]: text generation from served versions (JSON or server-sent events);
//!   [`metrics`]: `/metrics` per served version, downloads and the model cache.
//! - [`openapi`]: the OpenAPI 3.0 document served at `/openapi.json`, and [`ROUTES`], the
//!   list of routes it describes.
//!
//! Wherever a version is named in a path (`/v1/models/{model}/versions/{version}/...`),
//! `{version}` may be a number, `latest` or an alias; `GET /v1/models/{model}` also takes a
//! full reference (`name@3`, `name@prod`). For an alias that splits traffic, each request
//! draws from a per-server counter, so consecutive requests follow the weights exactly.

pub mod auth;
pub mod conn;
pub mod error;
pub mod files;
pub mod generate;
pub mod metrics;
pub mod openapi;
pub mod opened;
pub mod routes;
pub mod tensors;

pub use auth::{Scope, TokenEntry, TokenFileError, parse_token_file};
pub use error::ApiError;
pub use openapi::{ROUTES, document};

use crate::error::RegistryError;
use crate::serving::ModelLoader;
use crate::serving::cache::ModelCache;
use crate::store::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Generation requests in flight per served version (generating or queued for a KV-cache
/// slot) before new ones are answered 503.
pub const DEFAULT_MAX_PENDING: usize = 256;

/// The shortest token accepted, so a guessable token is refused at startup.
pub const MIN_TOKEN_LEN: usize = 16;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `host:port`; port 0 picks a free one (see [`Running::addr`]).
    pub listen: String,
    /// The registry database file (created if missing).
    pub db: PathBuf,
    /// Accepted bearer tokens. Writes need a `write` token; with none, the service is read-only.
    pub tokens: Vec<TokenEntry>,
    /// Reads without a token are allowed (a token that is presented must still be valid).
    pub open_reads: bool,
    /// How to reach `s3://` checkpoints: these settings only (the server never reads the AWS
    /// environment or probes for credentials itself; without an endpoint and keys, `s3://`
    /// locations are refused).
    pub s3: gantry_checkpoint::S3Options,
    /// Where checkpoints may be registered from; empty: anywhere the server can read.
    pub checkpoint_roots: Vec<crate::CheckpointRoot>,
    /// Open connections, their timeouts and the cap on their number.
    pub connections: conn::ConnectionLimits,
    /// Memory for versions loaded for generation; least recently used ones are evicted.
    pub model_cache_bytes: u64,
    /// Generation requests in flight per served version before new ones get 503.
    pub max_pending: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:7080".into(),
            db: PathBuf::from("gantry-registry.redb"),
            tokens: Vec::new(),
            open_reads: true,
            s3: gantry_checkpoint::S3Options::default(),
            checkpoint_roots: Vec::new(),
            connections: conn::ConnectionLimits::default(),
            model_cache_bytes: 4 << 30,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid registry service config: {0}")]
    Config(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("registry HTTP server: {0}")]
    Serve(String),
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
        if self.listen.trim().is_empty() {
            return bad("a listen address is required (--listen HOST:PORT)".into());
        }
        if self.db.as_os_str().is_empty() {
            return bad("a database path is required (--db PATH)".into());
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.token.len() < MIN_TOKEN_LEN {
                return bad(format!(
                    "token {} is {} characters; tokens need at least {MIN_TOKEN_LEN}",
                    i + 1,
                    t.token.len()
                ));
            }
            if t.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(format!("token {} contains whitespace or control characters", i + 1));
            }
        }
        self.connections.validate().map_err(ServeError::Config)?;
        if self.max_pending == 0 {
            return bad("max_pending must be at least 1".into());
        }
        if !self.open_reads && self.tokens.is_empty() {
            return bad("reads need a token (open_reads is off) but no tokens are configured".into());
        }
        Ok(())
    }
}

/// A started service: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stop accepting, let in-flight requests finish, and wait for the server to end.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(());
        self.task.await.map_err(|e| ServeError::Serve(e.to_string()))?
    }

    /// Wait until the server stops on its own (an error); cancellable.
    pub async fn wait_ref(&mut self) -> Result<(), ServeError> {
        (&mut self.task).await.map_err(|e| ServeError::Serve(e.to_string()))?
    }
}

/// Open the registry, bind, and serve in the background, without generation.
pub async fn start(config: ServeConfig) -> Result<Running, ServeError> {
    start_with(config, None).await
}

/// As [`start`], generating with models made by `loader` when one is given.
pub async fn start_with(config: ServeConfig, loader: Option<Arc<dyn ModelLoader>>) -> Result<Running, ServeError> {
    config.validate()?;
    let db = config.db.clone();
    let s3 = gantry_checkpoint::S3Options {
        configured_only: true,
        ..config.s3.clone()
    };
    let (s3_models, roots) = (s3.clone(), config.checkpoint_roots.clone());
    let registry =
        tokio::task::spawn_blocking(move || Registry::open(db).map(|r| r.with_s3(s3).with_checkpoint_roots(roots)))
            .await
            .map_err(|e| ServeError::Serve(e.to_string()))??;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    let serving = loader.map(|l| Arc::new(ModelCache::new(l, config.model_cache_bytes, s3_models)));
    let mut state = routes::AppState::new(
        Arc::new(registry),
        auth::Tokens::new(config.tokens.clone()),
        config.open_reads,
        serving,
    );
    state.max_pending = config.max_pending;
    let state = Arc::new(state);
    let app = routes::router(state);
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(%addr, db = %config.db.display(), open_reads = config.open_reads, "registry serving");
    let limits = config.connections.clone();
    let task = tokio::spawn(async move {
        conn::serve_connections(listener, app, limits, async {
            let _ = rx.await;
        })
        .await;
        Ok(())
    });
    Ok(Running { addr, shutdown, task })
}
