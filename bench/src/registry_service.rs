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
//! serve`, its generation engine on its own thread), generating with the model loader the
//! binary hands in (it owns the tensor library).

use crate::error::{BenchError, Result};
use crate::{host, stats};
use gantry_checkpoint::format::{DType, SliceSpec};
use gantry_checkpoint::{JobState, S3Options, SaveRequest, Saver, SaverConfig, Store, TensorData};
use gantry_registry::http::{Scope, ServeConfig, TokenEntry, serve};
use gantry_registry::serving::ModelLoader;
use serde_json::{Value, json};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The settings of `gantry bench registry`.
#[derive(Clone, Debug)]
pub struct RegistryBenchConfig {
    /// A trained checkpoint root to serve for the generation figures (skipped without one).
    pub checkpoint: Option<String>,
    /// Size of the downloaded object in MiB (0 skips the download figures).
    pub download_mib: u64,
    /// Repetitions of each download (interleaved with the direct reads).
    pub repeat: usize,
    /// Also the cold-cache download figures (file dropped from the page cache before each read).
    pub cold: bool,
    /// Generation requests per concurrency level.
    pub requests: usize,
    /// Concurrent clients, one run per value.
    pub concurrency: Vec<usize>,
    /// Tokens generated per request.
    pub max_tokens: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// KV-cache slots of the served model (reported; the loader is built with them).
    pub batch_slots: usize,
    /// Sampling temperature of every request (0: greedy, what a peer's `generate` compares with).
    pub temperature: f64,
    /// Scratch directory (created, removed at the end).
    pub work: PathBuf,
}

const WRITE_TOKEN: &str = "bench-write-token-0123456789";

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
            bytes: bytes.into(),
        }],
        rank_state: json!({}),
        job: JobState::default(),
    })?;
    saver
        .wait()?
        .ok_or_else(|| BenchError::Mismatch("the artifact's save reported nothing".into()))?;
    Ok(url)
}

fn http_error(request: &str) -> impl FnOnce(reqwest::Error) -> BenchError {
    let request = request.to_string();
    move |e| BenchError::Http {
        request,
        detail: e.to_string(),
    }
}

