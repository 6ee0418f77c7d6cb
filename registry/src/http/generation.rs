//! One generation request from the HTTP side, shared by gantry's own `generate` route and the
//! OpenAI-compatible routes: find the served version ([`served_version`], sticky when the
//! request carries a [`route_key`]), check the prompt against it, take a place in its queue
//! and hand the job to its engine ([`Routed::start`], which also mirrors the request to the
//! alias's shadow when it is drawn, see [`super::shadow`]), then receive tokens
//! ([`Generation::drive`]), decoding text and watching for stop strings as they come
//! ([`Collector`]), and count the outcome on `/metrics` ([`Generation::record`]).

use super::error::ApiError;
use super::metrics::GenerationOutcome;
use super::routes::{AppState, parse_ref};
use super::shadow::{self, Mirror, PrimaryLink};
use crate::serving::cache::{Admitted, CacheError, ModelCache, ServedModel};
use crate::serving::engine::{GenEvent, GenerateJob};
use crate::serving::{TextCodec, TokenLogprobs};
use crate::split;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use gantry_sharding::next_token::SamplingParams;
use gantry_sharding::splitmix::SplitMix64;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// A prompt as a request gives it.
pub(crate) enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// What to generate, checked against the served model by [`start`].
#[derive(Clone)]
pub(crate) struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stop_at_eod: bool,
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
}

/// The header that makes a weighted alias sticky (as the OpenAI routes' `user` field does).
pub const ROUTE_KEY_HEADER: &str = "x-gantry-route-key";

/// A request's route key: the `X-Gantry-Route-Key` header, else `user` (the OpenAI routes'
/// field); an empty one is no key.
pub(crate) fn route_key<'a>(headers: &'a HeaderMap, user: Option<&'a str>) -> Option<&'a [u8]> {
    headers
        .get(ROUTE_KEY_HEADER)
        .map(|v| v.as_bytes())
        .or(user.map(str::as_bytes))
        .filter(|k| !k.is_empty())
}

/// The version a request is served by, loaded, and whether the request is mirrored to a
/// shadow.
pub(crate) struct Routed {
    pub served: Arc<ServedModel>,
    mirror: Option<Mirror>,
}

/// The version a request is served by: `reference` resolved (a weighted alias draws here,
/// once per request, so every choice of one request comes from the same version; from the
/// route `key`'s hash when there is one) and loaded. When the alias has a shadow and this
/// request is among the share it mirrors, the mirror is prepared here and started with the
/// request ([`Routed::start`]).
pub(crate) async fn served_version(s: &AppState, reference: &str, key: Option<&[u8]>) -> Result<Routed, ApiError> {
    let cache = s.serving.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_serving",
            "this registry was started without model serving (gantry registry serve loads models; see --help)",
        )
    })?;
    let route = s.route(parse_ref(reference)?, key).await?;
    let mirror = match (&route.alias, route.shadow) {
        (Some(alias), Some(shadow)) => {
            let percent = alias.shadow.map_or(0, |sh| sh.percent);
            // A request drawn to the shadow's own version has nothing to be compared with.
            let drawn = shadow.version != route.version.version
                && split::mirrors(percent, s.mirror_draw(&alias.model, &alias.name));
            drawn.then_some(Mirror { shadow })
        }
        _ => None,
    };
    let served = cache.get(&route.version).await.map_err(cache_error)?;
    Ok(Routed { served, mirror })
}

/// A model that cannot be loaded, as an API error.
pub(crate) fn cache_error(e: CacheError) -> ApiError {
    match e {
        CacheError::TooLarge { .. } => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "model_too_large", e.to_string())
        }
        CacheError::Load { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_unavailable", e.to_string()),
    }
}

impl Routed {
    /// [`start`] on the routed version; a mirrored request's generations (each choice) are
    /// mirrored too, once the primary is admitted, in tasks of their own that the primary
    /// never waits for.
    pub fn start(&self, s: &AppState, r: GenerationRequest) -> Result<Generation, ApiError> {
        // Only generated tokens are compared: a request that scores its prompt only is not
        // mirrored.
        let copy = self.mirror.as_ref().filter(|_| r.max_tokens > 0).map(|_| r.clone());
        let mut g = start(s, self.served.clone(), r)?;
        if let (Some(mirror), Some(copy)) = (&self.mirror, copy) {
            g.shadow = Some(shadow::spawn(s, &self.served, mirror, copy));
        }
        Ok(g)
    }
}

