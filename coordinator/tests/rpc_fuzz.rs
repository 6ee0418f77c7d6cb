//! Arbitrary messages into the coordinator's gRPC handlers: random bytes decoded as each
//! request type (whatever prost accepts) and structured requests with random fields. No
//! handler may panic, every answer is a reply or a status, and the durable state a restart
//! would read back always loads and restores.

use gantry_coordinator::core::{Scheduler, SchedulerConfig};
use gantry_coordinator::metrics::Counters;
use gantry_coordinator::proto as p;
use gantry_coordinator::proto::admin_server::Admin;
use gantry_coordinator::proto::cluster_server::Cluster;
use gantry_coordinator::service::{Coordinator, Inner};
use gantry_coordinator::state::StateStore;
use proptest::prelude::*;
use prost::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::Request;

static CASE: AtomicUsize = AtomicUsize::new(0);

fn fresh() -> (Coordinator, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "gantry-rpc-fuzz-{}-{}",
        std::process::id(),
        CASE.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let (store, loaded) = StateStore::open(&dir).unwrap();
    let sched = Scheduler::restore(SchedulerConfig::default(), loaded.workers, loaded.jobs, 0);
    (
        Coordinator::new(Inner {
            sched,
            store,
            counters: Counters::default(),
            heartbeat_ms: 1000,
        }),
        dir,
    )
}

fn small_string() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z]{1,6}", "\\PC{0,12}", Just("w".repeat(300))]
}

fn program() -> impl Strategy<Value = Option<p::JobProgram>> {
    prop_oneof![
        Just(None),
        Just(Some(p::JobProgram { kind: None })),
        small_string().prop_map(|s| Some(p::JobProgram {
            kind: Some(p::job_program::Kind::TrainSpecToml(s))
        })),
        proptest::collection::vec(small_string(), 0..3).prop_map(|argv| Some(p::JobProgram {
            kind: Some(p::job_program::Kind::Command(p::CommandProgram {
                argv,
                workdir: String::new()
            }))
        })),
    ]
}

fn job() -> impl Strategy<Value = p::JobRequest> {
    (
        small_string(),
        program(),
        (
            0u32..5,
            0u32..3,
            0u32..3,
            prop_oneof![Just(0u32), Just(u32::MAX), 0u32..3],
        ),
        (0u32..3, any::<bool>(), 0u32..4, any::<i32>(), any::<bool>()),
        proptest::collection::hash_map(small_string(), small_string(), 0..3),
    )
        .prop_map(
            |(name, program, (dp, tp, pp, gpus), (max_restarts, elastic, min_dp, priority, queue), env)| {
                p::JobRequest {
                    name,
                    program,
                    dp,
                    tp,
                    pp,
                    gpus_per_rank: gpus,
                    max_restarts,
                    elastic,
                    min_dp,
                    priority,
                    queue,
                    labels: Default::default(),
                    env,
                }
            },
        )
}

fn report() -> impl Strategy<Value = p::RankReport> {
    (
        0u64..4,
        0u32..4,
        0u32..6,
        -1i32..5,
        any::<Option<i32>>(),
        any::<Option<i32>>(),
        any::<bool>(),
    )
        .prop_map(|(job, attempt, rank, state, exit_code, signal, stats)| p::RankReport {
            job,
            attempt,
            rank,
            state,
            pid: 42,
            exit_code,
            signal,
            stats: stats.then_some(p::RankStats {
                step: 3,
                step_ms: f64::NAN,
                tokens_per_s: f64::INFINITY,
                loss: -0.0,
            }),
            message: String::new(),
            blamed_rank: (rank % 3 == 1).then_some(rank ^ 1),
        })
}

fn resources() -> impl Strategy<Value = Option<p::WorkerResources>> {
    proptest::option::of(
        (small_string(), 0u32..4, any::<u32>(), any::<u32>()).prop_map(|(name, slots, a, b)| p::WorkerResources {
            name,
            slots,
            port_range_start: a % 70_000,
            port_range_end: b % 70_000,
            ..Default::default()
        }),
    )
}

