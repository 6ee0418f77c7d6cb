//! The daemon loop: register, heartbeat, hand every reply's desired set to the supervisor,
//! and survive the coordinator going away.
//!
//! One task owns everything (supervisor, link state); at most one call to the coordinator is
//! in flight, held as a future next to the supervisor's events, so a slow or dead
//! coordinator never delays noticing a rank's exit or enforcing a grace period.

use crate::config::WorkerConfig;
use crate::error::WorkerError;
use crate::launch::LaunchContext;
use crate::metrics::Metrics;
use crate::reconcile::RankKey;
use crate::resources;
use crate::server::{self, LogService, ServerConfig};
use crate::supervisor::{Event, LiveRanks, Supervisor, SupervisorConfig};
use gantry_coordinator::auth::{self, AddToken};
use gantry_coordinator::proto::cluster_client::ClusterClient;
use gantry_coordinator::proto::{HeartbeatReply, HeartbeatRequest, RegisterReply, RegisterRequest, WorkerResources};
use gantry_coordinator::server::MetricsAccess;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Client = ClusterClient<InterceptedService<Channel, AddToken>>;
type InFlight = Pin<Box<dyn Future<Output = Reply> + Send>>;

const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(1000);
/// Bound on one register or heartbeat call (a dead coordinator behind a live TCP path), until
/// the coordinator's heartbeat deadline is known; then a third of it (see [`Pacing`]).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Delay of the heartbeat after a rank exits: short, but long enough that ranks failing
/// together (a collective timing out everywhere) travel in one report.
const EXIT_REPORT_DELAY: Duration = Duration::from_millis(20);

enum Reply {
    Register(Result<RegisterReply, Status>),
    Heartbeat(Result<HeartbeatReply, Status>, Duration),
}

async fn call<T>(limit: Duration, fut: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {limit:?}"))),
    }
}

/// How long one call may take and how long to back off between failed ones, from the
/// coordinator's heartbeat deadline. After the network heals, a worker must be heard again
/// before what is left of its deadline runs out (the coordinator credits everyone the time it
/// heard nobody, then counts again), so a call stuck on a dead path must give up, and the
/// next one start, well within a deadline: a third of it per call, a quarter at most between
/// calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pacing {
    call_timeout: Duration,
    backoff_max: Duration,
}

impl Pacing {
    /// Before registering (the deadline is not known yet), or for a coordinator that did not
    /// say (`deadline_ms` 0).
    fn for_deadline(deadline_ms: u32) -> Pacing {
        if deadline_ms == 0 {
            return Pacing {
                call_timeout: CALL_TIMEOUT,
                backoff_max: BACKOFF_MAX,
            };
        }
        let deadline = Duration::from_millis(u64::from(deadline_ms));
        Pacing {
            call_timeout: (deadline / 3).clamp(Duration::from_secs(1), CALL_TIMEOUT),
            backoff_max: (deadline / 4).clamp(BACKOFF_START, BACKOFF_MAX),
        }
    }
}

/// A client of the coordinator on a fresh, lazily connected channel.
fn client(config: &WorkerConfig) -> Result<Client, WorkerError> {
    let channel = auth::channel(&config.coordinator, &config.tls)?;
    Ok(ClusterClient::with_interceptor(channel, AddToken::new(&config.token)?))
}

/// Runs the worker daemon until `shutdown` completes, serving its log service and `/metrics`
/// on `listener` (bound by the caller: the binary binds `--listen` and prints the address,
/// tests bind `127.0.0.1:0`), then stops its ranks (SIGTERM, SIGKILL after the grace period),
/// sends a last heartbeat and returns. See the crate docs for what it does meanwhile.
/// Configuration and local problems (a bad field, the state directory, TLS files) are
/// refused before the coordinator is contacted; nothing is retried. It also returns early
/// if its own server fails.
pub async fn serve(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let bound = listener.local_addr().map_err(|e| WorkerError::Serve {
        addr: "(unknown)".into(),
        reason: format!("the listener has no local address: {e}"),
    })?;
    let (mut daemon, server_config) = prepare(config, bound).await?;
    let r = &daemon.resources;
    tracing::info!(
        service = %daemon.bound, name = %r.name, slots = r.slots, gpus = r.gpus.len(),
        state = %daemon.config.state_dir.display(),
        "worker serving logs and /metrics; contacting the coordinator at {}", daemon.config.coordinator
    );
    let (stop_server, mut server_stopped) = tokio::sync::watch::channel(false);
    let mut server_task = Some(tokio::spawn(server::serve(listener, server_config, async move {
        let _ = server_stopped.wait_for(|stop| *stop).await;
    })));
    let result = daemon.run_loop(shutdown, &mut server_task).await;
    tracing::info!("worker stopping: stopping {} ranks", daemon.supervisor.running());
    daemon.supervisor.shutdown().await;
    daemon.farewell().await;
    let _ = stop_server.send(true);
    // `None` when the server already ended (that ended the loop, and `result` says why).
    if let Some(task) = server_task
        && let Ok(Err(e)) = task.await
        && result.is_ok()
    {
        return Err(e);
    }
    result
}

