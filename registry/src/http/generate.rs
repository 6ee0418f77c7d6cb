//! `POST /v1/models/{model}/generate`: text from a served version. `{model}` is a name or a
//! reference (`name@3`, `name@prod`); an alias that splits traffic picks a version per
//! request by its weights, and the response names the version that served it
//! (`version`, `X-Gantry-Version`).
//!
//! Body: `prompt` (text, encoded with the model's own tokenizer) or `tokens`; `max_tokens`
//! (default 16), `temperature` (default 1; 0 is greedy), `top_p` (default 1), `seed`
//! (default: drawn and returned, so any answer can be reproduced), `stop` (a string or a
//! list: the text ends before the first one), `stop_at_eod` (default true), `stream`.
//!
//! Without `stream`: one JSON object. With `stream: true`: server-sent events, one
//! `token` event per token (`{"token", "text"}`, `text` being the new text it completes),
//! then a `done` event with the same object as the non-streaming answer (or `error`).

use super::auth::Scope;
use super::error::{ApiError, JsonBody};
use super::files::VERSION_HEADER;
use super::metrics::GenerationOutcome;
use super::routes::{AppState, parse_ref};
use crate::serving::TextCodec;
use crate::serving::cache::{Admitted, CacheError, ServedModel};
use crate::serving::engine::{GenEvent, GenerateJob};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use gantry_sharding::next_token::SamplingParams;
use gantry_sharding::splitmix::SplitMix64;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

pub const DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stop_at_eod: Option<bool>,
    #[serde(default)]
    pub stream: bool,
}

/// The prompt as token ids, checked against the model.
fn prompt_tokens(body: &GenerateBody, m: &ServedModel) -> Result<Vec<u32>, ApiError> {
    let tokens = match (&body.prompt, &body.tokens) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give `prompt` or `tokens`, not both")),
        (None, None) => {
            return Err(ApiError::bad_request(
                "a request needs a `prompt` (text) or `tokens` (ids)",
            ));
        }
        (None, Some(t)) => t.clone(),
        (Some(text), None) => {
            let codec = m.codec.as_ref().ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "no_tokenizer",
                    format!(
                        "{}@{} was trained on token ids with no tokenizer; send `tokens`",
                        m.model, m.version
                    ),
                )
            })?;
            codec
                .encode(text)
                .map_err(|e| ApiError::bad_request(format!("cannot encode the prompt: {e}")))?
        }
    };
    // An empty prompt starts a new document.
    let tokens = match (tokens.is_empty(), m.eod) {
        (true, Some(eod)) => vec![eod],
        (true, None) => {
            return Err(ApiError::bad_request(
                "the prompt is empty and the model has no end-of-document token to start from",
            ));
        }
        (false, _) => tokens,
    };
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= m.vocab_size) {
        return Err(ApiError::bad_request(format!(
            "token {bad} is outside the model's vocabulary of {}",
            m.vocab_size
        )));
    }
    if tokens.len() > m.max_len {
        return Err(ApiError::bad_request(format!(
            "the prompt is {} tokens; the model's context is {}",
            tokens.len(),
            m.max_len
        )));
    }
    Ok(tokens)
}

/// Collects one generation: tokens, decoded text, stop strings.
struct Collector {
    stops: Vec<String>,
    tokens: Vec<u32>,
    /// Text sent so far (streaming) or decided so far.
    text: String,
    finish: Option<&'static str>,
}

impl Collector {
    /// Take one token; returns the new text it completes (empty while a character is split
    /// across tokens). Sets `finish` when a stop string appears.
    fn token(&mut self, codec: Option<&dyn TextCodec>, token: u32) -> String {
        self.tokens.push(token);
        let Some(codec) = codec else {
            return String::new();
        };
        let Ok(full) = codec.decode(&self.tokens) else {
            return String::new();
        };
        // Hold back a trailing replacement character: the next token may complete it.
        let settled = full.trim_end_matches('\u{FFFD}');
        if let Some(cut) = self.stops.iter().filter_map(|s| settled.find(s.as_str())).min() {
            let new = settled.get(self.text.len()..cut).unwrap_or("").to_string();
            self.text = settled[..cut].to_string();
            self.finish = Some("stop");
            return new;
        }
        // Hold back the end of the text while it could be the start of a stop string, so
        // streamed text never has to be taken back.
        let safe = &settled[..settled.len() - self.partial_stop(settled)];
        if safe.len() > self.text.len() && safe.starts_with(&self.text) {
            let new = safe[self.text.len()..].to_string();
            self.text = safe.to_string();
            return new;
        }
        String::new()
    }

