//! Under Slurm (`srun gantry launch …`): Slurm's hostlist syntax, the rules that turn a task's
//! SLURM_* variables into a rank and a rendezvous point, and, end to end, tasks started with
//! a fake Slurm environment that run a command and train a tiny job with no coordinator.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;

// The pure part of the Slurm support, compiled straight into this test.
#[allow(dead_code)]
#[path = "../src/slurm.rs"]
mod slurm;

use common::{GANTRY, text};
use slurm::{MAX_HOSTS, SlurmEnv, expand_nodelist, expand_tasks_per_node};

fn hosts(list: &str) -> Vec<String> {
    expand_nodelist(list).unwrap_or_else(|e| panic!("{list}: {e}"))
}

#[test]
fn hostlists_expand_like_slurm() {
    let golden: &[(&str, &[&str])] = &[
        ("localhost", &["localhost"]),
        ("a,b", &["a", "b"]),
        ("node[1-3]", &["node1", "node2", "node3"]),
        ("node[01-03,07]", &["node01", "node02", "node03", "node07"]),
        ("node[8-10]", &["node8", "node9", "node10"]),
        ("node[098-101]", &["node098", "node099", "node100", "node101"]),
        (
            "rack[1-2]-gpu[1-2]",
            &["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"],
        ),
        ("n1,n[3-4],x", &["n1", "n3", "n4", "x"]),
        ("gpu[1-2]b", &["gpu1b", "gpu2b"]),
        ("[7,9]", &["7", "9"]),
        ("a-1.example.org,b[2]", &["a-1.example.org", "b2"]),
        (" n[1-2] ", &["n1", "n2"]),
    ];
    for (list, want) in golden {
        assert_eq!(hosts(list), *want, "{list}");
    }
}

#[test]
fn malformed_hostlists_are_refused_by_name() {
    let cases: &[(&str, &str)] = &[
        ("", "no host names"),
        ("node[1-3", "`[` without a matching `]`"),
        ("node1-3]", "`]` without a matching `[`"),
        ("node[1[2]]", "nested `[`"),
        ("node[3-1]", "reversed range `3-1`"),
        ("node[]", "empty brackets"),
        ("node[a-b]", "not a number"),
        ("node[1-]", "not a number"),
        ("a,,b", "empty host name"),
        ("a,", "empty host name after the last"),
        ("a b", "whitespace"),
        ("node[1-99999999999999999999999]", "too large"),
        ("node[1-2000000]", "more than 1000000 hosts"),
        ("a[1-1000]b[1-1001]", "more than 1000000 hosts"),
        ("a[1-600000],b[1-600000]", "more than 1000000 hosts"),
    ];
    for (list, needle) in cases {
        let e = expand_nodelist(list).expect_err(list).to_string();
        assert!(e.contains(needle), "{list}: expected `{needle}` in `{e}`");
        assert!(e.contains(&format!("`{list}`")), "{list}: the list is named in `{e}`");
    }
    // Exactly the limit is fine.
    assert_eq!(expand_nodelist("n[1-1000000]").unwrap().len(), MAX_HOSTS);
}

/// xorshift64: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random sorted distinct numbers, and the bracket body (`1-3,7`) that names them.
fn random_bracket(rng: &mut Rng, width: usize) -> (Vec<u64>, String) {
    let mut nums: Vec<u64> = (0..1 + rng.below(12)).map(|_| rng.below(300)).collect();
    nums.sort_unstable();
    nums.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &n in &nums {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == n => *hi = n,
            _ => ranges.push((n, n)),
        }
    }
    let body = ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                format!("{lo:0width$}")
            } else {
                format!("{lo:0width$}-{hi:0width$}")
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    (nums, body)
}

