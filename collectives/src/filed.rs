//! Links a listener has authenticated, filed under (communicator key, dialling rank) until the
//! rank that listens asks for them: the one meeting point of the TCP/TLS acceptor's handshake
//! threads and the QUIC endpoint's accept tasks with the ranks' own threads.

use crate::error::LinkError;
use std::collections::HashMap;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub(crate) struct Filed<T> {
    links: Mutex<HashMap<(String, usize), T>>,
    filed: Condvar,
}

impl<T> Default for Filed<T> {
    fn default() -> Self {
        Filed {
            links: Mutex::default(),
            filed: Condvar::new(),
        }
    }
}

impl<T> Filed<T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, usize), T>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// File `rank`'s link for communicator `key` (a later one for the same pair replaces it).
    pub(crate) fn file(&self, key: String, rank: usize, link: T) {
        self.lock().insert((key, rank), link);
        self.filed.notify_all();
    }

    /// Wait until `peer`'s link for `key` is filed, or `deadline`; `over` names the transport
    /// in the timeout's message ("", " over QUIC").
    pub(crate) fn take(&self, key: &str, peer: usize, deadline: Instant, over: &str) -> Result<T, LinkError> {
        let mut links = self.lock();
        loop {
            if let Some(link) = links.remove(&(key.to_string(), peer)) {
                return Ok(link);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("rank {peer} did not connect{over} for communicator `{key}`"),
                )));
            }
            links = self
                .filed
                .wait_timeout(links, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Take `peer`'s link for `key` if it is filed, without waiting.
    #[cfg(test)]
    pub(crate) fn try_take(&self, key: &str, peer: usize) -> Option<T> {
        self.lock().remove(&(key.to_string(), peer))
    }

    /// Every link nobody took (a closing endpoint says goodbye on each).
    pub(crate) fn drain(&self) -> Vec<T> {
        self.lock().drain().map(|(_, link)| link).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_link_filed_later_is_taken_and_a_missing_one_times_out_naming_the_rank() {
        let filed = Arc::new(Filed::<u32>::default());
        let f = filed.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            f.file("world#1".into(), 3, 33);
        });
        let soon = Instant::now() + Duration::from_secs(10);
        assert_eq!(filed.take("world#1", 3, soon, "").unwrap(), 33);
        t.join().unwrap();
        let e = filed
            .take("world#1", 2, Instant::now() + Duration::from_millis(10), " over QUIC")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 2 did not connect over QUIC for communicator `world#1`"),
            "{e}"
        );
        filed.file("k".into(), 1, 1);
        assert_eq!(filed.try_take("other", 1), None);
        assert_eq!(filed.drain(), vec![1]);
    }
}
