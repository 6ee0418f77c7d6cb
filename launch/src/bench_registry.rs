//! `gantry bench registry`: what the registry service costs, measured against the thing it
//! wraps, in one run.
//!
//! - **Download**: one large checkpoint object (`--download-mib`, written with the real
//!   Saver) fetched through `GET …/files/…` by an HTTP client in this process, next to
//!   reading the same file directly with `std::fs` and to sending it over a plain loopback
//!   TCP connection (the transport alone), interleaved repetitions, medians and paired
//!   ratios; from a warm page cache and from a cold one (dropped before every read).
//! - **Generation**: a trained checkpoint (`--checkpoint`) registered and served; `--requests`
//!   requests of `--max-tokens` tokens at each `--concurrency` (clients each sending their
//!   next request when the previous one answers): generated tokens per second over the run,
//!   and per-request latency and time to the first token (p50 / p99).
//!
//! The registry runs in this process on 127.0.0.1 (the same server code as `gantry registry
//! serve`, its generation engine on its own thread).

use crate::bench_checkpoint::{evict_file, median};
use crate::serving::TchLoader;
use anyhow::{Context, Result, bail};
use clap::Args;
use gantry_checkpoint::format::{DType, SliceSpec};
use gantry_checkpoint::{JobState, S3Options, SaveRequest, Saver, SaverConfig, Store, TensorData};
use gantry_registry::http::{Running, ServeConfig, start_with};
use gantry_registry::serving::ModelLoader;
use serde_json::{Value, json};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

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
    /// Scratch directory [default: $TMPDIR/gantry-bench-registry-<pid>], removed at the end.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

const WRITE_TOKEN: &str = "bench-write-token-0123456789";

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Write one `mib`-MiB object as a committed checkpoint (one rank, one u8 tensor).
fn write_artifact(root: &Path, mib: u64) -> Result<String> {
    let url = root.display().to_string();
    let store = Store::open(&url, &S3Options::default())?;
    let mut config = SaverConfig::new(0, 1, "0000000000bec");
    config.chunk_bytes = (mib << 20) as usize + 1;
    let mut saver = Saver::new(store, config);
    let bytes: Vec<u8> = (0..(mib << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    saver.save(SaveRequest {
        step: 1,
        tensors: vec![TensorData {
            slice: SliceSpec::full("artifact", DType::U8, &[mib << 20]),
            bytes,
        }],
        rank_state: json!({}),
        job: JobState::default(),
    })?;
    saver.wait()?.context("the artifact's save reported nothing")?;
    Ok(url)
}

struct Server {
    running: Running,
    base: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(work: &Path, slots: usize) -> Result<Server> {
        let loader: Arc<dyn ModelLoader> = Arc::new(TchLoader { slots });
        let config = ServeConfig {
            listen: "127.0.0.1:0".into(),
            db: work.join("registry.redb"),
            tokens: vec![gantry_registry::http::TokenEntry {
                token: WRITE_TOKEN.into(),
                scope: gantry_registry::http::Scope::Write,
            }],
            ..ServeConfig::default()
        };
        let running = start_with(config, Some(loader)).await?;
        let base = format!("http://{}", running.addr);
        Ok(Server {
            running,
            base,
            http: reqwest::Client::builder().build()?,
        })
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(WRITE_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    async fn register(&self, model: &str, checkpoint: &str) -> Result<Value> {
        self.post(
            &format!("/v1/models/{model}/versions"),
            &json!({ "checkpoint": checkpoint }),
        )
        .await
    }
}

/// Read a file to the end in 4 MiB blocks; bytes read.
fn read_direct(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(n);
        }
        n += got as u64;
    }
}

/// The same file sent over a plain loopback TCP connection (a thread reading 4 MiB blocks and
/// writing them to the socket, this one reading to the end): the transport's own ceiling.
fn read_over_tcp(path: &Path) -> Result<u64> {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let path = path.to_path_buf();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut sock, _) = listener.accept()?;
        let mut f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            sock.write_all(&buf[..n])?;
        }
    });
    let mut sock = std::net::TcpStream::connect(addr)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0u64;
    loop {
        let got = sock.read(&mut buf)?;
        if got == 0 {
            break;
        }
        n += got as u64;
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP sender panicked"))??;
    Ok(n)
}