#[test]
fn compressed_host_sets_expand_back_to_themselves() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..500 {
        let mut list = Vec::new();
        let mut want = Vec::new();
        for item in 0..1 + rng.below(4) {
            let prefix = format!("h{case}x{item}-");
            let width = [1, 2, 3, 4][rng.below(4) as usize];
            let (outer, outer_body) = random_bracket(&mut rng, width);
            if rng.below(2) == 0 {
                list.push(format!("{prefix}[{outer_body}]"));
                want.extend(outer.iter().map(|n| format!("{prefix}{n:0width$}")));
            } else {
                // Two brackets: the first varies slowest.
                let (inner, inner_body) = random_bracket(&mut rng, 1);
                list.push(format!("{prefix}[{outer_body}]g[{inner_body}]s"));
                for a in &outer {
                    want.extend(inner.iter().map(|b| format!("{prefix}{a:0width$}g{b}s")));
                }
            }
        }
        let list = list.join(",");
        assert_eq!(hosts(&list), want, "{list}");
    }
}

#[test]
fn arbitrary_input_never_panics_or_overflows() {
    let alphabet = b"ab[]-,0123456789 ";
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let len = rng.below(24) as usize;
        let s: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char)
            .collect();
        if let Ok(h) = expand_nodelist(&s) {
            assert!(!h.is_empty() && h.len() <= MAX_HOSTS, "{s}");
            assert!(
                h.iter().all(|h| !h.is_empty() && !h.contains(['[', ']', ','])),
                "{s}: {h:?}"
            );
        }
    }
}

#[test]
fn tasks_per_node_expands_repeats() {
    assert_eq!(expand_tasks_per_node("4(x2),3").unwrap(), vec![4, 4, 3]);
    assert_eq!(expand_tasks_per_node("2").unwrap(), vec![2]);
    assert_eq!(expand_tasks_per_node("1,8(x3)").unwrap(), vec![1, 8, 8, 8]);
    for bad in ["4(x2", "4(2)", "x", "", "4(xy)"] {
        assert!(expand_tasks_per_node(bad).is_err(), "{bad}");
    }
}

fn env_of(pairs: &[(&str, &str)]) -> Result<Option<SlurmEnv>, String> {
    let map: std::collections::HashMap<String, String> =
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    SlurmEnv::from_lookup(|k| map.get(k).cloned()).map_err(|e| e.to_string())
}

const TASK: &[(&str, &str)] = &[
    ("SLURM_PROCID", "1"),
    ("SLURM_NTASKS", "4"),
    ("SLURM_LOCALID", "1"),
    ("SLURM_NODEID", "0"),
    ("SLURM_NODELIST", "gpu[07-08]"),
    ("SLURM_TASKS_PER_NODE", "2(x2)"),
    ("SLURM_JOB_ID", "123456"),
];

/// A task's variables as `(name, value)` pairs.
type Vars = Vec<(&'static str, &'static str)>;

