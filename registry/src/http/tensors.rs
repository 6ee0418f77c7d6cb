//! `GET /v1/models/{model}/versions/{version}/tensors?tp=T&rank=R`: only the parameter slices
//! tensor-parallel rank `R` of `T` holds, as one safetensors file, so an eval job or a server
//! at any TP degree downloads just its share.
//!
//! The checkpoint's manifest lists the model's parameters and the dimension TP splits each
//! along (`params`, written by the trainer); [`tp_share`] turns that into one rectangle per
//! parameter, and the checkpoint crate's reader (the same planner that reshards on resume)
//! fetches the overlapping saved slices with ranged reads, checks their checksums and
//! assembles the rectangles, whatever layout the checkpoint was saved in.
//!
//! The body streams: the header (every shape and offset is known up front, so
//! `Content-Length` is exact) and then the tensors in batches of at most [`BATCH_BYTES`],
//! read on the blocking pool while earlier batches are being sent.
//!
//! The safetensors `__metadata__` says what the slices are: `gantry.model`, `gantry.version`,
//! `gantry.tp`, `gantry.rank`, and `gantry.slices`, a JSON object mapping each tensor to its
//! `global_shape` and `offsets` in the global tensor.

use super::auth::Scope;
use super::error::ApiError;
use super::files::{VERSION_HEADER, none_match};
use super::routes::{AppState, query_pairs};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use gantry_checkpoint::format::{DType, SliceSpec, tp_share, xxh3_hex};
use gantry_checkpoint::{Checkpoint, ParamLayout};
use std::sync::Arc;

/// Most bytes of tensors read from storage in one go.
pub const BATCH_BYTES: u64 = 64 << 20;

/// The largest TP degree accepted (a typo guard, not a limit of the format).
pub const MAX_TP: u64 = 4096;

fn safetensors_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::Bf16 => "BF16",
        DType::F16 => "F16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::U8 => "U8",
    }
}

/// The slices TP rank `rank` of `tp` needs, in the manifest's parameter order. A checkpoint
/// without a parameter list (written before gantry recorded one) is served whole at TP 1.
pub fn share_of(ckpt: &Checkpoint, tp: u64, rank: u64) -> Result<Vec<SliceSpec>, ApiError> {
    let tensors = ckpt.manifest.tensors();
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "no_parameter_layout", m);
    let params: Vec<ParamLayout> = if ckpt.manifest.job.params.is_empty() {
        if tp > 1 {
            return Err(unprocessable(format!(
                "checkpoint step {} records no parameter layout (saved by an older gantry), so it \
                 can only be served whole (tp=1)",
                ckpt.step()
            )));
        }
        tensors
            .iter()
            .filter(|(name, _, _)| {
                !name.starts_with("optim.") && !name.starts_with(gantry_checkpoint::format::ASSET_PREFIX)
            })
            .map(|(name, _, _)| ParamLayout {
                name: name.clone(),
                tp_split: None,
            })
            .collect()
    } else {
        ckpt.manifest.job.params.clone()
    };
    params
        .iter()
        .map(|p| {
            let (_, dtype, shape) = tensors
                .iter()
                .find(|(name, _, _)| *name == p.name)
                .ok_or_else(|| unprocessable(format!("parameter {} is listed but has no saved slices", p.name)))?;
            let (offsets, lengths) = tp_share(shape, p.tp_split, tp, rank)
                .map_err(|m| ApiError::bad_request(format!("tensor {}: {m}", p.name)))?;
            Ok(SliceSpec {
                name: p.name.clone(),
                dtype: *dtype,
                global_shape: shape.clone(),
                offsets,
                lengths,
            })
        })
        .collect()
}

/// The safetensors header (length prefix included, padded to 8 bytes) for `slices` laid out
/// back to back in order.
pub fn safetensors_header(slices: &[SliceSpec], metadata: &[(&str, String)]) -> Vec<u8> {
    let mut head = serde_json::Map::new();
    head.insert(
        "__metadata__".into(),
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_string(), serde_json::Value::from(v.clone())))
            .collect(),
    );
    let mut at = 0u64;
    for s in slices {
        let end = at + s.nbytes();
        head.insert(
            s.name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype(s.dtype),
                "shape": s.lengths,
                "data_offsets": [at, end],
            }),
        );
        at = end;
    }
    let mut json = serde_json::Value::Object(head).to_string().into_bytes();
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// `tp` and `rank` from the query (both default: tp 1, rank 0).
fn tp_query(raw: Option<String>) -> Result<(u64, u64), ApiError> {
    let (mut tp, mut rank) = (1u64, 0u64);
    for (k, v) in query_pairs(&raw.unwrap_or_default())? {
        let n = v
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("{k} must be a non-negative integer, got {v:?}")))?;
        match k.as_str() {
            "tp" => tp = n,
            "rank" => rank = n,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (tp, rank)"
                )));
            }
        }
    }
    if tp == 0 || tp > MAX_TP {
        return Err(ApiError::bad_request(format!(
            "tp must be between 1 and {MAX_TP}, got {tp}"
        )));
    }
    if rank >= tp {
        return Err(ApiError::bad_request(format!(
            "rank {rank} is not a rank of tp={tp} (0..{tp})"
        )));
    }
    Ok((tp, rank))
}

