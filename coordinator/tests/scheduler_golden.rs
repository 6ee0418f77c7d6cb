//! Golden tests of the pure scheduler: scripted events with simulated time in
//! `tests/golden/*.script`, the decided actions and resulting state in `*.golden`.
//! Run with `GANTRY_BLESS=1` to rewrite the golden files after an intended change (then
//! read the diff: it is the behaviour change).
//!
//! Script lines: `@<ms> <command> [args]`, `#` comments.
//! - `join W slots=N [gpus=N] [labels=k:v,..] [running=J/A/R/PID,..]`
//! - `hb W [J/A/R:run] [J/A/R:exit=C] [J/A/R:signal=S] [J/A/R:nostart] [J/A/R:step=MS]`;
//!   a `>P` suffix (`1/1/0:exit=1>2`) says the rank's error names rank P as failed
//! - `submit NAME dp=N [tp=N] [pp=N] [gpus=N] [max_restarts=N] [elastic] [min_dp=N]
//!   [priority=N] [noqueue] [labels=k:v]`
//! - `cancel J`, `mode W active|cordoned|draining`, `tick`, `show`, `events J`
//! - `restart`: persist every record as JSON and restore a new scheduler from it (a
//!   coordinator restart), then `show`.

use gantry_coordinator::core::*;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

fn kv(args: &[&str]) -> BTreeMap<String, String> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (a.to_string(), String::new()),
        })
        .collect()
}

fn labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            let (k, v) = x.split_once(':').expect("label k:v");
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn num<T: std::str::FromStr>(m: &BTreeMap<String, String>, k: &str, default: T) -> T {
    m.get(k).map_or(default, |v| v.parse().ok().expect("number"))
}

fn rank_ref(s: &str) -> (u64, u32, u32) {
    let v: Vec<&str> = s.split('/').collect();
    (v[0].parse().unwrap(), v[1].parse().unwrap(), v[2].parse().unwrap())
}

fn report(item: &str) -> RankReport {
    let (item, blamed) = match item.split_once('>') {
        Some((item, peer)) => (item, Some(peer.parse().expect(">P: a rank"))),
        None => (item, None),
    };
    let (r, what) = item.split_once(':').expect("J/A/R:what");
    let (job, attempt, rank) = rank_ref(r);
    let (mut phase, mut stats) = (RankPhase::Running { pid: 1000 + rank }, None);
    match what.split_once('=') {
        None if what == "run" => {}
        None if what == "nostart" => {
            phase = RankPhase::FailedToStart {
                message: "No such file or directory".into(),
            }
        }
        Some(("exit", c)) => {
            phase = RankPhase::Exited {
                code: Some(c.parse().unwrap()),
                signal: None,
            }
        }
        Some(("signal", s)) => {
            phase = RankPhase::Exited {
                code: None,
                signal: Some(s.parse().unwrap()),
            }
        }
        Some(("step", ms)) => {
            stats = Some(RankStats {
                step: 10,
                step_ms: ms.parse().unwrap(),
                tokens_per_s: 1000.0,
                loss: 2.5,
            })
        }
        _ => panic!("bad report `{item}`"),
    }
    RankReport {
        job,
        attempt,
        rank,
        phase,
        stats,
        blamed,
    }
}

fn show(s: &Scheduler, out: &mut String) {
    for w in s.workers() {
        let (used, ranks) = s.worker_load(&w.info.name);
        let _ = writeln!(
            out,
            "  worker {} {}{} {:?} slots {}/{} ranks {}",
            w.info.name,
            if w.alive { "alive" } else { "lost" },
            if s.is_suspected(&w.info.name) { " suspected" } else { "" },
            w.mode,
            used,
            w.info.slots,
            ranks
        );
    }
    for j in s.jobs() {
        let placement: Vec<String> = j
            .placement
            .iter()
            .map(|p| {
                if p.gpus.is_empty() {
                    p.worker.clone()
                } else {
                    format!("{}{:?}", p.worker, p.gpus)
                }
            })
            .collect();
        let stragglers: Vec<usize> = s
            .stragglers(j)
            .iter()
            .enumerate()
            .filter(|(_, s)| **s)
            .map(|(i, _)| i)
            .collect();
        let _ = writeln!(
            out,
            "  job {} {} {} attempt {} restarts {} dp {} master :{} on [{}]{}{}",
            j.id,
            j.request.name,
            j.state.name(),
            j.attempt,
            j.restarts,
            j.dp,
            j.master_port,
            placement.join(" "),
            if stragglers.is_empty() {
                String::new()
            } else {
                format!(" stragglers {stragglers:?}")
            },
            if j.reason.is_empty() {
                String::new()
            } else {
                format!(" — {}", j.reason)
            }
        );
    }
}

