//! TCP rendezvous store: [`StoreServer`] (run by rank 0, like torchrun's `TCPStore` at
//! `MASTER_ADDR:MASTER_PORT`) and [`TcpStore`], the [`Store`] client every rank uses.
//!
//! The server keeps its state in a [`MemStore`] and serves each connection on its own thread,
//! so a client blocked in a waiting `get` never delays the others. Every request is one frame
//! followed by exactly one reply, so a client needs a single connection behind a mutex.
//!
//! Every connection opens with the data plane's handshake ([`crate::auth::handshake`], channel
//! `Store`): the client proves it holds the job's secret and checks that the server does too.
//! A connection that fails it is logged with its peer address, counted
//! ([`StoreServer::refused_connections`]) and closed before any request is parsed.
//!
//! Wire protocol after the handshake (all integers little-endian):
//!
//! ```text
//! request := op:u8 key body
//! key     := len:u32 utf8[len]                  (len <= MAX_KEY_LEN)
//! value   := len:u64 bytes[len]                 (len <= MAX_VALUE_LEN)
//! op 1 SET            body = value               reply OK
//! op 2 SET_IF_ABSENT  body = value               reply OK value (the stored one)
//! op 3 GET            body = timeout_ms:u64      reply OK value | TIMEOUT
//! op 4 TRY_GET        body = (none)              reply OK present:u8 [value if present = 1]
//! op 5 ADD            body = delta:i64           reply OK new:i64
//! op 6 DELETE         body = (none)              reply OK
//! reply   := status:u8 payload                  status 0 OK, 1 TIMEOUT,
//!                                               2 ERROR with payload len:u32 utf8[len]
//! ```
//!
//! A malformed frame (unknown op, oversized or non-UTF-8 key, oversized value) gets an ERROR
//! reply when possible and the server then closes that connection: after a bad length prefix
//! the stream can no longer be trusted. The client drops its connection after any error and
//! reconnects on the next request, so a stale reply can never be read as a fresh one.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{MemStore, Store, StoreError};
use crate::auth::handshake::{Channel, Client, Server};
use crate::auth::stream::{self as handshake, ACCEPT_TIMEOUT, DIAL_TIMEOUT, Refusals};
use crate::auth::{JobAuth, Party};

/// Largest key accepted, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 4 << 10;
/// Largest value accepted, in bytes.
pub(crate) const MAX_VALUE_LEN: u64 = 64 << 20;
/// Largest ERROR message a client accepts.
const MAX_ERROR_LEN: usize = 64 << 10;

pub(crate) const OP_SET: u8 = 1;
pub(crate) const OP_SET_IF_ABSENT: u8 = 2;
pub(crate) const OP_GET: u8 = 3;
pub(crate) const OP_TRY_GET: u8 = 4;
pub(crate) const OP_ADD: u8 = 5;
pub(crate) const OP_DELETE: u8 = 6;

pub(crate) const STATUS_OK: u8 = 0;
pub(crate) const STATUS_TIMEOUT: u8 = 1;
pub(crate) const STATUS_ERROR: u8 = 2;

/// Pause between connection attempts while the server is not up yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Read/write timeout for requests that do not wait on the server.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra read time for a waiting `get` beyond its own timeout, in case the server stalls.
const GET_SLACK: Duration = Duration::from_secs(5);
/// How often a server thread in a waiting `get` checks for shutdown and client hang-up.
const WAIT_SLICE: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    Ok(read_array::<1>(r)?[0])
}

