//! TLS 1.3 links for traffic that leaves a host: the same TCP connection and data-plane
//! handshake as [`crate::tcp`], then a TLS session over it, then channel binding.
//!
//! Order on a new connection: the plain data-plane handshake ([`crate::auth::handshake`], so
//! the listener files the stream under its communicator and rank exactly as for TCP); the TLS
//! handshake (the dialling, higher rank is the TLS client); then each side sends the
//! [`crate::auth::binding`] tag of the session's exporter value inside TLS and checks the
//! other's. Certificates are throwaway self-signed ones made once per process
//! ([`TlsIdentity`]); the client accepts any certificate but still checks the handshake's
//! signature with it, and the binding tag is what proves the peer holds the job secret. Without
//! a secret (GANTRY_INSECURE_NO_AUTH) the tags are skipped: the bytes are still encrypted, but
//! nobody is authenticated.
//!
//! After that, [`TlsLink`] is a nonblocking [`Link`] over the rustls connection: writes are
//! encrypted into rustls's buffer (bounded, so a slow peer pushes back) and flushed to the
//! socket; reads pull records from the socket until plaintext is there.

use crate::auth::JobAuth;
use crate::auth::binding::{self, EXPORTER_LABEL, EXPORTER_LEN, Ends};
use crate::auth::handshake::{Direction, MAC_LEN};
use crate::error::LinkError;
use crate::link::{Interest, Link, LinkKind};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, Connection, DigitallySignedStruct, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name in every throwaway certificate and every client's server name; nobody checks it.
const CERT_NAME: &str = "gantry-rank";
/// Bytes of encrypted-but-unsent data a link buffers before `try_write` reports "would
/// block": big enough to keep a 4 MiB socket buffer fed, small enough to push back.
const SEND_BUFFER_BYTES: usize = 1 << 20;

/// This process's TLS configurations: one throwaway certificate, made once and shared by
/// every link (and by QUIC, which speaks TLS 1.3 inside).
#[derive(Clone)]
pub struct TlsIdentity {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(<throwaway certificate>)")
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> LinkError {
    LinkError::Protocol(format!("{what}: {e}"))
}

impl TlsIdentity {
    /// A fresh self-signed certificate and the TLS 1.3 configurations around it.
    pub fn generate() -> Result<TlsIdentity, LinkError> {
        let provider = provider();
        let made = rcgen::generate_simple_self_signed(vec![CERT_NAME.to_string()])
            .map_err(|e| tls_err("cannot make a TLS certificate", e))?;
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS 1.3 server configuration", e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| tls_err("TLS server certificate", e))?;
        let verifier = Arc::new(SessionBound {
            algorithms: provider.signature_verification_algorithms,
        });
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS 1.3 client configuration", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// Accepts any server certificate (they are throwaway ones; [`binding`] authenticates the
/// session) but checks the handshake's signature, so the session keys belong to whoever holds
/// the certificate's key.
#[derive(Debug)]
pub(crate) struct SessionBound {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SessionBound {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The provider every gantry TLS and QUIC session uses: aws-lc-rs with AES-128-GCM first
/// (rustls prefers AES-256; a link's time goes mostly into AES-GCM, and 128-bit keys take 10
/// rounds instead of 14 at a security margin nobody needs more of here).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Which end of the TCP connection this rank is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Dialled the connection: the higher global rank, the TLS client.
    Client,
    Server,
}

/// Run TLS and channel binding over `stream`, which has passed the data-plane handshake, by
/// `deadline`. `ends` names the dialling and the listening rank and the communicator.
pub fn secure(
    stream: TcpStream,
    identity: &TlsIdentity,
    role: Role,
    ends: Ends<'_>,
    auth: Option<&JobAuth>,
    deadline: Instant,
) -> Result<TlsLink, LinkError> {
    let peer = if role == Role::Client { ends.server } else { ends.client };
    let mut conn: Connection = match role {
        Role::Client => ClientConnection::new(
            identity.client.clone(),
            ServerName::try_from(CERT_NAME).expect("a valid DNS name"),
        )
        .map_err(|e| tls_err("TLS client", e))?
        .into(),
        Role::Server => ServerConnection::new(identity.server.clone())
            .map_err(|e| tls_err("TLS server", e))?
            .into(),
    };
    conn.set_buffer_limit(Some(SEND_BUFFER_BYTES));
    let mut sock = stream;
    sock.set_nonblocking(false)?;
    let io_timeout = |sock: &TcpStream| -> Result<(), LinkError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LinkError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the TLS handshake with rank {peer} timed out"),
            )));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        Ok(())
    };
    while conn.is_handshaking() {
        io_timeout(&sock)?;
        conn.complete_io(&mut NoSignal(&sock))
            .map_err(|e| tls_err(&format!("the TLS handshake with rank {peer}"), e))?;
    }
    if let Some(auth) = auth {
        io_timeout(&sock)?;
        bind(&mut conn, &mut sock, role, ends, auth)
            .map_err(|e| LinkError::Auth(format!("the TLS link with rank {peer} (`{}`): {e}", ends.key)))?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    TlsLink::new(conn, sock)
}

/// Send our binding tag, read and check the peer's (blocking, under the socket's timeouts).
fn bind(conn: &mut Connection, sock: &mut TcpStream, role: Role, ends: Ends<'_>, auth: &JobAuth) -> io::Result<()> {
    let exporter: [u8; EXPORTER_LEN] = conn
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(io::Error::other)?;
    let (mine, theirs) = match role {
        Role::Client => (Direction::ClientToServer, Direction::ServerToClient),
        Role::Server => (Direction::ServerToClient, Direction::ClientToServer),
    };
    conn.writer().write_all(&binding::tag(auth, ends, &exporter, mine))?;
    while conn.wants_write() {
        conn.write_tls(&mut NoSignal(sock))?;
    }
    let mut got = [0u8; MAC_LEN];
    let mut have = 0;
    while have < got.len() {
        match conn.reader().read(&mut got[have..]) {
            Ok(0) => return Err(hung_up()),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if conn.read_tls(sock)? == 0 {
                    return Err(hung_up());
                }
                conn.process_new_packets().map_err(io::Error::other)?;
            }
            Err(e) => return Err(e),
        }
    }
    if !binding::verify(auth, ends, &exporter, theirs, &got) {
        return Err(io::Error::other(
            "the peer's session binding does not match: a different job secret, job id, attempt or rank, or a \
             relay in the middle",
        ));
    }
    Ok(())
}

