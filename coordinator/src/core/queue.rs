//! Starting queued jobs: the queue order, gang placement onto the free capacity of placeable
//! workers, the master port, and the usage tables a running placement occupies (and frees
//! when its attempt ends). Everything here is part of [`Scheduler`]'s state changes; the
//! public calls in the parent module reach it through `schedule`, `capacities` (what a
//! submission could get now), `occupy` and `release`.

use super::placement::{self, Capacity, Shape};
use super::{Action, JobId, JobState, RankPhase, RankStatus, Scheduler, WorkerMode, push_event};
use std::collections::{BTreeMap, BTreeSet};

impl Scheduler {
    /// Free a running job's slots and tell its workers to stop its ranks. The placement
    /// stays on the record so views can still show where the ranks ran.
    pub(super) fn release(&mut self, id: JobId, actions: &mut Vec<Action>) {
        let job = &self.jobs[&id];
        let workers: BTreeSet<String> = job.placement.iter().map(|s| s.worker.clone()).collect();
        let attempt = job.attempt;
        for slot in &job.placement {
            if let Some(u) = self.usage.get_mut(&slot.worker) {
                u.slots = u.slots.saturating_sub(1);
                for g in &slot.gpus {
                    u.gpus.remove(g);
                }
            }
        }
        for w in workers {
            if let Some(jobs) = self.by_worker.get_mut(&w) {
                jobs.remove(&id);
            }
            actions.push(Action::StopRanks {
                worker: w,
                job: id,
                attempt,
            });
        }
    }

    /// Count a running job's placement in the usage tables.
    pub(super) fn occupy(&mut self, id: JobId) {
        let job = &self.jobs[&id];
        for (rank, slot) in job.placement.iter().enumerate() {
            let u = self.usage.entry(slot.worker.clone()).or_default();
            u.slots += 1;
            u.gpus.extend(slot.gpus.iter().copied());
            let jobs = self.by_worker.entry(slot.worker.clone()).or_default();
            jobs.entry(id).or_default().push(rank as u32);
        }
    }

    pub(super) fn capacities(&self) -> Vec<Capacity<'_>> {
        self.workers
            .values()
            .filter(|w| w.alive && w.mode == WorkerMode::Active && !self.suspects.is_suspected(&w.info.name))
            .map(|w| {
                let used = self.usage.get(&w.info.name);
                let used_slots = used.map_or(0, |u| u.slots);
                Capacity {
                    name: &w.info.name,
                    free_slots: w.info.slots.saturating_sub(used_slots),
                    free_gpus: w
                        .info
                        .gpus
                        .iter()
                        .map(|g| g.index)
                        .filter(|g| used.is_none_or(|u| !u.gpus.contains(g)))
                        .collect(),
                    labels: &w.info.labels,
                }
            })
            .collect()
    }

    /// Start queued jobs in priority order while the head of the queue fits.
    pub(super) fn schedule(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let mut queued: Vec<(i32, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| (j.request.priority, j.id))
            .collect();
        queued.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, id) in queued {
            if !self.try_start(now_ms, id, actions) {
                break;
            }
        }
    }

    fn try_start(&mut self, now_ms: u64, id: JobId, actions: &mut Vec<Action>) -> bool {
        let job = &self.jobs[&id];
        let req = &job.request;
        let mut choices = vec![req.dp];
        if req.elastic && job.restarts > 0 {
            choices.extend((req.min_dp.max(1)..req.dp).rev().filter(|d| req.dp.is_multiple_of(*d)));
        }
        let caps = self.capacities();
        let mut found = None;
        for dp in choices {
            let shape = Shape {
                world: dp as u64 * req.tp as u64 * req.pp as u64,
                tp: req.tp,
                gpus_per_rank: req.gpus_per_rank,
                labels: &req.labels,
            };
            if let Some(p) = placement::place(&caps, &shape) {
                found = Some((dp, p));
                break;
            }
        }
        drop(caps);
        let Some((dp, slots)) = found else { return false };
        let master_worker = slots[0].worker.clone();
        let port = self.next_port(&master_worker);
        let address = self.workers[&master_worker].info.address.clone();
        let max_events = self.config.max_events_per_job;
        let job = self.jobs.get_mut(&id).expect("queued job exists");
        let shrunk = dp != job.request.dp;
        job.state = JobState::Running;
        job.attempt += 1;
        job.dp = dp;
        job.ranks = vec![
            RankStatus {
                phase: RankPhase::Pending,
                stats: None
            };
            slots.len()
        ];
        job.placement = slots;
        job.master_addr = address;
        job.master_port = port;
        let mut per_worker: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (rank, s) in job.placement.iter().enumerate() {
            per_worker.entry(s.worker.clone()).or_default().push(rank as u32);
        }
        let what = format!(
            "attempt {} on {} worker(s), dp {}{}",
            job.attempt,
            per_worker.len(),
            dp,
            if shrunk {
                format!(" (elastic: requested {})", job.request.dp)
            } else {
                String::new()
            }
        );
        push_event(job, now_ms, "started", what, max_events);
        let attempt = job.attempt;
        actions.push(Action::PlaceJob { job: id, attempt, dp });
        for (worker, ranks) in per_worker {
            actions.push(Action::StartRanks {
                worker,
                job: id,
                attempt,
                ranks,
            });
        }
        self.occupy(id);
        self.dirty_jobs.insert(id);
        true
    }

    /// A MASTER_PORT from the worker's range, rotating so a restart never reuses the port
    /// its previous attempt may still hold, and skipping ports running jobs use.
    fn next_port(&mut self, worker: &str) -> u16 {
        let (lo, hi) = self.workers[worker].info.ports;
        let (lo, hi) = (lo.min(hi), hi.max(lo));
        let in_use: BTreeSet<u16> = self
            .by_worker
            .get(worker)
            .into_iter()
            .flat_map(|jobs| jobs.keys())
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.placement.first().is_some_and(|s| s.worker == worker))
            .map(|j| j.master_port)
            .collect();
        let cursor = self.port_cursor.entry(worker.to_string()).or_insert(lo);
        let span = (hi - lo) as u32 + 1;
        for _ in 0..span {
            let p = (*cursor).clamp(lo, hi);
            *cursor = if p >= hi { lo } else { p + 1 };
            if !in_use.contains(&p) {
                return p;
            }
        }
        lo
    }
}
