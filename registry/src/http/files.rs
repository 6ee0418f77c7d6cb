//! `GET /v1/models/{model}/versions/{version}/files/{*path}`: the files of a version's
//! checkpoint step: `manifest.json` and the chunk objects the manifest lists
//! (`rank-RRRRR/<attempt>-CCCC.bin`). Anything else (other files, `..`, absolute paths) is 404.
//!
//! - Local checkpoints (a plain path or `file://`) are read with tokio's file API; others
//!   (`s3://`) through the checkpoint store with ranged reads, sizes from the manifest.
//! - `Range: bytes=a-b | a- | -n` → 206 + `Content-Range`; an unsatisfiable range → 416 with
//!   `Content-Range: bytes */SIZE`; a syntactically invalid `Range` is ignored (200, full
//!   body, as RFC 9110 allows); with several ranges only the first is served (a single-part 206).
//! - `ETag`: strong, `"<xxh3 of model, version, file name, size and mtime>"` (in a store:
//!   the commit's attempt and time instead of the mtime); a version is immutable and its
//!   files were verified at registration, so these change whenever the bytes could have. `If-None-Match` (list or `*`) → 304.
//! - Every response names the served version in `X-Gantry-Version`, so a client that fetched
//!   through an alias can pin the rest of its downloads to that version.

use super::auth::Scope;
use super::error::ApiError;
use super::routes::AppState;
use crate::model::VersionRecord;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gantry_checkpoint::format::{ObjectInfo, step_dir, xxh3_hex};
use gantry_checkpoint::{Checkpoint, CheckpointError};
use std::path::PathBuf;
use std::sync::Arc;

/// Bytes per read of a local file, one body chunk each.
const READ_CHUNK: usize = 4 << 20;
/// Pieces read ahead of the client.
const READ_AHEAD: usize = 4;
/// Bytes per ranged read of an object in a store (S3).
const STORE_PIECE: usize = 8 << 20;
/// The header naming the version a file was served from.
pub const VERSION_HEADER: &str = "x-gantry-version";
const MANIFEST: &str = "manifest.json";

/// The part of a manifest this module reads.
#[derive(serde::Deserialize)]
struct Listed {
    objects: Vec<ObjectInfo>,
}

/// What a `Range` header asks for, against a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: the whole file.
    Full,
    /// `[start, end]` inclusive.
    Partial(u64, u64),
    Unsatisfiable,
}

pub fn parse_range(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    let Some(first) = spec.split(',').map(str::trim).find(|r| !r.is_empty()) else {
        return RangeAnswer::Full;
    };
    let Some((a, b)) = first.split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            None => RangeAnswer::Full,
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial(size.saturating_sub(n), size - 1),
        },
        (a, "") => match num(a) {
            None => RangeAnswer::Full,
            Some(a) if a >= size => RangeAnswer::Unsatisfiable,
            Some(a) => RangeAnswer::Partial(a, size - 1),
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b => {
                if a >= size {
                    RangeAnswer::Unsatisfiable
                } else {
                    RangeAnswer::Partial(a, b.min(size - 1))
                }
            }
            _ => RangeAnswer::Full,
        },
    }
}

/// Does `If-None-Match` match `etag` (weak comparison, as RFC 9110 says for this header)?
pub fn none_match(header: Option<&str>, etag: &str) -> bool {
    let Some(h) = header else { return false };
    h.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag.strip_prefix("W/").unwrap_or(etag))
}

/// A path from the URL is served only if it is the manifest or one of its objects, and has no
/// `..`, empty or absolute parts even then (a manifest is data, not trusted to be sane).
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && !path.contains(':')
        && path.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

fn unknown_file(v: &VersionRecord, path: &str) -> ApiError {
    ApiError::not_found(
        "unknown_file",
        format!("{}@{} has no file {path:?}", v.model, v.version),
    )
}

/// Where a version's step directory is: a local directory, or a store (S3).
fn local_step_dir(v: &VersionRecord) -> Option<PathBuf> {
    let url = v.checkpoint_url.as_str();
    if url.contains("://") && !url.starts_with("file://") {
        return None;
    }
    Some(PathBuf::from(url.strip_prefix("file://").unwrap_or(url)).join(step_dir(v.step)))
}

/// A response started for a file: the builder with its headers, status, first byte and
/// length of the body to send.
type Started = (axum::http::response::Builder, StatusCode, u64, u64);

/// What a response for one file needs before its body.
struct FileHead {
    size: u64,
    etag: String,
}