pub(crate) async fn get_tensors(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(parts): Path<(String, String)>,
    query: RawQuery,
) -> Result<Response, ApiError> {
    let answer = get_tensors_inner(State(s.clone()), headers, Path(parts), query).await;
    s.metrics.download("tensors", answer)
}

async fn get_tensors_inner(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, version)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let (tp, rank) = tp_query(q)?;
    let v = s.resolve_segments(&model, &version).await?;
    let etag = format!(
        "\"{}\"",
        xxh3_hex(
            format!(
                "tensors\0{}\0{}\0{}\0{}\0{tp}\0{rank}",
                v.model, v.version, v.checkpoint_url, v.step
            )
            .as_bytes()
        )
    );
    let builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(VERSION_HEADER, v.version.to_string());
    if none_match(headers.get(header::IF_NONE_MATCH).and_then(|h| h.to_str().ok()), &etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    let (opened, registry) = (s.opened.clone(), s.registry.clone());
    let record = v.clone();
    let (ckpt, slices) = tokio::task::spawn_blocking(move || {
        let ckpt = opened.open(&record, registry.s3())?;
        let slices = share_of(&ckpt, tp, rank)?;
        Ok::<_, ApiError>((ckpt, slices))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tensor task failed: {e}")))??;
    let described: serde_json::Map<String, serde_json::Value> = slices
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                serde_json::json!({ "global_shape": s.global_shape, "offsets": s.offsets }),
            )
        })
        .collect();
    let header_bytes = safetensors_header(
        &slices,
        &[
            ("format", "pt".to_string()),
            ("gantry.model", v.model.clone()),
            ("gantry.version", v.version.to_string()),
            ("gantry.tp", tp.to_string()),
            ("gantry.rank", rank.to_string()),
            ("gantry.slices", serde_json::Value::Object(described).to_string()),
        ],
    );
    let total = header_bytes.len() as u64 + slices.iter().map(SliceSpec::nbytes).sum::<u64>();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let label = format!("{}@{}", v.model, v.version);
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(Ok(Bytes::from(header_bytes))).is_err() {
            return;
        }
        for batch in batches(&slices) {
            let sent = match ckpt.load(batch) {
                Ok(buffers) => buffers
                    .into_iter()
                    .all(|b| tx.blocking_send(Ok(Bytes::from(b))).is_ok()),
                Err(e) => {
                    tracing::error!(version = %label, error = %e, "reading tensors for a TP share failed mid-response");
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    false
                }
            };
            if !sent {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    builder
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, total)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Consecutive runs of slices of at most [`BATCH_BYTES`] (a larger slice is a batch alone).
fn batches(slices: &[SliceSpec]) -> Vec<&[SliceSpec]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, s) in slices.iter().enumerate() {
        if i > start && bytes + s.nbytes() > BATCH_BYTES {
            out.push(&slices[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += s.nbytes();
    }
    if start < slices.len() {
        out.push(&slices[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, lengths: &[u64]) -> SliceSpec {
        SliceSpec::full(name, DType::F32, lengths)
    }

    #[test]
    fn queries() {
        assert_eq!(tp_query(None).unwrap(), (1, 0));
        assert_eq!(tp_query(Some("tp=4&rank=3".into())).unwrap(), (4, 3));
        for bad in ["tp=0", "tp=2&rank=2", "tp=x", "rank=-1", "tp=2&bogus=1", "tp=99999"] {
            assert_eq!(tp_query(Some(bad.into())).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn batches_cover_every_slice_once_in_order() {
        let big = BATCH_BYTES / 4;
        let slices = vec![
            slice("a", &[8]),
            slice("b", &[big]),
            slice("c", &[big / 2]),
            slice("d", &[big / 2]),
            slice("e", &[8]),
        ];
        let b = batches(&slices);
        let names: Vec<Vec<&str>> = b.iter().map(|s| s.iter().map(|x| x.name.as_str()).collect()).collect();
        assert_eq!(names, vec![vec!["a"], vec!["b"], vec!["c", "d"], vec!["e"]]);
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn header_is_aligned_and_describes_contiguous_data() {
        let slices = vec![slice("w", &[2, 3]), slice("b", &[3])];
        let h = safetensors_header(&slices, &[("k", "v".into())]);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, h.len());
        let v: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(v["w"]["data_offsets"], serde_json::json!([0, 24]));
        assert_eq!(v["b"]["data_offsets"], serde_json::json!([24, 36]));
        assert_eq!(v["__metadata__"]["k"], "v");
    }
}