/// Read exactly `len` bytes, growing the buffer as data arrives, so a peer that announces a
/// large length and then sends nothing cannot make us allocate it up front.
fn read_bytes(r: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(len).read_to_end(&mut buf)?;
    if (buf.len() as u64) < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

fn put_value(buf: &mut Vec<u8>, value: &[u8]) {
    buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    buf.extend_from_slice(value);
}

// ---- Server ----

/// One decoded request.
enum Request {
    Set(String, Vec<u8>),
    SetIfAbsent(String, Vec<u8>),
    Get(String, Duration),
    TryGet(String),
    Add(String, i64),
    Delete(String),
}

/// Why a frame could not be read.
enum FrameError {
    /// The peer broke the protocol; tell it why, then close.
    Bad(String),
    /// The connection failed or closed mid-frame.
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

fn read_key(r: &mut impl Read) -> Result<String, FrameError> {
    let len = u32::from_le_bytes(read_array(r)?) as usize;
    if len > MAX_KEY_LEN {
        return Err(FrameError::Bad(format!(
            "key of {len} bytes exceeds the {MAX_KEY_LEN}-byte limit"
        )));
    }
    let bytes = read_bytes(r, len as u64)?;
    String::from_utf8(bytes).map_err(|_| FrameError::Bad("key is not valid UTF-8".into()))
}

fn read_value(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let len = u64::from_le_bytes(read_array(r)?);
    if len > MAX_VALUE_LEN {
        return Err(FrameError::Bad(format!(
            "value of {len} bytes exceeds the {MAX_VALUE_LEN}-byte limit"
        )));
    }
    Ok(read_bytes(r, len)?)
}

/// Read the rest of a request whose op byte was `op`.
fn read_request(op: u8, r: &mut impl Read) -> Result<Request, FrameError> {
    if !(OP_SET..=OP_DELETE).contains(&op) {
        return Err(FrameError::Bad(format!("unknown op code {op}")));
    }
    let key = read_key(r)?;
    Ok(match op {
        OP_SET => Request::Set(key, read_value(r)?),
        OP_SET_IF_ABSENT => Request::SetIfAbsent(key, read_value(r)?),
        OP_GET => Request::Get(key, Duration::from_millis(u64::from_le_bytes(read_array(r)?))),
        OP_TRY_GET => Request::TryGet(key),
        OP_ADD => Request::Add(key, i64::from_le_bytes(read_array(r)?)),
        _ => Request::Delete(key),
    })
}

fn error_reply(msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_ERROR_LEN)];
    let mut buf = vec![STATUS_ERROR];
    buf.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    buf.extend_from_slice(msg);
    buf
}

fn value_reply(value: &[u8]) -> Vec<u8> {
    let mut buf = vec![STATUS_OK];
    put_value(&mut buf, value);
    buf
}

/// State shared by the accept thread, the connection threads and the server handle.
#[derive(Debug)]
struct Shared {
    /// `None`: unauthenticated (GANTRY_INSECURE_NO_AUTH); clients must then have no secret either.
    auth: Option<JobAuth>,
    refusals: Refusals,
    store: MemStore,
    shutdown: AtomicBool,
    /// Clones of open connections, so shutdown can close them; keyed by connection id.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

impl Shared {
    /// Whether the client on `stream` has hung up (EOF) or the connection failed. Used while a
    /// `get` waits: the client sends nothing then, so readable-with-EOF means it is gone.
    fn hung_up(stream: &TcpStream) -> bool {
        if stream.set_nonblocking(true).is_err() {
            return true;
        }
        let gone = match stream.peek(&mut [0u8; 1]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        };
        stream.set_nonblocking(false).is_err() || gone
    }

    /// Answer one request; `None` means drop the connection without a reply.
    fn handle(&self, req: Request, stream: &TcpStream) -> Option<Vec<u8>> {
        let result = match req {
            Request::Set(key, value) => self.store.set(&key, &value).map(|()| vec![STATUS_OK]),
            Request::SetIfAbsent(key, value) => self.store.set_if_absent(&key, &value).map(|v| value_reply(&v)),
            Request::Get(key, timeout) => return self.wait_get(&key, timeout, stream),
            Request::TryGet(key) => self.store.try_get(&key).map(|v| match v {
                Some(v) => {
                    let mut buf = vec![STATUS_OK, 1];
                    put_value(&mut buf, &v);
                    buf
                }
                None => vec![STATUS_OK, 0],
            }),
            Request::Add(key, delta) => self.store.add(&key, delta).map(|n| {
                let mut buf = vec![STATUS_OK];
                buf.extend_from_slice(&n.to_le_bytes());
                buf
            }),
            Request::Delete(key) => self.store.delete(&key).map(|()| vec![STATUS_OK]),
        };
        Some(result.unwrap_or_else(|e| error_reply(&e.to_string())))
    }

