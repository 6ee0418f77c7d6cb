//! Suspected workers: the rule that keeps a restart off a worker that is probably dead.
//!
//! When a worker daemon dies, its ranks die with it at once, but the coordinator only learns
//! of it when the worker's heartbeat deadline passes. The ranks on other workers learn
//! sooner: their connections to the dead ranks close, and their last error names the peer
//! rank that died. A failed rank's report carries that peer (`RankReport::blamed`).
//!
//! The rule: a worker named by a peer-death report is *suspected*. A suspected worker is not
//! placeable (no new ranks go there) until it is heard from again (a heartbeat or a new
//! registration after the report) or its heartbeat deadline passes and it is declared lost.
//! The wait is bounded by that deadline; a live worker clears itself with its next
//! heartbeat (one heartbeat interval, less after an exit). Running ranks on it are left
//! alone: a suspicion only steers placement, the deadline still decides loss.
//!
//! Suspicions are not persisted: a restarted coordinator gives every worker a fresh
//! deadline, and a worker that stays silent is then lost as usual.

use super::model::JobId;
use std::collections::{BTreeMap, BTreeSet};

/// Why a worker is suspected: when, and which job attempts reported one of its ranks dead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suspicion {
    /// Time of the first report (scheduler clock, ms).
    pub since_ms: u64,
    /// (job, attempt) whose ranks named a rank on this worker.
    pub reports: BTreeSet<(JobId, u32)>,
}

/// The suspected workers, by name.
#[derive(Clone, Debug, Default)]
pub struct Suspects {
    by_worker: BTreeMap<String, Suspicion>,
}

impl Suspects {
    /// A report of `job`'s attempt `attempt` named a rank on `worker` as failed. Returns true
    /// when this starts a suspicion (the worker was not suspected before).
    pub fn suspect(&mut self, now_ms: u64, worker: &str, job: JobId, attempt: u32) -> bool {
        let new = !self.by_worker.contains_key(worker);
        let s = self.by_worker.entry(worker.to_string()).or_insert_with(|| Suspicion {
            since_ms: now_ms,
            reports: BTreeSet::new(),
        });
        s.reports.insert((job, attempt));
        new
    }

    /// The worker was heard from (a heartbeat or a registration): whatever the reports
    /// said, it is alive. Returns the suspicion it clears, if any.
    pub fn heard_from(&mut self, worker: &str) -> Option<Suspicion> {
        self.by_worker.remove(worker)
    }

    /// The worker was declared lost: the suspicion is confirmed. Returns it, if any.
    pub fn lost(&mut self, worker: &str) -> Option<Suspicion> {
        self.by_worker.remove(worker)
    }

    pub fn is_suspected(&self, worker: &str) -> bool {
        self.by_worker.contains_key(worker)
    }

    pub fn get(&self, worker: &str) -> Option<&Suspicion> {
        self.by_worker.get(worker)
    }

