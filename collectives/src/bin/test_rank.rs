//! Rank program for the multi-process tests (not a user tool). Joins the world from
//! torchrun-style environment variables and runs one scenario:
//!
//! - `conformance`: the full conformance suite, plus a split and the layout groups; prints
//!   `LINK PEER KIND` (tcp, shm or none) for every peer of the world communicator.
//! - `loop ITERS BYTES`: all_reduce of ones in a loop, checking each sum and printing `iter I
//!   seq S` after each and `DONE refused N` (connections its listener and store refused) at
//!   the end; the `GANTRY_TEST_*` variables make one rank stall or call a mismatched
//!   operation, or every rank wait for a file before iteration `GANTRY_TEST_AFTER`
//!   (`GANTRY_TEST_HOLD_FILE`, so a test can act on a running job).
//!
//! A collective error is printed as `ERROR {json}` (blamed rank, error variant, message, how
//! long the failing call took) and the process exits with status 3.

use gantry_collectives::{
    Bootstrap, CommError, Communicator, Fabric, FabricConfig, ParallelLayout, ReduceOp, conformance,
};
use std::io::Write;
use std::time::{Duration, Instant};

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn report(rank: usize, e: &CommError, started: Instant) -> ! {
    // The variant's name: the Debug text up to the first character no identifier has.
    let debug = format!("{e:?}");
    let variant = debug
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .next()
        .unwrap_or("");
    let json = serde_json::json!({
        "rank": rank,
        "blamed": e.rank(),
        "variant": variant,
        "message": e.to_string(),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    println!("ERROR {json}");
    let _ = std::io::stdout().flush();
    std::process::exit(3);
}

fn main() {
    // As the ranks of `gantry bench collectives` and `gantry eval --tp` run (the CLI restores
    // SIGPIPE's default for its output): a link that writes to a peer that is gone must report
    // it, not be killed by the signal.
    // SAFETY: setting a signal disposition at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = FabricConfig {
        segment_bytes: 4096,
        ..FabricConfig::default()
    }
    .with_lookup(|k| std::env::var(k).ok())
    .expect("bad GANTRY_* settings");
    let boot = Bootstrap::from_lookup(|k| std::env::var(k).ok())
        .expect("bad torchrun variables")
        .expect("RANK is not set: run by the multi-process tests");
    let fabric = Fabric::from_bootstrap(&boot, config).unwrap_or_else(|e| {
        eprintln!("join failed: {e}");
        std::process::exit(2)
    });
    fabric.install_sigusr1_dump().expect("SIGUSR1 handler");
    let mut comm = fabric.world();
    match args.first().map(String::as_str) {
        Some("conformance") => conformance_scenario(&fabric, &mut comm),
        Some("loop") => {
            let iters: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
            let bytes: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1 << 20);
            loop_scenario(&fabric, &mut comm, iters, bytes)
        }
        other => {
            eprintln!("unknown scenario {other:?}");
            std::process::exit(2)
        }
    }
}

fn conformance_scenario(fabric: &Fabric, comm: &mut Communicator) {
    let (n, r) = (comm.size(), comm.rank());
    let mut fails = conformance::run(comm);
    // Which transport reached each peer (all_to_all has connected every pair by now): the
    // multi-host tests check TCP between hosts and shared memory within one.
    for peer in (0..n).filter(|&p| p != r) {
        println!("LINK {peer} {}", comm.link_kind(peer).map_or("none", |k| k.name()));
    }

    // Split by parity; each half sums its members' ranks.
    match comm.split(Some((r % 2) as u32), r as u32) {
        Ok(Some(mut half)) => {
            let mut v = [r as i64];
            match half.all_reduce_in_place(&mut v, ReduceOp::Sum) {
                Ok(()) => {
                    let want: i64 = (0..n).filter(|s| s % 2 == r % 2).map(|s| s as i64).sum();
                    if v[0] != want {
                        fails.push(format!("split parity group sum {} != {want}", v[0]));
                    }
                }
                Err(e) => fails.push(format!("split group all_reduce: {e}")),
            }
        }
        Ok(None) => fails.push("split returned no group".into()),
        Err(e) => fails.push(format!("split: {e}")),
    }

    // Layout groups (tp innermost) carry independent all_reduces.
    let tp = if n % 2 == 0 { 2 } else { 1 };
    let layout = ParallelLayout::infer(n, tp, 1).expect("layout");
    for (name, members) in [("tp", layout.tp_group(r)), ("dp", layout.dp_group(r))] {
        let mut g = fabric
            .group(&format!("{name}@{}", members[0]), members.clone())
            .expect("layout group");
        let mut v = [r as i32 + 1];
        match g.all_reduce_in_place(&mut v, ReduceOp::Sum) {
            Ok(()) => {
                let want: i32 = members.iter().map(|&m| m as i32 + 1).sum();
                if v[0] != want {
                    fails.push(format!("{name} group {members:?}: {} != {want}", v[0]));
                }
            }
            Err(e) => fails.push(format!("{name} group {members:?}: {e}")),
        }
    }

    if fails.is_empty() {
        println!("PASS rank {r} of {n}");
    } else {
        for f in &fails {
            println!("FAIL {f}");
        }
        std::process::exit(1);
    }
}

fn loop_scenario(fabric: &Fabric, comm: &mut Communicator, iters: usize, bytes: usize) {
    let rank = fabric.rank();
    let hold_file = std::env::var_os("GANTRY_TEST_HOLD_FILE").map(std::path::PathBuf::from);
    let stall_rank = env_usize("GANTRY_TEST_STALL_RANK");
    let mismatch_rank = env_usize("GANTRY_TEST_MISMATCH_RANK");
    let after = env_usize("GANTRY_TEST_AFTER").unwrap_or(3);
    let mismatch = std::env::var("GANTRY_TEST_MISMATCH").unwrap_or_else(|_| "count".into());
    let count = bytes / 4;
    let mut buf = vec![1.0f32; count];
    for i in 0..iters {
        if let Some(file) = hold_file.as_ref().filter(|_| i == after) {
            println!("holding");
            let _ = std::io::stdout().flush();
            while !file.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if i == after && stall_rank == Some(rank) {
            println!("stalling");
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_secs(3600));
        }
        let started = Instant::now();
        let result = if i == after && mismatch_rank == Some(rank) {
            match mismatch.as_str() {
                "dtype" => comm.all_reduce_in_place(&mut vec![1.0f64; count], ReduceOp::Sum),
                "op" => comm.all_reduce_in_place(&mut buf, ReduceOp::Max),
                "kind" => comm.broadcast(&mut buf, 0),
                _ => comm.all_reduce_in_place(&mut vec![1.0f32; count + 1], ReduceOp::Sum),
            }
        } else {
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
        };
        if let Err(e) = result {
            report(rank, &e, started);
        }
        let want = comm.size() as f32;
        if let Some(bad) = buf.iter().position(|&v| v != want) {
            println!("FAIL iter {i}: element {bad} is {} instead of {want}", buf[bad]);
            std::process::exit(1);
        }
        buf.fill(1.0);
        println!("iter {i} seq {}", comm.seq());
        let _ = std::io::stdout().flush();
    }
    println!("DONE refused {}", fabric.refused_connections());
}