    /// Wait for `key` in short slices so that shutdown and client hang-up end the wait.
    fn wait_get(&self, key: &str, timeout: Duration, stream: &TcpStream) -> Option<Vec<u8>> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
                None => WAIT_SLICE,
            };
            match self.store.get(key, slice) {
                Ok(value) => return Some(value_reply(&value)),
                Err(StoreError::Timeout { .. }) => {}
                Err(e) => return Some(error_reply(&e.to_string())),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Some(vec![STATUS_TIMEOUT]);
            }
            if self.shutdown.load(Ordering::SeqCst) || Self::hung_up(stream) {
                return None;
            }
        }
    }

    /// Serve one connection until it closes, fails or sends a bad frame.
    fn serve(&self, stream: &TcpStream, peer: SocketAddr) {
        let mut reader = BufReader::new(stream);
        let mut writer = stream;
        loop {
            let op = match read_u8(&mut reader) {
                Ok(op) => op,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "rendezvous store connection failed");
                    return;
                }
            };
            let reply = match read_request(op, &mut reader) {
                Ok(req) => self.handle(req, stream),
                Err(FrameError::Bad(msg)) => {
                    tracing::warn!(%peer, "rendezvous store: bad frame, closing connection: {msg}");
                    let _ = writer.write_all(&error_reply(&msg));
                    return;
                }
                Err(FrameError::Io(e)) => {
                    tracing::warn!(%peer, error = %e, "rendezvous store: connection ended mid-frame");
                    return;
                }
            };
            let Some(reply) = reply else { return };
            if let Err(e) = writer.write_all(&reply) {
                tracing::debug!(%peer, error = %e, "rendezvous store: cannot send reply");
                return;
            }
        }
    }

    /// Register a connection, serve it, unregister it.
    fn run_connection(&self, stream: TcpStream, peer: SocketAddr) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(clone) => {
                lock(&self.conns).insert(id, clone);
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "rendezvous store: cannot register connection");
                return;
            }
        }
        // Checked after registering: shutdown either sees this connection or we see its flag.
        if !self.shutdown.load(Ordering::SeqCst) {
            let _ = stream.set_nodelay(true);
            let server = Server {
                auth: self.auth.as_ref(),
                channel: Channel::Store,
                me: Party::Store,
            };
            // Nothing of a request is read before the peer proved it belongs to the job.
            match handshake::serve(&stream, server, Instant::now() + ACCEPT_TIMEOUT) {
                Ok(accepted) => {
                    tracing::debug!(%peer, client = %accepted.client, "rendezvous store: connection authenticated");
                    self.serve(&stream, peer);
                }
                Err(e) => {
                    self.refusals.refuse("rendezvous store", peer, &e);
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
        lock(&self.conns).remove(&id);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "rendezvous store: accept failed");
                thread::sleep(RETRY_INTERVAL);
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("gantry-store-conn".into())
            .spawn(move || shared.run_connection(stream, peer));
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "rendezvous store: cannot spawn connection thread");
        }
    }
}

/// Address a client on this machine can use to reach a socket bound to `addr`.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => (Ipv6Addr::LOCALHOST, a.port()).into(),
        other => other,
    }
}

