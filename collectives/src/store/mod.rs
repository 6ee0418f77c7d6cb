//! Rendezvous key-value store: how ranks find each other (listen addresses, hosts, the NCCL
//! unique id, the session id) and barrier on join.
//!
//! [`Store`] is a small trait so the coordinator's store can replace the default one later.
//! Implementations: [`MemStore`] (in-process, for threads and tests) and [`TcpStore`], a client
//! of [`StoreServer`], the small TCP server that rank 0 runs at `MASTER_ADDR:MASTER_PORT`.

use std::time::Duration;

mod mem;
mod tcp;

pub use mem::MemStore;
pub use tcp::{StoreServer, TcpStore, serve_or_connect};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("timed out after {waited:?} waiting for key `{key}`")]
    Timeout { key: String, waited: Duration },
    #[error("cannot reach the rendezvous store at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("rendezvous store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("rendezvous store protocol error: {0}")]
    Protocol(String),
    /// The handshake with the store failed: one side does not hold the job's secret for this
    /// job and attempt (or runs without one). Retrying does not help.
    #[error("cannot authenticate with the rendezvous store at {addr}: {reason}")]
    Auth {
        addr: String,
        reason: crate::auth::handshake::HandshakeError,
    },
}

/// A shared key-value store. All methods are safe to call from many threads.
pub trait Store: Send + Sync {
    /// Set `key` to `value`, replacing any earlier value, and wake waiters.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Set `key` only if it is absent; returns the value stored afterwards (ours or the
    /// earlier one), so exactly one caller wins a race.
    fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Wait until `key` exists and return its value.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError>;
    /// Return the value if present, without waiting.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Atomically add `delta` to the integer counter at `key` (absent = 0); returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError>;
    /// Remove `key` (absent is fine).
    fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Block until `world` participants have called `barrier` with the same `name`.
    /// Each name may be used once.
    fn barrier(&self, name: &str, world: usize, timeout: Duration) -> Result<(), StoreError> {
        let count_key = format!("{name}/count");
        let done_key = format!("{name}/done");
        let n = self.add(&count_key, 1)?;
        if n as usize == world {
            self.set(&done_key, b"1")?;
        }
        self.get(&done_key, timeout).map(|_| ())
    }
}

/// End-to-end tests of [`TcpStore`] against a real [`StoreServer`] on loopback.
#[cfg(test)]
mod tests {
    use super::tcp::{MAX_KEY_LEN, MAX_VALUE_LEN, OP_GET, OP_SET, STATUS_ERROR};
    use super::*;
    use crate::auth::handshake::{Channel, Client, HandshakeError};
    use crate::auth::{JobAuth, JobSecret, Party};
    use rand::{Rng, SeedableRng};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::thread;
    use std::time::Instant;

    const LONG: Duration = Duration::from_secs(10);

    fn auth() -> JobAuth {
        JobAuth::new(JobSecret::parse("store-test-secret-0123456789").unwrap(), "job-1", 1)
    }

    fn server() -> (StoreServer, String) {
        let server = StoreServer::bind("127.0.0.1:0", Some(auth())).unwrap();
        let addr = server.local_addr().to_string();
        (server, addr)
    }

    /// A client of the test job, as rank 0.
    fn client(addr: &str, timeout: Duration) -> Result<TcpStore, StoreError> {
        TcpStore::connect(addr, timeout, Some(auth()), Party::Rank(0))
    }