/// A prompt as token ids, checked against the model: encoded with its tokenizer when given as
/// text; empty becomes the end-of-document token (a new document); every id in the
/// vocabulary; no longer than the context.
pub(crate) fn prompt_tokens(prompt: &PromptInput, m: &ServedModel) -> Result<Vec<u32>, ApiError> {
    let tokens = match prompt {
        PromptInput::Tokens(t) => t.clone(),
        PromptInput::Text(text) => {
            let codec = m.codec.as_ref().ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "no_tokenizer",
                    format!(
                        "{}@{} was trained on token ids with no tokenizer; send token ids",
                        m.model, m.version
                    ),
                )
            })?;
            codec
                .encode(text)
                .map_err(|e| ApiError::bad_request(format!("cannot encode the prompt: {e}")))?
        }
    };
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

/// Checks what does not depend on the prompt: `max_tokens` (0 only when the prompt is
/// scored), the sampling parameters, the stop strings.
pub(crate) fn check_request(r: &GenerationRequest, m: &ServedModel) -> Result<(), ApiError> {
    r.sampling.validate().map_err(ApiError::bad_request)?;
    let least = usize::from(r.prompt_logprobs.is_none());
    if r.max_tokens < least || r.max_tokens > m.max_len {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between {least} and the model's context of {}, got {}",
            m.max_len, r.max_tokens
        )));
    }
    if r.stops.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop strings must not be empty"));
    }
    if !r.stops.is_empty() && m.codec.is_none() {
        return Err(ApiError::bad_request("stop strings need a model with a tokenizer"));
    }
    Ok(())
}

/// A seed for a request that gave none (returned with the answer, so it can be reproduced).
pub(crate) fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SplitMix64::new(t ^ u64::from(std::process::id())).next_u64() >> 11
}

/// Admit the request to `served`'s queue and submit it to its engine.
pub(crate) fn start(s: &AppState, served: Arc<ServedModel>, r: GenerationRequest) -> Result<Generation, ApiError> {
    submit(served, r, s.max_pending, s.serving.as_deref())
}

/// [`start`] with the queue limit given: at most `limit` requests in flight for the version,
/// else 503 `overloaded`.
pub(crate) fn submit(
    served: Arc<ServedModel>,
    r: GenerationRequest,
    limit: usize,
    cache: Option<&ModelCache>,
) -> Result<Generation, ApiError> {
    check_request(&r, &served)?;
    let admitted = served.admit(limit).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{}@{} already has {limit} requests in flight (--max-pending); retry later",
                served.model, served.version
            ),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = GenerateJob {
        prompt: r.prompt.clone(),
        max_tokens: r.max_tokens,
        sampling: r.sampling,
        stop_at_eod: r.stop_at_eod,
        logprobs: r.logprobs,
        prompt_logprobs: r.prompt_logprobs,
        events: tx,
    };
    if !served.engine.submit(job) {
        if let Some(cache) = cache {
            cache.forget(&served);
        }
        return Err(ApiError::internal(format!(
            "the generation engine of {}@{} had stopped; it is loaded again on the next request",
            served.model, served.version
        )));
    }
    Ok(Generation {
        _admitted: admitted,
        collector: Collector::new(r.stops),
        served,
        prompt: r.prompt,
        seed: r.sampling.seed,
        rx,
        started: Instant::now(),
        logprobs: Vec::new(),
        prompt_scores: None,
        wants_scores: r.prompt_logprobs.is_some(),
        pending: None,
        first_token_s: None,
        shadow: None,
    })
}

/// A generation in progress.
pub(crate) struct Generation {
    pub served: Arc<ServedModel>,
    /// Held until the request ends: counts it against the version's queue limit.
    _admitted: Admitted,
    pub prompt: Vec<u32>,
    pub seed: u64,
    rx: UnboundedReceiver<GenEvent>,
    pub collector: Collector,
    pub started: Instant,
    /// Per generated token, when asked for.
    pub logprobs: Vec<Option<TokenLogprobs>>,
    /// The prompt's tokens after the first, when asked for.
    pub prompt_scores: Option<Vec<TokenLogprobs>>,
    wants_scores: bool,
    /// An event received while waiting for the prompt's scores, for [`Generation::drive`].
    pending: Option<GenEvent>,
    pub first_token_s: Option<f64>,
    /// Where the outcome goes when this request is mirrored to a shadow.
    shadow: Option<PrimaryLink>,
}