    /// Bytes at the end of `text` that are a proper prefix of some stop string.
    fn partial_stop(&self, text: &str) -> usize {
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n))
                    .find(|&n| text.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0)
    }

    /// The final text once generation has ended (flushes held-back characters).
    fn finish_text(&mut self, codec: Option<&dyn TextCodec>) {
        if self.finish == Some("stop") {
            return;
        }
        if let Some(full) = codec.and_then(|c| c.decode(&self.tokens).ok()) {
            self.text = full;
        }
    }
}

struct Prepared {
    served: Arc<ServedModel>,
    /// Held until the request ends: counts it against the version's queue limit.
    _admitted: Admitted,
    resolved_from: String,
    prompt: Vec<u32>,
    seed: u64,
    rx: UnboundedReceiver<GenEvent>,
    collector: Collector,
    started: Instant,
}

pub(crate) async fn generate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let started = Instant::now();
    let cache = s.serving.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_serving",
            "this registry was started without model serving (gantry registry serve loads models; see --help)",
        )
    })?;
    let reference = parse_ref(&model)?;
    let version = s.resolve(reference).await?;
    let sampling = SamplingParams {
        temperature: body.temperature.unwrap_or(1.0),
        top_p: body.top_p.unwrap_or(1.0),
        seed: body.seed.unwrap_or_else(random_seed),
        // The API offers nucleus sampling only: every token stays a candidate for top_p.
        top_k: 0,
    };
    sampling.validate().map_err(ApiError::bad_request)?;
    let max_tokens = body.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let served = cache.get(&version).await.map_err(|e| match e {
        CacheError::TooLarge { .. } => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "model_too_large", e.to_string())
        }
        CacheError::Load { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_unavailable", e.to_string()),
    })?;
    if max_tokens == 0 || max_tokens > served.max_len {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between 1 and the model's context of {}, got {max_tokens}",
            served.max_len
        )));
    }
    let stops: Vec<String> = match &body.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop strings must not be empty"));
    }
    if !stops.is_empty() && served.codec.is_none() {
        return Err(ApiError::bad_request("stop strings need a model with a tokenizer"));
    }
    let prompt = prompt_tokens(&body, &served)?;
    let admitted = served.admit(s.max_pending).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{}@{} already has {} requests in flight (--max-pending); retry later",
                served.model, served.version, s.max_pending
            ),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = GenerateJob {
        prompt: prompt.clone(),
        max_tokens,
        sampling,
        stop_at_eod: body.stop_at_eod.unwrap_or(true),
        events: tx,
    };
    if !served.engine.submit(job) {
        cache.forget(&served);
        return Err(ApiError::internal(format!(
            "the generation engine of {}@{} had stopped; it is loaded again on the next request",
            served.model, served.version
        )));
    }
    let prepared = Prepared {
        _admitted: admitted,
        collector: Collector {
            stops,
            tokens: Vec::new(),
            text: String::new(),
            finish: None,
        },
        served,
        resolved_from: model,
        prompt,
        seed: sampling.seed,
        rx,
        started,
    };
    if body.stream {
        Ok(stream(s, prepared))
    } else {
        whole(&s, prepared).await
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SplitMix64::new(t ^ u64::from(std::process::id())).next_u64() >> 11
}

fn answer(p: &Prepared, finish: &str, first_token_s: Option<f64>) -> Value {
    json!({
        "model": p.served.model,
        "version": p.served.version,
        "resolved_from": p.resolved_from,
        "text": p.served.codec.as_ref().map(|_| p.collector.text.clone()),
        "tokens": p.collector.tokens,
        "prompt_tokens": p.prompt.len(),
        "completion_tokens": p.collector.tokens.len(),
        "finish_reason": finish,
        "seed": p.seed,
        "timing": {
            "total_ms": p.started.elapsed().as_secs_f64() * 1e3,
            "first_token_ms": first_token_s.map(|s| s * 1e3),
        },
    })
}

