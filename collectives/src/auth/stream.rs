//! The handshake over a blocking `TcpStream`, under a deadline, and the listeners' record of
//! the connections they refused. Everything that decides is in [`super::handshake`]; this
//! only moves its frames.

use super::handshake::{
    ACCEPTED, Accepted, CHALLENGE_LEN, Challenge, Client, HELLO_HEAD, HandshakeError, Hello, MAGIC, NONCE_LEN, Nonce,
    PROOF_LEN, Server,
};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a listener gives a connecting peer to complete the handshake.
pub(crate) const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connecting side waits for a listener's answers at most.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the handshake timed out"));
    }
    Ok(left)
}

/// `read_exact`, every read bounded by what is left until `deadline`.
fn read_by(mut stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the handshake timed out"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_by(mut stream: &TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    stream.set_write_timeout(Some(left(deadline)?))?;
    stream.write_all(bytes)
}

fn clear_timeouts(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

fn nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("cannot draw a handshake nonce: {e}")))?;
    Ok(n)
}

/// Run `server`'s side on a freshly accepted stream: nothing but the handshake is read before
/// the client's proof checks out, and exactly the handshake's bytes are consumed. On success
/// the stream's timeouts are cleared.
pub(crate) fn serve(stream: &TcpStream, server: Server<'_>, deadline: Instant) -> Result<Accepted, HandshakeError> {
    let mut frame = vec![0u8; HELLO_HEAD];
    // The magic first: a client speaking anything else is closed at once, not at the deadline.
    read_by(stream, &mut frame[..MAGIC.len()], deadline)?;
    if frame[..MAGIC.len()] != MAGIC {
        return Err(HandshakeError::Malformed(format!(
            "bad magic {:02x?}",
            &frame[..MAGIC.len()]
        )));
    }
    read_by(stream, &mut frame[MAGIC.len()..], deadline)?;
    let key_len = Hello::key_len(&frame)?;
    frame.resize(HELLO_HEAD + key_len, 0);
    read_by(stream, &mut frame[HELLO_HEAD..], deadline)?;
    let (challenge, pending) = server.challenge(Hello::decode(&frame)?, nonce()?)?;
    write_by(stream, &challenge.encode(), deadline)?;
    let mut proof = [0u8; PROOF_LEN];
    read_by(stream, &mut proof, deadline).map_err(|e| match e.kind() {
        // A client checks our MAC before it proves anything, and hangs up when it fails.
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => HandshakeError::Abandoned,
        _ => HandshakeError::Io(e),
    })?;
    let accepted = pending.verify(&proof)?;
    write_by(stream, &[ACCEPTED], deadline)?;
    clear_timeouts(stream)?;
    Ok(accepted)
}

/// Run `client`'s side on a freshly connected stream; `Ok` once the server accepted us.
pub(crate) fn dial(stream: &TcpStream, client: Client<'_>, deadline: Instant) -> Result<(), HandshakeError> {
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            HandshakeError::Rejected
        }
        _ => HandshakeError::Io(e),
    };
    let hello = client.hello(nonce()?);
    write_by(stream, &hello.encode(), deadline)?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    read_by(stream, &mut challenge, deadline).map_err(closed)?;
    let proof = client.answer(&hello, &Challenge::decode(&challenge)?)?;
    write_by(stream, &proof, deadline).map_err(closed)?;
    let mut verdict = [0u8; 1];
    read_by(stream, &mut verdict, deadline).map_err(closed)?;
    if verdict[0] != ACCEPTED {
        return Err(HandshakeError::Malformed(format!(
            "unknown verdict {:#04x}",
            verdict[0]
        )));
    }
    clear_timeouts(stream)?;
    Ok(())
}

/// A listener's refused connections: each is logged with the peer's address and why (never
/// with secret material) and counted; none is ever turned into a failure of a rank.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    count: AtomicU64,
}

impl Refusals {
    pub(crate) fn refuse(&self, listener: &str, peer: SocketAddr, why: &dyn std::fmt::Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "{listener}: refused a connection that failed the handshake: {why}");
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