#[derive(Debug, Clone)]
enum Call {
    Register(Option<p::WorkerResources>, Vec<p::RankReport>),
    Heartbeat(String, Vec<p::RankReport>),
    Submit(p::JobRequest),
    Cancel(u64),
    Mode(String, i32),
    Get(u64),
    Raw(u8, Vec<u8>),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        (resources(), proptest::collection::vec(report(), 0..3)).prop_map(|(r, v)| Call::Register(r, v)),
        (
            prop_oneof![Just("w1".to_string()), small_string()],
            proptest::collection::vec(report(), 0..4)
        )
            .prop_map(|(w, v)| Call::Heartbeat(w, v)),
        job().prop_map(Call::Submit),
        (0u64..5).prop_map(Call::Cancel),
        (prop_oneof![Just("w1".to_string()), small_string()], -1i32..4).prop_map(|(w, m)| Call::Mode(w, m)),
        (0u64..5).prop_map(Call::Get),
        (0u8..5, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(k, b)| Call::Raw(k, b)),
    ]
}

async fn apply(c: &Coordinator, call: Call) {
    // Every outcome is fine except a panic: replies and statuses are both answers.
    match call {
        Call::Register(resources, ranks) => {
            let _ = c.register(Request::new(p::RegisterRequest { resources, ranks })).await;
        }
        Call::Heartbeat(worker, ranks) => {
            let _ = c.heartbeat(Request::new(p::HeartbeatRequest { worker, ranks })).await;
        }
        Call::Submit(job) => {
            let _ = c.submit(Request::new(p::SubmitRequest { job: Some(job) })).await;
        }
        Call::Cancel(job) => {
            let _ = c.cancel_job(Request::new(p::CancelJobRequest { job })).await;
        }
        Call::Mode(worker, mode) => {
            let _ = c
                .set_worker_mode(Request::new(p::SetWorkerModeRequest { worker, mode }))
                .await;
        }
        Call::Get(job) => {
            let _ = c.get_job(Request::new(p::GetJobRequest { job })).await;
            let _ = c.list_jobs(Request::new(p::ListJobsRequest {})).await;
            let _ = c.list_workers(Request::new(p::ListWorkersRequest {})).await;
        }
        Call::Raw(kind, bytes) => match kind {
            0 => {
                if let Ok(m) = p::RegisterRequest::decode(bytes.as_slice()) {
                    let _ = c.register(Request::new(m)).await;
                }
            }
            1 => {
                if let Ok(m) = p::HeartbeatRequest::decode(bytes.as_slice()) {
                    let _ = c.heartbeat(Request::new(m)).await;
                }
            }
            2 => {
                if let Ok(m) = p::SubmitRequest::decode(bytes.as_slice()) {
                    let _ = c.submit(Request::new(m)).await;
                }
            }
            3 => {
                if let Ok(m) = p::SetWorkerModeRequest::decode(bytes.as_slice()) {
                    let _ = c.set_worker_mode(Request::new(m)).await;
                }
            }
            _ => {
                if let Ok(m) = p::CancelJobRequest::decode(bytes.as_slice()) {
                    let _ = c.cancel_job(Request::new(m)).await;
                }
            }
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_calls_never_crash_and_state_always_reloads(calls in proptest::collection::vec(call(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (c, dir) = fresh();
        rt.block_on(async {
            // One well-formed worker so jobs can actually be placed and reported on.
            let w1 = p::WorkerResources { name: "w1".into(), slots: 4, ..Default::default() };
            c.register(Request::new(p::RegisterRequest { resources: Some(w1), ranks: vec![] })).await.unwrap();
            for call in calls {
                apply(&c, call).await;
            }
            c.tick().unwrap();
        });
        let (jobs, workers) = {
            let g = c.lock();
            (g.sched.jobs().cloned().collect::<Vec<_>>(), g.sched.workers().cloned().collect::<Vec<_>>())
        };
        drop(c);
        let (_store, loaded) = StateStore::open(&dir).unwrap();
        prop_assert_eq!(loaded.jobs.len(), jobs.len());
        prop_assert_eq!(loaded.workers.len(), workers.len());
        for j in &jobs {
            let saved = loaded.jobs.iter().find(|x| x.id == j.id).unwrap();
            prop_assert_eq!(saved.state, j.state);
            prop_assert_eq!(saved.attempt, j.attempt);
            prop_assert_eq!(&saved.placement, &j.placement);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
