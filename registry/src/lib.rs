//! # gantry-registry
//!
//! The model registry: named models, each a sequence of immutable versions registered from
//! committed gantry checkpoints, with movable aliases (`production`, `staging`, ...) that may
//! split traffic between versions by weight. This crate is the storage and domain core; it
//! never loads a tensor; its HTTP face lives in [`http`], over the same API.
//!
//! # How data flows
//! 1. **Checkpoint URL → verify** ([`intake`], called by
//!    [`store::Registry::register_version`]): the checkpoint (a local path, `file://` or
//!    `s3://` root, latest committed step or a given one) is opened through `gantry-checkpoint`; its manifest must exist (the commit) and parse, and every
//!    chunk object is re-read and checked against its xxh3 and size. An uncommitted, corrupt or
//!    incomplete checkpoint is refused with the checkpoint crate's message, naming the object.
//! 2. **→ version record** ([`model::VersionRecord`]): lineage (job id, step, tokens seen, data
//!    cursor, layout, model config, spec hash) is copied from the manifest; the model is
//!    created if new and the next version number assigned in the same redb write transaction,
//!    so versions are 1, 2, 3, ... per model without gaps or duplicates. A version never changes
//!    afterwards except for appended eval records.
//! 3. **→ aliases** ([`model::Alias`]): `(version, weight)` targets, set or moved in one
//!    transaction; weights are checked by [`split::validate`].
//! 4. **→ resolution** ([`name::ModelRef`], [`store::Registry::resolve`]): `name` and
//!    `name@latest` mean the highest version, `name@3` version 3, `name@alias` the alias's
//!    target chosen by [`split::pick`] from a caller-supplied draw (deterministic; no RNG).
//!    Without a route key consecutive requests interleave by the weights; a request with one
//!    (`X-Gantry-Route-Key`, or the OpenAI routes' `user`) draws [`split::sticky_draw`], the
//!    xxh3 of the key, so one key keeps one version while the alias's weights stand.
//! 5. **→ shadows** (`http/shadow.rs`): an alias may mirror a percentage of its generation
//!    requests to a shadow version, compare the answers and count the outcomes on `/metrics`;
//!    clients only ever get the primary's answer, and mirrors are dropped first under load.
//!    Moving an alias loads its new targets before it switches, and the model cache never
//!    evicts a version an alias points at.
//!
//! [`http`] serves all of this as an HTTP/JSON service (`gantry registry serve`: the binary
//! binds the listener and hands it to [`http::serve`] with a shutdown future), including
//! each version's checkpoint files, the tensor slices one TP rank needs, and text generation
//! through [`serving`] (continuous batching over a KV cache; the model itself is plugged in
//! by the binary, so this crate never links a tensor library).
//!
//! Storage is one redb file (copy-on-write, fsynced commits, locked against a second opener),
//! records as JSON, like the coordinator's state.

pub mod error;
pub mod http;
pub mod intake;
pub mod model;
pub mod name;
pub mod serving;
pub mod split;
pub mod store;

pub use error::RegistryError;
pub use intake::CheckpointRoot;
pub use model::{Alias, EvalRecord, ModelRecord, VersionRecord};
pub use name::{ModelRef, NameError, Selector};
pub use split::WeightError;
pub use store::{MAX_PAGE, Page, Registry};
