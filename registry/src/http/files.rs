//! `GET /v1/models/{model}/versions/{version}/files/{*path}`: the files of a version's
//! checkpoint step: `manifest.json` and the chunk objects the manifest lists
//! (`rank-RRRRR/<attempt>-CCCC.bin`). Anything else (other files, `..`, absolute paths) is 404.
//!
//! - Only what the committed manifest names is served. Local checkpoints (a plain path or
//!   `file://`) are opened without following any symlink below the checkpoint root and must
//!   be regular files of the manifest's size (`gantry_checkpoint::plain`); others (`s3://`)
//!   are read through the checkpoint store with ranged reads, sizes from the manifest.
//! - A whole object is checked against the manifest's checksums as it streams out: a byte
//!   changed since registration ends the response with an error instead of completing it.
//!   Ranged reads check the file's identity and size.
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
use gantry_checkpoint::format::{step_dir, xxh3_hex};
use gantry_checkpoint::plain::{PlainFileError, open_plain};
use gantry_checkpoint::reader::ObjectCheck;
use gantry_checkpoint::{Checkpoint, CheckpointError};
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
    gantry_checkpoint::reader::is_safe_key(path) && !path.contains(':')
}

fn unknown_file(v: &VersionRecord, path: &str) -> ApiError {
    ApiError::not_found(
        "unknown_file",
        format!("{}@{} has no file {path:?}", v.model, v.version),
    )
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
    let ckpt = open_checkpoint(&s, &v).await?;
    match ckpt.store.local_root().map(ToOwned::to_owned) {
        Some(root) => local_file(&headers, &v, ckpt, &root, &path).await,
        None => stored_file(&headers, &v, ckpt, &path).await,
    }
}

/// The version's checkpoint, opened once and shared (its manifest parsed and checked).
async fn open_checkpoint(s: &Arc<AppState>, v: &VersionRecord) -> Result<Arc<Checkpoint>, ApiError> {
    let (opened, registry) = (s.opened.clone(), s.registry.clone());
    let record = v.clone();
    tokio::task::spawn_blocking(move || opened.open(&record, registry.s3()))
        .await
        .map_err(|e| ApiError::internal(format!("checkpoint task failed: {e}")))?
}

/// The size the manifest records for `path` (404 when it lists no such object).
fn listed_size(ckpt: &Checkpoint, v: &VersionRecord, path: &str) -> Result<u64, ApiError> {
    ckpt.manifest
        .objects
        .iter()
        .find(|o| o.object == path)
        .map(|o| o.size)
        .ok_or_else(|| unknown_file(v, path))
}

/// Wrap `read` so that, when the body is the whole object, every byte is checked against the
/// manifest's checksums as it passes ([`ObjectCheck`]); a mismatch ends the body with an error.
fn checked_whole<F>(
    check: Option<ObjectCheck>,
    end: u64,
    mut read: F,
) -> impl FnMut(u64, usize) -> std::io::Result<Bytes> + Send + 'static
where
    F: FnMut(u64, usize) -> std::io::Result<Bytes> + Send + 'static,
{
    let mut check = check;
    move |at, want| {
        let piece = read(at, want)?;
        if let Some(c) = check.as_mut() {
            let fed = c.feed(&piece).and_then(|()| match at + want as u64 == end {
                true => check.take().expect("checked above").finish(),
                false => Ok(()),
            });
            if let Err(e) = fed {
                tracing::error!(error = %e, "a served checkpoint object no longer matches its manifest");
                return Err(std::io::Error::other(e.to_string()));
            }
        }
        Ok(piece)
    }
}

/// A file of a checkpoint on local disk: opened without following symlinks, a regular file of
/// the size the manifest records.
async fn local_file(
    headers: &HeaderMap,
    v: &VersionRecord,
    ckpt: Arc<Checkpoint>,
    root: &std::path::Path,
    path: &str,
) -> Result<Response, ApiError> {
    let listed = match path {
        MANIFEST => None,
        _ => Some(listed_size(&ckpt, v, path)?),
    };
    let (root, key) = (root.to_owned(), format!("{}/{path}", step_dir(v.step)));
    let opened = tokio::task::spawn_blocking(move || open_plain(&root, &key))
        .await
        .map_err(|e| ApiError::internal(format!("file task failed: {e}")))?;
    let file = match opened {
        Ok(f) => f,
        Err(PlainFileError::NotFound { .. }) => {
            return Err(ApiError::not_found(
                "unknown_file",
                format!("{}@{}: {path} is listed but missing on disk", v.model, v.version),
            ));
        }
        Err(e @ PlainFileError::NotPlain { .. }) => {
            tracing::warn!(model = %v.model, version = v.version, error = %e, "refused to serve a checkpoint file");
            return Err(ApiError::not_found(
                "unknown_file",
                format!(
                    "{}@{}: {path} is not a regular file of the checkpoint; not served",
                    v.model, v.version
                ),
            ));
        }
        Err(e) => return Err(ApiError::internal(format!("{}@{}: {e}", v.model, v.version))),
    };
    let meta = file
        .metadata()
        .map_err(|e| ApiError::internal(format!("{}@{}: reading {path}: {e}", v.model, v.version)))?;
    let size = meta.len();
    if let Some(listed) = listed.filter(|&l| l != size) {
        return Err(changed(
            v,
            path,
            format!("{size} bytes on disk, {listed} in the manifest"),
        ));
    }
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
    let check = whole_object_check(&ckpt, path, start, len, size);
    let read = move |at: u64, want: usize| {
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
    };
    let body = read_ahead(start, len, READ_CHUNK, checked_whole(check, start + len, read));
    builder
        .status(status)
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// A 409 for a file that no longer is what was registered.
fn changed(v: &VersionRecord, path: &str, how: String) -> ApiError {
    tracing::error!(model = %v.model, version = v.version, path, how, "checkpoint file changed since registration");
    ApiError::new(
        StatusCode::CONFLICT,
        "checkpoint_changed",
        format!(
            "{}@{}: {path} changed since registration ({how}); not served",
            v.model, v.version
        ),
    )
}

/// The checksum check for a body that is the whole of a chunk object (the manifest has no
/// checksum of its own; it was parsed and checked when opened).
fn whole_object_check(ckpt: &Arc<Checkpoint>, path: &str, start: u64, len: u64, size: u64) -> Option<ObjectCheck> {
    (path != MANIFEST && start == 0 && len == size)
        .then(|| ObjectCheck::new(ckpt.clone(), path))
        .flatten()
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
    headers: &HeaderMap,
    v: &VersionRecord,
    ckpt: Arc<Checkpoint>,
    path: &str,
) -> Result<Response, ApiError> {
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
        None => listed_size(&ckpt, v, path)?,
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
            let check = whole_object_check(&ckpt, path, start, len, size);
            let pieces = move |at, want| match first.take() {
                Some(b) => Ok(b),
                None if at >= rest => read(&ckpt, at, want).map_err(|e| std::io::Error::other(e.to_string())),
                None => Err(std::io::Error::other("a piece out of order")),
            };
            read_ahead(start, len, STORE_PIECE, checked_whole(check, start + len, pieces))
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
