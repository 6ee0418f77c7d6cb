//! `gantry bench …`: the flags of every benchmark and the process wiring (spawning or joining
//! rank processes, the executable's path, scratch directories); the benchmarks themselves are
//! `gantry_bench`'s, and this file prints what they report, every one through `print_report`
//! (one JSON line with `--json`, else text lines).

use crate::checkpoint_cmd::S3Args;
use crate::local_ranks::{LocalRanks, RankCommand, StopPolicy};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gantry_bench::checkpoint_io::{CheckpointBench, CheckpointBenchConfig};
use gantry_bench::collective_ops::{self, BenchConfig, BenchOp, parse_size};
use gantry_bench::control_plane::{self, ClusterBenchConfig};
use gantry_bench::daemons::Harness;
use gantry_bench::nccl_bench::{self, NcclBenchConfig};
use gantry_bench::registry_service::{self, RegistryBenchConfig};
use gantry_bench::startup::{self, StartupBenchConfig};
use gantry_collectives::fabric::Bootstrap;
use gantry_collectives::spawn::HostedStore;
use gantry_collectives::{Algorithm, DType, Fabric, FabricConfig, TransportChoice, WaitPolicy, nccl};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
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
    /// NCCL world-size-1 all_reduce on GPU memory, f32 and bf16 (needs a CUDA GPU and
    /// libnccl.so).
    ///
    /// Per dtype: every reduce op in place, checked element by element, then the mean time of
    /// a sum all_reduce. Exit status 3 (and with --json `{"unavailable": …}` on stdout) when
    /// this machine has no GPU, driver or libnccl.so: the message names what is missing.
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
    Checkpoint(CheckpointBenchArgs),
    /// Control-plane scale: a real coordinator process and many simulated workers (clients
    /// in this process) heartbeating; heartbeat latency p50/p99, coordinator CPU, and the
    /// time to place and assign a very large job.
    Cluster(ClusterBenchArgs),
    /// Time from `gantry submit` to every rank's first training step (real coordinator,
    /// worker and rank processes on this host).
    Startup(StartupBenchArgs),
    /// The registry service: download throughput of a large checkpoint object through it
    /// next to reading the same file directly, and generation tokens/s and latency (p50,
    /// p99) of a served checkpoint at several concurrencies.
    Registry(RegistryBenchArgs),
}

#[derive(Args, Clone)]
pub struct CollectivesArgs {
    /// all_reduce, all_gather, reduce_scatter, broadcast, reduce or all_to_all.
    #[arg(long, default_value = "all_reduce")]
    op: BenchOp,
    /// Number of local rank processes to spawn (ignored when joining via RANK).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// auto (shared memory on one host, GANTRY_INTER_HOST across hosts: tcp unless set), tcp,
    /// tls (TLS 1.3 over TCP), quic or shm; tcp, tls and quic apply to every link, even on one host.
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
    /// Elements per all_reduce.
    #[arg(long, default_value_t = 64 << 20)]
    count: usize,
    /// Comma-separated dtypes: f32, bf16.
    #[arg(long, default_value = "f32,bf16", value_delimiter = ',')]
    dtype: Vec<DType>,
    /// Timed all_reduces per dtype.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed all_reduces per dtype before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// One JSON object per dtype on stdout.
    #[arg(long)]
    json: bool,
}

/// `gantry bench nccl`'s exit status where NCCL cannot run on this machine (no GPU, driver or
/// libnccl.so), distinct from a failure (1) so scripts can tell "not here" from "broken".
pub const NCCL_UNAVAILABLE_EXIT: u8 = 3;

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Collectives(args) => collectives(args),
        BenchCommand::Nccl(args) => nccl_bench(args),
        BenchCommand::Checkpoint(args) => checkpoint(args),
        BenchCommand::Cluster(args) => cluster(args),
        BenchCommand::Registry(args) => registry(args),
        BenchCommand::Startup(args) => startup(args),
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
    cfg.validate().context("invalid benchmark settings")?;
    if args.transport == TransportChoice::Local {
        bail!("--transport local is for in-process tests; use auto, tcp, tls, quic or shm");
    }
    match Bootstrap::from_lookup(|k| std::env::var(k).ok()).map_err(anyhow::Error::msg)? {
        Some(boot) => join_and_run(&boot, &args, &cfg),
        None => spawn(&args),
    }
}

