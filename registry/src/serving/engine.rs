//! Continuous batching: requests wait in a queue, take a free KV-cache slot (prefill of their
//! prompt), then advance one token per step together with every other active request in one
//! batched decode. A request leaves its slot when it has its tokens, hits the end-of-document
//! token or the model's context, or when its receiver is dropped (the client went away or
//! the HTTP layer saw a stop string).
//!
//! A request may ask for log-probabilities: of each generated token (from the same logits the
//! sampler draws from, see [`super::logprobs`]) and of its prompt's own tokens (the model
//! scores them in the prefill's forward pass). A request for no new tokens (`max_tokens` 0)
//! only scores its prompt.
//!
//! [`Batcher`] is the pure state machine (a model and the requests in, events out); the
//! engine thread ([`spawn_engine`]) drives it: it blocks while idle and otherwise admits new
//! requests between steps.

use super::LanguageModel;
use super::logprobs::{TokenLogprobs, token_logprobs};
use gantry_sharding::next_token::{SamplingParams, TokenSampler};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc::UnboundedSender;

/// Why a generation ended (the HTTP layer adds `stop` for stop strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` generated.
    Length,
    /// The end-of-document token was generated (it is the last token sent).
    Eod,
    /// The sequence filled the model's context.
    Context,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eod => "eod",
            FinishReason::Context => "context",
        }
    }
}

/// What the engine sends back for one request, in order: tokens, then one end.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    /// The prompt's tokens after the first, scored (only when the job asked for them; first).
    Prompt(Vec<TokenLogprobs>),
    /// A generated token, with its log-probabilities when the job asked for them.
    Token(u32, Option<TokenLogprobs>),
    Finished(FinishReason),
    Failed(String),
}

/// One request.
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    /// 0: only score the prompt (`prompt_logprobs` must be set).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// End at the model's end-of-document token.
    pub stop_at_eod: bool,
    /// Each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// The prompt tokens' log-probabilities with this many alternatives ([`GenEvent::Prompt`]).
    pub prompt_logprobs: Option<usize>,
    pub events: UnboundedSender<GenEvent>,
}

struct Active {
    job: GenerateJob,
    last: u32,
    produced: usize,
    /// Tokens in the cache after `last` is fed (prompt + produced).
    len: usize,
    /// This request's sampler: its seed's draws, one per sampled token.
    sampler: TokenSampler,
}

/// Counters an engine keeps (read by `/metrics`).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Batched decode steps run.
    pub steps: AtomicU64,
    /// Sequences advanced by those steps (so `decoded / steps` is the mean batch size).
    pub decoded: AtomicU64,
    pub prefills: AtomicU64,
}

pub struct Batcher {
    queue: VecDeque<GenerateJob>,
    slots: Vec<Option<Active>>,
    eod: Option<u32>,
    max_len: usize,
    stats: Arc<EngineStats>,
}

impl Batcher {
    pub fn new(slots: usize, max_len: usize, eod: Option<u32>, stats: Arc<EngineStats>) -> Batcher {
        Batcher {
            queue: VecDeque::new(),
            slots: (0..slots.max(1)).map(|_| None).collect(),
            eod,
            max_len,
            stats,
        }
    }

    pub fn submit(&mut self, job: GenerateJob) {
        self.queue.push_back(job);
    }

