//! The supervisor with real processes: logs, exit codes and signals, environment, process
//! groups, grace periods, start failures, reconciliation, and ranks dying with the worker.

mod common;

use common::*;
use gantry_coordinator::proto::RankState as WireState;
use gantry_worker::launch::{log_path, progress_path, run_dir};
use gantry_worker::{Event, RankState, Supervisor};
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn stdout_and_stderr_land_in_the_log_and_the_exit_code_is_reported() {
    let mut h = harness("logs", GRACE, false);
    let k = key(1, 1, 0);
    h.supervisor
        .start(&shell(k, "echo to-stdout; echo to-stderr >&2; exit 3"))
        .await;
    let state = wait_exit(&mut h.supervisor, k).await;
    assert!(
        matches!(
            state,
            RankState::Exited {
                code: Some(3),
                signal: None,
                stopped: false,
                ..
            }
        ),
        "{state:?}"
    );
    let log = read(&log_path(&h.state_dir(), k));
    assert!(
        log.contains("to-stdout\n") && log.contains("to-stderr\n"),
        "log: {log:?}"
    );

    let reports = h.supervisor.reports().await;
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!((r.job, r.attempt, r.rank), (1, 1, 0));
    assert_eq!(r.state(), WireState::Exited);
    assert_eq!((r.exit_code, r.signal), (Some(3), None));
    assert!(r.pid > 0);
    assert!(!h.live.contains(k));
    assert!(
        h.metrics
            .render()
            .contains("gantry_worker_rank_exits_total{outcome=\"failure\"} 1")
    );
}

#[tokio::test]
async fn a_signal_that_killed_the_rank_is_reported() {
    let mut h = harness("signal", GRACE, false);
    let k = key(1, 1, 0);
    h.supervisor.start(&shell(k, "kill -KILL $$")).await;
    let state = wait_exit(&mut h.supervisor, k).await;
    assert!(
        matches!(
            state,
            RankState::Exited {
                code: None,
                signal: Some(9),
                stopped: false,
                ..
            }
        ),
        "{state:?}"
    );
    let r = &h.supervisor.reports().await[0];
    assert_eq!((r.exit_code, r.signal), (None, Some(9)));
}

#[tokio::test]
async fn the_rendezvous_environment_reaches_the_rank() {
    let mut h = harness("env", GRACE, true);
    let k = key(42, 3, 1);
    // No workdir: the rank runs in its run directory.
    h.supervisor.start(&shell(k, "env > env.txt")).await;
    let state = wait_exit(&mut h.supervisor, k).await;
    assert!(matches!(state, RankState::Exited { code: Some(0), .. }), "{state:?}");
    let env = read(&run_dir(&h.state_dir(), 42, 3).join("env.txt"));
    let progress = progress_path(&h.state_dir(), k);
    let want = [
        "RANK=1".to_string(),
        "LOCAL_RANK=1".to_string(),
        "WORLD_SIZE=2".to_string(),
        "LOCAL_WORLD_SIZE=2".to_string(),
        "MASTER_ADDR=127.0.0.1".to_string(),
        "MASTER_PORT=29611".to_string(),
        "TORCHELASTIC_RESTART_COUNT=2".to_string(),
        "TORCHELASTIC_RUN_ID=gantry-42".to_string(),
        "GANTRY_JOB_ID=42".to_string(),
        "GANTRY_JOB_NAME=test-job".to_string(),
        "GANTRY_ATTEMPT=3".to_string(),
        format!("GANTRY_PROGRESS_FILE={}", progress.display()),
        // A CPU rank on a worker with GPUs sees none.
        "CUDA_VISIBLE_DEVICES=".to_string(),
        // The job's own variables.
        "GANTRY_TEST_JOB_ENV=from-the-job".to_string(),
    ];
    for line in want {
        assert!(env.lines().any(|l| l == line), "missing `{line}` in\n{env}");
    }
    if std::env::var_os("GANTRY_LOG").is_none() {
        assert!(env.lines().any(|l| l == "GANTRY_LOG=info"), "{env}");
    }
}

