//! The registry's durable state in one redb database, and every operation on it.
//!
//! Tables (values are JSON, tolerant of added fields):
//! - `models`: name → [`ModelRecord`]
//! - `versions`: (model, version) → [`VersionRecord`]; the tuple key orders a model's versions
//!   numerically, so the latest is the last of its range
//! - `aliases`: (model, alias) → [`Alias`]
//! - `sources`: (model, "step@url") → version: which checkpoints a model already holds
//! - `meta`: `schema` → [`SCHEMA_VERSION`]
//!
//! Every change is one write transaction (fsynced on commit); checkpoint verification
//! ([`crate::intake`]), the slow part of a registration, happens before it.

use crate::error::RegistryError;
use crate::intake::{CheckpointRoot, open_verified, version_record, within_roots};
use crate::model::{Alias, EvalRecord, ModelRecord, Shadow, VersionRecord};
use crate::name::{ModelRef, Selector, check_alias_name, check_model_name};
use crate::split;
use gantry_checkpoint::S3Options;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::ops::Bound;
use std::path::{Path, PathBuf};

const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
const VERSIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("versions");
const ALIASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("aliases");
const SOURCES: TableDefinition<(&str, &str), u32> = TableDefinition::new("sources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const SCHEMA_VERSION: u64 = 1;
/// The most records one page returns.
pub const MAX_PAGE: usize = 1000;

type Result<T> = std::result::Result<T, RegistryError>;

/// One page of a listing: records after the cursor `after` (a model name for models, a
/// version number for versions, as returned by the previous page), at most `limit` of them
/// (clamped to 1..=[`MAX_PAGE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub after: Option<String>,
    pub limit: usize,
}

impl Page {
    pub fn first(limit: usize) -> Page {
        Page { after: None, limit }
    }
    fn limit(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE)
    }
}

/// What a request is served by ([`Registry::route`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// The version drawn (for a weighted alias) or named.
    pub version: VersionRecord,
    /// The alias, when the reference named one.
    pub alias: Option<Alias>,
    /// The alias's shadow version, when it has one.
    pub shadow: Option<VersionRecord>,
}

/// The model registry over a redb file. A second opener of the same file is refused while
/// this one lives.
pub struct Registry {
    db: Database,
    path: PathBuf,
    /// How to reach `s3://` checkpoints (unset fields: the AWS environment variables).
    s3: S3Options,
    /// Where checkpoints may be registered from (empty: anywhere this process can read).
    roots: Vec<CheckpointRoot>,
}

/// Turn any redb error into [`RegistryError::Database`] naming the file.
trait OrDb<T> {
    fn db(self, r: &Registry) -> Result<T>;
}

