//! A rank process's environment, written and read in one place.
//!
//! Every launcher that starts ranks — the worker daemon, `gantry launch --local`, `gantry
//! launch --nproc`, a Slurm task, `gantry eval --tp`, the local worlds of [`crate::spawn`] —
//! describes the rank as a [`RankEnv`] and lets [`RankEnv::apply`] write the variables;
//! the rank reads them back with [`Bootstrap::from_lookup`]. Writer and reader sit side by
//! side so the names cannot drift, and a round-trip test holds them together.
//!
//! What is written:
//! - torchrun's place variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
//!   `MASTER_ADDR`, `MASTER_PORT`), always, replacing inherited ones;
//! - the job's data-plane secret and what it is bound to ([`Bootstrap::auth`]:
//!   `GANTRY_JOB_SECRET`, `GANTRY_AUTH_JOB`, `GANTRY_AUTH_ATTEMPT`), replacing inherited ones,
//!   or removing them for a rank without one. A rank that finds no secret refuses to start
//!   unless `GANTRY_INSECURE_NO_AUTH=1` (ranks started by torchrun or mpirun need the user's
//!   own `GANTRY_JOB_SECRET`). The secret is never printed: [`JobSecret`]'s `Debug` redacts it;
//! - torchrun's elastic-agent variables ([`Elastic`]: `TORCHELASTIC_*`, and with a
//!   [`NodePlace`] `GROUP_RANK`, `GROUP_WORLD_SIZE`, `ROLE_*`) for launchers that promise
//!   torchrun compatibility;
//! - gantry's job variables ([`JobEnv`]: `GANTRY_JOB_ID`, …) for ranks of a cluster job, and
//!   `GANTRY_STORE_EXTERNAL=1` when the launcher hosts the store (removed otherwise, so an
//!   inherited one cannot make rank 0 wait for a store nobody serves), and `GANTRY_OWN_GPUS=1`
//!   when the launcher made the rank's own GPUs the only ones it sees (removed otherwise);
//! - defaults that the rank's own environment overrides: `GANTRY_LOG`,
//!   `GANTRY_ADVERTISE_HOST` and the thread policy ([`thread_defaults`]).
//!
//! No environment is read here: launchers pass the parent environment in, ranks pass a lookup.

use crate::auth::{JobAuth, JobSecret, SecretError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

/// Set to `1` by a launcher that hosts the rendezvous store itself: rank 0 then connects to
/// it instead of serving one.
pub const STORE_EXTERNAL: &str = "GANTRY_STORE_EXTERNAL";
/// Set to `1` by a launcher that gave the rank a `CUDA_VISIBLE_DEVICES` of its own GPUs only
/// (the gantry worker): the rank then computes on the first visible device, not on
/// `cuda:LOCAL_RANK` (torchrun's convention, where every rank of a host sees all its GPUs).
pub const OWN_GPUS: &str = "GANTRY_OWN_GPUS";
/// The cluster job's id (a number).
pub const JOB_ID: &str = "GANTRY_JOB_ID";
pub const JOB_NAME: &str = "GANTRY_JOB_NAME";
/// The job's attempt, counted from 1.
pub const ATTEMPT: &str = "GANTRY_ATTEMPT";
/// Where the rank writes its per-step progress for the worker.
pub const PROGRESS_FILE: &str = "GANTRY_PROGRESS_FILE";
/// The job's data-plane secret (at least 16 characters; see [`crate::auth`]).
pub const JOB_SECRET: &str = "GANTRY_JOB_SECRET";
/// The job id bound into every handshake; absent: torchrun's `TORCHELASTIC_RUN_ID`, else empty.
pub const AUTH_JOB: &str = "GANTRY_AUTH_JOB";
/// The attempt (from 1) bound into every handshake; absent: torchrun's
/// `TORCHELASTIC_RESTART_COUNT` + 1, else 1.
pub const AUTH_ATTEMPT: &str = "GANTRY_AUTH_ATTEMPT";
/// `1`: run without a job secret (the store and links then accept anyone who can reach them).
pub const INSECURE_NO_AUTH: &str = "GANTRY_INSECURE_NO_AUTH";

/// A torchrun-style variable that is missing or unusable; names the variable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("{set} is set but {var} is not")]
    Missing { var: &'static str, set: &'static str },
    #[error("{var}=`{value}` is not {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("RANK={rank} must be below WORLD_SIZE={world}")]
    RankOutsideWorld { rank: usize, world: usize },
    /// A value that parsed but breaks a rule of the configuration it sets.
    #[error("{0}")]
    Rule(String),
    #[error(
        "GANTRY_JOB_SECRET is not set: a gantry rank proves its job's secret on every rendezvous-store and \
         peer connection. gantry's launchers (launch, workers, Slurm tasks) set it; for ranks another \
         launcher starts (torchrun, mpirun) put the same secret of at least 16 characters in every rank's \
         environment (e.g. GANTRY_JOB_SECRET=$(openssl rand -hex 32)), or set GANTRY_INSECURE_NO_AUTH=1 \
         to accept anyone who can reach the ranks"
    )]
    NoSecret,
    /// `GANTRY_JOB_SECRET` is unusable (the value is never repeated).
    #[error("GANTRY_JOB_SECRET: {0}")]
    Secret(SecretError),
}

