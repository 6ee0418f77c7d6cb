//! The authenticated data plane with the real `gantry` binary:
//! - two `gantry rank` processes started by hand, as torchrun would, with the user's
//!   GANTRY_JOB_SECRET: while rank 0 waits for its peer, its rendezvous store and its link
//!   listener refuse plain bytes, a hello without a secret, a wrong secret, a replayed
//!   handshake and a rank started with a wrong secret, each logged with the peer's address;
//!   then the real rank 1 joins and the job trains; the secret is in no output;
//! - a rank without a secret refuses to start unless GANTRY_INSECURE_NO_AUTH=1;
//! - the secrets `--nproc`, `--local` and the coordinator generate appear in no output, log,
//!   run directory, `gantry job` view or `/metrics`, and every rank of a run gets the same one.

mod common;

use common::{GANTRY, text};
use gantry_collectives::auth::handshake::Channel;
use gantry_collectives::auth::probe::{Target, intrusions};
use gantry_collectives::auth::{JobAuth, JobSecret, Party};
use gantry_collectives::store::{Store, TcpStore};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(120);

const SPEC: &str = r#"
[model]
d_model = 32
n_layers = 1
n_heads = 4
seq_len = 16
vocab_size = 512
[parallel]
dp = 2
[optim]
lr = 1e-2
warmup_steps = 1
[train]
steps = 3
global_batch = 8
micro_batch = 4
threads = 1
"#;

/// `gantry rank` as rank `rank` of 2, placed by torchrun's variables only, over TCP, with
/// `secret` (or none) and nothing the test's own environment might add.
fn rank(rank: usize, secret: Option<&str>, port: u16, spec: &Path, run: &Path) -> Command {
    let mut c = Command::new(GANTRY);
    c.arg("rank")
        .arg("--spec")
        .arg(spec)
        .arg("--run-dir")
        .arg(run)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("GANTRY_TRANSPORT", "tcp")
        .env("GANTRY_LOG", "info")
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "GANTRY_STORE_EXTERNAL",
        "GANTRY_INSECURE_NO_AUTH",
        "GANTRY_AUTH_JOB",
        "GANTRY_AUTH_ATTEMPT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "GANTRY_JOB_SECRET",
    ] {
        c.env_remove(var);
    }
    if let Some(s) = secret {
        c.env("GANTRY_JOB_SECRET", s);
    }
    c
}

/// Kills a rank process the test still holds when it fails.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn assert_absent(secret: &str, what: &str, haystack: &str) {
    assert!(!secret.is_empty());
    assert!(!haystack.contains(secret), "the job secret appears in {what}");
}

