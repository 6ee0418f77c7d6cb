//! TCP links: one connection per peer pair and communicator, TCP_NODELAY, large socket
//! buffers, nonblocking I/O driven by [`crate::transport::MeshTransport`].
//!
//! Connection set-up: every process runs one [`Acceptor`] (a listener thread). For each pair
//! the higher global rank connects to the lower one's advertised address and runs the data
//! plane's handshake ([`crate::auth::handshake`], channel `Link`: both ranks prove they hold
//! the job's secret; the hello names the connecting rank and the communicator key); the
//! acceptor files an authenticated stream under (key, rank) until the lower rank asks for it,
//! and closes, logs and counts any other. Small reads go through a 64 KiB buffer (one
//! syscall for a header and its payload); large reads land directly in the destination.

use crate::auth::binding::Ends;
use crate::auth::handshake::{Channel, Client, HandshakeError, MAX_KEY_LEN, Server};
use crate::auth::stream::{self as handshake, ACCEPT_TIMEOUT, DIAL_TIMEOUT, Refusals};
use crate::auth::{JobAuth, Party};
use crate::error::LinkError;
use crate::filed::Filed;
use crate::link::{Interest, Link, LinkKind};
use crate::tls::{self, Role, TlsIdentity};
use socket2::SockRef;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const READ_BUF: usize = 64 * 1024;
/// Socket buffer size asked of the kernel (it may grant less, or double it).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

pub struct TcpLink {
    stream: TcpStream,
    /// 8-byte aligned read buffer; refills start at the stream position modulo 8 so aligned
    /// data in the stream stays aligned in memory.
    rbuf: Box<[u64]>,
    rstart: usize,
    rend: usize,
    /// Bytes delivered to callers so far.
    delivered: u64,
}

impl TcpLink {
    pub fn new(stream: TcpStream) -> io::Result<TcpLink> {
        tune(&stream)?;
        stream.set_nonblocking(true)?;
        Ok(TcpLink {
            stream,
            rbuf: vec![0u64; READ_BUF / 8 + 1].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            delivered: 0,
        })
    }
}

/// No Nagle delay and large socket buffers: what every link over a TCP socket wants.
pub(crate) fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    // Best effort: a kernel limit below this is not an error.
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    Ok(())
}

/// A socket error as a link error: a peer that went away is [`LinkError::Closed`].
pub(crate) fn io_to_link(e: io::Error) -> LinkError {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
            LinkError::Closed
        }
        _ => LinkError::Io(e),
    }
}

fn nonblocking<T>(r: io::Result<T>, zero: T) -> Result<T, LinkError> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(zero),
        Err(e) => Err(io_to_link(e)),
    }
}

impl TcpLink {
    fn buffered(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.rbuf)[self.rstart..self.rend]
    }

    fn consume(&mut self, n: usize) {
        self.rstart += n;
        self.delivered += n as u64;
    }

    /// Read what the socket has into the (empty) buffer; `false` when it has nothing yet.
    fn refill(&mut self) -> Result<bool, LinkError> {
        let shift = (self.delivered % 8) as usize;
        let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.rbuf)[shift..shift + READ_BUF];
        match nonblocking((&self.stream).read(bytes), usize::MAX)? {
            usize::MAX => Ok(false),
            0 => Err(LinkError::Closed),
            got => {
                self.rstart = shift;
                self.rend = shift + got;
                Ok(true)
            }
        }
    }
}

