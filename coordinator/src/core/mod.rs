//! The pure scheduling core: events in, actions out, no I/O and no clock of its own.
//!
//! [`Scheduler`] owns the cluster's truth (workers, jobs, placements, restart counts) and
//! changes it only in response to calls that carry the current time in milliseconds:
//! a worker registering, a heartbeat with rank reports, a submission, a cancel, a mode
//! change, a timer tick. Each call returns the [`Action`]s it decided. The desired rank set
//! of every worker ([`Scheduler::desired`]) follows from the state, so the shell only has to
//! hand it to the worker on its next heartbeat, and persist the records that
//! [`Scheduler::take_dirty`] names.
//!
//! Policy, in one place:
//! - Queue: by priority (higher first), then submission order; strict, so a large job at
//!   the head is not starved by smaller ones behind it.
//! - Placement: gang (all or nothing), TP groups inside a worker; see [`placement`]. Starting
//!   the head of the queue, its master port and the usage tables live in `queue.rs`.
//! - A rank exiting non-zero (or failing to start), or its worker missing heartbeats past
//!   the deadline, ends the attempt: every rank of the job is stopped and the job is queued
//!   again (resuming from its latest checkpoint) until `max_restarts` is spent.
//! - A silent worker is lost only while the coordinator hears the others: with every worker
//!   silent at once the coordinator takes itself to be the one cut off, declares nobody lost
//!   and, once workers are heard again, credits them the time nobody could be heard (see
//!   [`hearing`]). Running ranks never needed the coordinator, so they train on meanwhile.
//! - Elastic jobs restarting after a failure take the largest data-parallel degree that fits
//!   (a divisor of the requested one, at least `min_dp`), and grow back on later restarts.
//! - A failed rank whose error names a peer rank as dead blames that peer: the restart
//!   reason names the peer's rank and worker, and the peer's worker is suspected, not
//!   placeable until heard from or lost (see [`suspect`]). One lost worker costs one restart.

pub mod hearing;
pub mod model;
pub mod placement;
mod queue;
pub mod suspect;

pub use model::*;

use hearing::{Hearing, Verdict};
use placement::Shape;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use suspect::Suspects;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// A worker silent this long is lost and its jobs restart (default 10 s).
    pub heartbeat_deadline_ms: u64,
    /// A rank whose step time exceeds the median by this factor is flagged as a straggler.
    pub straggler_factor: f64,
    /// Events kept per job (oldest dropped first, the first one kept).
    pub max_events_per_job: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            heartbeat_deadline_ms: 10_000,
            straggler_factor: 1.5,
            max_events_per_job: 200,
        }
    }
}

#[derive(Default)]
struct Usage {
    slots: u32,
    gpus: BTreeSet<u32>,
}

pub struct Scheduler {
    config: SchedulerConfig,
    workers: BTreeMap<String, Worker>,
    jobs: BTreeMap<JobId, Job>,
    next_job: JobId,
    /// Ranks of running jobs on each worker (derived from placements), so a heartbeat costs
    /// O(ranks on that worker), not O(ranks of its jobs).
    by_worker: HashMap<String, BTreeMap<JobId, Vec<u32>>>,
    usage: HashMap<String, Usage>,
    port_cursor: HashMap<String, u16>,
    dirty_jobs: BTreeSet<JobId>,
    dirty_workers: BTreeSet<String>,
    /// Workers a peer-death report named; not placeable until heard from or lost.
    suspects: Suspects,
    /// Whether any worker is heard at all (a coordinator cut off loses nobody).
    hearing: Hearing,
}

