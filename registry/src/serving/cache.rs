//! Loaded versions in memory, under a byte limit. The first request for a version loads it
//! (on the blocking pool; concurrent requests for the same version wait for that one load);
//! later ones find it. When the total passes the limit, the least recently used versions are
//! dropped from the cache; requests already running on them finish first (they hold the
//! model), then its engine thread ends and the memory is freed. A failed load is not cached:
//! the next request tries again.
//!
//! Versions that aliases point at are pinned ([`ModelCache::pin`]): eviction takes versions
//! no alias names first, then those only a shadow uses, and an alias's targets last, so
//! traffic through an alias does not find its version gone while the limit could have kept
//! it.

use super::engine::{EngineHandle, spawn_engine};
use super::{ModelLoader, TextCodec};
use crate::model::VersionRecord;
use gantry_checkpoint::S3Options;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A version being served.
pub struct ServedModel {
    pub model: String,
    pub version: u32,
    pub engine: EngineHandle,
    pub codec: Option<Box<dyn TextCodec>>,
    pub eod: Option<u32>,
    /// The Jinja chat template saved with the tokenizer, if any.
    pub chat_template: Option<String>,
    pub bytes: u64,
    pub max_len: usize,
    pub vocab_size: usize,
    pub load_seconds: f64,
    /// Requests admitted and not finished (generating or waiting for a slot).
    pub pending: std::sync::atomic::AtomicUsize,
}

/// A request's claim on a served model's queue; released when dropped.
pub struct Admitted(Arc<ServedModel>);

impl ServedModel {
    /// Admit one more request unless `limit` are already pending (the caller answers 503).
    pub fn admit(self: &Arc<ServedModel>, limit: usize) -> Option<Admitted> {
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admitted(self.clone()))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    #[error(
        "{model}@{version} needs about {needs} bytes, more than the model cache's limit of {limit} bytes (--model-cache-mb)"
    )]
    TooLarge {
        model: String,
        version: u32,
        needs: u64,
        limit: u64,
    },
    #[error("loading {model}@{version}: {message}")]
    Load {
        model: String,
        version: u32,
        message: String,
    },
}

type Cell = Arc<tokio::sync::OnceCell<Result<Arc<ServedModel>, CacheError>>>;

struct Entry {
    cell: Cell,
    last_used: u64,
}

/// `(model, version)`.
type Key = (String, u32);

/// What an alias holds in the cache: its targets, and its shadow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    pub targets: Vec<u32>,
    pub shadow: Option<u32>,
}

/// How much a version is wanted, lowest evicted first: no alias names it, only as a shadow,
/// as an alias's target.
fn keep_rank(pins: &HashMap<(String, String), Pins>, key: &Key) -> u8 {
    let named = pins.iter().filter(|((m, _), _)| *m == key.0);
    named.fold(0, |rank, (_, p)| {
        if p.targets.contains(&key.1) {
            2
        } else if p.shadow == Some(key.1) {
            rank.max(1)
        } else {
            rank
        }
    })
}

/// The entries and the use counter that orders them.
#[derive(Default)]
struct Entries {
    map: HashMap<Key, Entry>,
    clock: u64,
}

pub struct ModelCache {
    loader: Arc<dyn ModelLoader>,
    limit_bytes: u64,
    s3: S3Options,
    entries: Mutex<Entries>,
    /// By `(model, alias)`.
    pins: Mutex<HashMap<(String, String), Pins>>,
    pub loads: AtomicU64,
    pub evictions: AtomicU64,
}

