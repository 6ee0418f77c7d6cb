//! `gantry models list|show|register|alias|download`: the registry's HTTP API from the
//! command line (every command also prints `--json`). A model is named `NAME`, `NAME@3` or
//! `NAME@ALIAS` wherever one is expected.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use gantry_checkpoint::format::Manifest;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct RegistryClient {
    /// Registry address (http://host:port).
    #[arg(long, env = "GANTRY_REGISTRY", default_value = "http://127.0.0.1:7080")]
    pub registry: String,
    /// Registry token (a write token for register, alias and recording evals)
    /// [env: GANTRY_REGISTRY_TOKEN]. Visible to every local user in `ps`: prefer --token-file.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// File holding the registry token alone (surrounding whitespace is ignored)
    /// [env: GANTRY_REGISTRY_TOKEN_FILE].
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Models, with their latest version (paginated; --filter matches names).
    List {
        #[arg(long)]
        filter: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: RegistryClient,
    },
    /// A model (NAME) or one version (NAME@3, NAME@ALIAS): lineage, evals.
    Show {
        model: String,
        #[command(flatten)]
        client: RegistryClient,
    },
    /// Register a committed checkpoint as the model's next version (verified first).
    Register {
        model: String,
        /// Checkpoint directory URL (a path, file://… or s3://…).
        #[arg(long)]
        checkpoint: String,
        /// Step (default: the latest committed one).
        #[arg(long)]
        step: Option<u64>,
        #[command(flatten)]
        client: RegistryClient,
    },
    /// Point an alias at a version, or split it: `--split 3:90,4:10`; `--shadow 5:10` mirrors
    /// 10% of its generation requests to version 5 and compares the answers (on /metrics).
    /// The alias is replaced whole (no --shadow: no shadow). A registry that serves loads the
    /// new versions before moving the alias, so this waits for those loads.
    Alias {
        model: String,
        alias: String,
        /// The version (omit with --split).
        #[arg(value_name = "VERSION")]
        target: Option<u32>,
        #[arg(long, value_name = "V:W,...")]
        split: Option<String>,
        /// A shadow version and the percent (1-100) of requests mirrored to it.
        #[arg(long, value_name = "VERSION:PERCENT")]
        shadow: Option<String>,
        #[command(flatten)]
        client: RegistryClient,
    },
    /// Download a version's checkpoint files (manifest and chunks) into a directory.
    Download {
        model: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[command(flatten)]
        client: RegistryClient,
    },
}

impl RegistryClient {
    /// The token from `--token`, `--token-file`, `GANTRY_REGISTRY_TOKEN` or
    /// `GANTRY_REGISTRY_TOKEN_FILE`; `None` without one.
    pub(crate) fn token(&self) -> anyhow::Result<Option<String>> {
        crate::secrets::registry_token(self.token.as_deref(), self.token_file.as_deref())
    }
}

pub(crate) struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// A client for the command line: the token from `--token`, `--token-file` or the
    /// environment (`crate::secrets`).
    pub(crate) fn new(c: &RegistryClient) -> anyhow::Result<Api> {
        Api::with_token(&c.registry, c.token()?)
    }

    /// A client with exactly this token (none: anonymous).
    pub(crate) fn with_token(registry: &str, token: Option<String>) -> anyhow::Result<Api> {
        let base = registry.trim_end_matches('/').to_string();
        let base = if base.contains("://") {
            base
        } else {
            format!("http://{base}")
        };
        Ok(Api {
            base,
            token: token.filter(|t| !t.is_empty()),
            http: reqwest::Client::builder().build()?,
        })
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Send, and turn the registry's JSON errors into messages.
    pub(crate) async fn send(&self, r: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = r
            .send()
            .await
            .with_context(|| format!("cannot reach the registry at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("registry: {status}: {message}")
    }

    pub(crate) async fn json(&self, r: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let text = self.send(r).await?.text().await?;
        serde_json::from_str(&text).context("the registry answered with something that is not JSON")
    }

    pub(crate) async fn post_json(&self, method: reqwest::Method, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .request(method, path)
            .header("content-type", "application/json")
            .body(body.to_string());
        self.json(r).await
    }
}

/// Path segments are names the registry already validates; only `@` needs no escaping.
pub(crate) fn seg(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._@".contains(c) {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32)
            }
        })
        .collect()
}

