//! Each attempt's data-plane secret (`RankAssignment.job_secret`, `GANTRY_JOB_SECRET` in its
//! ranks): HMAC-SHA256 of the job id and attempt under a random key the coordinator keeps in
//! its state (created on first start). Derived rather than stored per job, so a restarted
//! coordinator hands running ranks the same secret, every attempt gets its own (a rank left
//! over from an earlier attempt cannot join the next), and nobody without the key can
//! predict one.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

/// Bytes of the coordinator's key.
pub const KEY_LEN: usize = 32;
const LABEL: &[u8] = b"gantry job secret v1";

/// The key secrets are derived from. Its `Debug` redacts it.
#[derive(Clone)]
pub struct JobSecrets {
    key: [u8; KEY_LEN],
}

impl fmt::Debug for JobSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecrets(<redacted>)")
    }
}

impl JobSecrets {
    pub fn new(key: [u8; KEY_LEN]) -> JobSecrets {
        JobSecrets { key }
    }

    /// A fresh random key (the operating system's generator).
    pub fn generate_key() -> Result<[u8; KEY_LEN], String> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| e.to_string())?;
        Ok(key)
    }

    /// The secret of `attempt` of `job`, as 64 hex digits.
    pub fn for_attempt(&self, job: u64, attempt: u32) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(LABEL);
        mac.update(&job.to_le_bytes());
        mac.update(&attempt.to_le_bytes());
        let bytes = mac.finalize().into_bytes();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_secret_per_job_and_attempt_stable_for_a_key() {
        let s = JobSecrets::new([7; KEY_LEN]);
        let a = s.for_attempt(1, 1);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            a,
            JobSecrets::new([7; KEY_LEN]).for_attempt(1, 1),
            "stable across restarts"
        );
        assert_ne!(a, s.for_attempt(1, 2), "per attempt");
        assert_ne!(a, s.for_attempt(2, 1), "per job");
        assert_ne!(
            a,
            JobSecrets::new([8; KEY_LEN]).for_attempt(1, 1),
            "per coordinator key"
        );
        assert_eq!(format!("{s:?}"), "JobSecrets(<redacted>)");
        assert_ne!(JobSecrets::generate_key().unwrap(), JobSecrets::generate_key().unwrap());
    }
}
