//! `gantry launch --nproc N -- PROGRAM`: any command runs as N ranks with torchrun's
//! environment; a failing rank stops the others and sets the exit code; signals reach the
//! ranks; and the environment alone is enough for gantry's own collectives to rendezvous.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{GANTRY, text};

fn tempdir(tag: &str) -> PathBuf {
    common::tempdir("torchrun", tag)
}

/// `gantry launch ARGS… -- sh -c SCRIPT`, with `OUT_DIR` for the script and none of the
/// variables the launcher sets or keeps leaking in from the test's own environment.
fn launch_sh(args: &[&str], script: &str, out_dir: &Path) -> Command {
    let mut c = Command::new(GANTRY);
    c.arg("launch")
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("OUT_DIR", out_dir)
        .env_remove("OMP_NUM_THREADS")
        .env_remove("SLURM_PROCID");
    c
}

/// `KEY=VALUE` lines of a file the script wrote with `env`.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn every_rank_gets_torchruns_environment() {
    let dir = tempdir("env");
    let out = launch_sh(
        &["--nproc", "3", "--json"],
        r#"env > "$OUT_DIR/r$RANK"; printf '%s|' "$@" > "$OUT_DIR/args$RANK""#,
        &dir,
    )
    // A launcher started by gantry's own local world must not pass that on: here rank 0
    // serves the store.
    .env("GANTRY_STORE_EXTERNAL", "1")
    .arg("sh")
    .args(["two words", "--flag"])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["failed_rank"], serde_json::Value::Null, "{summary}");
    let port = summary["master_port"].as_u64().unwrap();
    let envs: Vec<_> = (0..3).map(|r| env_file(&dir.join(format!("r{r}")))).collect();
    for (r, env) in envs.iter().enumerate() {
        let r = r.to_string();
        for (key, want) in [
            ("RANK", r.as_str()),
            ("LOCAL_RANK", &r),
            ("ROLE_RANK", &r),
            ("WORLD_SIZE", "3"),
            ("LOCAL_WORLD_SIZE", "3"),
            ("ROLE_WORLD_SIZE", "3"),
            ("GROUP_RANK", "0"),
            ("GROUP_WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port.to_string()),
            ("TORCHELASTIC_RESTART_COUNT", "0"),
            ("TORCHELASTIC_MAX_RESTARTS", "0"),
            ("OMP_NUM_THREADS", "1"),
        ] {
            assert_eq!(env.get(key).map(String::as_str), Some(want), "rank {r}: {key}");
        }
        assert!(!env.contains_key("GANTRY_STORE_EXTERNAL"), "rank {r}");
        assert_eq!(env["TORCHELASTIC_RUN_ID"], envs[0]["TORCHELASTIC_RUN_ID"]);
        // Arguments reach the program untouched.
        let args = std::fs::read_to_string(dir.join(format!("args{r}"))).unwrap();
        assert_eq!(args, "two words|--flag|");
        assert_eq!(summary["ranks"][r.parse::<usize>().unwrap()]["exit_code"], 0);
    }
    assert!(!envs[0]["TORCHELASTIC_RUN_ID"].is_empty());

    // A chosen port is used as given; the user's OMP_NUM_THREADS is kept.
    let out = launch_sh(
        &["--nproc", "2", "--master-port", "29999"],
        r#"echo "$MASTER_PORT $OMP_NUM_THREADS" > "$OUT_DIR/p$RANK""#,
        &dir,
    )
    .env("OMP_NUM_THREADS", "3")
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for r in 0..2 {
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("p{r}"))).unwrap().trim(),
            "29999 3"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Wait until `n` files `<dir>/<prefix>*` exist.
