//! Shadow traffic: an alias with a shadow (`{"version", "percent"}`) mirrors that share of its
//! generation requests to the shadow version, compares the two answers and counts the
//! comparison on `/metrics`; the client only ever gets the primary's answer.
//!
//! - **Which requests**: a per-alias counter drawn through [`crate::split::mirrors`], so the
//!   share is exact over every 100 eligible requests (those drawn to a version other than the
//!   shadow itself that generate at least one token). Every choice of a mirrored request is
//!   mirrored and compared with its own primary.
//! - **The mirror**: the same prompt token ids, `max_tokens`, sampling and seed, stop strings
//!   and `stop_at_eod`, started in a task of its own once the primary is admitted; the
//!   primary never waits for it (not for its answer, not for its load, not for its stream).
//! - **Dropped first under load**: the mirror is admitted only while the shadow version has
//!   fewer than half of `--max-pending` requests in flight, and only when the shadow version
//!   is loaded already (otherwise a load is started in the background and the mirror is
//!   dropped, like every one until the load is done). Dropped mirrors are counted.
//! - **Comparison** ([`compare`]), once both have ended: `agree` when the token sequences are
//!   equal, else `differ`, and for greedy requests (temperature 0) the first position where
//!   they part; `error` when the shadow failed (or could not take the prompt); `no_primary`
//!   when the primary did not finish (failed, cancelled), leaving nothing to compare with.
//!
//! Versions of one model share a tokenizer in practice; a shadow trained with another one
//! gets token ids that mean something else to it, and its answers count as `differ`.

use super::generation::{GenerationRequest, PromptInput, prompt_tokens, submit};
use super::metrics::{ServiceMetrics, ShadowOutcome};
use super::routes::AppState;
use crate::model::VersionRecord;
use crate::serving::cache::{ModelCache, ServedModel};
use axum::http::StatusCode;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The shadow version a request is mirrored to.
pub(crate) struct Mirror {
    pub shadow: VersionRecord,
}

/// How the primary ended, for the comparison.
struct PrimaryEnd {
    ok: bool,
    tokens: Vec<u32>,
    seconds: f64,
}

/// The primary's side of a mirrored request: it reports its end here once (a request that
/// never reports, dropped on an error path, reads as not finished).
pub(crate) struct PrimaryLink(Mutex<Option<oneshot::Sender<PrimaryEnd>>>);

impl PrimaryLink {
    pub fn primary_ended(&self, ok: bool, tokens: &[u32], seconds: f64) {
        let sender = self.0.lock().map(|mut s| s.take()).unwrap_or(None);
        if let Some(tx) = sender {
            // The mirror may have been dropped already; then nobody is waiting.
            let _ = tx.send(PrimaryEnd {
                ok,
                tokens: tokens.to_vec(),
                seconds,
            });
        }
    }
}

/// How two token sequences compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Agree,
    /// `at`: the first position where they differ (the shorter one's length when it is a
    /// prefix of the other).
    Differ {
        at: usize,
    },
}

pub fn compare(primary: &[u32], shadow: &[u32]) -> Verdict {
    match primary.iter().zip(shadow).position(|(a, b)| a != b) {
        Some(at) => Verdict::Differ { at },
        None if primary.len() == shadow.len() => Verdict::Agree,
        None => Verdict::Differ {
            at: primary.len().min(shadow.len()),
        },
    }
}

/// What the mirror task needs from the service (it outlives the request's handler).
struct Context {
    cache: Option<Arc<ModelCache>>,
    metrics: Arc<ServiceMetrics>,
    /// The shadow's queue limit: half of `--max-pending`.
    limit: usize,
    model: String,
    primary_version: u32,
    greedy: bool,
}

/// Start mirroring `request` (already admitted on `primary`) to `mirror`'s version; the
/// returned link takes the primary's outcome.
pub(crate) fn spawn(s: &AppState, primary: &ServedModel, mirror: &Mirror, request: GenerationRequest) -> PrimaryLink {
    let (tx, rx) = oneshot::channel();
    let ctx = Context {
        cache: s.serving.clone(),
        metrics: s.metrics.clone(),
        limit: s.max_pending / 2,
        model: primary.model.clone(),
        primary_version: primary.version,
        greedy: request.sampling.temperature == 0.0,
    };
    let shadow = mirror.shadow.clone();
    tokio::spawn(async move {
        let c = run(&ctx, &shadow, request, rx).await;
        ctx.metrics.shadow(ShadowOutcome {
            model: &ctx.model,
            version: ctx.primary_version,
            shadow_version: shadow.version,
            outcome: c.outcome,
            shadow_seconds: c.shadow_seconds,
            primary_seconds: c.primary_seconds,
            first_difference: c.first_difference,
        });
    });
    PrimaryLink(Mutex::new(Some(tx)))
}

