//! The gRPC handlers: each locks the coordinator, feeds the event to the scheduler, commits
//! what changed, and answers. One mutex is enough: every handler is microseconds of work
//! (heartbeats touch no disk unless a rank changed state), and a single order of events is
//! what makes the scheduler's decisions reproducible.

use crate::convert;
use crate::core::{Action, Scheduler, WorkerMode};
use crate::metrics::Counters;
use crate::proto as p;
use crate::state::StateStore;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status};

pub struct Inner {
    pub sched: Scheduler,
    pub store: StateStore,
    pub counters: Counters,
    pub heartbeat_ms: u32,
}

#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Coordinator {
    pub fn new(inner: Inner) -> Coordinator {
        Coordinator {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic inside a handler must not take the whole control plane down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Timer event: lost workers, queue retries.
    pub fn tick(&self) -> Result<(), Status> {
        let mut g = self.lock();
        let actions = g.sched.tick(now_ms());
        g.after(&actions)
    }
}

impl Inner {
    /// Log and count the actions, then persist what changed. An error here means the state
    /// could not be made durable: the caller is told so (and the decision stands in memory
    /// to be retried with the next change).
    pub fn after(&mut self, actions: &[Action]) -> Result<(), Status> {
        for a in actions {
            match a {
                Action::RestartJob { job, restart, reason } => {
                    self.counters.restarts += 1;
                    tracing::warn!(job, restart, "restarting job: {reason}");
                }
                Action::MarkWorkerLost { worker, silent_ms } => {
                    self.counters.workers_lost += 1;
                    tracing::warn!(worker, silent_ms, "worker lost");
                }
                Action::SuspectWorker { worker, job, rank } => {
                    self.counters.workers_suspected += 1;
                    tracing::warn!(
                        worker,
                        job,
                        rank,
                        "worker suspected: a peer reports its rank failed; no new ranks there until it is heard from"
                    );
                }
                Action::ClearSuspicion { worker } => tracing::info!(worker, "suspected worker heard from again"),
                Action::Isolated { silent_ms, alive } => {
                    self.counters.isolations += 1;
                    tracing::warn!(
                        silent_ms,
                        alive,
                        "no worker heard for {:.1} s: this coordinator is probably cut off; nobody is declared lost \
                         until workers are heard again (their ranks need no coordinator to train)",
                        *silent_ms as f64 / 1000.0
                    );
                }
                Action::HeardAgain { worker, silent_ms } => tracing::warn!(
                    worker,
                    silent_ms,
                    "workers heard again after {:.1} s of silence; every worker's deadline is extended by that much",
                    *silent_ms as f64 / 1000.0
                ),
                Action::FinishJob { job, state, reason } => tracing::info!(job, state = state.name(), "{reason}"),
                Action::PlaceJob { job, attempt, dp } => tracing::info!(job, attempt, dp, "job placed"),
                Action::StartRanks {
                    worker,
                    job,
                    attempt,
                    ranks,
                } => {
                    tracing::debug!(worker, job, attempt, ?ranks, "start ranks")
                }
                Action::StopRanks { worker, job, attempt } => tracing::debug!(worker, job, attempt, "stop ranks"),
            }
        }
        let (jobs, workers) = self.sched.take_dirty();
        if jobs.is_empty() && workers.is_empty() {
            return Ok(());
        }
        let s = &self.sched;
        self.store
            .save(
                jobs.iter().filter_map(|j| s.job(*j)),
                workers.iter().filter_map(|w| s.worker(w)),
            )
            .map_err(|e| {
                tracing::error!("{e}");
                Status::internal(format!("could not persist coordinator state: {e}"))
            })
    }
}

#[tonic::async_trait]
impl p::cluster_server::Cluster for Coordinator {
    async fn register(&self, req: Request<p::RegisterRequest>) -> Result<Response<p::RegisterReply>, Status> {
        let req = req.into_inner();
        let info = convert::worker_info(req.resources)?;
        let name = info.name.clone();
        let reports = req.ranks.into_iter().map(convert::rank_report).collect();
        let mut g = self.lock();
        let actions = g.sched.worker_joined(now_ms(), info, reports);
        g.counters.registrations += 1;
        g.after(&actions)?;
        tracing::info!(worker = name, "worker registered");
        let deadline = g.sched.config().heartbeat_deadline_ms;
        Ok(Response::new(p::RegisterReply {
            heartbeat_ms: g.heartbeat_ms,
            heartbeat_deadline_ms: deadline.min(u32::MAX as u64) as u32,
            desired: convert::desired(&g.sched, &name, g.store.job_secrets()),
        }))
    }

    async fn heartbeat(&self, req: Request<p::HeartbeatRequest>) -> Result<Response<p::HeartbeatReply>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let reports = req.ranks.into_iter().map(convert::rank_report).collect();
        let mut g = self.lock();
        let reply = match g.sched.heartbeat(now_ms(), &req.worker, reports) {
            None => p::HeartbeatReply {
                known: false,
                desired: Vec::new(),
            },
            Some(actions) => {
                g.after(&actions)?;
                p::HeartbeatReply {
                    known: true,
                    desired: convert::desired(&g.sched, &req.worker, g.store.job_secrets()),
                }
            }
        };
        g.counters.observe_heartbeat(started.elapsed().as_secs_f64());
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl p::admin_server::Admin for Coordinator {
    async fn submit(&self, req: Request<p::SubmitRequest>) -> Result<Response<p::SubmitReply>, Status> {
        let request = convert::job_request(req.into_inner().job)?;
        let mut g = self.lock();
        let (id, actions) = g.sched.submit(now_ms(), request).map_err(|e| match e {
            crate::core::SubmitError::Invalid(m) => Status::invalid_argument(m),
            e @ crate::core::SubmitError::DoesNotFit { .. } => Status::resource_exhausted(e.to_string()),
        })?;
        g.counters.submits += 1;
        g.after(&actions)?;
        let state = g.sched.job(id).map_or("queued", |j| j.state.name()).to_string();
        tracing::info!(job = id, state, "job submitted");
        Ok(Response::new(p::SubmitReply { job: id, state }))
    }

    async fn list_jobs(&self, _req: Request<p::ListJobsRequest>) -> Result<Response<p::ListJobsReply>, Status> {
        let g = self.lock();
        let jobs = g.sched.jobs().map(|j| convert::job_view(&g.sched, j)).collect();
        Ok(Response::new(p::ListJobsReply { jobs }))
    }

    async fn get_job(&self, req: Request<p::GetJobRequest>) -> Result<Response<p::JobView>, Status> {
        let id = req.into_inner().job;
        let g = self.lock();
        let job = g
            .sched
            .job(id)
            .ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        Ok(Response::new(convert::job_view(&g.sched, job)))
    }

    async fn cancel_job(&self, req: Request<p::CancelJobRequest>) -> Result<Response<p::CancelJobReply>, Status> {
        let id = req.into_inner().job;
        let mut g = self.lock();
        let actions = g
            .sched
            .cancel(now_ms(), id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        g.after(&actions)?;
        let job = g.sched.job(id).map(|j| convert::job_view(&g.sched, j));
        Ok(Response::new(p::CancelJobReply { job }))
    }

    async fn list_workers(
        &self,
        _req: Request<p::ListWorkersRequest>,
    ) -> Result<Response<p::ListWorkersReply>, Status> {
        let g = self.lock();
        let now = now_ms();
        let workers = g
            .sched
            .workers()
            .map(|w| convert::worker_view(&g.sched, w, now))
            .collect();
        Ok(Response::new(p::ListWorkersReply { workers }))
    }

    async fn set_worker_mode(
        &self,
        req: Request<p::SetWorkerModeRequest>,
    ) -> Result<Response<p::SetWorkerModeReply>, Status> {
        let req = req.into_inner();
        let mode = match p::WorkerMode::try_from(req.mode) {
            Ok(p::WorkerMode::Active) => WorkerMode::Active,
            Ok(p::WorkerMode::Cordoned) => WorkerMode::Cordoned,
            Ok(p::WorkerMode::Draining) => WorkerMode::Draining,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "`mode`: {} is not a worker mode",
                    req.mode
                )));
            }
        };
        let mut g = self.lock();
        let actions = g
            .sched
            .set_mode(now_ms(), &req.worker, mode)
            .map_err(|e| Status::not_found(e.to_string()))?;
        g.after(&actions)?;
        let now = now_ms();
        let worker = g
            .sched
            .worker(&req.worker)
            .map(|w| convert::worker_view(&g.sched, w, now));
        Ok(Response::new(p::SetWorkerModeReply { worker }))
    }
}
