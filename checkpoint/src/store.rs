//! One blocking API over `object_store` for a [`StorageLocation`] (a local directory, a
//! `file://` URL or `s3://bucket/prefix`), with keys relative to the checkpoint root. The
//! store owns a small tokio runtime so callers (training threads, CLI commands) stay
//! synchronous; concurrency lives inside: many objects at once, large objects as parallel
//! multipart uploads.

use crate::error::CheckpointError;
use crate::location::StorageLocation;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::ffi::OsString;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// S3 connection settings. The explicit fields win; below them, the `AWS_*` variables in
/// `environment` (object_store's configuration keys: `AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_SESSION_TOKEN`, ...), which the `gantry` binary reads from its own environment
/// ([`S3Options::with_environment`]); this crate reads none. Without keys, object_store's
/// credential discovery (web identity, container credentials, instance metadata) applies,
/// unless `configured_only` is set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// `AWS_*` variables as the process that opens the store was given them.
    pub environment: Vec<(String, String)>,
    /// Use the explicit fields and nothing else: no `environment`, and no credential
    /// discovery (instance metadata, web identity). Without an endpoint and both keys,
    /// opening an `s3://` location is refused at once. A server that opens locations its
    /// clients name (the registry) sets this, so a request cannot make it probe the network.
    pub configured_only: bool,
}

impl S3Options {
    /// Options from a process environment (`std::env::vars_os()`): its `AWS_*` variables
    /// (those that are Unicode, as object_store's `from_env` takes them), nothing explicit.
    pub fn with_environment(vars: impl IntoIterator<Item = (OsString, OsString)>) -> S3Options {
        let environment = vars
            .into_iter()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        S3Options {
            environment,
            ..S3Options::default()
        }
    }
}

/// Secrets stay out of logs: keys and variable values are not printed.
impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.environment.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<set>"))
            .field("environment", &names)
            .field("configured_only", &self.configured_only)
            .finish()
    }
}

/// Upload tuning.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Objects larger than this go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads (S3 needs at least 5 MiB).
    pub part_size: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long the S3 client itself retries one failed request (connection refused, 5xx,
    /// dropped body) before the caller sees the error. `None`: object_store's own default
    /// (10 tries within 3 minutes, silently), right for callers with no retry layer of their
    /// own. Callers that retry above it and log each wait (the data streamer) set a short one,
    /// so an outage shows in their logs within seconds instead of minutes.
    pub request_retry_timeout: Option<std::time::Duration>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            multipart_threshold: 32 << 20,
            part_size: 16 << 20,
            concurrency: 8,
            request_retry_timeout: None,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    /// The canonical directory of a local store.
    local: Option<PathBuf>,
    url: String,
    config: StoreConfig,
    rt: Arc<OwnedRuntime>,
}

/// The store's runtime, shut down without blocking when the last handle goes: a store may be
/// dropped from inside another runtime's async task (the registry's server), where dropping
/// a runtime the usual way panics.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

