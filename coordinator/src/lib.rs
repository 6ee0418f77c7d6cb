//! # gantry-coordinator
//!
//! The control plane's centre. Worker daemons register and heartbeat; the CLI submits jobs
//! and asks about them; the coordinator decides where every rank runs and restarts jobs
//! when ranks or workers fail.
//!
//! Data flows in one direction through three layers:
//! - [`core`]: the pure scheduler. Events in (worker joined, heartbeat with rank reports,
//!   job submitted, cancel, cordon, timer), actions out (start/stop ranks, restart, finish).
//!   No I/O, no clock; golden and property tests drive it with simulated time.
//! - [`state`]: the durable store (redb). Every record the core marks dirty is committed
//!   before the call that changed it is answered, so `kill -9` loses nothing acknowledged.
//! - [`service`] / [`server`]: tonic gRPC services (`Cluster` for workers, `Admin` for the
//!   CLI, both behind the cluster token) and `/metrics`, all on one port.
//!   [`server::serve`]`(listener, config, shutdown)` runs them on a listener the caller bound
//!   (the binary binds `--listen` and prints the address; tests bind `127.0.0.1:0`) until the
//!   shutdown future completes: the one daemon shape, shared with the worker and the registry.
//!
//! The wire types are generated from `proto/gantry.proto` into [`proto`]; [`auth`] holds
//! the token interceptors and TLS settings that workers and the CLI share; [`job_secret`]
//! derives each attempt's data-plane secret, which reaches the ranks in their assignments.

pub mod auth;
pub mod convert;
pub mod core;
pub mod job_secret;
pub mod metrics;
pub mod server;
pub mod service;
pub mod state;

/// Generated from `proto/gantry.proto` (the documented control-plane API).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("gantry.v1");
}