/// Everything [`serve`] does before its loop: checks the configuration, creates the state
/// directory, loads the TLS files, prepares the port's services and looks for GPUs.
async fn prepare(mut config: WorkerConfig, bound: SocketAddr) -> Result<(Daemon, ServerConfig), WorkerError> {
    config.validate()?;
    // Ranks run in their run directory, so every path they are given must be absolute.
    config.state_dir = absolute(&config.state_dir);
    if config.rank_program.components().count() > 1 {
        config.rank_program = absolute(&config.rank_program);
    }
    tokio::fs::create_dir_all(&config.state_dir)
        .await
        .map_err(|source| WorkerError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    let live = Arc::new(LiveRanks::default());
    let logs = LogService::new(config.state_dir.clone(), live.clone());
    let access = MetricsAccess::new(config.metrics_token.as_deref()).map_err(|e| WorkerError::Config {
        field: "metrics_token",
        reason: e.to_string(),
    })?;
    let server_config = ServerConfig {
        token: config.token.clone(),
        tls: config.tls.server_config()?,
        logs,
        metrics: metrics.clone(),
        access,
    };

    let gpus = tokio::task::spawn_blocking(resources::detect_gpus)
        .await
        .unwrap_or_default();
    let hostname = resources::hostname();
    let resources = WorkerResources {
        name: config.name.clone().unwrap_or_else(|| hostname.clone()),
        hostname,
        address: String::new(),
        slots: config.slots.unwrap_or_else(resources::cpu_slots),
        gpus,
        labels: config.labels.clone().into_iter().collect(),
        service_address: String::new(),
        port_range_start: u32::from(config.port_range.0),
        port_range_end: u32::from(config.port_range.1),
    };
    let client = client(&config)?;
    let launch = LaunchContext {
        state_dir: config.state_dir.clone(),
        rank_program: config.rank_program.clone(),
        has_gpus: !resources.gpus.is_empty(),
        advertise_host: config.advertise_address.clone(),
        env: config.env.clone().into(),
    };
    let supervisor = Supervisor::new(
        SupervisorConfig {
            launch,
            grace: config.grace,
        },
        live,
        metrics.clone(),
    );
    let daemon = Daemon {
        config,
        client,
        resources,
        bound,
        metrics,
        supervisor,
        registered: false,
        ever_registered: false,
        disconnected_at: None,
        interval: DEFAULT_HEARTBEAT,
        pacing: Pacing::for_deadline(0),
        backoff: BACKOFF_START,
        exit_pending: false,
        finals_in_flight: Vec::new(),
    };
    Ok((daemon, server_config))
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

struct Daemon {
    config: WorkerConfig,
    client: Client,
    /// `address` and `service_address` are filled in when registering.
    resources: WorkerResources,
    bound: SocketAddr,
    metrics: Arc<Metrics>,
    supervisor: Supervisor,
    registered: bool,
    ever_registered: bool,
    /// Start of the current stretch without the coordinator (for the reconnect log line).
    disconnected_at: Option<Instant>,
    interval: Duration,
    pacing: Pacing,
    backoff: Duration,
    /// A rank exited since the last report was sent.
    exit_pending: bool,
    /// Ranks whose final state the call in flight reports (acknowledged by its reply).
    finals_in_flight: Vec<RankKey>,
}

impl Daemon {
    async fn run_loop(
        &mut self,
        shutdown: impl Future<Output = ()>,
        server_task: &mut Option<tokio::task::JoinHandle<Result<(), WorkerError>>>,
    ) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut in_flight: Option<InFlight> = None;
        let mut next_call = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                served = async {
                    match server_task.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                } => {
                    *server_task = None;
                    let addr = self.bound.to_string();
                    return Err(match served {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => WorkerError::Serve { addr, reason: "stopped unexpectedly".into() },
                        Err(e) => WorkerError::Serve { addr, reason: e.to_string() },
                    });
                }
                event = self.supervisor.next_event() => {
                    if let Event::Exited(_) = event {
                        self.exit_pending = true;
                        if self.registered && in_flight.is_none() {
                            next_call = next_call.min(Instant::now() + EXIT_REPORT_DELAY);
                        }
                    }
                }
                reply = async {
                    match in_flight.as_mut() {
                        Some(call) => call.await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_some() => {
                    in_flight = None;
                    let wait = self.on_reply(reply).await?;
                    next_call = Instant::now() + wait;
                }
                () = tokio::time::sleep_until(next_call), if in_flight.is_none() => {
                    in_flight = Some(self.next_call().await);
                }
            }
        }
    }

    /// The register or heartbeat call to make now.
    async fn next_call(&mut self) -> InFlight {
        let ranks = self.supervisor.reports().await;
        self.exit_pending = false;
        self.finals_in_flight = Supervisor::finals(&ranks);
        let mut client = self.client.clone();
        let limit = self.pacing.call_timeout;
        if self.registered {
            let request = HeartbeatRequest {
                worker: self.resources.name.clone(),
                ranks,
            };
            return Box::pin(async move {
                let started = Instant::now();
                let reply = call(limit, client.heartbeat(request)).await;
                Reply::Heartbeat(reply, started.elapsed())
            });
        }
        let request = RegisterRequest {
            resources: Some(self.current_resources().await),
            ranks,
        };
        Box::pin(async move { Reply::Register(call(limit, client.register(request)).await) })
    }

    /// Handles a reply; returns how long to wait before the next call.
    async fn on_reply(&mut self, reply: Reply) -> Result<Duration, WorkerError> {
        match reply {
            Reply::Register(Ok(reply)) => {
                self.interval = match reply.heartbeat_ms {
                    0 => DEFAULT_HEARTBEAT,
                    // A floor so a misconfigured coordinator cannot make this loop spin.
                    ms => Duration::from_millis(u64::from(ms)).max(Duration::from_millis(10)),
                };
                self.pacing = Pacing::for_deadline(reply.heartbeat_deadline_ms);
                let r = &self.resources;
                match self.disconnected_at.take() {
                    Some(since) if self.ever_registered => tracing::info!(
                        "reconnected to the coordinator at {} after {:.1} s; registered again with {} ranks",
                        self.config.coordinator,
                        since.elapsed().as_secs_f64(),
                        self.supervisor.running(),
                    ),
                    _ => tracing::info!(
                        name = %r.name, address = %r.address, slots = r.slots, gpus = r.gpus.len(),
                        service = %r.service_address, heartbeat_ms = self.interval.as_millis() as u64,
                        "registered with the coordinator at {}", self.config.coordinator
                    ),
                }
                self.registered = true;
                self.ever_registered = true;
                self.connected();
                self.supervisor.delivered(&std::mem::take(&mut self.finals_in_flight));
                self.supervisor.apply(&reply.desired).await;
                Ok(self.until_next_heartbeat())
            }
            Reply::Heartbeat(Ok(reply), latency) => {
                self.metrics.heartbeat_ok(latency);
                self.connected();
                if !reply.known {
                    // A restarted coordinator with fresh state, or one that gave this worker
                    // up: register again with what is running, and leave the ranks alone (the
                    // empty desired set of an unknown worker means nothing).
                    tracing::info!("the coordinator does not know this worker; registering again");
                    self.registered = false;
                    return Ok(Duration::ZERO);
                }
                self.supervisor.delivered(&std::mem::take(&mut self.finals_in_flight));
                self.supervisor.apply(&reply.desired).await;
                Ok(self.until_next_heartbeat())
            }
            Reply::Register(Err(status)) | Reply::Heartbeat(Err(status), _) => {
                let rejected = matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied);
                if rejected && !self.ever_registered {
                    // A first contact refused for the token will not fix itself by retrying.
                    let reason = status.message().to_string();
                    return Err(WorkerError::Rejected {
                        url: self.config.coordinator.clone(),
                        reason,
                    });
                }
                Ok(self.failed(&status))
            }
        }
    }

    /// The heartbeat interval, or much less when a rank exited while the call was out.
    fn until_next_heartbeat(&self) -> Duration {
        if self.exit_pending {
            EXIT_REPORT_DELAY
        } else {
            self.interval
        }
    }

    fn connected(&mut self) {
        self.metrics.set_connected(true);
        self.backoff = BACKOFF_START;
    }

    /// Records a failed call; returns the backoff before the next one. Ranks keep running: a
    /// coordinator out of reach does not stop training (if the coordinator gave this worker
    /// up meanwhile, it says so on reconnection and the reconciliation stops those ranks).
    fn failed(&mut self, status: &Status) -> Duration {
        self.metrics.heartbeat_failed();
        self.metrics.set_connected(false);
        self.registered = false;
        // The next call dials afresh: a connection that went quiet (a pulled cable) can take
        // TCP's backed-off retransmissions tens of seconds to come back after the network
        // does, while a new one connects at once.
        match client(&self.config) {
            Ok(fresh) => self.client = fresh,
            Err(e) => tracing::debug!("keeping the old coordinator channel: {e}"),
        }
        if self.disconnected_at.is_none() {
            self.disconnected_at = Some(Instant::now());
            tracing::warn!(
                code = ?status.code(),
                "cannot reach the coordinator at {} ({}); {} ranks keep running, retrying",
                self.config.coordinator,
                status.message(),
                self.supervisor.running(),
            );
        } else {
            tracing::debug!(code = ?status.code(), "coordinator still unreachable: {}", status.message());
        }
        let wait = self.backoff.min(self.pacing.backoff_max);
        self.backoff = (self.backoff * 2).min(self.pacing.backoff_max);
        wait
    }

    /// The resources to register, with the addresses worked out now: the route towards the
    /// coordinator can only be found once its name resolves.
    async fn current_resources(&mut self) -> WorkerResources {
        if self.resources.address.is_empty() {
            match self.advertised_address().await {
                Some(address) => self.resources.address = address,
                None => {
                    let fallback = self.resources.hostname.clone();
                    tracing::warn!(
                        "cannot find the route to the coordinator at {}; advertising the hostname {fallback} \
                         (set --advertise-address to choose)",
                        self.config.coordinator
                    );
                    return WorkerResources {
                        address: fallback.clone(),
                        service_address: self.service_address(&fallback),
                        ..self.resources.clone()
                    };
                }
            }
            self.resources.service_address = self.service_address(&self.resources.address);
        }
        self.resources.clone()
    }

    async fn advertised_address(&self) -> Option<String> {
        if let Some(a) = &self.config.advertise_address {
            return Some(a.clone());
        }
        let (host, port) = resources::url_host_port(&self.config.coordinator)?;
        let peer = tokio::net::lookup_host((host.as_str(), port)).await.ok()?.next()?;
        resources::route_towards(peer).ok().map(|ip| ip.to_string())
    }

    /// `host:port` of this worker's service as others should dial it: the bound address,
    /// unless it is a wildcard (0.0.0.0, ::), which nobody can dial; then `address`.
    fn service_address(&self, address: &str) -> String {
        if !self.bound.ip().is_unspecified() {
            return self.bound.to_string();
        }
        let port = self.bound.port();
        if address.contains(':') && !address.starts_with('[') {
            format!("[{address}]:{port}")
        } else {
            format!("{address}:{port}")
        }
    }

    /// One last heartbeat after the ranks were stopped, so the coordinator reschedules now
    /// instead of waiting out the heartbeat deadline. Best effort, briefly.
    async fn farewell(&mut self) {
        if !self.registered {
            return;
        }
        let ranks = self.supervisor.reports().await;
        let request = HeartbeatRequest {
            worker: self.resources.name.clone(),
            ranks,
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.heartbeat(request)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_fits_inside_the_deadline() {
        let unknown = Pacing::for_deadline(0);
        assert_eq!((unknown.call_timeout, unknown.backoff_max), (CALL_TIMEOUT, BACKOFF_MAX));
        let default = Pacing::for_deadline(10_000);
        assert_eq!(default.call_timeout, Duration::from_secs(10) / 3);
        assert_eq!(default.backoff_max, BACKOFF_MAX);
        let short = Pacing::for_deadline(3_000);
        assert_eq!(
            (short.call_timeout, short.backoff_max),
            (Duration::from_secs(1), Duration::from_millis(750))
        );
        let long = Pacing::for_deadline(600_000);
        assert_eq!((long.call_timeout, long.backoff_max), (CALL_TIMEOUT, BACKOFF_MAX));
        let tiny = Pacing::for_deadline(100);
        assert_eq!(
            (tiny.call_timeout, tiny.backoff_max),
            (Duration::from_secs(1), BACKOFF_START)
        );
        // From 3 s up, one stuck call plus the longest backoff ends before the deadline does.
        for ms in [3_000u32, 5_000, 10_000, 30_000, 120_000] {
            let p = Pacing::for_deadline(ms);
            assert!(
                p.call_timeout + p.backoff_max < Duration::from_millis(u64::from(ms)),
                "{ms}: {p:?}"
            );
        }
    }
}
