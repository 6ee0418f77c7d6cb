//! Packing documents into fixed-length samples (Megatron's GPT dataset layout) and the
//! train / validation split by document.
//!
//! The selected documents, in order, form one token stream (each document already ends with its
//! end-of-document token; adding it is the preparer's job). Sample `i` is the token range
//! `[i·seq_len, i·seq_len + seq_len + 1)` of that stream: `seq_len + 1` tokens, so the inputs
//! (`0..seq_len`) and the shifted targets (`1..seq_len + 1`) come from one slice, and sample
//! `i + 1` starts on the last token of sample `i`. Only full samples count:
//! `num_samples = (total_tokens - 1) / seq_len`.
//!
//! [`PackedIndex`] keeps one prefix sum per non-empty document, so memory is `O(documents)`
//! however many samples there are. A sample's first document is found in O(1) on average
//! through a bucket table over the stream (one `u32` per bucket of about an average
//! document's length): a binary search over all documents costs a cache miss per level on a
//! large dataset, and that was as much of a sample's read time as copying its tokens.

use super::SamplerError;
use super::prng::{DOMAIN_SPLIT, hash, unit_f64};

/// A run of tokens inside one document: tokens `offset..offset + len` of document `doc`
/// (`doc` is the document's index in the dataset, not in the selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    pub doc: u32,
    pub offset: u32,
    pub len: u32,
}

/// The packed layout of a dataset: which document ranges make up each sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedIndex {
    /// Dataset ids of the packed (non-empty, selected) documents, in stream order.
    docs: Vec<u32>,
    /// `starts[j]` = stream offset of `docs[j]`'s first token; `starts[docs.len()]` = total
    /// tokens. Strictly increasing because empty documents are dropped.
    starts: Vec<u64>,
    /// Stream positions are bucketed by `pos >> bucket_shift`; `bucket_first[b]` is the
    /// document holding position `b << bucket_shift` (the last one for positions past the end).
    bucket_shift: u32,
    bucket_first: Vec<u32>,
    seq_len: u64,
    num_samples: u64,
}

impl PackedIndex {
    /// Packs all documents in dataset order. Empty documents are skipped.
    ///
    /// Errors if `seq_len` is 0, if there are more than 2^32 documents, or if the documents do
    /// not hold at least `seq_len + 1` tokens (one full sample).
    pub fn new(doc_lengths: &[u32], seq_len: usize) -> Result<PackedIndex, SamplerError> {
        check_doc_count(doc_lengths.len())?;
        // `check_doc_count` guarantees every index fits in u32.
        Self::build(
            doc_lengths,
            (0..doc_lengths.len()).map(|d| d as u32),
            doc_lengths.len(),
            seq_len,
        )
    }

    /// Packs only `selected_docs`, in the order given (e.g. one side of [`split_documents`]).
    /// Empty documents are skipped; a document listed twice is packed twice.
    pub fn from_documents(
        doc_lengths: &[u32],
        selected_docs: &[u32],
        seq_len: usize,
    ) -> Result<PackedIndex, SamplerError> {
        check_doc_count(doc_lengths.len())?;
        Self::build(doc_lengths, selected_docs.iter().copied(), selected_docs.len(), seq_len)
    }

    fn build(
        doc_lengths: &[u32],
        selected: impl Iterator<Item = u32>,
        num_selected: usize,
        seq_len: usize,
    ) -> Result<PackedIndex, SamplerError> {
        if seq_len == 0 {
            return Err(SamplerError::ZeroSeqLen);
        }
        let seq_len = seq_len as u64;
        let mut docs = Vec::new();
        let mut starts = vec![0u64];
        let mut total: u64 = 0;
        for doc in selected {
            let len = *doc_lengths.get(doc as usize).ok_or(SamplerError::DocumentOutOfRange {
                doc,
                num_documents: doc_lengths.len(),
            })?;
            if len == 0 {
                continue;
            }
            total = total.checked_add(u64::from(len)).ok_or(SamplerError::TooManyTokens)?;
            docs.push(doc);
            starts.push(total);
        }
        if total == 0 {
            return Err(SamplerError::NoTokens {
                num_documents: num_selected,
            });
        }
        let needed = seq_len.saturating_add(1);
        if total < needed {
            return Err(SamplerError::TooFewTokens {
                total_tokens: total,
                num_documents: docs.len(),
                seq_len,
                needed,
            });
        }
        docs.shrink_to_fit();
        starts.shrink_to_fit();
        let (bucket_shift, bucket_first) = bucket_table(&starts);
        Ok(PackedIndex {
            docs,
            starts,
            bucket_shift,
            bucket_first,
            seq_len,
            num_samples: (total - 1) / seq_len,
        })
    }

