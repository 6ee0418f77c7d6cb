//! Synthetic token data with a known entropy rate, for the quickstart and for training tests:
//! a model's validation loss can be compared with the exact floor.
//!
//! The source is a circulant Markov chain over a vocabulary of V tokens: the next token is
//! `(current + k) mod V` where the offset k is drawn from a fixed distribution q over a few
//! dozen offsets. Every row of the transition matrix is a rotation of q, so the matrix is
//! doubly stochastic, its stationary distribution is uniform (the first token is drawn
//! uniformly, so the chain starts stationary), and its entropy rate is exactly H(q). q is held
//! as integer weights summing to 2^32 and sampled exactly, so the entropy written in the
//! manifest is the entropy of the numbers actually drawn from, not an approximation. The
//! generator is the crate's own SplitMix64 ([`crate::splitmix`]), so a given seed yields the same data forever.

use crate::frames::ZstdOptions;
use crate::indexed::{IndexedWriter, TokenDType};
use crate::manifest::{Manifest, ManifestError, ShardInfo, TokenizerInfo, build_atomically};
use crate::splitmix::SplitMix64;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    pub tokens: u64,
    pub seed: u64,
    pub vocab_size: u32,
    /// Number of distinct offsets the chain can take from any token (the support of q).
    pub support: u32,
    /// Tokens per document (the last one may be shorter).
    pub doc_tokens: u32,
    /// Tokens per shard (rounded to whole documents).
    pub shard_tokens: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            tokens: 1 << 20,
            seed: 0,
            vocab_size: 512,
            support: 32,
            doc_tokens: 2048,
            shard_tokens: 64 << 20,
        }
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.tokens < 2 {
            return Err(format!("tokens must be at least 2, got {}", self.tokens));
        }
        if self.vocab_size < 2 || self.vocab_size > 1 << 24 {
            return Err(format!(
                "vocab_size must be between 2 and 16777216, got {}",
                self.vocab_size
            ));
        }
        if self.support == 0 || self.support > self.vocab_size {
            return Err(format!(
                "support must be between 1 and vocab_size ({}), got {}",
                self.vocab_size, self.support
            ));
        }
        if self.doc_tokens == 0 {
            return Err("doc_tokens must be at least 1".into());
        }
        if self.shard_tokens < u64::from(self.doc_tokens) {
            return Err(format!(
                "shard_tokens ({}) must hold at least one document ({})",
                self.shard_tokens, self.doc_tokens
            ));
        }
        Ok(())
    }
}

/// The circulant Markov source.
pub struct MarkovSource {
    vocab: u32,
    offsets: Vec<u32>,
    /// Cumulative integer weights; the last is 2^32.
    cdf: Vec<u64>,
    weights: Vec<u64>,
    state: u32,
    rng: SplitMix64,
}

const TOTAL: u64 = 1 << 32;