/// The rendezvous store server. Serves until dropped (or [`StoreServer::shutdown`]).
#[derive(Debug)]
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Bind `addr` (port 0 picks a free port) and start serving on background threads, to
    /// clients that prove they hold `auth`'s secret (`None`: to clients without a secret).
    pub fn bind(addr: impl ToSocketAddrs, auth: Option<JobAuth>) -> Result<StoreServer, StoreError> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let listener = TcpListener::bind(&addrs[..])
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind rendezvous store at {addrs:?}: {e}")))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            auth,
            refusals: Refusals::default(),
            store: MemStore::default(),
            shutdown: AtomicBool::new(false),
            conns: Mutex::default(),
            next_id: AtomicU64::new(0),
        });
        let accept_thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("gantry-store-accept".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        tracing::debug!(%addr, "rendezvous store listening");
        Ok(StoreServer {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections closed because they failed the handshake, so far.
    pub fn refused_connections(&self) -> u64 {
        self.shared.refusals.count()
    }

    /// Stop accepting, close every open connection and end waiting `get`s (their clients see
    /// an I/O error). Idempotent; also done on drop.
    pub fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Wake the blocked `accept` with a connection of our own. If that fails, leave the
        // thread detached rather than risk hanging here; it exits on the next connection.
        if TcpStream::connect_timeout(&connectable(self.addr), Duration::from_secs(1)).is_ok() {
            let _ = accept_thread.join();
        }
        for conn in lock(&self.shared.conns).values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---- Client ----

/// One connection attempt to every address `addr` resolves to, in order.
fn open(addr: &str, limit: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, limit.max(Duration::from_millis(1))) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A [`Store`] client of a [`StoreServer`]: one connection, one request at a time.
#[derive(Debug)]
pub struct TcpStore {
    addr: String,
    /// `None` after an error: the next request reconnects.
    conn: Mutex<Option<TcpStream>>,
    /// What every (re)connection proves, and as whom.
    auth: Option<JobAuth>,
    me: Party,
}

/// Why one connection attempt failed: the server is not there (yet), or it is but the
/// handshake failed, which no retry mends.
enum Attempt {
    Unreachable(io::Error),
    Refused(StoreError),
}

/// A reply that is not an error.
enum Reply<T> {
    Ok(T),
    Timeout,
}

impl TcpStore {
    /// Connect to the server at `addr` ("host:port") as `me`, proving `auth`'s secret
    /// (`None`: without one), retrying every ~50 ms until the server is up or `timeout`
    /// passes (then [`StoreError::Connect`]). A failed handshake is not retried
    /// ([`StoreError::Auth`]).
    pub fn connect(addr: &str, timeout: Duration, auth: Option<JobAuth>, me: Party) -> Result<TcpStore, StoreError> {
        let store = TcpStore {
            addr: addr.to_owned(),
            conn: Mutex::new(None),
            auth,
            me,
        };
        // `None` when the timeout is too large to represent: retry forever.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            match store.open_authenticated(left.min(Duration::from_secs(5))) {
                Ok(stream) => {
                    *lock(&store.conn) = Some(stream);
                    return Ok(store);
                }
                Err(Attempt::Refused(e)) => return Err(e),
                Err(Attempt::Unreachable(source)) if left.is_zero() => {
                    return Err(StoreError::Connect {
                        addr: addr.to_owned(),
                        source,
                    });
                }
                Err(Attempt::Unreachable(_)) => thread::sleep(RETRY_INTERVAL.min(left)),
            }
        }
    }

    /// One connection attempt, then the handshake. A handshake that fails on the connection
    /// itself (a time-out) counts as unreachable; one that fails on a proof is final.
    fn open_authenticated(&self, limit: Duration) -> Result<TcpStream, Attempt> {
        let stream = open(&self.addr, limit).map_err(Attempt::Unreachable)?;
        let client = Client {
            auth: self.auth.as_ref(),
            channel: Channel::Store,
            me: self.me,
            peer: Party::Store,
            key: "",
        };
        match handshake::dial(&stream, client, Instant::now() + DIAL_TIMEOUT) {
            Ok(()) => {
                stream
                    .set_write_timeout(Some(IO_TIMEOUT))
                    .map_err(Attempt::Unreachable)?;
                Ok(stream)
            }
            Err(crate::auth::handshake::HandshakeError::Io(e)) => Err(Attempt::Unreachable(e)),
            Err(reason) => Err(Attempt::Refused(StoreError::Auth {
                addr: self.addr.clone(),
                reason,
            })),
        }
    }

    /// Send one request and read its reply status; `parse` reads an OK payload. `wait` is the
    /// server-side wait of a `get`, which lengthens the read timeout.
    fn call<T>(
        &self,
        request: &[u8],
        wait: Option<Duration>,
        parse: impl FnOnce(&mut TcpStream) -> Result<T, StoreError>,
    ) -> Result<Reply<T>, StoreError> {
        let mut guard = match self.conn.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                // A panic mid-request may have left a reply unread: start afresh.
                let mut guard = poisoned.into_inner();
                *guard = None;
                self.conn.clear_poison();
                guard
            }
        };
        if guard.is_none() {
            let stream = self
                .open_authenticated(Duration::from_secs(5))
                .map_err(|failed| match failed {
                    Attempt::Unreachable(source) => StoreError::Connect {
                        addr: self.addr.clone(),
                        source,
                    },
                    Attempt::Refused(e) => e,
                })?;
            *guard = Some(stream);
        }
        let Some(stream) = guard.as_mut() else {
            return Err(StoreError::Protocol("no connection".into()));
        };
        let read_timeout = match wait {
            Some(w) => w.checked_add(GET_SLACK),
            None => Some(IO_TIMEOUT),
        };
        let result = (|| {
            stream.set_read_timeout(read_timeout)?;
            stream.write_all(request)?;
            match read_u8(stream)? {
                STATUS_OK => parse(stream).map(Reply::Ok),
                STATUS_TIMEOUT if wait.is_some() => Ok(Reply::Timeout),
                STATUS_ERROR => {
                    let len = u32::from_le_bytes(read_array(stream)?) as usize;
                    if len > MAX_ERROR_LEN {
                        return Err(StoreError::Protocol("oversized error reply".into()));
                    }
                    let msg = read_bytes(stream, len as u64)?;
                    Err(StoreError::Protocol(String::from_utf8_lossy(&msg).into_owned()))
                }
                status => Err(StoreError::Protocol(format!("unexpected reply status {status}"))),
            }
        })();
        if result.is_err() {
            // The server may have closed, or a reply may be half-read: never reuse the stream.
            *guard = None;
        }
        result
    }

    /// Encode a request: op, key, then the optional value and the fixed-size `tail`. Sizes
    /// are checked here, so the server never has to refuse a frame from this client.
    fn frame(op: u8, key: &str, value: Option<&[u8]>, tail: &[u8]) -> Result<Vec<u8>, StoreError> {
        let value_len = value.map_or(0, <[u8]>::len);
        if key.len() > MAX_KEY_LEN || value_len as u64 > MAX_VALUE_LEN {
            return Err(StoreError::Protocol(format!(
                "key of {} bytes or value of {value_len} bytes exceeds the limits \
                 ({MAX_KEY_LEN} and {MAX_VALUE_LEN} bytes)",
                key.len()
            )));
        }
        let mut buf = Vec::with_capacity(1 + 4 + key.len() + 8 + value_len + tail.len());
        buf.push(op);
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        if let Some(value) = value {
            put_value(&mut buf, value);
        }
        buf.extend_from_slice(tail);
        Ok(buf)
    }

    /// Expect an OK reply, for requests that cannot time out.
    fn call_ok<T>(
        &self,
        request: &[u8],
        parse: impl FnOnce(&mut TcpStream) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self.call(request, None, parse)? {
            Reply::Ok(v) => Ok(v),
            Reply::Timeout => Err(StoreError::Protocol("unexpected timeout reply".into())),
        }
    }
}