async fn download(server: &Server, path: &str) -> Result<u64> {
    let mut r = server.http.get(format!("{}{path}", server.base)).send().await?;
    if !r.status().is_success() {
        bail!("{path}: {}", r.status());
    }
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// Download figures from a warm page cache and, unless `--no-cold`, a cold one (the file
/// dropped from the cache before every read).
async fn bench_download(server: &Server, work: &Path, args: &RegistryBenchArgs) -> Result<Value> {
    let root = work.join("artifact");
    let url = write_artifact(&root, args.download_mib)?;
    server.register("artifact", &url).await?;
    let step = root.join("step-00000001");
    let manifest: gantry_checkpoint::Manifest = serde_json::from_slice(&std::fs::read(step.join("manifest.json"))?)?;
    let object = &manifest.objects[0];
    let file = step.join(&object.object);
    let path = format!("/v1/models/artifact/versions/1/files/{}", object.object);
    let warm = download_runs(server, &file, &path, object.size, args.repeat, false).await?;
    let cold = if args.no_cold {
        Value::Null
    } else {
        download_runs(server, &file, &path, object.size, args.repeat, true).await?
    };
    Ok(json!({ "warm": warm, "cold": cold }))
}

async fn download_runs(
    server: &Server,
    file: &Path,
    path: &str,
    size: u64,
    repeat: usize,
    cold: bool,
) -> Result<Value> {
    let evict = || if cold { evict_file(file) } else { Ok(()) };
    if !cold {
        read_direct(file)?;
        download(server, path).await?;
    }
    let (mut direct, mut tcp, mut http, mut ratios, mut tcp_ratios) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..repeat.max(1) {
        evict()?;
        let t = Instant::now();
        let a = read_direct(file)?;
        let d = t.elapsed().as_secs_f64();
        evict()?;
        let t = Instant::now();
        let b = tokio::task::block_in_place(|| read_over_tcp(file))?;
        let r = t.elapsed().as_secs_f64();
        evict()?;
        let t = Instant::now();
        let c = download(server, path).await?;
        let h = t.elapsed().as_secs_f64();
        if a != size || b != size || c != size {
            bail!("read {a}, {b} over TCP and downloaded {c} bytes of a {size}-byte object");
        }
        direct.push(size as f64 / d / 1e9);
        tcp.push(size as f64 / r / 1e9);
        http.push(size as f64 / h / 1e9);
        ratios.push(d / h);
        tcp_ratios.push(r / h);
    }
    Ok(json!({
        "bytes": size,
        "direct_gbps": median(&direct),
        "tcp_gbps": median(&tcp),
        "registry_gbps": median(&http),
        "ratio": median(&ratios),
        "ratio_to_tcp": median(&tcp_ratios),
        "repeat": repeat.max(1),
    }))
}

/// One generation request: (latency s, first-token s, tokens generated).
async fn one_request(server: &Server, body: &Value) -> Result<(f64, f64, u64)> {
    let t = Instant::now();
    let v = server.post("/v1/models/bench/generate", body).await?;
    let latency = t.elapsed().as_secs_f64();
    let first = v["timing"]["first_token_ms"].as_f64().unwrap_or(f64::NAN) / 1e3;
    Ok((latency, first, v["completion_tokens"].as_u64().unwrap_or(0)))
}

async fn bench_generation(server: &Arc<Server>, checkpoint: &str, args: &RegistryBenchArgs) -> Result<Value> {
    let v = server.register("bench", checkpoint).await?;
    let vocab = v["model_config"]["vocab_size"]
        .as_u64()
        .context("the version has no vocab_size")?;
    let seq = v["model_config"]["seq_len"].as_u64().unwrap_or(0) as usize;
    if args.prompt_tokens + args.max_tokens > seq {
        bail!(
            "--prompt-tokens {} + --max-tokens {} is more than the model's context of {seq}",
            args.prompt_tokens,
            args.max_tokens
        );
    }
    let body = |i: usize| {
        let prompt: Vec<u64> = (0..args.prompt_tokens as u64)
            .map(|k| (k * 31 + i as u64 * 7) % vocab)
            .collect();
        json!({ "tokens": prompt, "max_tokens": args.max_tokens, "seed": i, "stop_at_eod": false })
    };
    // The first request loads the model; not counted.
    let t = Instant::now();
    one_request(server, &body(0)).await?;
    let load_s = t.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    for &c in &args.concurrency {
        let c = c.max(1);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let clients: Vec<_> = (0..c)
            .map(|_| {
                let (server, next, requests) = (server.clone(), next.clone(), args.requests);
                let bodies: Vec<Value> = (0..requests).map(body).collect();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= requests {
                            return Ok::<_, anyhow::Error>(out);
                        }
                        out.push(one_request(&server, &bodies[i]).await?);
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        for h in clients {
            results.extend(h.await??);
        }
        let wall = started.elapsed().as_secs_f64();
        let latency: Vec<f64> = results.iter().map(|r| r.0).collect();
        let first: Vec<f64> = results.iter().map(|r| r.1).collect();
        let tokens: u64 = results.iter().map(|r| r.2).sum();
        runs.push(json!({
            "concurrency": c, "requests": results.len(), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens as f64 / wall,
            "latency_p50_ms": quantile(&latency, 0.5) * 1e3, "latency_p99_ms": quantile(&latency, 0.99) * 1e3,
            "first_token_p50_ms": quantile(&first, 0.5) * 1e3, "first_token_p99_ms": quantile(&first, 0.99) * 1e3,
        }));
    }
    Ok(json!({
        "model": v["model_config"], "params": v["tensors"], "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "batch_slots": args.batch_slots, "load_s": load_s, "runs": runs,
    }))
}

pub fn run(args: RegistryBenchArgs) -> Result<ExitCode> {
    gantry_train::load_cuda_backend();
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("gantry-bench-registry-{}", std::process::id())));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let checkpoint = match &args.checkpoint {
        Some(c) if !c.contains("://") => Some(
            std::fs::canonicalize(c)
                .with_context(|| format!("no checkpoint at {c}"))?
                .display()
                .to_string(),
        ),
        other => other.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(async {
        let server = Arc::new(Server::start(&work, args.batch_slots).await?);
        let download = if args.download_mib > 0 {
            Some(bench_download(&server, &work, &args).await?)
        } else {
            None
        };
        let generation = match &checkpoint {
            Some(c) => Some(bench_generation(&server, c, &args).await?),
            None => None,
        };
        if let Ok(s) = Arc::try_unwrap(server) {
            s.running.stop().await?;
        }
        Ok::<_, anyhow::Error>(json!({ "download": download, "generation": generation }))
    });
    let _ = std::fs::remove_dir_all(&work);
    let report = report?;
    if args.json {
        println!("{report}");
        return Ok(ExitCode::SUCCESS);
    }
    for (cache, d) in ["warm", "cold"]
        .iter()
        .filter_map(|c| report["download"][c].as_object().map(|d| (c, d)))
    {
        let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "download of a {:.0} MiB object, {cache} page cache, median of {}:",
            f("bytes") / (1 << 20) as f64,
            d["repeat"]
        );
        println!("  direct read (std::fs)             {:>7.2} GB/s", f("direct_gbps"));
        println!("  plain loopback TCP of the file    {:>7.2} GB/s", f("tcp_gbps"));
        println!("  through the registry (HTTP)       {:>7.2} GB/s", f("registry_gbps"));
        println!("  ratio registry / direct read      {:>7.2}", f("ratio"));
        println!("  ratio registry / plain TCP        {:>7.2}", f("ratio_to_tcp"));
    }
    if let Some(g) = report["generation"].as_object() {
        println!(
            "generation: {} prompt tokens + {} generated per request, {} slots, model loaded in {:.2} s",
            g["prompt_tokens"],
            g["max_tokens"],
            g["batch_slots"],
            g["load_s"].as_f64().unwrap_or(0.0)
        );
        println!("  concurrency  requests  tokens/s   p50 ms   p99 ms   first-token p50/p99 ms");
        for r in g["runs"].as_array().into_iter().flatten() {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {:>11}  {:>8}  {:>8.0}  {:>7.1}  {:>7.1}   {:.1} / {:.1}",
                r["concurrency"].as_u64().unwrap_or(0),
                r["requests"].as_u64().unwrap_or(0),
                f("tokens_per_s"),
                f("latency_p50_ms"),
                f("latency_p99_ms"),
                f("first_token_p50_ms"),
                f("first_token_p99_ms")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
