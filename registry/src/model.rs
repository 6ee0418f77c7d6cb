//! The registry's records, as stored (JSON values in redb) and as an API would return them.
//! Plain data: every rule about them lives in [`crate::store`], [`crate::name`] and
//! [`crate::split`].

use serde::{Deserialize, Serialize};

/// A named model: a sequence of immutable versions plus its aliases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    /// Milliseconds since the Unix epoch when its first version was registered.
    pub created_ms: u64,
    #[serde(default)]
    pub description: String,
}

/// One immutable version of a model: a verified, committed checkpoint and what it was
/// trained from. Only `evals` grows after registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub model: String,
    /// 1, 2, 3, ... per model, in registration order.
    pub version: u32,
    pub created_ms: u64,
    /// The checkpoint root as given at registration (without a trailing `/`).
    pub checkpoint_url: String,
    /// The checkpoint's step (its optimizer step).
    pub step: u64,
    pub tokens_seen: u64,
    /// The manifest's `model` section: what the tensors mean.
    pub model_config: serde_json::Value,
    /// The manifest's `layout` (dp, tp, pp, zero1, ...).
    pub layout: serde_json::Value,
    /// The data sampler's position after `step` steps.
    pub data_cursor: serde_json::Value,
    /// The manifest's `lineage` (`job_id`, `spec_hash` of the job spec, `gantry_version`)
    /// plus `world_size`, `attempt` and `committed_at` of the commit.
    pub lineage: serde_json::Value,
    /// xxh3 (16 hex digits) of the canonical JSON (keys sorted) of the manifest's `model`,
    /// `layout` and `optimizer` sections: equal for two versions whose tensors mean the same
    /// thing and are laid out the same way, whatever job produced them.
    pub spec_hash: String,
    /// Total bytes of the checkpoint's chunk objects.
    pub bytes: u64,
    /// Distinct tensors in the checkpoint.
    pub tensors: usize,
    /// What the model was trained on (the manifest's `data`: dataset path, validation
    /// fraction and seed, tokenizer kind), so an evaluation can pick the same split.
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub evals: Vec<EvalRecord>,
}

/// One evaluation of a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub at_ms: u64,
    pub dataset: String,
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens evaluated.
    pub tokens: u64,
    /// Tensor parallelism the evaluation ran with.
    pub tp: u32,
    #[serde(default)]
    pub note: String,
}

/// A movable name for versions of one model. One target with weight 1 is a plain alias;
/// several targets split traffic by weight (see [`crate::split`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub model: String,
    pub name: String,
    /// `(version, weight)`, every weight > 0, each version at most once.
    pub targets: Vec<(u32, u32)>,
    /// When it was last set.
    pub updated_ms: u64,
    /// A version that a share of the alias's generation requests is mirrored to (absent in
    /// databases written before shadows existed: none).
    #[serde(default)]
    pub shadow: Option<Shadow>,
}

/// Shadow traffic: `percent` (1..=100) of an alias's generation requests are also sent to
/// `version`, whose answers are compared with the primary's and counted, never returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    pub version: u32,
    pub percent: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_stored_before_shadows_existed_still_read() {
        let old = r#"{"model":"gpt","name":"prod","targets":[[3,90],[4,10]],"updated_ms":7}"#;
        let a: Alias = serde_json::from_str(old).unwrap();
        assert_eq!((a.targets, a.shadow), (vec![(3, 90), (4, 10)], None));
        let new =
            r#"{"model":"gpt","name":"prod","targets":[[3,1]],"updated_ms":7,"shadow":{"version":4,"percent":10}}"#;
        let a: Alias = serde_json::from_str(new).unwrap();
        assert_eq!(
            a.shadow,
            Some(Shadow {
                version: 4,
                percent: 10
            })
        );
    }
}