/// The ranks of `gantry bench collectives`: this same command as `--world` processes under the
/// one local rank supervisor (rank 0 prints the table).
fn spawn(args: &CollectivesArgs) -> Result<ExitCode> {
    if args.world == 0 {
        bail!("--world must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find the gantry executable to spawn ranks")?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let store = HostedStore::bind().context("cannot host the ranks' rendezvous store")?;
    let parent: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let commands = (0..args.world)
        .map(|rank| RankCommand {
            program: exe.clone().into(),
            args: argv.clone(),
            env: store.rank_env(rank, args.world).environment(parent.iter().cloned()),
            log: None,
        })
        .collect();
    // Each rank has its own deadlines; this outer limit only guards against a wedged machine.
    let limit = Duration::from_secs(args.timeout_secs * (args.iters + args.warmup + 4) as u64 * 4 + 60);
    let policy = StopPolicy {
        linger: Duration::from_secs(3),
        signal: libc::SIGTERM,
        grace: Duration::from_secs(5),
    };
    let outcome = LocalRanks::spawn(commands, Some(store))?.supervise(policy, Some(limit), || {});
    let failed: Vec<String> = outcome
        .unsuccessful()
        .into_iter()
        .map(|r| format!("rank {r} {}", outcome.ranks[r].end.describe()))
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
        wait: WaitPolicy::for_host(boot.local_world, gantry_collectives::HostCores::measure().cores),
        ..FabricConfig::default()
    }
    .with_lookup(|k| std::env::var(k).ok())
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
            "{}",
            cfg.title(comm.size(), &transport, &format!("{:?}", args.algorithm))
        );
        println!("{}", collective_ops::column_header());
    }
    let mut all_ok = true;
    for &size in &cfg.sizes {
        let one = BenchConfig {
            sizes: vec![size],
            ..cfg.clone()
        };
        for row in collective_ops::run(&mut comm, &one, &transport)? {
            all_ok &= row.ok;
            if boot.rank == 0 {
                print_report(args.json, &row, || vec![row.table_line()])?;
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

/// How every benchmark prints what it measured: with `--json` the report as one JSON line,
/// else its text lines.
fn print_report(json: bool, report: &impl serde::Serialize, text_lines: impl FnOnce() -> Vec<String>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        text_lines().iter().for_each(|l| println!("{l}"));
    }
    Ok(())
}

fn nccl_bench(args: NcclArgs) -> Result<ExitCode> {
    let cfg = NcclBenchConfig {
        count: args.count,
        dtypes: args.dtype,
        warmup: args.warmup,
        iters: args.iters,
    };
    match nccl_bench::run(&cfg) {
        Ok(rows) => {
            for row in &rows {
                print_report(args.json, row, || {
                    vec![format!(
                        "{:<5} {} elements ({} B), world 1: {:.1} us per all_reduce, {:.1} GB/s, {} ({} mismatches){}",
                        row.dtype,
                        row.count,
                        row.bytes,
                        row.avg_us,
                        row.algbw_gbps,
                        if row.ok { "ok" } else { "WRONG" },
                        row.mismatches,
                        match (&row.device_name, &row.nccl_version) {
                            (Some(d), Some(v)) => format!("; {d}, NCCL {v}"),
                            _ => String::new(),
                        }
                    )]
                })?;
            }
            Ok(if rows.iter().all(|r| r.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e @ nccl::NcclError::Unavailable(_)) => {
            if args.json {
                println!("{}", serde_json::json!({ "unavailable": e.to_string() }));
            }
            eprintln!("gantry: bench nccl: {e}");
            Ok(ExitCode::from(NCCL_UNAVAILABLE_EXIT))
        }
        Err(e) => bail!("bench nccl: {e}"),
    }
}

#[derive(Args, Clone, Debug)]
pub struct CheckpointBenchArgs {
    /// Where to write: a directory, file:///… or s3://bucket[/prefix]. The bench works in a
    /// fresh `gantry-bench-<pid>-<time>` sub-directory / prefix of it.
    #[arg(long)]
    url: String,
    /// Total checkpoint size in GiB, split evenly over the ranks.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// In-process ranks (threads), each with its own Store and Saver.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Chunk object size of the Saver in MiB (SaverConfig::chunk_bytes).
    #[arg(long, default_value_t = 256)]
    chunk_mib: usize,
    /// Multipart part size in MiB [default: the Store's]
    #[arg(long)]
    part_mib: Option<usize>,
    /// Requests in flight per Store [default: the Store's]
    #[arg(long)]
    concurrency: Option<usize>,
    /// Local disks: also read everything back cold (each file fsynced and dropped from the
    /// page cache with posix_fadvise(DONTNEED) before each read).
    #[arg(long)]
    cold: bool,
    /// Repetitions of every measurement (interleaved); the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Leave what it wrote in place.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    s3: S3Args,
}

#[derive(Args)]
pub struct ClusterBenchArgs {
    /// Simulated workers (lightweight clients in this process).
    #[arg(long, default_value_t = 10_000)]
    workers: usize,
    /// Rank slots per simulated worker.
    #[arg(long, default_value_t = 10)]
    slots: u32,
    /// Heartbeat interval of every simulated worker, milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Seconds of heartbeats to measure, before and again after placing the big job.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// HTTP/2 connections the simulated workers share.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Ranks of the job to place (needs workers × slots of capacity).
    #[arg(long, default_value_t = 100_000)]
    ranks: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StartupBenchArgs {
    /// Ranks of the job (one worker with this many slots).
    #[arg(long, default_value_t = 4)]
    nproc: u32,
    /// Jobs to time (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
pub struct RegistryBenchArgs {
    /// A trained checkpoint root to serve for the generation figures (skipped without one).
    #[arg(long)]
    checkpoint: Option<String>,
    /// Size of the downloaded object in MiB (0 skips the download figures).
    #[arg(long, default_value_t = 1024)]
    download_mib: u64,
    /// Repetitions of each download (interleaved with the direct reads).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Skip the cold-cache download figures (file dropped from the page cache before each read).
    #[arg(long)]
    no_cold: bool,
    /// Generation requests per concurrency level.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Concurrent clients, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// KV-cache slots of the served model (sequences decoded together).
    #[arg(long, default_value_t = 8)]
    batch_slots: usize,
    /// Sampling temperature of the generation requests (0: greedy). Prompts are token ids
    /// `(k * 31 + i * 7) % vocab` for token k of request i, so a peer can send the same.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// libtorch intra-op threads for generation (0: libtorch's default, every core), as
    /// `gantry registry serve --threads`; a peer compared with it should use the same.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Scratch directory [default: $TMPDIR/gantry-bench-registry-<pid>], removed at the end.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Where the control-plane benchmarks find the daemons they start: this executable.
fn harness() -> Result<Harness> {
    Ok(Harness {
        gantry: std::env::current_exe().context("cannot find the gantry executable")?,
        scratch_root: std::env::temp_dir(),
    })
}

fn checkpoint(args: CheckpointBenchArgs) -> Result<ExitCode> {
    let config = CheckpointBenchConfig {
        url: args.url,
        gib: args.gib,
        ranks: args.ranks,
        chunk_mib: args.chunk_mib,
        part_mib: args.part_mib,
        concurrency: args.concurrency,
        cold: args.cold,
        repeat: args.repeat,
        s3: args.s3.options(),
    };
    let bench = CheckpointBench::prepare(config)?;
    if !args.json {
        bench.header_lines().iter().for_each(|l| println!("{l}"));
    }
    let measured = bench.measure();
    if !args.keep {
        if let Err(e) = bench.clean_up() {
            eprintln!(
                "gantry bench checkpoint: could not remove {}: {}",
                bench.url(),
                crate::error_chain(&e)
            );
        }
    } else if !args.json {
        println!("# kept {}", bench.url());
    }
    let report = measured?;
    print_report(args.json, &report.to_json(), || report.text_lines())?;
    Ok(ExitCode::SUCCESS)
}

fn cluster(args: ClusterBenchArgs) -> Result<ExitCode> {
    let config = ClusterBenchConfig {
        workers: args.workers,
        slots: args.slots,
        heartbeat_ms: args.heartbeat_ms,
        seconds: args.seconds,
        connections: args.connections,
        ranks: args.ranks,
    };
    let report = control_plane::run(&config, &harness()?)?;
    print_report(args.json, &report.to_json(), || report.text_lines())?;
    Ok(ExitCode::SUCCESS)
}

fn startup(args: StartupBenchArgs) -> Result<ExitCode> {
    let config = StartupBenchConfig {
        nproc: args.nproc,
        repeat: args.repeat,
    };
    let report = startup::run(&config, &harness()?)?;
    print_report(args.json, &report.to_json(), || vec![report.text_line()])?;
    Ok(ExitCode::SUCCESS)
}

fn registry(args: RegistryBenchArgs) -> Result<ExitCode> {
    gantry_train::load_cuda_backend();
    let checkpoint = match &args.checkpoint {
        Some(c) => Some(
            gantry_checkpoint::StorageLocation::parse(c)
                .and_then(|location| location.for_reading())
                .with_context(|| format!("no checkpoint at {c}"))?
                .to_string(),
        ),
        None => None,
    };
    let config = RegistryBenchConfig {
        checkpoint,
        download_mib: args.download_mib,
        repeat: args.repeat,
        cold: !args.no_cold,
        requests: args.requests,
        concurrency: args.concurrency,
        max_tokens: args.max_tokens,
        prompt_tokens: args.prompt_tokens,
        batch_slots: args.batch_slots,
        temperature: args.temperature,
        work: args
            .work
            .unwrap_or_else(|| std::env::temp_dir().join(format!("gantry-bench-registry-{}", std::process::id()))),
    };
    if args.threads > 0 {
        gantry_train::tch::set_num_threads(args.threads as i32);
    }
    let loader = Arc::new(crate::model_loader::TchLoader {
        slots: args.batch_slots,
        device: gantry_train::tch::Device::Cpu,
    });
    let report = registry_service::run(&config, loader)?;
    print_report(args.json, report.to_json(), || report.text_lines())?;
    Ok(ExitCode::SUCCESS)
}
