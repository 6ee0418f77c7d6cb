//! `POST /v1/models/{model}/generate`: text from a served version. `{model}` is a name or a
//! reference (`name@3`, `name@prod`); an alias that splits traffic picks a version per
//! request by its weights (the same version for every request with the same
//! `X-Gantry-Route-Key` header while the weights stand), and the response names the version
//! that served it (`version`, `X-Gantry-Version`).
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
use super::generation::{
    Ended, Generation, GenerationRequest, PromptInput, prompt_tokens, random_seed, route_key, served_version,
};
use super::routes::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use gantry_sharding::next_token::SamplingParams;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub const DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(field: Option<StopField>) -> Vec<String> {
        match field {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        }
    }
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

pub(crate) async fn generate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let prompt = match (body.prompt, body.tokens) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give `prompt` or `tokens`, not both")),
        (None, None) => {
            return Err(ApiError::bad_request(
                "a request needs a `prompt` (text) or `tokens` (ids)",
            ));
        }
        (None, Some(t)) => PromptInput::Tokens(t),
        (Some(text), None) => PromptInput::Text(text),
    };
    let routed = served_version(&s, &model, route_key(&headers, None)).await?;
    let request = GenerationRequest {
        prompt: prompt_tokens(&prompt, &routed.served)?,
        max_tokens: body.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        sampling: SamplingParams {
            temperature: body.temperature.unwrap_or(1.0),
            top_p: body.top_p.unwrap_or(1.0),
            seed: body.seed.unwrap_or_else(random_seed),
            // The API offers nucleus sampling only: every token stays a candidate for top_p.
            top_k: 0,
        },
        stops: StopField::into_vec(body.stop),
        stop_at_eod: body.stop_at_eod.unwrap_or(true),
        logprobs: None,
        prompt_logprobs: None,
    };
    let generation = routed.start(&s, request)?;
    if body.stream {
        Ok(stream(s, generation, model))
    } else {
        whole(&s, generation, &model).await
    }
}

fn answer(g: &Generation, resolved_from: &str, finish: &str) -> Value {
    json!({
        "model": g.served.model,
        "version": g.served.version,
        "resolved_from": resolved_from,
        "text": g.served.codec.as_ref().map(|_| g.collector.text.clone()),
        "tokens": g.collector.tokens,
        "prompt_tokens": g.prompt.len(),
        "completion_tokens": g.collector.tokens.len(),
        "finish_reason": finish,
        "seed": g.seed,
        "timing": {
            "total_ms": g.started.elapsed().as_secs_f64() * 1e3,
            "first_token_ms": g.first_token_s.map(|s| s * 1e3),
        },
    })
}

async fn whole(s: &AppState, mut g: Generation, resolved_from: &str) -> Result<Response, ApiError> {
    match g.drive(|_, _, _| true).await {
        Ended::Finished(finish) => {
            g.record(s, "ok");
            let mut r = axum::Json(answer(&g, resolved_from, finish)).into_response();
            r.headers_mut()
                .insert(VERSION_HEADER, HeaderValue::from(g.served.version));
            Ok(r)
        }
        // `whole` never cancels (its callback always goes on).
        Ended::Cancelled => Err(ApiError::internal("the generation ended early")),
        Ended::Failed(e) => {
            g.record(s, "error");
            Err(ApiError::internal(e))
        }
    }
}

fn stream(s: Arc<AppState>, mut g: Generation, resolved_from: String) -> Response {
    let version = g.served.version;
    // Unbounded, but never longer than `max_tokens` events: a slow client cannot lose one.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let ended = g
            .drive(|_, token, text| {
                let event = Event::default()
                    .event("token")
                    .data(json!({ "token": token, "text": text }).to_string());
                tx.send(event).is_ok()
            })
            .await;
        let (outcome, event) = match ended {
            Ended::Cancelled => ("cancelled", None),
            Ended::Finished(finish) => (
                "ok",
                Some(
                    Event::default()
                        .event("done")
                        .data(answer(&g, &resolved_from, finish).to_string()),
                ),
            ),
            Ended::Failed(e) => (
                "error",
                Some(
                    Event::default()
                        .event("error")
                        .data(json!({ "error": { "code": "generation_failed", "message": e } }).to_string()),
                ),
            ),
        };
        g.record(&s, outcome);
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
