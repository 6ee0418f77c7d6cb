//! The registry's model loader: a registered version becomes a libtorch model with a KV cache
//! (`gantry_train::infer`) and the tokenizer saved with its checkpoint, plugged into the
//! registry's serving engine (`gantry_registry::serving`), which knows nothing of tensors.

use gantry_checkpoint::{Checkpoint, S3Options, Store, Which};
use gantry_registry::VersionRecord;
use gantry_registry::serving::{LanguageModel, LoadedModel, ModelLoader, TextCodec, TokenLogprobs};
use gantry_train::infer::KvModel;
use gantry_train::model::Model;
use gantry_train::spec::ModelSpec;
use gantry_train::weights;

/// Loads versions on `device` (weights and KV cache there; bf16 autocast and a bf16 cache on
/// a GPU) with `slots` sequences per batch.
pub struct TchLoader {
    pub slots: usize,
    pub device: gantry_train::tch::Device,
}

struct Served(KvModel);

impl LanguageModel for Served {
    fn slots(&self) -> usize {
        self.0.slots()
    }
    fn max_len(&self) -> usize {
        self.0.max_len()
    }
    fn prefill(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>, String> {
        self.0.prefill(slot, tokens).map_err(|e| e.to_string())
    }
    fn decode(&mut self, batch: &[(usize, u32)]) -> Result<Vec<Vec<f32>>, String> {
        self.0.decode(batch).map_err(|e| e.to_string())
    }
    fn release(&mut self, slot: usize) {
        self.0.release(slot)
    }
    fn prefill_scored(
        &mut self,
        slot: usize,
        tokens: &[u32],
        top: usize,
    ) -> Result<(Vec<f32>, Vec<TokenLogprobs>), String> {
        let (next, scored) = self.0.prefill_scored(slot, tokens, top).map_err(|e| e.to_string())?;
        let scored = scored
            .into_iter()
            .map(|s| TokenLogprobs {
                logprob: s.logprob,
                top: s.top,
            })
            .collect();
        Ok((next, scored))
    }
}

struct Codec(gantry_sharding::codec::TextCodec);

impl TextCodec for Codec {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.0.encode(text)
    }
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.0.decode(ids)
    }
    fn token_text(&self, id: u32) -> Option<String> {
        self.0.token_text(id)
    }
}

/// The `chat_template` of the tokenizer settings saved with a checkpoint, if any.
fn chat_template(ckpt: &Checkpoint) -> Result<Option<String>, String> {
    let Some(bytes) = weights::asset_from_checkpoint(ckpt, gantry_train::checkpointing::TOKENIZER_CONFIG_ASSET)
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("the checkpoint's tokenizer_config.json: {e}"))?;
    Ok(config.get("chat_template").and_then(|t| t.as_str()).map(str::to_string))
}

/// The model section of a version, as the trainer wrote it.
pub fn model_spec(v: &VersionRecord) -> Result<ModelSpec, String> {
    serde_json::from_value(v.model_config.clone()).map_err(|e| {
        format!(
            "{}@{}: the model section is not a gantry model spec: {e}",
            v.model, v.version
        )
    })
}

impl ModelLoader for TchLoader {
    fn load(&self, v: &VersionRecord, s3: &S3Options) -> Result<LoadedModel, String> {
        let spec = model_spec(v)?;
        let ckpt = Store::open(&v.checkpoint_url, s3)
            .and_then(|store| Checkpoint::open(&store, Which::Step(v.step)))
            .map_err(|e| e.to_string())?;
        let model = Model::whole_for_loading(&spec, 1, 0, self.device).map_err(|e| e.to_string())?;
        weights::load_from_checkpoint(&model, &ckpt).map_err(|e| e.to_string())?;
        let codec = weights::tokenizer_from_checkpoint(&ckpt)
            .map_err(|e| e.to_string())?
            .map(|bytes| gantry_sharding::codec::TextCodec::from_json_bytes(&bytes))
            .transpose()
            .map_err(|e| format!("the checkpoint's tokenizer: {e}"))?;
        let eod = codec.as_ref().and_then(|c| c.eod());
        let chat_template = chat_template(&ckpt)?;
        let kv = KvModel::new(model, self.slots, self.device).map_err(|e| e.to_string())?;
        Ok(LoadedModel {
            bytes: kv.bytes(),
            vocab_size: spec.vocab_size,
            model: Box::new(Served(kv)),
            codec: codec.map(|c| Box::new(Codec(c)) as Box<dyn TextCodec>),
            eod,
            chat_template,
        })
    }

    fn estimate_bytes(&self, v: &VersionRecord) -> Option<u64> {
        let spec = model_spec(v).ok()?;
        let cache = 2 * spec.n_layers * self.slots * spec.seq_len * spec.d_model;
        let cache_elt = gantry_train::infer::cache_kind(self.device).elt_size_in_bytes();
        Some(spec.num_params() * 4 + (cache * cache_elt) as u64)
    }
}
