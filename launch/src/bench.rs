//! `gantry bench …`: thin wiring over `gantry_collectives::bench`; `gantry bench checkpoint`
//! lives in `bench_checkpoint.rs`.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gantry_collectives::bench::{self, BenchConfig, BenchOp, BenchRow, format_size, parse_size};
use gantry_collectives::fabric::Bootstrap;
use gantry_collectives::spawn::{Output, spawn_local_world};
use gantry_collectives::{Algorithm, DType, Fabric, FabricConfig, TransportChoice, nccl};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Collective bandwidth and latency across local rank processes, like nccl-tests.
    ///
    /// Without RANK in the environment it spawns --world rank processes on this host and
    /// prints rank 0's report; with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (torchrun
    /// style) it joins that world instead, so the same command runs across hosts.
    ///
    /// Per size it prints the median time of the slowest rank, algbw = bytes / time and
    /// busbw = algbw × 2(n−1)/n for all_reduce, (n−1)/n for all_gather, reduce_scatter and
    /// all_to_all, 1 for broadcast and reduce; `ok` is a correctness check against exact
    /// expected values run before timing.
    Collectives(CollectivesArgs),
    /// NCCL world-size-1 all_reduce on GPU memory (needs a CUDA GPU and libnccl.so).
    Nccl(NcclArgs),
    /// Checkpoint save, load and verify throughput next to raw writes and reads of the same
    /// bytes in the same place (local disk: std::fs with and without fsync; S3: one plain
    /// multipart put and get), in one run.
    ///
    /// R in-process ranks, each with its own Store and Saver, save GiB/R each (f32 row blocks
    /// of global tensors); save time runs from the first save() hand-off until every rank's
    /// wait() returned. Load opens the latest checkpoint afresh and loads every whole tensor
    /// (R ranks resharded to 1), checking every element. Everything goes under a fresh
    /// gantry-bench-<pid>-<time> prefix of --url, removed at the end unless --keep.
    Checkpoint(crate::bench_checkpoint::CheckpointBenchArgs),
    /// Control-plane scale: a real coordinator process and many simulated workers (clients
    /// in this process) heartbeating; heartbeat latency p50/p99, coordinator CPU, and the
    /// time to place and assign a very large job.
    Cluster(crate::bench_cluster::ClusterBenchArgs),
    /// Time from `gantry submit` to every rank's first training step (real coordinator,
    /// worker and rank processes on this host).
    Startup(crate::bench_cluster::StartupBenchArgs),
    /// The registry service: download throughput of a large checkpoint object through it
    /// next to reading the same file directly, and generation tokens/s and latency (p50,
    /// p99) of a served checkpoint at several concurrencies.
    Registry(crate::bench_registry::RegistryBenchArgs),
}

#[derive(Args, Clone)]
pub struct CollectivesArgs {
    /// all_reduce, all_gather, reduce_scatter, broadcast, reduce or all_to_all.
    #[arg(long, default_value = "all_reduce")]
    op: BenchOp,
    /// Number of local rank processes to spawn (ignored when joining via RANK).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// auto (shared memory on one host, TCP across hosts), tcp or shm.
    #[arg(long, default_value = "auto")]
    transport: TransportChoice,
    /// f32, f64, f16, bf16, i32, i64 or u8.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Comma-separated buffer sizes per rank: 1K, 64M, 1G, or bytes.
    #[arg(long, default_value = "1K,64K,1M,16M,64M", value_delimiter = ',')]
    sizes: Vec<String>,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations per size before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// auto, ring or tree (tree = recursive doubling / binomial tree).
    #[arg(long, default_value = "auto")]
    algorithm: Algorithm,
    /// Deadline of each collective call, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// One JSON object per size on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NcclArgs {
    /// f32 elements in the timed all_reduce.
    #[arg(long, default_value_t = 64 << 20)]
    count: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Collectives(args) => collectives(args),
        BenchCommand::Nccl(args) => nccl_self_test(args),
        BenchCommand::Checkpoint(args) => crate::bench_checkpoint::run(args),
        BenchCommand::Cluster(args) => crate::bench_cluster::cluster(args),
        BenchCommand::Registry(args) => crate::bench_registry::run(args),
        BenchCommand::Startup(args) => crate::bench_cluster::startup(args),
    }
}

