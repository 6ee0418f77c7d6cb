//! In-process links between threads, for fast unit and property tests of the algorithms.
//!
//! Each direction is a bounded byte pipe (a `VecDeque` under a mutex) so back-pressure behaves
//! like a socket or a ring: an algorithm that would deadlock on real transports deadlocks (and
//! times out) here too. Dropping a link closes both directions, as a dying process would.

use crate::error::LinkError;
use crate::link::{Interest, Link, LinkKind};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct PipeState {
    data: VecDeque<u8>,
    closed: bool,
    aborted: Option<(Option<usize>, String)>,
}

struct Pipe {
    capacity: usize,
    state: Mutex<PipeState>,
    cv: Condvar,
}

impl Pipe {
    fn new(capacity: usize) -> Arc<Pipe> {
        Arc::new(Pipe {
            capacity,
            state: Mutex::new(PipeState::default()),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check(state: &PipeState) -> Result<(), LinkError> {
    if let Some((culprit, reason)) = &state.aborted {
        return Err(LinkError::Aborted {
            culprit: *culprit,
            reason: reason.clone(),
        });
    }
    Ok(())
}

pub struct LocalLink {
    tx: Arc<Pipe>,
    rx: Arc<Pipe>,
}

impl Link for LocalLink {
    fn kind(&self) -> LinkKind {
        LinkKind::Local
    }

    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
        let mut s = self.tx.lock();
        check(&s)?;
        if s.closed {
            return Err(LinkError::Closed);
        }
        let n = data.len().min(self.tx.capacity - s.data.len());
        s.data.extend(&data[..n]);
        drop(s);
        if n > 0 {
            self.tx.cv.notify_all();
        }
        Ok(n)
    }

    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        let mut s = self.rx.lock();
        check(&s)?;
        let n = buf.len().min(s.data.len());
        if n == 0 && s.closed {
            return Err(LinkError::Closed);
        }
        for (d, b) in buf[..n].iter_mut().zip(s.data.drain(..n)) {
            *d = b;
        }
        drop(s);
        if n > 0 {
            self.rx.cv.notify_all();
        }
        Ok(n)
    }

    fn wait(&self, interest: Interest, timeout: Duration) {
        let (pipe, ready): (&Pipe, fn(&PipeState, usize) -> bool) = if interest.read {
            (&self.rx, |s, _| !s.data.is_empty() || s.closed || s.aborted.is_some())
        } else {
            (&self.tx, |s, cap| s.data.len() < cap || s.closed || s.aborted.is_some())
        };
        let timeout = if interest.read && interest.write {
            timeout.min(Duration::from_micros(200))
        } else {
            timeout
        };
        let s = pipe.lock();
        if !ready(&s, pipe.capacity) {
            let _ = pipe.cv.wait_timeout(s, timeout);
        }
    }

    fn abort(&mut self, culprit: Option<usize>, reason: &str) {
        for pipe in [&self.tx, &self.rx] {
            pipe.lock().aborted = Some((culprit, reason.to_string()));
            pipe.cv.notify_all();
        }
    }
}

impl Drop for LocalLink {
    fn drop(&mut self) {
        for pipe in [&self.tx, &self.rx] {
            pipe.lock().closed = true;
            pipe.cv.notify_all();
        }
    }
}

/// Pipes shared by the threads of one in-process world, keyed by (communicator, from, to).
#[derive(Default)]
pub struct LocalRegistry {
    pipes: Mutex<HashMap<(String, usize, usize), Arc<Pipe>>>,
    capacity: usize,
}

impl LocalRegistry {
    pub fn new(capacity: usize) -> Arc<LocalRegistry> {
        Arc::new(LocalRegistry {
            pipes: Mutex::default(),
            capacity: capacity.max(1),
        })
    }

    fn pipe(&self, key: &str, from: usize, to: usize) -> Arc<Pipe> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|p| p.into_inner());
        pipes
            .entry((key.to_string(), from, to))
            .or_insert_with(|| Pipe::new(self.capacity))
            .clone()
    }

    /// The link from global rank `me` to global rank `peer` for communicator `key`.
    pub fn link(&self, key: &str, me: usize, peer: usize) -> LocalLink {
        LocalLink {
            tx: self.pipe(key, me, peer),
            rx: self.pipe(key, peer, me),
        }
    }
}