/// Receive events until the generation ends; `on_token(new_text, token)` per token.
async fn drive(
    p: &mut Prepared,
    mut on_token: impl FnMut(u32, String) -> bool,
) -> (Result<&'static str, String>, Option<f64>) {
    let mut first = None;
    let codec = p.served.codec.as_deref();
    loop {
        match p.rx.recv().await {
            Some(GenEvent::Token(t)) => {
                first.get_or_insert_with(|| p.started.elapsed().as_secs_f64());
                let new = p.collector.token(codec, t);
                if !on_token(t, new) {
                    return (Ok("cancelled"), first);
                }
                if let Some(f) = p.collector.finish {
                    // Dropping the receiver (when `p` goes) frees the slot at the next step.
                    return (Ok(f), first);
                }
            }
            Some(GenEvent::Finished(reason)) => {
                p.collector.finish_text(codec);
                return (Ok(reason.as_str()), first);
            }
            Some(GenEvent::Failed(e)) => return (Err(e), first),
            None => return (Err("the generation engine stopped".into()), first),
        }
    }
}

fn record(s: &AppState, p: &Prepared, outcome: &'static str, first: Option<f64>) {
    s.metrics.generation(GenerationOutcome {
        model: &p.served.model,
        version: p.served.version,
        outcome,
        prompt_tokens: p.prompt.len() as u64,
        tokens: p.collector.tokens.len() as u64,
        seconds: p.started.elapsed().as_secs_f64(),
        first_token_seconds: first,
    });
}

async fn whole(s: &AppState, mut p: Prepared) -> Result<Response, ApiError> {
    let (result, first) = drive(&mut p, |_, _| true).await;
    match result {
        Ok(finish) => {
            record(s, &p, "ok", first);
            let mut r = axum::Json(answer(&p, finish, first)).into_response();
            r.headers_mut()
                .insert(VERSION_HEADER, HeaderValue::from(p.served.version));
            Ok(r)
        }
        Err(e) => {
            record(s, &p, "error", first);
            Err(ApiError::internal(format!(
                "{}@{}: {e}",
                p.served.model, p.served.version
            )))
        }
    }
}

fn stream(s: Arc<AppState>, mut p: Prepared) -> Response {
    let version = p.served.version;
    // Unbounded, but never longer than `max_tokens` events: a slow client cannot lose one.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let (result, first) = drive(&mut p, |token, text| {
            let event = Event::default()
                .event("token")
                .data(json!({ "token": token, "text": text }).to_string());
            tx.send(event).is_ok()
        })
        .await;
        let (outcome, event) = match result {
            Ok("cancelled") => ("cancelled", None),
            Ok(finish) => (
                "ok",
                Some(Event::default().event("done").data(answer(&p, finish, first).to_string())),
            ),
            Err(e) => (
                "error",
                Some(Event::default().event("error").data(
                    json!({ "error": { "code": "generation_failed", "message": format!("{}@{}: {e}", p.served.model, p.served.version) } })
                        .to_string(),
                )),
            ),
        };
        record(&s, &p, outcome, first);
        if let Some(e) = event {
            let _ = tx.send(e);
        }
    });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    let mut r = Sse::new(events).into_response();
    r.headers_mut().insert(VERSION_HEADER, HeaderValue::from(version));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One character per token id (`a` + id).
    struct Letters;

    impl TextCodec for Letters {
        fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
            Ok(text.bytes().map(|b| u32::from(b - b'a')).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            Ok(ids.iter().map(|&i| char::from(b'a' + i as u8)).collect())
        }
    }

    fn collector(stops: &[&str]) -> Collector {
        Collector {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            tokens: Vec::new(),
            text: String::new(),
            finish: None,
        }
    }

    fn feed(c: &mut Collector, text: &str) -> Vec<String> {
        let ids = Letters.encode(text).unwrap();
        let codec: &dyn TextCodec = &Letters;
        let mut out = Vec::new();
        for id in ids {
            out.push(c.token(Some(codec), id));
            if c.finish.is_some() {
                break;
            }
        }
        out
    }

    #[test]
    fn stop_strings_end_the_text_and_streamed_text_is_never_taken_back() {
        let mut c = collector(&["cde"]);
        let pieces = feed(&mut c, "abcdcdefg");
        assert_eq!(c.finish, Some("stop"));
        assert_eq!(c.text, "abcd");
        // "c" and "cd" were held back while they could have begun "cde".
        assert_eq!(pieces, ["a", "b", "", "", "cd", "", ""]);
        assert_eq!(pieces.concat(), c.text);

        let mut c = collector(&["xyz", "bb"]);
        let pieces = feed(&mut c, "abab");
        assert_eq!((c.finish, pieces.concat()), (None, "aba".to_string()));
        let codec: &dyn TextCodec = &Letters;
        c.finish_text(Some(codec));
        assert_eq!(c.text, "abab", "the end flushes what was held back");
    }
}