fn collectives(args: CollectivesArgs) -> Result<ExitCode> {
    let sizes = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let cfg = BenchConfig {
        op: args.op,
        dtype: args.dtype,
        sizes,
        iters: args.iters,
        warmup: args.warmup,
    };
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid benchmark settings")?;
    if args.transport == TransportChoice::Local {
        bail!("--transport local is for in-process tests; use auto, tcp or shm");
    }
    match Bootstrap::from_env().map_err(anyhow::Error::msg)? {
        Some(boot) => join_and_run(&boot, &args, &cfg),
        None => spawn(&args),
    }
}

fn spawn(args: &CollectivesArgs) -> Result<ExitCode> {
    if args.world == 0 {
        bail!("--world must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find the gantry executable to spawn ranks")?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut world = spawn_local_world(&exe, &argv, args.world, &[], Output::Rank0Stdout)?;
    // Each rank has its own deadlines; this outer limit only guards against a wedged machine.
    let limit = Duration::from_secs(args.timeout_secs * (args.iters + args.warmup + 4) as u64 * 4 + 60);
    let status = world.wait_all(limit);
    let failed: Vec<String> = status
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_some_and(|s| s.success()))
        .map(|(r, s)| match s {
            Some(s) => format!("rank {r} {s}"),
            None => format!("rank {r} killed after {limit:?}"),
        })
        .collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("benchmark failed: {}", failed.join(", "))
    }
}

fn join_and_run(boot: &Bootstrap, args: &CollectivesArgs, cfg: &BenchConfig) -> Result<ExitCode> {
    let config = FabricConfig {
        transport: args.transport,
        timeout: Duration::from_secs(args.timeout_secs),
        ..FabricConfig::default()
    }
    .with_env()
    .map_err(anyhow::Error::msg)?;
    let fabric = Fabric::from_bootstrap(boot, config).with_context(|| format!("rank {} could not join", boot.rank))?;
    fabric.install_sigusr1_dump()?;
    let mut comm = fabric.world();
    comm.set_algorithm(args.algorithm);
    // Connect every link once so the reported transport is the one actually used.
    comm.barrier()?;
    let transport = describe_links(&comm, args.transport);
    if boot.rank == 0 && !args.json {
        println!(
            "# gantry bench collectives: {} {} world {} transport {} algorithm {:?} iters {} warmup {}",
            cfg.op.name(),
            cfg.dtype,
            comm.size(),
            transport,
            args.algorithm,
            cfg.iters,
            cfg.warmup
        );
        println!(
            "# {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>5}",
            "size", "count", "time_us", "mean_us", "algbw_GB/s", "busbw_GB/s", "ok"
        );
    }
    let mut all_ok = true;
    for &size in &cfg.sizes {
        let one = BenchConfig {
            sizes: vec![size],
            ..cfg.clone()
        };
        for row in bench::run(&mut comm, &one, &transport)? {
            all_ok &= row.ok;
            if boot.rank == 0 {
                print_row(&row, args.json)?;
            }
        }
    }
    comm.barrier()?;
    if !all_ok {
        bail!("correctness check failed (see the ok column)");
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_links(comm: &gantry_collectives::Communicator, asked: TransportChoice) -> String {
    let mut kinds: Vec<&str> = (0..comm.size())
        .filter_map(|p| comm.link_kind(p))
        .map(|k| k.name())
        .collect();
    kinds.sort();
    kinds.dedup();
    match kinds.as_slice() {
        [] => format!("{asked:?}").to_lowercase(),
        [one] => one.to_string(),
        many => many.join("+"),
    }
}

fn print_row(row: &BenchRow, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(row)?);
    } else {
        println!(
            "  {:>10} {:>12} {:>12.1} {:>12.1} {:>12.3} {:>12.3} {:>5}",
            format_size(row.bytes),
            row.count,
            row.time_us,
            row.mean_us,
            row.algbw_gbps,
            row.busbw_gbps,
            if row.ok { "ok" } else { "FAIL" }
        );
    }
    Ok(())
}

fn nccl_self_test(args: NcclArgs) -> Result<ExitCode> {
    match nccl::device_all_reduce_self_test(args.count) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report:#?}");
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) => bail!("NCCL self test: {e}"),
    }
}
