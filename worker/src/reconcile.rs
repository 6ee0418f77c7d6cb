//! The worker's one decision, with no I/O: given the ranks the coordinator wants here and the
//! ranks this worker knows, what to start, what to stop and what to forget.
//!
//! Rules (the coordinator relies on them):
//! - every (job, attempt, rank) is started at most once in the worker's lifetime: an exited
//!   rank that is still desired stays exited and keeps being reported, so a coordinator that
//!   missed the exit learns about it instead of getting a silent second run;
//! - a running rank that is no longer desired is stopped (once; a rank already being
//!   stopped is left to its grace period);
//! - an exited rank that is no longer desired is forgotten, once a coordinator has had its
//!   exit: a rank that ends while a call is in flight (a stale rank being stopped after a
//!   partition) is still reported, so its end is recorded rather than lost;
//! - a desired rank this worker started before but has since forgotten is refused (the
//!   caller records it as failed to start) rather than run twice or ignored, so the
//!   coordinator always hears back about every rank it asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One rank process of one attempt of one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RankKey {
    pub job: u64,
    pub attempt: u32,
    pub rank: u32,
}

impl fmt::Display for RankKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {} attempt {} rank {}", self.job, self.attempt, self.rank)
    }
}

/// What the worker knows about a rank, as far as reconciling is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// SIGTERM sent, waiting for the exit (SIGKILL follows after the grace period).
    Stopping,
    /// Exited, or never started (failed to start): final, and a coordinator has had it.
    Done,
    /// Final, but no reply has acknowledged a report of it yet: kept, desired or not.
    Unreported,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub start: Vec<RankKey>,
    pub stop: Vec<RankKey>,
    pub forget: Vec<RankKey>,
    /// Desired, started before, no longer known: record as failed to start.
    pub refuse: Vec<RankKey>,
}

