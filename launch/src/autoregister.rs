//! The job spec's `[registry]`: rank 0 registers committed checkpoints as versions of a model
//! (`register = "every"` as each commits, on a background thread; `"final"` the last one
//! after training) and optionally moves an alias to each new version. The registry verifies
//! every chunk before it answers, so this never blocks a training step. Outcomes go to the
//! log and to `registry.jsonl` in the run directory; a failure is reported, not fatal (the
//! checkpoint stays and `gantry models register` can register it later).

use crate::models::{Api, seg};
use gantry_checkpoint::StorageLocation;
use gantry_train::spec::RegistrySpec;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

pub struct AutoRegister {
    spec: RegistrySpec,
    /// The checkpoint root as the registry must see it (local paths made absolute).
    checkpoint: String,
    token: Option<String>,
    /// `every`: steps to register, in commit order, to one thread (so versions are numbered
    /// in step order and the alias ends on the newest).
    queue: Option<(Sender<u64>, JoinHandle<Vec<Value>>)>,
    last_commit: Option<u64>,
    log: PathBuf,
}

impl AutoRegister {
    /// `None` when the spec names no registry (or this rank does not register).
    pub fn new(spec: &gantry_train::JobSpec, run_dir: &Path) -> Option<AutoRegister> {
        let r = &spec.registry;
        if !r.enabled() || !spec.checkpoint.enabled() {
            return None;
        }
        let dir = &spec.checkpoint.dir;
        // A local root as the registry must see it: canonical once it exists (the spec may
        // name one that training has not created yet). A bad location is left for the store
        // to refuse by name.
        let checkpoint = match StorageLocation::parse(dir) {
            Ok(location) => location.for_reading().unwrap_or(location).to_string(),
            Err(_) => dir.clone(),
        };
        let token = std::env::var(&r.token_env).ok().filter(|t| !t.is_empty());
        let queue = (r.register == "every").then(|| {
            let (tx, rx) = std::sync::mpsc::channel::<u64>();
            let (spec, checkpoint, token) = (r.clone(), checkpoint.clone(), token.clone());
            let worker = std::thread::spawn(move || {
                rx.iter()
                    .map(|step| register(&spec, &checkpoint, token.clone(), step))
                    .collect()
            });
            (tx, worker)
        });
        Some(AutoRegister {
            spec: r.clone(),
            checkpoint,
            token,
            queue,
            last_commit: None,
            log: run_dir.join("registry.jsonl"),
        })
    }

    /// A checkpoint committed (called on rank 0 by the trainer).
    pub fn committed(&mut self, step: u64) {
        self.last_commit = Some(step);
        if let Some((tx, _)) = &self.queue {
            let _ = tx.send(step);
        }
    }

    /// Register the last checkpoint (`final`), wait for every registration, record them.
    pub fn finish(self) -> Vec<Value> {
        let mut outcomes: Vec<Value> = match self.queue {
            Some((tx, worker)) => {
                drop(tx);
                worker
                    .join()
                    .unwrap_or_else(|_| vec![json!({ "error": "the registration thread panicked" })])
            }
            None => Vec::new(),
        };
        if self.spec.register == "final"
            && let Some(step) = self.last_commit
        {
            outcomes.push(register(&self.spec, &self.checkpoint, self.token.clone(), step));
        }
        if !outcomes.is_empty() {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .and_then(|mut f| outcomes.iter().try_for_each(|o| writeln!(f, "{o}")));
            if let Err(e) = written {
                tracing::warn!(file = %self.log.display(), error = %e, "cannot record registrations");
            }
        }
        outcomes
    }
}

/// Register `step` of `checkpoint` and move the alias; the outcome as a JSON line.
fn register(spec: &RegistrySpec, checkpoint: &str, token: Option<String>, step: u64) -> Value {
    let attempt = || -> anyhow::Result<Value> {
        let api = Api::with_token(&spec.url, token.clone())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let v = api
                .post_json(
                    reqwest::Method::POST,
                    &format!("/v1/models/{}/versions", seg(&spec.model)),
                    &json!({ "checkpoint": checkpoint, "step": step }),
                )
                .await?;
            if !spec.alias.is_empty() {
                api.post_json(
                    reqwest::Method::PUT,
                    &format!("/v1/models/{}/aliases/{}", seg(&spec.model), seg(&spec.alias)),
                    &json!({ "version": v["version"] }),
                )
                .await?;
            }
            Ok(v)
        })
    };
    match attempt() {
        Ok(v) => {
            tracing::info!(model = %spec.model, version = %v["version"], step, "checkpoint registered");
            json!({ "step": step, "model": spec.model, "version": v["version"], "alias": spec.alias })
        }
        Err(e) => {
            let error = crate::error_chain(&*e);
            tracing::error!(
                model = %spec.model, step, error = %error,
                "registering the checkpoint failed; `gantry models register` can register it later"
            );
            json!({ "step": step, "model": spec.model, "error": error })
        }
    }
}
