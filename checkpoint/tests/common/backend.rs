//! Where a test's checkpoints live: a fresh local directory or a prefix of a bucket on a fresh
//! s3s-fs server. Either way the test can reach the stored objects as plain files
//! ([`Backend::file_of`]) to corrupt or delete them behind the store's back.

#![allow(dead_code)]

use super::s3_server::S3Server;
use gantry_checkpoint::{CheckpointError, S3Options, SaveReport, SaveRequest, Saver, SaverConfig, Store, StoreConfig};
use std::path::PathBuf;

/// Prefix under the bucket for S3 checkpoints: a root that is not the bucket's root.
pub const S3_PREFIX: &str = "some/prefix";

pub use super::tempdir::TempDir;

pub enum Backend {
    Local(TempDir),
    S3(S3Server),
}

impl Backend {
    pub fn local(tag: &str) -> Backend {
        Backend::Local(TempDir::new(tag))
    }

    pub fn s3() -> Backend {
        Backend::S3(S3Server::start())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::S3(_) => "s3",
        }
    }

    /// The checkpoint root as a user would give it.
    pub fn url(&self) -> String {
        match self {
            Backend::Local(d) => d.0.join("ckpt").display().to_string(),
            Backend::S3(s) => format!("s3://{}/{S3_PREFIX}", s.bucket),
        }
    }

    pub fn s3_options(&self) -> S3Options {
        match self {
            Backend::Local(_) => S3Options::default(),
            Backend::S3(s) => S3Options {
                endpoint: Some(s.endpoint.clone()),
                region: Some("us-east-1".to_string()),
                access_key: Some(s.access_key.clone()),
                secret_key: Some(s.secret_key.clone()),
                ..Default::default()
            },
        }
    }

    /// The AWS_* variables a rank process needs to reach the bucket ([`Store::open`] falls
    /// back to them); none for a local root.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Backend::Local(_) => Vec::new(),
            Backend::S3(s) => vec![
                ("AWS_ENDPOINT_URL".to_string(), s.endpoint.clone()),
                ("AWS_ACCESS_KEY_ID".to_string(), s.access_key.clone()),
                ("AWS_SECRET_ACCESS_KEY".to_string(), s.secret_key.clone()),
                ("AWS_REGION".to_string(), "us-east-1".to_string()),
            ],
        }
    }

    /// A store with small multipart settings: objects over 1 MiB go up in 5 MiB parts (S3's
    /// minimum for all but the last part), so tests of a few MiB exercise multipart uploads.
    pub fn store(&self) -> Store {
        Store::open_with(&self.url(), &self.s3_options(), small_parts())
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.url()))
    }

    /// The plain file holding object `key` (relative to the checkpoint root).
    pub fn file_of(&self, key: &str) -> PathBuf {
        match self {
            Backend::Local(d) => d.0.join("ckpt").join(key),
            Backend::S3(s) => s.object_path(&format!("{S3_PREFIX}/{key}")),
        }
    }
}

pub fn small_parts() -> StoreConfig {
    StoreConfig {
        multipart_threshold: 1 << 20,
        part_size: 5 << 20,
        concurrency: 4,
        ..StoreConfig::default()
    }
}

/// One rank's part of a save run on a thread: its config and the saves it makes in turn.
pub struct RankSave {
    pub config: SaverConfig,
    pub requests: Vec<SaveRequest>,
}

/// Run each rank's saves on its own thread with its own store and [`Saver`] (as separate
/// processes would), each save handed off while the previous one may still be in flight,
/// then wait for the last commit. Per rank (by position in `ranks`): every save's report, or
/// the first error.
pub fn save_ranks(backend: &Backend, ranks: Vec<RankSave>) -> Vec<Result<Vec<SaveReport>, CheckpointError>> {
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|r| {
            let store = backend.store();
            std::thread::Builder::new()
                .name(format!("test-rank-{}", r.config.rank))
                .spawn(move || {
                    let mut saver = Saver::new(store, r.config);
                    let mut reports = Vec::new();
                    for (i, req) in r.requests.into_iter().enumerate() {
                        let previous = saver.save(req)?;
                        assert_eq!(
                            previous.is_some(),
                            i > 0,
                            "save {i} reported {previous:?} for the previous save"
                        );
                        reports.extend(previous);
                    }
                    reports.extend(saver.wait()?);
                    Ok(reports)
                })
                .expect("spawn rank thread")
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}
