//! The data plane's authentication: every rank-to-rank TCP link and every rendezvous-store
//! connection starts with a mutual challenge-response over the job's secret, and a connection
//! that fails it is closed before any payload is parsed.
//!
//! Why: a rank's listener and the store accept connections from anyone who can reach them; an
//! unauthenticated peer could write an abort record blaming a rank, forge the NCCL unique id or
//! inject bytes into a link. The secret is per job (per attempt for cluster jobs), handed to
//! the ranks by their launcher through `GANTRY_JOB_SECRET` (`crate::rank_env`).
//!
//! On plain TCP this protects who may connect, not the bytes after the handshake: an attacker
//! who can rewrite the stream between two ranks (on the path, not merely on the network) is
//! out of scope there. Links that leave a host can use TLS 1.3 or QUIC instead (`crate::tls`,
//! `crate::quic`), which encrypt and authenticate every byte, the session bound to the job
//! secret by [`binding`].
//!
//! # Layout
//! - `mod.rs`: [`JobSecret`] (redacted in `Debug`, never `Display`), [`JobAuth`] (the secret
//!   plus the job id and attempt bound into every proof), [`Party`] (who is on each end).
//! - [`handshake`]: the frames, the MAC and both sides as pure functions (no I/O, nonces
//!   passed in), tested exhaustively.
//! - [`binding`]: the tags that bind an encrypted link's session (TLS, QUIC) to the job
//!   secret, so their throwaway certificates need no checking.
//! - `stream`: the thin blocking shell that runs either side over a `TcpStream` with a
//!   deadline, and the listeners' refusal log and counter.
//! - `probe`: intruders for the tests that attack a running job's listeners (hidden).

pub mod binding;
pub mod handshake;
#[doc(hidden)]
pub mod probe;
pub(crate) mod stream;

use std::fmt;

/// Fewest characters a job secret may have: a shorter one is guessable offline from one
/// recorded handshake.
pub const MIN_SECRET_LEN: usize = 16;
/// Random bytes in a generated secret (written as twice as many hex digits).
const GENERATED_BYTES: usize = 32;

/// Why a job secret could not be made or accepted. Never contains the secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the job secret is {len} characters; it must have at least {MIN_SECRET_LEN}")]
    TooShort { len: usize },
    #[error("the job secret spans several lines; it must be one line")]
    MultiLine,
    #[error("cannot draw random bytes for a job secret: {0}")]
    Random(String),
}

/// A job's shared secret. Its `Debug` prints `JobSecret(<redacted>)` and it has no `Display`,
/// so it cannot reach a log line or an error message by accident; [`JobSecret::expose`] is
/// for writing it where the rank reads it, and nothing else.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret(String);

impl JobSecret {
    /// A fresh secret: 32 bytes from the operating system's generator, as 64 hex digits.
    pub fn generate() -> Result<JobSecret, SecretError> {
        let mut bytes = [0u8; GENERATED_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(JobSecret(hex(&bytes)))
    }

    /// A secret as a user or launcher gives it (surrounding whitespace, such as a file's
    /// trailing newline, is ignored): one line of at least [`MIN_SECRET_LEN`] characters.
    pub fn parse(text: &str) -> Result<JobSecret, SecretError> {
        let text = text.trim();
        if text.contains(['\n', '\r']) {
            return Err(SecretError::MultiLine);
        }
        let len = text.chars().count();
        if len < MIN_SECRET_LEN {
            return Err(SecretError::TooShort { len });
        }
        Ok(JobSecret(text.to_string()))
    }

    /// The secret itself, to be written where a rank reads it (`GANTRY_JOB_SECRET`).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The HMAC key.
    pub(crate) fn key(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(<redacted>)")
    }
}

/// Lowercase hex digits of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// What a process proves on every data-plane connection: the job's secret, and the job and
/// attempt it belongs to (bound into every MAC, so a secret reused across jobs or attempts
/// still cannot join one to another).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobAuth {
    pub secret: JobSecret,
    /// The job's id as its launcher names it: the cluster job id, the Slurm job id, the
    /// torchrun run id, or empty for a launcher's own local run.
    pub job: String,
    /// Counted from 1.
    pub attempt: u32,
}

impl JobAuth {
    pub fn new(secret: JobSecret, job: impl Into<String>, attempt: u32) -> JobAuth {
        JobAuth {
            secret,
            job: job.into(),
            attempt,
        }
    }
}

/// One end of a data-plane connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Party {
    /// A rank, by its global rank.
    Rank(u32),
    /// A launcher or tool talking to the store it hosts (not a rank).
    Launcher,
    /// The rendezvous store server.
    Store,
}

const STORE_CODE: u32 = u32::MAX;
const LAUNCHER_CODE: u32 = u32::MAX - 1;

impl Party {
    /// Global rank `rank` (ranks beyond u32 do not exist; they saturate below the reserved codes).
    pub fn rank(rank: usize) -> Party {
        Party::Rank(u32::try_from(rank).unwrap_or(LAUNCHER_CODE - 1).min(LAUNCHER_CODE - 1))
    }

    /// Its u32 on the wire.
    pub fn code(self) -> u32 {
        match self {
            Party::Rank(r) => r.min(LAUNCHER_CODE - 1),
            Party::Launcher => LAUNCHER_CODE,
            Party::Store => STORE_CODE,
        }
    }

    pub fn from_code(code: u32) -> Party {
        match code {
            STORE_CODE => Party::Store,
            LAUNCHER_CODE => Party::Launcher,
            r => Party::Rank(r),
        }
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Party::Rank(r) => write!(f, "rank {r}"),
            Party::Launcher => f.write_str("the launcher"),
            Party::Store => f.write_str("the rendezvous store"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_and_never_printed() {
        let s = JobSecret::parse("  correct-horse-battery-staple\n").unwrap();
        assert_eq!(s.expose(), "correct-horse-battery-staple");
        assert_eq!(format!("{s:?}"), "JobSecret(<redacted>)");
        let auth = JobAuth::new(s, "7", 2);
        assert!(!format!("{auth:?}").contains("horse"), "{auth:?}");
        assert_eq!(JobSecret::parse("short"), Err(SecretError::TooShort { len: 5 }));
        assert_eq!(JobSecret::parse(""), Err(SecretError::TooShort { len: 0 }));
        assert_eq!(
            JobSecret::parse("0123456789abcdef\n0123456789abcdef"),
            Err(SecretError::MultiLine)
        );
        // Errors never echo the value.
        let e = JobSecret::parse("hunter2").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn generated_secrets_are_fresh_hex() {
        let (a, b) = (JobSecret::generate().unwrap(), JobSecret::generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 2 * GENERATED_BYTES);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(JobSecret::parse(a.expose()).unwrap(), a);
        assert_eq!(hex(&[0x00, 0xff, 0x1a]), "00ff1a");
    }

    #[test]
    fn parties_round_trip_through_their_codes() {
        for p in [Party::Rank(0), Party::Rank(4095), Party::Launcher, Party::Store] {
            assert_eq!(Party::from_code(p.code()), p);
        }
        assert_eq!(Party::rank(usize::MAX).code(), u32::MAX - 2);
        assert_eq!(Party::rank(3), Party::Rank(3));
        assert_eq!(Party::Rank(2).to_string(), "rank 2");
    }
}