fn bad(url: &str, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::BadUrl {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Cut a list of buffers into parts of `part_size` bytes (the last one shorter), as
/// zero-copy slices of the buffers.
fn split_parts(data: &[Bytes], part_size: usize) -> Vec<Vec<Bytes>> {
    let mut parts = vec![Vec::new()];
    let mut filled = 0;
    for buf in data {
        let mut at = 0;
        while at < buf.len() {
            if filled == part_size {
                parts.push(Vec::new());
                filled = 0;
            }
            let take = (part_size - filled).min(buf.len() - at);
            parts.last_mut().expect("one part").push(buf.slice(at..at + take));
            filled += take;
            at += take;
        }
    }
    parts
}

/// The S3 client for `bucket`. Fields of `s3` win; unless `configured_only`, its `environment`
/// fills the rest, as `AmazonS3Builder::from_env` would from the process environment.
fn s3_client(
    url: &str,
    bucket: &str,
    s3: &S3Options,
    retry_timeout: Option<std::time::Duration>,
) -> Result<AmazonS3, CheckpointError> {
    if s3.configured_only && (s3.endpoint.is_none() || s3.access_key.is_none() || s3.secret_key.is_none()) {
        return Err(bad(
            url,
            "this server has no S3 endpoint and credentials configured, so it opens no s3:// location",
        ));
    }
    let mut base = AmazonS3Builder::new();
    if !s3.configured_only {
        for (key, value) in &s3.environment {
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                base = base.with_config(config_key, value);
            }
        }
    }
    // Unsigned payloads: SigV4 still signs the request; the body's integrity is TLS's (and our
    // own checksums'), and hashing every part twice halves upload speed.
    let mut b = base.with_bucket_name(bucket).with_unsigned_payload(true);
    // An endpoint (given, or `AWS_ENDPOINT_URL` from the environment given) is an S3-compatible
    // server: path-style requests, and plain HTTP when it says so.
    let endpoint = s3
        .endpoint
        .clone()
        .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
    if let Some(e) = &endpoint {
        b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        if e.starts_with("http://") {
            b = b.with_allow_http(true);
        }
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = &s3.access_key {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &s3.secret_key {
        b = b.with_secret_access_key(k);
    }
    if let Some(timeout) = retry_timeout {
        let backoff = object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(50),
            max_backoff: timeout / 4,
            base: 2.0,
        };
        b = b.with_retry(object_store::RetryConfig {
            backoff,
            max_retries: 3,
            retry_timeout: timeout,
        });
    }
    b.build().map_err(|e| bad(url, e.to_string()))
}

impl Store {
    /// Open `url`: a local path, `file:///abs/path` or `s3://bucket[/prefix]`. A local
    /// directory is created if missing.
    pub fn open(url: &str, s3: &S3Options) -> Result<Store, CheckpointError> {
        Store::open_with(url, s3, StoreConfig::default())
    }

    pub fn open_with(url: &str, s3: &S3Options, config: StoreConfig) -> Result<Store, CheckpointError> {
        Store::open_location(&StorageLocation::parse(url)?, s3, config)
    }

    /// Open a location for writing: a local directory is created if missing.
    pub fn open_location(
        location: &StorageLocation,
        s3: &S3Options,
        config: StoreConfig,
    ) -> Result<Store, CheckpointError> {
        Store::connect(location.for_writing()?, s3, config)
    }

    /// Open a location only if it is there: a missing local directory (or a file) is
    /// [`LocationError::is_absent`], and nothing is created. For servers that open what their
    /// clients name.
    ///
    /// [`LocationError::is_absent`]: crate::location::LocationError::is_absent
    pub fn open_existing(location: &StorageLocation, s3: &S3Options) -> Result<Store, CheckpointError> {
        Store::connect(location.for_reading()?, s3, StoreConfig::default())
    }

    /// `resolved`: a local location already canonical.
    fn connect(resolved: StorageLocation, s3: &S3Options, config: StoreConfig) -> Result<Store, CheckpointError> {
        let shown = resolved.to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gantry-store")
            .enable_all()
            .build()
            .map_err(|e| bad(&shown, format!("cannot start I/O runtime: {e}")))?;
        let (inner, root, local): (Arc<dyn ObjectStore>, Path, Option<PathBuf>) = match resolved {
            StorageLocation::S3 { bucket, prefix } => {
                let store = s3_client(&shown, &bucket, s3, config.request_retry_timeout)?;
                let root = Path::parse(&prefix).map_err(|e| bad(&shown, e.to_string()))?;
                (Arc::new(store), root, None)
            }
            StorageLocation::Local(dir) => {
                // fsync: a commit must only ever name chunks that survive a power loss too.
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(&shown, e.to_string()))?
                    .with_fsync(true);
                (Arc::new(fs), Path::default(), Some(dir))
            }
        };
        Ok(Store {
            inner,
            root,
            local,
            url: shown,
            config,
            rt: Arc::new(OwnedRuntime(Some(rt))),
        })
    }

    /// The root as given (local paths made absolute).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// The canonical directory of a local store (`None` for S3).
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local.as_deref()
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    fn key_of(&self, p: &Path) -> String {
        let full = p.as_ref();
        let root = self.root.as_ref();
        if root.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(root)
                .unwrap_or(full)
                .trim_start_matches('/')
                .to_string()
        }
    }

    fn err(&self, op: &'static str, key: &str, source: object_store::Error) -> CheckpointError {
        CheckpointError::Store {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            source: Box::new(source),
        }
    }

    /// Run async work on the store's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.0.as_ref().expect("runtime lives until drop").block_on(f)
    }

    /// Upload an object given as a list of buffers, concatenated without copying them.
    async fn put_async(&self, key: &str, data: Vec<Bytes>) -> Result<(), CheckpointError> {
        let path = self.path(key);
        let total: usize = data.iter().map(Bytes::len).sum();
        if total <= self.config.multipart_threshold {
            self.inner
                .put(&path, data.into_iter().collect::<PutPayload>())
                .await
                .map_err(|e| self.err("put", key, e))?;
            return Ok(());
        }
        let mut upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|e| self.err("start multipart upload", key, e))?;
        let parts: Vec<_> = split_parts(&data, self.config.part_size)
            .into_iter()
            .map(|part| upload.put_part(part.into_iter().collect::<PutPayload>()))
            .collect();
        let sent = stream::iter(parts)
            .buffer_unordered(self.config.concurrency)
            .try_collect::<Vec<()>>()
            .await;
        if let Err(e) = sent {
            let _ = upload.abort().await;
            return Err(self.err("upload part of", key, e));
        }
        upload
            .complete()
            .await
            .map_err(|e| self.err("complete multipart upload", key, e))?;
        Ok(())
    }

    /// Write one object (multipart when large); readers see all of it or nothing.
    pub fn put(&self, key: &str, data: Bytes) -> Result<(), CheckpointError> {
        self.block_on(self.put_async(key, vec![data]))
    }

    /// Write many objects concurrently, each the concatenation of its buffers.
    pub fn put_many(&self, objects: Vec<(String, Vec<Bytes>)>) -> Result<(), CheckpointError> {
        self.block_on(async {
            stream::iter(
                objects
                    .into_iter()
                    .map(|(k, d)| async move { self.put_async(&k, d).await }),
            )
            .buffer_unordered(self.config.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
        })
    }

    /// Create `key` only if it does not exist: `Ok(false)` if it already did.
    pub fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, CheckpointError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.block_on(self.inner.put_opts(&self.path(key), PutPayload::from(data), opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.err("create", key, e)),
        }
    }

    /// The whole object, or `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>, CheckpointError> {
        self.block_on(async {
            match self.inner.get(&self.path(key)).await {
                Ok(r) => r.bytes().await.map(Some).map_err(|e| self.err("read", key, e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("read", key, e)),
            }
        })
    }

    async fn get_range_async(&self, key: &str, range: Range<u64>) -> Result<Bytes, CheckpointError> {
        match self.inner.get_range(&self.path(key), range.clone()).await {
            Ok(b) => Ok(b),
            Err(object_store::Error::NotFound { .. }) => Err(CheckpointError::MissingObject {
                object: format!("{}/{key}", self.url),
            }),
            Err(e) => Err(self.err("ranged read of", key, e)),
        }
    }

    /// Byte ranges of objects, fetched concurrently, in request order.
    pub fn get_ranges(&self, ranges: &[(String, Range<u64>)]) -> Result<Vec<Bytes>, CheckpointError> {
        self.block_on(async {
            stream::iter(ranges.iter().map(|(k, r)| self.get_range_async(k, r.clone())))
                .buffered(self.config.concurrency.max(1))
                .try_collect()
                .await
        })
    }

    /// Size of an object, or `None` if it does not exist.
    pub fn size(&self, key: &str) -> Result<Option<u64>, CheckpointError> {
        self.block_on(async {
            match self.inner.head(&self.path(key)).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("stat", key, e)),
            }
        })
    }

    /// Immediate sub-directories of `prefix` ("" for the root).
    pub fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, CheckpointError> {
        let p = self.path(prefix);
        let listed = self
            .block_on(self.inner.list_with_delimiter(Some(&p)))
            .map_err(|e| self.err("list", prefix, e))?;
        let mut dirs: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|d| d.filename().map(str::to_string))
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    /// Every object under `prefix`, with sizes, as keys relative to the root.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, CheckpointError> {
        let p = self.path(prefix);
        let metas: Vec<object_store::ObjectMeta> = self
            .block_on(self.inner.list(Some(&p)).try_collect())
            .map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<(String, u64)> = metas.iter().map(|m| (self.key_of(&m.location), m.size)).collect();
        out.sort();
        Ok(out)
    }

    pub fn delete(&self, key: &str) -> Result<(), CheckpointError> {
        match self.block_on(self.inner.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// Delete every object under `prefix`.
    pub fn delete_prefix(&self, prefix: &str) -> Result<usize, CheckpointError> {
        let keys = self.list(prefix)?;
        for (k, _) in &keys {
            self.delete(k)?;
        }
        if self.is_local() {
            // object_store leaves empty directories behind on local disks.
            let dir = std::path::Path::new(&self.url).join(prefix);
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_options_keep_only_aws_variables_and_never_print_secrets() {
        let vars = [
            ("AWS_REGION", "eu-west-1"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            ("HOME", "/root"),
        ];
        let mut o = S3Options::with_environment(vars.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
        o.secret_key = Some("also-secret".into());
        let names: Vec<&str> = o.environment.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["AWS_REGION", "AWS_SECRET_ACCESS_KEY"]);
        let shown = format!("{o:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("also-secret"), "{shown}");
        assert!(shown.contains("AWS_SECRET_ACCESS_KEY"), "{shown}");
    }

    #[test]
    fn parts_cut_across_buffers_without_losing_a_byte() {
        let data: Vec<Bytes> = [5usize, 0, 7, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect();
        let parts = split_parts(&data, 4);
        let sizes: Vec<usize> = parts.iter().map(|p| p.iter().map(Bytes::len).sum()).collect();
        assert_eq!(sizes, vec![4, 4, 4, 3]);
        let joined: Vec<u8> = parts.iter().flatten().flat_map(|b| b.to_vec()).collect();
        let expected: Vec<u8> = data.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(joined, expected);
    }
}
