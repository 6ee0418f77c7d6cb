//! `GET /v1/models/{model}/versions/{version}/files/{*path}`: the files of a version's
//! checkpoint step: `manifest.json` and the chunk objects the manifest lists
//! (`rank-RRRRR/<attempt>-CCCC.bin`). Anything else (other files, `..`, absolute paths) is 404.
//!
//! - Local checkpoints only (a plain path or `file://`); `s3://` is a 501.
//! - `Range: bytes=a-b | a- | -n` → 206 + `Content-Range`; an unsatisfiable range → 416 with
//!   `Content-Range: bytes */SIZE`; a syntactically invalid `Range` is ignored (200, full
//!   body, as RFC 9110 allows); with several ranges only the first is served (a single-part 206).
//! - `ETag`: strong, `"<xxh3 of model, version, file name, size and mtime>"`; a version is
//!   immutable and its files were verified at registration, so size + mtime (nanoseconds)
//!   change whenever the bytes could have. `If-None-Match` (list or `*`) → 304.
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
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Bytes read per streamed body chunk.
const READ_CHUNK: usize = 64 * 1024;
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

/// The local step directory of a version, or the 501 for S3.
fn step_root(v: &VersionRecord) -> Result<PathBuf, ApiError> {
    let url = v.checkpoint_url.as_str();
    if url.contains("://") && !url.starts_with("file://") {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            format!("files of S3 checkpoints are not served yet ({url})"),
        ));
    }
    let root = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    Ok(root.join(step_dir(v.step)))
}

pub(crate) async fn get_file(
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
    let dir = step_root(&v)?;
    if !safe_relative(&path) {
        return Err(unknown_file(&v, &path));
    }
    if path != MANIFEST {
        let text = tokio::fs::read(dir.join(MANIFEST))
            .await
            .map_err(|e| ApiError::internal(format!("reading the manifest of {}@{}: {e}", v.model, v.version)))?;
        let manifest: Listed = serde_json::from_slice(&text)
            .map_err(|e| ApiError::internal(format!("parsing the manifest of {}@{}: {e}", v.model, v.version)))?;
        if !manifest.objects.iter().any(|o| o.object == path) {
            return Err(unknown_file(&v, &path));
        }
    }
    let file_path = dir.join(&path);
    let mut file = match tokio::fs::File::open(&file_path).await {
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
    let header_str = |name: header::HeaderName| headers.get(name).and_then(|h| h.to_str().ok());
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(VERSION_HEADER, v.version.to_string());
    if none_match(header_str(header::IF_NONE_MATCH), &etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(e.to_string()));
    }
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
            return Ok(r);
        }
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal(format!("seeking {}: {e}", file_path.display())))?;
    }
    let content_type = if path == MANIFEST {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let stream = futures::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let want = (left as usize).min(READ_CHUNK);
        let mut buf = vec![0u8; want];
        match file.read(&mut buf).await {
            Ok(0) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while being served",
                )),
                (file, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (file, left - n as u64)))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    builder
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(stream))
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
