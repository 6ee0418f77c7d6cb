//! The JSON API over [`Registry`]. Handlers check the token, then run the registry call on the
//! blocking pool.

use super::auth::{Scope, Tokens};
use super::error::{ApiError, JsonBody, json_errors};
use super::metrics::ServiceMetrics;
use super::opened::OpenedCheckpoints;
use super::{files, generate, openai, openapi, tensors};
use crate::model::{Alias, EvalRecord, Shadow, VersionRecord};
use crate::name::{ModelRef, Selector};
use crate::serving::cache::{ModelCache, Pins};
use crate::split;
use crate::store::{Page, Registry, Route};
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The page size when a listing gives no `limit`.
pub const DEFAULT_LIMIT: usize = 100;

pub struct AppState {
    pub registry: Arc<Registry>,
    /// Loaded versions for generation (`None`: this server does not generate).
    pub serving: Option<Arc<ModelCache>>,
    pub metrics: Arc<ServiceMetrics>,
    /// Generation requests in flight per served version before new ones get 503.
    pub max_pending: usize,
    /// Checkpoints opened for file and tensor reads, shared across requests.
    pub opened: Arc<OpenedCheckpoints>,
    tokens: Tokens,
    open_reads: bool,
    /// Draws for weighted aliases: one per resolution, so traffic follows the weights.
    draws: AtomicU64,
    /// Draws for shadows, per `(model, alias)`, so each alias mirrors exactly its percent.
    mirror_draws: Mutex<HashMap<(String, String), u64>>,
}

impl AppState {
    pub fn new(
        registry: Arc<Registry>,
        tokens: Tokens,
        open_reads: bool,
        serving: Option<Arc<ModelCache>>,
    ) -> AppState {
        AppState {
            registry,
            serving,
            metrics: Arc::new(ServiceMetrics::default()),
            max_pending: super::DEFAULT_MAX_PENDING,
            opened: Arc::new(OpenedCheckpoints::default()),
            tokens,
            open_reads,
            draws: AtomicU64::new(0),
            mirror_draws: Mutex::default(),
        }
    }

    pub(crate) fn authorize(&self, headers: &HeaderMap, need: Scope) -> Result<(), ApiError> {
        self.tokens.check(headers, need, self.open_reads)
    }

    /// Run a registry call on the blocking pool.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Registry) -> Result<T, crate::RegistryError> + Send + 'static,
    {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&registry))
            .await
            .map_err(|e| ApiError::internal(format!("registry task failed: {e}")))?
            .map_err(ApiError::from)
    }

    /// Resolve `{model}` + `{version}` path segments (`3`, `latest` or an alias).
    pub(crate) async fn resolve_segments(&self, model: &str, version: &str) -> Result<VersionRecord, ApiError> {
        let reference = parse_ref(&format!("{model}@{version}"))?;
        self.resolve(reference).await
    }

    pub(crate) async fn resolve(&self, reference: ModelRef) -> Result<VersionRecord, ApiError> {
        let draw = self.draws.fetch_add(1, Ordering::Relaxed);
        self.blocking(move |r| r.resolve(&reference, draw)).await
    }

    /// What serves a generation request for `reference`: a request with a route `key` draws
    /// from the key's hash (sticky: one key, one version while the alias's weights stand),
    /// one without draws from the counter. An alias seen here is pinned in the model cache.
    pub(crate) async fn route(&self, reference: ModelRef, key: Option<&[u8]>) -> Result<Route, ApiError> {
        let draw = match key {
            Some(k) => split::sticky_draw(k),
            None => self.draws.fetch_add(1, Ordering::Relaxed),
        };
        let route = self.blocking(move |r| r.route(&reference, draw)).await?;
        if let (Some(cache), Some(a)) = (&self.serving, &route.alias) {
            cache.pin(&a.model, &a.name, pins_of(a));
        }
        Ok(route)
    }

    /// The next shadow draw of `alias` of `model` (see [`split::mirrors`]).
    pub(crate) fn mirror_draw(&self, model: &str, alias: &str) -> u64 {
        let mut draws = self.mirror_draws.lock().expect("mirror draws lock");
        let next = draws.entry((model.to_string(), alias.to_string())).or_default();
        let draw = *next;
        *next += 1;
        draw
    }
}