/// Every file under `dir` (recursively) as text, for secret scans.
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push((p, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    out
}

#[test]
fn ranks_refuse_intruders_and_a_wrong_secret_while_the_job_waits_and_then_trains() {
    let dir = common::tempdir("auth", "ranks");
    let spec = common::synth_job(&dir, SPEC, 200_000, 3);
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let secret = "the-users-own-job-secret-4711";
    let wrong = "a-wrong-secret-for-rank-one";
    let port = common::free_port();

    // Rank 0 alone: it serves the store, listens for links and waits for rank 1.
    let mut rank0 = Reaper(Some(rank(0, Some(secret), port, &spec, &run).spawn().unwrap()));
    let right = JobAuth::new(JobSecret::parse(secret).unwrap(), "", 1);
    let store_addr = format!("127.0.0.1:{port}");
    let store = TcpStore::connect(&store_addr, PATIENCE, Some(right.clone()), Party::Launcher).unwrap();
    let peer0: serde_json::Value = serde_json::from_slice(&store.get("gantry/peer/0", PATIENCE).unwrap()).unwrap();
    let link_addr = peer0["addr"].as_str().expect("rank 0 listens on TCP").to_string();

    // A forged abort record blaming rank 1, as a plain SET without the handshake.
    let (key, record) = (
        b"gantry/abort/world#1",
        br#"{"culprit":1,"reporter":0,"reason":"forged"}"#,
    );
    let mut forged = vec![1u8];
    forged.extend_from_slice(&(key.len() as u32).to_le_bytes());
    forged.extend_from_slice(key);
    forged.extend_from_slice(&(record.len() as u64).to_le_bytes());
    forged.extend_from_slice(record);
    let at_store = Target {
        addr: &store_addr,
        channel: Channel::Store,
        server: Party::Store,
        key: "",
    };
    let mut refused = intrusions(&at_store, &right, &forged).unwrap();
    let at_link = Target {
        addr: &link_addr,
        channel: Channel::Link,
        server: Party::Rank(0),
        key: "auth-test#1",
    };
    refused += intrusions(&at_link, &right, b"GNT1 plain bytes, not a handshake").unwrap();
    assert_eq!(
        store.try_get("gantry/abort/world#1").unwrap(),
        None,
        "the forged SET was applied"
    );

    // A rank with a wrong secret: refused by the store, it fails naming why, not the secret.
    let intruder = rank(1, Some(wrong), port, &spec, &run).output().unwrap();
    assert!(!intruder.status.success(), "{}", text(&intruder));
    assert!(
        text(&intruder).contains("cannot authenticate with the rendezvous store"),
        "{}",
        text(&intruder)
    );
    refused += 1;

    // The real rank 1: the job runs on and trains.
    let rank1 = rank(1, Some(secret), port, &spec, &run).output().unwrap();
    let rank0 = rank0.0.take().unwrap().wait_with_output().unwrap();
    assert!(rank0.status.success(), "rank 0: {}", text(&rank0));
    assert!(rank1.status.success(), "rank 1: {}", text(&rank1));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 3, "{summary}");

    // Each refusal is a warning with the intruder's address; none blamed a rank.
    let log0 = String::from_utf8_lossy(&rank0.stderr).to_string();
    let warnings: Vec<&str> = log0.lines().filter(|l| l.contains("refused a connection")).collect();
    assert_eq!(warnings.len() as u64, refused, "{log0}");
    assert!(warnings.iter().all(|l| l.contains("peer=127.0.0.1:")), "{warnings:#?}");
    assert!(warnings.iter().any(|l| l.contains("rendezvous store")), "{warnings:#?}");
    assert!(
        warnings.iter().any(|l| l.contains("rank 0's link listener")),
        "{warnings:#?}"
    );

    for (what, out) in [
        ("rank 0", &rank0),
        ("rank 1", &rank1),
        ("the intruding rank", &intruder),
    ] {
        for s in [secret, wrong] {
            assert_absent(s, &format!("{what}'s output"), &text(out));
        }
    }
    for (path, content) in files_under(&run) {
        assert_absent(secret, &path.display().to_string(), &content);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `gantry bench collectives` as the single rank of a world placed by hand.
fn bench_rank(extra: &[(&str, &str)]) -> Output {
    let mut c = Command::new(GANTRY);
    c.args([
        "bench",
        "collectives",
        "--sizes",
        "1K",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ])
    .env("RANK", "0")
    .env("WORLD_SIZE", "1")
    .env("MASTER_ADDR", "127.0.0.1")
    .env("MASTER_PORT", common::free_port().to_string());
    for var in [
        "GANTRY_JOB_SECRET",
        "GANTRY_INSECURE_NO_AUTH",
        "GANTRY_STORE_EXTERNAL",
        "SLURM_PROCID",
    ] {
        c.env_remove(var);
    }
    c.envs(extra.iter().copied()).output().unwrap()
}

#[test]
fn a_rank_without_a_secret_refuses_to_start_unless_told_to_run_open() {
    let out = bench_rank(&[]);
    assert!(!out.status.success(), "{}", text(&out));
    for needle in ["GANTRY_JOB_SECRET is not set", "GANTRY_INSECURE_NO_AUTH=1"] {
        assert!(text(&out).contains(needle), "`{needle}` missing in:\n{}", text(&out));
    }
    let out = bench_rank(&[("GANTRY_JOB_SECRET", "short")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("at least 16"), "{}", text(&out));
    assert!(!text(&out).contains("short`"), "{}", text(&out));

    let out = bench_rank(&[("GANTRY_INSECURE_NO_AUTH", "1")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("GANTRY_INSECURE_NO_AUTH"),
        "the open rank must say so:\n{}",
        text(&out)
    );
}

/// Runs of at least 64 hex digits: what a generated secret looks like.
fn hex_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            if run.len() >= 64 {
                runs.push(std::mem::take(&mut run));
            }
            run.clear();
        }
    }
    runs
}

#[test]
fn launchers_generate_one_secret_per_run_and_never_print_it() {
    let dir = common::tempdir("auth", "launchers");
    // --nproc: each rank records the secret it got, then runs gantry's collectives with it.
    let script = r#"printf '%s' "$GANTRY_JOB_SECRET" > "$OUT/s$RANK"; exec "$GANTRY" bench collectives --sizes 1K --iters 1 --warmup 0"#;
    let out = Command::new(GANTRY)
        .args(["launch", "--nproc", "2", "--json", "--", "sh", "-c", script])
        .env("OUT", &dir)
        .env("GANTRY", GANTRY)
        .env("GANTRY_LOG", "debug")
        .env("GANTRY_JOB_SECRET", "a-secret-the-launcher-must-replace")
        .env_remove("SLURM_PROCID")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let read = |r: usize| std::fs::read_to_string(dir.join(format!("s{r}"))).unwrap();
    let secret = read(0);
    assert_eq!(secret, read(1), "every rank of a run gets the same secret");
    assert_eq!(hex_runs(&secret), vec![secret.clone()], "64 fresh hex digits");
    assert_absent(&secret, "the --nproc launcher's and ranks' output", &text(&out));

    // --local: nothing that looks like a generated secret in the output, logs or run dir.
    let spec = common::synth_job(&dir, SPEC, 200_000, 4);
    let run = dir.join("run");
    let out = Command::new(GANTRY)
        .arg("launch")
        .arg(&spec)
        .args(["--local", "2", "--json", "--run-dir"])
        .arg(&run)
        .env("GANTRY_LOG", "debug")
        .env_remove("SLURM_PROCID")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(hex_runs(&text(&out)), Vec::<String>::new(), "launcher output");
    for (path, content) in files_under(&run) {
        assert_eq!(hex_runs(&content), Vec::<String>::new(), "{}", path.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon killed when the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A coordinator and one 2-slot worker on loopback, logging at debug level into `dir`; the
/// daemons and the coordinator's address.
fn cluster(dir: &Path, token: &str) -> (Daemon, Daemon, String) {
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let mut coordinator = Command::new(GANTRY)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--token",
            token,
            "--heartbeat-ms",
            "200",
        ])
        .arg("--state")
        .arg(dir.join("coordinator-state"))
        .env("GANTRY_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(log("coordinator.log"))
        .spawn()
        .unwrap();
    let addr = common::listening_address(&mut coordinator).expect("coordinator address");
    let coordinator = Daemon(coordinator);
    // MASTER_PORTs below the ephemeral range; the command's ranks bind none of them.
    let ports = 10_000 + (std::process::id() % 900) * 25;
    let worker = Daemon(
        Command::new(GANTRY)
            .args([
                "worker",
                "--coordinator",
                &addr,
                "--token",
                token,
                "--name",
                "w1",
                "--slots",
                "2",
            ])
            .args(["--ports", &format!("{ports}-{}", ports + 24), "--state"])
            .arg(dir.join("worker-state"))
            .env("GANTRY_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log("worker.log"))
            .spawn()
            .unwrap(),
    );
    (coordinator, worker, addr)
}

#[test]
fn the_coordinators_secret_reaches_the_ranks_and_nothing_else() {
    let dir = common::tempdir("auth", "cluster");
    let token = "auth-test-cluster-token";
    let (_coordinator, _worker, addr) = cluster(&dir, token);
    let cli = |args: &[&str]| {
        Command::new(GANTRY)
            .args(args)
            .env("GANTRY_COORDINATOR", &addr)
            .env("GANTRY_TOKEN", token)
            .output()
            .unwrap()
    };
    let job = dir.join("job.toml");
    let script = r#"printf '%s' "$GANTRY_JOB_SECRET" > "$OUT/secret-$RANK-$GANTRY_AUTH_JOB-$GANTRY_AUTH_ATTEMPT"; echo rank $RANK done"#;
    std::fs::write(
        &job,
        format!(
            "name = \"auth\"\ncommand = [\"sh\", \"-c\", {script:?}]\nnproc = 2\nenv = {{ OUT = {:?} }}\n",
            dir.display().to_string()
        ),
    )
    .unwrap();
    let until = Instant::now() + PATIENCE;
    let submitted = loop {
        let out = cli(&["submit", job.to_str().unwrap(), "--json"]);
        if out.status.success() {
            break out;
        }
        // The worker may not have registered yet: the job would not fit.
        assert!(Instant::now() < until, "{}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    };
    let id = serde_json::from_slice::<serde_json::Value>(&submitted.stdout).unwrap()["job"]
        .as_u64()
        .unwrap()
        .to_string();
    let view = loop {
        let out = cli(&["job", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["state"] == "succeeded" {
            break text(&out);
        }
        assert!(Instant::now() < until && v["state"] != "failed", "{}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    };

    let read = |r: usize| std::fs::read_to_string(dir.join(format!("secret-{r}-{id}-1"))).unwrap();
    let secret = read(0);
    assert_eq!(secret, read(1), "both ranks of the attempt get the same secret");
    assert_eq!(hex_runs(&secret), vec![secret.clone()]);
    let workers: serde_json::Value = serde_json::from_slice(&cli(&["workers", "--json"]).stdout).unwrap();
    let service = workers[0]["service_address"].as_str().unwrap().to_string();
    let mut seen = vec![
        ("`gantry job`".to_string(), view),
        ("`gantry jobs`".into(), text(&cli(&["jobs", "--json"]))),
        ("`gantry logs`".into(), text(&cli(&["logs", &id, "--rank", "0"]))),
        (
            "the coordinator's /metrics".into(),
            common::http_get(&addr, "/metrics", &[]),
        ),
        (
            "the worker's /metrics".into(),
            common::http_get(&service, "/metrics", &[]),
        ),
    ];
    for name in ["coordinator.log", "worker.log"] {
        seen.push((name.into(), std::fs::read_to_string(dir.join(name)).unwrap()));
    }
    assert!(seen[2].1.contains("rank 0 done"), "{}", seen[2].1);
    for (what, content) in &seen {
        assert_absent(&secret, what, content);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
