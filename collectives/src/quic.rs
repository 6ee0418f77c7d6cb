//! QUIC links (quinn) for traffic that leaves a host: every byte encrypted and authenticated by
//! TLS 1.3 inside QUIC, no head-of-line blocking on a lost TCP segment, and congestion control
//! that lives in this process rather than in the kernel.
//!
//! One [`QuicEndpoint`] per process: one UDP socket that dials and accepts every QUIC link,
//! driven by a small tokio runtime it owns (two `gantry-quic` threads). One QUIC connection per
//! communicator and pair of ranks, one bidirectional stream on it. As for TCP, the higher
//! global rank dials; on the stream it runs the data plane's handshake
//! ([`crate::auth::handshake`], so the listener files the stream under its communicator and
//! rank exactly as [`crate::tcp::Acceptor`] does), then both sides bind the QUIC session to the
//! job secret ([`crate::auth::binding`], as [`crate::tls`] does): the certificates are the
//! throwaway ones of [`TlsIdentity`], and the binding tag is what proves the peer holds the
//! secret. A connection that fails either is closed, logged with its address and counted
//! ([`QuicEndpoint::refused_connections`]), never blamed on a rank.
//!
//! After that, [`QuicLink`] bridges the nonblocking [`crate::link::Link`] calls to the async
//! streams (`quic/pipe.rs`): a writer task drains a bounded outbox into the send stream, a
//! reader task fills a bounded inbox from the receive stream, and two eventfds tell a waiting
//! rank when bytes came in or room came free.
//!
//! Deadlines are [`crate::transport::MeshTransport`]'s; QUIC's own idle timeout only notices a
//! peer that vanished without a word (keep-alives hold an idle link open).

mod pipe;
#[cfg(test)]
mod tests;

pub use pipe::QuicLink;

use crate::auth::binding::{self, EXPORTER_LABEL, EXPORTER_LEN, Ends};
use crate::auth::handshake::{
    ACCEPTED, Accepted, CHALLENGE_LEN, Challenge, Channel, Client, Direction, HELLO_HEAD, HandshakeError, Hello,
    MAC_LEN, MAGIC, NONCE_LEN, Nonce, PROOF_LEN, Server,
};
use crate::auth::stream::{ACCEPT_TIMEOUT, DIAL_TIMEOUT, Refusals};
use crate::auth::{JobAuth, Party};
use crate::error::LinkError;
use crate::filed::Filed;
use crate::tls::TlsIdentity;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ConnectionError, IdleTimeout, MtuDiscoveryConfig, ReadError, ReadExactError, RecvStream, SendStream,
    TransportConfig, VarInt, WriteError,
};
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// The server name every client asks for; the certificates are throwaway, nobody checks it.
const SERVER_NAME: &str = "gantry-rank";
/// Both ends insist on it, so a QUIC client that is not a gantry rank fails the TLS handshake.
const ALPN: &[u8] = b"gantry-link/1";
/// Flow-control windows: large enough that a bulk transfer is bound by the path, not by
/// waiting for window updates (64 MiB per stream covers 1 GB/s at 50 ms RTT).
const STREAM_WINDOW: u32 = 64 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
const SEND_WINDOW: u64 = 64 << 20;
/// How often an idle link proves it is alive, and how long silence means the peer is gone.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest UDP payload MTU discovery probes for, and the largest we tell peers we receive.
/// Paths start at QUIC's safe 1200 bytes and climb only as far as probes get through, so this
/// is a ceiling, not a guess about the path. Bigger packets are much faster (on loopback, 6000
/// moves about twice the bytes of 1452). It must stay under 65507 / 10: quinn hands the kernel
/// up to 10 packets as one segmentation-offload datagram, which may not pass 64 KiB, and every
/// larger send fails, so the connection stalls (seen on loopback at 7000).
pub(crate) const MTU_CEILING: u16 = 6000;
const _: () = assert!(MTU_CEILING as usize * 10 <= 65_507);
/// Socket buffers asked of the kernel (best effort): bursts of a fast sender must not overflow.
const UDP_BUFFER_BYTES: usize = 8 << 20;
/// How long a closing process waits for its connections to deliver what was written and
/// say goodbye before its runtime stops.
const GRACE: Duration = Duration::from_secs(1);

/// QUIC application close codes: why a connection ended.
pub(crate) const CLOSE_DONE: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
/// The peer aborted; the reason carries the rank it blames (see `pipe`).
pub(crate) const CLOSE_ABORT: u32 = 2;