/// A socket written with `MSG_NOSIGNAL`: rustls writes its records with `write_vectored`,
/// which std sends with `writev(2)`, and a `writev` to a peer that is gone raises SIGPIPE,
/// which kills a process that has not ignored it (the CLI restores the default for its
/// output, and `gantry bench collectives` and `gantry eval --tp` run ranks in it) before the
/// link can report the peer as lost. std's `write` already uses
/// `send(MSG_NOSIGNAL)`; this does the same for the vectored writes.
struct NoSignal<'a>(&'a TcpStream);

impl Read for NoSignal<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&mut &*self.0).read(buf)
    }
}

impl Write for NoSignal<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid; it points at `bufs`, whose IoSlices have the
        // layout of iovec and outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024) as _;
        // SAFETY: a valid socket and a msghdr describing readable memory.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hung_up() -> io::Error {
    io::Error::other("the peer hung up instead of binding the session (it may hold a different job secret)")
}

/// An encrypted link: a rustls connection over a nonblocking TCP socket.
pub struct TlsLink {
    conn: Connection,
    sock: TcpStream,
    /// Decrypted bytes rustls holds that have not been read yet.
    plaintext: usize,
    /// Encrypted bytes read from the socket that rustls has not taken yet: rustls takes at
    /// most 4 KiB per `read_tls`, so reading the socket through it would cost a system call
    /// per 4 KiB.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
}

/// Bytes read from the socket at once.
const READ_BUF_BYTES: usize = 256 << 10;

impl TlsLink {
    fn new(conn: Connection, sock: TcpStream) -> Result<TlsLink, LinkError> {
        crate::tcp::tune(&sock)?;
        sock.set_nonblocking(true)?;
        let mut conn = conn;
        // The peer's first payload may have come in with its binding tag.
        let plaintext = conn
            .process_new_packets()
            .map_err(|e| tls_err("TLS record from the peer", e))?
            .plaintext_bytes_to_read();
        Ok(TlsLink {
            conn,
            sock,
            plaintext,
            rbuf: vec![0u8; READ_BUF_BYTES].into_boxed_slice(),
            rpos: 0,
            rend: 0,
        })
    }

