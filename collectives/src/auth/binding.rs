//! Channel binding for encrypted links (TLS, QUIC): after the encrypted session is up, each
//! side sends a MAC, under the job secret, of the session's exporter value (RFC 5705 / 8446
//! §7.5) and of who is on each end. The certificates are throwaway self-signed ones that
//! nobody checks; what authenticates the session is this tag: a machine in the middle that
//! terminates TLS towards both ranks holds two sessions with two different exporter values and
//! no secret to MAC either, so both ranks refuse it. The tags are pure functions of their
//! inputs, tested here; the TLS and QUIC shells move the 32 bytes.

use super::JobAuth;
use super::handshake::{Direction, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The exporter label both sides ask their TLS stack for (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-gantry-link-binding-v1";
/// Bytes of exporter output bound into a tag.
pub const EXPORTER_LEN: usize = 32;
const LABEL: &[u8] = b"gantry-bind-v1";

/// Who is on each end of a bound link and which link it is.
#[derive(Clone, Copy, Debug)]
pub struct Ends<'a> {
    /// The side that dialled (TLS client / QUIC client): the higher global rank.
    pub client: usize,
    pub server: usize,
    /// The communicator key the link serves.
    pub key: &'a str,
}

fn hmac(auth: &JobAuth, ends: Ends<'_>, exporter: &[u8; EXPORTER_LEN], direction: Direction) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(auth.secret.key()).expect("HMAC takes keys of any length");
    mac.update(LABEL);
    mac.update(&[direction as u8]);
    mac.update(&(auth.job.len() as u64).to_le_bytes());
    mac.update(auth.job.as_bytes());
    mac.update(&auth.attempt.to_le_bytes());
    mac.update(&(ends.client as u64).to_le_bytes());
    mac.update(&(ends.server as u64).to_le_bytes());
    mac.update(&(ends.key.len() as u64).to_le_bytes());
    mac.update(ends.key.as_bytes());
    mac.update(exporter);
    mac
}

/// The tag the side sending in `direction` proves itself with.
pub fn tag(auth: &JobAuth, ends: Ends<'_>, exporter: &[u8; EXPORTER_LEN], direction: Direction) -> Tag {
    hmac(auth, ends, exporter, direction).finalize().into_bytes().into()
}

/// Constant-time check of the tag received from the side sending in `direction`.
pub fn verify(auth: &JobAuth, ends: Ends<'_>, exporter: &[u8; EXPORTER_LEN], direction: Direction, got: &[u8]) -> bool {
    hmac(auth, ends, exporter, direction).verify_slice(got).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::JobSecret;

    fn auth(secret: &str, attempt: u32) -> JobAuth {
        JobAuth::new(JobSecret::parse(secret).unwrap(), "job-7", attempt)
    }

    #[test]
    fn a_tag_holds_only_for_its_session_secret_ends_and_direction() {
        let a = auth("0123456789abcdef0123", 1);
        let ends = Ends {
            client: 3,
            server: 1,
            key: "world#1",
        };
        let exp = [7u8; EXPORTER_LEN];
        let t = tag(&a, ends, &exp, Direction::ClientToServer);
        assert!(verify(&a, ends, &exp, Direction::ClientToServer, &t));
        // Reflected back as the other side's: refused.
        assert!(!verify(&a, ends, &exp, Direction::ServerToClient, &t));
        // Another session (a relay in the middle has another exporter value): refused.
        assert!(!verify(&a, ends, &[8u8; EXPORTER_LEN], Direction::ClientToServer, &t));
        // Another secret, attempt, rank or communicator: refused.
        assert!(!verify(
            &auth("0123456789abcdef0124", 1),
            ends,
            &exp,
            Direction::ClientToServer,
            &t
        ));
        assert!(!verify(
            &auth("0123456789abcdef0123", 2),
            ends,
            &exp,
            Direction::ClientToServer,
            &t
        ));
        let other_rank = Ends { client: 2, ..ends };
        assert!(!verify(&a, other_rank, &exp, Direction::ClientToServer, &t));
        let other_key = Ends { key: "world#2", ..ends };
        assert!(!verify(&a, other_key, &exp, Direction::ClientToServer, &t));
        // Truncated: refused.
        assert!(!verify(&a, ends, &exp, Direction::ClientToServer, &t[..16]));
    }
}
