//! Which step prefixes to delete after a commit: a pure function of what is on storage.

/// Keep the newest `keep_last` committed steps and every step divisible by `keep_every`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// `None` keeps everything.
    pub keep_last: Option<usize>,
    /// `None` or 0: no periodic keepers.
    pub keep_every: Option<u64>,
}

/// What to delete, given every committed and uncommitted step prefix found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Doomed {
    /// Committed checkpoints past the retention policy.
    pub committed: Vec<u64>,
    /// Half-written prefixes older than the newest commit: abandoned saves. Newer ones may be
    /// saves still in flight and are left alone.
    pub uncommitted: Vec<u64>,
}

pub fn doomed(committed: &[u64], uncommitted: &[u64], policy: Retention) -> Doomed {
    let mut sorted = committed.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let newest = sorted.last().copied();
    let mut out = Doomed::default();
    if let Some(keep) = policy.keep_last {
        // The newest commit is always kept: it is what a restart resumes from.
        let keep = keep.max(1);
        let cut = sorted.len().saturating_sub(keep);
        out.committed = sorted[..cut]
            .iter()
            .copied()
            .filter(|s| !matches!(policy.keep_every, Some(m) if m > 0 && s % m == 0))
            .collect();
    }
    if let Some(newest) = newest {
        let mut u: Vec<u64> = uncommitted.iter().copied().filter(|&s| s < newest).collect();
        u.sort_unstable();
        u.dedup();
        out.uncommitted = u;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_k_and_every_mth() {
        let committed = [100, 200, 300, 400, 500, 600];
        let d = doomed(
            &committed,
            &[],
            Retention {
                keep_last: Some(2),
                keep_every: Some(300),
            },
        );
        assert_eq!(d.committed, vec![100, 200, 400]);
        let all = doomed(&committed, &[], Retention::default());
        assert!(all.committed.is_empty());
    }

    #[test]
    fn the_newest_commit_survives_keep_zero() {
        let d = doomed(
            &[5, 10],
            &[],
            Retention {
                keep_last: Some(0),
                keep_every: None,
            },
        );
        assert_eq!(d.committed, vec![5]);
    }

    #[test]
    fn only_abandoned_saves_are_collected() {
        let d = doomed(&[100, 300], &[200, 400, 50], Retention::default());
        assert_eq!(d.uncommitted, vec![50, 200]);
        // Nothing committed yet: an uncommitted prefix may be the first save in flight.
        assert!(doomed(&[], &[100], Retention::default()).uncommitted.is_empty());
    }
}