impl Link for TcpLink {
    fn kind(&self) -> LinkKind {
        LinkKind::Tcp
    }

    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
        if data.is_empty() {
            return Ok(0);
        }
        nonblocking((&self.stream).write(data), 0)
    }

    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.rstart == self.rend && buf.len() >= READ_BUF {
            // Large reads land directly in the destination.
            let n = match nonblocking((&self.stream).read(buf), usize::MAX)? {
                usize::MAX => return Ok(0),
                0 => return Err(LinkError::Closed),
                n => n,
            };
            self.delivered += n as u64;
            return Ok(n);
        }
        if self.rstart == self.rend && !self.refill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.rend - self.rstart);
        buf[..n].copy_from_slice(&self.buffered()[..n]);
        self.consume(n);
        Ok(n)
    }

    fn try_read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        if self.rstart == self.rend && !self.refill()? {
            return Ok(0);
        }
        let n = max.min(self.rend - self.rstart);
        sink(&self.buffered()[..n]);
        self.consume(n);
        Ok(n)
    }

    fn wait(&self, interest: Interest, timeout: Duration) {
        if interest.read && self.rstart < self.rend {
            return;
        }
        let mut events = 0;
        if interest.read {
            events |= libc::POLLIN;
        }
        if interest.write {
            events |= libc::POLLOUT;
        }
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    fn poll_fd(&self) -> Option<RawFd> {
        // Buffered bytes would not wake poll; report no fd so the caller does not sleep on them.
        (self.rstart == self.rend).then(|| self.stream.as_raw_fd())
    }

    fn abort(&mut self, _culprit: Option<usize>, _reason: &str) {
        // TCP has no side channel here: the peer sees the connection close and looks up the
        // reason in the rendezvous store, where the communicator published it first.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// An authenticated connection a listener filed for the rank that will take it.
pub enum Incoming {
    Plain(TcpStream),
    /// TLS and its channel binding done on the listener's handshake thread, so the dialling
    /// rank never waits for this rank to reach the link (lazy links are made in different
    /// orders on different ranks; a dial that needed the lower rank's attention could wait on
    /// a cycle of ranks each dialling the next).
    Tls(Box<crate::tls::TlsLink>),
}

/// This process's listener for incoming peer connections.
pub struct Acceptor {
    addr: SocketAddr,
    pending: Arc<Filed<Incoming>>,
    stop: Arc<AtomicBool>,
    refusals: Arc<Refusals>,
    thread: Option<JoinHandle<()>>,
}

/// What every handshake thread of one acceptor needs.
struct Listening {
    pending: Arc<Filed<Incoming>>,
    refusals: Arc<Refusals>,
    /// `None`: peers must have no secret either (GANTRY_INSECURE_NO_AUTH).
    auth: Option<JobAuth>,
    me: usize,
    /// Set when every connection to this listener carries TLS after the handshake.
    tls: Option<TlsIdentity>,
}

impl Acceptor {
    /// Listen on `addr` for the peers of global rank `me`; each must prove `auth`'s secret,
    /// and with `tls`, run TLS and bind it to the secret before it is filed.
    pub fn bind(
        addr: impl ToSocketAddrs,
        me: usize,
        auth: Option<JobAuth>,
        tls: Option<TlsIdentity>,
    ) -> io::Result<Acceptor> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let pending: Arc<Filed<Incoming>> = Arc::default();
        let refusals = Arc::new(Refusals::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let listening = Arc::new(Listening {
                pending: pending.clone(),
                refusals: refusals.clone(),
                auth,
                me,
                tls,
            });
            std::thread::Builder::new()
                .name("gantry-accept".into())
                .spawn(move || accept_loop(listener, listening, stop))?
        };
        Ok(Acceptor {
            addr,
            pending,
            stop,
            refusals,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections closed because they failed the handshake, so far.
    pub fn refused_connections(&self) -> u64 {
        self.refusals.count()
    }

    /// Wait for `peer` to connect for communicator `key`.
    pub fn take(&self, key: &str, peer: usize, deadline: Instant) -> Result<Incoming, LinkError> {
        self.pending.take(key, peer, deadline, "")
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, listening: Arc<Listening>, stop: Arc<AtomicBool>) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, peer)) = accepted else { continue };
        let listening = listening.clone();
        // The handshake runs off the accept thread so a silent client cannot block others.
        let _ = std::thread::Builder::new()
            .name("gantry-handshake".into())
            .spawn(move || listening.handshake(stream, peer));
    }
}

impl Listening {
    /// File an authenticated stream for the rank that will ask for it; close anything else.
    /// A refusal is logged and counted, never reported as a failure of a rank: the rank the
    /// stream claimed to come from is whoever the peer said, and it proved nothing.
    fn handshake(&self, stream: TcpStream, peer: SocketAddr) {
        let server = Server {
            auth: self.auth.as_ref(),
            channel: Channel::Link,
            me: Party::rank(self.me),
        };
        match handshake::serve(&stream, server, Instant::now() + ACCEPT_TIMEOUT) {
            Ok(accepted) => {
                let Party::Rank(rank) = accepted.client else {
                    // `Server::challenge` admits only ranks to a link; be safe anyway.
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                };
                let incoming = match &self.tls {
                    None => Incoming::Plain(stream),
                    Some(identity) => {
                        let ends = Ends {
                            client: rank as usize,
                            server: self.me,
                            key: &accepted.key,
                        };
                        let deadline = Instant::now() + ACCEPT_TIMEOUT;
                        match tls::secure(stream, identity, Role::Server, ends, self.auth.as_ref(), deadline) {
                            Ok(link) => Incoming::Tls(Box::new(link)),
                            Err(e) => {
                                let listener = format!("rank {}'s link listener (TLS)", self.me);
                                self.refusals.refuse(&listener, peer, &e);
                                return;
                            }
                        }
                    }
                };
                self.pending.file(accepted.key, rank as usize, incoming);
            }
            Err(e) => {
                let listener = format!("rank {}'s link listener", self.me);
                self.refusals.refuse(&listener, peer, &e);
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Refuse a communicator key longer than the handshake's hello can carry, before dialling;
/// `transport` names the handshake in the message.
pub(crate) fn check_key(key: &str, transport: &str) -> Result<(), LinkError> {
    if key.len() > MAX_KEY_LEN {
        return Err(LinkError::Protocol(format!(
            "communicator key is {} bytes, the {transport} handshake allows {MAX_KEY_LEN}: `{key:.64}…`",
            key.len()
        )));
    }
    Ok(())
}

/// Connect to global rank `peer` at `addr` (retrying until `deadline`: the peer may still be
/// starting) as global rank `me`, for communicator `key`, and prove `auth`'s secret. A peer
/// that does not answer the handshake in time is retried like one that is not listening
/// yet; one whose proof or verdict fails is an [`LinkError::Auth`], which blames nobody.
pub fn connect(
    addr: &str,
    key: &str,
    me: usize,
    peer: usize,
    auth: Option<&JobAuth>,
    deadline: Instant,
) -> Result<TcpStream, LinkError> {
    check_key(key, "TCP")?;
    let mut last_err = None;
    while Instant::now() < deadline {
        let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                return Err(LinkError::Io(io::Error::new(
                    e.kind(),
                    format!("bad peer address `{addr}`: {e}"),
                )));
            }
        };
        for sa in addrs {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let s = match TcpStream::connect_timeout(&sa, left.min(Duration::from_secs(5))) {
                Ok(s) => s,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let client = Client {
                auth,
                channel: Channel::Link,
                me: Party::rank(me),
                peer: Party::rank(peer),
                key,
            };
            let by = deadline.min(Instant::now() + DIAL_TIMEOUT);
            match handshake::dial(&s, client, by) {
                Ok(()) => return Ok(s),
                Err(HandshakeError::Io(e)) => last_err = Some(e),
                Err(e) => {
                    return Err(LinkError::Auth(format!(
                        "the link to rank {peer} at {addr} (`{key}`): {e}"
                    )));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(LinkError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "could not connect to {addr}: {}",
            last_err.map_or("timed out".into(), |e| e.to_string())
        ),
    )))
}
