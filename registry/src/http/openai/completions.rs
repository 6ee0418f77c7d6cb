//! `POST /v1/completions`: text completion in OpenAI's shape.
//!
//! `prompt` is a string, a list of strings, a list of token ids or a list of such lists; each
//! prompt gets `n` choices, indexed prompt by prompt. `max_tokens` (default 16; 0 with `echo`
//! scores the prompt only), `logprobs` (up to 20 alternatives per token, the chosen token
//! always listed among them) and `echo` (the prompt's text first in `text`, and with
//! `logprobs` its tokens' log-probabilities: null for the first token, the model's for each
//! later one given those before it — what log-likelihood evaluation reads). `text_offset`
//! counts characters into the returned `text`. `stream: true` sends `text_completion` chunks
//! (with `stream_options.include_usage`, a last chunk with `usage`) and then `data: [DONE]`.

use super::logprobs::Columns;
use super::{
    CommonFields, UsageChunk, chunk, drive_stream, fingerprint, finish_all, finish_reason, now_s, parse_body,
    stream_choices, stream_error, usage, with_version,
};
use crate::http::auth::Scope;
use crate::http::error::{ApiError, JsonBody};
use crate::http::generate::{DEFAULT_MAX_TOKENS, StopField};
use crate::http::generation::{Generation, GenerationRequest, PromptInput, prompt_tokens, route_key, served_version};
use crate::http::routes::AppState;
use crate::serving::logprobs::MAX_TOP_LOGPROBS;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl PromptField {
    fn into_inputs(self) -> Result<Vec<PromptInput>, ApiError> {
        let inputs: Vec<PromptInput> = match self {
            PromptField::Text(t) => vec![PromptInput::Text(t)],
            PromptField::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
            PromptField::Tokens(t) => vec![PromptInput::Tokens(t)],
            PromptField::TokenLists(v) => v.into_iter().map(PromptInput::Tokens).collect(),
        };
        if inputs.is_empty() {
            return Err(ApiError::bad_request("`prompt` is an empty list").with_param("prompt"));
        }
        Ok(inputs)
    }
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: CommonFields,
    prompt: PromptField,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    best_of: Option<usize>,
    #[serde(default)]
    suffix: Option<String>,
}

const OWN_KEYS: &[&str] = &["prompt", "max_tokens", "logprobs", "echo", "best_of", "suffix"];

/// What every choice of the request shares.
struct Shape {
    id: String,
    created: u64,
    model: String,
    echo: bool,
    logprobs: bool,
}

impl Shape {
    fn envelope(&self, g: &Generation, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "system_fingerprint": fingerprint(g), "choices": choices,
        })
    }

    /// The prompt's text and, with `logprobs`, its columns (when echoed).
    fn echoed(&self, g: &Generation) -> (String, Columns) {
        let codec = g.served.codec.as_deref();
        let mut columns = Columns::at(0);
        if !self.echo {
            return (String::new(), columns);
        }
        for (i, &t) in g.prompt.iter().enumerate() {
            let scored = i.checked_sub(1).and_then(|j| g.prompt_scores.as_ref()?.get(j));
            columns.push(codec, t, scored);
        }
        let text = codec.and_then(|c| c.decode(&g.prompt).ok()).unwrap_or_default();
        (text, columns)
    }

    fn choice(&self, index: usize, g: &Generation, finish: &str) -> Value {
        let codec = g.served.codec.as_deref();
        let (mut text, mut columns) = self.echoed(g);
        text.push_str(&g.collector.text);
        for (t, scored) in g.collector.tokens.iter().zip(&g.logprobs) {
            columns.push(codec, *t, scored.as_ref());
        }
        json!({
            "index": index, "text": text, "finish_reason": finish_reason(finish),
            "logprobs": if self.logprobs { columns.to_json() } else { Value::Null },
        })
    }
}