/// What an alias keeps loaded in the model cache.
fn pins_of(a: &Alias) -> Pins {
    Pins {
        targets: a.targets.iter().map(|t| t.0).collect(),
        shadow: a.shadow.map(|sh| sh.version),
    }
}

pub(crate) fn parse_ref(s: &str) -> Result<ModelRef, ApiError> {
    ModelRef::parse(s).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_name", e.to_string()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({ "ok": true })) }))
        .route("/openapi.json", get(|| async { axum::Json(openapi::document()) }))
        .route("/metrics", get(metrics))
        .route("/v1/models/{model}/generate", axum::routing::post(generate::generate))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/completions", axum::routing::post(openai::completions::completions))
        .route(
            "/v1/chat/completions",
            axum::routing::post(openai::chat::chat_completions),
        )
        .route("/v1/registry/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/models/{model}/versions", get(list_versions).post(register))
        .route("/v1/models/{model}/versions/{version}", get(get_version))
        .route(
            "/v1/models/{model}/versions/{version}/evals",
            axum::routing::post(add_eval),
        )
        .route(
            "/v1/models/{model}/versions/{version}/files/{*path}",
            get(files::get_file),
        )
        .route(
            "/v1/models/{model}/versions/{version}/tensors",
            get(tensors::get_tensors),
        )
        .route("/v1/models/{model}/aliases", get(list_aliases))
        .route(
            "/v1/models/{model}/aliases/{alias}",
            get(get_alias).put(set_alias).delete(delete_alias),
        )
        .fallback(|| async { ApiError::not_found("not_found", "no such route; see /openapi.json") })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// `/metrics` is a read like any other: with `--closed-reads` it needs the read token.
async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(s.serving.as_deref()),
    )
        .into_response())
}

/// `?filter=&after=&limit=`, parsed by hand so a bad value is a JSON 400.
fn page_query(raw: Option<String>) -> Result<(String, Page), ApiError> {
    let mut filter = String::new();
    let mut page = Page::first(DEFAULT_LIMIT);
    let raw = raw.unwrap_or_default();
    let pairs: Vec<(String, String)> = query_pairs(&raw)?;
    for (k, v) in pairs {
        match k.as_str() {
            "filter" => filter = v,
            "after" if !v.is_empty() => page.after = Some(v),
            "after" => {}
            "limit" => {
                page.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| ApiError::bad_request(format!("limit must be a positive integer, got {v:?}")))?;
            }
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok((filter, page))
}

/// Split and percent-decode `a=1&b=2` (`+` is a space).
pub(crate) fn query_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    fn decode(s: &str) -> Result<String, ApiError> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| ApiError::bad_request(format!("bad percent-encoding in {s:?}")))?;
                    out.push(hex);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| ApiError::bad_request(format!("query value {s:?} is not UTF-8")))
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

async fn list_models(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let (filter, page) = page_query(q)?;
    let (models, next) = s.blocking(move |r| r.list_models(&filter, &page)).await?;
    Ok(axum::Json(json!({ "models": models, "next": next })).into_response())
}

/// A plain name: the model (with its latest version number and aliases). A reference
/// (`name@3`, `name@latest`, `name@alias`): the version it resolves to, with `resolved_from`.
async fn get_model(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(reference): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let parsed = parse_ref(&reference)?;
    if reference.contains('@') {
        let version = s.resolve(parsed).await?;
        let mut body = serde_json::to_value(&version).map_err(|e| ApiError::internal(e.to_string()))?;
        body["resolved_from"] = json!(reference);
        return Ok(axum::Json(body).into_response());
    }
    let name = parsed.name;
    let (model, latest, aliases) = s
        .blocking(move |r| {
            let model = r.get_model(&name)?;
            let latest = r.latest_version(&name).map(|v| v.version).ok();
            Ok((model, latest, r.list_aliases(&name)?))
        })
        .await?;
    let mut body = serde_json::to_value(&model).map_err(|e| ApiError::internal(e.to_string()))?;
    body["latest_version"] = json!(latest);
    body["aliases"] = json!(aliases);
    Ok(axum::Json(body).into_response())
}

