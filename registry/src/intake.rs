//! From a checkpoint URL to a version record: parse it as a `StorageLocation`, open the
//! committed checkpoint through `gantry-checkpoint` for reading (nothing is created), verify
//! every chunk object (size and xxh3 of every entry), and copy the manifest's lineage into a
//! [`VersionRecord`]. Nothing here touches the database.

use crate::error::RegistryError;
use crate::model::VersionRecord;
use gantry_checkpoint::format::xxh3_hex;
use gantry_checkpoint::{Checkpoint, CheckpointError, S3Options, StorageLocation, Store, Which};
use std::path::{Path, PathBuf};

/// JSON with object keys sorted at every level, whatever map order serde_json was built with.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push(':');
                canonical_json(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Open a committed checkpoint and verify every chunk; refuse anything else. A location that
/// does not exist and one that holds no checkpoint get the same answer, so registration
/// cannot be used to probe the server's file system.
pub(crate) fn open_verified(url: &str, step: Option<u64>, s3: &S3Options) -> Result<(Checkpoint, u64), RegistryError> {
    let refuse = |message: String| RegistryError::Checkpoint {
        url: url.to_string(),
        message,
    };
    let nothing = || refuse("no committed gantry checkpoint there (nothing at that path, or not a checkpoint)".into());
    let location = StorageLocation::parse(url).map_err(|e| refuse(e.to_string()))?;
    // Opened for reading: a registry never creates a missing local directory.
    let store = Store::open_existing(&location, s3).map_err(|e| match e {
        CheckpointError::Location(l) if l.is_absent() => nothing(),
        e => refuse(e.to_string()),
    })?;
    let which = step.map_or(Which::Latest, Which::Step);
    let ckpt = Checkpoint::open(&store, which).map_err(|e| match e {
        CheckpointError::NoCheckpoint { .. } => nothing(),
        e => refuse(e.to_string()),
    })?;
    let report = ckpt.verify(&mut |_| {}).map_err(|e| refuse(e.to_string()))?;
    Ok((ckpt, report.bytes))
}

/// Where a registry accepts checkpoints from (`--checkpoint-roots`): a location whose local
/// directory is canonical (symlinks resolved at startup, so a symlink cannot later widen it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRoot(StorageLocation);

impl CheckpointRoot {
    /// Parse one root. A local root must be an existing directory.
    pub fn parse(root: &str) -> Result<CheckpointRoot, String> {
        StorageLocation::parse(root)
            .and_then(|location| location.for_reading())
            .map(CheckpointRoot)
            .map_err(|e| format!("checkpoint root: {e}"))
    }

    pub fn location(&self) -> &StorageLocation {
        &self.0
    }
}

/// Is `url` inside one of `roots`? Checked on the path as written (`..` resolved without
/// touching the disk) and, for a local path that exists, again after resolving symlinks, so
/// neither `root/../etc` nor a symlink inside a root leads out of it.
pub fn within_roots(url: &str, roots: &[CheckpointRoot]) -> bool {
    // Parsing already refuses other schemes and `.` / `..` in S3 keys.
    let Ok(location) = StorageLocation::parse(url) else {
        return false;
    };
    let segments = |prefix: &str| -> Vec<String> {
        prefix
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    };
    let path = match location.absolute() {
        StorageLocation::S3 { bucket, prefix } => {
            let parts = segments(&prefix);
            return roots.iter().any(|r| match r.location() {
                StorageLocation::S3 { bucket: b, prefix } => *b == bucket && parts.starts_with(&segments(prefix)),
                StorageLocation::Local(_) => false,
            });
        }
        StorageLocation::Local(path) => path,
    };
    let lexical = lexical_normal(&path);
    let inside = |p: &Path| {
        roots
            .iter()
            .any(|r| matches!(r.location(), StorageLocation::Local(root) if p.starts_with(root)))
    };
    if !inside(&lexical) {
        return false;
    }
    match std::fs::canonicalize(&lexical) {
        Ok(real) => inside(&real),
        // Nothing there: inside by its name, and registration will find nothing.
        Err(_) => true,
    }
}

/// `path` with `.` and `..` resolved by name only.
fn lexical_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

pub(crate) fn version_record(
    model: &str,
    url: &str,
    ckpt: &Checkpoint,
    bytes: u64,
    version: u32,
    now_ms: u64,
) -> VersionRecord {
    let m = &ckpt.manifest;
    let mut lineage = serde_json::to_value(&m.job.lineage).expect("lineage serializes");
    if let serde_json::Value::Object(map) = &mut lineage {
        map.insert("world_size".into(), m.world_size.into());
        map.insert("attempt".into(), m.attempt.clone().into());
        map.insert("committed_at".into(), m.committed_at.into());
    }
    let mut spec = String::new();
    canonical_json(
        &serde_json::json!({
            "model": m.job.model,
            "layout": m.job.layout,
            "optimizer": m.job.optimizer,
        }),
        &mut spec,
    );
    VersionRecord {
        model: model.to_string(),
        version,
        created_ms: now_ms,
        checkpoint_url: url.to_string(),
        step: m.step,
        tokens_seen: m.job.tokens_seen,
        model_config: m.job.model.clone(),
        layout: m.job.layout.clone(),
        data_cursor: m.job.data_cursor.clone(),
        lineage,
        spec_hash: xxh3_hex(spec.as_bytes()),
        bytes,
        tensors: m.tensors().len(),
        data: m.job.data.clone(),
        evals: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_hold_what_is_under_them_and_nothing_else() {
        let base = std::env::temp_dir().join(format!("gantry-roots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("runs/a")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), base.join("runs/escape")).unwrap();
        let roots = vec![
            CheckpointRoot::parse(base.join("runs").to_str().unwrap()).unwrap(),
            CheckpointRoot::parse("s3://bkt/models/").unwrap(),
        ];
        let p = |rel: &str| base.join(rel).display().to_string();
        assert!(within_roots(&p("runs/a"), &roots));
        assert!(within_roots(&format!("file://{}", p("runs/a")), &roots));
        assert!(within_roots(&p("runs/not-yet"), &roots));
        assert!(!within_roots(&p("outside"), &roots));
        assert!(!within_roots(&p("runs/../outside"), &roots));
        assert!(!within_roots(&p("runs/escape"), &roots), "a symlink out of a root");
        assert!(!within_roots(&p("runsx"), &roots), "a sibling sharing the prefix");
        assert!(!within_roots("/etc", &roots));
        assert!(within_roots("s3://bkt/models/run-1", &roots));
        assert!(within_roots("s3://bkt/models", &roots));
        assert!(!within_roots("s3://bkt/modelsx/run", &roots));
        assert!(!within_roots("s3://bkt/models/../other", &roots));
        assert!(!within_roots("s3://other/models/run", &roots));
        assert!(!within_roots("gs://bkt/models/run", &roots));
        assert!(CheckpointRoot::parse("s3://").is_err());
        assert!(CheckpointRoot::parse(&p("missing")).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = serde_json::json!({"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": "s\"q"}});
        let mut out = String::new();
        canonical_json(&a, &mut out);
        assert_eq!(out, r#"{"a":{"x":"s\"q","y":[1,{"c":3,"d":2}]},"b":1}"#);
    }
}