/// Where this rank sits and where the rendezvous store is, as torchrun passes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bootstrap {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The launcher hosts the store (`GANTRY_STORE_EXTERNAL=1`); rank 0 only connects to it.
    pub store_external: bool,
    /// The rank sees only its own GPUs (`GANTRY_OWN_GPUS=1`, see [`OWN_GPUS`]).
    pub own_gpus: bool,
    /// The job's secret and the job and attempt it is bound to: every store and link
    /// connection proves it. `None` only with `GANTRY_INSECURE_NO_AUTH=1`.
    #[serde(skip)]
    pub auth: Option<JobAuth>,
}

impl Bootstrap {
    /// Rank `rank` of a world of `world` ranks all on this host, the store at
    /// `127.0.0.1:master_port`, without a job secret (launchers add theirs).
    pub fn local(rank: usize, world: usize, master_port: u16, store_external: bool) -> Bootstrap {
        Bootstrap {
            rank,
            world,
            local_rank: rank,
            local_world: world,
            master_addr: "127.0.0.1".into(),
            master_port,
            store_external,
            own_gpus: false,
            auth: None,
        }
    }

    /// Read `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT` (torchrun's names), `GANTRY_STORE_EXTERNAL`, `GANTRY_OWN_GPUS` and the job
    /// secret ([`job_auth`]) through `get` (the binary passes `|k| std::env::var(k).ok()`).
    /// `Ok(None)` when `RANK` is not set.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Bootstrap>, EnvError> {
        let Some(rank) = get("RANK") else { return Ok(None) };
        let flag = |var: &str| get(var).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let num = |var: &'static str, value: String| -> Result<usize, EnvError> {
            value.trim().parse().map_err(|_| EnvError::Invalid {
                var,
                value,
                expected: "a non-negative integer",
            })
        };
        let required = |var: &'static str| get(var).ok_or(EnvError::Missing { var, set: "RANK" });
        let rank = num("RANK", rank)?;
        let world = num("WORLD_SIZE", required("WORLD_SIZE")?)?;
        if world == 0 || rank >= world {
            return Err(EnvError::RankOutsideWorld { rank, world });
        }
        let local_rank = get("LOCAL_RANK").map(|v| num("LOCAL_RANK", v)).transpose()?;
        let local_world = get("LOCAL_WORLD_SIZE")
            .map(|v| num("LOCAL_WORLD_SIZE", v))
            .transpose()?;
        let port = required("MASTER_PORT")?;
        let master_port = port.trim().parse().map_err(|_| EnvError::Invalid {
            var: "MASTER_PORT",
            value: port.clone(),
            expected: "a port number",
        })?;
        Ok(Some(Bootstrap {
            rank,
            world,
            local_rank: local_rank.unwrap_or(rank),
            local_world: local_world.unwrap_or(world),
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            store_external: flag(STORE_EXTERNAL),
            own_gpus: flag(OWN_GPUS),
            auth: job_auth(&get)?,
        }))
    }
}

