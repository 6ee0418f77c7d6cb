//! `POST /v1/chat/completions`: chat in OpenAI's shape.
//!
//! `messages` (`role` and `content`: a string or a list of `{"type": "text", "text"}` parts)
//! are rendered into one prompt by the model's chat template: the Jinja `chat_template` saved
//! with its tokenizer (as in Hugging Face's `tokenizer_config.json`; rendered with
//! `messages`, `add_generation_prompt: true`, `bos_token`, `eos_token`), or, for a model
//! without one, [`DEFAULT_CHAT_TEMPLATE`]: each turn `role:\ncontent` followed by a blank
//! line, then `assistant:\n`; with it the reply also ends at its first blank line (the
//! template's turn separator), as if `stop` held `"\n\n"`. `max_tokens` (or
//! `max_completion_tokens`) defaults to the rest of the model's context; `logprobs: true`
//! with `top_logprobs` (up to 20) reports each generated token. `stream: true` sends
//! `chat.completion.chunk`s (the role first, then content deltas, then the finish reason),
//! and `data: [DONE]`.

use super::logprobs::chat_entry;
use super::{
    CommonFields, UsageChunk, chunk, drive_stream, fingerprint, finish_all, finish_reason, now_s, parse_body,
    stream_choices, usage, with_version,
};
use crate::http::auth::Scope;
use crate::http::error::{ApiError, JsonBody};
use crate::http::generate::StopField;
use crate::http::generation::{Generation, GenerationRequest, PromptInput, prompt_tokens, route_key, served_version};
use crate::http::routes::AppState;
use crate::serving::cache::ServedModel;
use crate::serving::logprobs::MAX_TOP_LOGPROBS;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;

/// The chat template of a model that has none.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n\n{% endfor %}\
{% if add_generation_prompt %}assistant:\n{% endif %}";

/// Where a reply rendered by [`DEFAULT_CHAT_TEMPLATE`] ends.
const DEFAULT_TEMPLATE_STOP: &str = "\n\n";

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: CommonFields,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<usize>,
}

const OWN_KEYS: &[&str] = &[
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
];

/// A message as the template sees it.
#[derive(Serialize)]
struct TemplateMessage {
    role: String,
    content: String,
}

fn template_messages(messages: Vec<ChatMessage>) -> Result<Vec<TemplateMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("`messages` is empty").with_param("messages"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::bad_request(format!(
                                    "messages[{i}]: content parts of type {kind:?} are not supported (text only)"
                                ))
                                .with_param("messages"));
                            }
                        }
                    }
                    text
                }
            };
            Ok(TemplateMessage { role: m.role, content })
        })
        .collect()
}

/// The prompt text the model's template makes of `messages`.
fn render(served: &ServedModel, messages: &[TemplateMessage]) -> Result<String, ApiError> {
    let template = served.chat_template.as_deref().unwrap_or(DEFAULT_CHAT_TEMPLATE);
    let special = |id: Option<u32>| {
        id.and_then(|t| served.codec.as_ref()?.token_text(t))
            .unwrap_or_default()
    };
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        },
    );
    let context = minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => special(served.eod),
        eos_token => special(served.eod),
    };
    env.render_str(template, context).map_err(|e| {
        ApiError::bad_request(format!("{}@{}'s chat template: {e}", served.model, served.version))
            .with_param("messages")
    })
}

struct Shape {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
}

impl Shape {
    fn envelope(&self, object: &str, g: &Generation, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": fingerprint(g), "choices": choices,
        })
    }

    /// `logprobs.content` for generated tokens `from..`.
    fn logprobs(&self, g: &Generation, from: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let codec = g.served.codec.as_deref();
        let content: Vec<Value> = g.collector.tokens[from..]
            .iter()
            .zip(&g.logprobs[from..])
            .filter_map(|(&t, lp)| lp.as_ref().map(|lp| chat_entry(codec, t, lp)))
            .collect();
        json!({ "content": content })
    }
}