/// What the runtime threads and every link of this process share. The runtime stops when
/// the endpoint and its last link are gone.
struct Core {
    runtime: Option<Runtime>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
}

impl Core {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until Core is dropped")
            .handle()
    }

    /// Run `fut` on the runtime and block this (non-async) thread for its result.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T, LinkError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| LinkError::Protocol("the QUIC runtime stopped".into()))
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else { return };
        // `block_on` would panic inside another runtime; there we skip the grace period.
        if tokio::runtime::Handle::try_current().is_err() {
            let endpoint = self.endpoint.clone();
            runtime.block_on(async move {
                // Links that were dropped finish sending in the background; let them.
                let _ = tokio::time::timeout(GRACE, endpoint.wait_idle()).await;
                endpoint.close(VarInt::from_u32(CLOSE_DONE), b"process done");
                // Give the connections a moment to send the close, so peers need not time out.
                let _ = tokio::time::timeout(Duration::from_millis(50), endpoint.wait_idle()).await;
            });
        }
        runtime.shutdown_background();
    }
}

/// An authenticated connection and its stream, as the handshake leaves them.
pub(crate) struct Parts {
    pub(crate) conn: quinn::Connection,
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
}

/// What every accepting task of one endpoint needs.
struct Listening {
    pending: Arc<Filed<Parts>>,
    refusals: Arc<Refusals>,
    auth: Option<JobAuth>,
    me: usize,
}

/// This process's QUIC endpoint: one UDP socket that dials and accepts every QUIC link.
pub struct QuicEndpoint {
    addr: SocketAddr,
    core: Arc<Core>,
    pending: Arc<Filed<Parts>>,
    refusals: Arc<Refusals>,
    accept_task: tokio::task::JoinHandle<()>,
}

fn io_other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// The transport parameters of every gantry QUIC connection.
fn transport_config(mtu_ceiling: u16) -> Result<TransportConfig, io::Error> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        // A link is one stream the dialler opens; nobody needs more.
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| io_other("QUIC idle timeout", e))?,
        ));
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(mtu_ceiling);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// QUIC's client and server configurations around `identity`'s TLS ones.
fn quic_configs(identity: &TlsIdentity, mtu_ceiling: u16) -> io::Result<(quinn::ClientConfig, quinn::ServerConfig)> {
    let transport = Arc::new(transport_config(mtu_ceiling)?);
    let mut tls_client = (*identity.client).clone();
    tls_client.alpn_protocols = vec![ALPN.to_vec()];
    let mut tls_server = (*identity.server).clone();
    tls_server.alpn_protocols = vec![ALPN.to_vec()];
    let crypto_client =
        QuicClientConfig::try_from(Arc::new(tls_client)).map_err(|e| io_other("QUIC client TLS configuration", e))?;
    let crypto_server =
        QuicServerConfig::try_from(Arc::new(tls_server)).map_err(|e| io_other("QUIC server TLS configuration", e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto_client));
    client.transport_config(transport.clone());
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto_server));
    server.transport_config(transport);
    Ok((client, server))
}

fn resolve(addr: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("bad QUIC address `{addr}`: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("QUIC address `{addr}` resolves to nothing"),
        ));
    }
    Ok(addrs)
}

impl QuicEndpoint {
    /// Bind UDP on `addr` (`ip:port`, port 0 = any) for global rank `me`.
    pub fn bind(addr: &str, me: usize, auth: Option<JobAuth>, identity: TlsIdentity) -> io::Result<QuicEndpoint> {
        Self::bind_with_mtu(addr, me, auth, &identity, MTU_CEILING)
    }