/// The rank's [`JobAuth`]: `GANTRY_JOB_SECRET`, bound to `GANTRY_AUTH_JOB` and
/// `GANTRY_AUTH_ATTEMPT` as gantry's launchers write them, or, for ranks torchrun started, to
/// its `TORCHELASTIC_RUN_ID` and `TORCHELASTIC_RESTART_COUNT` + 1. Without a secret:
/// [`EnvError::NoSecret`], or `None` under `GANTRY_INSECURE_NO_AUTH=1`.
pub fn job_auth(get: &impl Fn(&str) -> Option<String>) -> Result<Option<JobAuth>, EnvError> {
    let Some(secret) = get(JOB_SECRET).filter(|s| !s.trim().is_empty()) else {
        let insecure = get(INSECURE_NO_AUTH).is_some_and(|v| v.trim() == "1" || v.trim().eq_ignore_ascii_case("true"));
        return if insecure { Ok(None) } else { Err(EnvError::NoSecret) };
    };
    let secret = JobSecret::parse(&secret).map_err(EnvError::Secret)?;
    let count = |var: &'static str, value: String| -> Result<u32, EnvError> {
        value.trim().parse().map_err(|_| EnvError::Invalid {
            var,
            value,
            expected: "a non-negative integer",
        })
    };
    let attempt = match (get(AUTH_ATTEMPT), get("TORCHELASTIC_RESTART_COUNT")) {
        (Some(a), _) => count(AUTH_ATTEMPT, a)?,
        (None, Some(restarts)) => count("TORCHELASTIC_RESTART_COUNT", restarts)?.saturating_add(1),
        (None, None) => 1,
    };
    let job = get(AUTH_JOB).or_else(|| get("TORCHELASTIC_RUN_ID")).unwrap_or_default();
    Ok(Some(JobAuth::new(secret, job.trim(), attempt)))
}

/// torchrun's elastic-agent variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Elastic {
    /// The same for every rank of a run (`TORCHELASTIC_RUN_ID`).
    pub run_id: String,
    /// Restarts before this one, counted from 0 (`TORCHELASTIC_RESTART_COUNT`).
    pub restart_count: u32,
    /// The node's place: torchrun-compatible launchers give it and then also set `ROLE_*`,
    /// `TORCHELASTIC_MAX_RESTARTS=0` and `TORCHELASTIC_USE_AGENT_STORE=False` (no agent
    /// store: rank 0 creates the store, as with plain `env://` init). The worker leaves it out.
    pub node: Option<NodePlace>,
}

/// The node's index among the run's nodes (torchrun's `GROUP_RANK`) and the number of nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePlace {
    pub group_rank: usize,
    pub group_world: usize,
}

/// A cluster job's identity, for ranks the worker daemon starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEnv {
    pub job_id: u64,
    pub job_name: String,
    /// Counted from 1.
    pub attempt: u32,
    pub progress_file: PathBuf,
}

impl JobEnv {
    /// Read back what [`RankEnv::apply`] wrote; `Ok(None)` when `GANTRY_JOB_ID` is not set.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<JobEnv>, EnvError> {
        let Some(id) = get(JOB_ID) else { return Ok(None) };
        let invalid = |var: &'static str, value: String| EnvError::Invalid {
            var,
            value,
            expected: "a non-negative integer",
        };
        let job_id = id.trim().parse().map_err(|_| invalid(JOB_ID, id.clone()))?;
        let attempt = match get(ATTEMPT) {
            Some(a) => a.trim().parse().map_err(|_| invalid(ATTEMPT, a.clone()))?,
            None => 1,
        };
        Ok(Some(JobEnv {
            job_id,
            job_name: get(JOB_NAME).unwrap_or_default(),
            attempt,
            progress_file: get(PROGRESS_FILE).map(PathBuf::from).unwrap_or_default(),
        }))
    }
}

/// How a job wants its ranks' OpenMP threads to wait for work (`train.omp_wait` in a job
/// spec): [`thread_defaults`] decides when `Auto`; the others are the user's choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OmpWait {
    #[default]
    Auto,
    /// `OMP_WAIT_POLICY=PASSIVE`: idle threads sleep.
    Passive,
    /// `OMP_WAIT_POLICY=ACTIVE`: idle threads spin.
    Active,
}