/// A limit on job size that keeps a hostile request from allocating the world.
pub const MAX_WORLD: u64 = 1 << 20;

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Scheduler {
        Scheduler::restore(config, Vec::new(), Vec::new(), 0)
    }

    /// Rebuild from persisted records (a restarted coordinator). Every worker gets a fresh
    /// heartbeat deadline from `now_ms`: it has that long to reconnect.
    pub fn restore(config: SchedulerConfig, workers: Vec<Worker>, jobs: Vec<Job>, now_ms: u64) -> Scheduler {
        let mut s = Scheduler {
            config,
            workers: BTreeMap::new(),
            jobs: BTreeMap::new(),
            next_job: 1,
            by_worker: HashMap::new(),
            usage: HashMap::new(),
            port_cursor: HashMap::new(),
            dirty_jobs: BTreeSet::new(),
            dirty_workers: BTreeSet::new(),
            suspects: Suspects::default(),
            hearing: Hearing::new(now_ms),
        };
        for mut w in workers {
            w.last_heartbeat_ms = now_ms;
            s.workers.insert(w.info.name.clone(), w);
        }
        for job in jobs {
            s.next_job = s.next_job.max(job.id + 1);
            // Continue the port rotation past every port a restored job used, so the next
            // attempt does not reuse one its predecessor may still hold.
            if let Some(first) = job.placement.first()
                && job.master_port > 0
            {
                let cursor = s.port_cursor.entry(first.worker.clone()).or_insert(0);
                *cursor = (*cursor).max(job.master_port.saturating_add(1));
            }
            let id = job.id;
            let running = job.state == JobState::Running;
            s.jobs.insert(id, job);
            if running {
                s.occupy(id);
            }
        }
        s
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }
    pub fn worker(&self, name: &str) -> Option<&Worker> {
        self.workers.get(name)
    }
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }
    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Whether a peer-death report made `worker` unplaceable until it is heard from.
    pub fn is_suspected(&self, worker: &str) -> bool {
        self.suspects.is_suspected(worker)
    }

    /// Slots in use and ranks running on `worker`.
    pub fn worker_load(&self, worker: &str) -> (u32, usize) {
        let slots = self.usage.get(worker).map_or(0, |u| u.slots);
        let ranks = self
            .by_worker
            .get(worker)
            .map_or(0, |jobs| jobs.values().map(Vec::len).sum());
        (slots, ranks)
    }

    /// Records changed since the last call; the shell persists them before answering.
    pub fn take_dirty(&mut self) -> (Vec<JobId>, Vec<String>) {
        (
            std::mem::take(&mut self.dirty_jobs).into_iter().collect(),
            std::mem::take(&mut self.dirty_workers).into_iter().collect(),
        )
    }

    /// The rank processes `worker` should be running now: (job, rank) of current attempts.
    pub fn desired(&self, worker: &str) -> Vec<(&Job, u32)> {
        let Some(jobs) = self.by_worker.get(worker) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (id, ranks) in jobs {
            let job = &self.jobs[id];
            out.extend(ranks.iter().map(|r| (job, *r)));
        }
        out
    }

    // ------------------------------------------------------------------ events

    /// A worker daemon registered (first time, after a restart, or after losing us).
    pub fn worker_joined(&mut self, now_ms: u64, info: WorkerInfo, running: Vec<RankReport>) -> Vec<Action> {
        let name = info.name.clone();
        let mode = self.workers.get(&name).map_or(WorkerMode::Active, |w| w.mode);
        self.workers.insert(
            name.clone(),
            Worker {
                info,
                mode,
                alive: true,
                last_heartbeat_ms: now_ms,
            },
        );
        self.dirty_workers.insert(name.clone());
        let mut actions = Vec::new();
        self.heard_from(now_ms, &name, &mut actions);
        let reported: BTreeSet<(JobId, u32, u32)> = running.iter().map(|r| (r.job, r.attempt, r.rank)).collect();
        for r in running {
            self.apply_report(now_ms, &name, r, &mut actions);
        }
        // A rank it was running that it no longer reports died with a previous incarnation
        // of the worker daemon: that attempt cannot finish.
        let lost: Vec<(JobId, u32)> = self
            .by_worker
            .get(&name)
            .into_iter()
            .flat_map(|jobs| jobs.iter())
            .flat_map(|(id, ranks)| ranks.iter().map(move |r| (*id, *r)))
            .filter(|(id, r)| {
                let job = &self.jobs[id];
                matches!(job.ranks[*r as usize].phase, RankPhase::Running { .. })
                    && !reported.contains(&(*id, job.attempt, *r))
            })
            .collect();
        for (id, rank) in lost {
            let reason = format!("rank {rank} on worker {name} is gone: the worker daemon restarted without it");
            self.fail_attempt(now_ms, id, reason, &mut actions);
        }
        self.schedule(now_ms, &mut actions);
        actions
    }

    /// A heartbeat. Returns `None` when the worker must register again (unknown, or
    /// declared lost: its ranks were already given up on).
    pub fn heartbeat(&mut self, now_ms: u64, worker: &str, reports: Vec<RankReport>) -> Option<Vec<Action>> {
        let w = self.workers.get_mut(worker)?;
        if !w.alive {
            return None;
        }
        w.last_heartbeat_ms = now_ms;
        let mut actions = Vec::new();
        self.heard_from(now_ms, worker, &mut actions);
        for r in reports {
            self.apply_report(now_ms, worker, r, &mut actions);
        }
        if !actions.is_empty() {
            self.schedule(now_ms, &mut actions);
        }
        Some(actions)
    }

    pub fn submit(&mut self, now_ms: u64, mut request: JobRequest) -> Result<(JobId, Vec<Action>), SubmitError> {
        validate(&mut request)?;
        let world = request.world();
        let shape = Shape {
            world,
            tp: request.tp,
            gpus_per_rank: request.gpus_per_rank,
            labels: &request.labels,
        };
        let what = format!(
            "dp {} × tp {} × pp {}{}",
            request.dp,
            request.tp,
            request.pp,
            if request.gpus_per_rank > 0 {
                format!(", {} GPU each", request.gpus_per_rank)
            } else {
                String::new()
            }
        );
        let now_free = placement::rank_capacity(&self.capacities(), &shape);
        let queue_ahead = self.jobs.values().any(|j| j.state == JobState::Queued);
        if !request.queue && (now_free < world || queue_ahead) {
            let reason = if now_free < world {
                format!("only {now_free} fit on the schedulable workers now")
            } else {
                "other jobs are waiting ahead of it".to_string()
            };
            return Err(SubmitError::DoesNotFit {
                name: request.name,
                needed: world,
                what,
                reason,
            });
        }
        let id = self.next_job;
        self.next_job += 1;
        let dp = request.dp;
        let mut job = Job {
            id,
            request,
            state: JobState::Queued,
            reason: String::new(),
            attempt: 0,
            restarts: 0,
            dp,
            placement: Vec::new(),
            master_addr: String::new(),
            master_port: 0,
            ranks: Vec::new(),
            events: Vec::new(),
            submitted_ms: now_ms,
            finished_ms: 0,
        };
        push_event(&mut job, now_ms, "submitted", format!("{what}, {world} ranks"), 0);
        self.jobs.insert(id, job);
        self.dirty_jobs.insert(id);
        let mut actions = Vec::new();
        self.schedule(now_ms, &mut actions);
        Ok((id, actions))
    }

    pub fn cancel(&mut self, now_ms: u64, id: JobId) -> Result<Vec<Action>, AdminError> {
        let state = self.jobs.get(&id).ok_or(AdminError::UnknownJob(id))?.state;
        let mut actions = Vec::new();
        if !state.is_final() {
            self.finish(
                now_ms,
                id,
                JobState::Cancelled,
                "cancelled by request".into(),
                &mut actions,
            );
            self.schedule(now_ms, &mut actions);
        }
        Ok(actions)
    }

    pub fn set_mode(&mut self, now_ms: u64, worker: &str, mode: WorkerMode) -> Result<Vec<Action>, AdminError> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| AdminError::UnknownWorker(worker.to_string()))?;
        w.mode = mode;
        self.dirty_workers.insert(worker.to_string());
        let mut actions = Vec::new();
        self.schedule(now_ms, &mut actions);
        Ok(actions)
    }

    /// Timer: declare silent workers lost (restarting their jobs) and retry the queue. While
    /// no worker at all is heard, nobody is declared lost (see [`hearing`]).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let deadline = self.config.heartbeat_deadline_ms;
        let alive = self.workers.values().filter(|w| w.alive).count();
        if let Verdict::Isolated { silent_ms, newly } = self.hearing.tick(now_ms, deadline, alive) {
            if newly {
                actions.push(Action::Isolated { silent_ms, alive });
            }
            self.schedule(now_ms, &mut actions);
            return actions;
        }
        let lost: Vec<(String, u64)> = self
            .workers
            .values()
            .filter(|w| w.alive && now_ms.saturating_sub(w.last_heartbeat_ms) > deadline)
            .map(|w| (w.info.name.clone(), now_ms - w.last_heartbeat_ms))
            .collect();
        for (name, silent_ms) in lost {
            if let Some(w) = self.workers.get_mut(&name) {
                w.alive = false;
            }
            self.dirty_workers.insert(name.clone());
            actions.push(Action::MarkWorkerLost {
                worker: name.clone(),
                silent_ms,
            });
            let jobs: Vec<JobId> = self
                .by_worker
                .get(&name)
                .map(|s| s.keys().copied().collect())
                .unwrap_or_default();
            self.confirm_suspicion(now_ms, &name, silent_ms, &jobs);
            for id in jobs {
                let reason = format!(
                    "worker {name} lost: no heartbeat for {:.1} s",
                    silent_ms as f64 / 1000.0
                );
                self.fail_attempt(now_ms, id, reason, &mut actions);
            }
        }
        self.schedule(now_ms, &mut actions);
        actions
    }

    /// Ranks whose step time is above `straggler_factor` × the median of the job's ranks.
    pub fn stragglers(&self, job: &Job) -> Vec<bool> {
        let times: Vec<f64> = job
            .ranks
            .iter()
            .filter_map(|r| r.stats.as_ref().map(|s| s.step_ms))
            .filter(|t| *t > 0.0)
            .collect();
        if times.len() < 2 {
            return vec![false; job.ranks.len()];
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        job.ranks
            .iter()
            .map(|r| {
                r.stats
                    .as_ref()
                    .is_some_and(|s| s.step_ms > self.config.straggler_factor * median)
            })
            .collect()
    }

    // ------------------------------------------------------------------ internals

    fn apply_report(&mut self, now_ms: u64, worker: &str, r: RankReport, actions: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&r.job) else { return };
        let rank = r.rank as usize;
        // An attempt has ended when a later one exists, or when the job went back to the
        // queue (or gave up) after it and no later one was placed yet.
        let ended = r.attempt < job.attempt
            || (r.attempt == job.attempt
                && job.attempt > 0
                && matches!(job.state, JobState::Queued | JobState::Failed));
        if ended {
            self.record_late_exit(now_ms, worker, &r);
            return;
        }
        if job.state != JobState::Running
            || r.attempt != job.attempt
            || rank >= job.placement.len()
            || job.placement[rank].worker != worker
        {
            return; // a stranger: not desired, the worker stops it
        }
        if let Some(stats) = &r.stats {
            job.ranks[rank].stats = Some(stats.clone());
        }
        let failure = match &r.phase {
            RankPhase::Pending => None,
            RankPhase::Running { .. } => {
                if matches!(job.ranks[rank].phase, RankPhase::Pending | RankPhase::Running { .. }) {
                    job.ranks[rank].phase = r.phase.clone();
                }
                None
            }
            RankPhase::Exited { code: Some(0), .. } => {
                if job.ranks[rank].phase != r.phase {
                    job.ranks[rank].phase = r.phase.clone();
                    self.dirty_jobs.insert(r.job);
                }
                None
            }
            RankPhase::Exited { .. } | RankPhase::FailedToStart { .. } => {
                job.ranks[rank].phase = r.phase.clone();
                failure_text(&r.phase)
            }
        };
        if let Some(how) = failure {
            let reason = self.blame(now_ms, worker, &r, &how, actions);
            self.fail_attempt(now_ms, r.job, reason, actions);
            return;
        }
        let job = &self.jobs[&r.job];
        if job.ranks.iter().all(|s| {
            s.phase
                == (RankPhase::Exited {
                    code: Some(0),
                    signal: None,
                })
        }) {
            let msg = format!("all {} ranks exited with code 0", job.ranks.len());
            self.finish(now_ms, r.job, JobState::Succeeded, msg, actions);
        }
    }

    /// A report about an attempt that already ended: how its ranks went is still worth
    /// recording (the rank that failed first is not always the culprit).
    fn record_late_exit(&mut self, now_ms: u64, worker: &str, r: &RankReport) {
        let max_events = self.config.max_events_per_job;
        let (Some(job), Some(how)) = (self.jobs.get_mut(&r.job), failure_text(&r.phase)) else {
            return;
        };
        let msg = format!("attempt {}: rank {} on worker {worker} {how}", r.attempt, r.rank);
        if !job.events.iter().any(|e| e.message == msg) {
            push_event(job, now_ms, "rank-exit", msg, max_events);
            self.dirty_jobs.insert(r.job);
        }
    }

    /// Why the current attempt of `r.job` failed, given that rank `r.rank` on `worker`
    /// failed (`how`). When its error names another rank of the attempt as the one that
    /// failed, that rank is the culprit: the reason names it and its worker, and that worker
    /// (when it is another live one) is suspected until heard from. Otherwise the reporting
    /// rank is the culprit.
    fn blame(&mut self, now_ms: u64, worker: &str, r: &RankReport, how: &str, actions: &mut Vec<Action>) -> String {
        let job = &self.jobs[&r.job];
        let peer = r.blamed.filter(|b| *b != r.rank && (*b as usize) < job.placement.len());
        let Some(peer) = peer else {
            return format!("rank {} on worker {worker} {how}", r.rank);
        };
        let peer_worker = job.placement[peer as usize].worker.clone();
        let attempt = job.attempt;
        let alive = self.workers.get(&peer_worker).is_some_and(|w| w.alive);
        if peer_worker != worker && alive && self.suspects.suspect(now_ms, &peer_worker, r.job, attempt) {
            actions.push(Action::SuspectWorker {
                worker: peer_worker.clone(),
                job: r.job,
                rank: peer,
            });
        }
        format!(
            "rank {peer} on worker {peer_worker} failed, as reported by rank {} on worker {worker}, which {how}",
            r.rank
        )
    }

    /// `worker` was heard from: it is alive, whatever a peer's report said. The first worker
    /// heard after an isolation credits every live worker the time nobody could be heard.
    fn heard_from(&mut self, now_ms: u64, worker: &str, actions: &mut Vec<Action>) {
        if let Some(credit) = self.hearing.heard(now_ms) {
            for w in self.workers.values_mut().filter(|w| w.alive) {
                w.last_heartbeat_ms = w.last_heartbeat_ms.saturating_add(credit).min(now_ms);
            }
            actions.push(Action::HeardAgain {
                worker: worker.to_string(),
                silent_ms: credit,
            });
        }
        if self.suspects.heard_from(worker).is_some() {
            actions.push(Action::ClearSuspicion {
                worker: worker.to_string(),
            });
        }
    }

    /// A worker just declared lost was suspected: the jobs whose failure named it learn
    /// that it is gone (jobs still running on it learn it from their restart reason).
    fn confirm_suspicion(&mut self, now_ms: u64, name: &str, silent_ms: u64, running: &[JobId]) {
        let Some(suspicion) = self.suspects.lost(name) else {
            return;
        };
        let max_events = self.config.max_events_per_job;
        for (id, attempt) in suspicion.reports {
            if running.contains(&id) {
                continue;
            }
            let Some(job) = self.jobs.get_mut(&id) else { continue };
            let msg = format!(
                "worker {name} lost: no heartbeat for {:.1} s; it held the rank that ended attempt {attempt}",
                silent_ms as f64 / 1000.0
            );
            push_event(job, now_ms, "worker-lost", msg, max_events);
            self.dirty_jobs.insert(id);
        }
    }

    /// End the current attempt after a failure: stop every rank, then queue a restart or
    /// give up.
    fn fail_attempt(&mut self, now_ms: u64, id: JobId, reason: String, actions: &mut Vec<Action>) {
        let max_events = self.config.max_events_per_job;
        let Some(job) = self.jobs.get(&id) else { return };
        if job.state != JobState::Running {
            return;
        }
        if job.restarts >= job.request.max_restarts {
            let why = format!(
                "{reason}; gave up after {} restarts (max_restarts = {})",
                job.restarts, job.request.max_restarts
            );
            self.finish(now_ms, id, JobState::Failed, why, actions);
            return;
        }
        self.release(id, actions);
        let job = self.jobs.get_mut(&id).expect("checked above");
        job.restarts += 1;
        job.state = JobState::Queued;
        let restart = job.restarts;
        push_event(
            job,
            now_ms,
            "restart",
            format!("restart {restart}: {reason}"),
            max_events,
        );
        self.dirty_jobs.insert(id);
        actions.push(Action::RestartJob {
            job: id,
            restart,
            reason,
        });
    }

    fn finish(&mut self, now_ms: u64, id: JobId, state: JobState, reason: String, actions: &mut Vec<Action>) {
        let max_events = self.config.max_events_per_job;
        if self.jobs.get(&id).is_some_and(|j| j.state == JobState::Running) {
            self.release(id, actions);
        }
        let job = self.jobs.get_mut(&id).expect("caller checked the job exists");
        job.state = state;
        job.reason = reason.clone();
        job.finished_ms = now_ms;
        push_event(job, now_ms, state.name(), reason.clone(), max_events);
        self.dirty_jobs.insert(id);
        actions.push(Action::FinishJob { job: id, state, reason });
    }
}

