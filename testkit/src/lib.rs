//! Test support shared by gantry's crates: things a test needs that are not gantry.
//!
//! # Layout
//!
//! - [`netns`]: a cluster of hosts on one machine in Linux network namespaces (addresses,
//!   host names, a bridge, partitions, rate limits), for tests of collectives, daemons and
//!   training across hosts. `scripts/netns-cluster.sh` builds the same clusters by hand.
//!
//! No tch and no gantry crate: every crate's tests can depend on it without cycles.

pub mod netns;
