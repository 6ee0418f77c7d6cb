//! Fencing: a checkpoint commit carries its job's attempt, and an attempt that a newer one
//! replaced can no longer commit.
//!
//! Why: after a partition the coordinator restarts a job elsewhere while the old attempt's
//! ranks may still be running on the cut-off host. Once the network heals, the old rank 0
//! could commit a step over the directory the new attempt now owns: a manifest the new
//! attempt's own commit of that step would then collide with, and that `latest` would point
//! to. The attempt *id* of a save (a random nonce per run) tells runs apart but cannot order
//! them; the launcher's attempt number (the coordinator's counter, `GANTRY_ATTEMPT`) can.
//!
//! The rule, on storage that only offers create-if-absent (local disks and S3 alike):
//! - each attempt's rank 0 **claims** the directory before choosing a step to resume from:
//!   it creates `fence/<job>/attempt-<NNNNNNNNNN>` (zero-padded, so names sort as numbers);
//! - a **commit** lists `fence/<job>/` right before creating `manifest.json` and is refused
//!   ([`CheckpointError::Fenced`]) when a later attempt of the same job has claimed the
//!   directory; the manifest records the committing attempt (`fence`);
//! - a commit that finds the step already committed by an **older attempt of the same job**
//!   (a stale commit that slipped in between the old attempt's check and the new claim)
//!   replaces it, and the new attempt's other ranks wait for that instead of failing: a
//!   stale commit can never block a newer attempt.
//!
//! Fences of other jobs are not compared (two jobs' attempt numbers say nothing about each
//! other), and saves without a fence (a local launch, a bare Saver) neither claim nor check.

use crate::error::CheckpointError;
use crate::store::Store;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where claims live under a checkpoint directory.
pub const FENCE_DIR: &str = "fence";
/// Longest job id a fence accepts (it becomes one path component).
const MAX_JOB_LEN: usize = 128;

/// A job's attempt as its launcher numbers them: a later attempt compares greater.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub job: String,
    pub attempt: u32,
}

impl Fence {
    /// A fence for `attempt` of `job`; the id must be a plain path component
    /// (`[A-Za-z0-9._-]`, not `.` or `..`, at most 128 characters).
    pub fn new(job: &str, attempt: u32) -> Result<Fence, CheckpointError> {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if job.is_empty() || job.len() > MAX_JOB_LEN || !job.chars().all(plain) || job == "." || job == ".." {
            return Err(CheckpointError::Io(format!(
                "job id {job:?} cannot name a checkpoint fence: it must be 1 to {MAX_JOB_LEN} of A-Z a-z 0-9 . _ -"
            )));
        }
        Ok(Fence {
            job: job.to_string(),
            attempt,
        })
    }

    fn dir(&self) -> String {
        format!("{FENCE_DIR}/{}", self.job)
    }

    /// `fence/<job>/attempt-<attempt, 10 digits>`.
    pub fn key(&self) -> String {
        format!("{}/attempt-{:010}", self.dir(), self.attempt)
    }
}

/// The attempt a claim's object name records (`attempt-0000000003` → 3).
pub fn parse_claim(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("attempt-")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The newest of the `claimed` attempts that supersedes attempt `own`, if any.
pub fn superseded_by(own: u32, claimed: impl IntoIterator<Item = u32>) -> Option<u32> {
    claimed.into_iter().filter(|a| *a > own).max()
}

/// What a manifest already present for a step means to a commit of that step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Committed by this very save attempt.
    Ours,
    /// Committed by an older attempt of the same job: the newer attempt replaces it.
    Stale,
    /// Anything else (another job, an unfenced save, a newer attempt): the step is taken.
    Taken,
}

/// Judges a manifest of save attempt `theirs_id` with fence `theirs` against a commit of
/// save attempt `own_id` with fence `own`.
pub fn judge_existing(own_id: &str, own: Option<&Fence>, theirs_id: &str, theirs: Option<&Fence>) -> Existing {
    if own_id == theirs_id {
        return Existing::Ours;
    }
    match (own, theirs) {
        (Some(o), Some(t)) if o.job == t.job && t.attempt < o.attempt => Existing::Stale,
        _ => Existing::Taken,
    }
}