impl OmpWait {
    /// The `OMP_WAIT_POLICY` value a choice sets; `None` for `Auto`.
    pub fn variable(self) -> Option<&'static str> {
        match self {
            OmpWait::Auto => None,
            OmpWait::Passive => Some("PASSIVE"),
            OmpWait::Active => Some("ACTIVE"),
        }
    }
}

/// What a rank process runs, as far as its threads are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankProgram {
    /// A gantry rank (libtorch intra-op threads plus libgomp): `threads_per_rank` as the rank
    /// will set them, 0 when unknown (then libtorch's default, every core); `wait` as the job
    /// asks.
    Gantry { threads_per_rank: usize, wait: OmpWait },
    /// Anything else (a user's PyTorch script): its threads are its own business.
    Foreign,
}

/// Defaults for the variables that decide how a rank's threads and device queues run
/// (OpenMP's, CUDA's); the rank's own environment always wins over them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadDefaults {
    pub omp_num_threads: Option<usize>,
    /// `OMP_WAIT_POLICY`; `None` leaves libgomp's default (spin a while, then sleep).
    pub omp_wait_policy: Option<&'static str>,
    /// `CUDA_DEVICE_MAX_CONNECTIONS`. A gantry rank on a GPU runs NCCL on two streams at once
    /// (data parallelism's side stream, tensor/pipeline parallelism on the compute stream);
    /// with one hardware queue the GPU starts kernels in the order the rank issued them, the
    /// same order on every rank, so two communicators' kernels cannot each wait for the other
    /// on different ranks (Megatron-LM sets 1 for the same reason). Ignored without a GPU.
    pub cuda_device_max_connections: Option<u32>,
}

/// The cores of this host as the ranks will find them: how many this process may run on, and
/// how many other work already keeps busy (the 1-minute load average, rounded; 0 when
/// unknown). Read by the launcher just before it starts the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCores {
    pub cores: usize,
    pub busy_elsewhere: usize,
}

impl HostCores {
    /// This host now: the scheduler's affinity and `/proc/loadavg`.
    pub fn measure() -> HostCores {
        let load = std::fs::read_to_string("/proc/loadavg").ok();
        HostCores {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy_elsewhere: load.as_deref().map_or(0, busy_from_loadavg),
        }
    }

    /// A host with `cores` cores and nothing else running.
    pub fn idle(cores: usize) -> HostCores {
        HostCores {
            cores,
            busy_elsewhere: 0,
        }
    }
}

/// Cores kept busy according to `/proc/loadavg`'s text: its 1-minute average, rounded (a quiet
/// host's 0.1 is no core; a build on one core is 1).
fn busy_from_loadavg(text: &str) -> usize {
    let one_minute: f64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if one_minute.is_finite() && one_minute > 0.0 {
        one_minute.round() as usize
    } else {
        0
    }
}

/// The one thread policy of every launcher, for `ranks_here` ranks on `host`.
///
/// - A gantry rank: libgomp's idle threads spin. Where the ranks' threads and other work
///   together want more than the cores, or several ranks fill them (ranks × threads ≥ cores),
///   spinning steals the CPU that threads with work need (measured: a 2-thread rank 4–7×
///   slower on a loaded 2-core machine), so they sleep (`PASSIVE`). A single rank that owns
///   the cores of a quiet host keeps libgomp's default: its spinning is faster there
///   (single-rank CPU training measured 0.90× PyTorch eager under `PASSIVE`, 0.96–0.99×
///   without it). A job's explicit [`OmpWait`] wins over the rule.
/// - A foreign program: torchrun's rule: several ranks each starting one OpenMP thread per
///   core would oversubscribe the node, so one thread each.
pub fn thread_defaults(program: RankProgram, ranks_here: usize, host: HostCores) -> ThreadDefaults {
    match program {
        RankProgram::Gantry { threads_per_rank, wait } => {
            let cores = host.cores;
            let threads = if threads_per_rank == 0 { cores } else { threads_per_rank };
            let ours = ranks_here.saturating_mul(threads);
            let crowded = ours.saturating_add(host.busy_elsewhere) > cores || (ranks_here > 1 && ours >= cores);
            let omp_wait_policy = match wait {
                OmpWait::Auto => crowded.then_some("PASSIVE"),
                chosen => chosen.variable(),
            };
            ThreadDefaults {
                omp_num_threads: None,
                omp_wait_policy,
                cuda_device_max_connections: Some(1),
            }
        }
        RankProgram::Foreign => ThreadDefaults {
            omp_num_threads: (ranks_here > 1).then_some(1),
            omp_wait_policy: None,
            cuda_device_max_connections: None,
        },
    }
}

