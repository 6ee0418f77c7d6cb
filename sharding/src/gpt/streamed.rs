//! Datasets whose shards arrive while they are read: a [`ShardSource`] (the streaming fetcher
//! of [`crate::remote::Streamer`]) maps each shard's `.bin` once it is in the data cache,
//! checked, and a read of a shard not there yet waits for it (a partial file is never
//! mapped); it may hold the shards' `.idx` files too ([`ShardSource::index`]). A source in range mode ([`ShardSource::ranged`]) hands out checked byte ranges
//! of a shard instead, and a read waits only for its own bytes. The dataset tells the source
//! which step its reader is on, so the source can keep what the coming steps read and let
//! the rest go; and it answers which bytes of which shards a step of one rank reads
//! ([`GptDataset::step_shards`]), which is what the source plans its fetches from.

use super::{DatasetError, GptDataset, TokenDataset};
use crate::indexed::{IndexedDataset, IndexedIndex};
use crate::sampler::{Cursor, Sampler};
use std::ops::Range;
use std::path::Path;
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
    /// Shard `shard`'s `.idx`, checked against a `.bin` of `bin_len` bytes (`bin` names it),
    /// when the source holds the `.idx` files itself (a streamed cache keeps them in one file
    /// rather than one file each); `None`: the dataset opens the shard's `.idx` file.
    fn index(&self, shard: usize, bin: &Path, bin_len: u64) -> Option<Result<IndexedIndex, DatasetError>> {
        let _ = (shard, bin, bin_len);
        None
    }
    /// Whether the source hands out byte ranges of shards ([`Self::read`]) rather than whole
    /// shards: then a read never maps a `.bin`.
    fn ranged(&self) -> bool {
        false
    }
    /// Bytes `bytes` of shard `shard`'s `.bin`, checked, handed to `each` in order in runs of
    /// whole tokens: waits for them (fetching them first if no planned step reads them), up to
    /// a deadline, and fails naming the shard and its object when they cannot be had.
    fn read(&self, shard: usize, bytes: Range<u64>, each: &mut dyn FnMut(&[u8])) -> Result<(), DatasetError> {
        let ds = self.shard(shard)?;
        each(&ds.bin()[bytes.start as usize..bytes.end as usize]);
        Ok(())
    }
}

/// Bytes `bytes` of shard `shard`'s `.bin`: what a step reads of one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardBytes {
    pub shard: usize,
    pub bytes: Range<u64>,
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
    /// The bytes of the shards that DP rank `dp_rank` of `dp_size` reads in the step at
    /// `cursor`, over all its `micro_batches` micro-batches: sorted by shard and offset,
    /// overlapping and touching ranges merged (so each shard the step reads appears in
    /// manifest order, and [`shards_of`] gives them once each).
    pub fn step_shards(
        &self,
        sampler: &Sampler,
        cursor: &Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
    ) -> Result<Vec<ShardBytes>, DatasetError> {
        let mut pieces = Vec::new();
        let mut spans = Vec::new();
        for micro in 0..micro_batches {
            for r in sampler.micro_batch(cursor, dp_rank, dp_size, micro_batches, micro)? {
                spans.clear();
                self.packed.push_spans(r.sample, &mut spans)?;
                for span in &spans {
                    self.data.locate_span(*span, &mut pieces);
                }
            }
        }
        let mut reads: Vec<ShardBytes> = pieces
            .into_iter()
            .map(|p| ShardBytes {
                shard: p.shard,
                bytes: p.bytes.start as u64..p.bytes.end as u64,
            })
            .collect();
        reads.sort_unstable_by_key(|r| (r.shard, r.bytes.start));
        let mut out: Vec<ShardBytes> = Vec::with_capacity(reads.len());
        for r in reads {
            match out.last_mut() {
                Some(last) if last.shard == r.shard && r.bytes.start <= last.bytes.end => {
                    last.bytes.end = last.bytes.end.max(r.bytes.end);
                }
                _ => out.push(r),
            }
        }
        Ok(out)
    }
}

/// The shards of `reads` (as [`GptDataset::step_shards`] gives them), each once, in order.
pub fn shards_of(reads: &[ShardBytes]) -> Vec<usize> {
    let mut shards: Vec<usize> = reads.iter().map(|r| r.shard).collect();
    shards.dedup();
    shards
}