    /// [`QuicEndpoint::bind`] with another ceiling for MTU discovery (measurements).
    pub(crate) fn bind_with_mtu(
        addr: &str,
        me: usize,
        auth: Option<JobAuth>,
        identity: &TlsIdentity,
        mtu_ceiling: u16,
    ) -> io::Result<QuicEndpoint> {
        let (client, server) = quic_configs(identity, mtu_ceiling)?;
        let at = resolve(addr)?[0];
        let socket = UdpSocket::bind(at).map_err(|e| io::Error::new(e.kind(), format!("QUIC bind {at}: {e}")))?;
        let sock = socket2::SockRef::from(&socket);
        // Best effort: a kernel limit below this is not an error.
        let _ = sock.set_recv_buffer_size(UDP_BUFFER_BYTES);
        let _ = sock.set_send_buffer_size(UDP_BUFFER_BYTES);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gantry-quic")
            .enable_all()
            .build()?;
        let endpoint = {
            let _entered = runtime.enter();
            let mut config = quinn::EndpointConfig::default();
            // What we tell peers we can receive; MTU discovery never climbs past it.
            config
                .max_udp_payload_size(mtu_ceiling)
                .map_err(|e| io_other("QUIC MTU ceiling", e))?;
            quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))?
        };
        let addr = endpoint.local_addr()?;
        let pending: Arc<Filed<Parts>> = Arc::default();
        let refusals = Arc::new(Refusals::default());
        let listening = Arc::new(Listening {
            pending: pending.clone(),
            refusals: refusals.clone(),
            auth,
            me,
        });
        let accept_task = runtime.spawn(accept_loop(endpoint.clone(), listening));
        Ok(QuicEndpoint {
            addr,
            core: Arc::new(Core {
                runtime: Some(runtime),
                endpoint,
                client,
            }),
            pending,
            refusals,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections closed because they failed the handshake or the session binding, so far.
    pub fn refused_connections(&self) -> u64 {
        self.refusals.count()
    }

    /// Dial rank `peer` at `addr` (`host:port` of its endpoint) as rank `me` for `key`,
    /// retrying until `deadline` (the peer may still be starting). A peer whose proof, verdict
    /// or session binding fails is an [`LinkError::Auth`], which blames nobody.
    pub fn dial(
        &self,
        addr: &str,
        key: &str,
        me: usize,
        peer: usize,
        auth: Option<&JobAuth>,
        deadline: Instant,
    ) -> Result<QuicLink, LinkError> {
        crate::tcp::check_key(key, "QUIC")?;
        let dialing = Dialing {
            endpoint: self.core.endpoint.clone(),
            config: self.core.client.clone(),
            addrs: resolve(addr)?,
            addr: addr.to_string(),
            key: key.to_string(),
            me,
            peer,
            auth: auth.cloned(),
        };
        let parts = self.core.run(dialing.until(deadline))??;
        QuicLink::start(self.core.clone(), parts)
    }

    /// Wait for rank `peer` to dial us for `key`.
    pub fn take(&self, key: &str, peer: usize, deadline: Instant) -> Result<QuicLink, LinkError> {
        let parts = self.pending.take(key, peer, deadline, " over QUIC")?;
        QuicLink::start(self.core.clone(), parts)
    }
}

impl Drop for QuicEndpoint {
    fn drop(&mut self) {
        // Stop admitting; links already made keep the runtime (in `Core`) alive.
        self.accept_task.abort();
        self.core.endpoint.set_server_config(None);
        for parts in self.pending.drain() {
            parts.conn.close(VarInt::from_u32(CLOSE_DONE), b"nobody took this link");
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, listening: Arc<Listening>) {
    while let Some(incoming) = endpoint.accept().await {
        // Each handshake runs on its own so a silent client cannot hold up the others.
        tokio::spawn(listening.clone().admit(incoming));
    }
}

impl Listening {
    /// File an authenticated stream for the rank that will ask for it; close, log and count
    /// anything else. The rank a refused connection claimed is whoever the peer said, and it
    /// proved nothing, so no rank is blamed.
    async fn admit(self: Arc<Self>, incoming: quinn::Incoming) {
        let peer = incoming.remote_address();
        let listener = format!("rank {}'s QUIC listener", self.me);
        let deadline = tokio::time::Instant::now() + ACCEPT_TIMEOUT;
        let conn = match tokio::time::timeout_at(deadline, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                let why = HandshakeError::Io(io_other("the QUIC handshake failed", e));
                return self.refusals.refuse(&listener, peer, &why);
            }
            Err(_) => return self.refusals.refuse(&listener, peer, &timed_out()),
        };
        let served = tokio::time::timeout_at(deadline, self.serve(&conn))
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        match served {
            Ok((accepted, rank, send, recv)) => {
                self.pending.file(accepted.key, rank, Parts { conn, send, recv });
            }
            Err(e) => {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"refused");
                self.refusals.refuse(&listener, peer, &e);
            }
        }
    }

    /// The listening side of the data-plane handshake and the session binding on the
    /// connection's first stream. Nothing but the handshake is read before the client's proof
    /// checks out.
    async fn serve(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(Accepted, usize, SendStream, RecvStream), HandshakeError> {
        let (mut send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| HandshakeError::Io(io_other("no stream", e)))?;
        let server = Server {
            auth: self.auth.as_ref(),
            channel: Channel::Link,
            me: Party::rank(self.me),
        };
        let mut frame = vec![0u8; HELLO_HEAD];
        read_frame(&mut recv, &mut frame[..MAGIC.len()], HandshakeError::Abandoned).await?;
        if frame[..MAGIC.len()] != MAGIC {
            return Err(HandshakeError::Malformed(format!(
                "bad magic {:02x?}",
                &frame[..MAGIC.len()]
            )));
        }
        read_frame(&mut recv, &mut frame[MAGIC.len()..], HandshakeError::Abandoned).await?;
        let key_len = Hello::key_len(&frame)?;
        frame.resize(HELLO_HEAD + key_len, 0);
        read_frame(&mut recv, &mut frame[HELLO_HEAD..], HandshakeError::Abandoned).await?;
        let (challenge, awaiting) = server.challenge(Hello::decode(&frame)?, nonce()?)?;
        write_frame(&mut send, &challenge.encode(), HandshakeError::Abandoned).await?;
        let mut proof = [0u8; PROOF_LEN];
        // A client checks our MAC before it proves anything, and hangs up when it fails.
        read_frame(&mut recv, &mut proof, HandshakeError::Abandoned).await?;
        let accepted = awaiting.verify(&proof)?;
        let Party::Rank(rank) = accepted.client else {
            // `Server::challenge` admits only ranks to a link; be safe anyway.
            return Err(HandshakeError::BadClaim(accepted.client));
        };
        let rank = rank as usize;
        write_frame(&mut send, &[ACCEPTED], HandshakeError::Abandoned).await?;
        if let Some(auth) = &self.auth {
            let ends = Ends {
                client: rank,
                server: self.me,
                key: &accepted.key,
            };
            if !bind(conn, (&mut send, &mut recv), Side::Server, ends, auth).await? {
                return Err(HandshakeError::Io(io::Error::other(UNBOUND)));
            }
        }
        Ok((accepted, rank, send, recv))
    }
}

fn timed_out() -> HandshakeError {
    HandshakeError::Io(io::Error::new(io::ErrorKind::TimedOut, "the handshake timed out"))
}

fn nonce() -> Result<Nonce, HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| HandshakeError::Io(io::Error::other(format!("cannot draw a handshake nonce: {e}"))))?;
    Ok(n)
}

