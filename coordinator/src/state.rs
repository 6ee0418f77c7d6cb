//! Durable coordinator state in an embedded redb database (`<state dir>/coordinator.redb`).
//!
//! redb is copy-on-write with a checksummed commit: a `kill -9` at any moment leaves the
//! last committed transaction intact. The coordinator commits every record the scheduler
//! marked dirty before it answers the call that changed it, so whatever a client or worker
//! was told survives a crash. Records are JSON (readable with any redb tool, and tolerant of
//! added fields); heartbeat times and step statistics are not persisted. The key every job
//! secret is derived from ([`JobSecrets`]) is drawn on first start and kept in table `keys`.

use crate::core::{Job, JobId, Worker};
use crate::job_secret::{JobSecrets, KEY_LEN};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const JOB_SECRET_KEY: &str = "job-secret";
const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open coordinator state {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("coordinator state {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("coordinator state {path}: record `{key}` is not readable: {message}")]
    Corrupt {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("coordinator state {path} has schema version {found}; this gantry reads up to {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: u64 },
    #[error("coordinator state {path}: cannot draw the key job secrets are derived from: {message}")]
    Random { path: PathBuf, message: String },
}

pub struct StateStore {
    db: Database,
    path: PathBuf,
    job_secrets: JobSecrets,
}

/// Everything a restarted coordinator needs.
pub struct Loaded {
    pub workers: Vec<Worker>,
    pub jobs: Vec<Job>,
}

impl StateStore {
    /// Open (or create) the state under `dir`. A second coordinator on the same directory is
    /// refused (redb locks the file).
    pub fn open(dir: &Path) -> Result<(StateStore, Loaded), StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("coordinator.redb");
        let db = Database::create(&path).map_err(|e| StateError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut store = StateStore {
            db,
            path,
            job_secrets: JobSecrets::new([0; KEY_LEN]),
        };
        store.job_secrets = JobSecrets::new(store.init()?);
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where every attempt's data-plane secret comes from.
    pub fn job_secrets(&self) -> &JobSecrets {
        &self.job_secrets
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Database {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Create the tables a new state lacks; returns the job-secret key (drawn on first start).
    fn init(&self) -> Result<[u8; KEY_LEN], StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let key;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let found = meta.get("schema").map_err(|e| self.err(e))?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StateError::Schema {
                        path: self.path.clone(),
                        found: v,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(|e| self.err(e))?;
                }
            }
            txn.open_table(JOBS).map_err(|e| self.err(e))?;
            txn.open_table(WORKERS).map_err(|e| self.err(e))?;
            let mut keys = txn.open_table(KEYS).map_err(|e| self.err(e))?;
            let stored = keys
                .get(JOB_SECRET_KEY)
                .map_err(|e| self.err(e))?
                .and_then(|v| <[u8; KEY_LEN]>::try_from(v.value()).ok());
            key = match stored {
                Some(k) => k,
                None => {
                    let k = JobSecrets::generate_key().map_err(|message| StateError::Random {
                        path: self.path.clone(),
                        message,
                    })?;
                    keys.insert(JOB_SECRET_KEY, &k[..]).map_err(|e| self.err(e))?;
                    k
                }
            };
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(key)
    }

    fn load(&self) -> Result<Loaded, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let corrupt = |key: String, e: serde_json::Error| StateError::Corrupt {
            path: self.path.clone(),
            key,
            message: e.to_string(),
        };
        let mut jobs = Vec::new();
        let table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            jobs.push(serde_json::from_slice(v.value()).map_err(|e| corrupt(format!("jobs/{}", k.value()), e))?);
        }
        let mut workers = Vec::new();
        let table = txn.open_table(WORKERS).map_err(|e| self.err(e))?;
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            workers.push(serde_json::from_slice(v.value()).map_err(|e| corrupt(format!("workers/{}", k.value()), e))?);
        }
        Ok(Loaded { workers, jobs })
    }

    /// Commit these records in one durable transaction.
    pub fn save<'a>(
        &self,
        jobs: impl IntoIterator<Item = &'a Job>,
        workers: impl IntoIterator<Item = &'a Worker>,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            for job in jobs {
                let bytes = serde_json::to_vec(job).expect("jobs serialize");
                table.insert(job.id, bytes.as_slice()).map_err(|e| self.err(e))?;
            }
            let mut table = txn.open_table(WORKERS).map_err(|e| self.err(e))?;
            for w in workers {
                let bytes = serde_json::to_vec(w).expect("workers serialize");
                table
                    .insert(w.info.name.as_str(), bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Number of stored jobs (tests and diagnostics).
    pub fn job_ids(&self) -> Result<Vec<JobId>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            out.push(row.map_err(|e| self.err(e))?.0.value());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{JobRequest, Scheduler, SchedulerConfig, WorkerInfo};

    #[test]
    fn records_survive_reopen_and_a_second_opener_is_refused() {
        let dir = std::env::temp_dir().join(format!("gantry-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = Scheduler::new(SchedulerConfig::default());
        s.worker_joined(0, WorkerInfo::cpu("w1", 4), vec![]);
        s.submit(1, JobRequest::command("a", 2)).unwrap();
        let secret;
        {
            let (store, loaded) = StateStore::open(&dir).unwrap();
            assert!(loaded.jobs.is_empty());
            secret = store.job_secrets().for_attempt(1, 1);
            assert!(StateStore::open(&dir).is_err(), "the database is locked while open");
            let (jobs, workers) = s.take_dirty();
            store
                .save(
                    jobs.iter().filter_map(|j| s.job(*j)),
                    workers.iter().filter_map(|w| s.worker(w)),
                )
                .unwrap();
        }
        let (store, loaded) = StateStore::open(&dir).unwrap();
        assert_eq!(
            store.job_secrets().for_attempt(1, 1),
            secret,
            "the key survives a restart"
        );
        assert_eq!(loaded.workers.len(), 1);
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(&loaded.jobs[0], s.job(1).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