impl ModelCache {
    pub fn new(loader: Arc<dyn ModelLoader>, limit_bytes: u64, s3: S3Options) -> ModelCache {
        ModelCache {
            loader,
            limit_bytes,
            s3,
            entries: Mutex::default(),
            pins: Mutex::default(),
            loads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// The loaded versions and their bytes.
    pub fn loaded(&self) -> Vec<Arc<ServedModel>> {
        let entries = self.entries.lock().expect("model cache lock");
        entries
            .map
            .values()
            .filter_map(|e| e.cell.get().and_then(|r| r.as_ref().ok()).cloned())
            .collect()
    }

    /// Record what `alias` of `model` points at (empty targets and no shadow: nothing, the
    /// alias is gone), for eviction to keep those versions longest.
    pub fn pin(&self, model: &str, alias: &str, pins: Pins) {
        let mut all = self.pins.lock().expect("model cache lock");
        let key = (model.to_string(), alias.to_string());
        if pins.targets.is_empty() && pins.shadow.is_none() {
            all.remove(&key);
        } else if all.get(&key) != Some(&pins) {
            all.insert(key, pins);
        }
    }

    /// What `alias` of `model` is pinned to now.
    pub fn pins(&self, model: &str, alias: &str) -> Pins {
        let all = self.pins.lock().expect("model cache lock");
        all.get(&(model.to_string(), alias.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// The served model for `v` if it is loaded now (counted as a use), without waiting:
    /// `None` while it is absent or still loading. For work that must never wait on a load
    /// (shadow traffic); [`ModelCache::get`] loads.
    pub fn loaded_now(&self, v: &VersionRecord) -> Option<Arc<ServedModel>> {
        let mut guard = self.entries.lock().expect("model cache lock");
        guard.clock += 1;
        let now = guard.clock;
        let e = guard.map.get_mut(&(v.model.clone(), v.version))?;
        let served = e.cell.get().and_then(|r| r.as_ref().ok()).cloned()?;
        e.last_used = now;
        Some(served)
    }

    /// Whether a load of `v` is under way.
    pub fn is_loading(&self, v: &VersionRecord) -> bool {
        let guard = self.entries.lock().expect("model cache lock");
        guard
            .map
            .get(&(v.model.clone(), v.version))
            .is_some_and(|e| !e.cell.initialized())
    }

    /// The served model for `v`, loading it if needed.
    pub async fn get(&self, v: &VersionRecord) -> Result<Arc<ServedModel>, CacheError> {
        let key = (v.model.clone(), v.version);
        let cell = {
            let mut guard = self.entries.lock().expect("model cache lock");
            guard.clock += 1;
            let now = guard.clock;
            let e = guard.map.entry(key.clone()).or_insert_with(|| Entry {
                cell: Arc::new(tokio::sync::OnceCell::new()),
                last_used: now,
            });
            e.last_used = now;
            e.cell.clone()
        };
        let mut loaded_here = false;
        let result = cell
            .get_or_init(|| {
                loaded_here = true;
                self.load(v)
            })
            .await
            .clone();
        match &result {
            Err(_) => {
                let mut guard = self.entries.lock().expect("model cache lock");
                if guard.map.get(&key).is_some_and(|e| Arc::ptr_eq(&e.cell, &cell)) {
                    guard.map.remove(&key);
                }
            }
            Ok(_) if loaded_here => self.evict_over_limit(&key),
            Ok(_) => {}
        }
        result
    }

    async fn load(&self, v: &VersionRecord) -> Result<Arc<ServedModel>, CacheError> {
        let too_large = |needs: u64| CacheError::TooLarge {
            model: v.model.clone(),
            version: v.version,
            needs,
            limit: self.limit_bytes,
        };
        if let Some(needs) = self.loader.estimate_bytes(v).filter(|&n| n > self.limit_bytes) {
            return Err(too_large(needs));
        }
        let (loader, record, s3) = (self.loader.clone(), v.clone(), self.s3.clone());
        let started = Instant::now();
        let fail = |message: String| CacheError::Load {
            model: v.model.clone(),
            version: v.version,
            message,
        };
        let loaded = tokio::task::spawn_blocking(move || loader.load(&record, &s3))
            .await
            .map_err(|e| fail(format!("loader task failed: {e}")))?
            .map_err(fail)?;
        if loaded.bytes > self.limit_bytes {
            return Err(too_large(loaded.bytes));
        }
        self.loads.fetch_add(1, Ordering::Relaxed);
        let max_len = loaded.model.max_len();
        let name = format!("{}@{}", v.model, v.version);
        let engine = spawn_engine(loaded.model, loaded.eod, name.clone())
            .map_err(|e| fail(format!("cannot start the engine thread: {e}")))?;
        let served = ServedModel {
            model: v.model.clone(),
            version: v.version,
            engine,
            codec: loaded.codec,
            eod: loaded.eod,
            chat_template: loaded.chat_template,
            bytes: loaded.bytes,
            max_len,
            vocab_size: loaded.vocab_size,
            load_seconds: started.elapsed().as_secs_f64(),
            pending: Default::default(),
        };
        tracing::info!(model = %name, bytes = served.bytes, seconds = served.load_seconds, "model loaded for serving");
        Ok(Arc::new(served))
    }

    /// Drop a loaded version whose engine stopped (its thread died), so the next request
    /// loads it afresh.
    pub fn forget(&self, model: &ServedModel) {
        let mut guard = self.entries.lock().expect("model cache lock");
        let key = (model.model.clone(), model.version);
        let same = guard
            .map
            .get(&key)
            .and_then(|e| e.cell.get())
            .is_some_and(|r| r.as_ref().is_ok_and(|m| std::ptr::eq(Arc::as_ptr(m), model)));
        if same {
            tracing::warn!(model = %key.0, version = key.1, "the generation engine stopped; the version will be loaded again");
            guard.map.remove(&key);
        }
    }

    /// Drop loaded versions (never `keep`) until the total fits: the least wanted first
    /// ([`keep_rank`]: unpinned, shadows, alias targets), the least recently used among equals.
    fn evict_over_limit(&self, keep: &Key) {
        let pins = self.pins.lock().expect("model cache lock").clone();
        let mut guard = self.entries.lock().expect("model cache lock");
        let entries = &mut guard.map;
        loop {
            let ready: Vec<(&Key, u64, u64)> = entries
                .iter()
                .filter_map(|(k, e)| match e.cell.get() {
                    Some(Ok(m)) => Some((k, m.bytes, e.last_used)),
                    _ => None,
                })
                .collect();
            let total: u64 = ready.iter().map(|r| r.1).sum();
            if total <= self.limit_bytes {
                return;
            }
            let Some(victim) = ready
                .iter()
                .filter(|r| r.0 != keep)
                .min_by_key(|r| (keep_rank(&pins, r.0), r.2))
                .map(|r| r.0.clone())
            else {
                return;
            };
            tracing::info!(model = %victim.0, version = victim.1, "evicting a model from the serving cache");
            entries.remove(&victim);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::{LanguageModel, LoadedModel};

    /// One token, always token 0.
    struct Constant;

    impl LanguageModel for Constant {
        fn slots(&self) -> usize {
            1
        }
        fn max_len(&self) -> usize {
            8
        }
        fn prefill(&mut self, _: usize, _: &[u32]) -> Result<Vec<f32>, String> {
            Ok(vec![1.0])
        }
        fn decode(&mut self, batch: &[(usize, u32)]) -> Result<Vec<Vec<f32>>, String> {
            Ok(vec![vec![1.0]; batch.len()])
        }
        fn release(&mut self, _: usize) {}
    }

    /// Loads `Constant` models of `bytes` bytes, counting loads; version 13 fails to load.
    struct Loader {
        bytes: u64,
        loads: AtomicU64,
    }

    impl ModelLoader for Loader {
        fn load(&self, v: &VersionRecord, _: &S3Options) -> Result<super::super::LoadedModel, String> {
            self.loads.fetch_add(1, Ordering::Relaxed);
            if v.version == 13 {
                return Err("version 13 is unloadable".into());
            }
            Ok(LoadedModel {
                model: Box::new(Constant),
                codec: None,
                eod: None,
                bytes: self.bytes,
                vocab_size: 1,
                chat_template: None,
            })
        }
        fn estimate_bytes(&self, _: &VersionRecord) -> Option<u64> {
            Some(self.bytes)
        }
    }

    fn version(v: u32) -> VersionRecord {
        VersionRecord {
            model: "m".into(),
            version: v,
            created_ms: 0,
            checkpoint_url: String::new(),
            step: 0,
            tokens_seen: 0,
            model_config: serde_json::Value::Null,
            layout: serde_json::Value::Null,
            data_cursor: serde_json::Value::Null,
            lineage: serde_json::Value::Null,
            spec_hash: String::new(),
            bytes: 0,
            tensors: 0,
            data: serde_json::Value::Null,
            evals: Vec::new(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn loads_once_evicts_least_recently_used_and_retries_failures() {
        let loader = Arc::new(Loader {
            bytes: 100,
            loads: AtomicU64::new(0),
        });
        let cache = ModelCache::new(loader.clone(), 250, S3Options::default());
        rt().block_on(async {
            let one = version(1);
            let (a, b) = tokio::join!(cache.get(&one), cache.get(&one));
            assert!(
                Arc::ptr_eq(&a.unwrap(), &b.unwrap()),
                "one load for concurrent requests"
            );
            cache.get(&version(2)).await.unwrap();
            cache.get(&version(1)).await.unwrap(); // 1 is now the most recently used
            cache.get(&version(3)).await.unwrap(); // 300 > 250: 2 goes
            let mut loaded: Vec<u32> = cache.loaded().iter().map(|m| m.version).collect();
            loaded.sort();
            assert_eq!(loaded, [1, 3]);
            assert_eq!(cache.evictions.load(Ordering::Relaxed), 1);
            assert!(matches!(cache.get(&version(13)).await, Err(CacheError::Load { .. })));
            assert!(cache.get(&version(13)).await.is_err());
            assert_eq!(
                loader.loads.load(Ordering::Relaxed),
                5,
                "1, 2, 3 once; 13 twice (failures are not cached)"
            );
        });
        let small = ModelCache::new(loader.clone(), 50, S3Options::default());
        let refused = rt().block_on(small.get(&version(1)));
        assert!(matches!(
            refused,
            Err(CacheError::TooLarge {
                needs: 100,
                limit: 50,
                ..
            })
        ));
    }

    #[test]
    fn eviction_keeps_alias_targets_over_unpinned_versions_and_shadows() {
        let loader = Arc::new(Loader {
            bytes: 100,
            loads: AtomicU64::new(0),
        });
        let cache = ModelCache::new(loader, 300, S3Options::default());
        let loaded = |cache: &ModelCache| {
            let mut v: Vec<u32> = cache.loaded().iter().map(|m| m.version).collect();
            v.sort();
            v
        };
        rt().block_on(async {
            // prod → 1 (90) and 2 (10), shadowed by 4; 3 was asked for by number, recently.
            cache.pin(
                "m",
                "prod",
                Pins {
                    targets: vec![1, 2],
                    shadow: Some(4),
                },
            );
            for v in [2, 1, 3] {
                cache.get(&version(v)).await.unwrap();
            }
            // A fourth version: the unpinned 3 goes, though 2 was used longer ago.
            cache.get(&version(4)).await.unwrap();
            assert_eq!(loaded(&cache), [1, 2, 4]);
            // A fifth: of what is left, the shadow goes before the targets.
            cache.get(&version(5)).await.unwrap();
            assert_eq!(loaded(&cache), [1, 2, 5]);
            // The alias moves to 5 alone: 1 and 2 are no longer wanted more than 3.
            cache.pin(
                "m",
                "prod",
                Pins {
                    targets: vec![5],
                    shadow: None,
                },
            );
            cache.get(&version(3)).await.unwrap();
            assert_eq!(
                loaded(&cache),
                [1, 3, 5],
                "the least recently used unpinned version (2) went"
            );
            assert!(cache.loaded_now(&version(1)).is_some());
            assert!(cache.loaded_now(&version(2)).is_none());
            assert!(!cache.is_loading(&version(2)));
            // Unpinning everything: plain LRU again (5 is now the oldest use).
            cache.pin("m", "prod", Pins::default());
            assert_eq!(cache.pins("m", "prod"), Pins::default());
            cache.get(&version(6)).await.unwrap();
            assert_eq!(loaded(&cache), [1, 3, 6]);
        });
    }

    #[test]
    fn admission_stops_at_the_limit_and_releases_on_drop() {
        let loader = Arc::new(Loader {
            bytes: 1,
            loads: AtomicU64::new(0),
        });
        let cache = ModelCache::new(loader, 10, S3Options::default());
        let served = rt().block_on(cache.get(&version(1))).unwrap();
        let first = served.admit(2).expect("room for one");
        let second = served.admit(2).expect("room for two");
        assert!(served.admit(2).is_none(), "a third is refused");
        drop(first);
        let third = served.admit(2).expect("room again");
        drop((second, third));
        assert_eq!(served.pending.load(Ordering::Relaxed), 0);
    }
}