    pub fn is_empty(&self) -> bool {
        self.by_worker.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspicion_starts_once_and_collects_reports() {
        let mut s = Suspects::default();
        assert!(!s.is_suspected("b"));
        assert!(s.suspect(100, "b", 1, 1));
        assert!(!s.suspect(150, "b", 2, 3), "already suspected");
        assert!(s.is_suspected("b") && !s.is_suspected("a"));
        let got = s.get("b").unwrap();
        assert_eq!(got.since_ms, 100, "the first report starts it");
        assert_eq!(got.reports.iter().copied().collect::<Vec<_>>(), [(1, 1), (2, 3)]);
    }

    #[test]
    fn hearing_from_the_worker_or_losing_it_ends_the_suspicion() {
        let mut s = Suspects::default();
        s.suspect(100, "b", 1, 1);
        s.suspect(100, "c", 1, 1);
        assert_eq!(s.heard_from("a"), None);
        assert_eq!(s.heard_from("b").map(|x| x.since_ms), Some(100));
        assert!(!s.is_suspected("b"));
        assert_eq!(s.lost("c").map(|x| x.reports.len()), Some(1));
        assert!(s.is_empty());
        assert_eq!(s.lost("c"), None);
    }

    // ---- the rule as the scheduler applies it

    use crate::core::{Action, JobRequest, JobState, RankPhase, RankReport, Scheduler, SchedulerConfig, WorkerInfo};
    use proptest::prelude::*;

    const DEADLINE: u64 = 10_000;

    fn scheduler(workers: &[(&str, u32)]) -> Scheduler {
        let mut s = Scheduler::new(SchedulerConfig {
            heartbeat_deadline_ms: DEADLINE,
            ..SchedulerConfig::default()
        });
        for (name, slots) in workers {
            s.worker_joined(0, WorkerInfo::cpu(name, *slots), Vec::new());
        }
        s
    }

    fn failed(job: JobId, attempt: u32, rank: u32, blamed: Option<u32>) -> RankReport {
        RankReport {
            job,
            attempt,
            rank,
            phase: RankPhase::Exited {
                code: Some(1),
                signal: None,
            },
            stats: None,
            blamed,
        }
    }

    fn submit(s: &mut Scheduler, dp: u32) -> JobId {
        let mut r = JobRequest::command("j", dp);
        r.max_restarts = 5;
        s.submit(0, r).unwrap().0
    }

    fn workers_of(s: &Scheduler, id: JobId) -> Vec<String> {
        s.job(id).unwrap().placement.iter().map(|p| p.worker.clone()).collect()
    }

    fn restart_reasons(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RestartJob { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_peer_on_the_reporters_own_worker_is_blamed_but_not_suspected() {
        let mut s = scheduler(&[("a", 2), ("b", 2)]);
        let id = submit(&mut s, 2);
        assert_eq!(workers_of(&s, id), ["a", "a"]);
        let actions = s.heartbeat(100, "a", vec![failed(id, 1, 0, Some(1))]).unwrap();
        assert_eq!(
            restart_reasons(&actions),
            ["rank 1 on worker a failed, as reported by rank 0 on worker a, which exited with code 1"]
        );
        assert!(!s.is_suspected("a"), "it is heartbeating right now");
        assert_eq!(workers_of(&s, id), ["a", "a"]);
    }

    #[test]
    fn a_blame_that_names_no_other_rank_of_the_attempt_blames_the_reporter() {
        let mut s = scheduler(&[("a", 1), ("b", 1)]);
        let id = submit(&mut s, 2);
        for (attempt, blamed) in [(1, Some(0)), (2, Some(2)), (3, Some(u32::MAX)), (4, None)] {
            let actions = s.heartbeat(100, "a", vec![failed(id, attempt, 0, blamed)]).unwrap();
            assert_eq!(
                restart_reasons(&actions),
                ["rank 0 on worker a exited with code 1"],
                "blamed {blamed:?}"
            );
            assert!(!s.is_suspected("a") && !s.is_suspected("b"));
        }
    }

    #[test]
    fn a_report_after_the_deadline_restart_changes_nothing() {
        let mut s = scheduler(&[("a", 1), ("b", 1), ("c", 1)]);
        let id = submit(&mut s, 2);
        s.heartbeat(DEADLINE, "a", Vec::new()).unwrap();
        s.heartbeat(DEADLINE, "c", Vec::new()).unwrap();
        // b is lost at the tick; a's report of the same failure arrives afterwards, about
        // an attempt that has ended: it changes nothing.
        let actions = s.tick(DEADLINE + 1);
        assert_eq!(restart_reasons(&actions), ["worker b lost: no heartbeat for 10.0 s"]);
        let actions = s.heartbeat(DEADLINE + 2, "a", vec![failed(id, 1, 0, Some(1))]).unwrap();
        assert!(restart_reasons(&actions).is_empty());
        assert!(!s.is_suspected("b"));
        assert_eq!(s.job(id).unwrap().restarts, 1);
    }

    #[test]
    fn the_wait_for_a_suspect_ends_at_its_deadline() {
        // Two workers only: the restart needs the suspect's slot, so it waits for it.
        let mut s = scheduler(&[("a", 1), ("b", 1)]);
        let id = submit(&mut s, 2);
        s.heartbeat(500, "b", Vec::new()).unwrap();
        let actions = s.heartbeat(1_000, "a", vec![failed(id, 1, 0, Some(1))]).unwrap();
        assert!(actions.contains(&Action::SuspectWorker {
            worker: "b".into(),
            job: id,
            rank: 1
        }));
        assert_eq!(s.job(id).unwrap().state, JobState::Queued);
        // Ticks before b's deadline change nothing: the job waits for b.
        for t in [2_000, 5_000, 500 + DEADLINE] {
            s.heartbeat(t, "a", Vec::new()).unwrap();
            assert!(s.tick(t).is_empty(), "at {t}");
            assert!(s.is_suspected("b"));
        }
        // Past the deadline b is lost, the suspicion is gone, and the job, still too big
        // for a alone, waits in the queue: one restart in all.
        let actions = s.tick(501 + DEADLINE);
        assert_eq!(
            actions,
            [Action::MarkWorkerLost {
                worker: "b".into(),
                silent_ms: DEADLINE + 1
            }]
        );
        assert!(!s.is_suspected("b"));
        let job = s.job(id).unwrap();
        assert_eq!((job.state, job.restarts), (JobState::Queued, 1));
        assert!(job.events.last().unwrap().message.starts_with("worker b lost"));
        // A new worker takes b's place.
        let actions = s.worker_joined(600 + DEADLINE, WorkerInfo::cpu("c", 1), Vec::new());
        assert!(matches!(actions[0], Action::PlaceJob { attempt: 2, .. }), "{actions:?}");
        assert_eq!(workers_of(&s, id), ["a", "c"]);
    }

    #[test]
    fn registering_again_clears_a_suspicion() {
        let mut s = scheduler(&[("a", 1), ("b", 1)]);
        let id = submit(&mut s, 2);
        s.heartbeat(100, "a", vec![failed(id, 1, 0, Some(1))]).unwrap();
        assert!(s.is_suspected("b"));
        assert_eq!(s.job(id).unwrap().state, JobState::Queued, "b's slot does not count");
        let actions = s.worker_joined(200, WorkerInfo::cpu("b", 1), Vec::new());
        assert_eq!(actions[0], Action::ClearSuspicion { worker: "b".into() });
        assert!(!s.is_suspected("b"));
        assert_eq!(workers_of(&s, id), ["a", "b"]);
        assert_eq!(s.job(id).unwrap().attempt, 2);
    }

    proptest! {
        /// Random failures, blames, heartbeats and ticks on 4 workers: no rank is ever
        /// started on a suspected worker, and no suspicion outlives its worker's deadline —
        /// unless, since that worker was last heard, a tick found nobody heard for half a
        /// deadline: the coordinator then takes itself to be cut off and credits every worker
        /// the silence (`hearing.rs`), so the deadline moves.
        #[test]
        fn suspects_get_no_ranks_and_suspicions_are_bounded(
            steps in proptest::collection::vec((0u8..4, 0usize..4, 0u32..4, 0u32..5, 1u64..3_000), 1..60),
        ) {
            let names = ["a", "b", "c", "d"];
            let mut s = scheduler(&[("a", 1), ("b", 1), ("c", 2), ("d", 1)]);
            let jobs = [submit(&mut s, 2), submit(&mut s, 3)];
            let mut now = 0;
            let mut heard: std::collections::BTreeMap<&str, u64> = names.iter().map(|n| (*n, 0)).collect();
            let mut anyone_heard = 0;
            let mut credited: std::collections::BTreeMap<&str, bool> = names.iter().map(|n| (*n, false)).collect();
            for (what, w, rank, blamed, dt) in steps {
                now += dt;
                let worker = names[w];
                if what == 3 && now - anyone_heard > DEADLINE / 2 {
                    credited.values_mut().for_each(|c| *c = true);
                }
                let actions = match what {
                    0 => {
                        let job = s.job(jobs[rank as usize % 2]).unwrap();
                        let report = failed(job.id, job.attempt, rank, (blamed < 4).then_some(blamed));
                        let a = s.heartbeat(now, worker, vec![report]);
                        if a.is_some() { heard.insert(worker, now); }
                        a.unwrap_or_default()
                    }
                    1 => {
                        let a = s.heartbeat(now, worker, Vec::new());
                        if a.is_some() { heard.insert(worker, now); }
                        a.unwrap_or_default()
                    }
                    2 => {
                        heard.insert(worker, now);
                        s.worker_joined(now, WorkerInfo::cpu(worker, if worker == "c" { 2 } else { 1 }), Vec::new())
                    }
                    _ => s.tick(now),
                };
                for a in &actions {
                    if let Action::StartRanks { worker, .. } = a {
                        prop_assert!(!s.is_suspected(worker), "ranks started on suspected {worker}: {actions:?}");
                    }
                }
                if heard[worker] == now {
                    anyone_heard = now;
                    credited.insert(worker, false);
                }
                if what == 3 {
                    for n in names.into_iter().filter(|n| !credited[n]) {
                        prop_assert!(
                            !(s.is_suspected(n) && now - heard[n] > DEADLINE),
                            "{n} still suspected {} ms after it was last heard from", now - heard[n]
                        );
                    }
                }
            }
        }
    }
}