pub fn run(cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelsCommand::List { filter, limit, client } => list(&client, filter, limit).await?,
        ModelsCommand::Show { model, client } => show(&client, &model).await?,
        ModelsCommand::Register {
            model,
            checkpoint,
            step,
            client,
        } => register(&client, &model, checkpoint, step).await?,
        ModelsCommand::Alias {
            model,
            alias,
            target,
            split,
            shadow,
            client,
        } => set_alias(&client, &model, &alias, target, split, shadow).await?,
        ModelsCommand::Download { model, out, client } => {
            download(&Api::new(&client)?, &model, &out, client.json).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `gantry models list`: model names, one a line.
async fn list(client: &RegistryClient, filter: Option<String>, limit: usize) -> anyhow::Result<()> {
    let api = Api::new(client)?;
    let mut path = format!("/v1/registry/models?limit={limit}");
    if let Some(f) = filter {
        path.push_str(&format!("&filter={}", seg(&f)));
    }
    let v = api.json(api.request(reqwest::Method::GET, &path)).await?;
    if client.json {
        println!("{v}");
    } else {
        for m in v["models"].as_array().into_iter().flatten() {
            println!("{}", m["name"].as_str().unwrap_or(""));
        }
        if let Some(next) = v["next"].as_str() {
            eprintln!("gantry: more models after `{next}` (raise --limit)");
        }
    }
    Ok(())
}

/// `gantry models show`: a model or the version a reference resolves to.
async fn show(client: &RegistryClient, model: &str) -> anyhow::Result<()> {
    let api = Api::new(client)?;
    let v = api
        .json(api.request(reqwest::Method::GET, &format!("/v1/models/{}", seg(model))))
        .await?;
    println!(
        "{}",
        if client.json {
            v.to_string()
        } else {
            serde_json::to_string_pretty(&v)?
        }
    );
    Ok(())
}

/// `gantry models register`: a checkpoint step as the model's next version.
async fn register(client: &RegistryClient, model: &str, checkpoint: String, step: Option<u64>) -> anyhow::Result<()> {
    let api = Api::new(client)?;
    let mut body = json!({ "checkpoint": checkpoint });
    if let Some(s) = step {
        body["step"] = json!(s);
    }
    let v = api
        .post_json(
            reqwest::Method::POST,
            &format!("/v1/models/{}/versions", seg(model)),
            &body,
        )
        .await?;
    if client.json {
        println!("{v}");
    } else {
        println!(
            "{}@{} registered from {} step {} ({} tensors, {} bytes, verified)",
            v["model"].as_str().unwrap_or(model),
            v["version"],
            v["checkpoint_url"].as_str().unwrap_or(""),
            v["step"],
            v["tensors"],
            v["bytes"]
        );
    }
    Ok(())
}

/// `gantry models alias`: point an alias at one version or a weighted split, optionally shadowed.
async fn set_alias(
    client: &RegistryClient,
    model: &str,
    alias: &str,
    target: Option<u32>,
    split: Option<String>,
    shadow: Option<String>,
) -> anyhow::Result<()> {
    let mut body = match (target, split) {
        (Some(v), None) => json!({ "version": v }),
        (None, Some(s)) => json!({ "targets": parse_split(&s)? }),
        _ => bail!("give either a VERSION or --split V:W,V:W"),
    };
    if let Some(s) = shadow {
        body["shadow"] = parse_shadow(&s)?;
    }
    let api = Api::new(client)?;
    let path = format!("/v1/models/{}/aliases/{}", seg(model), seg(alias));
    let v = api.post_json(reqwest::Method::PUT, &path, &body).await?;
    if client.json {
        println!("{v}");
    } else {
        let shadow = match (v["shadow"]["version"].as_u64(), v["shadow"]["percent"].as_u64()) {
            (Some(version), Some(percent)) => format!(", {percent}% mirrored to shadow version {version}"),
            _ => String::new(),
        };
        println!("{model}@{alias} → {}{shadow}", v["targets"]);
    }
    Ok(())
}

/// `3:90,4:10` → `[{"version":3,"weight":90},…]`.
fn parse_split(s: &str) -> anyhow::Result<Value> {
    let mut targets = Vec::new();
    for part in s.split(',') {
        let (v, w) = part
            .split_once(':')
            .with_context(|| format!("--split: `{part}` is not VERSION:WEIGHT"))?;
        let v: u32 = v
            .trim()
            .parse()
            .with_context(|| format!("--split: `{v}` is not a version"))?;
        let w: u32 = w
            .trim()
            .parse()
            .with_context(|| format!("--split: `{w}` is not a weight"))?;
        targets.push(json!({ "version": v, "weight": w }));
    }
    Ok(Value::Array(targets))
}

/// `5:10` → `{"version":5,"percent":10}` (the registry checks the range).
fn parse_shadow(s: &str) -> anyhow::Result<Value> {
    let (v, p) = s
        .split_once(':')
        .with_context(|| format!("--shadow: `{s}` is not VERSION:PERCENT"))?;
    let v: u32 = v
        .trim()
        .parse()
        .with_context(|| format!("--shadow: `{v}` is not a version"))?;
    let p: u32 = p
        .trim()
        .trim_end_matches('%')
        .parse()
        .with_context(|| format!("--shadow: `{p}` is not a whole percent"))?;
    Ok(json!({ "version": v, "percent": p }))
}

/// The manifest first (it lists every object with its size), then each object, skipping
/// files already complete (a rerun resumes).
async fn download(api: &Api, model: &str, out: &std::path::Path, json_out: bool) -> anyhow::Result<()> {
    let version = api
        .json(api.request(reqwest::Method::GET, &format!("/v1/models/{}", seg(model))))
        .await?;
    let (name, number) = (
        version["model"]
            .as_str()
            .context("the registry returned no model name")?
            .to_string(),
        version["version"]
            .as_u64()
            .context("the registry returned no version")?,
    );
    let files = format!("/v1/models/{}/versions/{number}/files", seg(&name));
    let manifest_bytes = api
        .send(api.request(reqwest::Method::GET, &format!("{files}/manifest.json")))
        .await?
        .bytes()
        .await?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).context("the version's manifest.json does not parse")?;
    // Laid out as a checkpoint root (`step-N/…` and `latest`), so `gantry checkpoint verify`,
    // `export` and `gantry launch --resume` read the download as they read the original.
    let step_dir = gantry_checkpoint::format::step_dir(manifest.step);
    let root = out;
    let out = &root.join(&step_dir);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let total: u64 = manifest.objects.iter().map(|o| o.size).sum();
    let bar = (!json_out && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .expect("valid template"),
        );
        b
    });
    let mut fetched = 0u64;
    for o in &manifest.objects {
        let path = out.join(&o.object);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == o.size) {
            if let Some(b) = &bar {
                b.inc(o.size);
            }
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut resp = api
            .send(api.request(reqwest::Method::GET, &format!("{files}/{}", o.object)))
            .await?;
        let tmp = path.with_extension("partial");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            f.write_all(&chunk)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            got += chunk.len() as u64;
            if let Some(b) = &bar {
                b.inc(chunk.len() as u64);
            }
        }
        if got != o.size {
            bail!("{}: got {got} bytes, the manifest says {}", o.object, o.size);
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        fetched += got;
    }
    // The manifest last: a step with a manifest is complete (the commit, as in the original).
    std::fs::write(out.join("manifest.json"), &manifest_bytes)
        .with_context(|| format!("cannot write into {}", out.display()))?;
    std::fs::write(root.join("latest"), &step_dir).with_context(|| format!("cannot write into {}", root.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = json!({"model": name, "version": number, "step": manifest.step, "objects": manifest.objects.len(), "bytes": total, "fetched_bytes": fetched, "out": root});
    if json_out {
        println!("{report}");
    } else {
        println!(
            "{name}@{number}: step {}, {} objects, {total} bytes in {} ({fetched} fetched now)",
            manifest.step,
            manifest.objects.len(),
            root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_shadows_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_split("3:90, 4:10").unwrap(),
            json!([{ "version": 3, "weight": 90 }, { "version": 4, "weight": 10 }])
        );
        assert_eq!(parse_shadow("5:10").unwrap(), json!({ "version": 5, "percent": 10 }));
        assert_eq!(parse_shadow("5:100%").unwrap(), json!({ "version": 5, "percent": 100 }));
        for (bad, says) in [
            ("5", "VERSION:PERCENT"),
            ("x:10", "not a version"),
            ("5:ten", "whole percent"),
        ] {
            let e = parse_shadow(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