fn wait_for_files(dir: &Path, prefix: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count();
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of {n} {prefix}* files appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let dir = tempdir("fail");
    // Rank 1 fails once the others are up; rank 2 ignores SIGTERM, so it needs the SIGKILL
    // that follows the grace period.
    let script = r#"
        echo $$ > "$OUT_DIR/pid$RANK.tmp" && mv "$OUT_DIR/pid$RANK.tmp" "$OUT_DIR/pid$RANK"
        case $RANK in
          1) while [ ! -e "$OUT_DIR/pid0" ] || [ ! -e "$OUT_DIR/pid2" ]; do sleep 0.05; done; exit 3 ;;
          2) trap '' TERM; exec sleep 1000 ;;
          *) exec sleep 1000 ;;
        esac"#;
    let started = Instant::now();
    let out = launch_sh(&["--nproc", "3", "--json"], script, &dir).output().unwrap();
    let took = started.elapsed();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(msg.contains("rank 1 failed (exit code 3)"), "{msg}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["failed_rank"], 1, "{summary}");
    let ranks = &summary["ranks"];
    assert_eq!(ranks[1]["exit_code"], 3);
    assert_eq!(ranks[0]["signal"], libc::SIGTERM, "{summary}");
    assert_eq!(ranks[2]["signal"], libc::SIGKILL, "{summary}");
    assert_eq!(ranks[0]["stopped_by_launcher"], true);
    for r in [0, 2] {
        let pid: i32 = std::fs::read_to_string(dir.join(format!("pid{r}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!alive(pid), "rank {r} (pid {pid}) still runs");
    }

    // A rank killed by a signal: the shell's 128 + signal, and the signal named.
    let out = launch_sh(&["--nproc", "2"], r#"[ $RANK = 0 ] && kill -KILL $$; exit 0"#, &dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{}", text(&out));
    assert!(
        text(&out).contains("rank 0 failed (killed by signal 9 (SIGKILL))"),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank() {
    let dir = tempdir("signal");
    let script = r#"
        trap 'echo "$RANK" > "$OUT_DIR/term$RANK"; exit 0' TERM
        touch "$OUT_DIR/up$RANK"
        while :; do sleep 0.05; done"#;
    let child = launch_sh(&["--nproc", "2"], script, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_files(&dir, "up", 2);
    // SAFETY: signalling the launcher this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out: Output = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{}", text(&out));
    for r in 0..2 {
        assert!(dir.join(format!("term{r}")).exists(), "rank {r} never saw SIGTERM");
    }
    assert!(text(&out).contains("SIGTERM"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gantry_collectives_rendezvous_through_the_torchrun_environment() {
    // `gantry bench collectives` joins a world from RANK / WORLD_SIZE / MASTER_ADDR /
    // MASTER_PORT alone (rank 0 serving the store): the launcher's environment must suffice.
    let out = Command::new(GANTRY)
        .args(["launch", "--nproc", "2", "--", GANTRY, "bench", "collectives"])
        .args([
            "--sizes",
            "1K,64K",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--timeout-secs",
            "30",
            "--json",
        ])
        .env_remove("SLURM_PROCID")
        .env_remove("RANK")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(rows.len(), 2, "{}", text(&out));
    for row in &rows {
        assert_eq!(row["world"], 2, "{row}");
        assert_eq!(row["ok"], true, "{row}");
    }
}

#[test]
fn bad_command_lines_say_what_is_wrong() {
    let dir = tempdir("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--nproc", "0", "--", "true"], "--nproc must be at least 1"),
        (&["--nproc", "2"], "nothing to launch"),
        (&["job.toml", "--nproc", "2", "--", "true"], "not both"),
        (
            &["--local", "2", "--nproc", "2", "--", "true"],
            "--local is for a job spec",
        ),
        (&["--local", "2", "--", "true"], "--local is for a job spec"),
        (&["--", "true"], "--nproc N is required"),
        (
            &["--nproc", "1", "--set", "train.steps=2", "--", "true"],
            "--set applies to a job spec",
        ),
        (&["job.toml", "--nproc", "2"], "--nproc runs a command"),
        (&["--nproc", "1", "--", "/nonexistent/program"], "cannot start rank 0"),
    ];
    for (args, needle) in cases {
        let out = Command::new(GANTRY)
            .arg("launch")
            .args(*args)
            .env_remove("SLURM_PROCID")
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            text(&out).contains(needle),
            "{args:?}: expected `{needle}` in:\n{}",
            text(&out)
        );
        assert!(!text(&out).contains("panicked"), "{}", text(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
