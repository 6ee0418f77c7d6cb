//! Deterministic, resumable sampling: which tokens form sample `i`, which sample comes at
//! global position `g`, and which rank trains on it.
//!
//! # What the sampler owns
//!
//! Everything between "a list of document token counts" and "the sample ids this rank trains on
//! in this micro-batch". It never touches files, threads or clocks; the dataset reader supplies
//! document lengths and later turns [`Span`]s into token slices.
//!
//! - [`PackedIndex`] (packing): documents are concatenated into one token stream and cut into
//!   samples of `seq_len + 1` tokens that overlap by one token (Megatron's convention: inputs are
//!   tokens `0..seq_len`, targets `1..seq_len + 1`). It stores one prefix sum per document, never
//!   one entry per sample, so billions of tokens cost `O(documents)` memory.
//!   [`split_documents`] makes the train / validation split by document.
//! - [`Shuffle`] (global shuffle): a keyed Feistel permutation of `0..num_samples` per
//!   `(seed, epoch)`, evaluated per index with cycle-walking, so it is never materialized.
//! - [`Blend`] (mixing datasets by weight): a closed-form, exact schedule mapping a blended
//!   position to `(dataset, position within that dataset's stream)`.
//! - [`Sampler`] and [`Cursor`] (partitioning and resumption): cut the global stream into
//!   steps, micro-batches and data-parallel ranks; the cursor is what a checkpoint stores.
//!
//! # The global-position model
//!
//! There is exactly one sample stream per run, indexed by the *global position*
//! `g = 0, 1, 2, …`:
//!
//! ```text
//! g  →  epoch = g / num_samples,  position = g % num_samples  →  sample = shuffle(seed, epoch, position)
//! ```
//!
//! Step `s` consumes positions `[s·GB, (s+1)·GB)` (`GB` = global batch). Inside a step the
//! positions are laid out `[micro-batch][dp rank][index]`: micro-batch `m` of rank `r`, with `M`
//! micro-batches and `D` ranks, gets
//!
//! ```text
//! s·GB + m·(GB/M) + r·(GB/(M·D)) + k,   k in 0..GB/(M·D)
//! ```
//!
//! The only state is the number of samples consumed ([`Cursor::consumed`]), a point in the
//! global stream. Nothing in it depends on the data-parallel size or the number of
//! micro-batches: those only decide *who* reads which slice of the next step. So a run
//! checkpointed with 8 ranks and resumed with 3 (or with another gradient-accumulation count)
//! continues at exactly the same global position: no sample is repeated and none is skipped,
//! and the steps contain the same samples as the uninterrupted run would have. (What changes is
//! only which rank computes which sample; the optimizer sees the same batches.)
//!
//! # Why the PRNG lives in this crate
//!
//! Checkpoints store cursors, and a cursor is only meaningful if `(seed, epoch, position)` keeps
//! mapping to the same sample forever. PRNG crates are free to change their streams between
//! versions (`rand`'s `StdRng` documents that its algorithm may be replaced), and a dependency
//! bump would then silently change which samples come next after a resume. So all randomness here is a few lines of documented, frozen
//! arithmetic: the SplitMix64 finalizer used as a counter-based hash of
//! `(domain, seed, epoch, index)` (see `prng.rs`). The golden tests pin the exact outputs;
//! changing them breaks every existing checkpoint.

mod blend;
mod pack;
mod partition;
pub(crate) mod prng;
mod shuffle;

pub use blend::Blend;
pub use pack::{PackedIndex, Span, split_documents};
pub use partition::{Cursor, SampleRef, Sampler};
pub use shuffle::Shuffle;

