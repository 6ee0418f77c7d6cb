//! Serving registered versions: text generation with a KV cache, concurrent requests batched.
//!
//! The registry does not know how a model computes; the binary that runs the service plugs
//! that in through two traits ([`ModelLoader`] makes a [`LoadedModel`] from a version, whose
//! [`LanguageModel`] prefills and decodes slots of a KV cache). Everything else lives here:
//! - sampling: `gantry_sharding::next_token` (temperature / top-p / seeded draws, pure; the
//!   same sampler as training's end-of-run samples), one `TokenSampler` per request;
//! - [`engine`]: the continuous-batching state machine and its thread;
//! - [`cache`]: loaded versions kept in memory under a byte limit, least recently used
//!   evicted, one load per version however many requests ask at once.

pub mod cache;
pub mod engine;

use crate::model::VersionRecord;

/// A model with a KV cache of [`LanguageModel::slots`] sequences, used by one engine thread.
pub trait LanguageModel: Send {
    /// Sequences that can be generated at once.
    fn slots(&self) -> usize;
    /// The longest sequence (prompt + generated) the model can attend over.
    fn max_len(&self) -> usize;
    /// Start a sequence in `slot` from `tokens`; the logits of the next token.
    fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>, String>;
    /// Feed one token to each `(slot, token)`; each slot's next logits, in order.
    fn decode(&mut self, batch: &[(usize, u32)]) -> Result<Vec<Vec<f32>>, String>;
    /// Forget a slot's sequence.
    fn release(&mut self, slot: usize);
}

/// Text ↔ token ids, with the tokenizer the model was trained with.
pub trait TextCodec: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
}

/// A version ready to serve.
pub struct LoadedModel {
    pub model: Box<dyn LanguageModel>,
    /// `None` for models trained on token ids with no text behind them.
    pub codec: Option<Box<dyn TextCodec>>,
    /// The end-of-document token, where generation stops.
    pub eod: Option<u32>,
    /// Memory the loaded model holds (weights and cache), for the cache's limit.
    pub bytes: u64,
    pub vocab_size: usize,
}

/// Makes [`LoadedModel`]s. Called on a blocking thread; may take seconds.
pub trait ModelLoader: Send + Sync {
    fn load(&self, version: &VersionRecord, s3: &gantry_checkpoint::S3Options) -> Result<LoadedModel, String>;
    /// What the loader would need for `version` before loading it, to refuse a model that
    /// cannot fit under the cache limit without evicting anything for nothing.
    fn estimate_bytes(&self, version: &VersionRecord) -> Option<u64>;
}