    /// Nothing queued and nothing active.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(Option::is_none)
    }

    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// End every queued and active request with `message`.
    pub fn fail_all(&mut self, message: &str) {
        let active = self.slots.iter_mut().filter_map(Option::take).map(|a| a.job);
        for job in self.queue.drain(..).chain(active) {
            let _ = job.events.send(GenEvent::Failed(message.to_string()));
        }
    }

    /// Admit queued requests into free slots, then advance every active request by one token.
    pub fn step(&mut self, model: &mut dyn LanguageModel) {
        self.admit(model);
        self.decode(model);
    }

    /// Sample the next token of `slot` from `logits`, send it, count it, and end the request
    /// if it is done. Returns whether it goes on.
    fn emit(&mut self, slot: usize, logits: &[f32], model: &mut dyn LanguageModel) -> bool {
        let eod = self.eod;
        let max_len = self.max_len;
        let a = self.slots[slot].as_mut().expect("emit on an active slot");
        let token = a.sampler.next(logits);
        let logprobs = a.job.logprobs.and_then(|k| token_logprobs(logits, token, k));
        a.produced += 1;
        a.last = token;
        let end = if a.job.events.send(GenEvent::Token(token, logprobs)).is_err() {
            Some(None)
        } else if a.job.stop_at_eod && Some(token) == eod {
            Some(Some(FinishReason::Eod))
        } else if a.produced >= a.job.max_tokens {
            Some(Some(FinishReason::Length))
        } else if a.len >= max_len {
            Some(Some(FinishReason::Context))
        } else {
            None
        };
        match end {
            None => true,
            Some(reason) => {
                if let Some(r) = reason {
                    let _ = a.job.events.send(GenEvent::Finished(r));
                }
                self.free(slot, model);
                false
            }
        }
    }

    fn free(&mut self, slot: usize, model: &mut dyn LanguageModel) {
        self.slots[slot] = None;
        model.release(slot);
    }

    fn admit(&mut self, model: &mut dyn LanguageModel) {
        while let Some(slot) = self.slots.iter().position(Option::is_none) {
            let Some(job) = self.queue.pop_front() else { return };
            if job.events.is_closed() {
                continue;
            }
            let only_scored = job.max_tokens == 0 && job.prompt_logprobs.is_some();
            if job.prompt.is_empty() || job.prompt.len() > self.max_len || (job.max_tokens == 0 && !only_scored) {
                let _ = job.events.send(GenEvent::Failed(format!(
                    "a prompt of {} tokens with max_tokens {} does not fit a context of {}",
                    job.prompt.len(),
                    job.max_tokens,
                    self.max_len
                )));
                continue;
            }
            self.stats.prefills.fetch_add(1, Ordering::Relaxed);
            let prefilled = match job.prompt_logprobs {
                Some(top) => model.prefill_scored(slot, &job.prompt, top).map(|(logits, scored)| {
                    let _ = job.events.send(GenEvent::Prompt(scored));
                    logits
                }),
                None => model.prefill(slot, &job.prompt),
            };
            match prefilled {
                Ok(_) if only_scored => {
                    model.release(slot);
                    let _ = job.events.send(GenEvent::Finished(FinishReason::Length));
                }
                Ok(logits) => {
                    let len = job.prompt.len();
                    self.slots[slot] = Some(Active {
                        sampler: TokenSampler::new(job.sampling),
                        job,
                        last: 0,
                        produced: 0,
                        len,
                    });
                    self.emit(slot, &logits, model);
                }
                Err(e) => {
                    model.release(slot);
                    let _ = job.events.send(GenEvent::Failed(format!("prefill: {e}")));
                }
            }
        }
    }

    fn decode(&mut self, model: &mut dyn LanguageModel) {
        let batch: Vec<(usize, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|a| (i, a.last)))
            .collect();
        if batch.is_empty() {
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.decoded.fetch_add(batch.len() as u64, Ordering::Relaxed);
        match model.decode(&batch) {
            Ok(all) if all.len() == batch.len() => {
                for (&(slot, _), logits) in batch.iter().zip(&all) {
                    self.slots[slot].as_mut().expect("batched slot is active").len += 1;
                    self.emit(slot, logits, model);
                }
            }
            outcome => {
                let message = match outcome {
                    Err(e) => format!("decode: {e}"),
                    Ok(all) => format!("decode returned {} results for {} sequences", all.len(), batch.len()),
                };
                for &(slot, _) in &batch {
                    if let Some(a) = self.slots[slot].as_ref() {
                        let _ = a.job.events.send(GenEvent::Failed(message.clone()));
                    }
                    self.free(slot, model);
                }
            }
        }
    }
}

/// A running engine: send jobs; it stops when every handle is dropped and its work is done.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: std::sync::mpsc::Sender<GenerateJob>,
    pub stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Queue a job; `false` if the engine has stopped (its model failed to keep running).
    pub fn submit(&self, job: GenerateJob) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// Start the engine thread for `model`.