fn file_response(
    headers: &HeaderMap,
    v: &VersionRecord,
    path: &str,
    head: &FileHead,
) -> Result<Result<Started, Response>, ApiError> {
    let header_str = |name: header::HeaderName| headers.get(name).and_then(|h| h.to_str().ok());
    let mut builder = Response::builder()
        .header(header::ETAG, &head.etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(VERSION_HEADER, v.version.to_string());
    if none_match(header_str(header::IF_NONE_MATCH), &head.etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map(Err)
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    let size = head.size;
    let (status, start, len) = match parse_range(header_str(header::RANGE), size) {
        RangeAnswer::Full => (StatusCode::OK, 0, size),
        RangeAnswer::Partial(a, b) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"));
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
        RangeAnswer::Unsatisfiable => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("{path} has {size} bytes; the requested range is outside it"),
            )
            .into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(|e| ApiError::internal(e.to_string()))?,
            );
            return Ok(Err(r));
        }
    };
    let content_type = if path == MANIFEST {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let builder = builder
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len);
    Ok(Ok((builder, status, start, len)))
}

pub(crate) async fn get_file(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(parts): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let answer = get_file_inner(State(s.clone()), headers, Path(parts)).await;
    s.metrics.download("files", answer)
}

async fn get_file_inner(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((model, version, path)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    if model.contains('@') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_name",
            "this path takes a model name; name the version in the {version} segment",
        ));
    }
    let v = s.resolve_segments(&model, &version).await?;
    if !safe_relative(&path) {
        return Err(unknown_file(&v, &path));
    }
    match local_step_dir(&v) {
        Some(dir) => local_file(&headers, &v, &dir, &path).await,
        None => stored_file(&s, &headers, &v, &path).await,
    }
}