/// The registry served in this process on 127.0.0.1:0, and a client of it.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), gantry_registry::http::ServeError>>,
    base: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(work: &Path, loader: Arc<dyn ModelLoader>) -> Result<Server> {
        let config = ServeConfig {
            db: work.join("registry.redb"),
            tokens: vec![TokenEntry {
                token: WRITE_TOKEN.into(),
                scope: Scope::Write,
            }],
            generation: Some(loader),
            ..ServeConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| BenchError::Harness(format!("cannot bind 127.0.0.1:0 for the registry: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Harness(format!("the registry's listener has no address: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder().build().map_err(http_error("client"))?;
        Ok(Server {
            stop,
            served,
            base: format!("http://{addr}"),
            http,
        })
    }

    /// Stop accepting, let requests in flight finish, and report a failure to serve.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        match self.served.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BenchError::Harness(format!("the registry failed: {e}"))),
            Err(e) => Err(BenchError::Harness(format!("the registry's task failed: {e}"))),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(WRITE_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(http_error(path))?;
        let status = r.status();
        let text = r.text().await.map_err(http_error(path))?;
        if !status.is_success() {
            return Err(BenchError::Http {
                request: path.to_string(),
                detail: format!("{status}: {text}"),
            });
        }
        serde_json::from_str(&text).map_err(|e| BenchError::Http {
            request: path.to_string(),
            detail: format!("the reply is not JSON: {e}"),
        })
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
    let read = |path: &Path| -> std::io::Result<u64> {
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
    };
    read(path).map_err(BenchError::io("read", path))
}

/// The same file sent over a plain loopback TCP connection (a thread reading 4 MiB blocks and
/// writing them to the socket, this one reading to the end): the transport's own ceiling.
fn read_over_tcp(path: &Path) -> Result<u64> {
    let send = |path: PathBuf| -> std::io::Result<u64> {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
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
        sender.join().expect("the TCP sender panicked")?;
        Ok(n)
    };
    send(path.to_path_buf()).map_err(BenchError::io("send over loopback TCP", path))
}

async fn download(server: &Server, path: &str) -> Result<u64> {
    let mut r = server
        .http
        .get(format!("{}{path}", server.base))
        .send()
        .await
        .map_err(http_error(path))?;
    if !r.status().is_success() {
        return Err(BenchError::Http {
            request: path.to_string(),
            detail: r.status().to_string(),
        });
    }
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.map_err(http_error(path))? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// Download figures from a warm page cache and, with `cold`, a cold one (the file dropped
/// from the cache before every read).
async fn bench_download(server: &Server, config: &RegistryBenchConfig) -> Result<Value> {
    let root = config.work.join("artifact");
    let url = write_artifact(&root, config.download_mib)?;
    server.register("artifact", &url).await?;
    let step = root.join("step-00000001");
    let manifest_path = step.join("manifest.json");
    let manifest_bytes = std::fs::read(&manifest_path).map_err(BenchError::io("read", &manifest_path))?;
    let manifest: gantry_checkpoint::Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| BenchError::Mismatch(format!("{}: {e}", manifest_path.display())))?;
    let object = &manifest.objects[0];
    let file = step.join(&object.object);
    let path = format!("/v1/models/artifact/versions/1/files/{}", object.object);
    let warm = download_runs(server, &file, &path, object.size, config.repeat, false).await?;
    let cold = if config.cold {
        download_runs(server, &file, &path, object.size, config.repeat, true).await?
    } else {
        Value::Null
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
    let evict = || if cold { host::evict_file(file) } else { Ok(()) };
    if !cold {
        read_direct(file)?;
        download(server, path).await?;
    }
    let (mut direct, mut tcp, mut http) = (vec![], vec![], vec![]);
    for _ in 0..repeat.max(1) {
        evict()?;
        let t = Instant::now();
        let a = read_direct(file)?;
        direct.push(t.elapsed().as_secs_f64());
        evict()?;
        let t = Instant::now();
        let b = tokio::task::block_in_place(|| read_over_tcp(file))?;
        tcp.push(t.elapsed().as_secs_f64());
        evict()?;
        let t = Instant::now();
        let c = download(server, path).await?;
        http.push(t.elapsed().as_secs_f64());
        if a != size || b != size || c != size {
            return Err(BenchError::Mismatch(format!(
                "read {a}, {b} over TCP and downloaded {c} bytes of a {size}-byte object"
            )));
        }
    }
    let rates = |seconds: &[f64]| -> Vec<f64> { seconds.iter().map(|&s| stats::gbps(size, s)).collect() };
    Ok(json!({
        "bytes": size,
        "direct_gbps": stats::median(&rates(&direct)),
        "tcp_gbps": stats::median(&rates(&tcp)),
        "registry_gbps": stats::median(&rates(&http)),
        "ratio": stats::paired_ratio(&http, &direct),
        "ratio_to_tcp": stats::paired_ratio(&http, &tcp),
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

/// `requests` requests from `clients` concurrent clients, each sending its next request when
/// the previous one answers; the figures of the run.
async fn generation_run(server: &Arc<Server>, bodies: &[Value], clients: usize) -> Result<Value> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (server, next, bodies) = (server.clone(), next.clone(), bodies.to_vec());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= bodies.len() {
                        return Ok::<_, BenchError>(out);
                    }
                    out.push(one_request(&server, &bodies[i]).await?);
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in tasks {
        let done = h
            .await
            .map_err(|e| BenchError::Harness(format!("a generation client failed: {e}")))?;
        results.extend(done?);
    }
    let wall = started.elapsed().as_secs_f64();
    let latency: Vec<f64> = results.iter().map(|r| r.0).collect();
    let first: Vec<f64> = results.iter().map(|r| r.1).collect();
    let tokens: u64 = results.iter().map(|r| r.2).sum();
    let q = stats::quantile_nearest_rank;
    Ok(json!({
        "concurrency": clients, "requests": results.len(), "tokens": tokens, "seconds": wall,
        "tokens_per_s": tokens as f64 / wall,
        "latency_p50_ms": q(&latency, 0.5) * 1e3, "latency_p99_ms": q(&latency, 0.99) * 1e3,
        "first_token_p50_ms": q(&first, 0.5) * 1e3, "first_token_p99_ms": q(&first, 0.99) * 1e3,
    }))
}

async fn bench_generation(server: &Arc<Server>, checkpoint: &str, config: &RegistryBenchConfig) -> Result<Value> {
    let v = server.register("bench", checkpoint).await?;
    let vocab = v["model_config"]["vocab_size"]
        .as_u64()
        .ok_or_else(|| BenchError::Mismatch("the version has no vocab_size".into()))?;
    let seq = v["model_config"]["seq_len"].as_u64().unwrap_or(0) as usize;
    if config.prompt_tokens + config.max_tokens > seq {
        return Err(BenchError::setting(
            "--prompt-tokens",
            format!(
                "{} + --max-tokens {} is more than the model's context of {seq}",
                config.prompt_tokens, config.max_tokens
            ),
        ));
    }
    let body = |i: usize| {
        let prompt: Vec<u64> = (0..config.prompt_tokens as u64)
            .map(|k| (k * 31 + i as u64 * 7) % vocab)
            .collect();
        json!({
            "tokens": prompt, "max_tokens": config.max_tokens, "seed": i, "stop_at_eod": false,
            "temperature": config.temperature,
        })
    };
    // The first request loads the model; not counted.
    let t = Instant::now();
    one_request(server, &body(0)).await?;
    let load_s = t.elapsed().as_secs_f64();
    let bodies: Vec<Value> = (0..config.requests).map(body).collect();
    let mut runs = Vec::new();
    for &c in &config.concurrency {
        runs.push(generation_run(server, &bodies, c.max(1)).await?);
    }
    Ok(json!({
        "model": v["model_config"], "params": v["tensors"], "max_tokens": config.max_tokens,
        "prompt_tokens": config.prompt_tokens, "batch_slots": config.batch_slots, "load_s": load_s, "runs": runs,
        "temperature": config.temperature,
    }))
}

/// Everything `gantry bench registry` reports: `download` (`warm`, `cold`) and `generation`,
/// each `null` when skipped.
#[derive(Clone, Debug)]
pub struct RegistryReport(pub Value);

impl RegistryReport {
    pub fn to_json(&self) -> &Value {
        &self.0
    }

    pub fn text_lines(&self) -> Vec<String> {
        let report = &self.0;
        let mut out = Vec::new();
        for (cache, d) in ["warm", "cold"]
            .iter()
            .filter_map(|c| report["download"][c].as_object().map(|d| (c, d)))
        {
            let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
            out.push(format!(
                "download of a {:.0} MiB object, {cache} page cache, median of {}:",
                f("bytes") / (1 << 20) as f64,
                d["repeat"]
            ));
            out.push(format!(
                "  direct read (std::fs)             {:>7.2} GB/s",
                f("direct_gbps")
            ));
            out.push(format!(
                "  plain loopback TCP of the file    {:>7.2} GB/s",
                f("tcp_gbps")
            ));
            out.push(format!(
                "  through the registry (HTTP)       {:>7.2} GB/s",
                f("registry_gbps")
            ));
            out.push(format!("  ratio registry / direct read      {:>7.2}", f("ratio")));
            out.push(format!(
                "  ratio registry / plain TCP        {:>7.2}",
                f("ratio_to_tcp")
            ));
        }
        if let Some(g) = report["generation"].as_object() {
            out.push(format!(
                "generation: {} prompt tokens + {} generated per request, {} slots, model loaded in {:.2} s",
                g["prompt_tokens"],
                g["max_tokens"],
                g["batch_slots"],
                g["load_s"].as_f64().unwrap_or(0.0)
            ));
            out.push("  concurrency  requests  tokens/s   p50 ms   p99 ms   first-token p50/p99 ms".to_string());
            for r in g["runs"].as_array().into_iter().flatten() {
                let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
                out.push(format!(
                    "  {:>11}  {:>8}  {:>8.0}  {:>7.1}  {:>7.1}   {:.1} / {:.1}",
                    r["concurrency"].as_u64().unwrap_or(0),
                    r["requests"].as_u64().unwrap_or(0),
                    f("tokens_per_s"),
                    f("latency_p50_ms"),
                    f("latency_p99_ms"),
                    f("first_token_p50_ms"),
                    f("first_token_p99_ms")
                ));
            }
        }
        out
    }
}

/// Run `gantry bench registry`: serve the registry in this process with `loader` generating,
/// measure downloads (unless `download_mib` is 0) and generation (with a `checkpoint`), then
/// remove the scratch directory.
pub fn run(config: &RegistryBenchConfig, loader: Arc<dyn ModelLoader>) -> Result<RegistryReport> {
    let work = &config.work;
    std::fs::create_dir_all(work).map_err(BenchError::io("cannot create", work))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Harness(format!("cannot start a tokio runtime: {e}")))?;
    let report = rt.block_on(async {
        let server = Arc::new(Server::start(work, loader).await?);
        let download = if config.download_mib > 0 {
            Some(bench_download(&server, config).await?)
        } else {
            None
        };
        let generation = match &config.checkpoint {
            Some(c) => Some(bench_generation(&server, c, config).await?),
            None => None,
        };
        if let Ok(s) = Arc::try_unwrap(server) {
            s.stop().await?;
        }
        Ok::<_, BenchError>(json!({ "download": download, "generation": generation }))
    });
    let _ = std::fs::remove_dir_all(work);
    Ok(RegistryReport(report?))
}