/// How a generation ended.
pub(crate) enum Ended {
    /// `length`, `eod`, `context` or `stop`.
    Finished(&'static str),
    /// `on_token` said stop (the client went away).
    Cancelled,
    Failed(String),
}

impl Generation {
    /// Wait for the prompt's scores, when the request asked for them (they come before any
    /// token), so an answer can show the prompt before what follows it.
    pub async fn prompt_scored(&mut self) -> Result<(), String> {
        if !self.wants_scores || self.prompt_scores.is_some() || self.pending.is_some() {
            return Ok(());
        }
        match self.rx.recv().await {
            Some(GenEvent::Prompt(scored)) => {
                self.prompt_scores = Some(scored);
                Ok(())
            }
            Some(GenEvent::Failed(e)) => Err(self.failure(&e)),
            None => Err(self.failure("the generation engine stopped")),
            Some(other) => {
                self.pending = Some(other);
                Ok(())
            }
        }
    }

    /// Receive events until the generation ends; `on_token(token, new_text)` per token, which
    /// returns whether to go on.
    pub async fn drive(&mut self, mut on_token: impl FnMut(&Generation, u32, String) -> bool) -> Ended {
        loop {
            let codec = self.served.codec.as_deref();
            let event = match self.pending.take() {
                Some(e) => Some(e),
                None => self.rx.recv().await,
            };
            match event {
                Some(GenEvent::Prompt(scored)) => self.prompt_scores = Some(scored),
                Some(GenEvent::Token(t, logprobs)) => {
                    self.first_token_s
                        .get_or_insert_with(|| self.started.elapsed().as_secs_f64());
                    let new = self.collector.token(codec, t);
                    self.logprobs.push(logprobs);
                    if !on_token(self, t, new) {
                        return Ended::Cancelled;
                    }
                    if let Some(f) = self.collector.finish {
                        // Dropping the receiver (when `self` goes) frees the slot at the next step.
                        return Ended::Finished(f);
                    }
                }
                Some(GenEvent::Finished(reason)) => {
                    self.collector.finish_text(codec);
                    return Ended::Finished(reason.as_str());
                }
                Some(GenEvent::Failed(e)) => return Ended::Failed(self.failure(&e)),
                None => return Ended::Failed(self.failure("the generation engine stopped")),
            }
        }
    }

    fn failure(&self, e: &str) -> String {
        format!("{}@{}: {e}", self.served.model, self.served.version)
    }

    /// Count the outcome (`ok`, `error`, `cancelled`) on `/metrics`, and hand it to the
    /// shadow's comparison when the request is mirrored.
    pub fn record(&self, s: &AppState, outcome: &'static str) {
        if let Some(link) = &self.shadow {
            link.primary_ended(
                outcome == "ok",
                &self.collector.tokens,
                self.started.elapsed().as_secs_f64(),
            );
        }
        s.metrics.generation(GenerationOutcome {
            model: &self.served.model,
            version: self.served.version,
            outcome,
            prompt_tokens: self.prompt.len() as u64,
            tokens: self.collector.tokens.len() as u64,
            seconds: self.started.elapsed().as_secs_f64(),
            first_token_seconds: self.first_token_s,
        });
    }
}

/// Collects one generation: tokens, decoded text, stop strings.
pub(crate) struct Collector {
    stops: Vec<String>,
    pub tokens: Vec<u32>,
    /// Text sent so far (streaming) or decided so far.
    pub text: String,
    pub finish: Option<&'static str>,
}

impl Collector {
    pub fn new(stops: Vec<String>) -> Collector {
        Collector {
            stops,
            tokens: Vec::new(),
            text: String::new(),
            finish: None,
        }
    }

    /// Take one token; returns the new text it completes (empty while a character is split
    /// across tokens). Sets `finish` when a stop string appears.
    pub fn token(&mut self, codec: Option<&dyn TextCodec>, token: u32) -> String {
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
    pub fn finish_text(&mut self, codec: Option<&dyn TextCodec>) {
        if self.finish == Some("stop") {
            return;
        }
        if let Some(full) = codec.and_then(|c| c.decode(&self.tokens).ok()) {
            self.text = full;
        }
    }
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
        let mut c = Collector::new(vec!["cde".into()]);
        let pieces = feed(&mut c, "abcdcdefg");
        assert_eq!(c.finish, Some("stop"));
        assert_eq!(c.text, "abcd");
        // "c" and "cd" were held back while they could have begun "cde".
        assert_eq!(pieces, ["a", "b", "", "", "cd", "", ""]);
        assert_eq!(pieces.concat(), c.text);

        let mut c = Collector::new(vec!["xyz".into(), "bb".into()]);
        let pieces = feed(&mut c, "abab");
        assert_eq!((c.finish, pieces.concat()), (None, "aba".to_string()));
        let codec: &dyn TextCodec = &Letters;
        c.finish_text(Some(codec));
        assert_eq!(c.text, "abab", "the end flushes what was held back");
    }
}