/// Why a sampler could not be built or could not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// Packing with `seq_len == 0` makes no sense (every sample would be one token).
    #[error("sequence length must be at least 1, got 0")]
    ZeroSeqLen,

    /// The documents to pack hold no tokens at all.
    #[error("no tokens to pack: {num_documents} document(s) selected, all empty")]
    NoTokens { num_documents: usize },

    /// Not even one sample of `seq_len + 1` tokens fits.
    #[error(
        "dataset too small: {total_tokens} tokens in {num_documents} non-empty document(s), \
         but one sample with seq_len {seq_len} needs seq_len + 1 = {needed} tokens"
    )]
    TooFewTokens {
        total_tokens: u64,
        num_documents: usize,
        seq_len: u64,
        needed: u64,
    },

    /// Document ids are `u32`; more documents than that cannot be addressed.
    #[error("{num_documents} documents exceed the supported maximum of 2^32")]
    TooManyDocuments { num_documents: usize },

    /// The selected documents hold more than `u64::MAX` tokens (only possible by repeating
    /// documents in a selection).
    #[error("the selected documents hold more than 2^64 - 1 tokens")]
    TooManyTokens,

    /// A selected document id does not exist.
    #[error("document {doc} out of range: the dataset has {num_documents} documents")]
    DocumentOutOfRange { doc: u32, num_documents: usize },

    /// A sample id past the end of the packed dataset.
    #[error("sample {sample} out of range: the packed dataset has {num_samples} samples")]
    SampleOutOfRange { sample: u64, num_samples: u64 },

    /// The validation fraction must be a number in `[0, 1]`.
    #[error("validation fraction must be in [0, 1], got {fraction}")]
    InvalidFraction { fraction: f64 },

    /// Shuffling or sampling an empty dataset.
    #[error("the dataset has no samples (num_samples = 0)")]
    NoSamples,

    /// A step must consume at least one sample.
    #[error("global batch must be at least 1, got 0")]
    ZeroGlobalBatch,

    /// Blending needs at least one dataset.
    #[error("blend has no datasets")]
    NoDatasets,

    /// `weights` and `sizes` describe different numbers of datasets.
    #[error("blend has {weights} weight(s) but {sizes} dataset size(s)")]
    BlendLengthMismatch { weights: usize, sizes: usize },

    /// A blend weight that is negative, NaN or infinite.
    #[error("blend weight of dataset {index} must be a finite number >= 0, got {weight}")]
    InvalidWeight { index: usize, weight: f64 },

    /// Every blend weight is zero, so nothing could ever be sampled.
    #[error("all {count} blend weights are zero")]
    AllWeightsZero { count: usize },

    /// A dataset with a positive weight but no samples to give.
    #[error("blend dataset {index} has weight {weight} but no samples (size 0)")]
    EmptyBlendDataset { index: usize, weight: f64 },

    /// A data-parallel size or micro-batch count of zero.
    #[error("{what} must be at least 1, got 0")]
    ZeroDegree { what: &'static str },

    /// The global batch does not split evenly over ranks and micro-batches.
    #[error(
        "global batch {global_batch} is not divisible by dp_size ({dp_size}) × micro_batches \
         ({micro_batches}) = {product}"
    )]
    IndivisibleBatch {
        global_batch: u64,
        dp_size: usize,
        micro_batches: usize,
        product: u128,
    },

    /// A DP rank outside `0..dp_size`.
    #[error("dp rank {dp_rank} out of range for dp_size {dp_size}")]
    RankOutOfRange { dp_rank: usize, dp_size: usize },

    /// A micro-batch index outside `0..micro_batches`.
    #[error("micro-batch {micro} out of range for {micro_batches} micro-batches")]
    MicroBatchOutOfRange { micro: usize, micro_batches: usize },

    /// A restored cursor belongs to a different dataset, seed or batch configuration.
    #[error(
        "cursor does not match this run: {field} is {checkpoint} in the checkpoint but {current} \
         now"
    )]
    CursorMismatch {
        field: &'static str,
        checkpoint: u64,
        current: u64,
    },

    /// A cursor that does not sit on a step boundary (corrupt or hand-edited checkpoint).
    #[error("cursor consumed {consumed} samples, which is not a multiple of the global batch {global_batch}")]
    MisalignedCursor { consumed: u64, global_batch: u64 },

    /// The global position would pass `u64::MAX`.
    #[error("global position overflow: {consumed} consumed + {more} more exceeds 2^64 - 1")]
    PositionOverflow { consumed: u64, more: u128 },
}