fn run_script(text: &str) -> String {
    let config = SchedulerConfig {
        heartbeat_deadline_ms: 10_000,
        straggler_factor: 1.5,
        max_events_per_job: 50,
    };
    let mut s = Scheduler::new(config.clone());
    let mut out = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let _ = writeln!(out, "{line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        let now: u64 = words[0].strip_prefix('@').expect("@time").parse().unwrap();
        let cmd = words[1];
        let args = &words[2..];
        let actions: Result<Vec<Action>, String> = match cmd {
            "join" => {
                let m = kv(&args[1..]);
                let mut info = WorkerInfo::cpu(args[0], num(&m, "slots", 1));
                info.gpus = (0..num(&m, "gpus", 0u32))
                    .map(|i| Gpu {
                        index: i,
                        model: "H200".into(),
                        memory_bytes: 141 << 30,
                    })
                    .collect();
                info.labels = labels(m.get("labels").map_or("", String::as_str));
                let running = m
                    .get("running")
                    .map(|r| {
                        r.split(',')
                            .map(|x| {
                                let v: Vec<&str> = x.split('/').collect();
                                RankReport {
                                    job: v[0].parse().unwrap(),
                                    attempt: v[1].parse().unwrap(),
                                    rank: v[2].parse().unwrap(),
                                    phase: RankPhase::Running {
                                        pid: v[3].parse().unwrap(),
                                    },
                                    stats: None,
                                    blamed: None,
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(s.worker_joined(now, info, running))
            }
            "hb" => {
                let reports = args[1..].iter().map(|a| report(a)).collect();
                s.heartbeat(now, args[0], reports)
                    .ok_or_else(|| "unknown or lost worker: register again".to_string())
            }
            "submit" => {
                let m = kv(&args[1..]);
                let mut r = JobRequest::command(args[0], num(&m, "dp", 1));
                r.tp = num(&m, "tp", 1);
                r.pp = num(&m, "pp", 1);
                r.gpus_per_rank = num(&m, "gpus", 0);
                r.max_restarts = num(&m, "max_restarts", 0);
                r.elastic = m.contains_key("elastic");
                r.min_dp = num(&m, "min_dp", 1);
                r.priority = num(&m, "priority", 0);
                r.queue = !m.contains_key("noqueue");
                r.labels = labels(m.get("labels").map_or("", String::as_str));
                s.submit(now, r)
                    .map(|(id, a)| {
                        let _ = writeln!(out, "  = job {id}");
                        a
                    })
                    .map_err(|e| e.to_string())
            }
            "cancel" => s.cancel(now, args[0].parse().unwrap()).map_err(|e| e.to_string()),
            "mode" => {
                let mode = match args[1] {
                    "active" => WorkerMode::Active,
                    "cordoned" => WorkerMode::Cordoned,
                    "draining" => WorkerMode::Draining,
                    m => panic!("mode {m}"),
                };
                s.set_mode(now, args[0], mode).map_err(|e| e.to_string())
            }
            "tick" => Ok(s.tick(now)),
            "events" => {
                let job = s.job(args[0].parse().unwrap()).expect("events of a known job");
                for e in &job.events {
                    let _ = writeln!(out, "  @{} {}: {}", e.at_ms, e.kind, e.message);
                }
                Ok(vec![])
            }
            "show" => {
                show(&s, &mut out);
                Ok(vec![])
            }
            "restart" => {
                let _ = s.take_dirty();
                let workers: Vec<Worker> = s
                    .workers()
                    .map(|w| serde_json::from_str(&serde_json::to_string(w).unwrap()).unwrap())
                    .collect();
                let jobs: Vec<Job> = s
                    .jobs()
                    .map(|j| serde_json::from_str(&serde_json::to_string(j).unwrap()).unwrap())
                    .collect();
                s = Scheduler::restore(config.clone(), workers, jobs, now);
                show(&s, &mut out);
                Ok(vec![])
            }
            c => panic!("unknown command {c}"),
        };
        match actions {
            Ok(actions) => {
                for a in actions {
                    let _ = writeln!(out, "  -> {a:?}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  !! {e}");
            }
        }
    }
    out
}

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let script = std::fs::read_to_string(dir.join(format!("{name}.script"))).unwrap();
    let got = run_script(&script);
    let golden = dir.join(format!("{name}.golden"));
    if std::env::var("GANTRY_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&golden, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|_| panic!("{} missing: run with GANTRY_BLESS=1", golden.display()));
    if got != want {
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            if g != w {
                panic!("{name}: first difference at line {}:\n  got:  {g}\n  want: {w}", i + 1);
            }
        }
        panic!(
            "{name}: transcript length differs ({} vs {} lines)",
            got.lines().count(),
            want.lines().count()
        );
    }
}

#[test]
fn gang_placement_and_success() {
    check("success");
}
#[test]
fn rank_failure_restarts_until_max_restarts() {
    check("rank_failure");
}
#[test]
fn lost_worker_elastic_shrink_and_regrow() {
    check("elastic");
}
#[test]
fn queue_priority_cordon_drain_and_refusals() {
    check("queue");
}
#[test]
fn coordinator_restart_keeps_running_jobs() {
    check("restart");
}
#[test]
fn peer_death_report_blames_and_suspects_the_dead_worker() {
    check("peer_death");
}
#[test]
fn a_coordinator_cut_off_declares_nobody_lost() {
    check("blackout");
}
