//! The OpenAI-compatible face of the registry, for the clients people already use (the
//! official SDKs, lm-evaluation-harness's `local-completions`, chat front-ends):
//! - `GET /v1/models`: every servable reference in OpenAI's list shape (`name`, `name@alias`,
//!   `name@N`); gantry's own paged listing is `GET /v1/registry/models`.
//! - `POST /v1/completions` ([`completions`]) and `POST /v1/chat/completions` ([`chat`]):
//!   `model` is a registry reference; a weighted alias draws one version per request (all
//!   of a request's choices come from it), named in `system_fingerprint` (`gantry:name@3`)
//!   and the `X-Gantry-Version` header. `user` (or an `X-Gantry-Route-Key` header, which
//!   wins) makes the draw sticky: one user, one version, while the alias's weights stand.
//!
//! Sampling (`temperature` default 1, `top_p`, `seed`, `n`, `stop`) is the registry's own
//! (`gantry_sharding::next_token`); choice `i` of a request with `seed` S draws with seed
//! S + i, so an answer is reproducible. Log-probabilities are the model's raw ones (before
//! temperature and top-p), see [`crate::serving::logprobs`]. `presence_penalty`,
//! `frequency_penalty` and `logit_bias` are accepted only at their neutral values; any other
//! field is refused by name. Errors have OpenAI's shape (`error.message`, `error.type`,
//! `error.code`, `error.param`), and the routes take the same bearer tokens as the rest of
//! the registry (pass a read token as the client's API key).

pub mod chat;
pub mod completions;
pub mod logprobs;

use super::auth::Scope;
use super::error::ApiError;
use super::files::VERSION_HEADER;
use super::generate::StopField;
use super::generation::{Ended, Generation, random_seed};
use super::routes::AppState;
use crate::store::{MAX_PAGE, Page};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use gantry_sharding::next_token::SamplingParams;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// The most choices one request may ask for (prompts × `n`).
pub const MAX_CHOICES: usize = 128;

/// Seconds since the Unix epoch, for `created`.
fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `cmpl-…` / `chatcmpl-…`: unique enough to tell answers apart in logs.
fn answer_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", random_seed() ^ u64::from(std::process::id()))
}

#[derive(Deserialize, Default)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields completions and chat share.
#[derive(Deserialize)]
pub(crate) struct CommonFields {
    model: String,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stop: Option<StopField>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Who asks: the route key of a weighted alias (one user, one version).
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
}

const COMMON_KEYS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
];

/// The body as `T`, refusing fields neither [`COMMON_KEYS`] nor `own` name (a field gantry
/// would silently ignore is a field the client believes took effect).
fn parse_body<T: serde::de::DeserializeOwned>(body: Value, own: &[&str]) -> Result<T, ApiError> {
    let Value::Object(map) = &body else {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !COMMON_KEYS.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!("unsupported field `{k}`")).with_param(k));
    }
    serde_json::from_value(body).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

impl CommonFields {
    /// Refuse what gantry does not do; the number of choices per prompt.
    fn check(&self, prompts: usize) -> Result<usize, ApiError> {
        let neutral = |v: Option<f64>| v.is_none_or(|x| x == 0.0);
        if !neutral(self.presence_penalty) || !neutral(self.frequency_penalty) {
            return Err(ApiError::bad_request(
                "presence_penalty and frequency_penalty are not supported (only 0)",
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::bad_request("logit_bias is not supported").with_param("logit_bias"));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n.saturating_mul(prompts) > MAX_CHOICES {
            return Err(ApiError::bad_request(format!(
                "n must be at least 1, and prompts × n at most {MAX_CHOICES} (got {prompts} × {n})"
            ))
            .with_param("n"));
        }
        Ok(n)
    }

    /// The sampling parameters of choice `index`.
    fn sampling(&self, base_seed: u64, index: usize) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed: base_seed.wrapping_add(index as u64),
            top_k: 0,
        }
    }

    fn base_seed(&self) -> u64 {
        self.seed.unwrap_or_else(random_seed)
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// OpenAI's `finish_reason`: `stop` for a stop string or the end-of-document token, `length`
/// for `max_tokens` or the model's context.
fn finish_reason(gantry: &str) -> &'static str {
    match gantry {
        "stop" | "eod" => "stop",
        _ => "length",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

fn fingerprint(g: &Generation) -> String {
    format!("gantry:{}@{}", g.served.model, g.served.version)
}

/// Drive every choice to its end (they share the engine's batches).
async fn finish_all(s: &AppState, generations: &mut [Generation]) -> Result<Vec<&'static str>, ApiError> {
    let ends = futures::future::join_all(generations.iter_mut().map(|g| g.drive(|_, _, _| true))).await;
    let mut out = Vec::with_capacity(ends.len());
    let mut failure = None;
    for (g, end) in generations.iter().zip(ends) {
        match end {
            Ended::Finished(f) => {
                g.record(s, "ok");
                out.push(f);
            }
            Ended::Cancelled => g.record(s, "cancelled"),
            Ended::Failed(e) => {
                g.record(s, "error");
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => Err(ApiError::internal(e)),
        None => Ok(out),
    }
}

fn with_version(mut r: Response, version: u32) -> Response {
    r.headers_mut().insert(VERSION_HEADER, HeaderValue::from(version));
    r
}

/// A server-sent event stream of JSON chunks, ended by `data: [DONE]` once every sender has
/// gone.
fn sse(version: u32) -> (UnboundedSender<Event>, Response) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let events = futures::stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(e) => Some((Ok::<_, std::convert::Infallible>(e), (rx, false))),
            None => Some((Ok(Event::default().data("[DONE]")), (rx, true))),
        }
    });
    (tx, with_version(Sse::new(events).into_response(), version))
}

