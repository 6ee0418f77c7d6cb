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
pub mod logprobs;

use crate::model::VersionRecord;
pub use logprobs::TokenLogprobs;

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
    /// [`LanguageModel::prefill`], and for each prompt token after the first its
    /// log-probability given the tokens before it, with the `top` most likely tokens at that
    /// position (`tokens.len() - 1` entries): what the OpenAI API's `echo` reports. Computed
    /// by the same forward pass as the prefill, so scoring a prompt costs no second pass.
    fn prefill_scored(
        &mut self,
        slot: usize,
        tokens: &[u32],
        top: usize,
    ) -> Result<(Vec<f32>, Vec<TokenLogprobs>), String> {
        let _ = (slot, tokens, top);
        Err("this model cannot score prompt tokens".into())
    }
}

/// Text ↔ token ids, with the tokenizer the model was trained with.
pub trait TextCodec: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
    /// A token as the vocabulary writes it (`<|endoftext|>` for a special token), for chat
    /// templates' `bos_token` / `eos_token`.
    fn token_text(&self, id: u32) -> Option<String> {
        let _ = id;
        None
    }
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
    /// The chat template saved with the model's tokenizer (a Jinja template, as in Hugging
    /// Face's `tokenizer_config.json`), for `/v1/chat/completions`.
    pub chat_template: Option<String>,
}

/// Makes [`LoadedModel`]s. Called on a blocking thread; may take seconds.
pub trait ModelLoader: Send + Sync {
    fn load(&self, version: &VersionRecord, s3: &gantry_checkpoint::S3Options) -> Result<LoadedModel, String>;
    /// What the loader would need for `version` before loading it, to refuse a model that
    /// cannot fit under the cache limit without evicting anything for nothing.
    fn estimate_bytes(&self, version: &VersionRecord) -> Option<u64>;
}
