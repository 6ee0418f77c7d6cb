//! The handshake that opens every store connection and every TCP link, as pure functions:
//! frames in, frames or a refusal out; nonces are arguments, so tests replay anything.
//!
//! ```text
//! client → server  Hello      "GNTA" version channel flags 0 client:u32 server:u32 nonce_c[32] key_len:u16 key
//! server → client  Challenge  "GNTA" version flags 0 0 nonce_s[32] mac_s[32]
//! client → server  Proof      mac_c[32]
//! server → client  Accepted   0xA5
//! ```
//!
//! `mac_s` and `mac_c` are HMAC-SHA256 under the job secret of the same [`Transcript`] (the
//! channel, both parties, the communicator key, both nonces, the job id and attempt) behind a
//! different direction label, so neither side's answer can be reflected back as the other's,
//! and a recorded exchange is worthless against a fresh nonce. The client checks the server's
//! MAC before it proves anything, so a process that does not hold the secret learns nothing
//! usable from a client either. Layout and failure behaviour: `docs/collectives-wire.md` §2.

use super::{JobAuth, Party};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

pub const MAGIC: [u8; 4] = *b"GNTA";
pub const VERSION: u8 = 1;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Bytes of a hello before its key.
pub const HELLO_HEAD: usize = 50;
pub const CHALLENGE_LEN: usize = 8 + NONCE_LEN + MAC_LEN;
pub const PROOF_LEN: usize = MAC_LEN;
/// The server's last byte: the proof checked out, payload may follow.
pub const ACCEPTED: u8 = 0xA5;
/// Longest key a hello may carry (communicator keys; the store's is empty).
pub const MAX_KEY_LEN: usize = 1024;

/// Set in a hello's or challenge's flags by a process that runs without a job secret.
const FLAG_NO_SECRET: u8 = 1;
/// Prefix of every MAC input; the `1` is this handshake's version.
const LABEL: &[u8] = b"gantry-auth-v1";

pub type Nonce = [u8; NONCE_LEN];
pub type Tag = [u8; MAC_LEN];

/// What the connection will carry: the key-value protocol or a link's message stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Store = 1,
    Link = 2,
}

impl Channel {
    fn from_code(code: u8) -> Option<Channel> {
        match code {
            1 => Some(Channel::Store),
            2 => Some(Channel::Link),
            _ => None,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Store => "rendezvous-store",
            Channel::Link => "rank-link",
        })
    }
}

/// Which way a MAC goes; part of its input, so one side's MAC is never valid as the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ServerToClient = 1,
    ClientToServer = 2,
}

/// Why a handshake failed. Never carries secret material.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a gantry handshake: {0}")]
    Malformed(String),
    #[error("a {found} handshake reached the {expected} listener")]
    WrongChannel { expected: Channel, found: Channel },
    #[error("the handshake is addressed to {addressed}, but this is {me}")]
    WrongParty { me: Party, addressed: Party },
    #[error("the peer claims to be {0}, which never opens this kind of connection")]
    BadClaim(Party),
    #[error("the peer has no job secret (GANTRY_INSECURE_NO_AUTH=1) but this process authenticates")]
    PeerHasNoSecret,
    #[error("the peer authenticates with a job secret but this process runs without one (GANTRY_INSECURE_NO_AUTH=1)")]
    NoOwnSecret,
    #[error(
        "the peer's proof does not match: a different job secret, job id, attempt or rank, or a replayed handshake"
    )]
    BadProof,
    #[error("the server's proof does not match: it does not hold this job's secret for this job id, attempt and ranks")]
    BadServerProof,
    #[error(
        "the server closed the connection during the handshake: it refused this process (see its log; a different \
         job secret, job id or attempt?)"
    )]
    Rejected,
    #[error("the peer hung up instead of proving itself (it may hold a different job secret)")]
    Abandoned,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn malformed(what: impl Into<String>) -> HandshakeError {
    HandshakeError::Malformed(what.into())
}