    /// Number of full samples.
    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }

    /// Sequence length the samples were packed for (each sample holds `seq_len + 1` tokens).
    pub fn seq_len(&self) -> u64 {
        self.seq_len
    }

    /// Tokens in the packed stream (the last `(total - 1) % seq_len` are never used).
    pub fn total_tokens(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Number of non-empty documents in the stream.
    pub fn num_documents(&self) -> usize {
        self.docs.len()
    }

    /// Writes the spans of `sample` into `out` (cleared first): document ranges in stream order,
    /// together exactly `seq_len + 1` tokens. Reuse `out` across calls to avoid allocating.
    pub fn spans_into(&self, sample: u64, out: &mut Vec<Span>) -> Result<(), SamplerError> {
        out.clear();
        self.push_spans(sample, out)
    }

    /// [`Self::spans_into`] without clearing `out` first.
    pub(crate) fn push_spans(&self, sample: u64, out: &mut Vec<Span>) -> Result<(), SamplerError> {
        if sample >= self.num_samples {
            return Err(SamplerError::SampleOutOfRange {
                sample,
                num_samples: self.num_samples,
            });
        }
        // No overflow: sample < (total - 1) / seq_len, so end <= total.
        let start = sample * self.seq_len;
        let end = start + self.seq_len + 1;
        let mut j = self.document_at(start);
        let mut pos = start;
        while pos < end {
            let (doc_start, doc_end) = (self.starts[j], self.starts[j + 1]);
            let stop = doc_end.min(end);
            // Both fit in u32: they are bounded by the document's length, a u32.
            out.push(Span {
                doc: self.docs[j],
                offset: (pos - doc_start) as u32,
                len: (stop - pos) as u32,
            });
            pos = stop;
            j += 1;
        }
        Ok(())
    }

    /// Index (into `docs`) of the document holding stream position `pos` (< total tokens):
    /// the last one starting at or before it, searched for only among the documents that
    /// start inside `pos`'s bucket.
    fn document_at(&self, pos: u64) -> usize {
        let bucket = self.bucket_of(pos);
        let lo = self.bucket_first[bucket] as usize;
        let hi = self.bucket_first[bucket + 1] as usize;
        // starts[lo] <= pos, and the answer is at most hi (hi's document holds a later position).
        lo + self.starts[lo + 1..=hi].partition_point(|&s| s <= pos)
    }

    /// The bucket of stream position `pos` in the table of [`Self::document_at`].
    fn bucket_of(&self, pos: u64) -> usize {
        (pos >> self.bucket_shift) as usize
    }

    /// Hint the CPU to load the bucket entries [`Self::spans_into`] reads first for `sample`
    /// (samples past the end are ignored).
    pub(crate) fn prefetch_bucket(&self, sample: u64) {
        if sample < self.num_samples {
            let bucket = self.bucket_of(sample * self.seq_len);
            crate::cache_hint::prefetch(bytemuck::cast_slice(&self.bucket_first[bucket..bucket + 2]));
        }
    }

    /// Hint the CPU to load the document starts and ids [`Self::spans_into`] reads next for
    /// `sample` (best after [`Self::prefetch_bucket`] has had time to land).
    pub(crate) fn prefetch_documents(&self, sample: u64) {
        if sample < self.num_samples {
            let lo = self.bucket_first[self.bucket_of(sample * self.seq_len)] as usize;
            crate::cache_hint::prefetch(bytemuck::cast_slice(&self.starts[lo..lo + 2]));
            crate::cache_hint::prefetch(bytemuck::cast_slice(&self.docs[lo..lo + 1]));
        }
    }

    /// The spans of `sample`; see [`Self::spans_into`].
    pub fn spans(&self, sample: u64) -> Result<Vec<Span>, SamplerError> {
        let mut out = Vec::new();
        self.spans_into(sample, &mut out)?;
        Ok(out)
    }
}

