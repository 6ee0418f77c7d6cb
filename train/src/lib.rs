//! gantry-train: GPT-2 and Llama style decoders trained with tensor, pipeline and data
//! parallelism on libtorch (through tch), over gantry's collectives.
//!
//! # Layout
//! - [`spec`]: the TOML job spec (`deny_unknown_fields`, `--set` overrides, `validate`).
//! - [`param`]: parameters as slices of global tensors; layout-independent initialization.
//! - [`model`]: the decoder as units (embedding, attention, MLP, head); stage partitioning.
//! - One module per parallelism: [`tensor_parallel`] (the f/g operators, vocabulary-parallel
//!   embedding and loss); [`schedule`] (1F1B and GPipe as data, with a rendezvous simulator in
//!   the tests) and [`pipeline`] (the unit executor and schedule interpreter);
//!   [`data_parallel`] (gradient buckets as flat buffers the parameters are views of, their
//!   averaging on a thread overlapped with backward, the tied embedding, the global norm,
//!   clipping, the AdamW update and ZeRO-1, behind `finish_step`).
//! - [`optim`]: AdamW (fused or manual), LR schedule, the clip coefficient and sum of squares;
//!   [`fused`], [`autograd`] and [`autocast`] (bf16 CUDA autocast): the libtorch calls tch
//!   lacks (through `train/csrc/`); [`fused_ops`]: fused operators with their own backward
//!   (GPT-2's linear + bias + GELU on the CPU), chosen by the run context.
//! - [`place`]: [`place::RankPlace`], where a rank sits (layout, coordinates, device), built
//!   once by the binary; [`run_context`]: what the launcher said (job id, AdamW choice,
//!   samples log, progress file), read from the environment by the binary, not here.
//! - [`trainer`]: one rank's run as a recipe; [`feed`]: the rank's data (train/valid split,
//!   cursor checks, prefetch); [`reporter`]: `metrics.jsonl` ([`metrics`]), the progress file
//!   ([`progress`]), the samples log and the summary; [`generate`]: end-of-run samples.
//! - [`comm`]: tch tensors over gantry communicators.
//! - [`checkpointing`]: which slices a rank saves and loads (params, AdamW moments, ZeRO-1
//!   shards as rectangles), snapshots, resume; the parameter layout and tokenizer saved with
//!   each checkpoint for evaluation and serving.
//! - [`hf`]: Hugging Face export (GPT-2 / Llama tensors and configs, tokenizer files) for
//!   `gantry checkpoint export`.
//! - [`weights`]: a model's parameters from a checkpoint or a registry TP share;
//!   [`eval`]: loss and perplexity over a validation split at any TP degree;
//!   [`infer`]: generation with a KV cache over several sequences at once.
//!
//! # Data flow of a step
//! The binary builds the rank's `RankPlace` and `RunContext` and calls
//! [`trainer::train_observed`]. Each step the feed yields this DP rank's micro-batches; the
//! first stage embeds tokens, units run forward (TP collectives inside), activations go to the
//! next stage over the pipeline communicator; the last stage computes the loss; backward runs
//! unit by unit in reverse, gradients flow back stage by stage; buckets of finished gradients
//! are averaged over DP while backward continues; then `DataParallel::finish_step` sums the
//! tied embedding, clips by the global norm, runs AdamW and (ZeRO-1) gathers the updated
//! shards; the reporter records the step. `train/` sees no globals and reads no environment:
//! every group, the layout and the run context are passed in.

pub mod autocast;
pub mod autograd;
pub mod checkpointing;
pub mod comm;
pub mod data_parallel;
pub mod error;
pub mod eval;
pub mod feed;
pub mod fused;
pub mod fused_ops;
pub mod generate;
pub mod hf;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod param;
pub mod pipeline;
pub mod place;
pub mod progress;
pub mod reporter;
pub mod run_context;
pub mod schedule;
pub mod spec;
pub mod tensor_parallel;
pub mod trainer;
pub mod weights;

pub use error::TrainError;
pub use spec::JobSpec;
pub use tch;

/// Load libtorch's CUDA library so CUDA devices become visible: the linker drops it because
/// nothing references it directly (tch-rs issue #980). A missing library is fine on CPU hosts:
/// the loader's reason is logged at debug level. Where a GPU is wanted, use
/// [`load_cuda_backend_for`]`(true)`.
pub fn load_cuda_backend() -> bool {
    load_cuda_backend_for(false)
}

/// [`load_cuda_backend`], saying why a failed load failed (the loader's `dlerror()` text): at
/// warn level when `gpu_requested` (the job asked for CUDA, so the failure is the cause of the
/// "no CUDA device" error that follows), at debug level otherwise (expected on CPU hosts).
pub fn load_cuda_backend_for(gpu_requested: bool) -> bool {
    match dlopen_global(CUDA_BACKEND) {
        Ok(()) => {
            tracing::debug!("loaded {}", CUDA_BACKEND.to_string_lossy());
            true
        }
        Err(reason) => {
            let lib = CUDA_BACKEND.to_string_lossy();
            if gpu_requested {
                tracing::warn!(reason, "cannot load {lib}: CUDA devices stay invisible to libtorch");
            } else {
                tracing::debug!(reason, "cannot load {lib} (expected on a host without CUDA)");
            }
            false
        }
    }
}

const CUDA_BACKEND: &std::ffi::CStr = c"libtorch_cuda.so";

/// `dlopen(name, RTLD_NOW | RTLD_GLOBAL)`, kept open for the life of the process; on failure
/// the loader's `dlerror()` text (which names the library or dependency it could not load).
fn dlopen_global(name: &std::ffi::CStr) -> Result<(), String> {
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally leaked so
    // the library stays loaded. dlerror returns NULL or a NUL-terminated string owned by the
    // loader, read here on the same thread before any other dl* call.
    unsafe {
        if !libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL).is_null() {
            return Ok(());
        }
        let reason = libc::dlerror();
        if reason.is_null() {
            Err(format!("dlopen({}) failed without a reason", name.to_string_lossy()))
        } else {
            Err(std::ffi::CStr::from_ptr(reason).to_string_lossy().into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_load_says_why() {
        let e = super::dlopen_global(c"libgantry-no-such-library.so").unwrap_err();
        assert!(e.contains("libgantry-no-such-library.so"), "{e}");
        assert!(e.contains("No such file") || e.contains("cannot open"), "{e}");
        // A library that is there loads (and the function says nothing went wrong).
        super::dlopen_global(c"libc.so.6").unwrap();
    }

    #[test]
    fn the_cuda_backend_loads_or_says_why() {
        // Here (no GPU, a libtorch without cuBLAS & co.) it usually fails; on the GPU host it
        // loads. Either way the answer is consistent with the reason.
        match super::dlopen_global(super::CUDA_BACKEND) {
            Ok(()) => assert!(super::load_cuda_backend()),
            Err(reason) => {
                assert!(!reason.is_empty());
                assert!(!super::load_cuda_backend_for(true));
            }
        }
    }
}
