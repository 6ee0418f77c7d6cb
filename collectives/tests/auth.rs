//! The data plane's handshake against real rank processes on loopback: while a job runs, raw
//! sockets with no secret, with a wrong secret and with a replayed handshake are refused by the
//! rendezvous store and by a rank's link listener, nothing they sent is applied, nobody is
//! blamed, and the job finishes with correct sums. The secret appears in no rank's output.

use gantry_collectives::auth::Party;
use gantry_collectives::auth::handshake::Channel;
use gantry_collectives::auth::probe::{Target, intrusions};
use gantry_collectives::spawn::{LocalWorld, spawn_local_world};
use gantry_collectives::store::{Store, TcpStore};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RANK_BIN: &str = env!("CARGO_BIN_EXE_collectives-test-rank");
const PATIENCE: Duration = Duration::from_secs(60);

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every rank's stdout lines as (rank, line), and its stderr once it ends.
fn collect(world: &mut LocalWorld) -> (mpsc::Receiver<(usize, String)>, Vec<std::thread::JoinHandle<String>>) {
    let (tx, rx) = mpsc::channel();
    let mut errs = Vec::new();
    for (rank, child) in world.children.iter_mut().enumerate() {
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((rank, line));
            }
        });
        let mut err = child.stderr.take().unwrap();
        errs.push(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }));
    }
    (rx, errs)
}

fn wait_for(lines: &mpsc::Receiver<(usize, String)>, seen: &mut Vec<(usize, String)>, what: &str, ranks: usize) {
    let until = Instant::now() + PATIENCE;
    while seen.iter().filter(|(_, l)| l == what).count() < ranks {
        match lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("waiting for {ranks} × `{what}`: {e}; so far {seen:?}"),
        }
    }
}

#[test]
fn the_store_and_a_ranks_listener_refuse_intruders_while_the_job_runs_on() {
    let dir = temp_dir("intruders");
    let hold = dir.join("go");
    let world_size = 3;
    let args: Vec<OsString> = ["loop", "12", "4096"].iter().map(OsString::from).collect();
    let env: Vec<(String, String)> = [
        ("GANTRY_TRANSPORT", "tcp".to_string()),
        ("GANTRY_TIMEOUT_MS", "120000".into()),
        ("GANTRY_TEST_AFTER", "4".into()),
        ("GANTRY_TEST_HOLD_FILE", hold.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut world = spawn_local_world(Path::new(RANK_BIN), &args, world_size, &env).expect("spawn ranks");
    let (lines, stderrs) = collect(&mut world);
    let mut seen = Vec::new();
    // Every rank has run four all_reduces over TCP, so every link exists, and now waits.
    wait_for(&lines, &mut seen, "holding", world_size);

    let right = world.store.auth().clone();
    let store_addr = format!("127.0.0.1:{}", world.store.port());
    let store = TcpStore::connect(&store_addr, PATIENCE, Some(right.clone()), Party::Launcher).unwrap();
    let peer0: serde_json::Value =
        serde_json::from_slice(&store.get("gantry/peer/0", PATIENCE).unwrap()).expect("peer record");
    let rank0 = peer0["addr"].as_str().expect("rank 0 listens on TCP").to_string();

    // A forged abort record blaming rank 1, sent as a plain SET without the handshake.
    let abort_key = b"gantry/abort/world#1";
    let record = br#"{"culprit":1,"reporter":2,"reason":"forged"}"#;
    let mut forged_set = vec![1u8];
    forged_set.extend_from_slice(&(abort_key.len() as u32).to_le_bytes());
    forged_set.extend_from_slice(abort_key);
    forged_set.extend_from_slice(&(record.len() as u64).to_le_bytes());
    forged_set.extend_from_slice(record);
    let store_target = Target {
        addr: &store_addr,
        channel: Channel::Store,
        server: Party::Store,
        key: "",
    };
    let store_refusals = intrusions(&store_target, &right, &forged_set).unwrap();

    // The link listener: the pre-handshake link hello ("GNTC", rank 1, key) of old builds.
    let mut old_hello = b"GNTC".to_vec();
    old_hello.extend_from_slice(&1u32.to_le_bytes());
    old_hello.extend_from_slice(&7u16.to_le_bytes());
    old_hello.extend_from_slice(b"world#1");
    let link_target = Target {
        addr: &rank0,
        channel: Channel::Link,
        server: Party::Rank(0),
        // A key no communicator uses, so the control connection it files stays unused.
        key: "auth-test#1",
    };
    let link_refusals = intrusions(&link_target, &right, &old_hello).unwrap();

    // Nothing of the forged SET was applied; the store counted every refusal.
    assert_eq!(store.try_get("gantry/abort/world#1").unwrap(), None);
    let until = Instant::now() + PATIENCE;
    while world.store.refused_connections() < store_refusals && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(world.store.refused_connections(), store_refusals);

    std::fs::write(&hold, b"go").unwrap();
    let status = world.wait_all(Duration::from_secs(300));
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) {
        seen.push(line);
    }
    let stderrs: Vec<String> = stderrs.into_iter().map(|h| h.join().unwrap()).collect();
    for (rank, st) in status.iter().enumerate() {
        let out: Vec<&str> = seen
            .iter()
            .filter(|(r, _)| *r == rank)
            .map(|(_, l)| l.as_str())
            .collect();
        assert!(
            st.is_some_and(|s| s.success()),
            "rank {rank} exited {st:?}\nstdout: {out:?}\nstderr: {}",
            stderrs[rank]
        );
        // Twelve correct sums (the rank checks each one), and the refusals it counted.
        assert!(out.contains(&"iter 11 seq 12"), "rank {rank}: {out:?}");
        let refused = if rank == 0 { link_refusals } else { 0 };
        assert!(
            out.contains(&format!("DONE refused {refused}").as_str()),
            "rank {rank}: {out:?}"
        );
        let secret = right.secret.expose();
        assert!(
            !out.iter().any(|l| l.contains(secret)),
            "rank {rank} printed the secret"
        );
        assert!(!stderrs[rank].contains(secret), "rank {rank} logged the secret");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
