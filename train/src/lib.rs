//! gantry-train: GPT-2 and Llama style decoders trained with tensor, pipeline and data
//! parallelism on libtorch (through tch), over gantry's collectives.
//!
//! # Layout
//! - [`spec`]: the TOML job spec (`deny_unknown_fields`, `--set` overrides, `validate`).
//! - [`param`]: parameters as slices of global tensors; layout-independent initialization.
//! - [`tensor_parallel`]: the f/g operators, vocabulary-parallel embedding and loss.
//! - [`model`]: the decoder as units (embedding, attention, MLP, head); stage partitioning.
//! - [`schedule`]: 1F1B and GPipe as data, with a rendezvous simulator in the tests.
//! - [`pipeline`]: the unit executor (leaf inputs, cut gradients) and schedule interpreter.
//! - [`flat`]: parameters and gradients as views of flat per-bucket buffers;
//!   [`autograd`]: the two autograd calls tch lacks (backward with a gradient, set `.grad`).
//! - [`grads`]: data-parallel gradient buckets on their own thread; ZeRO-1 shards.
//! - [`optim`]: AdamW over flat buckets, LR schedule, clipping.
//! - [`hf`]: mapping to Hugging Face GPT-2 names for `gantry checkpoint export`.
//! - [`trainer`]: one rank's run; [`metrics`]: `metrics.jsonl`; [`generate`]: samples;
//!   [`progress`]: the per-rank progress file a worker watches (`GANTRY_PROGRESS_FILE`).
//! - [`comm`]: tch tensors over gantry communicators.
//! - [`checkpointing`]: which slices a rank saves and loads (params, AdamW moments, ZeRO-1
//!   shards as rectangles), snapshots, resume; the parameter layout and tokenizer saved with
//!   each checkpoint for evaluation and serving.
//! - [`weights`]: a model's parameters from a checkpoint or a registry TP share;
//!   [`eval`]: loss and perplexity over a validation split at any TP degree;
//!   [`infer`]: generation with a KV cache over several sequences at once.
//!
//! # Data flow of a step
//! The prefetcher yields this DP rank's micro-batches; the first stage embeds tokens, units
//! run forward (TP collectives inside), activations go to the next stage over the pipeline
//! communicator; the last stage computes the loss; backward runs unit by unit in reverse,
//! gradients flow back stage by stage; buckets of finished gradients are averaged over DP
//! while backward continues; then clipping by the global norm and AdamW; ZeRO-1 gathers the
//! updated shards. The model sees no globals: every group is passed in.

pub mod autograd;
pub mod checkpointing;
pub mod comm;
pub mod error;
pub mod eval;
pub mod flat;
pub mod fused;
pub mod generate;
pub mod grads;
pub mod hf;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod param;
pub mod pipeline;
pub mod progress;
pub mod schedule;
pub mod spec;
pub mod tensor_parallel;
pub mod trainer;
pub mod weights;

pub use error::TrainError;
pub use spec::JobSpec;
pub use tch;

/// Load libtorch's CUDA library so CUDA devices become visible: the linker drops it because
/// nothing references it directly (tch-rs issue #980). A missing library is fine (CPU hosts).
pub fn load_cuda_backend() -> bool {
    let name = c"libtorch_cuda.so";
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally leaked so
    // the library stays loaded for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}