impl MarkovSource {
    pub fn new(vocab: u32, support: u32, seed: u64) -> MarkovSource {
        let mut rng = SplitMix64::new(seed);
        // Distinct offsets, drawn by a partial Fisher–Yates over 0..vocab done lazily.
        let mut offsets: Vec<u32> = Vec::with_capacity(support as usize);
        while offsets.len() < support as usize {
            let o = (rng.next_u64() % u64::from(vocab)) as u32;
            if !offsets.contains(&o) {
                offsets.push(o);
            }
        }
        // Zipf-like weights 1/(k+1), as integers summing exactly to 2^32.
        let raw: Vec<f64> = (0..support).map(|k| 1.0 / f64::from(k + 1)).collect();
        let sum: f64 = raw.iter().sum();
        let mut weights: Vec<u64> = raw
            .iter()
            .map(|w| ((w / sum) * TOTAL as f64).floor().max(1.0) as u64)
            .collect();
        let assigned: u64 = weights.iter().sum();
        weights[0] = weights[0] + TOTAL - assigned; // assigned ≤ TOTAL by the floor
        let cdf = weights
            .iter()
            .scan(0u64, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        let state = (rng.next_u64() % u64::from(vocab)) as u32;
        MarkovSource {
            vocab,
            offsets,
            cdf,
            weights,
            state,
            rng,
        }
    }

    /// Exact entropy rate of the chain in nats per token: H(q).
    pub fn entropy_rate(&self) -> f64 {
        self.weights
            .iter()
            .map(|&w| {
                let p = w as f64 / TOTAL as f64;
                if p > 0.0 { -p * p.ln() } else { 0.0 }
            })
            .sum()
    }

    pub fn next_token(&mut self) -> u32 {
        let token = self.state;
        let r = self.rng.next_u64() >> 32;
        let k = self.cdf.partition_point(|&c| c <= r);
        self.state = ((u64::from(self.state) + u64::from(self.offsets[k])) % u64::from(self.vocab)) as u32;
        token
    }
}

/// Write `cfg.tokens` tokens of the source into a new dataset directory `dir`.
pub fn synthesize(dir: &Path, cfg: &SynthConfig) -> Result<Manifest, ManifestError> {
    synthesize_with(dir, cfg, None)
}

/// [`synthesize`], also writing each shard's zstd variant when `zstd` is given.
pub fn synthesize_with(dir: &Path, cfg: &SynthConfig, zstd: Option<&ZstdOptions>) -> Result<Manifest, ManifestError> {
    let invalid = |message| ManifestError::Invalid {
        path: dir.to_path_buf(),
        message,
    };
    cfg.validate().map_err(invalid)?;
    if let Some(z) = zstd {
        z.validate().map_err(invalid)?;
    }
    let dtype = TokenDType::for_vocab(cfg.vocab_size as usize);
    build_atomically(dir, |tmp| {
        let mut source = MarkovSource::new(cfg.vocab_size, cfg.support, cfg.seed);
        let mut shards = Vec::new();
        let mut left = cfg.tokens;
        let mut doc = Vec::with_capacity(cfg.doc_tokens as usize);
        while left > 0 {
            let prefix = format!("shard-{:05}", shards.len());
            let mut writer = IndexedWriter::create(&tmp.join(&prefix), dtype)?;
            let mut in_shard = 0u64;
            while left > 0 && in_shard + u64::from(cfg.doc_tokens).min(left) <= cfg.shard_tokens {
                let n = u64::from(cfg.doc_tokens).min(left);
                doc.clear();
                doc.extend((0..n).map(|_| source.next_token()));
                writer.add_document(&doc)?;
                in_shard += n;
                left -= n;
            }
            let summary = writer.finish()?;
            shards.push(match zstd {
                Some(z) => ShardInfo::describe_compressed(tmp, &prefix, &summary, z)?,
                None => ShardInfo::describe(tmp, &prefix, &summary)?,
            });
        }
        let mut manifest = Manifest::new(
            dtype,
            u64::from(cfg.vocab_size),
            TokenizerInfo::Synthetic {
                generator: format!("circulant-markov(support={})", cfg.support),
                seed: cfg.seed,
            },
            shards,
        );
        manifest.entropy_nats_per_token = Some(source.entropy_rate());
        manifest.write(tmp)?;
        Ok(manifest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empirical_entropy_matches_the_exact_rate() {
        let mut s = MarkovSource::new(300, 20, 7);
        let exact = s.entropy_rate();
        // The chain's next token depends only on the offset: count offsets.
        let mut counts = std::collections::HashMap::new();
        let mut prev = s.next_token();
        let n = 400_000;
        for _ in 0..n {
            let t = s.next_token();
            *counts.entry((t + 300 - prev) % 300).or_insert(0u64) += 1;
            prev = t;
        }
        let empirical: f64 = counts
            .values()
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.ln()
            })
            .sum();
        assert!(
            (empirical - exact).abs() < 0.01,
            "empirical {empirical} vs exact {exact}"
        );
        assert!(exact > 1.0 && exact < (20f64).ln(), "{exact}");
    }

    #[test]
    fn same_seed_same_tokens() {
        let take = |seed| {
            let mut s = MarkovSource::new(1000, 16, seed);
            (0..1000).map(|_| s.next_token()).collect::<Vec<_>>()
        };
        assert_eq!(take(3), take(3));
        assert_ne!(take(3), take(4));
        assert!(take(3).iter().all(|&t| t < 1000));
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = SynthConfig {
            support: 600,
            ..SynthConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("support"));
        let bad = SynthConfig {
            tokens: 1,
            ..SynthConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("tokens"));
    }
}
