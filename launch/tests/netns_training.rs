//! Training across hosts: a coordinator and two worker daemons, each on a host of its own
//! (network namespaces from `gantry-testkit`, each with its own address and host name), run a
//! dp 2 × tp 2 job with two ranks per host. Placement keeps each TP group inside a host
//! (shared memory) while the DP all-reduces cross hosts (TCP), and every step's loss equals a
//! one-host `gantry launch --local 4` run of the same layout. Skipped with one line where this
//! machine cannot make namespaces (failing instead when `CI=true`).

mod common;

use common::netns::{Daemons, assert_tp_pairs_share_a_host, ci, dp2_tp2_spec, losses, reference, worker_of};
use gantry_testkit::netns::start_or_skip;
use std::time::Duration;

#[test]
fn dp2_tp2_over_two_hosts_matches_one_host() {
    let Some(cluster) = start_or_skip("dp2_tp2_over_two_hosts", &["head", "n1", "n2"], ci()) else {
        return;
    };
    let dir = common::tempdir("netns", "train");
    let spec = dp2_tp2_spec(&dir, "netns", 20, "[cluster]\nmax_restarts = 0");
    // The one-host reference: same spec, same layout, four ranks on this host.
    let want = losses(&reference(&dir, &spec, false));
    assert_eq!(want.len(), 20, "reference steps");

    let daemons = Daemons::start(&cluster, &dir, 10, &["n1", "n2"]);
    // Each worker registered with its own host's name and address.
    let workers = daemons.json(&["workers"]);
    for w in workers.as_array().unwrap() {
        let host = cluster.host(w["name"].as_str().unwrap()).unwrap();
        assert_eq!(w["hostname"], host.hostname(), "{w:#}");
        assert_eq!(w["address"], host.addr().to_string(), "{w:#}");
    }

    let id = daemons.submit(&spec);
    let job = daemons.wait_end(id, Duration::from_secs(600));
    assert_tp_pairs_share_a_host(&job);

    // Rank 0 (dp 0, tp 0 of the last stage) writes the metrics on its worker.
    let got = losses(&daemons.run_dir(&worker_of(&job, 0), id, 1));
    // Same arithmetic in the same order whatever carries the bytes: exactly equal.
    assert_eq!(got, want, "per-step losses across hosts vs one host");
}
