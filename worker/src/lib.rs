//! # gantry-worker
//!
//! The worker daemon (`gantry worker`): one per node. It offers the node's resources to the
//! coordinator, runs the rank processes the coordinator places here, and serves their logs
//! and its metrics. It knows nothing about tensors or training: a rank is a process with an
//! environment, a log file and an optional progress file.
//!
//! # How data flows
//! - **Register, heartbeat** ([`daemon`]): the worker registers its [`resources`] (name,
//!   hostname, address, CPU slots, GPUs via the CUDA driver when present, labels, service
//!   address, MASTER_PORT range), then heartbeats every `heartbeat_ms` with a report on every
//!   rank it knows. Every reply carries the *complete* set of ranks the coordinator wants
//!   here. When the coordinator is unreachable the ranks keep running and the worker retries
//!   with backoff, registering again (with its rank reports) once it answers.
//! - **Reconcile** ([`reconcile`]): a pure function turns desired-vs-known into ranks to
//!   start, stop and forget. A (job, attempt, rank) starts at most once; an exited rank stays
//!   reported while it is desired, so a restarted coordinator learns about exits it missed.
//! - **Supervise** ([`supervisor`], [`launch`]): each rank runs in its own process group
//!   with `PR_SET_PDEATHSIG=SIGKILL` (ranks die with their worker), the worker's environment
//!   without its secrets plus torchrun-compatible and gantry variables, stdout and stderr
//!   appended to
//!   `<state_dir>/jobs/<job>/attempt-<attempt>/rank-<rank>.log`. Stopping sends SIGTERM to
//!   the group, SIGKILL after the grace period. Exits are noticed at once and reported by an
//!   early heartbeat. Step statistics come from the progress file the rank writes; a
//!   failed rank's last error line, when it names a dead or silent peer rank, is reported
//!   as `blamed_rank` ([`blame`]) so the coordinator blames that rank and suspects its worker.
//! - **Serve** ([`server`]): one port (the listener handed to [`serve`]) with the `WorkerLogs`
//!   gRPC service (the CLI reads and follows logs here, behind the cluster token) and
//!   `GET /metrics` ([`metrics`]).
//!
//! The wire types and the token/TLS helpers come from `gantry_coordinator::{proto, auth}`.
//!
//! # Layout
//! - [`config`]: [`WorkerConfig`] (the `gantry worker` flags), its checks, [`parse_labels`].
//! - [`daemon`]: [`serve`]`(listener, config, shutdown)`: checks, state directory, resources,
//!   then the loop until shutdown. The caller binds the listener (the binary binds `--listen`
//!   and prints the address; tests bind `127.0.0.1:0`): the daemon shape of the coordinator
//!   and the registry too.
//! - [`reconcile`]: the pure desired-vs-known decision, with [`RankKey`].
//! - [`supervisor`]: rank states, stop with grace, exit events, reports, progress files.
//! - [`blame`]: the peer rank a failed rank's last error names.
//! - [`launch`]: paths, the rank environment, the command line, the per-rank thread.
//! - [`scrub`]: which of the worker's variables a rank inherits (no secrets unless the job
//!   names them).
//! - [`resources`]: hostname, the route to the coordinator, CPU slots, GPUs.
//! - [`server`] and [`metrics`]: the worker's port.
//! - [`error`]: [`WorkerError`] for the daemon, [`StartError`] for a rank that cannot start.

pub mod blame;
pub mod config;
pub mod daemon;
pub mod error;
pub mod launch;
pub mod metrics;
pub mod reconcile;
pub mod resources;
pub mod scrub;
pub mod server;
pub mod supervisor;

pub use config::{WorkerConfig, parse_labels};
pub use daemon::serve;
pub use error::{StartError, WorkerError};
pub use reconcile::RankKey;
pub use supervisor::{Event, LiveRanks, RankState, Supervisor, SupervisorConfig};