fn with(extra: &[(&'static str, &'static str)], without: &[&str]) -> Vars {
    let mut v: Vec<_> = TASK
        .iter()
        .copied()
        .filter(|(k, _)| !without.contains(k) && !extra.iter().any(|(e, _)| e == k))
        .collect();
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_tasks_place_comes_from_slurms_variables() {
    assert_eq!(
        env_of(&[("SLURM_NTASKS", "4")]),
        Ok(None),
        "no SLURM_PROCID: not a task"
    );
    let s = env_of(TASK).unwrap().unwrap();
    assert_eq!(
        (s.rank, s.world, s.local_rank, s.local_world, s.node_rank, s.nodes),
        (1, 4, 1, 2, 0, 2)
    );
    assert_eq!(s.master_addr, "gpu07");
    assert_eq!(s.master_port, 29500 + 456);
    assert_eq!(s.job_id, "123456");

    // A site's MASTER_ADDR / MASTER_PORT win; the step's nodelist beats the job's.
    let s = env_of(&with(&[("MASTER_PORT", "40000"), ("MASTER_ADDR", "10.0.0.9")], &[]))
        .unwrap()
        .unwrap();
    assert_eq!((s.master_addr.as_str(), s.master_port), ("10.0.0.9", 40000));
    let s = env_of(&with(&[("SLURM_STEP_NODELIST", "gpu08")], &[]))
        .unwrap()
        .unwrap();
    assert_eq!((s.master_addr.as_str(), s.nodes), ("gpu08", 1));

    // Tasks on this node: --ntasks-per-node, else this node's entry of the per-node list
    // (by SLURM_NODEID, else by counting tasks node by node), else an even split.
    let s = env_of(&with(&[("SLURM_NTASKS_PER_NODE", "3")], &[])).unwrap().unwrap();
    assert_eq!(s.local_world, 3);
    let uneven = [
        ("SLURM_NTASKS", "11"),
        ("SLURM_NODELIST", "n[1-3]"),
        ("SLURM_TASKS_PER_NODE", "4(x2),3"),
    ];
    let s = env_of(&with(&[&uneven[..], &[("SLURM_NODEID", "2")]].concat(), &[]))
        .unwrap()
        .unwrap();
    assert_eq!(s.local_world, 3);
    for (procid, local) in [("5", 4), ("9", 3), ("0", 4)] {
        let s = env_of(&with(
            &[&uneven[..], &[("SLURM_PROCID", procid)]].concat(),
            &["SLURM_NODEID"],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(s.local_world, local, "SLURM_PROCID={procid}");
    }
    let s = env_of(&with(&[], &["SLURM_TASKS_PER_NODE"])).unwrap().unwrap();
    assert_eq!(s.local_world, 2, "4 tasks over 2 nodes");
    let one_node = [("SLURM_NODELIST", "localhost"), ("SLURM_LOCALID", "1")];
    let s = env_of(&with(&one_node, &["SLURM_TASKS_PER_NODE"])).unwrap().unwrap();
    assert_eq!((s.local_world, s.master_addr.as_str()), (4, "localhost"));
}

#[test]
fn bad_slurm_variables_are_named() {
    let cases: &[(Vars, &[&str])] = &[
        (with(&[], &["SLURM_NTASKS"]), &["SLURM_NTASKS is not set"]),
        (with(&[], &["SLURM_LOCALID"]), &["SLURM_LOCALID is not set"]),
        (with(&[], &["SLURM_JOB_ID"]), &["SLURM_JOB_ID is not set"]),
        (with(&[], &["SLURM_NODELIST"]), &["SLURM_NODELIST is not set"]),
        (
            with(&[("SLURM_PROCID", "4")], &[]),
            &["SLURM_PROCID", "below SLURM_NTASKS=4"],
        ),
        (with(&[("SLURM_PROCID", "one")], &[]), &["SLURM_PROCID=`one`"]),
        (
            with(&[("SLURM_NODELIST", "gpu[08-07]")], &[]),
            &["SLURM_NODELIST=`gpu[08-07]`", "reversed"],
        ),
        (
            with(&[("SLURM_LOCALID", "2")], &[]),
            &["SLURM_LOCALID=`2`", "2 tasks on this node"],
        ),
        (
            with(&[("SLURM_TASKS_PER_NODE", "2(x")], &[]),
            &["SLURM_TASKS_PER_NODE=`2(x`"],
        ),
        (with(&[("SLURM_NODEID", "5")], &[]), &["SLURM_NODEID=5"]),
        (with(&[("MASTER_PORT", "http")], &[]), &["MASTER_PORT=`http`"]),
        (
            with(&[("SLURM_JOB_ID", "12_3")], &[]),
            &["SLURM_JOB_ID=`12_3`", "MASTER_PORT"],
        ),
        (
            with(
                &[("SLURM_NTASKS", "3"), ("SLURM_PROCID", "0")],
                &["SLURM_TASKS_PER_NODE"],
            ),
            &["3 tasks do not split evenly over 2 nodes", "SLURM_TASKS_PER_NODE"],
        ),
    ];
    for (vars, needles) in cases {
        let e = env_of(vars).expect_err(&format!("{vars:?}"));
        for n in *needles {
            assert!(e.contains(n), "expected `{n}` in `{e}`");
        }
    }
}

// ---------------------------------------------------------------- end to end

fn tempdir(tag: &str) -> PathBuf {
    common::tempdir("slurm", tag)
}

/// `gantry launch ARGS…` as task `rank` of a 2-task step on this host, job `job_id`.
fn task(rank: usize, job_id: &str, args: &[&str]) -> Command {
    let mut c = Command::new(GANTRY);
    c.arg("launch").args(args);
    for (k, v) in [
        ("SLURM_PROCID", rank.to_string()),
        ("SLURM_LOCALID", rank.to_string()),
        ("SLURM_NTASKS", "2".into()),
        ("SLURM_NODEID", "0".into()),
        ("SLURM_NODELIST", "localhost".into()),
        ("SLURM_TASKS_PER_NODE", "2".into()),
        ("SLURM_JOB_ID", job_id.into()),
    ] {
        c.env(k, v);
    }
    for k in [
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS_PER_NODE",
    ] {
        c.env_remove(k);
    }
    c
}

#[test]
fn each_task_runs_the_command_as_its_rank() {
    let dir = tempdir("cmd");
    let script = r#"echo "$$ $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $TORCHELASTIC_RUN_ID" > "$OUT_DIR/r$RANK""#;
    let children: Vec<Child> = (0..2)
        .map(|r| {
            task(r, "7654321", &["--", "sh", "-c", script])
                .env("OUT_DIR", &dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let pid = c.id();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "task {r}: {}", text(&out));
        let line = std::fs::read_to_string(dir.join(format!("r{r}"))).unwrap();
        // The task became the command (exec): same process, no launcher in between.
        assert_eq!(line.trim(), format!("{pid} {r} {r} 2 2 localhost 29821 7654321"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const SPEC: &str = r#"
[model]
d_model = 32
n_layers = 1
n_heads = 4
seq_len = 16
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

fn progress(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn two_tasks_train_a_job_without_a_coordinator() {
    let dir = tempdir("train");
    let spec = common::synth_job(&dir, SPEC, 200_000, 5);
    let run = dir.join("run");
    // A free port rather than the job id's: other tests may run at the same time.
    let port = common::free_port().to_string();
    let children: Vec<Child> = (0..2)
        .map(|r| {
            task(
                r,
                "31337",
                &[spec.to_str().unwrap(), "--json", "--run-dir", run.to_str().unwrap()],
            )
            .env("MASTER_PORT", &port)
            .env("GANTRY_PROGRESS_FILE", dir.join(format!("progress-{r}.json")))
            // Two ranks on a loaded machine: sleeping OpenMP threads, as `--local` sets.
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "task {r}: {}", text(out));
    }
    // The reporting rank (dp 0 of the last stage: rank 0) prints the summary; the other
    // prints nothing.
    let summary: serde_json::Value = serde_json::from_slice(&outs[0].stdout).expect("rank 0 prints JSON");
    assert!(outs[1].stdout.is_empty(), "{}", text(&outs[1]));
    assert_eq!(summary["steps"], 3, "{summary}");
    let on_disk: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(on_disk, summary);
    assert!(
        std::fs::read_to_string(run.join("spec.toml"))
            .unwrap()
            .contains("dp = 2")
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    // Every rank's progress file holds its last step; with pp = 1 both ranks know the loss.
    for r in 0..2 {
        let p = progress(&dir.join(format!("progress-{r}.json")));
        assert_eq!(p["step"], 3, "rank {r}: {p}");
        for key in ["step_ms", "tokens_per_s", "loss"] {
            assert!(
                p[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
                "rank {r}: {key} in {p}"
            );
        }
        assert!(!dir.join(format!("progress-{r}.json.tmp")).exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