/// Whether a connection error means the peer hung up on us (rather than the path failing).
fn hung_up(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::ApplicationClosed(_) | ConnectionError::ConnectionClosed(_) | ConnectionError::Reset
    )
}

/// `read_exact` for handshake frames: a peer that hangs up is `closed`, anything else I/O.
async fn read_frame(recv: &mut RecvStream, buf: &mut [u8], closed: HandshakeError) -> Result<(), HandshakeError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(ReadExactError::FinishedEarly(_)) | Err(ReadExactError::ReadError(ReadError::Reset(_))) => Err(closed),
        Err(ReadExactError::ReadError(ReadError::ConnectionLost(e))) if hung_up(&e) => Err(closed),
        Err(ReadExactError::ReadError(e)) => Err(HandshakeError::Io(e.into())),
    }
}

async fn write_frame(send: &mut SendStream, bytes: &[u8], closed: HandshakeError) -> Result<(), HandshakeError> {
    match send.write_all(bytes).await {
        Ok(()) => Ok(()),
        Err(WriteError::Stopped(_)) => Err(closed),
        Err(WriteError::ConnectionLost(e)) if hung_up(&e) => Err(closed),
        Err(e) => Err(HandshakeError::Io(e.into())),
    }
}

/// Which end of the connection this rank is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Dialled: the higher global rank, the QUIC client.
    Client,
    Server,
}

