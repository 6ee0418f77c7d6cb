//! Intruders, for the tests that hold a running job's listeners to their handshake (this
//! crate's and the `gantry` binary's): raw sockets that send plain bytes, a hello without a
//! secret, a proof made with a wrong secret and a replayed handshake, plus one connection with
//! the right secret as the control that shows refusals are not blanket. Not a user API.

use super::handshake::{ACCEPTED, CHALLENGE_LEN, Challenge, Channel, Client, Direction, Hello, NONCE_LEN};
use super::{JobAuth, JobSecret, Party};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A listener to probe: the store (`Channel::Store`, `Party::Store`) or a rank's link
/// listener (`Channel::Link`, its rank; the probe dials as a higher rank, with `key`).
pub struct Target<'a> {
    pub addr: &'a str,
    pub channel: Channel,
    pub server: Party,
    pub key: &'a str,
}

const PATIENCE: Duration = Duration::from_secs(60);

fn dial(addr: &str) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(PATIENCE)).map_err(|e| e.to_string())?;
    Ok(s)
}

impl Target<'_> {
    fn client<'a>(&'a self, auth: Option<&'a JobAuth>) -> Client<'a> {
        let me = match (self.channel, self.server) {
            (Channel::Link, Party::Rank(r)) => Party::Rank(r.saturating_add(1)),
            _ => Party::Launcher,
        };
        Client {
            auth,
            channel: self.channel,
            me,
            peer: self.server,
            key: self.key,
        }
    }

    /// Send `hello` and read the challenge; `None` when the listener closed unanswered.
    fn hello(&self, hello: &Hello) -> Result<(TcpStream, Option<Challenge>), String> {
        let mut s = dial(self.addr)?;
        s.write_all(&hello.encode()).map_err(|e| e.to_string())?;
        let mut buf = [0u8; CHALLENGE_LEN];
        match s.read_exact(&mut buf) {
            Ok(()) => Ok((s, Some(Challenge::decode(&buf).map_err(|e| e.to_string())?))),
            Err(_) => Ok((s, None)),
        }
    }

    /// Send `proof`; whether the listener accepted it.
    fn prove(s: &mut TcpStream, proof: &[u8]) -> bool {
        let mut verdict = [0u8; 1];
        s.write_all(proof).is_ok() && s.read_exact(&mut verdict).is_ok() && verdict[0] == ACCEPTED
    }
}

/// Try to get into `target` without `right` (the job's credentials): `plain` bytes of the
/// protocol behind the handshake, a hello without a secret, a wrong secret, a replay of a
/// recorded handshake. `Ok(n)`: all `n` were refused (closed before anything was answered
/// or accepted) and a connection with `right` was accepted; `Err` says what got through.
pub fn intrusions(target: &Target<'_>, right: &JobAuth, plain: &[u8]) -> Result<u64, String> {
    let nonce = |b: u8| [b; NONCE_LEN];
    let addr = target.addr;
    let mut s = dial(addr)?;
    s.write_all(plain).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    if !answer.is_empty() {
        return Err(format!("{addr}: plain bytes were answered with {} bytes", answer.len()));
    }

    if target.hello(&target.client(None).hello(nonce(1)))?.1.is_some() {
        return Err(format!("{addr}: a hello without a secret got a challenge"));
    }

    let wrong_secret = JobSecret::parse("definitely-not-the-job-secret").map_err(|e| e.to_string())?;
    let wrong = JobAuth::new(wrong_secret, &right.job, right.attempt);
    let client = target.client(Some(&wrong));
    let hello = client.hello(nonce(2));
    let (mut s, challenge) = target.hello(&hello)?;
    let challenge = challenge.ok_or(format!("{addr}: a well-formed hello got no challenge"))?;
    if client.answer(&hello, &challenge).is_ok() {
        return Err(format!("{addr}: the listener's MAC verified under a wrong secret"));
    }
    let forged = client
        .transcript(&hello, &challenge)
        .mac(Some(&wrong), Direction::ClientToServer);
    if Target::prove(&mut s, &forged) {
        return Err(format!("{addr}: a proof made with a wrong secret was accepted"));
    }

    // The control: the right secret, its exchange recorded.
    let client = target.client(Some(right));
    let hello = client.hello(nonce(3));
    let (mut s, challenge) = target.hello(&hello)?;
    let challenge = challenge.ok_or(format!("{addr}: the right secret got no challenge"))?;
    let recorded = client
        .answer(&hello, &challenge)
        .map_err(|e| format!("{addr}: the listener does not prove the job's secret: {e}"))?;
    if !Target::prove(&mut s, &recorded) {
        return Err(format!("{addr}: the right secret was refused"));
    }

    // The recorded hello and proof replayed against a fresh server nonce.
    let (mut s, replayed) = target.hello(&hello)?;
    let replayed = replayed.ok_or(format!("{addr}: a replayed hello got no challenge"))?;
    if replayed.nonce == challenge.nonce {
        return Err(format!("{addr}: the listener reused its nonce"));
    }
    if Target::prove(&mut s, &recorded) {
        return Err(format!("{addr}: a replayed handshake was accepted"));
    }
    Ok(4)
}
