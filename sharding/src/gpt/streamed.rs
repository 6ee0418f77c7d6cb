//! Datasets whose shards arrive while they are read: a [`ShardSource`] (the streaming fetcher
//! of [`crate::remote::Streamer`]) maps each shard's `.bin` once it is in the data cache,
//! checked, and a read of a shard not there yet waits for it (a partial file is never
//! mapped). The dataset tells the source which step its reader is on, so the source can keep
//! the shards of the coming steps and let the others go; and it answers which shards a step
//! of one rank reads, which is what the source plans its fetches from.

use super::{DatasetError, GptDataset, TokenDataset};
use crate::indexed::IndexedDataset;
use crate::sampler::{Cursor, Sampler};
use std::sync::Arc;

/// Where the `.bin` of a streamed dataset's shards come from.
pub trait ShardSource: Send + Sync {
    /// Shard `shard`'s `.idx` and mapped `.bin`, once the `.bin` is in place and checked:
    /// waits for it (fetching it first if no planned step reads it), up to a deadline, and
    /// fails naming the shard and its object when it cannot be had.
    fn shard(&self, shard: usize) -> Result<Arc<IndexedDataset>, DatasetError>;
    /// The dataset's reader is about to read step `step` of its stream: the shards only the
    /// steps before it read are no longer needed.
    fn reading(&self, step: u64);
}

/// A shared [`ShardSource`], as [`super::OpenOptions`] carries it (compared by identity).
#[derive(Clone)]
pub struct Shards(pub Arc<dyn ShardSource>);

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shards(streamed)")
    }
}

impl PartialEq for Shards {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Shards {}

impl TokenDataset {
    /// The mapped `.bin` of streamed shard `shard`, waiting for it.
    pub(super) fn streamed(&self, shard: usize) -> Result<Arc<IndexedDataset>, DatasetError> {
        match &self.streamer {
            Some(source) => source.0.shard(shard),
            None => Err(DatasetError::PrefetchStopped(format!(
                "shard {shard} is streamed but the dataset has no source"
            ))),
        }
    }

    /// Tell a streamed dataset's source that its reader is on step `step` (nothing to do for
    /// a dataset read in place).
    pub fn reading(&self, step: u64) {
        if let Some(source) = &self.streamer {
            source.0.reading(step);
        }
    }

    /// Whether the shards' `.bin` come from a [`ShardSource`].
    pub fn is_streamed(&self) -> bool {
        self.streamer.is_some()
    }
}

impl GptDataset {
    /// The shards (manifest order, each once, sorted) that DP rank `dp_rank` of `dp_size`
    /// reads in the step at `cursor`, over all its `micro_batches` micro-batches.
    pub fn step_shards(
        &self,
        sampler: &Sampler,
        cursor: &Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
    ) -> Result<Vec<usize>, DatasetError> {
        let mut shards = Vec::new();
        let mut spans = Vec::new();
        for micro in 0..micro_batches {
            for r in sampler.micro_batch(cursor, dp_rank, dp_size, micro_batches, micro)? {
                spans.clear();
                self.packed.push_spans(r.sample, &mut spans)?;
                shards.extend(spans.iter().map(|span| self.data.doc_at(span.doc).shard));
            }
        }
        shards.sort_unstable();
        shards.dedup();
        Ok(shards)
    }
}