fn check_magic_and_version(bytes: &[u8]) -> Result<(), HandshakeError> {
    if bytes[..4] != MAGIC {
        return Err(malformed(format!("bad magic {:02x?}", &bytes[..4])));
    }
    if bytes[4] != VERSION {
        return Err(malformed(format!("handshake version {}, expected {VERSION}", bytes[4])));
    }
    Ok(())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn array_at<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// The client's first frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub channel: Channel,
    pub has_secret: bool,
    pub client: Party,
    /// Who the client means to reach (a rank, or the store).
    pub server: Party,
    pub nonce: Nonce,
    /// The communicator key for a link, empty for the store.
    pub key: String,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_HEAD + self.key.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.channel as u8);
        out.push(if self.has_secret { 0 } else { FLAG_NO_SECRET });
        out.push(0);
        out.extend_from_slice(&self.client.code().to_le_bytes());
        out.extend_from_slice(&self.server.code().to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&(self.key.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out
    }

    /// Check the fixed head (the first [`HELLO_HEAD`] bytes) and return how many key bytes
    /// follow, so a reader never reads, or allocates for, more than [`MAX_KEY_LEN`].
    pub fn key_len(head: &[u8]) -> Result<usize, HandshakeError> {
        if head.len() != HELLO_HEAD {
            return Err(malformed(format!(
                "hello head of {} bytes, expected {HELLO_HEAD}",
                head.len()
            )));
        }
        check_magic_and_version(head)?;
        if Channel::from_code(head[5]).is_none() {
            return Err(malformed(format!("unknown channel {}", head[5])));
        }
        if head[6] & !FLAG_NO_SECRET != 0 || head[7] != 0 {
            return Err(malformed(format!("unknown flags {:#04x} {:#04x}", head[6], head[7])));
        }
        let len = u16::from_le_bytes([head[48], head[49]]) as usize;
        if len > MAX_KEY_LEN {
            return Err(malformed(format!("key of {len} bytes, at most {MAX_KEY_LEN}")));
        }
        Ok(len)
    }

    /// A whole hello: the head, then exactly the key it announces.
    pub fn decode(bytes: &[u8]) -> Result<Hello, HandshakeError> {
        if bytes.len() < HELLO_HEAD {
            return Err(malformed(format!("hello of {} bytes is truncated", bytes.len())));
        }
        let key_len = Hello::key_len(&bytes[..HELLO_HEAD])?;
        if bytes.len() != HELLO_HEAD + key_len {
            return Err(malformed(format!(
                "hello of {} bytes announces a {key_len}-byte key",
                bytes.len()
            )));
        }
        let key = std::str::from_utf8(&bytes[HELLO_HEAD..]).map_err(|_| malformed("key is not UTF-8"))?;
        Ok(Hello {
            channel: Channel::from_code(bytes[5]).ok_or_else(|| malformed("unknown channel"))?,
            has_secret: bytes[6] & FLAG_NO_SECRET == 0,
            client: Party::from_code(u32_at(bytes, 8)),
            server: Party::from_code(u32_at(bytes, 12)),
            nonce: array_at(bytes, 16),
            key: key.to_string(),
        })
    }
}

/// The server's answer to a hello: its nonce, and its MAC over the transcript.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub has_secret: bool,
    pub nonce: Nonce,
    pub mac: Tag,
}

impl Challenge {
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut out = [0u8; CHALLENGE_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = if self.has_secret { 0 } else { FLAG_NO_SECRET };
        out[8..8 + NONCE_LEN].copy_from_slice(&self.nonce);
        out[8 + NONCE_LEN..].copy_from_slice(&self.mac);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Challenge, HandshakeError> {
        if bytes.len() != CHALLENGE_LEN {
            return Err(malformed(format!(
                "challenge of {} bytes, expected {CHALLENGE_LEN}",
                bytes.len()
            )));
        }
        check_magic_and_version(bytes)?;
        if bytes[5] & !FLAG_NO_SECRET != 0 || bytes[6] != 0 || bytes[7] != 0 {
            return Err(malformed("unknown challenge flags"));
        }
        Ok(Challenge {
            has_secret: bytes[5] & FLAG_NO_SECRET == 0,
            nonce: array_at(bytes, 8),
            mac: array_at(bytes, 8 + NONCE_LEN),
        })
    }
}

/// Everything both MACs cover, besides the job id and attempt (which come from [`JobAuth`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub channel: Channel,
    pub client: Party,
    pub server: Party,
    pub key: String,
    pub client_nonce: Nonce,
    pub server_nonce: Nonce,
}

impl Transcript {
    fn hmac(&self, auth: Option<&JobAuth>, direction: Direction) -> Hmac<Sha256> {
        // Without a secret (GANTRY_INSECURE_NO_AUTH on both sides) the exchange still runs, keyed
        // with nothing: the same frames either way, and a mixed pair fails by its flags.
        let key = auth.map_or(&[][..], |a| a.secret.key());
        let (job, attempt) = auth.map_or(("", 0), |a| (a.job.as_str(), a.attempt));
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(LABEL);
        mac.update(&[direction as u8, self.channel as u8]);
        mac.update(&(job.len() as u64).to_le_bytes());
        mac.update(job.as_bytes());
        mac.update(&attempt.to_le_bytes());
        mac.update(&self.client.code().to_le_bytes());
        mac.update(&self.server.code().to_le_bytes());
        mac.update(&(self.key.len() as u64).to_le_bytes());
        mac.update(self.key.as_bytes());
        mac.update(&self.client_nonce);
        mac.update(&self.server_nonce);
        mac
    }