impl<T, E: std::fmt::Display> OrDb<T> for std::result::Result<T, E> {
    fn db(self, r: &Registry) -> Result<T> {
        self.map_err(|e| RegistryError::Database {
            path: r.path.clone(),
            message: e.to_string(),
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry records serialize")
}

impl Registry {
    /// Open (or create) the registry database at `path`, creating parent directories.
    pub fn open(path: impl AsRef<Path>) -> Result<Registry> {
        let path = path.as_ref().to_path_buf();
        let fail = |message: String| RegistryError::Database {
            path: path.clone(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(&path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let registry = Registry {
            db,
            path,
            s3: S3Options::default(),
            roots: Vec::new(),
        };
        registry.init()?;
        Ok(registry)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reach `s3://` checkpoints with these settings instead of the environment alone.
    pub fn with_s3(mut self, s3: S3Options) -> Registry {
        self.s3 = s3;
        self
    }

    /// Accept registrations only from under these roots (403 for anything else).
    pub fn with_checkpoint_roots(mut self, roots: Vec<CheckpointRoot>) -> Registry {
        self.roots = roots;
        self
    }

    pub fn s3(&self) -> &S3Options {
        &self.s3
    }

    fn init(&self) -> Result<()> {
        let txn = self.db.begin_write().db(self)?;
        {
            let mut meta = txn.open_table(META).db(self)?;
            let found = meta.get("schema").db(self)?.map(|v| v.value());
            match found {
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(RegistryError::Schema {
                        path: self.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA_VERSION).db(self)?;
                }
            }
            txn.open_table(MODELS).db(self)?;
            txn.open_table(VERSIONS).db(self)?;
            txn.open_table(ALIASES).db(self)?;
            txn.open_table(SOURCES).db(self)?;
        }
        txn.commit().db(self)
    }

    fn decode<T: DeserializeOwned>(&self, key: impl FnOnce() -> String, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
            path: self.path.clone(),
            key: key(),
            message: e.to_string(),
        })
    }

    fn model_in(&self, table: &impl ReadableTable<&'static str, &'static [u8]>, model: &str) -> Result<ModelRecord> {
        match table.get(model).db(self)? {
            Some(v) => self.decode(|| format!("models/{model}"), v.value()),
            None => Err(RegistryError::UnknownModel(model.to_string())),
        }
    }

    fn version_in(
        &self,
        table: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
        model: &str,
        version: u32,
    ) -> Result<VersionRecord> {
        match table.get((model, version)).db(self)? {
            Some(v) => self.decode(|| format!("versions/{model}/{version}"), v.value()),
            None => Err(RegistryError::UnknownVersion {
                model: model.to_string(),
                version,
            }),
        }
    }

    /// The highest version number of `model`, if it has any.
    fn last_version_in(
        &self,
        table: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
        model: &str,
    ) -> Result<Option<u32>> {
        let last = table.range((model, 0)..=(model, u32::MAX)).db(self)?.next_back();
        match last {
            Some(row) => Ok(Some(row.db(self)?.0.value().1)),
            None => Ok(None),
        }
    }

    fn alias_in(
        &self,
        table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
        model: &str,
        alias: &str,
    ) -> Result<Alias> {
        match table.get((model, alias)).db(self)? {
            Some(v) => self.decode(|| format!("aliases/{model}/{alias}"), v.value()),
            None => Err(RegistryError::UnknownAlias {
                model: model.to_string(),
                alias: alias.to_string(),
            }),
        }
    }

    /// Register the checkpoint at `checkpoint_url` (its newest committed step, or `step`) as
    /// the next version of `model`, creating the model if new. The checkpoint is verified in
    /// full first (manifest, every chunk's size and checksum); the same checkpoint step cannot
    /// be registered twice for one model.
    pub fn register_version(
        &self,
        model: &str,
        checkpoint_url: &str,
        step: Option<u64>,
        now_ms: u64,
    ) -> Result<VersionRecord> {
        check_model_name(model)?;
        let url = checkpoint_url.trim_end_matches('/');
        if url.is_empty() {
            return Err(RegistryError::Checkpoint {
                url: checkpoint_url.to_string(),
                message: "empty checkpoint location".to_string(),
            });
        }
        if !self.roots.is_empty() && !within_roots(url, &self.roots) {
            return Err(RegistryError::OutsideRoots { url: url.to_string() });
        }
        let (ckpt, bytes) = open_verified(url, step, &self.s3)?;
        let source = format!("{}@{url}", ckpt.step());
        let txn = self.db.begin_write().db(self)?;
        let record = {
            let mut sources = txn.open_table(SOURCES).db(self)?;
            if let Some(v) = sources.get((model, source.as_str())).db(self)? {
                return Err(RegistryError::AlreadyRegistered {
                    model: model.to_string(),
                    version: v.value(),
                });
            }
            let mut models = txn.open_table(MODELS).db(self)?;
            if models.get(model).db(self)?.is_none() {
                let m = ModelRecord {
                    name: model.to_string(),
                    created_ms: now_ms,
                    description: String::new(),
                };
                models.insert(model, encode(&m).as_slice()).db(self)?;
            }
            let mut versions = txn.open_table(VERSIONS).db(self)?;
            let next = match self.last_version_in(&versions, model)? {
                None => 1,
                Some(last) => last.checked_add(1).ok_or_else(|| RegistryError::Database {
                    path: self.path.clone(),
                    message: format!("model {model:?} has run out of version numbers"),
                })?,
            };
            let record = version_record(model, url, &ckpt, bytes, next, now_ms);
            versions.insert((model, next), encode(&record).as_slice()).db(self)?;
            sources.insert((model, source.as_str()), next).db(self)?;
            record
        };
        txn.commit().db(self)?;
        tracing::info!(
            model,
            version = record.version,
            url,
            step = record.step,
            bytes = record.bytes,
            "registered model version"
        );
        Ok(record)
    }

    pub fn get_model(&self, model: &str) -> Result<ModelRecord> {
        let txn = self.db.begin_read().db(self)?;
        self.model_in(&txn.open_table(MODELS).db(self)?, model)
    }

    /// Models whose name contains `filter` (empty: all), in name order, one page at a time.
    /// The second value is the cursor of the next page, `None` on the last page.
    pub fn list_models(&self, filter: &str, page: &Page) -> Result<(Vec<ModelRecord>, Option<String>)> {
        let txn = self.db.begin_read().db(self)?;
        let table = txn.open_table(MODELS).db(self)?;
        let start = match &page.after {
            Some(after) => Bound::Excluded(after.as_str()),
            None => Bound::Unbounded,
        };
        let limit = page.limit();
        let mut out = Vec::new();
        for row in table.range::<&str>((start, Bound::Unbounded)).db(self)? {
            let (k, v) = row.db(self)?;
            let name = k.value();
            if !name.contains(filter) {
                continue;
            }
            if out.len() == limit {
                let next = out.last().map(|m: &ModelRecord| m.name.clone());
                return Ok((out, next));
            }
            out.push(self.decode(|| format!("models/{name}"), v.value())?);
        }
        Ok((out, None))
    }

    /// Versions of `model` in version order, one page at a time (cursor: a version number).
    pub fn list_versions(&self, model: &str, page: &Page) -> Result<(Vec<VersionRecord>, Option<String>)> {
        let after = match &page.after {
            None => 0,
            Some(c) => c.parse::<u32>().map_err(|e| RegistryError::BadCursor {
                cursor: c.clone(),
                reason: format!("not a version number: {e}"),
            })?,
        };
        let txn = self.db.begin_read().db(self)?;
        self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
        let table = txn.open_table(VERSIONS).db(self)?;
        let limit = page.limit();
        let mut out: Vec<VersionRecord> = Vec::new();
        let range = (Bound::Excluded((model, after)), Bound::Included((model, u32::MAX)));
        for row in table.range::<(&str, u32)>(range).db(self)? {
            let (k, v) = row.db(self)?;
            if out.len() == limit {
                let next = out.last().map(|r| r.version.to_string());
                return Ok((out, next));
            }
            let version = k.value().1;
            out.push(self.decode(|| format!("versions/{model}/{version}"), v.value())?);
        }
        Ok((out, None))
    }

    pub fn get_version(&self, model: &str, version: u32) -> Result<VersionRecord> {
        let txn = self.db.begin_read().db(self)?;
        let versions = txn.open_table(VERSIONS).db(self)?;
        match self.version_in(&versions, model, version) {
            Err(RegistryError::UnknownVersion { .. }) => {
                // Say which is missing: the model or just this version.
                self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
                Err(RegistryError::UnknownVersion {
                    model: model.to_string(),
                    version,
                })
            }
            other => other,
        }
    }

    /// The highest version of `model`.
    pub fn latest_version(&self, model: &str) -> Result<VersionRecord> {
        let txn = self.db.begin_read().db(self)?;
        let versions = txn.open_table(VERSIONS).db(self)?;
        match self.last_version_in(&versions, model)? {
            Some(v) => self.version_in(&versions, model, v),
            None => Err(RegistryError::UnknownModel(model.to_string())),
        }
    }

    /// Point `alias` of `model` at `targets` (`(version, weight)`; one target with weight 1
    /// for a plain alias), creating or moving it in one transaction. Every version must exist.
    /// The alias has no shadow afterwards; see [`Registry::set_alias_with_shadow`].
    pub fn set_alias(&self, model: &str, alias: &str, targets: &[(u32, u32)], now_ms: u64) -> Result<Alias> {
        self.set_alias_with_shadow(model, alias, targets, None, now_ms)
    }

    /// [`Registry::set_alias`] with a shadow: a version that a share of the alias's requests
    /// is mirrored to. The whole alias is replaced (a move without a shadow removes it); the
    /// shadow's version must exist, mirror 1..=100 percent, and not be the alias's only
    /// target ([`split::validate_shadow`]).
    pub fn set_alias_with_shadow(
        &self,
        model: &str,
        alias: &str,
        targets: &[(u32, u32)],
        shadow: Option<Shadow>,
        now_ms: u64,
    ) -> Result<Alias> {
        check_model_name(model)?;
        check_alias_name(alias)?;
        split::validate(targets)?;
        if let Some(sh) = shadow {
            split::validate_shadow(targets, sh.version, sh.percent)?;
        }
        let record = Alias {
            model: model.to_string(),
            name: alias.to_string(),
            targets: targets.to_vec(),
            updated_ms: now_ms,
            shadow,
        };
        let txn = self.db.begin_write().db(self)?;
        {
            self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
            let versions = txn.open_table(VERSIONS).db(self)?;
            for version in targets.iter().map(|t| t.0).chain(shadow.map(|sh| sh.version)) {
                if versions.get((model, version)).db(self)?.is_none() {
                    return Err(RegistryError::UnknownVersion {
                        model: model.to_string(),
                        version,
                    });
                }
            }
            let mut aliases = txn.open_table(ALIASES).db(self)?;
            aliases.insert((model, alias), encode(&record).as_slice()).db(self)?;
        }
        txn.commit().db(self)?;
        tracing::info!(model, alias, targets = ?targets, shadow = ?shadow, "alias set");
        Ok(record)
    }

    /// Remove an alias; returns what it pointed at.
    pub fn delete_alias(&self, model: &str, alias: &str) -> Result<Alias> {
        let txn = self.db.begin_write().db(self)?;
        let removed = {
            let mut aliases = txn.open_table(ALIASES).db(self)?;
            let removed = self.alias_in(&aliases, model, alias)?;
            aliases.remove((model, alias)).db(self)?;
            removed
        };
        txn.commit().db(self)?;
        tracing::info!(model, alias, "alias deleted");
        Ok(removed)
    }

    pub fn get_alias(&self, model: &str, alias: &str) -> Result<Alias> {
        let txn = self.db.begin_read().db(self)?;
        self.alias_in(&txn.open_table(ALIASES).db(self)?, model, alias)
    }

    /// Every alias of `model`, by name.
    pub fn list_aliases(&self, model: &str) -> Result<Vec<Alias>> {
        let txn = self.db.begin_read().db(self)?;
        self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
        let table = txn.open_table(ALIASES).db(self)?;
        let mut out = Vec::new();
        let range = (Bound::Included((model, "")), Bound::Unbounded);
        for row in table.range::<(&str, &str)>(range).db(self)? {
            let (k, v) = row.db(self)?;
            let (m, a) = k.value();
            if m != model {
                break;
            }
            out.push(self.decode(|| format!("aliases/{m}/{a}"), v.value())?);
        }
        Ok(out)
    }

    /// The version a reference names. For a weighted alias, `draw` (a request seed or
    /// counter) picks the target deterministically; see [`split::pick`].
    pub fn resolve(&self, reference: &ModelRef, draw: u64) -> Result<VersionRecord> {
        self.route(reference, draw).map(|r| r.version)
    }

    /// What serves a request for `reference`: the version [`Registry::resolve`] gives and,
    /// when the reference is an alias, the alias and its shadow's version, read in one
    /// transaction (so a move in between cannot pair one alias's version with another's
    /// shadow).
    pub fn route(&self, reference: &ModelRef, draw: u64) -> Result<Route> {
        let model = reference.name.as_str();
        let txn = self.db.begin_read().db(self)?;
        let versions = txn.open_table(VERSIONS).db(self)?;
        let mut alias = None;
        let version = match &reference.selector {
            Selector::Version(v) => *v,
            Selector::Latest => self
                .last_version_in(&versions, model)?
                .ok_or_else(|| RegistryError::UnknownModel(model.to_string()))?,
            Selector::Alias(name) => {
                let aliases = txn.open_table(ALIASES).db(self)?;
                let a = match self.alias_in(&aliases, model, name) {
                    Err(e @ RegistryError::UnknownAlias { .. }) => {
                        self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
                        return Err(e);
                    }
                    other => other?,
                };
                let picked = split::pick(&a.targets, draw)?;
                alias = Some(a);
                picked
            }
        };
        let version = match self.version_in(&versions, model, version) {
            Err(e @ RegistryError::UnknownVersion { .. }) => {
                self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
                return Err(e);
            }
            other => other?,
        };
        let shadow = match alias.as_ref().and_then(|a| a.shadow) {
            Some(sh) => Some(self.version_in(&versions, model, sh.version)?),
            None => None,
        };
        Ok(Route { version, alias, shadow })
    }

    /// Append an evaluation to a version (the only change a version ever sees).
    pub fn add_eval(&self, model: &str, version: u32, eval: EvalRecord) -> Result<VersionRecord> {
        let txn = self.db.begin_write().db(self)?;
        let record = {
            let mut versions = txn.open_table(VERSIONS).db(self)?;
            let mut record = match self.version_in(&versions, model, version) {
                Err(e @ RegistryError::UnknownVersion { .. }) => {
                    self.model_in(&txn.open_table(MODELS).db(self)?, model)?;
                    return Err(e);
                }
                other => other?,
            };
            record.evals.push(eval);
            versions.insert((model, version), encode(&record).as_slice()).db(self)?;
            record
        };
        txn.commit().db(self)?;
        Ok(record)
    }
}
