//! Multi-process tests on loopback: real rank processes, real sockets and shared memory.

use gantry_collectives::spawn::{LocalWorld, spawn_local_world};
use serde_json::Value;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ChildStdout;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RANK_BIN: &str = env!("CARGO_BIN_EXE_collectives-test-rank");

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gantry-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spawn(args: &[&str], world: usize, env: &[(&str, String)]) -> LocalWorld {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    spawn_local_world(Path::new(RANK_BIN), &args, world, &env).expect("spawn ranks")
}

/// Stream each rank's stdout lines into one channel as (rank, line).
fn collect_lines(world: &mut LocalWorld) -> mpsc::Receiver<(usize, String)> {
    let (tx, rx) = mpsc::channel();
    for (rank, child) in world.children.iter_mut().enumerate() {
        let out: ChildStdout = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((rank, line)).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Every line still in flight: readers end at the children's EOF, which closes the channel.
fn drain(lines: &mpsc::Receiver<(usize, String)>) -> Vec<(usize, String)> {
    let until = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    loop {
        match lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(line) => out.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => return out,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("rank output did not end within 30 s"),
        }
    }
}

fn stderr_of(world: &mut LocalWorld, rank: usize) -> String {
    let mut s = String::new();
    if let Some(mut e) = world.children[rank].stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

fn conformance(transport: &str, world_size: usize) {
    let mut world = spawn(
        &["conformance"],
        world_size,
        &[
            ("GANTRY_TRANSPORT", transport.into()),
            ("GANTRY_TIMEOUT_MS", "60000".into()),
        ],
    );
    let lines = collect_lines(&mut world);
    let status = world.wait_all(Duration::from_secs(300));
    let out = drain(&lines);
    for (rank, st) in status.iter().enumerate() {
        let mine: Vec<&str> = out
            .iter()
            .filter(|(r, _)| *r == rank)
            .map(|(_, l)| l.as_str())
            .collect();
        assert!(
            st.is_some_and(|s| s.success()),
            "{transport} world {world_size}: rank {rank} exited {st:?}\nstdout:\n{}\nstderr:\n{}",
            mine.join("\n"),
            stderr_of(&mut world, rank)
        );
        assert!(
            mine.iter().any(|l| l.starts_with("PASS")),
            "rank {rank} did not report PASS: {mine:?}"
        );
    }
}

#[test]
fn conformance_tcp_worlds_1_to_5() {
    for n in 1..=5 {
        conformance("tcp", n);
    }
}

/// TLS links between real processes: every link is bound to the job secret the spawned
/// world's launcher generated.
#[test]
fn conformance_tls_worlds_2_and_3() {
    for n in [2, 3] {
        conformance("tls", n);
    }
}

#[test]
fn conformance_shm_worlds_1_to_5() {
    for n in 1..=5 {
        conformance("shm", n);
    }
}

#[derive(Debug)]
struct RankError {
    blamed: Option<u64>,
    variant: String,
    message: String,
    elapsed_ms: u64,
}

fn parse_error(line: &str) -> Option<RankError> {
    let v: Value = serde_json::from_str(line.strip_prefix("ERROR ")?).ok()?;
    Some(RankError {
        blamed: v["blamed"].as_u64(),
        variant: v["variant"].as_str()?.to_string(),
        message: v["message"].as_str()?.to_string(),
        elapsed_ms: v["elapsed_ms"].as_u64()?,
    })
}

/// Wait until every rank in `ranks` has printed an ERROR line; returns them by rank.
fn wait_errors(lines: &mpsc::Receiver<(usize, String)>, ranks: &[usize], limit: Duration) -> Vec<(usize, RankError)> {
    let until = Instant::now() + limit;
    let mut found: Vec<(usize, RankError)> = Vec::new();
    while found.len() < ranks.len() {
        let left = until.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((rank, line)) => {
                if let Some(e) = parse_error(&line) {
                    found.push((rank, e));
                }
            }
            Err(_) => panic!(
                "only {} of {} ranks reported an error within {limit:?}: {found:?}",
                found.len(),
                ranks.len()
            ),
        }
    }
    found.sort_by_key(|(r, _)| *r);
    found
}

fn wait_for_line(lines: &mpsc::Receiver<(usize, String)>, rank: usize, prefix: &str, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((r, l)) if r == rank && l.starts_with(prefix) => return,
            Ok(_) => {}
            Err(_) => panic!("rank {rank} never printed `{prefix}`"),
        }
    }
}

