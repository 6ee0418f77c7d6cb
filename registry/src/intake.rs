//! From a checkpoint URL to a version record: open the committed checkpoint through
//! `gantry-checkpoint`, verify every chunk object (size and xxh3 of every entry), and copy the
//! manifest's lineage into a [`VersionRecord`]. Nothing here touches the database.

use crate::error::RegistryError;
use crate::model::VersionRecord;
use gantry_checkpoint::format::xxh3_hex;
use gantry_checkpoint::{Checkpoint, S3Options, Store, Which};
use std::path::Path;

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

/// Open a committed checkpoint and verify every chunk; refuse anything else.
pub(crate) fn open_verified(url: &str, step: Option<u64>, s3: &S3Options) -> Result<(Checkpoint, u64), RegistryError> {
    let refuse = |message: String| RegistryError::Checkpoint {
        url: url.to_string(),
        message,
    };
    if !url.starts_with("s3://") {
        // Store::open creates a missing local directory; a registry must not.
        let local = Path::new(url.strip_prefix("file://").unwrap_or(url));
        if !local.is_dir() {
            return Err(refuse(format!("{} is not a directory", local.display())));
        }
    }
    let store = Store::open(url, s3).map_err(|e| refuse(e.to_string()))?;
    let which = step.map_or(Which::Latest, Which::Step);
    let ckpt = Checkpoint::open(&store, which).map_err(|e| refuse(e.to_string()))?;
    let report = ckpt.verify(&mut |_| {}).map_err(|e| refuse(e.to_string()))?;
    Ok((ckpt, report.bytes))
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
    fn canonical_json_sorts_keys_at_every_level() {
        let a = serde_json::json!({"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": "s\"q"}});
        let mut out = String::new();
        canonical_json(&a, &mut out);
        assert_eq!(out, r#"{"a":{"x":"s\"q","y":[1,{"c":3,"d":2}]},"b":1}"#);
    }
}