#[tokio::test]
async fn the_workers_secrets_do_not_reach_the_rank() {
    let inherited = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.into(), v.into())).collect();
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    let worker_env = inherited(&[
        ("PATH", path.as_str()),
        ("GANTRY_WORKER_TEST_KEPT", "plain"),
        ("GANTRY_TOKEN", "cluster-secret"),
        ("GANTRY_TOKEN_FILE", "/etc/gantry/token"),
        ("GANTRY_METRICS_TOKEN", "scrape-secret"),
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ("AWS_SESSION_TOKEN", "aws-session"),
    ]);
    let mut h = harness_with_env("env-scrub", GRACE, false, worker_env);
    let plain = key(7, 1, 0);
    h.supervisor.start(&shell(plain, "env > env.txt")).await;
    wait_exit(&mut h.supervisor, plain).await;
    let env = read(&run_dir(&h.state_dir(), 7, 1).join("env.txt"));
    for line in [
        "GANTRY_WORKER_TEST_KEPT=plain",
        "RANK=0",
        "WORLD_SIZE=2",
        "MASTER_PORT=29611",
    ] {
        assert!(env.lines().any(|l| l == line), "missing `{line}` in\n{env}");
    }
    for secret in [
        "cluster-secret",
        "/etc/gantry/token",
        "scrape-secret",
        "AKIAEXAMPLE",
        "aws-secret",
        "aws-session",
    ] {
        assert!(!env.contains(secret), "`{secret}` reached the rank:\n{env}");
    }

    // A job that names the AWS key pair gets those two, and nothing else secret.
    let asks = key(8, 1, 0);
    let mut a = shell(asks, "env > env.txt");
    a.env.insert(
        gantry_worker::scrub::ENV_PASS.into(),
        "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY".into(),
    );
    h.supervisor.start(&a).await;
    wait_exit(&mut h.supervisor, asks).await;
    let env = read(&run_dir(&h.state_dir(), 8, 1).join("env.txt"));
    for line in ["AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY=aws-secret"] {
        assert!(env.lines().any(|l| l == line), "missing `{line}` in\n{env}");
    }
    for secret in ["cluster-secret", "scrape-secret", "aws-session"] {
        assert!(!env.contains(secret), "`{secret}` reached the rank:\n{env}");
    }
}

#[tokio::test]
async fn stopping_a_rank_kills_its_whole_process_tree() {
    let mut h = harness("tree", GRACE, false);
    let k = key(1, 1, 0);
    h.supervisor
        .start(&shell(k, "sleep 1000 & echo $! > grandchild.pid; wait"))
        .await;
    let pid_file = run_dir(&h.state_dir(), 1, 1).join("grandchild.pid");
    eventually("the grandchild pid file", || read(&pid_file).ends_with('\n')).await;
    let grandchild: u32 = read(&pid_file).trim().parse().unwrap();
    assert!(!process_gone(grandchild));
    assert!(h.live.contains(k));

    h.supervisor.stop(k);
    let state = wait_exit(&mut h.supervisor, k).await;
    assert!(
        matches!(
            state,
            RankState::Exited {
                signal: Some(15),
                stopped: true,
                ..
            }
        ),
        "{state:?}"
    );
    eventually("the grandchild to be gone", || process_gone(grandchild)).await;
    assert!(
        h.metrics
            .render()
            .contains("gantry_worker_rank_exits_total{outcome=\"killed\"} 1")
    );
}

#[tokio::test]
async fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let mut h = harness("grace", Duration::from_millis(300), false);
    let k = key(1, 1, 0);
    h.supervisor
        .start(&shell(k, "trap '' TERM; echo ready; sleep 1000; echo not-reached"))
        .await;
    let log = log_path(&h.state_dir(), k);
    eventually("the rank to install its trap", || read(&log).contains("ready")).await;

    h.supervisor.stop(k);
    let (state, events) = wait_exit_events(&mut h.supervisor, k).await;
    assert!(
        matches!(
            state,
            RankState::Exited {
                signal: Some(9),
                stopped: true,
                ..
            }
        ),
        "{state:?}"
    );
    assert!(events.contains(&Event::Killed(vec![k])), "{events:?}");
}