    /// Write buffered records to the socket until it would block or nothing is left.
    fn flush(&mut self) -> Result<(), LinkError> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut NoSignal(&self.sock)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => break,
                Err(e) => return Err(crate::tcp::io_to_link(e)),
            }
        }
        Ok(())
    }

    /// Decrypt more of what the peer sent: from the bytes already read, else from one socket
    /// read; `false` when the socket had nothing.
    fn pull(&mut self) -> Result<bool, LinkError> {
        if self.rpos == self.rend {
            match (&self.sock).read(&mut self.rbuf) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => (self.rpos, self.rend) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    return Ok(false);
                }
                Err(e) => return Err(crate::tcp::io_to_link(e)),
            }
        }
        // rustls holds at most one record's plaintext (16 KiB) until it is read: feed it until
        // a record comes out or the bytes run out.
        while self.rpos < self.rend && self.plaintext == 0 {
            let mut rest = &self.rbuf[self.rpos..self.rend];
            let took = self
                .conn
                .read_tls(&mut rest)
                .map_err(|e| tls_err("TLS record from the peer", e))?;
            self.rpos += took;
            let state = self
                .conn
                .process_new_packets()
                .map_err(|e| tls_err("TLS record from the peer", e))?;
            self.plaintext = state.plaintext_bytes_to_read();
            if state.peer_has_closed() && self.plaintext == 0 {
                return Err(LinkError::Closed);
            }
        }
        // Processing may queue records of our own (key updates, alerts).
        self.flush()?;
        Ok(true)
    }
}