/// Everything a launcher tells one rank process through its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// What the rank reads back with [`Bootstrap::from_lookup`].
    pub place: Bootstrap,
    pub elastic: Option<Elastic>,
    pub job: Option<JobEnv>,
    /// `None`: leave `OMP_*` alone.
    pub threads: Option<ThreadDefaults>,
    /// Default for `GANTRY_LOG`.
    pub log: Option<String>,
    /// Default for `GANTRY_ADVERTISE_HOST` (the address peers reach this rank at).
    pub advertise_host: Option<String>,
}

impl RankEnv {
    /// Only the place: no agent, job, thread or logging variables.
    pub fn new(place: Bootstrap) -> RankEnv {
        RankEnv {
            place,
            elastic: None,
            job: None,
            threads: None,
            log: None,
            advertise_host: None,
        }
    }

    /// The variables the rank must see, replacing inherited ones of the same name.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let p = &self.place;
        let mut vars = vec![
            ("RANK", p.rank.to_string()),
            ("LOCAL_RANK", p.local_rank.to_string()),
            ("WORLD_SIZE", p.world.to_string()),
            ("LOCAL_WORLD_SIZE", p.local_world.to_string()),
            ("MASTER_ADDR", p.master_addr.clone()),
            ("MASTER_PORT", p.master_port.to_string()),
        ];
        if p.store_external {
            vars.push((STORE_EXTERNAL, "1".into()));
        }
        if p.own_gpus {
            vars.push((OWN_GPUS, "1".into()));
        }
        if let Some(auth) = &p.auth {
            vars.push((JOB_SECRET, auth.secret.expose().to_string()));
            vars.push((AUTH_JOB, auth.job.clone()));
            vars.push((AUTH_ATTEMPT, auth.attempt.to_string()));
        }
        if let Some(e) = &self.elastic {
            vars.push(("TORCHELASTIC_RESTART_COUNT", e.restart_count.to_string()));
            vars.push(("TORCHELASTIC_RUN_ID", e.run_id.clone()));
            if let Some(node) = e.node {
                vars.extend([
                    ("GROUP_RANK", node.group_rank.to_string()),
                    ("GROUP_WORLD_SIZE", node.group_world.to_string()),
                    ("ROLE_NAME", "default".into()),
                    ("ROLE_RANK", p.rank.to_string()),
                    ("ROLE_WORLD_SIZE", p.world.to_string()),
                    ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
                    ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
                ]);
            }
        }
        if let Some(j) = &self.job {
            vars.extend([
                (JOB_ID, j.job_id.to_string()),
                (JOB_NAME, j.job_name.clone()),
                (ATTEMPT, j.attempt.to_string()),
                (PROGRESS_FILE, j.progress_file.display().to_string()),
            ]);
        }
        vars
    }

    /// The variables that are only defaults: an inherited value of the same name stays.
    pub fn defaults(&self) -> Vec<(&'static str, String)> {
        let mut defaults = Vec::new();
        if let Some(level) = &self.log {
            defaults.push(("GANTRY_LOG", level.clone()));
        }
        if let Some(host) = &self.advertise_host {
            defaults.push(("GANTRY_ADVERTISE_HOST", host.clone()));
        }
        if let Some(t) = self.threads {
            if let Some(n) = t.omp_num_threads {
                defaults.push(("OMP_NUM_THREADS", n.to_string()));
            }
            if let Some(policy) = t.omp_wait_policy {
                defaults.push(("OMP_WAIT_POLICY", policy.into()));
            }
            if let Some(n) = t.cuda_device_max_connections {
                defaults.push(("CUDA_DEVICE_MAX_CONNECTIONS", n.to_string()));
            }
        }
        defaults
    }

    /// Write this rank's variables into `env` (the environment it starts from).
    pub fn apply(&self, env: &mut BTreeMap<OsString, OsString>) {
        if !self.place.store_external {
            env.remove(&OsString::from(STORE_EXTERNAL));
        }
        if !self.place.own_gpus {
            env.remove(&OsString::from(OWN_GPUS));
        }
        if self.place.auth.is_none() {
            // An inherited secret is not this rank's: its launcher gave it none.
            for var in [JOB_SECRET, AUTH_JOB, AUTH_ATTEMPT] {
                env.remove(&OsString::from(var));
            }
        }
        for (k, v) in self.vars() {
            env.insert(k.into(), v.into());
        }
        for (k, v) in self.defaults() {
            env.entry(k.into()).or_insert_with(|| v.into());
        }
    }

    /// The complete environment of the rank: `parent`, then [`RankEnv::apply`].
    pub fn environment<I>(&self, parent: I) -> Vec<(OsString, OsString)>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let mut env: BTreeMap<OsString, OsString> = parent.into_iter().collect();
        self.apply(&mut env);
        env.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(env: &[(OsString, OsString)]) -> impl Fn(&str) -> Option<String> + '_ {
        |k| {
            env.iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        }
    }

    const SECRET: &str = "rank-env-test-secret-42";

    fn job_auth_of(job: &str, attempt: u32) -> JobAuth {
        JobAuth::new(JobSecret::parse(SECRET).unwrap(), job, attempt)
    }

    fn full() -> RankEnv {
        RankEnv {
            place: Bootstrap {
                rank: 5,
                world: 8,
                local_rank: 1,
                local_world: 4,
                master_addr: "10.0.0.7".into(),
                master_port: 29517,
                store_external: false,
                own_gpus: false,
                auth: Some(job_auth_of("12", 3)),
            },
            elastic: Some(Elastic {
                run_id: "gantry-12".into(),
                restart_count: 2,
                node: Some(NodePlace {
                    group_rank: 1,
                    group_world: 2,
                }),
            }),
            job: Some(JobEnv {
                job_id: 12,
                job_name: "tiny".into(),
                attempt: 3,
                progress_file: "/state/p.json".into(),
            }),
            threads: Some(thread_defaults(RankProgram::Foreign, 4, HostCores::idle(8))),
            log: Some("info".into()),
            advertise_host: Some("10.0.0.1".into()),
        }
    }

    #[test]
    fn what_is_written_reads_back_the_same() {
        let stale = [
            ("RANK", "99"),
            (STORE_EXTERNAL, "1"),
            (OWN_GPUS, "1"),
            ("LOCAL_RANK", "7"),
            (JOB_SECRET, "a-stale-secret-of-another-job"),
            (AUTH_JOB, "99"),
        ];
        let parent = stale.iter().map(|(k, v)| (k.into(), v.into()));
        for (store_external, own_gpus) in [(false, false), (true, false), (false, true)] {
            let mut rank = full();
            rank.place.store_external = store_external;
            rank.place.own_gpus = own_gpus;
            let env = rank.environment(parent.clone());
            assert_eq!(Bootstrap::from_lookup(lookup(&env)), Ok(Some(rank.place.clone())));
            assert_eq!(JobEnv::from_lookup(lookup(&env)), Ok(rank.job.clone()));
        }
        let local = RankEnv::new(Bootstrap {
            auth: Some(job_auth_of("", 1)),
            ..Bootstrap::local(2, 3, 4000, true)
        });
        let env = local.environment([]);
        assert_eq!(Bootstrap::from_lookup(lookup(&env)), Ok(Some(local.place)));
        assert_eq!(JobEnv::from_lookup(lookup(&env)), Ok(None));
    }

    #[test]
    fn the_secret_is_written_read_back_and_never_printed() {
        let rank = full();
        let env = rank.environment([]);
        let get = lookup(&env);
        assert_eq!(get(JOB_SECRET).as_deref(), Some(SECRET));
        assert_eq!(get(AUTH_JOB).as_deref(), Some("12"));
        assert_eq!(get(AUTH_ATTEMPT).as_deref(), Some("3"));
        assert!(!format!("{rank:?}").contains(SECRET), "{rank:?}");
        let read = Bootstrap::from_lookup(lookup(&env)).unwrap().unwrap();
        assert!(!format!("{read:?}").contains(SECRET));
        assert!(!serde_json::to_string(&read).unwrap().contains(SECRET));

        // A launcher that gives no secret removes an inherited one, and the rank then refuses
        // to start unless the user opted out.
        let bare = RankEnv::new(Bootstrap::local(0, 2, 4000, false));
        let env = bare.environment([(JOB_SECRET.into(), "inherited-secret-0123456789".into())]);
        assert_eq!(lookup(&env)(JOB_SECRET), None);
        assert_eq!(Bootstrap::from_lookup(lookup(&env)), Err(EnvError::NoSecret));
        let env = bare.environment([(INSECURE_NO_AUTH.into(), "1".into())]);
        assert_eq!(Bootstrap::from_lookup(lookup(&env)).unwrap().unwrap().auth, None);
    }

    #[test]
    fn ranks_torchrun_started_bind_its_run_id_and_restart_count() {
        let base = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29500")];
        let auth_of = |pairs: &[(&str, &str)]| {
            let all: Vec<(&str, &str)> = base.iter().chain(pairs).copied().collect();
            Bootstrap::from_lookup(|k| all.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
                .map(|b| b.unwrap().auth)
        };
        let secret = (JOB_SECRET, SECRET);
        assert_eq!(auth_of(&[secret]), Ok(Some(job_auth_of("", 1))));
        assert_eq!(
            auth_of(&[
                secret,
                ("TORCHELASTIC_RUN_ID", "tr-9"),
                ("TORCHELASTIC_RESTART_COUNT", "2")
            ]),
            Ok(Some(job_auth_of("tr-9", 3)))
        );
        // gantry's own variables win.
        assert_eq!(
            auth_of(&[
                secret,
                ("TORCHELASTIC_RUN_ID", "tr-9"),
                (AUTH_JOB, "7"),
                (AUTH_ATTEMPT, "4")
            ]),
            Ok(Some(job_auth_of("7", 4)))
        );
        // A secret set wins over the opt-out.
        assert_eq!(
            auth_of(&[secret, (INSECURE_NO_AUTH, "1")]),
            Ok(Some(job_auth_of("", 1)))
        );
        assert_eq!(auth_of(&[]), Err(EnvError::NoSecret));
        assert_eq!(auth_of(&[(JOB_SECRET, "  ")]), Err(EnvError::NoSecret));
        assert_eq!(auth_of(&[(INSECURE_NO_AUTH, "true")]), Ok(None));
        assert_eq!(auth_of(&[(INSECURE_NO_AUTH, "0")]), Err(EnvError::NoSecret));
        // Bad values are named, and the secret is never echoed.
        let e = auth_of(&[(JOB_SECRET, "hunter2")]).unwrap_err().to_string();
        assert_eq!(
            e,
            "GANTRY_JOB_SECRET: the job secret is 7 characters; it must have at least 16"
        );
        let e = auth_of(&[secret, (AUTH_ATTEMPT, "x")]).unwrap_err().to_string();
        assert_eq!(e, "GANTRY_AUTH_ATTEMPT=`x` is not a non-negative integer");
        assert!(EnvError::NoSecret.to_string().contains("GANTRY_INSECURE_NO_AUTH=1"));
    }

    #[test]
    fn defaults_yield_to_the_ranks_own_environment() {
        let env = full().environment([
            ("GANTRY_LOG".into(), "debug".into()),
            ("OMP_NUM_THREADS".into(), "3".into()),
        ]);
        let get = lookup(&env);
        assert_eq!(get("GANTRY_LOG").as_deref(), Some("debug"));
        assert_eq!(get("OMP_NUM_THREADS").as_deref(), Some("3"));
        assert_eq!(get("GANTRY_ADVERTISE_HOST").as_deref(), Some("10.0.0.1"));
        assert_eq!(get("ROLE_RANK").as_deref(), Some("5"));
        assert_eq!(get("TORCHELASTIC_USE_AGENT_STORE").as_deref(), Some("False"));
    }

    #[test]
    fn the_thread_policy() {
        let gantry = |threads_per_rank| RankProgram::Gantry {
            threads_per_rank,
            wait: OmpWait::Auto,
        };
        let policy = |program, ranks, cores| thread_defaults(program, ranks, HostCores::idle(cores)).omp_wait_policy;
        let passive = Some("PASSIVE");
        // Several ranks with every core busy: sleep, don't spin.
        assert_eq!(policy(gantry(1), 2, 2), passive);
        assert_eq!(policy(gantry(2), 2, 4), passive);
        // Cores to spare: libgomp's own default.
        assert_eq!(policy(gantry(1), 2, 4), None);
        // One rank owning a quiet host's cores (threads unknown: libtorch takes every core).
        assert_eq!(policy(gantry(0), 1, 64), None);
        assert_eq!(policy(gantry(2), 1, 2), None);
        // ... but not where other work keeps a core busy, or with more threads than cores.
        let loaded = HostCores {
            cores: 2,
            busy_elsewhere: 1,
        };
        assert_eq!(thread_defaults(gantry(2), 1, loaded).omp_wait_policy, passive);
        assert_eq!(thread_defaults(gantry(1), 1, loaded).omp_wait_policy, None);
        assert_eq!(policy(gantry(4), 1, 2), passive);
        assert_eq!(thread_defaults(gantry(0), 4, HostCores::idle(8)).omp_num_threads, None);
        // The job's choice wins over the rule, both ways.
        let chosen = |wait| RankProgram::Gantry {
            threads_per_rank: 1,
            wait,
        };
        assert_eq!(policy(chosen(OmpWait::Active), 2, 2), Some("ACTIVE"));
        assert_eq!(policy(chosen(OmpWait::Passive), 1, 64), passive);
        // Foreign programs: torchrun's one thread per rank when several share a node.
        let foreign = thread_defaults(RankProgram::Foreign, 2, HostCores::idle(64));
        assert_eq!(foreign.omp_num_threads, Some(1));
        assert_eq!(foreign.omp_wait_policy, None);
        // One hardware queue per GPU for gantry's ranks (NCCL on two streams); a foreign
        // program's queues are its own business.
        assert_eq!(
            thread_defaults(gantry(1), 2, HostCores::idle(8)).cuda_device_max_connections,
            Some(1)
        );
        assert_eq!(foreign.cuda_device_max_connections, None);
        assert_eq!(
            thread_defaults(RankProgram::Foreign, 1, HostCores::idle(64)),
            ThreadDefaults::default()
        );
    }

    #[test]
    fn busy_cores_come_from_the_one_minute_load() {
        assert_eq!(busy_from_loadavg("0.12 0.30 0.41 1/211 4242\n"), 0);
        assert_eq!(busy_from_loadavg("1.61 1.02 0.80 3/211 4242\n"), 2);
        assert_eq!(busy_from_loadavg("garbage"), 0);
        assert_eq!(busy_from_loadavg("NaN 1 1"), 0);
        assert_eq!(busy_from_loadavg(""), 0);
    }

    #[test]
    fn errors_name_the_variable() {
        let get = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Bootstrap::from_lookup(get(&[])), Ok(None));
        let e = Bootstrap::from_lookup(get(&[("RANK", "0")])).unwrap_err();
        assert_eq!(e.to_string(), "RANK is set but WORLD_SIZE is not");
        let e = Bootstrap::from_lookup(get(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert_eq!(e.to_string(), "RANK=2 must be below WORLD_SIZE=2");
        let e = Bootstrap::from_lookup(get(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "x")])).unwrap_err();
        assert_eq!(e.to_string(), "MASTER_PORT=`x` is not a port number");
        let e = Bootstrap::from_lookup(get(&[("RANK", "-1")])).unwrap_err();
        assert_eq!(e.to_string(), "RANK=`-1` is not a non-negative integer");
    }
}