/// `started` holds every key ever started (or attempted) on this worker, a superset of the
/// keys of `known`.
pub fn reconcile(desired: &BTreeSet<RankKey>, known: &BTreeMap<RankKey, Phase>, started: &BTreeSet<RankKey>) -> Plan {
    let mut plan = Plan::default();
    for key in desired {
        if known.contains_key(key) {
            continue;
        }
        if started.contains(key) {
            plan.refuse.push(*key);
        } else {
            plan.start.push(*key);
        }
    }
    for (key, phase) in known {
        if desired.contains(key) {
            continue;
        }
        match phase {
            Phase::Running => plan.stop.push(*key),
            Phase::Stopping | Phase::Unreported => {}
            Phase::Done => plan.forget.push(*key),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(job: u64, attempt: u32, rank: u32) -> RankKey {
        RankKey { job, attempt, rank }
    }

    fn set(keys: &[RankKey]) -> BTreeSet<RankKey> {
        keys.iter().copied().collect()
    }

    fn known(entries: &[(RankKey, Phase)]) -> BTreeMap<RankKey, Phase> {
        entries.iter().copied().collect()
    }

    #[test]
    fn nothing_desired_nothing_known_is_a_no_op() {
        assert_eq!(reconcile(&set(&[]), &known(&[]), &set(&[])), Plan::default());
    }

    #[test]
    fn new_desired_ranks_are_started() {
        let desired = set(&[k(1, 1, 0), k(1, 1, 1)]);
        let plan = reconcile(&desired, &known(&[]), &set(&[]));
        assert_eq!(plan.start, vec![k(1, 1, 0), k(1, 1, 1)]);
        assert!(plan.stop.is_empty() && plan.forget.is_empty() && plan.refuse.is_empty());
    }

    #[test]
    fn desired_running_and_stopping_ranks_are_left_alone() {
        let desired = set(&[k(1, 1, 0), k(1, 1, 1)]);
        let state = known(&[(k(1, 1, 0), Phase::Running), (k(1, 1, 1), Phase::Stopping)]);
        let plan = reconcile(&desired, &state, &desired);
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn an_exited_rank_that_is_still_desired_is_not_restarted() {
        let desired = set(&[k(1, 1, 0)]);
        let state = known(&[(k(1, 1, 0), Phase::Done)]);
        assert_eq!(reconcile(&desired, &state, &desired), Plan::default());
    }

    #[test]
    fn undesired_running_ranks_are_stopped_once() {
        let state = known(&[(k(1, 1, 0), Phase::Running), (k(1, 1, 1), Phase::Stopping)]);
        let started = set(&[k(1, 1, 0), k(1, 1, 1)]);
        let plan = reconcile(&set(&[]), &state, &started);
        assert_eq!(plan.stop, vec![k(1, 1, 0)]);
        assert!(plan.start.is_empty() && plan.forget.is_empty() && plan.refuse.is_empty());
    }

    #[test]
    fn undesired_exited_ranks_are_forgotten() {
        let state = known(&[(k(1, 1, 0), Phase::Done), (k(2, 1, 0), Phase::Done)]);
        let started = set(&[k(1, 1, 0), k(2, 1, 0)]);
        let plan = reconcile(&set(&[k(2, 1, 0)]), &state, &started);
        assert_eq!(plan.forget, vec![k(1, 1, 0)]);
        assert!(plan.start.is_empty() && plan.stop.is_empty() && plan.refuse.is_empty());
    }

    #[test]
    fn a_forgotten_rank_desired_again_is_refused_not_restarted() {
        let plan = reconcile(&set(&[k(1, 1, 0)]), &known(&[]), &set(&[k(1, 1, 0)]));
        assert_eq!(plan.refuse, vec![k(1, 1, 0)]);
        assert!(plan.start.is_empty());
    }

    #[test]
    fn a_new_attempt_replaces_the_old_one() {
        // Job restart: attempt 2 desired, attempt 1 still running or already exited.
        let desired = set(&[k(7, 2, 0), k(7, 2, 1)]);
        let state = known(&[(k(7, 1, 0), Phase::Running), (k(7, 1, 1), Phase::Done)]);
        let started = set(&[k(7, 1, 0), k(7, 1, 1)]);
        let plan = reconcile(&desired, &state, &started);
        assert_eq!(plan.start, vec![k(7, 2, 0), k(7, 2, 1)]);
        assert_eq!(plan.stop, vec![k(7, 1, 0)]);
        assert_eq!(plan.forget, vec![k(7, 1, 1)]);
        assert!(plan.refuse.is_empty());
    }

    /// Every combination of (desired?, phase or unknown, started before?) on one key.
    #[test]
    fn every_case_of_one_rank() {
        let key = k(3, 1, 0);
        let phases = [
            None,
            Some(Phase::Running),
            Some(Phase::Stopping),
            Some(Phase::Done),
            Some(Phase::Unreported),
        ];
        for is_desired in [false, true] {
            for phase in phases {
                // A known rank was necessarily started; only unknown ranks vary here.
                for was_started in [false, true] {
                    if phase.is_some() && !was_started {
                        continue;
                    }
                    let desired = if is_desired { set(&[key]) } else { set(&[]) };
                    let state = phase.map_or_else(BTreeMap::new, |p| known(&[(key, p)]));
                    let started = if was_started { set(&[key]) } else { set(&[]) };
                    let plan = reconcile(&desired, &state, &started);
                    let expect = match (is_desired, phase, was_started) {
                        (true, None, false) => Plan {
                            start: vec![key],
                            ..Plan::default()
                        },
                        (true, None, true) => Plan {
                            refuse: vec![key],
                            ..Plan::default()
                        },
                        (false, Some(Phase::Running), _) => Plan {
                            stop: vec![key],
                            ..Plan::default()
                        },
                        (false, Some(Phase::Done), _) => Plan {
                            forget: vec![key],
                            ..Plan::default()
                        },
                        _ => Plan::default(),
                    };
                    assert_eq!(
                        plan, expect,
                        "desired={is_desired} phase={phase:?} started={was_started}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_undesired_exit_is_kept_until_a_coordinator_has_had_it() {
        let state = known(&[(k(1, 1, 0), Phase::Unreported), (k(1, 1, 1), Phase::Done)]);
        let started = set(&[k(1, 1, 0), k(1, 1, 1)]);
        let plan = reconcile(&set(&[]), &state, &started);
        assert_eq!(plan.forget, vec![k(1, 1, 1)]);
        assert!(plan.start.is_empty() && plan.stop.is_empty() && plan.refuse.is_empty());
    }

    #[test]
    fn reconciling_the_applied_plan_again_changes_nothing() {
        let desired = set(&[k(1, 1, 0), k(1, 1, 1), k(2, 1, 0)]);
        let mut state = known(&[
            (k(1, 1, 0), Phase::Done),
            (k(9, 1, 0), Phase::Running),
            (k(9, 1, 1), Phase::Done),
        ]);
        let mut started = set(&[k(1, 1, 0), k(9, 1, 0), k(9, 1, 1), k(2, 1, 0)]);
        let plan = reconcile(&desired, &state, &started);
        for key in &plan.start {
            state.insert(*key, Phase::Running);
            started.insert(*key);
        }
        for key in &plan.stop {
            state.insert(*key, Phase::Stopping);
        }
        for key in &plan.forget {
            state.remove(key);
        }
        for key in &plan.refuse {
            state.insert(*key, Phase::Done);
        }
        assert_eq!(plan.refuse, vec![k(2, 1, 0)]);
        assert_eq!(reconcile(&desired, &state, &started), Plan::default());
    }
}