/// A model name in a path that names a model only (not a version).
fn plain_name(model: &str) -> Result<String, ApiError> {
    let r = parse_ref(model)?;
    if r.selector != Selector::Latest || model.contains('@') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_name",
            format!("{model:?}: this path takes a model name, not a version reference"),
        ));
    }
    Ok(r.name)
}

async fn list_versions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let model = plain_name(&model)?;
    let (filter, page) = page_query(q)?;
    if !filter.is_empty() {
        return Err(ApiError::bad_request("versions take no filter"));
    }
    let (versions, next) = s.blocking(move |r| r.list_versions(&model, &page)).await?;
    Ok(axum::Json(json!({ "versions": versions, "next": next })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub checkpoint: String,
    #[serde(default)]
    pub step: Option<u64>,
}

async fn register(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Write)?;
    let model = plain_name(&model)?;
    let v = s
        .blocking(move |r| r.register_version(&model, &body.checkpoint, body.step, now_ms()))
        .await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn get_version(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let model = plain_name(&model)?;
    Ok(axum::Json(s.resolve_segments(&model, &version).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalBody {
    /// Defaults to the time of the request.
    #[serde(default)]
    pub at_ms: Option<u64>,
    pub dataset: String,
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
    pub tp: u32,
    #[serde(default)]
    pub note: String,
}

async fn add_eval(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, version)): Path<(String, String)>,
    JsonBody(body): JsonBody<EvalBody>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Write)?;
    let model = plain_name(&model)?;
    if body.dataset.trim().is_empty() {
        return Err(ApiError::bad_request("an eval needs a dataset name"));
    }
    if !body.loss.is_finite() || !body.perplexity.is_finite() {
        return Err(ApiError::bad_request("loss and perplexity must be finite numbers"));
    }
    let target = s.resolve_segments(&model, &version).await?;
    let eval = EvalRecord {
        at_ms: body.at_ms.unwrap_or_else(now_ms),
        dataset: body.dataset,
        loss: body.loss,
        perplexity: body.perplexity,
        tokens: body.tokens,
        tp: body.tp,
        note: body.note,
    };
    let v = s.blocking(move |r| r.add_eval(&model, target.version, eval)).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn list_aliases(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let model = plain_name(&model)?;
    let aliases = s.blocking(move |r| r.list_aliases(&model)).await?;
    Ok(axum::Json(json!({ "aliases": aliases })).into_response())
}

async fn get_alias(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, alias)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let model = plain_name(&model)?;
    Ok(axum::Json(s.blocking(move |r| r.get_alias(&model, &alias)).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasTarget {
    pub version: u32,
    pub weight: u32,
}

/// `{"version": 3}` or `{"targets": [{"version": 3, "weight": 90}, ...]}`, either with an
/// optional `"shadow": {"version": 5, "percent": 10}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub targets: Option<Vec<AliasTarget>>,
    #[serde(default)]
    pub shadow: Option<ShadowBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowBody {
    pub version: u32,
    pub percent: u32,
}

/// Set or move an alias. A server that generates loads every version the alias will name
/// (targets and shadow) before the move is committed, so no request drawn to a new version
/// waits for its load; the PUT waits instead, and a version that cannot be loaded fails the
/// PUT and leaves the alias as it was. Requests already running finish on the version they
/// started on (they hold it).
async fn set_alias(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, alias)): Path<(String, String)>,
    JsonBody(body): JsonBody<AliasBody>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Write)?;
    let model = plain_name(&model)?;
    let targets: Vec<(u32, u32)> = match (body.version, body.targets) {
        (Some(v), None) => vec![(v, 1)],
        (None, Some(t)) => t.into_iter().map(|t| (t.version, t.weight)).collect(),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `version` or `targets` ([{\"version\", \"weight\"}])",
            ));
        }
    };
    let shadow = body.shadow.map(|sh| Shadow {
        version: sh.version,
        percent: sh.percent,
    });
    // Refuse a bad request before loading anything for it (the store checks again, in its
    // transaction).
    crate::name::check_alias_name(&alias).map_err(crate::RegistryError::from)?;
    split::validate(&targets).map_err(crate::RegistryError::from)?;
    if let Some(sh) = shadow {
        split::validate_shadow(&targets, sh.version, sh.percent).map_err(crate::RegistryError::from)?;
    }
    let pins = Pins {
        targets: targets.iter().map(|t| t.0).collect(),
        shadow: shadow.map(|sh| sh.version),
    };
    // Pinned under a name of their own while they load (released however the PUT ends, even
    // when its client goes away), so the loads evict neither each other nor what the alias
    // serves now (pinned under the alias's own name).
    let moving = s
        .serving
        .as_ref()
        .map(|cache| Moving::pin(cache, &model, &alias, pins.clone()));
    if let Some(cache) = &s.serving {
        preload(&s, cache, &model, &pins).await.map_err(|e| {
            ApiError::new(
                e.status,
                e.code,
                format!("{model}@{alias} was not moved: {}", e.message),
            )
        })?;
    }
    let (m, a) = (model.clone(), alias.clone());
    let set = s
        .blocking(move |r| r.set_alias_with_shadow(&m, &a, &targets, shadow, now_ms()))
        .await?;
    if let Some(cache) = &s.serving {
        cache.pin(&model, &alias, pins);
    }
    drop(moving);
    Ok(axum::Json(set).into_response())
}

/// The versions an alias is being moved to, pinned in the model cache until dropped.
struct Moving {
    cache: Arc<ModelCache>,
    model: String,
    owner: String,
}

impl Moving {
    fn pin(cache: &Arc<ModelCache>, model: &str, alias: &str, pins: Pins) -> Moving {
        // Alias names cannot hold a space, so this never names an alias.
        let owner = format!("{alias} (moving)");
        cache.pin(model, &owner, pins);
        Moving {
            cache: cache.clone(),
            model: model.to_string(),
            owner,
        }
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        self.cache.pin(&self.model, &self.owner, Pins::default());
    }
}

/// Load every version `pins` names into the model cache, concurrently (each load happens
/// once however many ask for it).
async fn preload(s: &AppState, cache: &ModelCache, model: &str, pins: &Pins) -> Result<(), ApiError> {
    let wanted: Vec<u32> = pins.targets.iter().copied().chain(pins.shadow).collect();
    let m = model.to_string();
    let records = s
        .blocking(move |r| {
            wanted
                .iter()
                .map(|&v| r.get_version(&m, v))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let loads = futures::future::join_all(records.iter().map(|v| cache.get(v))).await;
    match loads.into_iter().find_map(Result::err) {
        Some(e) => Err(super::generation::cache_error(e)),
        None => Ok(()),
    }
}

async fn delete_alias(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, alias)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Write)?;
    let model = plain_name(&model)?;
    let (m, a) = (model.clone(), alias.clone());
    let removed = s.blocking(move |r| r.delete_alias(&m, &a)).await?;
    if let Some(cache) = &s.serving {
        cache.pin(&model, &alias, Pins::default());
    }
    Ok(axum::Json(removed).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let (f, p) = page_query(Some("filter=g%20p+t&after=x&limit=5".into())).unwrap();
        assert_eq!((f.as_str(), p.after.as_deref(), p.limit), ("g p t", Some("x"), 5));
        let (f, p) = page_query(None).unwrap();
        assert_eq!((f.as_str(), p.after, p.limit), ("", None, DEFAULT_LIMIT));
        for bad in ["limit=abc", "limit=0", "limit=-1", "bogus=1", "filter=%zz"] {
            assert_eq!(page_query(Some(bad.into())).unwrap_err().status, 400, "{bad}");
        }
    }
}
