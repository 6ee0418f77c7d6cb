//! # gantry-bench
//!
//! The benchmark cores behind `gantry bench …` and `gantry data bench`. Each measures a real
//! gantry component next to a raw peer doing the same work in the same place (raw file writes
//! next to a checkpoint save, a direct read next to a registry download, a memcpy next to the
//! token reader), so every figure comes with the ratio that says what the component costs.
//! Benchmarks print figures; none passes or fails on speed.
//!
//! # How a benchmark flows
//! 1. **Setup**: a plain config struct (filled by the `gantry` binary from its flags, checked
//!    by `validate()`), scratch space under a fresh directory or prefix, data generated
//!    deterministically so what is read back can be checked element by element.
//! 2. **Peer**: the raw baseline (std::fs, a plain `Store::put`, loopback TCP, memcpy).
//! 3. **Rounds**: every operation repeated, component and peer interleaved so both see the
//!    machine's slow and fast phases alike.
//! 4. **Stats**: [`stats`] — medians, quantiles, GB/s and paired ratios, one definition each.
//! 5. **Report**: a serializable report struct; the binary prints it as a table or `--json`.
//!
//! # Layout
//! - [`stats`]: the statistics every benchmark reports; [`host`]: CPU time, page cache, load.
//! - [`collective_ops`]: `gantry bench collectives` (nccl-tests style table per size);
//!   [`nccl_bench`]: `gantry bench nccl` (NCCL on device memory, f32 and bf16).
//! - [`checkpoint_io`]: `gantry bench checkpoint` (save, load, verify against raw I/O).
//! - [`control_plane`]: `gantry bench cluster` (simulated workers heartbeating a real
//!   coordinator); [`startup`]: `gantry bench startup` (submit to every rank's first step);
//!   both start real daemons of the `gantry` executable through [`daemons`].
//! - [`registry_service`]: `gantry bench registry` (downloads, generation).
//! - [`data_reader`]: `gantry data bench` (token reader, zstd frames, materialization).
//! - [`error`]: [`BenchError`], the one error type.
//!
//! The `gantry` binary owns the flags and the process-level wiring (spawning rank processes,
//! the executable's path, the environment); everything here takes plain values.

pub mod checkpoint_io;
pub mod collective_ops;
pub mod control_plane;
pub mod daemons;
pub mod data_reader;
pub mod error;
pub mod host;
pub mod nccl_bench;
pub mod registry_service;
pub mod startup;
pub mod stats;

pub use error::BenchError;