fn parse_value(r: &mut TcpStream) -> Result<Vec<u8>, StoreError> {
    let len = u64::from_le_bytes(read_array(r)?);
    if len > MAX_VALUE_LEN {
        return Err(StoreError::Protocol(format!("oversized value in reply ({len} bytes)")));
    }
    Ok(read_bytes(r, len)?)
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call_ok(&Self::frame(OP_SET, key, Some(value), &[])?, |_| Ok(()))
    }

    fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let req = Self::frame(OP_SET_IF_ABSENT, key, Some(value), &[])?;
        self.call_ok(&req, parse_value)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let req = Self::frame(OP_GET, key, None, &millis.to_le_bytes())?;
        match self.call(&req, Some(timeout), parse_value)? {
            Reply::Ok(value) => Ok(value),
            Reply::Timeout => Err(StoreError::Timeout {
                key: key.to_owned(),
                waited: timeout,
            }),
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.call_ok(&Self::frame(OP_TRY_GET, key, None, &[])?, |r| match read_u8(r)? {
            0 => Ok(None),
            1 => parse_value(r).map(Some),
            b => Err(StoreError::Protocol(format!("bad presence flag {b}"))),
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let req = Self::frame(OP_ADD, key, None, &delta.to_le_bytes())?;
        self.call_ok(&req, |r| Ok(i64::from_le_bytes(read_array(r)?)))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call_ok(&Self::frame(OP_DELETE, key, None, &[])?, |_| Ok(()))
    }
}

/// Rendezvous like torchrun: rank 0 hosts the store at `addr` ("host:port", port "0" for any
/// free port) and every rank, rank 0 included, gets a connected client; every connection
/// proves `auth`'s secret (`None`: none has one).
pub fn serve_or_connect(
    rank: usize,
    addr: &str,
    timeout: Duration,
    auth: Option<JobAuth>,
) -> Result<(Option<StoreServer>, TcpStore), StoreError> {
    if rank == 0 {
        let server = StoreServer::bind(addr, auth.clone())?;
        let client = TcpStore::connect(
            &connectable(server.local_addr()).to_string(),
            timeout,
            auth,
            Party::rank(0),
        )?;
        return Ok((Some(server), client));
    }
    if addr.rsplit_once(':').is_some_and(|(_, port)| port == "0") {
        return Err(StoreError::Connect {
            addr: addr.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "port 0 only lets rank 0 pick a port; other ranks need the real one",
            ),
        });
    }
    Ok((None, TcpStore::connect(addr, timeout, auth, Party::rank(rank))?))
}