/// The bucket table of [`PackedIndex::document_at`] for prefix sums `starts` (at least one
/// document): buckets a power of two at least the average document's length, so there are no
/// more buckets than documents and a bucket holds about one document start.
fn bucket_table(starts: &[u64]) -> (u32, Vec<u32>) {
    let docs = starts.len() - 1;
    let total = starts[docs];
    let average = total.div_ceil(docs as u64).max(1);
    let shift = u64::BITS - (average - 1).leading_zeros();
    // Positions run up to total - 1; one more bucket so `bucket + 1` is always there.
    let buckets = ((total - 1) >> shift) as usize + 2;
    let mut table = Vec::with_capacity(buckets);
    let mut j = 0;
    for b in 0..buckets as u64 {
        let pos = b << shift;
        while j + 1 < docs && starts[j + 1] <= pos {
            j += 1;
        }
        // `check_doc_count` keeps document indices within u32.
        table.push(j as u32);
    }
    (shift, table)
}

fn check_doc_count(num_documents: usize) -> Result<(), SamplerError> {
    if num_documents as u128 > u128::from(u32::MAX) + 1 {
        return Err(SamplerError::TooManyDocuments { num_documents });
    }
    Ok(())
}

/// Splits documents `0..num_docs` into `(train, valid)` id lists, each in increasing order.
///
/// Document `d` goes to validation iff `unit(hash("split", seed, d)) < valid_fraction`, a
/// decision that depends only on `(seed, d)`: appending documents to a dataset never moves an
/// existing document from one side to the other (so the validation set never leaks into
/// training). The validation share is `valid_fraction` in expectation, with binomial noise.
///
/// Errors if `valid_fraction` is not in `[0, 1]` or `num_docs` exceeds 2^32.
pub fn split_documents(num_docs: usize, valid_fraction: f64, seed: u64) -> Result<(Vec<u32>, Vec<u32>), SamplerError> {
    if !(0.0..=1.0).contains(&valid_fraction) {
        return Err(SamplerError::InvalidFraction {
            fraction: valid_fraction,
        });
    }
    check_doc_count(num_docs)?;
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for doc in 0..num_docs {
        // `check_doc_count` guarantees the id fits in u32.
        let doc = doc as u32;
        if unit_f64(hash(DOMAIN_SPLIT, &[seed, u64::from(doc)])) < valid_fraction {
            valid.push(doc);
        } else {
            train.push(doc);
        }
    }
    Ok((train, valid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The token stream as `(doc, offset)` pairs, skipping nothing (empty documents add none).
    fn stream(doc_lengths: &[u32], selected: &[u32]) -> Vec<(u32, u32)> {
        selected
            .iter()
            .flat_map(|&d| (0..doc_lengths[d as usize]).map(move |o| (d, o)))
            .collect()
    }

    fn tokens_of(spans: &[Span]) -> Vec<(u32, u32)> {
        spans
            .iter()
            .flat_map(|s| (s.offset..s.offset + s.len).map(move |o| (s.doc, o)))
            .collect()
    }

    fn check_packing(doc_lengths: &[u32], selected: &[u32], seq_len: usize, packed: &PackedIndex) {
        let stream = stream(doc_lengths, selected);
        let seq = seq_len as u64;
        assert_eq!(packed.total_tokens(), stream.len() as u64);
        assert_eq!(packed.num_samples(), (stream.len() as u64 - 1) / seq);
        let mut rebuilt: Vec<(u32, u32)> = Vec::new();
        let mut prev_last = None;
        let mut spans = Vec::new();
        for sample in 0..packed.num_samples() {
            packed.spans_into(sample, &mut spans).unwrap();
            assert!(spans.iter().all(|s| s.len > 0 && doc_lengths[s.doc as usize] > 0));
            assert!(spans.iter().all(|s| s.offset + s.len <= doc_lengths[s.doc as usize]));
            let tokens = tokens_of(&spans);
            assert_eq!(tokens.len(), seq_len + 1, "sample {sample}");
            let start = (sample * seq) as usize;
            assert_eq!(tokens, stream[start..start + seq_len + 1]);
            // Consecutive samples overlap by exactly one token.
            if let Some(last) = prev_last {
                assert_eq!(tokens[0], last);
            }
            prev_last = tokens.last().copied();
            let skip = usize::from(sample > 0);
            rebuilt.extend_from_slice(&tokens[skip..]);
        }
        // All samples, overlap dropped, are exactly a prefix of the stream.
        assert_eq!(rebuilt, stream[..rebuilt.len()]);
        assert_eq!(rebuilt.len() as u64, packed.num_samples() * seq + 1);
    }

    #[test]
    fn packs_across_documents() {
        let lengths = [5, 0, 3, 0, 0, 9, 1];
        let packed = PackedIndex::new(&lengths, 4).unwrap();
        // 18 tokens: (18 - 1) / 4 = 4 samples.
        assert_eq!(packed.num_samples(), 4);
        assert_eq!(
            packed.spans(1).unwrap(),
            [
                Span {
                    doc: 0,
                    offset: 4,
                    len: 1
                },
                Span {
                    doc: 2,
                    offset: 0,
                    len: 3
                },
                Span {
                    doc: 5,
                    offset: 0,
                    len: 1
                },
            ]
        );
        let all: Vec<u32> = (0..7).collect();
        check_packing(&lengths, &all, 4, &packed);
        // Empty documents are never referenced and cost no memory.
        assert_eq!(packed.num_documents(), 4);
        assert_eq!(packed.starts.len(), packed.docs.len() + 1);
    }

    #[test]
    fn memory_is_per_document_not_per_sample() {
        // 4096 documents of 1 Mi tokens: 2^32 tokens, about 2^29 samples with seq_len 8.
        let lengths = vec![1 << 20; 4096];
        let packed = PackedIndex::new(&lengths, 8).unwrap();
        assert_eq!(packed.num_samples(), ((4096u64 << 20) - 1) / 8);
        assert_eq!(packed.starts.len(), 4097);
        assert_eq!(packed.docs.len(), 4096);
        assert!(packed.bucket_first.len() <= 4096 + 2);
        let last = packed.spans(packed.num_samples() - 1).unwrap();
        assert_eq!(last.iter().map(|s| s.len).sum::<u32>(), 9);
    }

    #[test]
    fn exactly_one_sample() {
        let packed = PackedIndex::new(&[3, 2], 4).unwrap();
        assert_eq!(packed.num_samples(), 1);
        assert_eq!(
            packed.spans(0).unwrap(),
            [
                Span {
                    doc: 0,
                    offset: 0,
                    len: 3
                },
                Span {
                    doc: 1,
                    offset: 0,
                    len: 2
                }
            ]
        );
        assert_eq!(
            packed.spans(1),
            Err(SamplerError::SampleOutOfRange {
                sample: 1,
                num_samples: 1
            })
        );
    }

    #[test]
    fn too_small_datasets_are_errors() {
        assert_eq!(
            PackedIndex::new(&[], 4),
            Err(SamplerError::NoTokens { num_documents: 0 })
        );
        assert_eq!(
            PackedIndex::new(&[0, 0], 4),
            Err(SamplerError::NoTokens { num_documents: 2 })
        );
        let err = PackedIndex::new(&[2, 0, 2], 4).unwrap_err();
        assert_eq!(
            err,
            SamplerError::TooFewTokens {
                total_tokens: 4,
                num_documents: 2,
                seq_len: 4,
                needed: 5
            }
        );
        assert!(err.to_string().contains("4 tokens in 2 non-empty document(s)"), "{err}");
        assert!(err.to_string().contains("needs seq_len + 1 = 5 tokens"), "{err}");
        assert_eq!(PackedIndex::new(&[10], 0), Err(SamplerError::ZeroSeqLen));
    }

    #[test]
    fn from_documents_packs_the_selection_in_order() {
        let lengths = [4, 0, 6, 2, 3];
        let selected = [4, 1, 0, 2];
        let packed = PackedIndex::from_documents(&lengths, &selected, 3).unwrap();
        check_packing(&lengths, &selected, 3, &packed);
        assert_eq!(
            packed.spans(0).unwrap()[0],
            Span {
                doc: 4,
                offset: 0,
                len: 3
            }
        );
        assert_eq!(
            PackedIndex::from_documents(&lengths, &[0, 5], 3),
            Err(SamplerError::DocumentOutOfRange {
                doc: 5,
                num_documents: 5
            })
        );
    }

    proptest! {
        #[test]
        fn packing_covers_the_stream(
            lengths in proptest::collection::vec(prop_oneof![Just(0u32), 1u32..40], 0..40),
            seq_len in 1usize..50,
        ) {
            let all: Vec<u32> = (0..lengths.len() as u32).collect();
            let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
            match PackedIndex::new(&lengths, seq_len) {
                Ok(packed) => check_packing(&lengths, &all, seq_len, &packed),
                Err(SamplerError::NoTokens { .. }) => prop_assert_eq!(total, 0),
                Err(SamplerError::TooFewTokens { total_tokens, .. }) => {
                    prop_assert_eq!(total_tokens, total);
                    prop_assert!(total <= seq_len as u64);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }

        /// The bucket table finds the same document as a binary search over all of them, for
        /// every position, however unevenly the lengths fall (runs of tiny documents around
        /// huge ones put many starts in one bucket and none in others).
        #[test]
        fn bucket_lookup_equals_binary_search(
            lengths in proptest::collection::vec(prop_oneof![1u32..4, 1u32..64, 500u32..3000], 1..60),
        ) {
            // Two tokens at least, so that there is a sample (seq_len 1).
            let lengths: Vec<u32> = std::iter::once(2).chain(lengths).collect();
            let packed = PackedIndex::new(&lengths, 1).unwrap();
            prop_assert!(packed.bucket_first.len() <= lengths.len() + 2);
            for pos in 0..packed.total_tokens() {
                let expected = packed.starts.partition_point(|&s| s <= pos) - 1;
                prop_assert_eq!(packed.document_at(pos), expected, "position {}", pos);
            }
        }
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let (train, valid) = split_documents(10_000, 0.2, 42).unwrap();
        assert_eq!(
            (train.clone(), valid.clone()),
            split_documents(10_000, 0.2, 42).unwrap()
        );
        assert_eq!(train.len() + valid.len(), 10_000);
        let mut all: Vec<u32> = train.iter().chain(&valid).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<u32>>());
        assert_ne!(valid, split_documents(10_000, 0.2, 43).unwrap().1);
    }

    #[test]
    fn split_fraction_is_close_for_large_n() {
        for fraction in [0.01, 0.1, 0.5, 0.9] {
            let (_, valid) = split_documents(200_000, fraction, 3).unwrap();
            let got = valid.len() as f64 / 200_000.0;
            // Binomial std dev is at most 0.0012 here; allow ~4 sigma.
            assert!((got - fraction).abs() < 0.005, "fraction {fraction}: got {got}");
        }
        assert!(split_documents(1000, 0.0, 1).unwrap().1.is_empty());
        assert!(split_documents(1000, 1.0, 1).unwrap().0.is_empty());
    }

    #[test]
    fn adding_documents_keeps_existing_assignments() {
        let (train_a, valid_a) = split_documents(1000, 0.3, 9).unwrap();
        let (train_b, valid_b) = split_documents(1500, 0.3, 9).unwrap();
        assert_eq!(
            train_a,
            train_b.iter().copied().filter(|&d| d < 1000).collect::<Vec<_>>()
        );
        assert_eq!(
            valid_a,
            valid_b.iter().copied().filter(|&d| d < 1000).collect::<Vec<_>>()
        );
    }

    #[test]
    fn split_rejects_bad_fractions() {
        for fraction in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let err = split_documents(10, fraction, 0).unwrap_err();
            assert!(matches!(err, SamplerError::InvalidFraction { .. }), "{err}");
        }
    }
}
