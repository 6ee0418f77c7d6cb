//! # gantry-collectives
//!
//! Process groups for gantry's rank processes: a [`Communicator`] offers all_reduce,
//! broadcast, reduce, all_gather, reduce_scatter, all_to_all, tagged send/recv and barrier over
//! plain host buffers of seven dtypes, with a deadline on every call, mismatch detection and a
//! flight recorder. GPU buffers go through the separate [`nccl`] backend.
//!
//! # Layout
//! - [`dtype`], [`reduce`]: element types and the vectorizable reduction kernels.
//! - [`header`]: the 40-byte header every message carries (what the mismatch check compares).
//! - [`link`]: the [`Link`] trait, a nonblocking byte pipe to one peer, implemented by
//!   [`tcp`], [`tls`] (TLS 1.3 over the same TCP connection), [`quic`] (quinn), [`shm`]
//!   (rings in `/dev/shm`) and [`local`] (threads, for tests).
//! - [`transport`]: the [`Transport`] trait the algorithms are written against (one primitive,
//!   `exchange`: send to one peer while receiving, and maybe reducing, from another) and
//!   [`MeshTransport`], which implements it over links: framing, header checks,
//!   reduce-on-arrival, deadlines, waiting.
//! - [`algo`]: the collective algorithms (pipelined ring, recursive doubling, binomial trees,
//!   pairwise all-to-all) as plain functions over `&mut dyn Transport`.
//! - [`comm`]: [`Communicator`], the public API: sequence numbers, algorithm choice, deadlines,
//!   error attribution, `split` into sub-groups.
//! - [`fabric`]: how a process joins a world: rendezvous through a [`store::Store`], lazy
//!   per-peer links (shared memory when the peer is on this host, TCP, TLS or QUIC otherwise:
//!   `TransportChoice` × `InterHost` → `Wire`).
//! - [`auth`]: the job secret and the handshake that opens every store connection and
//!   network link (HMAC-SHA256 over nonces from both sides), and the binding of an encrypted
//!   link's session to that secret; failures are closed, logged, counted.
//! - [`rank_env`]: a rank process's environment, written by every launcher ([`RankEnv`]:
//!   torchrun's and gantry's variables, the thread policy) and read back by the rank
//!   ([`Bootstrap::from_lookup`]) in one place. The library reads no environment itself:
//!   the binary passes lookups (`Bootstrap::from_lookup`, `FabricConfig::with_lookup`).
//! - [`spawn`]: a local world of rank processes around a launcher-hosted store (benchmarks,
//!   multi-process tests).
//! - [`layout`]: [`ParallelLayout`], the DP×PP×TP mesh and its groups.
//! - [`recorder`]: the flight recorder dumped on errors and SIGUSR1.
//!
//! # Example
//!
//! Two ranks as threads of one process (real processes join with [`Fabric::from_bootstrap`]):
//!
//! ```
//! use gantry_collectives::{Fabric, FabricConfig, ReduceOp};
//!
//! let ranks: Vec<_> = Fabric::local_world(2, FabricConfig::default(), 1 << 16)
//!     .into_iter()
//!     .map(|fabric| {
//!         std::thread::spawn(move || {
//!             let mut world = fabric.world();
//!             let mut grads = [world.rank() as f32 + 1.0; 4];
//!             world.all_reduce_in_place(&mut grads, ReduceOp::Avg).unwrap();
//!             grads
//!         })
//!     })
//!     .collect();
//! for rank in ranks {
//!     assert_eq!(rank.join().unwrap(), [1.5; 4]);
//! }
//! ```
//!
//! Data flows: caller buffer → `Communicator` (checks, seq, recorder) → `algo::*` → `Transport::exchange`
//! → `Link`s → peer's `Link` → peer's receive sink (copy or reduce into its buffer).

pub mod algo;
pub mod auth;
pub mod comm;
#[doc(hidden)]
pub mod conformance;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod fabric;
mod filed;
pub mod header;
pub mod layout;
pub mod link;
pub mod local;
pub mod nccl;
pub mod quic;
pub mod rank_env;
pub mod recorder;
pub mod reduce;
pub mod shm;
pub mod spawn;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod transport;

pub use auth::{JobAuth, JobSecret};
pub use comm::{Algorithm, CallOptions, Communicator};
pub use dtype::{DType, Element, ReduceOp};
pub use error::{CommError, LinkError};
pub use fabric::{Bootstrap, Fabric, FabricConfig, TransportChoice};
pub use header::{OpDesc, OpKind};
pub use layout::{Dim, LayoutError, ParallelLayout};
pub use link::{Link, LinkKind};
pub use rank_env::{EnvError, HostCores, OmpWait, RankEnv, RankProgram, ThreadDefaults, thread_defaults};
pub use transport::{MeshTransport, Transport, WaitPolicy};
