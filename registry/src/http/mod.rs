//! The registry as an HTTP/JSON service (axum): `gantry registry serve --listen ADDR --db PATH
//! [--token-file FILE]`.
//!
//! - [`ServeConfig`] / [`serve`]: serve on a listener the caller bound until a shutdown
//!   future completes, then stop gracefully (the daemon shape of the coordinator and the
//!   worker too).
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
//!   [`shadow`]: an alias's shadow traffic, mirrored and compared;
//!   [`metrics`]: `/metrics` per served version, shadow comparisons, downloads and the model
//!   cache.
//! - [`openapi`]: the OpenAPI 3.0 document served at `/openapi.json`, and [`ROUTES`], the
//!   list of routes it describes.
//!
//! Wherever a version is named in a path (`/v1/models/{model}/versions/{version}/...`),
//! `{version}` may be a number, `latest` or an alias; `GET /v1/models/{model}` also takes a
//! full reference (`name@3`, `name@prod`). For an alias that splits traffic, each request
//! draws from a per-server counter, so consecutive requests follow the weights exactly; a
//! generation request with a route key (the OpenAI `user` field, or the `X-Gantry-Route-Key`
//! header) draws from the key's hash instead, so one key always gets one version while the
//! weights stand.

pub mod auth;
pub mod conn;
pub mod error;
pub mod files;
pub mod generate;
pub(crate) mod generation;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod opened;
pub mod routes;
pub(crate) mod shadow;
pub mod tensors;

pub use auth::{Scope, TokenEntry, TokenFileError, parse_token_file};
pub use error::ApiError;
pub use openapi::{ROUTES, document};

use crate::error::RegistryError;
use crate::serving::ModelLoader;
use crate::serving::cache::ModelCache;
use crate::store::Registry;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Generation requests in flight per served version (generating or queued for a KV-cache
/// slot) before new ones are answered 503.
pub const DEFAULT_MAX_PENDING: usize = 256;

/// The shortest token accepted, so a guessable token is refused at startup.
pub const MIN_TOKEN_LEN: usize = 16;

/// How to serve.
#[derive(Clone)]
pub struct ServeConfig {
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
    /// Makes the models that generate text (the binary plugs in its tensor library here);
    /// `None`: `generate` answers 501.
    pub generation: Option<Arc<dyn ModelLoader>>,
}

// By hand: a model loader is behaviour, not data, and has no `Debug` of its own.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("db", &self.db)
            .field("tokens", &self.tokens)
            .field("open_reads", &self.open_reads)
            .field("s3", &self.s3)
            .field("checkpoint_roots", &self.checkpoint_roots)
            .field("connections", &self.connections)
            .field("model_cache_bytes", &self.model_cache_bytes)
            .field("max_pending", &self.max_pending)
            .field("generation", &self.generation.is_some())
            .finish()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            db: PathBuf::from("gantry-registry.redb"),
            tokens: Vec::new(),
            open_reads: true,
            s3: gantry_checkpoint::S3Options::default(),
            checkpoint_roots: Vec::new(),
            connections: conn::ConnectionLimits::default(),
            model_cache_bytes: 4 << 30,
            max_pending: DEFAULT_MAX_PENDING,
            generation: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid registry service config: {0}")]
    Config(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("registry HTTP server: {0}")]
    Serve(String),
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
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

/// Serves the registry on `listener` until `shutdown` completes, then stops accepting, lets
/// requests in flight finish and returns (every write was committed before its reply). The
/// caller binds (port 0 and printing the address are its business), so tests bind
/// `127.0.0.1:0` and read `local_addr()`. Returns early only with an error (a bad config, a
/// database that cannot be opened).
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.validate()?;
    // The server never reads the AWS environment: only the configured settings reach S3.
    let s3 = gantry_checkpoint::S3Options {
        configured_only: true,
        ..config.s3.clone()
    };
    let (db, s3_registry, roots) = (config.db.clone(), s3.clone(), config.checkpoint_roots.clone());
    let registry = tokio::task::spawn_blocking(move || {
        Registry::open(db).map(|r| r.with_s3(s3_registry).with_checkpoint_roots(roots))
    })
    .await
    .map_err(|e| ServeError::Serve(e.to_string()))??;
    let serving = config
        .generation
        .map(|loader| Arc::new(ModelCache::new(loader, config.model_cache_bytes, s3)));
    let mut state = routes::AppState::new(
        Arc::new(registry),
        auth::Tokens::new(config.tokens),
        config.open_reads,
        serving,
    );
    state.max_pending = config.max_pending;
    let app = routes::router(Arc::new(state));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, db = %config.db.display(), open_reads = config.open_reads, "registry serving");
    }
    conn::serve_connections(listener, app, config.connections, shutdown).await;
    Ok(())
}