#[tokio::test]
async fn a_rank_that_cannot_start_is_reported_as_failed_to_start() {
    let mut h = harness("missing", GRACE, false);
    let missing = key(1, 1, 0);
    h.supervisor
        .start(&command(missing, &["/nonexistent/gantry-no-such-program", "x"], ""))
        .await;
    let Some(RankState::FailedToStart { message }) = h.supervisor.state(missing) else {
        panic!("{:?}", h.supervisor.state(missing));
    };
    assert!(message.contains("/nonexistent/gantry-no-such-program"), "{message}");
    assert!(message.contains("No such file"), "{message}");

    let bad_dir = key(1, 1, 1);
    h.supervisor
        .start(&command(bad_dir, &["true"], "/nonexistent/dir"))
        .await;
    let Some(RankState::FailedToStart { message }) = h.supervisor.state(bad_dir) else {
        panic!("{:?}", h.supervisor.state(bad_dir));
    };
    assert!(
        message.contains("/nonexistent/dir") && message.contains("working directory"),
        "{message}"
    );

    let empty = key(1, 1, 2);
    h.supervisor.start(&command(empty, &[], "")).await;
    assert!(matches!(
        h.supervisor.state(empty),
        Some(RankState::FailedToStart { .. })
    ));

    let reports = h.supervisor.reports().await;
    assert_eq!(reports.len(), 3);
    assert!(
        reports
            .iter()
            .all(|r| r.state() == WireState::FailedToStart && !r.message.is_empty())
    );
    assert!(h.metrics.render().contains("gantry_worker_rank_start_failures_total 3"));
}

#[tokio::test]
async fn progress_files_become_rank_stats() {
    let mut h = harness("progress", GRACE, false);
    let k = key(1, 1, 0);
    let script = r#"printf '{"step":7,"step_ms":12.5,"tokens_per_s":900.0,"loss":2.5}' > "$GANTRY_PROGRESS_FILE.tmp"
mv "$GANTRY_PROGRESS_FILE.tmp" "$GANTRY_PROGRESS_FILE"
echo ready
exec sleep 1000"#;
    h.supervisor.start(&shell(k, script)).await;
    let log = log_path(&h.state_dir(), k);
    eventually("the progress file", || read(&log).contains("ready")).await;
    let r = &h.supervisor.reports().await[0];
    assert_eq!(r.state(), WireState::Running);
    let stats = r.stats.expect("stats of a running rank");
    assert_eq!(
        (stats.step, stats.step_ms, stats.tokens_per_s, stats.loss),
        (7, 12.5, 900.0, 2.5)
    );

    // Once more after the exit, then kept.
    let last = r#"{"step":8,"step_ms":12.0,"tokens_per_s":950.0,"loss":2.25}"#;
    std::fs::write(progress_path(&h.state_dir(), k), last).unwrap();
    h.supervisor.stop(k);
    wait_exit(&mut h.supervisor, k).await;
    let r = &h.supervisor.reports().await[0];
    assert_eq!(r.stats.map(|s| s.step), Some(8));
    std::fs::remove_file(progress_path(&h.state_dir(), k)).unwrap();
    assert_eq!(h.supervisor.reports().await[0].stats.map(|s| s.step), Some(8));
}