pub(crate) async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let mut body: CompletionBody = parse_body(body, OWN_KEYS)?;
    let prompts = std::mem::replace(&mut body.prompt, PromptField::Texts(Vec::new())).into_inputs()?;
    let n = body.common.check(prompts.len())?;
    if body.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::bad_request("best_of is not supported (only equal to n)").with_param("best_of"));
    }
    if body.suffix.is_some() {
        return Err(ApiError::bad_request("suffix is not supported").with_param("suffix"));
    }
    if body.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(
            ApiError::bad_request(format!("logprobs must be at most {MAX_TOP_LOGPROBS}")).with_param("logprobs"),
        );
    }
    let echo = body.echo.unwrap_or(false);
    let max_tokens = body.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 && !echo {
        return Err(
            ApiError::bad_request("max_tokens 0 needs echo: true (scoring the prompt)").with_param("max_tokens"),
        );
    }
    let routed = served_version(&s, &body.common.model, route_key(&headers, body.common.user.as_deref())).await?;
    let served = routed.served.clone();
    let stops = StopField::into_vec(body.common.stop.take());
    let base_seed = body.common.base_seed();
    let mut generations = Vec::with_capacity(prompts.len() * n);
    let mut prompt_total = 0;
    for (p, input) in prompts.iter().enumerate() {
        let tokens = prompt_tokens(input, &served).map_err(|e| e.with_param("prompt"))?;
        prompt_total += tokens.len();
        for i in 0..n {
            let request = GenerationRequest {
                prompt: tokens.clone(),
                max_tokens,
                sampling: body.common.sampling(base_seed, p * n + i),
                stops: stops.clone(),
                stop_at_eod: true,
                logprobs: body.logprobs,
                // Scored when echoed with log-probabilities, or when nothing is generated.
                prompt_logprobs: match (echo, body.logprobs) {
                    (true, Some(k)) => Some(k),
                    _ if max_tokens == 0 => Some(0),
                    _ => None,
                },
            };
            generations.push(routed.start(&s, request)?);
        }
    }
    let shape = Shape {
        id: super::answer_id("cmpl"),
        created: now_s(),
        model: body.common.model.clone(),
        echo,
        logprobs: body.logprobs.is_some(),
    };
    if body.common.stream.unwrap_or(false) {
        return Ok(stream(s, shape, generations, prompt_total, body.common.include_usage()));
    }
    for g in &mut generations {
        g.prompt_scored().await.map_err(ApiError::internal)?;
    }
    let finishes = finish_all(&s, &mut generations).await?;
    let completion: usize = generations.iter().map(|g| g.collector.tokens.len()).sum();
    let choices = generations
        .iter()
        .zip(finishes)
        .enumerate()
        .map(|(i, (g, f))| shape.choice(i, g, f))
        .collect();
    let mut answer = shape.envelope(&generations[0], choices);
    answer["usage"] = usage(prompt_total, completion);
    Ok(with_version(axum::Json(answer).into_response(), served.version))
}

fn stream(
    s: Arc<AppState>,
    shape: Shape,
    generations: Vec<Generation>,
    prompt_total: usize,
    with_usage: bool,
) -> Response {
    let shape = Arc::new(shape);
    let usage_chunk = with_usage.then(|| {
        let shape = shape.clone();
        Box::new(move |fingerprint: &str, completion: usize| {
            json!({
                "id": shape.id, "object": "text_completion", "created": shape.created, "model": shape.model,
                "system_fingerprint": fingerprint, "choices": [], "usage": usage(prompt_total, completion),
            })
        }) as UsageChunk
    });
    stream_choices(generations, usage_chunk, move |index, g, tx| {
        let (s, shape) = (s.clone(), shape.clone());
        async move { stream_choice(&s, &shape, index, g, &tx).await }
    })
}

/// One choice's chunks; returns the tokens it generated.
async fn stream_choice(
    s: &AppState,
    shape: &Shape,
    index: usize,
    mut g: Generation,
    tx: &tokio::sync::mpsc::UnboundedSender<axum::response::sse::Event>,
) -> usize {
    let piece = |g: &Generation, text: String, logprobs: Value, finish: Value| {
        let choice = json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish });
        chunk(&shape.envelope(g, vec![choice]))
    };
    if let Err(e) = g.prompt_scored().await {
        let _ = tx.send(stream_error(&e));
        g.record(s, "error");
        return 0;
    }
    let (prompt_text, mut columns) = shape.echoed(&g);
    let mut sent = 0;
    if shape.echo {
        let lp = if shape.logprobs { columns.since(0) } else { Value::Null };
        sent = columns.len();
        if tx.send(piece(&g, prompt_text, lp, Value::Null)).is_err() {
            g.record(s, "cancelled");
            return 0;
        }
    }
    let on_text = |g: &Generation, token, text: String| {
        columns.push(
            g.served.codec.as_deref(),
            token,
            g.logprobs.last().and_then(Option::as_ref),
        );
        let lp = if shape.logprobs {
            columns.since(sent)
        } else {
            Value::Null
        };
        sent = columns.len();
        tx.send(piece(g, text, lp, Value::Null)).is_ok()
    };
    let last = |g: &Generation, rest: String, finish| piece(g, rest, Value::Null, json!(finish_reason(finish)));
    drive_stream(s, g, tx, on_text, last).await
}