fn kill_mid_operation(transport: &str, bytes: usize) {
    let victim = 2;
    let timeout_ms = 20_000u64;
    let flight = temp_dir(&format!("kill-{transport}-{bytes}"));
    let mut world = spawn(
        &["loop", "1000000", &bytes.to_string()],
        4,
        &[
            ("GANTRY_TRANSPORT", transport.into()),
            ("GANTRY_TIMEOUT_MS", timeout_ms.to_string()),
            ("GANTRY_FLIGHT_DIR", flight.display().to_string()),
        ],
    );
    let lines = collect_lines(&mut world);
    wait_for_line(&lines, 0, "iter 3", Duration::from_secs(60));
    // Mid-operation: the ranks are continuously inside all_reduces.
    world.children[victim].kill().unwrap();
    let killed_at = Instant::now();
    let errors = wait_errors(&lines, &[0, 1, 3], Duration::from_millis(timeout_ms + 5_000));
    for (rank, e) in &errors {
        assert_eq!(
            e.blamed,
            Some(victim as u64),
            "{transport}: rank {rank} blamed the wrong rank: {e:?}"
        );
        assert!(
            e.message.contains(&format!("rank {victim}")),
            "{transport}: message does not name rank {victim}: {}",
            e.message
        );
        // A dead peer is detected from the closed connection, not by waiting out the
        // (deliberately long) deadline.
        assert!(
            e.elapsed_ms < timeout_ms,
            "{transport}: rank {rank} waited {} ms, the whole {timeout_ms} ms deadline",
            e.elapsed_ms
        );
    }
    assert!(
        killed_at.elapsed() < Duration::from_millis(timeout_ms),
        "errors arrived only after the deadline"
    );
    let status = world.wait_all(Duration::from_secs(30));
    for r in [0, 1, 3] {
        assert_eq!(
            status[r].and_then(|s| s.code()),
            Some(3),
            "rank {r} should exit with the collective-error status"
        );
    }
    let _ = std::fs::remove_dir_all(flight);
}

#[test]
fn killed_peer_is_named_tcp() {
    kill_mid_operation("tcp", 8 << 20);
}

#[test]
fn killed_peer_is_named_tls() {
    kill_mid_operation("tls", 8 << 20);
}

#[test]
fn killed_peer_is_named_shm() {
    kill_mid_operation("shm", 8 << 20); // pipelined ring
    kill_mid_operation("shm", 1 << 10); // the group segment
}