/// The last chunk of a stream that asked for `usage`, from the serving version's fingerprint
/// and the tokens all choices generated.
type UsageChunk = Box<dyn FnOnce(&str, usize) -> Value + Send>;

/// Stream every choice, each in its own task sending its chunks as they come (`run` returns
/// the tokens it generated), then the usage chunk when asked for; `data: [DONE]` follows once
/// every sender has gone.
fn stream_choices<F, Fut>(generations: Vec<Generation>, usage_chunk: Option<UsageChunk>, run: F) -> Response
where
    F: Fn(usize, Generation, UnboundedSender<Event>) -> Fut,
    Fut: std::future::Future<Output = usize> + Send + 'static,
{
    let version = generations[0].served.version;
    let fingerprint = fingerprint(&generations[0]);
    let (tx, response) = sse(version);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, g) in generations.into_iter().enumerate() {
        tasks.spawn(run(index, g, tx.clone()));
    }
    tokio::spawn(async move {
        let mut completion = 0;
        while let Some(done) = tasks.join_next().await {
            completion += done.unwrap_or(0);
        }
        if let Some(last) = usage_chunk {
            let _ = tx.send(chunk(&last(&fingerprint, completion)));
        }
    });
    response
}

/// Drive one streamed choice to its end, once its opening chunks are sent: `on_text` sends the
/// chunk for each new piece of text (false once the client has gone), `last` makes the closing
/// chunk from the text held back and the finish reason. Records the outcome; returns the
/// tokens generated.
async fn drive_stream(
    s: &AppState,
    mut g: Generation,
    tx: &UnboundedSender<Event>,
    mut on_text: impl FnMut(&Generation, u32, String) -> bool,
    last: impl FnOnce(&Generation, String, &'static str) -> Event,
) -> usize {
    let mut streamed = 0;
    let ended = g
        .drive(|g, token, text| {
            streamed += text.len();
            on_text(g, token, text)
        })
        .await;
    let outcome = match ended {
        Ended::Finished(f) => {
            // Text held back (a character split across tokens, a possible stop string) comes last.
            let rest = g.collector.text.get(streamed..).unwrap_or_default().to_string();
            let _ = tx.send(last(&g, rest, f));
            "ok"
        }
        Ended::Cancelled => "cancelled",
        Ended::Failed(e) => {
            let _ = tx.send(stream_error(&e));
            "error"
        }
    };
    g.record(s, outcome);
    g.collector.tokens.len()
}

fn chunk(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

/// An error in the middle of a stream (the status line has gone already).
fn stream_error(message: &str) -> Event {
    chunk(
        &json!({ "error": { "message": message, "type": "server_error", "code": "generation_failed", "param": null } }),
    )
}

/// `GET /v1/models`: every servable reference, in OpenAI's list shape.
pub(crate) async fn list_models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let data = s
        .blocking(|r| {
            let mut data = Vec::new();
            let mut page = Page::first(MAX_PAGE);
            loop {
                let (models, next) = r.list_models("", &page)?;
                for m in models {
                    let entry = |id: String, created_ms: u64| {
                        json!({ "id": id, "object": "model", "created": created_ms / 1000, "owned_by": "gantry" })
                    };
                    data.push(entry(m.name.clone(), m.created_ms));
                    for a in r.list_aliases(&m.name)? {
                        data.push(entry(format!("{}@{}", m.name, a.name), a.updated_ms));
                    }
                    let mut versions = Page::first(MAX_PAGE);
                    loop {
                        let (vs, next) = r.list_versions(&m.name, &versions)?;
                        data.extend(vs.iter().map(|v| entry(format!("{}@{}", v.model, v.version), v.created_ms)));
                        match next {
                            Some(after) => versions.after = Some(after),
                            None => break,
                        }
                    }
                }
                match next {
                    Some(after) => page.after = Some(after),
                    None => return Ok(data),
                }
            }
        })
        .await?;
    Ok(axum::Json(json!({ "object": "list", "data": data })).into_response())
}