    /// A raw connection that passed the handshake, for sending frames by hand.
    fn authenticated_socket(addr: &str) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        let me = Client {
            auth: Some(&auth()),
            channel: Channel::Store,
            me: Party::Launcher,
            peer: Party::Store,
            key: "",
        };
        crate::auth::stream::dial(&s, me, Instant::now() + LONG).unwrap();
        s
    }

    #[test]
    fn tcp_set_get_try_get_delete_add() {
        let (_server, addr) = server();
        let store = client(&addr, LONG).unwrap();
        assert_eq!(store.try_get("a").unwrap(), None);
        store.set("a", b"1").unwrap();
        assert_eq!(store.get("a", LONG).unwrap(), b"1");
        assert_eq!(store.try_get("a").unwrap(), Some(b"1".to_vec()));
        store.delete("a").unwrap();
        assert_eq!(store.try_get("a").unwrap(), None);
        store.set("empty", b"").unwrap();
        assert_eq!(store.get("empty", LONG).unwrap(), b"");
        assert_eq!(store.add("n", 5).unwrap(), 5);
        assert_eq!(store.add("n", -7).unwrap(), -2);
        assert_eq!(store.get("n", LONG).unwrap(), b"-2");
        assert_eq!(store.set_if_absent("n", b"x").unwrap(), b"-2");
        // A server-side error is reported and the client keeps working afterwards.
        store.set("text", b"hello").unwrap();
        assert!(matches!(store.add("text", 1), Err(StoreError::Protocol(_))));
        assert_eq!(store.try_get("text").unwrap(), Some(b"hello".to_vec()));
    }

    #[test]
    fn tcp_large_value_roundtrip_and_limits() {
        let (_server, addr) = server();
        let store = client(&addr, LONG).unwrap();
        let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        store.set("big", &big).unwrap();
        assert_eq!(store.get("big", LONG).unwrap(), big);
        let long_key = "k".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(store.set(&long_key, b"v"), Err(StoreError::Protocol(_))));
        let huge = vec![0u8; MAX_VALUE_LEN as usize + 1];
        assert!(matches!(store.set("huge", &huge), Err(StoreError::Protocol(_))));
        assert_eq!(store.try_get("big").unwrap().map(|v| v.len()), Some(big.len()));
    }

    #[test]
    fn tcp_get_waits_without_blocking_other_clients() {
        let (_server, addr) = server();
        let waiter = client(&addr, LONG).unwrap();
        let handle = thread::spawn(move || waiter.get("late", LONG));
        thread::sleep(Duration::from_millis(50));
        let other = client(&addr, LONG).unwrap();
        let start = Instant::now();
        for i in 0..20 {
            other.set(&format!("k{i}"), b"v").unwrap();
            assert!(other.try_get("late").unwrap().is_none());
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        other.set("late", b"here").unwrap();
        assert_eq!(handle.join().unwrap().unwrap(), b"here");
    }

    #[test]
    fn tcp_get_times_out_naming_key() {
        let (_server, addr) = server();
        let store = client(&addr, LONG).unwrap();
        let start = Instant::now();
        match store.get("missing", Duration::from_millis(200)) {
            Err(StoreError::Timeout { key, waited }) => {
                assert_eq!(key, "missing");
                assert_eq!(waited, Duration::from_millis(200));
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3));
        // The connection is still usable after a timeout reply.
        store.set("missing", b"now").unwrap();
        assert_eq!(store.get("missing", LONG).unwrap(), b"now");
    }

    #[test]
    fn tcp_add_from_8_threads() {
        let (_server, addr) = server();
        let shared = Arc::new(client(&addr, LONG).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                // Half share one client (serialized by its mutex), half use their own.
                let store = if t % 2 == 0 {
                    Arc::clone(&shared)
                } else {
                    Arc::new(client(&addr, LONG).unwrap())
                };
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
        assert_eq!(shared.get("ctr", LONG).unwrap(), b"800");
    }

    #[test]
    fn tcp_set_if_absent_race_has_one_winner() {
        let (_server, addr) = server();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let addr = addr.clone();
                thread::spawn(move || {
                    let store = client(&addr, LONG).unwrap();
                    store.set_if_absent("leader", format!("rank{i}").as_bytes()).unwrap()
                })
            })
            .collect();
        let seen: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let check = client(&addr, LONG).unwrap();
        let stored = check.try_get("leader").unwrap().unwrap();
        assert!(stored.starts_with(b"rank"));
        assert!(seen.iter().all(|v| *v == stored));
    }

    #[test]
    fn tcp_barrier_with_5_threads() {
        let (_server, addr) = server();
        let threads: Vec<_> = (0..5)
            .map(|i| {
                let addr = addr.clone();
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(20 * i));
                    let store = client(&addr, LONG).unwrap();
                    store.barrier("join", 5, LONG)
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
    }

    /// Read until EOF (or error) and return what arrived.
    fn drain(mut s: TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(LONG)).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    #[test]
    fn garbage_clients_do_not_hurt_the_server() {
        let (_server, addr) = server();
        let good = client(&addr, LONG).unwrap();
        good.set("before", b"1").unwrap();

        // Random bytes, then hang up.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20 {
            let mut junk = vec![0u8; rng.random_range(1..2048)];
            rng.fill(&mut junk[..]);
            let mut s = TcpStream::connect(&addr).unwrap();
            let _ = s.write_all(&junk);
        }
        // Authenticated clients with bad frames. A huge key length prefix: refused with an
        // error reply, then closed.
        let mut s = authenticated_socket(&addr);
        s.write_all(&[OP_SET, 0xff, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!(drain(s).first(), Some(&STATUS_ERROR));
        // A huge value length prefix.
        let mut s = authenticated_socket(&addr);
        let mut frame = vec![OP_SET, 1, 0, 0, 0, b'k'];
        frame.extend_from_slice(&u64::MAX.to_le_bytes());
        s.write_all(&frame).unwrap();
        assert_eq!(drain(s).first(), Some(&STATUS_ERROR));
        // A key that is not UTF-8, and an unknown op code.
        let mut s = authenticated_socket(&addr);
        s.write_all(&[OP_SET, 1, 0, 0, 0, 0xff]).unwrap();
        assert_eq!(drain(s).first(), Some(&STATUS_ERROR));
        let mut s = authenticated_socket(&addr);
        s.write_all(&[200]).unwrap();
        assert_eq!(drain(s).first(), Some(&STATUS_ERROR));
        // A waiting get with an enormous timeout whose client hangs up.
        let mut s = authenticated_socket(&addr);
        let mut frame = vec![OP_GET, 1, 0, 0, 0, b'z'];
        frame.extend_from_slice(&u64::MAX.to_le_bytes());
        s.write_all(&frame).unwrap();
        drop(s);

        assert_eq!(good.get("before", LONG).unwrap(), b"1");
        good.set("after", b"2").unwrap();
        let fresh = client(&addr, LONG).unwrap();
        assert_eq!(fresh.get("after", LONG).unwrap(), b"2");
    }

    #[test]
    fn clients_without_the_secret_are_refused_before_any_request() {
        let (server, addr) = server();
        let good = client(&addr, LONG).unwrap();
        // A plain SET without the handshake: closed unanswered, and never applied.
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut frame = vec![OP_SET, 1, 0, 0, 0, b'x'];
        frame.extend_from_slice(&1u64.to_le_bytes());
        frame.push(b'1');
        s.write_all(&frame).unwrap();
        assert!(drain(s).is_empty());
        // Another secret, job or attempt, or none at all.
        let secret = |s: &str| JobSecret::parse(s).unwrap();
        let right = auth();
        let wrong = [
            JobAuth::new(secret("another-secret-0123456789"), "job-1", 1),
            JobAuth::new(right.secret.clone(), "job-2", 1),
            JobAuth::new(right.secret.clone(), "job-1", 2),
        ];
        for w in wrong {
            match TcpStore::connect(&addr, LONG, Some(w), Party::Rank(1)) {
                Err(e @ StoreError::Auth { .. }) => assert!(!e.to_string().contains("secret-0123"), "{e}"),
                other => panic!("expected an Auth error, got {other:?}"),
            }
        }
        match TcpStore::connect(&addr, LONG, None, Party::Rank(1)) {
            // The server names the reason in its log; the client sees the connection closed.
            Err(StoreError::Auth { reason, .. }) => assert!(matches!(reason, HandshakeError::Rejected), "{reason}"),
            other => panic!("expected an Auth error, got {other:?}"),
        }
        // Every refusal is counted (on the server's threads, so wait for them), and the job's
        // own clients go on.
        let until = Instant::now() + LONG;
        while server.refused_connections() < 5 && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.refused_connections(), 5);
        assert_eq!(good.try_get("x").unwrap(), None);
        good.set("after", b"ok").unwrap();
        assert_eq!(client(&addr, LONG).unwrap().get("after", LONG).unwrap(), b"ok");

        // A server without a secret and a client with one refuse each other; two without work.
        let open = StoreServer::bind("127.0.0.1:0", None).unwrap();
        let open_addr = open.local_addr().to_string();
        assert!(matches!(client(&open_addr, LONG), Err(StoreError::Auth { .. })));
        let plain = TcpStore::connect(&open_addr, LONG, None, Party::Rank(0)).unwrap();
        plain.set("k", b"v").unwrap();
        assert_eq!(plain.get("k", LONG).unwrap(), b"v");
    }

    #[test]
    fn connect_retries_until_server_is_up() {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let starter = {
            let addr = addr.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(300));
                StoreServer::bind(addr.as_str(), Some(auth())).unwrap()
            })
        };
        let start = Instant::now();
        let store = client(&addr, LONG).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(250));
        let _server = starter.join().unwrap();
        store.set("up", b"yes").unwrap();
        assert_eq!(store.get("up", LONG).unwrap(), b"yes");
    }

    #[test]
    fn connect_to_dead_port_times_out() {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        match client(&addr, Duration::from_millis(300)) {
            Err(StoreError::Connect { addr: named, .. }) => assert_eq!(named, addr),
            other => panic!("expected Connect error, got {other:?}"),
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3));
    }

    #[test]
    fn serve_or_connect_ephemeral_port() {
        let (server, store0) = serve_or_connect(0, "127.0.0.1:0", LONG, Some(auth())).unwrap();
        let server = server.unwrap();
        let addr = server.local_addr().to_string();
        let (none, store1) = serve_or_connect(1, &addr, LONG, Some(auth())).unwrap();
        assert!(none.is_none());
        store0.set("id", b"abc").unwrap();
        assert_eq!(store1.get("id", LONG).unwrap(), b"abc");
        assert!(matches!(
            serve_or_connect(1, "127.0.0.1:0", LONG, Some(auth())),
            Err(StoreError::Connect { .. })
        ));
    }

    #[test]
    fn shutdown_ends_waiting_clients() {
        let (mut server, addr) = server();
        let store = client(&addr, LONG).unwrap();
        let waiter = thread::spawn(move || store.get("never", LONG));
        thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        server.shutdown();
        assert!(waiter.join().unwrap().is_err());
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(client(&addr, Duration::from_millis(100)).is_err());
    }
}