fn read_dump(dir: &Path, rank: usize) -> Value {
    // The dump is written by another process: wait for it to appear (it is renamed into place).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let found = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("flight-rank{rank}-world_"))
            })
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"));
        if let Some(entry) = found {
            return serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        }
        assert!(
            Instant::now() < until,
            "no flight-recorder dump for rank {rank} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stalled_peer(transport: &str, bytes: usize) {
    let stalled = 1;
    let after = 4usize;
    let timeout_ms = 4_000u64;
    let flight = temp_dir(&format!("stall-{transport}-{bytes}"));
    let mut world = spawn(
        &["loop", "1000000", &bytes.to_string()],
        4,
        &[
            ("GANTRY_TRANSPORT", transport.into()),
            ("GANTRY_TIMEOUT_MS", timeout_ms.to_string()),
            ("GANTRY_FLIGHT_DIR", flight.display().to_string()),
            ("GANTRY_TEST_STALL_RANK", stalled.to_string()),
            ("GANTRY_TEST_AFTER", after.to_string()),
        ],
    );
    let lines = collect_lines(&mut world);
    wait_for_line(&lines, stalled, "stalling", Duration::from_secs(60));

    // While the others wait, SIGUSR1 makes rank 0 dump its recorder: the stuck op is in flight.
    std::thread::sleep(Duration::from_millis(1000));
    let pid = world.children[0].id() as i32;
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(500));
    let live = read_dump(&flight, 0);
    // seq 1 is the first all_reduce: `after` completed, the next one is stuck.
    assert_eq!(
        live["last_completed"].as_u64(),
        Some(after as u64),
        "live dump: {live:#}"
    );
    assert_eq!(
        live["in_flight"][0]["seq"].as_u64(),
        Some(after as u64 + 1),
        "live dump: {live:#}"
    );
    assert_eq!(live["in_flight"][0]["op"].as_str(), Some("all_reduce"));

    // The bound is liveness, not speed: a loaded CI machine may fire the deadline late, but a
    // rank that never fires it would hang forever. No lower bound either: the first rank to
    // time out posts its blame to the store and the others give up on reading it.
    let errors = wait_errors(&lines, &[0, 2, 3], Duration::from_millis(timeout_ms + 60_000));
    for (rank, e) in &errors {
        assert_eq!(
            e.blamed,
            Some(stalled as u64),
            "{transport}: rank {rank} blamed the wrong rank: {e:?}"
        );
    }
    // The error dump (written by every failing rank) names the last completed and the failed op.
    for rank in [0, 2, 3] {
        let dump = read_dump(&flight, rank);
        assert_eq!(
            dump["last_completed"].as_u64(),
            Some(after as u64),
            "rank {rank}: {dump:#}"
        );
        assert_eq!(
            dump["failed"][0]["seq"].as_u64(),
            Some(after as u64 + 1),
            "rank {rank}: {dump:#}"
        );
        assert!(
            dump["failed"][0]["error"]
                .as_str()
                .unwrap()
                .contains(&format!("rank {stalled}"))
        );
    }
    world.kill_all();
    world.wait_all(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(flight);
}

#[test]
fn stalled_peer_is_named_tcp() {
    stalled_peer("tcp", 64 << 10); // recursive doubling
    stalled_peer("tcp", 1 << 20); // pipelined ring
}

#[test]
fn stalled_peer_is_named_shm() {
    stalled_peer("shm", 1 << 10); // the group segment
    stalled_peer("shm", 64 << 10);
    stalled_peer("shm", 1 << 20);
}

fn mismatch(kind: &str, transport: &str) {
    let odd = 1;
    let mut world = spawn(
        &["loop", "10", "4096"],
        3,
        &[
            ("GANTRY_TRANSPORT", transport.into()),
            ("GANTRY_TIMEOUT_MS", "10000".into()),
            ("GANTRY_TEST_MISMATCH_RANK", odd.to_string()),
            ("GANTRY_TEST_MISMATCH", kind.into()),
            ("GANTRY_TEST_AFTER", "2".into()),
            (
                "GANTRY_FLIGHT_DIR",
                temp_dir(&format!("mismatch-{kind}")).display().to_string(),
            ),
        ],
    );
    let lines = collect_lines(&mut world);
    let errors = wait_errors(&lines, &[0, 1, 2], Duration::from_secs(20));
    // Ranks that exchange with the odd one report the mismatch itself, naming both sides.
    let direct: Vec<_> = errors.iter().filter(|(_, e)| e.variant == "Mismatch").collect();
    assert!(!direct.is_empty(), "{kind}: nobody reported a mismatch: {errors:?}");
    for (rank, e) in &direct {
        assert!(
            e.message.contains("rank 1 called") || e.message.contains(&format!("rank {rank} called")),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("seq 3"),
            "{kind}: mismatch should be at seq 3: {}",
            e.message
        );
    }
    // Everyone else learns of it rather than hanging.
    for (rank, e) in &errors {
        assert!(
            e.variant == "Mismatch" || e.message.contains("mismatch"),
            "{kind}: rank {rank}: {e:?}"
        );
    }
    world.wait_all(Duration::from_secs(10));
}

#[test]
fn mismatched_calls_are_reported_tcp() {
    for kind in ["count", "dtype", "op", "kind"] {
        mismatch(kind, "tcp");
    }
}

#[test]
fn mismatched_calls_are_reported_shm() {
    // 4 KiB all_reduces go through the group segment; the odd rank's call takes it too
    // ("op") or not (a larger count or dtype, a broadcast), and is still named.
    for kind in ["count", "dtype", "op", "kind"] {
        mismatch(kind, "shm");
    }
}