/// A file of a checkpoint on local disk, read with tokio's file API.
async fn local_file(
    headers: &HeaderMap,
    v: &VersionRecord,
    dir: &std::path::Path,
    path: &str,
) -> Result<Response, ApiError> {
    if path != MANIFEST {
        let text = tokio::fs::read(dir.join(MANIFEST))
            .await
            .map_err(|e| ApiError::internal(format!("reading the manifest of {}@{}: {e}", v.model, v.version)))?;
        let manifest: Listed = serde_json::from_slice(&text)
            .map_err(|e| ApiError::internal(format!("parsing the manifest of {}@{}: {e}", v.model, v.version)))?;
        if !manifest.objects.iter().any(|o| o.object == path) {
            return Err(unknown_file(v, path));
        }
    }
    let file_path = dir.join(path);
    let file = match tokio::fs::File::open(&file_path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(
                "unknown_file",
                format!("{}@{}: {path} is listed but missing on disk", v.model, v.version),
            ));
        }
        Err(e) => return Err(ApiError::internal(format!("opening {}: {e}", file_path.display()))),
    };
    let meta = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("reading {}: {e}", file_path.display())))?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let etag = format!(
        "\"{}\"",
        xxh3_hex(format!("{}\0{}\0{path}\0{size}\0{mtime}", v.model, v.version).as_bytes())
    );
    let (builder, status, start, len) = match file_response(headers, v, path, &FileHead { size, etag })? {
        Ok(parts) => parts,
        Err(done) => return Ok(done),
    };
    let file = file.into_std().await;
    let body = read_ahead(start, len, READ_CHUNK, move |at, want| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..], at + got as u64)? {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file shrank while being served",
                    ));
                }
                n => got += n,
            }
        }
        Ok(Bytes::from(buf))
    });
    builder
        .status(status)
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// A body of `len` bytes from `start`, read in pieces of `piece` bytes by `read(at, want)`
/// on the blocking pool, [`READ_AHEAD`] pieces ahead of the client: reading the next piece
/// overlaps with sending this one (a cold file is read while the network is busy).
fn read_ahead<F>(start: u64, len: u64, piece: usize, mut read: F) -> Body
where
    F: FnMut(u64, usize) -> std::io::Result<Bytes> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut at = start;
        while at < start + len {
            let want = (start + len - at).min(piece as u64) as usize;
            let piece = read(at, want);
            let failed = piece.is_err();
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
            at += want as u64;
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// A file of a checkpoint in object storage (S3): sizes come from the manifest (checked at
/// registration), bytes from ranged reads of [`STORE_PIECE`] on the blocking pool, read
/// ahead of the client.
async fn stored_file(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    v: &VersionRecord,
    path: &str,
) -> Result<Response, ApiError> {
    let (opened, registry) = (s.opened.clone(), s.registry.clone());
    let record = v.clone();
    let ckpt = tokio::task::spawn_blocking(move || opened.open(&record, registry.s3()))
        .await
        .map_err(|e| ApiError::internal(format!("checkpoint task failed: {e}")))??;
    let manifest_bytes = if path == MANIFEST {
        let c = ckpt.clone();
        let key = format!("{}/{MANIFEST}", step_dir(v.step));
        let bytes = tokio::task::spawn_blocking(move || c.store.get(&key))
            .await
            .map_err(|e| ApiError::internal(format!("checkpoint task failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("reading the manifest of {}@{}: {e}", v.model, v.version)))?
            .ok_or_else(|| unknown_file(v, path))?;
        Some(bytes)
    } else {
        None
    };
    let size = match &manifest_bytes {
        Some(b) => b.len() as u64,
        None => {
            ckpt.manifest
                .objects
                .iter()
                .find(|o| o.object == path)
                .ok_or_else(|| unknown_file(v, path))?
                .size
        }
    };
    let etag = format!(
        "\"{}\"",
        xxh3_hex(
            format!(
                "{}\0{}\0{path}\0{size}\0{}\0{}",
                v.model, v.version, ckpt.manifest.attempt, ckpt.manifest.committed_at
            )
            .as_bytes()
        )
    );
    let (builder, status, start, len) = match file_response(headers, v, path, &FileHead { size, etag })? {
        Ok(parts) => parts,
        Err(done) => return Ok(done),
    };
    let body = match manifest_bytes {
        Some(b) => Body::from(b.slice(start as usize..(start + len) as usize)),
        None => {
            let key = format!("{}/{path}", step_dir(v.step));
            let read = move |ckpt: &Checkpoint, at: u64, want: usize| {
                ckpt.store
                    .get_ranges(&[(key.clone(), at..at + want as u64)])
                    .map(|mut v| v.remove(0))
            };
            // The first piece is read before answering, so a missing or unreadable object
            // is a proper error status rather than a cut-off 200.
            let first_len = (STORE_PIECE as u64).min(len) as usize;
            let (c, r) = (ckpt.clone(), read.clone());
            let first = tokio::task::spawn_blocking(move || r(&c, start, first_len))
                .await
                .map_err(|e| ApiError::internal(format!("checkpoint task failed: {e}")))?
                .map_err(|e| match e {
                    CheckpointError::MissingObject { .. } => ApiError::not_found(
                        "unknown_file",
                        format!("{}@{}: {path} is listed but missing in the store", v.model, v.version),
                    ),
                    e => ApiError::internal(format!("{}@{}: reading {path}: {e}", v.model, v.version)),
                })?;
            let rest = start + first_len as u64;
            let mut first = Some(first);
            read_ahead(start, len, STORE_PIECE, move |at, want| match first.take() {
                Some(b) => Ok(b),
                None if at >= rest => read(&ckpt, at, want).map_err(|e| std::io::Error::other(e.to_string())),
                None => Err(std::io::Error::other("a piece out of order")),
            })
        }
    };
    builder
        .status(status)
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeAnswer::*;

    #[test]
    fn ranges() {
        let r = |h: &str, size| parse_range(Some(h), size);
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(r("bytes=0-3", 10), Partial(0, 3));
        assert_eq!(r("bytes=4-", 10), Partial(4, 9));
        assert_eq!(r("bytes=-3", 10), Partial(7, 9));
        assert_eq!(r("bytes=-30", 10), Partial(0, 9));
        assert_eq!(r("bytes=5-100", 10), Partial(5, 9));
        assert_eq!(r("bytes=2-3, 5-6", 10), Partial(2, 3));
        assert_eq!(r("bytes=10-", 10), Unsatisfiable);
        assert_eq!(r("bytes=10-12", 10), Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Unsatisfiable);
        for ignored in ["bytes=3-1", "bytes=a-b", "items=0-1", "bytes=", "bytes=5"] {
            assert_eq!(r(ignored, 10), Full, "{ignored}");
        }
    }

    #[test]
    fn etags_and_paths() {
        assert!(none_match(Some("\"a\", \"b\""), "\"b\""));
        assert!(none_match(Some("W/\"b\""), "\"b\""));
        assert!(none_match(Some("*"), "\"b\""));
        assert!(!none_match(Some("\"a\""), "\"b\""));
        assert!(!none_match(None, "\"b\""));
        assert!(safe_relative("rank-00000/x-0000.bin") && safe_relative("manifest.json"));
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "C:x"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }
}