#[tokio::test]
async fn reconciling_starts_once_never_restarts_and_forgets() {
    let mut h = harness("apply", GRACE, false);
    let done = key(5, 1, 0);
    let long = key(5, 1, 1);
    let a_done = shell(done, "echo run >> runs.txt");
    let a_long = shell(long, "exec sleep 1000");
    h.supervisor.apply(&[a_done.clone(), a_long.clone()]).await;
    wait_exit(&mut h.supervisor, done).await;
    assert!(matches!(h.supervisor.state(long), Some(RankState::Running { .. })));

    // Still desired after exiting: not restarted, still reported.
    h.supervisor.apply(&[a_done.clone(), a_long.clone()]).await;
    h.supervisor.apply(&[a_done.clone(), a_long.clone()]).await;
    let runs = run_dir(&h.state_dir(), 5, 1).join("runs.txt");
    assert_eq!(read(&runs), "run\n");
    let reports = h.supervisor.reports().await;
    assert_eq!(reports.len(), 2);

    // No longer desired: the running one is stopped; the exited one is kept until a
    // coordinator has acknowledged a report of its exit, then forgotten.
    h.supervisor.apply(&[]).await;
    assert!(h.supervisor.state(done).is_some(), "its exit was never acknowledged");
    h.supervisor.delivered(&Supervisor::finals(&reports));
    h.supervisor.apply(&[]).await;
    assert!(h.supervisor.state(done).is_none());
    let state = wait_exit(&mut h.supervisor, long).await;
    assert!(matches!(state, RankState::Exited { stopped: true, .. }), "{state:?}");
    h.supervisor.apply(&[]).await;
    let reports = h.supervisor.reports().await;
    assert_eq!(
        reports.len(),
        1,
        "the stopped rank's exit is reported before it is forgotten"
    );
    h.supervisor.delivered(&Supervisor::finals(&reports));
    h.supervisor.apply(&[]).await;
    assert!(h.supervisor.reports().await.is_empty());

    // Desired again after being forgotten: refused, never run twice.
    h.supervisor.apply(&[a_done]).await;
    let Some(RankState::FailedToStart { message }) = h.supervisor.state(done) else {
        panic!("{:?}", h.supervisor.state(done));
    };
    assert!(message.contains("already ran"), "{message}");
    assert_eq!(read(&runs), "run\n");
}

#[tokio::test]
async fn shutdown_stops_every_rank() {
    let mut h = harness("shutdown", Duration::from_secs(5), false);
    let keys = [key(1, 1, 0), key(1, 1, 1), key(2, 1, 0)];
    for k in keys {
        h.supervisor.start(&shell(k, "exec sleep 1000")).await;
    }
    assert_eq!(h.live.len(), 3);
    tokio::time::timeout(PATIENCE, h.supervisor.shutdown())
        .await
        .expect("shutdown within the bound");
    for k in keys {
        assert!(matches!(
            h.supervisor.state(k),
            Some(RankState::Exited { stopped: true, .. })
        ));
    }
    assert!(h.live.is_empty());
    assert!(h.metrics.render().contains("gantry_worker_ranks_running 0"));
}

/// Helper process for `ranks_die_with_their_worker`: a "worker" that starts one rank, tells
/// its pid on stdout, and waits to be killed. Does nothing in a normal test run.
#[tokio::test]
async fn helper_worker_process() {
    let Some(dir) = std::env::var_os("GANTRY_WORKER_TEST_HELPER_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    // Everything under the parent test's directory: this process is SIGKILLed, never cleans up.
    let launch = gantry_worker::launch::LaunchContext {
        state_dir: dir.join("state"),
        rank_program: "gantry".into(),
        has_gpus: false,
        advertise_host: None,
        env: std::env::vars_os().collect(),
    };
    let live = std::sync::Arc::new(gantry_worker::LiveRanks::default());
    let metrics = std::sync::Arc::new(gantry_worker::metrics::Metrics::new());
    let config = gantry_worker::SupervisorConfig { launch, grace: GRACE };
    let mut supervisor = gantry_worker::Supervisor::new(config, live, metrics);
    let script = format!("echo $$ > {}/rank.pid; exec sleep 1000", dir.display());
    supervisor.start(&shell(key(1, 1, 0), &script)).await;
    tokio::time::sleep(Duration::from_secs(1000)).await;
}

#[tokio::test]
async fn ranks_die_with_their_worker() {
    let dir = TempDir::new("pdeathsig");
    let mut worker = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_worker_process", "--nocapture", "--test-threads=1"])
        .env("GANTRY_WORKER_TEST_HELPER_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("rank.pid");
    let started = eventually("the helper's rank to start", || read(&pid_file).ends_with('\n'));
    if tokio::time::timeout(PATIENCE * 2, started).await.is_err() {
        let _ = worker.kill();
        panic!("the helper worker never started its rank");
    }
    let rank: u32 = read(&pid_file).trim().parse().unwrap();
    assert!(!process_gone(rank));

    // A SIGKILLed worker daemon is a lost node: its ranks must not linger.
    worker.kill().unwrap();
    worker.wait().unwrap();
    eventually("the rank to die with its worker", || process_gone(rank)).await;
}