impl Link for TlsLink {
    fn kind(&self) -> LinkKind {
        LinkKind::Tls
    }

    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
        if data.is_empty() {
            return Ok(0);
        }
        self.flush()?;
        let n = self.conn.writer().write(data).map_err(crate::tcp::io_to_link)?;
        self.flush()?;
        Ok(n)
    }

    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.plaintext > 0 {
                match self.conn.reader().read(buf) {
                    Ok(n) if n > 0 => {
                        self.plaintext -= n.min(self.plaintext);
                        return Ok(n);
                    }
                    Ok(_) => return Err(LinkError::Closed),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.plaintext = 0,
                    Err(e) => return Err(crate::tcp::io_to_link(e)),
                }
            }
            if !self.pull()? {
                return Ok(0);
            }
        }
    }

    fn wait(&self, interest: Interest, timeout: Duration) {
        if interest.read && (self.plaintext > 0 || self.rpos < self.rend) {
            return;
        }
        let mut events = 0;
        if interest.read {
            events |= libc::POLLIN;
        }
        if interest.write || self.conn.wants_write() {
            events |= libc::POLLOUT;
        }
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    fn poll_fd(&self) -> Option<RawFd> {
        // Bytes already read from the socket would not wake poll.
        (self.plaintext == 0 && self.rpos == self.rend).then(|| self.sock.as_raw_fd())
    }

    fn abort(&mut self, _culprit: Option<usize>, _reason: &str) {
        // As for TCP: the peer sees the close and reads the reason from the rendezvous store.
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::JobSecret;
    use std::net::TcpListener;
    use std::thread;

    const KEY: &str = "world#1";
    const ENDS: Ends<'static> = Ends {
        client: 1,
        server: 0,
        key: KEY,
    };

    fn auth(secret: &str) -> JobAuth {
        JobAuth::new(JobSecret::parse(secret).unwrap(), "job", 1)
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap().0)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    /// Both ends of a TLS link over a fresh socket pair, each under its own `auth`.
    fn secured(client_auth: Option<JobAuth>, server_auth: Option<JobAuth>) -> [Result<TlsLink, LinkError>; 2] {
        let (c, s) = pair();
        let server = thread::spawn(move || {
            let id = TlsIdentity::generate().unwrap();
            secure(s, &id, Role::Server, ENDS, server_auth.as_ref(), soon())
        });
        let id = TlsIdentity::generate().unwrap();
        let client = secure(c, &id, Role::Client, ENDS, client_auth.as_ref(), soon());
        [client, server.join().unwrap()]
    }

    /// Push `out` through `link` while reading as many bytes back, driving both sides.
    fn exchange(link: &mut TlsLink, out: &[u8]) -> Vec<u8> {
        let mut back = vec![0u8; out.len()];
        let (mut sent, mut got) = (0, 0);
        while sent < out.len() || got < back.len() {
            let w = if sent < out.len() {
                link.try_write(&out[sent..]).unwrap()
            } else {
                0
            };
            let r = if got < back.len() {
                link.try_read_into(&mut back[got..]).unwrap()
            } else {
                0
            };
            sent += w;
            got += r;
            if w == 0 && r == 0 {
                let interest = Interest {
                    read: got < back.len(),
                    write: sent < out.len(),
                };
                link.wait(interest, Duration::from_millis(10));
            }
        }
        back
    }

    #[test]
    fn bound_sessions_carry_every_byte_both_ways() {
        let a = auth("0123456789abcdef0123");
        let [client, server] = secured(Some(a.clone()), Some(a));
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        assert_eq!(client.kind(), LinkKind::Tls);
        let up: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 241) as u8).collect();
        let (u, d) = (up.clone(), down.clone());
        let t = thread::spawn(move || exchange(&mut server, &d));
        assert!(
            exchange(&mut client, &up) == down,
            "the client read what the server wrote"
        );
        assert!(t.join().unwrap() == u, "the server read what the client wrote");
    }

    #[test]
    fn a_peer_with_another_secret_cannot_bind_the_session() {
        let [client, server] = secured(Some(auth("0123456789abcdef0123")), Some(auth("0123456789abcdef9999")));
        for end in [client, server] {
            match end {
                Err(LinkError::Auth(why)) => assert!(!why.contains("0123456789abcdef"), "{why}"),
                Err(e) => panic!("expected an authentication failure, got {e}"),
                Ok(_) => panic!("a session bound under two different secrets"),
            }
        }
    }

    /// A relay that terminates TLS towards both ranks with its own certificate and forwards
    /// everything, binding tags included, as a machine in the middle would.
    #[test]
    fn a_relay_in_the_middle_is_refused_by_both_ranks() {
        let a = auth("0123456789abcdef0123");
        let (client_sock, relay_from_client) = pair();
        let (relay_to_server, server_sock) = pair();
        let server = {
            let a = a.clone();
            thread::spawn(move || {
                let id = TlsIdentity::generate().unwrap();
                secure(server_sock, &id, Role::Server, ENDS, Some(&a), soon())
            })
        };
        let relay = thread::spawn(move || {
            let id = TlsIdentity::generate().unwrap();
            let towards_client = thread::spawn({
                let id = id.clone();
                move || secure(relay_from_client, &id, Role::Server, ENDS, None, soon())
            });
            let mut towards_server = secure(relay_to_server, &id, Role::Client, ENDS, None, soon()).unwrap();
            let mut towards_client = towards_client.join().unwrap().unwrap();
            // Forward each side's tag to the other, as a relay would; it cannot make its own.
            let mut from_client = [0u8; MAC_LEN];
            let mut from_server = [0u8; MAC_LEN];
            let _ = read_exactly(&mut towards_client, &mut from_client);
            let _ = read_exactly(&mut towards_server, &mut from_server);
            let _ = towards_server.try_write(&from_client);
            let _ = towards_client.try_write(&from_server);
            thread::sleep(Duration::from_millis(500));
        });
        let id = TlsIdentity::generate().unwrap();
        let client = secure(client_sock, &id, Role::Client, ENDS, Some(&a), soon());
        for end in [client, server.join().unwrap()] {
            assert!(matches!(end, Err(LinkError::Auth(_))), "{:?}", end.err());
        }
        relay.join().unwrap();
    }

    fn read_exactly(link: &mut TlsLink, buf: &mut [u8]) -> Result<(), LinkError> {
        let mut got = 0;
        let until = soon();
        while got < buf.len() && Instant::now() < until {
            let n = link.try_read_into(&mut buf[got..])?;
            got += n;
            if n == 0 {
                link.wait(
                    Interest {
                        read: true,
                        write: false,
                    },
                    Duration::from_millis(10),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn without_a_secret_the_bytes_are_still_encrypted() {
        let [client, server] = secured(None, None);
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let t = thread::spawn(move || exchange(&mut server, b"pong"));
        assert_eq!(exchange(&mut client, b"ping"), b"pong");
        assert_eq!(t.join().unwrap(), b"ping");
    }
}