fn validate(r: &mut JobRequest) -> Result<(), SubmitError> {
    let bad = |m: String| Err(SubmitError::Invalid(m));
    if r.name.trim().is_empty() {
        r.name = "job".into();
    }
    if r.dp == 0 || r.tp == 0 || r.pp == 0 {
        return bad(format!(
            "dp, tp and pp must be at least 1 (got dp {} tp {} pp {})",
            r.dp, r.tp, r.pp
        ));
    }
    if r.world() > MAX_WORLD {
        return bad(format!(
            "{} ranks is more than the {MAX_WORLD} a job may have",
            r.world()
        ));
    }
    if r.gpus_per_rank > 64 {
        return bad(format!("gpus_per_rank {} is more than any node has", r.gpus_per_rank));
    }
    if r.min_dp == 0 {
        r.min_dp = 1;
    }
    if r.min_dp > r.dp {
        return bad(format!("min_dp {} is larger than dp {}", r.min_dp, r.dp));
    }
    match &r.program {
        Program::Command { argv, .. } if argv.is_empty() || argv[0].is_empty() => {
            bad("`command` is empty: give the program and its arguments".into())
        }
        Program::Train { spec_toml } if spec_toml.trim().is_empty() => bad("the training spec is empty".into()),
        _ => Ok(()),
    }
}

/// How a rank ended, when that is a failure.
fn failure_text(phase: &RankPhase) -> Option<String> {
    match phase {
        RankPhase::Exited { signal: Some(s), .. } => Some(format!("was killed by signal {s}")),
        RankPhase::Exited { code: Some(0), .. } => None,
        RankPhase::Exited { code: Some(c), .. } => Some(format!("exited with code {c}")),
        RankPhase::Exited {
            code: None,
            signal: None,
        } => Some("exited".to_string()),
        RankPhase::FailedToStart { message } => Some(format!("failed to start: {message}")),
        RankPhase::Pending | RankPhase::Running { .. } => None,
    }
}

fn push_event(job: &mut Job, at_ms: u64, kind: &str, message: String, max: usize) {
    job.events.push(JobEvent {
        at_ms,
        kind: kind.to_string(),
        message,
    });
    let max = if max == 0 { usize::MAX } else { max.max(2) };
    if job.events.len() > max {
        job.events.remove(1);
    }
}
