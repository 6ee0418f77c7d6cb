//! In-process [`Store`]: a map behind a mutex plus one condition variable.
//!
//! Threads of one process (and tests) use it directly; [`super::StoreServer`] also keeps its
//! state in one, so both stores share the exact same semantics. A single condvar is enough:
//! rendezvous traffic is tiny, so waking every waiter on each write costs nothing noticeable
//! and keeps the code obviously correct.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Store, StoreError};

/// In-process key-value store. Counters written by [`Store::add`] are stored as the decimal
/// string of the `i64`, so `get` of a counter key returns e.g. `b"3"`.
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemStore {
    /// A new empty store, already shared: every user needs its own handle.
    pub fn new() -> Arc<MemStore> {
        Arc::new(MemStore::default())
    }

    /// Lock the map. No code panics while holding the lock, but a poisoned lock would still
    /// hold a consistent map (every update is a single `HashMap` call), so recover it.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Parse a counter value written by `add` (or by a caller who `set` a decimal string).
fn parse_counter(key: &str, value: &[u8]) -> Result<i64, StoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            StoreError::Protocol(format!(
                "value at key `{key}` is not an integer counter ({} bytes)",
                value.len()
            ))
        })
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.lock().insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut map = self.lock();
        if let Some(existing) = map.get(key) {
            return Ok(existing.clone());
        }
        map.insert(key.to_owned(), value.to_vec());
        drop(map);
        self.changed.notify_all();
        Ok(value.to_vec())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        // `None` when the timeout is too large to represent: wait forever.
        let deadline = Instant::now().checked_add(timeout);
        let mut map = self.lock();
        loop {
            if let Some(value) = map.get(key) {
                return Ok(value.clone());
            }
            map = match deadline {
                None => self.changed.wait(map).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(StoreError::Timeout {
                            key: key.to_owned(),
                            waited: timeout,
                        });
                    }
                    self.changed
                        .wait_timeout(map, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let mut map = self.lock();
        let current = match map.get(key) {
            Some(value) => parse_counter(key, value)?,
            None => 0,
        };
        let new = current
            .checked_add(delta)
            .ok_or_else(|| StoreError::Protocol(format!("counter `{key}` overflows: {current} + {delta}")))?;
        map.insert(key.to_owned(), new.to_string().into_bytes());
        drop(map);
        self.changed.notify_all();
        Ok(new)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.lock().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn set_get_try_get_delete() {
        let store = MemStore::new();
        assert_eq!(store.try_get("a").unwrap(), None);
        store.set("a", b"1").unwrap();
        assert_eq!(store.get("a", LONG).unwrap(), b"1");
        assert_eq!(store.try_get("a").unwrap(), Some(b"1".to_vec()));
        store.set("a", b"two").unwrap();
        assert_eq!(store.get("a", Duration::ZERO).unwrap(), b"two");
        store.delete("a").unwrap();
        store.delete("a").unwrap();
        assert_eq!(store.try_get("a").unwrap(), None);
        store.set("empty", b"").unwrap();
        assert_eq!(store.try_get("empty").unwrap(), Some(Vec::new()));
    }

    #[test]
    fn get_waits_for_later_set() {
        let store = MemStore::new();
        let writer = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                store.set("late", b"here").unwrap();
            })
        };
        let start = Instant::now();
        assert_eq!(store.get("late", LONG).unwrap(), b"here");
        assert!(start.elapsed() >= Duration::from_millis(90));
        writer.join().unwrap();
    }

    #[test]
    fn get_with_unrepresentable_timeout_waits() {
        let store = MemStore::new();
        let writer = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                store.set("k", b"v").unwrap();
            })
        };
        assert_eq!(store.get("k", Duration::MAX).unwrap(), b"v");
        writer.join().unwrap();
    }

    #[test]
    fn get_times_out_naming_key() {
        let store = MemStore::new();
        let start = Instant::now();
        let err = store.get("missing", Duration::from_millis(100)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        match err {
            StoreError::Timeout { key, waited } => {
                assert_eq!(key, "missing");
                assert_eq!(waited, Duration::from_millis(100));
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
    }

    #[test]
    fn add_from_many_threads() {
        let store = MemStore::new();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    for _ in 0..100 {
                        store.add("ctr", 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.get("ctr", LONG).unwrap(), b"800");
        assert_eq!(store.add("ctr", -801).unwrap(), -1);
        assert_eq!(store.try_get("ctr").unwrap(), Some(b"-1".to_vec()));
    }

    #[test]
    fn add_rejects_non_counter_and_overflow() {
        let store = MemStore::new();
        store.set("text", b"hello").unwrap();
        assert!(matches!(store.add("text", 1), Err(StoreError::Protocol(_))));
        store.add("big", i64::MAX).unwrap();
        assert!(matches!(store.add("big", 1), Err(StoreError::Protocol(_))));
        assert_eq!(store.add("big", 0).unwrap(), i64::MAX);
    }

    #[test]
    fn set_if_absent_race_has_one_winner() {
        let store = MemStore::new();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let store = Arc::clone(&store);
                thread::spawn(move || store.set_if_absent("leader", format!("rank{i}").as_bytes()).unwrap())
            })
            .collect();
        let seen: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let stored = store.try_get("leader").unwrap().unwrap();
        assert!(seen.iter().all(|v| *v == stored));
    }

    #[test]
    fn barrier_releases_all() {
        let store = MemStore::new();
        let threads: Vec<_> = (0..5)
            .map(|_| {
                let store = Arc::clone(&store);
                thread::spawn(move || store.barrier("join", 5, LONG))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(store.try_get("join/count").unwrap(), Some(b"5".to_vec()));
    }

    #[test]
    fn barrier_times_out_when_short_of_world() {
        let store = MemStore::new();
        let err = store.barrier("b", 2, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, StoreError::Timeout { ref key, .. } if key == "b/done"));
    }
}