    /// The MAC of this transcript in `direction` under `auth`.
    pub fn mac(&self, auth: Option<&JobAuth>, direction: Direction) -> Tag {
        self.hmac(auth, direction).finalize().into_bytes().into()
    }

    /// Constant-time check of a received MAC.
    pub fn verify(&self, auth: Option<&JobAuth>, direction: Direction, tag: &[u8]) -> bool {
        self.hmac(auth, direction).verify_slice(tag).is_ok()
    }
}

/// The listening side: a store server, or a rank's link listener.
#[derive(Clone, Copy, Debug)]
pub struct Server<'a> {
    pub auth: Option<&'a JobAuth>,
    pub channel: Channel,
    pub me: Party,
}

/// A server that sent its challenge and waits for the client's proof.
#[derive(Debug)]
pub struct AwaitingProof<'a> {
    auth: Option<&'a JobAuth>,
    transcript: Transcript,
}

/// Who connected, once the proof checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub client: Party,
    pub key: String,
}

impl<'a> Server<'a> {
    /// Answer `hello` with a challenge under the fresh `nonce`, or say why the connection
    /// must be closed unanswered.
    pub fn challenge(&self, hello: Hello, nonce: Nonce) -> Result<(Challenge, AwaitingProof<'a>), HandshakeError> {
        if hello.channel != self.channel {
            return Err(HandshakeError::WrongChannel {
                expected: self.channel,
                found: hello.channel,
            });
        }
        if hello.server != self.me {
            return Err(HandshakeError::WrongParty {
                me: self.me,
                addressed: hello.server,
            });
        }
        let may_connect = match (self.channel, hello.client) {
            (_, Party::Store) => false,
            (Channel::Link, Party::Launcher) => false,
            // Links go from the higher global rank to the lower one.
            (Channel::Link, Party::Rank(r)) => Party::Rank(r).code() > self.me.code(),
            (Channel::Store, _) => true,
        };
        if !may_connect {
            return Err(HandshakeError::BadClaim(hello.client));
        }
        match (self.auth.is_some(), hello.has_secret) {
            (true, false) => return Err(HandshakeError::PeerHasNoSecret),
            (false, true) => return Err(HandshakeError::NoOwnSecret),
            _ => {}
        }
        let transcript = Transcript {
            channel: self.channel,
            client: hello.client,
            server: self.me,
            key: hello.key,
            client_nonce: hello.nonce,
            server_nonce: nonce,
        };
        let challenge = Challenge {
            has_secret: self.auth.is_some(),
            nonce,
            mac: transcript.mac(self.auth, Direction::ServerToClient),
        };
        Ok((
            challenge,
            AwaitingProof {
                auth: self.auth,
                transcript,
            },
        ))
    }
}

impl AwaitingProof<'_> {
    /// Check the client's proof (exactly [`PROOF_LEN`] bytes).
    pub fn verify(self, proof: &[u8]) -> Result<Accepted, HandshakeError> {
        if !self.transcript.verify(self.auth, Direction::ClientToServer, proof) {
            return Err(HandshakeError::BadProof);
        }
        Ok(Accepted {
            client: self.transcript.client,
            key: self.transcript.key,
        })
    }
}

/// The connecting side: a store client, or the higher rank of a link.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub auth: Option<&'a JobAuth>,
    pub channel: Channel,
    pub me: Party,
    pub peer: Party,
    pub key: &'a str,
}

impl Client<'_> {
    pub fn hello(&self, nonce: Nonce) -> Hello {
        Hello {
            channel: self.channel,
            has_secret: self.auth.is_some(),
            client: self.me,
            server: self.peer,
            nonce,
            key: self.key.to_string(),
        }
    }

    /// The transcript of `hello` answered by `challenge`.
    pub fn transcript(&self, hello: &Hello, challenge: &Challenge) -> Transcript {
        Transcript {
            channel: self.channel,
            client: self.me,
            server: self.peer,
            key: self.key.to_string(),
            client_nonce: hello.nonce,
            server_nonce: challenge.nonce,
        }
    }

    /// Check the server's MAC, then prove ourselves: the proof to send.
    pub fn answer(&self, hello: &Hello, challenge: &Challenge) -> Result<Tag, HandshakeError> {
        match (self.auth.is_some(), challenge.has_secret) {
            (true, false) => return Err(HandshakeError::PeerHasNoSecret),
            (false, true) => return Err(HandshakeError::NoOwnSecret),
            _ => {}
        }
        let transcript = self.transcript(hello, challenge);
        if !transcript.verify(self.auth, Direction::ServerToClient, &challenge.mac) {
            return Err(HandshakeError::BadServerProof);
        }
        Ok(transcript.mac(self.auth, Direction::ClientToServer))
    }
}

#[cfg(test)]
mod tests;
