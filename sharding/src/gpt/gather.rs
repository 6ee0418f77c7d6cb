//! Reading several samples at once. Finding a sample's tokens is a chain of dependent loads
//! (bucket table → document start and id → the `.idx` document entry → the sequence's length
//! and pointer → the tokens), each a cache miss on a large dataset; read one sample at a
//! time, the misses queue one behind the other. Here a batch goes through the chain level by
//! level: each pass prefetches the next level's entries for every sample, so the misses of one
//! level overlap across the batch, and only the last pass copies tokens (group prefetching).

use super::{BlendedGptDataset, DatasetError, GptDataset, Shard, TokenDataset};
use crate::cache_hint::prefetch;
use crate::indexed::tokens_of;
use crate::sampler::Span;
use std::ops::Range;

/// A run of contiguous token bytes: `bytes` of shard `shard`'s `.bin` (or of the bytes its
/// zstd frames stand for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) shard: usize,
    pub(crate) bytes: Range<usize>,
}

/// Where a global document lives: shard `shard`, document `local` of its `.idx`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DocAt {
    pub(super) shard: usize,
    local: usize,
}

impl TokenDataset {
    /// The shard holding global document `doc`, and the document's index in it.
    pub(super) fn doc_at(&self, doc: u32) -> DocAt {
        let doc = doc as usize;
        let shard = match self.shards.len() {
            1 => 0,
            _ => self.doc_base.partition_point(|&b| b <= doc) - 1,
        };
        DocAt {
            shard,
            local: doc - self.doc_base[shard],
        }
    }

    /// Hint the CPU to load the document's `.idx` entry.
    fn prefetch_document(&self, at: DocAt) {
        self.shards[at.shard].index().prefetch_document(at.local);
    }

    /// Hint the CPU to load the length and pointer of the document's first sequence (best
    /// after [`Self::prefetch_document`] has had time to land).
    fn prefetch_sequence(&self, at: DocAt) {
        let index = self.shards[at.shard].index();
        index.prefetch_sequence(index.document(at.local).start);
    }

    /// Append where span `span`'s tokens lie to `out`, and hint the CPU to start loading them.
    pub(crate) fn locate_span(&self, span: Span, out: &mut Vec<Piece>) {
        self.locate(self.doc_at(span.doc), span, out);
    }

    /// [`Self::locate_span`] with the span's document already found.
    fn locate(&self, at: DocAt, span: Span, out: &mut Vec<Piece>) {
        let index = self.shards[at.shard].index();
        let (mut offset, mut left) = (span.offset as usize, span.len as usize);
        for seq in index.document(at.local) {
            if left == 0 {
                break;
            }
            let seq_len = index.sequence_len(seq);
            if offset >= seq_len {
                offset -= seq_len;
                continue;
            }
            let n = left.min(seq_len - offset);
            let bytes = index.byte_range(seq, offset, n);
            if let Shard::Mapped(ds) = &self.shards[at.shard] {
                prefetch(&ds.bin()[bytes.clone()]);
            }
            out.push(Piece { shard: at.shard, bytes });
            left -= n;
            offset = 0;
        }
    }

    /// Append the tokens of `piece`, widened to i64, to `out`. Fails on a damaged frame, or
    /// when the dataset was opened for a vocabulary and the piece's shard, checked on its first
    /// read, holds an id outside it; mapped shards were otherwise fully checked when opened.
    pub(crate) fn read_piece(&self, piece: &Piece, out: &mut Vec<i64>) -> Result<(), DatasetError> {
        if let Some(vocab) = self.vocab {
            self.vet(piece.shard, vocab)?;
        }
        match &self.shards[piece.shard] {
            Shard::Mapped(ds) => ds.tokens_at(piece.bytes.clone()).extend_i64(out),
            Shard::Framed { index, frames } => {
                let range = piece.bytes.start as u64..piece.bytes.end as u64;
                frames.read(range, |bytes| tokens_of(index.dtype(), bytes).extend_i64(out))?;
            }
            Shard::Streamed(index) => match self.streamer.as_ref().filter(|s| s.0.ranged()) {
                // Blocks are whole tokens (their size a multiple of 8), in aligned buffers.
                Some(source) => {
                    let range = piece.bytes.start as u64..piece.bytes.end as u64;
                    source
                        .0
                        .read(piece.shard, range, &mut |b| tokens_of(index.dtype(), b).extend_i64(out))?
                }
                None => self
                    .streamed(piece.shard)?
                    .tokens_at(piece.bytes.clone())
                    .extend_i64(out),
            },
        }
        Ok(())
    }
}

impl GptDataset {
    /// Append the `seq_len + 1` tokens of each of `samples`, in order, to `out` (row-major):
    /// all samples are located (and their bytes prefetched) before any is copied.
    pub fn samples_into(&self, samples: &[u64], out: &mut Vec<i64>) -> Result<(), DatasetError> {
        let parts = std::iter::repeat_n(self, samples.len());
        read_batch(parts.zip(samples.iter().copied()), out)
    }
}

/// Append the tokens of each `(dataset, sample)` to `out`, in order, through the passes the
/// module documentation describes.
fn read_batch<'a>(
    picks: impl Iterator<Item = (&'a GptDataset, u64)> + Clone,
    out: &mut Vec<i64>,
) -> Result<(), DatasetError> {
    for (ds, sample) in picks.clone() {
        ds.packed.prefetch_bucket(sample);
    }
    for (ds, sample) in picks.clone() {
        ds.packed.prefetch_documents(sample);
    }
    let mut spans = Vec::with_capacity(16);
    let mut owners = Vec::with_capacity(16);
    let mut rows = 0;
    for (ds, sample) in picks {
        ds.packed.push_spans(sample, &mut spans)?;
        owners.resize(spans.len(), ds);
        rows += ds.seq_len() + 1;
    }
    let docs: Vec<DocAt> = spans
        .iter()
        .zip(&owners)
        .map(|(span, ds)| ds.data.doc_at(span.doc))
        .collect();
    for (&at, ds) in docs.iter().zip(&owners) {
        ds.data.prefetch_document(at);
    }
    for (&at, ds) in docs.iter().zip(&owners) {
        ds.data.prefetch_sequence(at);
    }
    let mut pieces = Vec::with_capacity(spans.len());
    let mut piece_owners = Vec::with_capacity(spans.len());
    for ((&at, span), ds) in docs.iter().zip(&spans).zip(&owners) {
        ds.data.locate(at, *span, &mut pieces);
        piece_owners.resize(pieces.len(), *ds);
    }
    out.reserve(rows);
    for (piece, ds) in pieces.iter().zip(&piece_owners) {
        ds.data.read_piece(piece, out)?;
    }
    Ok(())
}

impl BlendedGptDataset {
    /// [`GptDataset::samples_into`] for samples of several datasets: `(dataset, sample)`.
    pub(crate) fn samples_into(&self, samples: &[(usize, u64)], out: &mut Vec<i64>) -> Result<(), DatasetError> {
        read_batch(samples.iter().map(|&(d, sample)| (&self.parts[d], sample)), out)
    }
}
