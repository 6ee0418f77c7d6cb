//! Durable coordinator state in an embedded redb database (`<state dir>/coordinator.redb`).
//!
//! redb is copy-on-write with a checksummed commit: a `kill -9` at any moment leaves the
//! last committed transaction intact. The coordinator commits every record the scheduler
//! marked dirty before it answers the call that changed it, so whatever a client or worker
//! was told survives a crash. Records are JSON (readable with any redb tool, and tolerant of
//! added fields); heartbeat times and step statistics are not persisted.

use crate::core::{Job, JobId, Worker};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
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
}

pub struct StateStore {
    db: Database,
    path: PathBuf,
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
        let store = StateStore { db, path };
        store.init()?;
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Database {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn init(&self) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
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
        }
        txn.commit().map_err(|e| self.err(e))
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
        {
            let (store, loaded) = StateStore::open(&dir).unwrap();
            assert!(loaded.jobs.is_empty());
            assert!(StateStore::open(&dir).is_err(), "the database is locked while open");
            let (jobs, workers) = s.take_dirty();
            store
                .save(
                    jobs.iter().filter_map(|j| s.job(*j)),
                    workers.iter().filter_map(|w| s.worker(w)),
                )
                .unwrap();
        }
        let (_store, loaded) = StateStore::open(&dir).unwrap();
        assert_eq!(loaded.workers.len(), 1);
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(&loaded.jobs[0], s.job(1).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
