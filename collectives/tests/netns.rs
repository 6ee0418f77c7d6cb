//! Collectives across hosts: real rank processes in network namespaces (`gantry-testkit`),
//! each namespace a host with its own address and host name. Rank 0 serves the rendezvous
//! store at its host's address, as under torchrun on a real cluster; ranks find their own
//! address by the route towards it and listen there. Skipped with one line where this machine
//! cannot make namespaces (failing instead when `CI=true`).

use gantry_collectives::rank_env::{Bootstrap, RankEnv, STORE_EXTERNAL};
use gantry_collectives::{JobAuth, JobSecret};
use gantry_testkit::netns::{Cluster, HostProcess, start_or_skip};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

const RANK_BIN: &str = env!("CARGO_BIN_EXE_collectives-test-rank");

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One rank's end: exit status, stdout lines, stderr.
struct Ended {
    status: Option<std::process::ExitStatus>,
    stdout: Vec<String>,
    stderr: String,
}

/// Run `collectives-test-rank ARGS` with rank `r` on host `placement[r]`, all with `env`, and
/// wait for all of them (killing the rest after `limit`).
fn run_world(
    cluster: &Cluster,
    placement: &[usize],
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Vec<Ended> {
    let world = placement.len();
    let master = cluster.hosts()[placement[0]].addr().to_string();
    // One secret for the world: every store and link connection across hosts proves it.
    let auth = JobAuth::new(JobSecret::generate().unwrap(), "netns", 1);
    let mut ranks = Vec::new();
    for (rank, &h) in placement.iter().enumerate() {
        let local: Vec<usize> = (0..world).filter(|&s| placement[s] == h).collect();
        // A fresh namespace: every port is free. Rank 0 serves the store (not external).
        let mut place = Bootstrap::local(rank, world, 29500, false);
        place.master_addr = master.clone();
        place.local_rank = local.iter().position(|&s| s == rank).unwrap();
        place.local_world = local.len();
        place.auth = Some(auth.clone());
        let mut cmd = cluster.hosts()[h].command(RANK_BIN);
        cmd.args(args)
            .env_remove(STORE_EXTERNAL)
            .env_remove("GANTRY_ADVERTISE_HOST")
            .envs(RankEnv::new(place).vars())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ranks.push(HostProcess::spawn(&mut cmd).expect("start a rank"));
    }
    let readers: Vec<_> = ranks
        .iter_mut()
        .map(|p| {
            let (out, mut err) = (p.child().stdout.take().unwrap(), p.child().stderr.take().unwrap());
            std::thread::spawn(move || {
                let lines: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                (lines, text)
            })
        })
        .collect();
    let status: Vec<_> = ranks.iter().map(|p| p.wait_for(limit).unwrap()).collect();
    // Whatever still runs is killed here, which ends the readers.
    drop(ranks);
    readers
        .into_iter()
        .zip(status)
        .map(|(reader, status)| {
            let (stdout, stderr) = reader.join().unwrap();
            Ended { status, stdout, stderr }
        })
        .collect()
}

#[test]
fn conformance_across_three_hosts_tcp_between_shm_within() {
    conformance_across_three_hosts("tcp");
}

/// `GANTRY_INTER_HOST=tls`: what leaves a host is encrypted and bound to the job secret, what
/// stays on it still goes through shared memory.
#[test]
fn conformance_across_three_hosts_tls_between_shm_within() {
    conformance_across_three_hosts("tls");
}

/// `GANTRY_INTER_HOST=quic`: the same over QUIC between hosts (veth MTU 1500).
#[test]
fn conformance_across_three_hosts_quic_between_shm_within() {
    conformance_across_three_hosts("quic");
}

fn conformance_across_three_hosts(inter_host: &str) {
    let test = format!("conformance_across_three_hosts_{inter_host}");
    let Some(cluster) = start_or_skip(&test, &["h0", "h1", "h2"], ci()) else {
        return;
    };
    // Two ranks on h0 (shared memory between them), one on each other host.
    let placement = [0, 0, 1, 2];
    let env = [
        ("GANTRY_TRANSPORT", "auto"),
        ("GANTRY_INTER_HOST", inter_host),
        ("GANTRY_TIMEOUT_MS", "60000"),
    ];
    let ended = run_world(&cluster, &placement, &["conformance"], &env, Duration::from_secs(600));
    for (rank, e) in ended.iter().enumerate() {
        let host = cluster.hosts()[placement[rank]].hostname();
        assert!(
            e.status.is_some_and(|s| s.success()) && e.stdout.iter().any(|l| l.starts_with("PASS")),
            "rank {rank} on {host} ended {:?}\nstdout:\n{}\nstderr:\n{}",
            e.status,
            e.stdout.join("\n"),
            e.stderr
        );
        let links: BTreeMap<usize, &str> = e
            .stdout
            .iter()
            .filter_map(|l| {
                let mut f = l.strip_prefix("LINK ")?.split(' ');
                Some((f.next()?.parse().ok()?, f.next()?))
            })
            .collect();
        let want: BTreeMap<usize, &str> = (0..placement.len())
            .filter(|&p| p != rank)
            .map(|p| {
                (
                    p,
                    if placement[p] == placement[rank] {
                        "shm"
                    } else {
                        inter_host
                    },
                )
            })
            .collect();
        assert_eq!(links, want, "rank {rank} on {host}: transports by peer");
    }
}
