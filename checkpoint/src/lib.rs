//! # gantry-checkpoint
//!
//! Sharded checkpoints on object storage, independent of any tensor library: the trainer
//! hands in named slices of global tensors as bytes (dtype, global shape, offsets, lengths)
//! and asks for slices back in whatever layout it now has.
//!
//! # How data flows
//! - **Save** ([`writer`]): each rank's [`writer::Saver`] packs its slices into chunk objects
//!   under `step-NNNNNNNN/rank-RRRRR/`, checksums them (xxh3) and uploads them on a background
//!   thread, then writes its rank index. Rank 0 waits for every rank's index, checks the slices
//!   tile every tensor and creates `manifest.json` if absent — the commit — then moves
//!   `latest` and applies [`retention`].
//! - **Load** ([`reader`]): [`reader::Checkpoint::open`] reads a committed manifest;
//!   [`reader::Checkpoint::load`] asks the pure [`planner`] which saved entries overlap each
//!   requested slice, fetches just those byte ranges, verifies their checksums and copies the
//!   overlaps into place ([`boxes`]); from a local disk (`local_read.rs`) entries that land
//!   in their request as one run are read straight there, on one thread per core. Any change
//!   of TP, PP, DP or ZeRO-1 is a different set of requested rectangles.
//! - **Where** ([`location`]): a checkpoint URL parsed once into a [`StorageLocation`]
//!   (a local path or `file://…`, or `s3://bucket[/prefix]`; any other scheme is refused by
//!   name), made absolute for specs, resolved for reading (must exist) or for writing
//!   (created). Every crate that accepts a checkpoint URL parses it here.
//! - **Storage** ([`store`]): one blocking API over `object_store` for a location, with
//!   multipart uploads, ranged reads and create-if-absent. [`Store::open`] creates a missing
//!   local directory (writers); [`Store::open_existing`] refuses one (servers, readers).
//! - **Fencing** ([`fence`]): a save may carry its job's attempt; rank 0 claims the directory
//!   for it at start, and a commit of an attempt a later one has claimed is refused, so the
//!   ranks of an attempt the coordinator replaced (a partition) cannot commit over the new one.
//! - **Snapshot memory** ([`snapshot`]): a save's bytes may be ranges of one reused host
//!   buffer (pinned, on a GPU) that a device copy is still filling; the writer waits for it
//!   before reading and hands the buffer back to its pool once written.
//! - [`export`]: a whole model as one safetensors file.
//! - [`plain`]: opening a local checkpoint's file without following symlinks (what a server
//!   that hands out checkpoint files uses).
//!
//! The format is specified in docs/checkpoint-format.md.

pub mod boxes;
pub mod error;
pub mod export;
pub mod fence;
pub mod format;
mod local_read;
pub mod location;
pub mod plain;
pub mod planner;
pub mod reader;
pub mod retention;
pub mod snapshot;
pub mod store;
pub mod writer;

pub use error::CheckpointError;
pub use fence::Fence;
pub use format::{DType, JobState, Lineage, Manifest, ParamLayout, SliceSpec, tp_share};
pub use location::{LocationError, Role, StorageLocation};
pub use reader::{Checkpoint, SkippedStep, Which, committed_steps};
pub use retention::Retention;
pub use snapshot::{BufferPool, HostBuffer, Recycled, SnapshotBytes};
pub use store::{S3Options, Store, StoreConfig};
pub use writer::{SaveReport, SaveRequest, Saver, SaverConfig, TensorData};
