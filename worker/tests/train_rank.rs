//! A training rank: the worker writes the spec and runs the rank program with it.
//!
//! Alone in its own test binary: it writes an executable and runs it, and a process forking
//! in another test thread at that moment could hold the file open for writing (ETXTBSY).

mod common;

use common::*;
use gantry_worker::RankState;
use gantry_worker::launch::run_dir;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_training_rank_runs_the_rank_program_with_its_spec() {
    let h = harness("train", GRACE, false);
    // A stand-in for `gantry` that records how it was called.
    let fake = h.dir.path().join("fake-gantry");
    std::fs::write(&fake, "#!/bin/sh\nprintf '%s\\n' \"$@\" > args.txt\nenv > env.txt\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let launch = gantry_worker::launch::LaunchContext {
        state_dir: h.state_dir(),
        rank_program: fake,
        has_gpus: false,
        advertise_host: None,
        env: std::env::vars_os().collect(),
    };
    let mut sup = gantry_worker::Supervisor::new(
        gantry_worker::SupervisorConfig { launch, grace: GRACE },
        h.live.clone(),
        h.metrics.clone(),
    );
    let k = key(9, 2, 0);
    let spec = "[model]\nlayers = 2\n";
    sup.start(&train(k, spec, true)).await;
    let state = wait_exit(&mut sup, k).await;
    assert!(matches!(state, RankState::Exited { code: Some(0), .. }), "{state:?}");
    let dir = run_dir(&h.state_dir(), 9, 2);
    assert_eq!(read(&dir.join("spec.toml")), spec);
    let args: Vec<String> = read(&dir.join("args.txt")).lines().map(String::from).collect();
    let want = [
        "rank".to_string(),
        "--spec".to_string(),
        dir.join("spec.toml").display().to_string(),
        "--run-dir".to_string(),
        dir.display().to_string(),
        "--set".to_string(),
        "parallel.dp=2".to_string(),
        "--resume-auto".to_string(),
    ];
    assert_eq!(args, want);
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        assert!(
            read(&dir.join("env.txt"))
                .lines()
                .any(|l| l == "OMP_WAIT_POLICY=PASSIVE")
        );
    }
}