/// A mirror's outcome, as counted.
struct Compared {
    outcome: &'static str,
    shadow_seconds: Option<f64>,
    primary_seconds: Option<f64>,
    first_difference: Option<usize>,
}

fn counted(outcome: &'static str) -> Compared {
    Compared {
        outcome,
        shadow_seconds: None,
        primary_seconds: None,
        first_difference: None,
    }
}

/// The mirror's whole life.
async fn run(
    ctx: &Context,
    shadow: &VersionRecord,
    mut request: GenerationRequest,
    primary: oneshot::Receiver<PrimaryEnd>,
) -> Compared {
    let Some(cache) = &ctx.cache else {
        return counted("dropped");
    };
    let Some(served) = cache.loaded_now(shadow) else {
        if !cache.is_loading(shadow) {
            warm(cache.clone(), shadow.clone());
        }
        return counted("dropped");
    };
    // The shadow may have a smaller vocabulary or context than the primary.
    if prompt_tokens(&PromptInput::Tokens(request.prompt.clone()), &served).is_err() {
        return counted("error");
    }
    request.logprobs = None;
    request.prompt_logprobs = None;
    let mut g = match submit(served, request, ctx.limit, Some(cache)) {
        Ok(g) => g,
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => return counted("dropped"),
        Err(_) => return counted("error"),
    };
    let ended = g.drive(|_, _, _| true).await;
    let shadow_seconds = Some(g.started.elapsed().as_secs_f64());
    let failed = !matches!(ended, super::generation::Ended::Finished(_));
    // Release the shadow's slot before waiting for the primary.
    let tokens = std::mem::take(&mut g.collector.tokens);
    drop(g);
    let (outcome, primary_seconds, first_difference) = match primary.await {
        Ok(p) if p.ok && failed => ("error", Some(p.seconds), None),
        Ok(p) if p.ok => match compare(&p.tokens, &tokens) {
            Verdict::Agree => ("agree", Some(p.seconds), None),
            Verdict::Differ { at } => ("differ", Some(p.seconds), ctx.greedy.then_some(at)),
        },
        _ if failed => ("error", None, None),
        _ => ("no_primary", None, None),
    };
    Compared {
        outcome,
        shadow_seconds,
        primary_seconds,
        first_difference,
    }
}

/// Load the shadow version in the background; mirrors are dropped until it is in.
fn warm(cache: Arc<ModelCache>, shadow: VersionRecord) {
    tokio::spawn(async move {
        if let Err(e) = cache.get(&shadow).await {
            tracing::warn!(error = %e, "cannot load the shadow version; its mirrors are dropped");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_name_the_first_difference() {
        assert_eq!(compare(&[1, 2, 3], &[1, 2, 3]), Verdict::Agree);
        assert_eq!(compare(&[], &[]), Verdict::Agree);
        assert_eq!(compare(&[1, 2, 3], &[1, 5, 3]), Verdict::Differ { at: 1 });
        assert_eq!(compare(&[9], &[1, 2]), Verdict::Differ { at: 0 });
        // One stopped early (its end-of-document token or a stop string came sooner).
        assert_eq!(compare(&[1, 2], &[1, 2, 3]), Verdict::Differ { at: 2 });
        assert_eq!(compare(&[1, 2, 3], &[1, 2]), Verdict::Differ { at: 2 });
    }

    #[test]
    fn the_primary_reports_once_and_a_silent_primary_reads_as_not_finished() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (tx, rx) = oneshot::channel();
        let link = PrimaryLink(Mutex::new(Some(tx)));
        link.primary_ended(true, &[4, 5], 0.5);
        link.primary_ended(false, &[], 0.0); // a second report is ignored
        let got = rt.block_on(rx).unwrap();
        assert_eq!((got.ok, got.tokens, got.seconds), (true, vec![4, 5], 0.5));
        let (tx, rx) = oneshot::channel::<PrimaryEnd>();
        drop(PrimaryLink(Mutex::new(Some(tx))));
        assert!(rt.block_on(rx).is_err());
    }
}