/// The attempts of `fence.job` that claimed `store`.
fn claims(store: &Store, fence: &Fence) -> Result<Vec<u32>, CheckpointError> {
    let dir = format!("{}/", fence.dir());
    Ok(store
        .list(&dir)?
        .iter()
        .filter_map(|(key, _)| parse_claim(key.strip_prefix(&dir).unwrap_or(key)))
        .collect())
}

/// Refuse `action` when a later attempt of the same job has claimed `store`.
pub fn check(store: &Store, fence: &Fence, action: &str) -> Result<(), CheckpointError> {
    match superseded_by(fence.attempt, claims(store, fence)?) {
        Some(newer) => Err(CheckpointError::Fenced {
            action: action.to_string(),
            job: fence.job.clone(),
            attempt: fence.attempt,
            newer,
            url: store.url().to_string(),
        }),
        None => Ok(()),
    }
}

/// Claim `store` for `fence` (rank 0, before choosing a step to resume from): from now on
/// older attempts of the job cannot commit there. Refused when a later attempt already has.
pub fn claim(store: &Store, fence: &Fence) -> Result<(), CheckpointError> {
    let record = serde_json::to_vec(fence).expect("a fence serializes");
    // Already there: this attempt claimed it before (a rank 0 that restarted its saver).
    store.put_if_absent(&fence.key(), Bytes::from(record))?;
    check(store, fence, "cannot start saving")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(job: &str, attempt: u32) -> Fence {
        Fence::new(job, attempt).unwrap()
    }

    #[test]
    fn claims_are_named_so_they_sort_as_numbers_and_parse_back() {
        assert_eq!(f("12", 3).key(), "fence/12/attempt-0000000003");
        assert_eq!(f("12", u32::MAX).key(), "fence/12/attempt-4294967295");
        for a in [0, 1, 9, 10, 4_294_967_295] {
            let key = f("j", a).key();
            assert_eq!(parse_claim(key.rsplit('/').next().unwrap()), Some(a), "{key}");
        }
        for bad in [
            "attempt-3",
            "attempt-00000000003",
            "attempt-000000000x",
            "x-0000000003",
            "",
            "attempt-",
        ] {
            assert_eq!(parse_claim(bad), None, "{bad}");
        }
        assert_eq!(parse_claim("attempt-9999999999"), None, "beyond u32");
    }

    #[test]
    fn job_ids_must_be_one_plain_path_component() {
        for ok in ["12", "quickstart-7", "run_3.b"] {
            assert_eq!(Fence::new(ok, 1).unwrap().job, ok);
        }
        let long = "x".repeat(129);
        for bad in ["", ".", "..", "a/b", "a b", "é", long.as_str()] {
            let e = Fence::new(bad, 1).unwrap_err().to_string();
            assert!(e.contains("cannot name a checkpoint fence"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn only_a_later_attempt_supersedes() {
        assert_eq!(superseded_by(2, []), None);
        assert_eq!(superseded_by(2, [1, 2]), None, "older and own claims do not");
        assert_eq!(superseded_by(2, [1, 3, 2, 5, 4]), Some(5), "the newest is named");
        assert_eq!(superseded_by(0, [0]), None);
        assert_eq!(superseded_by(u32::MAX, [u32::MAX]), None);
    }

    #[test]
    fn an_existing_commit_is_ours_stale_or_taken() {
        use Existing::*;
        let (a1, a2, b3) = (Some(f("7", 1)), Some(f("7", 2)), Some(f("8", 3)));
        // (own save id, own fence, their save id, their fence) → verdict
        let cases = [
            ("s", &None, "s", &None, Ours),
            ("s", &a2, "s", &a1, Ours),
            ("n", &a2, "o", &a1, Stale),
            ("o", &a1, "n", &a2, Taken),
            ("n", &a2, "o", &a2, Taken),
            ("n", &b3, "o", &a1, Taken),
            ("n", &a2, "o", &None, Taken),
            ("n", &None, "o", &a1, Taken),
            ("n", &None, "o", &None, Taken),
        ];
        for (own_id, own, theirs_id, theirs, want) in cases {
            let got = judge_existing(own_id, own.as_ref(), theirs_id, theirs.as_ref());
            assert_eq!(got, want, "{own_id} {own:?} vs {theirs_id} {theirs:?}");
        }
    }
}