pub fn spawn_engine(
    mut model: Box<dyn LanguageModel>,
    eod: Option<u32>,
    name: String,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = std::sync::mpsc::channel::<GenerateJob>();
    let stats = Arc::new(EngineStats::default());
    let mut batcher = Batcher::new(model.slots(), model.max_len(), eod, stats.clone());
    std::thread::Builder::new()
        .name(format!("engine {name}"))
        .spawn(move || {
            loop {
                if batcher.is_idle() {
                    match rx.recv() {
                        Ok(job) => batcher.submit(job),
                        Err(_) => break,
                    }
                }
                while let Ok(job) = rx.try_recv() {
                    batcher.submit(job);
                }
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batcher.step(model.as_mut())));
                if let Err(panic) = stepped {
                    // The model's state is unknown after a panic: fail what is here and stop;
                    // the cache loads the version afresh for the next request.
                    let what = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    tracing::error!(model = %name, panic = what, "the generation engine failed");
                    batcher.fail_all(&format!("the model failed: {what}"));
                    break;
                }
            }
            tracing::info!(model = %name, "generation engine stopped");
        })?;
    Ok(EngineHandle { jobs: tx, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_sharding::next_token::SamplingParams;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    /// A model whose next token is (sum of the sequence's tokens + 1) mod `vocab`, greedy, and
    /// which records every call so tests can see how requests were batched.
    struct Counting {
        slots: usize,
        max_len: usize,
        vocab: usize,
        sums: Vec<Option<u64>>,
        calls: Vec<String>,
    }

    impl Counting {
        fn new(slots: usize, max_len: usize) -> Counting {
            Counting {
                slots,
                max_len,
                vocab: 50,
                sums: vec![None; slots],
                calls: Vec::new(),
            }
        }
        fn logits(&self, sum: u64) -> Vec<f32> {
            let mut l = vec![0.0; self.vocab];
            l[((sum + 1) % self.vocab as u64) as usize] = 1.0;
            l
        }
    }

    impl LanguageModel for Counting {
        fn slots(&self) -> usize {
            self.slots
        }
        fn max_len(&self) -> usize {
            self.max_len
        }
        fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>, String> {
            assert!(self.sums[slot].is_none(), "slot {slot} reused before release");
            let sum = tokens.iter().map(|&t| u64::from(t)).sum();
            self.sums[slot] = Some(sum);
            self.calls.push(format!("prefill {slot}"));
            Ok(self.logits(sum))
        }
        fn decode(&mut self, batch: &[(usize, u32)]) -> Result<Vec<Vec<f32>>, String> {
            self.calls.push(format!("decode {}", batch.len()));
            batch
                .iter()
                .map(|&(slot, t)| {
                    let s = self.sums[slot].as_mut().ok_or("decode of a free slot")?;
                    *s += u64::from(t);
                    let sum = *s;
                    Ok(self.logits(sum))
                })
                .collect()
        }
        fn release(&mut self, slot: usize) {
            self.sums[slot] = None;
        }
        fn prefill_scored(
            &mut self,
            slot: usize,
            tokens: &[u32],
            top: usize,
        ) -> Result<(Vec<f32>, Vec<TokenLogprobs>), String> {
            let scored = (1..tokens.len())
                .map(|i| {
                    let sum = tokens[..i].iter().map(|&t| u64::from(t)).sum();
                    token_logprobs(&self.logits(sum), tokens[i], top).unwrap()
                })
                .collect();
            Ok((self.prefill(slot, tokens)?, scored))
        }
    }

    fn job(prompt: &[u32], max_tokens: usize) -> (GenerateJob, UnboundedReceiver<GenEvent>) {
        let (tx, rx) = unbounded_channel();
        let sampling = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        (
            GenerateJob {
                prompt: prompt.to_vec(),
                max_tokens,
                sampling,
                stop_at_eod: true,
                logprobs: None,
                prompt_logprobs: None,
                events: tx,
            },
            rx,
        )
    }

    fn drain(rx: &mut UnboundedReceiver<GenEvent>) -> Vec<GenEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// What `Counting` generates after `prompt`, greedy, `n` tokens.
    fn expected(prompt: &[u32], n: usize) -> Vec<GenEvent> {
        let mut sum: u64 = prompt.iter().map(|&t| u64::from(t)).sum();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = ((sum + 1) % 50) as u32;
            out.push(GenEvent::Token(t, None));
            sum += u64::from(t);
        }
        out
    }

    fn run(b: &mut Batcher, m: &mut Counting) {
        let mut guard = 0;
        while !b.is_idle() {
            b.step(m);
            guard += 1;
            assert!(guard < 1000, "the batcher never went idle");
        }
    }

    #[test]
    fn concurrent_requests_share_decode_steps_and_get_their_own_tokens() {
        let mut m = Counting::new(4, 64);
        let mut b = Batcher::new(4, 64, None, Arc::default());
        let prompts: [&[u32]; 3] = [&[1, 2], &[7], &[3, 3, 3]];
        let mut rxs = Vec::new();
        for p in prompts {
            let (j, rx) = job(p, 5);
            b.submit(j);
            rxs.push(rx);
        }
        run(&mut b, &mut m);
        for (p, rx) in prompts.iter().zip(&mut rxs) {
            let mut want = expected(p, 5);
            want.push(GenEvent::Finished(FinishReason::Length));
            assert_eq!(drain(rx), want);
        }
        // Three prefills, then four decode steps of all three sequences together.
        assert_eq!(
            m.calls,
            [
                "prefill 0",
                "prefill 1",
                "prefill 2",
                "decode 3",
                "decode 3",
                "decode 3",
                "decode 3"
            ]
        );
        assert_eq!(b.stats.decoded.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn requests_beyond_the_slots_wait_and_reuse_freed_slots() {
        let mut m = Counting::new(2, 64);
        let mut b = Batcher::new(2, 64, None, Arc::default());
        let mut rxs = Vec::new();
        for (i, n) in [2, 6, 3].into_iter().enumerate() {
            let (j, rx) = job(&[i as u32 + 1], n);
            b.submit(j);
            rxs.push((i as u32 + 1, n, rx));
        }
        // Two slots: the third request waits; the first (2 tokens) finishes in this step.
        b.step(&mut m);
        assert_eq!((b.active(), b.queued()), (1, 1));
        b.step(&mut m);
        assert_eq!((b.active(), b.queued()), (2, 0));
        run(&mut b, &mut m);
        for (p, n, rx) in &mut rxs {
            let mut want = expected(&[*p], *n);
            want.push(GenEvent::Finished(FinishReason::Length));
            assert_eq!(drain(rx), want, "prompt {p}");
        }
        assert!(
            m.calls.contains(&"prefill 0".to_string())
                && m.calls.iter().filter(|c| c.starts_with("prefill")).count() == 3
        );
    }

    #[test]
    fn eod_context_cancel_and_bad_jobs_end_requests() {
        // EOD: prompt [9] → 10 is the first token; with eod = 10 it ends there.
        let mut m = Counting::new(2, 8);
        let mut b = Batcher::new(2, 8, Some(10), Arc::default());
        let (j, mut eod_rx) = job(&[9], 5);
        b.submit(j);
        run(&mut b, &mut m);
        assert_eq!(
            drain(&mut eod_rx),
            [GenEvent::Token(10, None), GenEvent::Finished(FinishReason::Eod)]
        );
        // Context: a 6-token prompt in a context of 8 gets 3 tokens (positions 6, 7, then full).
        let (j, mut ctx_rx) = job(&[0; 6], 100);
        b.submit(j);
        run(&mut b, &mut m);
        let got = drain(&mut ctx_rx);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got.last(), Some(&GenEvent::Finished(FinishReason::Context)));
        // A dropped receiver frees the slot at the next step.
        let (j, rx) = job(&[1], 50);
        b.submit(j);
        b.step(&mut m);
        assert_eq!(b.active(), 1);
        drop(rx);
        b.step(&mut m);
        assert!(b.is_idle());
        assert!(m.sums.iter().all(Option::is_none), "released");
        // Prompts that do not fit, or no tokens asked for.
        for (prompt, n) in [(vec![], 3), (vec![1; 9], 3), (vec![1], 0)] {
            let (j, mut rx) = job(&prompt, n);
            b.submit(j);
            run(&mut b, &mut m);
            assert!(
                matches!(drain(&mut rx).as_slice(), [GenEvent::Failed(_)]),
                "{prompt:?} {n}"
            );
        }
    }

    #[test]
    fn log_probabilities_of_the_prompt_and_of_each_generated_token() {
        let mut m = Counting::new(2, 64);
        let mut b = Batcher::new(2, 64, None, Arc::default());
        // Counting puts logit 1 on (sum + 1) and 0 elsewhere over 50 tokens.
        let (high, low) = (1.0 - (1f64.exp() + 49.0).ln(), -(1f64.exp() + 49.0).ln());
        let (mut j, mut rx) = job(&[1, 2, 9], 2);
        (j.logprobs, j.prompt_logprobs) = (Some(2), Some(1));
        b.submit(j);
        run(&mut b, &mut m);
        let events = drain(&mut rx);
        let GenEvent::Prompt(scored) = &events[0] else {
            panic!("{events:?}")
        };
        // Token 2 after [1] is the likely one (sum 1 + 1); 9 after [1, 2] is not.
        assert_eq!(scored.len(), 2);
        assert!((scored[0].logprob as f64 - high).abs() < 1e-6 && scored[0].top[0].0 == 2);
        assert!((scored[1].logprob as f64 - low).abs() < 1e-6 && scored[1].top[0].0 == 4);
        let GenEvent::Token(13, Some(first)) = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(first.top.iter().map(|t| t.0).collect::<Vec<_>>(), [13, 0]);
        assert!(matches!(events[2], GenEvent::Token(26, Some(_))));
        assert_eq!(events[3], GenEvent::Finished(FinishReason::Length));
        // max_tokens 0: the prompt is scored, nothing is generated, the slot is free again.
        let (mut j, mut rx) = job(&[3, 4], 0);
        j.prompt_logprobs = Some(0);
        b.submit(j);
        run(&mut b, &mut m);
        let events = drain(&mut rx);
        assert!(
            matches!(events.as_slice(), [GenEvent::Prompt(p), GenEvent::Finished(FinishReason::Length)] if p.len() == 1 && p[0].top.is_empty()),
            "{events:?}"
        );
        assert!(m.sums.iter().all(Option::is_none));
    }

    /// Panics on its first decode.
    struct Failing(Counting);

    impl LanguageModel for Failing {
        fn slots(&self) -> usize {
            self.0.slots()
        }
        fn max_len(&self) -> usize {
            self.0.max_len()
        }
        fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>, String> {
            self.0.prefill(slot, tokens)
        }
        fn decode(&mut self, _: &[(usize, u32)]) -> Result<Vec<Vec<f32>>, String> {
            panic!("kernel exploded")
        }
        fn release(&mut self, slot: usize) {
            self.0.release(slot)
        }
    }

    #[test]
    fn a_panicking_model_fails_its_requests_and_stops_the_engine() {
        let engine = spawn_engine(Box::new(Failing(Counting::new(2, 64))), None, "failing".into()).unwrap();
        let (j, mut rx) = job(&[1], 5);
        assert!(engine.submit(j));
        let mut events = Vec::new();
        while let Some(e) = rx.blocking_recv() {
            events.push(e);
        }
        assert!(
            matches!(events.as_slice(), [GenEvent::Token(..), GenEvent::Failed(m)] if m.contains("kernel exploded")),
            "{events:?}"
        );
        // The thread has gone: new work is refused, so the caller can reload the model.
        let refused = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !engine.submit(job(&[1], 1).0)
        });
        assert!(refused);
    }

    #[test]
    fn the_engine_thread_serves_and_stops_when_its_handles_go() {
        let engine = spawn_engine(Box::new(Counting::new(2, 64)), None, "test".into()).unwrap();
        let mut rxs = Vec::new();
        for p in 1..=4u32 {
            let (j, rx) = job(&[p], 4);
            assert!(engine.submit(j));
            rxs.push((p, rx));
        }
        for (p, rx) in &mut rxs {
            let mut got = Vec::new();
            while let Some(e) = rx.blocking_recv() {
                let end = !matches!(e, GenEvent::Token(..));
                got.push(e);
                if end {
                    break;
                }
            }
            let mut want = expected(&[*p], 4);
            want.push(GenEvent::Finished(FinishReason::Length));
            assert_eq!(got, want);
        }
        drop(engine);
    }
}