pub(crate) async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let mut body: ChatBody = parse_body(body, OWN_KEYS)?;
    let n = body.common.check(1)?;
    let top = body.top_logprobs.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS {
        return Err(
            ApiError::bad_request(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"))
                .with_param("top_logprobs"),
        );
    }
    let logprobs = body.logprobs.unwrap_or(false).then_some(top);
    let messages = template_messages(std::mem::take(&mut body.messages))?;
    let routed = served_version(&s, &body.common.model, route_key(&headers, body.common.user.as_deref())).await?;
    let served = routed.served.clone();
    let text = render(&served, &messages)?;
    let prompt = prompt_tokens(&PromptInput::Text(text), &served).map_err(|e| e.with_param("messages"))?;
    let max_tokens = match body.max_completion_tokens.or(body.max_tokens) {
        Some(m) => m,
        None => served.max_len.saturating_sub(prompt.len()).max(1),
    };
    let mut stops = StopField::into_vec(body.common.stop.take());
    if served.chat_template.is_none() {
        stops.push(DEFAULT_TEMPLATE_STOP.to_string());
    }
    let base_seed = body.common.base_seed();
    let mut generations = Vec::with_capacity(n);
    for i in 0..n {
        let request = GenerationRequest {
            prompt: prompt.clone(),
            max_tokens,
            sampling: body.common.sampling(base_seed, i),
            stops: stops.clone(),
            stop_at_eod: true,
            logprobs,
            prompt_logprobs: None,
        };
        generations.push(routed.start(&s, request)?);
    }
    let shape = Shape {
        id: super::answer_id("chatcmpl"),
        created: now_s(),
        model: body.common.model.clone(),
        logprobs: logprobs.is_some(),
    };
    if body.common.stream.unwrap_or(false) {
        return Ok(stream(s, shape, generations, prompt.len(), body.common.include_usage()));
    }
    let finishes = finish_all(&s, &mut generations).await?;
    let completion: usize = generations.iter().map(|g| g.collector.tokens.len()).sum();
    let choices = generations
        .iter()
        .zip(finishes)
        .enumerate()
        .map(|(i, (g, f))| {
            json!({
                "index": i,
                "message": { "role": "assistant", "content": g.collector.text },
                "logprobs": shape.logprobs(g, 0),
                "finish_reason": finish_reason(f),
            })
        })
        .collect();
    let mut answer = shape.envelope("chat.completion", &generations[0], choices);
    answer["usage"] = usage(prompt.len(), completion);
    Ok(with_version(axum::Json(answer).into_response(), served.version))
}

fn stream(s: Arc<AppState>, shape: Shape, generations: Vec<Generation>, prompt: usize, with_usage: bool) -> Response {
    let shape = Arc::new(shape);
    let usage_chunk = with_usage.then(|| {
        let shape = shape.clone();
        Box::new(move |fingerprint: &str, completion: usize| {
            json!({
                "id": shape.id, "object": "chat.completion.chunk", "created": shape.created,
                "model": shape.model, "system_fingerprint": fingerprint, "choices": [],
                "usage": usage(prompt, completion),
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
    g: Generation,
    tx: &tokio::sync::mpsc::UnboundedSender<axum::response::sse::Event>,
) -> usize {
    let piece = |g: &Generation, delta: Value, logprobs: Value, finish: Value| {
        let choice = json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish });
        chunk(&shape.envelope("chat.completion.chunk", g, vec![choice]))
    };
    if tx
        .send(piece(
            &g,
            json!({ "role": "assistant", "content": "" }),
            Value::Null,
            Value::Null,
        ))
        .is_err()
    {
        g.record(s, "cancelled");
        return 0;
    }
    let mut sent = 0;
    let on_text = |g: &Generation, _, text: String| {
        if text.is_empty() && !shape.logprobs {
            return !tx.is_closed();
        }
        let lp = shape.logprobs(g, sent);
        sent = g.collector.tokens.len();
        tx.send(piece(g, json!({ "content": text }), lp, Value::Null)).is_ok()
    };
    let last = |g: &Generation, rest: String, finish| {
        let delta = if rest.is_empty() {
            json!({})
        } else {
            json!({ "content": rest })
        };
        piece(g, delta, Value::Null, json!(finish_reason(finish)))
    };
    drive_stream(s, g, tx, on_text, last).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_with(template: &str, messages: Vec<TemplateMessage>) -> Result<String, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.render_str(
            template,
            minijinja::context! { messages => messages, add_generation_prompt => true, eos_token => "</s>" },
        )
    }

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn the_default_template_separates_turns_by_a_blank_line() {
        let text = render_with(
            DEFAULT_CHAT_TEMPLATE,
            vec![msg("system", "Be brief."), msg("user", "Hi")],
        )
        .unwrap();
        assert_eq!(text, "system:\nBe brief.\n\nuser:\nHi\n\nassistant:\n");
    }

    #[test]
    fn hugging_face_style_templates_render_with_python_string_methods() {
        // The shape of many Hub templates: .strip() and eos_token after assistant turns.
        let t = "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let text = render_with(
            t,
            vec![msg("user", "  Hi  "), msg("assistant", "Hello"), msg("user", "Again")],
        )
        .unwrap();
        assert_eq!(text, "<|user|>Hi\n<|assistant|>Hello</s>\n<|user|>Again\n<|assistant|>");
    }

    #[test]
    fn content_parts_join_and_other_parts_are_refused() {
        let parts: Vec<ChatMessage> = serde_json::from_value(json!([
            { "role": "user", "content": [{ "type": "text", "text": "a" }, { "type": "text", "text": "b" }] },
            { "role": "assistant" }
        ]))
        .unwrap();
        let m = template_messages(parts).unwrap();
        assert_eq!((m[0].content.as_str(), m[1].content.as_str()), ("ab", ""));
        let image: Vec<ChatMessage> =
            serde_json::from_value(json!([{ "role": "user", "content": [{ "type": "image_url" }] }])).unwrap();
        let e = template_messages(image).err().unwrap();
        assert!(e.message.contains("image_url"), "{}", e.message);
        assert!(template_messages(Vec::new()).is_err());
    }
}
