//! The `[model]` section: architecture and sizes, and the rules that involve only them.

use super::{Factors, MAX_NUMEL, SpecError, checked_product, invalid};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Learned positions, LayerNorm, GELU (tanh), biases.
    Gpt2,
    /// RMSNorm, rotary positions, SwiGLU, no biases.
    Llama,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Vocabulary size; 0 = the dataset's, padded up to a multiple of `vocab_multiple`.
    pub vocab_size: usize,
    /// Padding multiple for the vocabulary. Independent of the TP degree on purpose: a padded
    /// size that changed with the layout would change the model and its losses.
    pub vocab_multiple: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// MLP hidden size; 0 = 4·d (gpt2) or 8/3·d rounded up to a multiple of 64 (llama).
    pub ffn_hidden: usize,
    pub seq_len: usize,
    pub tie_embeddings: bool,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub init_std: f64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            arch: Arch::Gpt2,
            vocab_size: 0,
            vocab_multiple: 128,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            ffn_hidden: 0,
            seq_len: 128,
            tie_embeddings: true,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            init_std: 0.02,
        }
    }
}

impl ModelSpec {
    /// Saturates instead of overflowing; `validate` refuses the sizes where that matters.
    pub fn ffn(&self) -> usize {
        match (self.ffn_hidden, self.arch) {
            (0, Arch::Gpt2) => self.d_model.saturating_mul(4),
            (0, Arch::Llama) => (self.d_model.saturating_mul(8) / 3).div_ceil(64).saturating_mul(64),
            (n, _) => n,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// The rules of the sizes alone: every size at least 1, heads that divide the width, a
    /// resolved vocabulary, and every weight's element count within libtorch's `i64`. What
    /// depends on the TP degree or the batch is [`JobSpec::validate`](super::JobSpec::validate)'s.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, v) in [
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.seq_len", self.seq_len),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(invalid(
                "model.d_model",
                format!("d_model {} is not divisible by n_heads {}", self.d_model, self.n_heads),
            ));
        }
        if self.arch == Arch::Llama && !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "model.d_model",
                "llama needs an even head dimension for rotary positions",
            ));
        }
        if self.vocab_size == 0 {
            return Err(invalid("model.vocab_size", "not resolved (0 means: from the dataset)"));
        }
        self.validate_sizes()
    }

    /// Every weight's element count within libtorch's `i64`, the parameter count within a `u64`.
    fn validate_sizes(&self) -> Result<(), SpecError> {
        if self.ffn_hidden == 0 && self.d_model > usize::MAX / 8 {
            return Err(invalid(
                "model.d_model",
                format!("d_model {} is too large to derive ffn_hidden from", self.d_model),
            ));
        }
        let (d, v, f, s) = (
            self.d_model as u64,
            self.vocab_size as u64,
            self.ffn() as u64,
            self.seq_len as u64,
        );
        #[rustfmt::skip]
        let weights: [(&'static str, &str, Factors); 4] = [
            ("model.vocab_size", "the token embedding", &[("vocab_size", v), ("d_model", d)]),
            ("model.seq_len", "the positions", &[("seq_len", s), ("d_model", d)]),
            ("model.d_model", "the QKV weight", &[("3", 3), ("d_model", d), ("d_model", d)]),
            ("model.ffn_hidden", "the MLP weight", &[("2", 2), ("ffn_hidden", f), ("d_model", d)]),
        ];
        for (field, what, factors) in weights {
            checked_product(field, what, factors, MAX_NUMEL)?;
        }
        if self.param_count().is_none() {
            return Err(invalid(
                "model",
                format!(
                    "the parameter count of n_layers {} × d_model {} (ffn_hidden {}, vocab_size {}) overflows a u64",
                    self.n_layers, self.d_model, f, self.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Parameter count of the global model (tied embeddings counted once); `u64::MAX` when
    /// it overflows (which `validate` refuses).
    pub fn num_params(&self) -> u64 {
        self.param_count().unwrap_or(u64::MAX)
    }

    /// Parameter count of the global model, `None` when it overflows a `u64`.
    pub fn param_count(&self) -> Option<u64> {
        let (d, v, f, l) = (
            self.d_model as u64,
            self.vocab_size as u64,
            self.ffn() as u64,
            self.n_layers as u64,
        );
        let gpt = self.arch == Arch::Gpt2;
        let (dd, df) = (d.checked_mul(d)?, d.checked_mul(f)?);
        let per_layer = if gpt {
            // QKV and out weights and biases, fc and proj weights and biases, two norms.
            checked_sum([dd.checked_mul(4)?, df.checked_mul(2)?, f, d.checked_mul(9)?])?
        } else {
            checked_sum([dd.checked_mul(4)?, df.checked_mul(3)?, d.checked_mul(2)?])?
        };
        let embed = v.checked_mul(d)?;
        let pos = if gpt { (self.seq_len as u64).checked_mul(d)? } else { 0 };
        let final_norm = if gpt { d.checked_mul(2)? } else { d };
        let head = if self.tie_embeddings { 0 } else { embed };
        checked_sum([embed, pos, l.checked_mul(per_layer)?, final_norm, head])
    }

    /// Training FLOPs per token as in the MFU formula: 6·N + 12·L·d·T (N without the
    /// position embedding).
    pub fn flops_per_token(&self) -> f64 {
        let (l, d, t) = (self.n_layers as f64, self.d_model as f64, self.seq_len as f64);
        let pos = match self.arch {
            Arch::Gpt2 => t * d,
            Arch::Llama => 0.0,
        };
        6.0 * (self.num_params() as f64 - pos) + 12.0 * l * d * t
    }
}

fn checked_sum(terms: impl IntoIterator<Item = u64>) -> Option<u64> {
    terms.into_iter().try_fold(0u64, u64::checked_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::invalid_field as field;

    #[test]
    fn the_model_section_refuses_its_own_sizes() {
        let ok = ModelSpec {
            vocab_size: 512,
            ..ModelSpec::default()
        };
        ok.validate().unwrap();
        for (model, want) in [
            (
                ModelSpec {
                    n_heads: 0,
                    ..ok.clone()
                },
                "model.n_heads",
            ),
            (
                ModelSpec {
                    n_heads: 3,
                    ..ok.clone()
                },
                "model.d_model",
            ),
            (
                ModelSpec {
                    vocab_size: 0,
                    ..ok.clone()
                },
                "model.vocab_size",
            ),
            (
                ModelSpec {
                    arch: Arch::Llama,
                    d_model: 12,
                    n_heads: 4,
                    ..ok.clone()
                },
                "model.d_model",
            ),
            (
                ModelSpec {
                    seq_len: usize::MAX / 64,
                    ..ok.clone()
                },
                "model.seq_len",
            ),
        ] {
            assert_eq!(field(model.validate().unwrap_err()), want);
        }
    }
}