/// Send our binding tag of the QUIC session, read the peer's; `Ok(false)` when it does not
/// match.
async fn bind(
    conn: &quinn::Connection,
    (send, recv): (&mut SendStream, &mut RecvStream),
    side: Side,
    ends: Ends<'_>,
    auth: &JobAuth,
) -> Result<bool, HandshakeError> {
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, &[])
        .map_err(|e| HandshakeError::Io(io_other("QUIC keying material", format!("{e:?}"))))?;
    let (mine, theirs) = match side {
        Side::Client => (Direction::ClientToServer, Direction::ServerToClient),
        Side::Server => (Direction::ServerToClient, Direction::ClientToServer),
    };
    let closed = || match side {
        Side::Client => HandshakeError::Rejected,
        Side::Server => HandshakeError::Abandoned,
    };
    write_frame(send, &binding::tag(auth, ends, &exporter, mine), closed()).await?;
    let mut got = [0u8; MAC_LEN];
    read_frame(recv, &mut got, closed()).await?;
    Ok(binding::verify(auth, ends, &exporter, theirs, &got))
}

const UNBOUND: &str = "the peer's QUIC session binding does not match: a different job secret, job id, attempt or \
                       rank, or a relay in the middle";

/// Everything a dial needs, owned, so it can run on the runtime.
struct Dialing {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addrs: Vec<SocketAddr>,
    addr: String,
    key: String,
    me: usize,
    peer: usize,
    auth: Option<JobAuth>,
}

/// Why one dial attempt failed: try again (the peer may not be up yet), or give up.
enum Attempt {
    Retry(String),
    Fatal(LinkError),
}

impl Dialing {
    /// Dial until one attempt gets through or `deadline` passes.
    async fn until(self, deadline: Instant) -> Result<Parts, LinkError> {
        let mut last = String::from("timed out");
        while Instant::now() < deadline {
            for &at in &self.addrs {
                let by = deadline.min(Instant::now() + DIAL_TIMEOUT);
                match tokio::time::timeout_at(by.into(), self.once(at)).await {
                    Ok(Ok(parts)) => return Ok(parts),
                    Ok(Err(Attempt::Retry(why))) => last = why,
                    Ok(Err(Attempt::Fatal(e))) => return Err(e),
                    Err(_) => last = format!("no answer from {at} in time"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(LinkError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("could not reach rank {} over QUIC at {}: {last}", self.peer, self.addr),
        )))
    }

    /// One connection, its handshake and its binding.
    async fn once(&self, at: SocketAddr) -> Result<Parts, Attempt> {
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), at, SERVER_NAME)
            .map_err(|e| Attempt::Fatal(LinkError::Io(io_other(&format!("QUIC connect to {at}"), e))))?
            .await
            .map_err(|e| Attempt::Retry(format!("QUIC connection to {at}: {e}")))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Attempt::Retry(format!("QUIC stream to {at}: {e}")))?;
        let outcome = self.prove(&conn, &mut send, &mut recv).await;
        if let Ok(true) = outcome {
            return Ok(Parts { conn, send, recv });
        }
        conn.close(VarInt::from_u32(CLOSE_REFUSED), b"refused");
        let why = match outcome {
            Err(HandshakeError::Io(e)) => return Err(Attempt::Retry(e.to_string())),
            Err(e) => e.to_string(),
            Ok(_) => UNBOUND.to_string(),
        };
        Err(Attempt::Fatal(LinkError::Auth(format!(
            "the QUIC link to rank {} at {} (`{}`): {why}",
            self.peer, self.addr, self.key
        ))))
    }

    async fn prove(
        &self,
        conn: &quinn::Connection,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Result<bool, HandshakeError> {
        let client = Client {
            auth: self.auth.as_ref(),
            channel: Channel::Link,
            me: Party::rank(self.me),
            peer: Party::rank(self.peer),
            key: &self.key,
        };
        let hello = client.hello(nonce()?);
        write_frame(send, &hello.encode(), HandshakeError::Rejected).await?;
        let mut challenge = [0u8; CHALLENGE_LEN];
        read_frame(recv, &mut challenge, HandshakeError::Rejected).await?;
        let proof = client.answer(&hello, &Challenge::decode(&challenge)?)?;
        write_frame(send, &proof, HandshakeError::Rejected).await?;
        let mut verdict = [0u8; 1];
        read_frame(recv, &mut verdict, HandshakeError::Rejected).await?;
        if verdict[0] != ACCEPTED {
            return Err(HandshakeError::Malformed(format!(
                "unknown verdict {:#04x}",
                verdict[0]
            )));
        }
        if let Some(auth) = &self.auth {
            let ends = Ends {
                client: self.me,
                server: self.peer,
                key: &self.key,
            };
            return bind(conn, (send, recv), Side::Client, ends, auth).await;
        }
        Ok(true)
    }
}
