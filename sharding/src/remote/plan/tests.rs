//! The plan driven through whole runs: every sequence of three steps over four shards, with
//! and without a limit, one or two fetches in flight, fetches finishing in order or out of
//! order, with and without reads outside the plan; the invariants of the module
//! documentation checked after every event.

use super::*;

fn config(costs: &[u64], limit: Option<u64>, in_flight: usize, end: u64) -> PlanConfig {
    PlanConfig {
        costs: costs.to_vec(),
        limit,
        in_flight,
        horizon: 64,
        end: Some(end),
    }
}

/// How a simulated run goes.
#[derive(Clone, Copy)]
struct Run {
    in_flight: usize,
    /// Fetches end newest first (else oldest first).
    lifo: bool,
    /// Before each step, the reader first demands shard `step % shards` and waits for it.
    demands: bool,
}

/// What a simulated run saw.
#[derive(Debug, Default)]
struct Seen {
    /// Shards in the order their fetches started.
    started: Vec<usize>,
    released: Vec<usize>,
}

fn plan_all(plan: &mut Plan, needs: &[Vec<usize>]) -> Result<(), PlanError> {
    while let Some(step) = plan.wants_step() {
        plan.add_step(step, needs[step as usize].clone())?;
    }
    Ok(())
}

/// Apply releases, start what may start, checking the invariants.
fn settle(plan: &mut Plan, needs: &[Vec<usize>], limit: Option<u64>, flight: &mut Vec<usize>, seen: &mut Seen) {
    let current = plan.reading_step() as usize;
    for s in plan.to_release() {
        assert!(
            current >= needs.len() || !needs[current].contains(&s),
            "shard {s} released while the reader is on step {current}, which reads it"
        );
        plan.released(s);
        seen.released.push(s);
    }
    while let Some(s) = plan.next_fetch() {
        let window = plan.window();
        // Nothing not held comes before it in the window, except a demand outside it.
        if let Some(at) = window.iter().position(|&w| w == s) {
            assert!(window[..at].iter().all(|&w| plan.held(w) != Held::No), "{window:?} {s}");
        } else {
            assert_eq!(plan.demand, Some(s));
        }
        plan.started(s);
        flight.push(s);
        seen.started.push(s);
    }
    if let Some(limit) = limit {
        assert!(plan.held_bytes() <= limit, "{} held > limit {limit}", plan.held_bytes());
    }
}

/// Run a reader over `needs` to the end; `Err` when a step was refused as too large.
fn simulate(costs: &[u64], limit: Option<u64>, needs: &[Vec<usize>], run: Run) -> Result<Seen, PlanError> {
    let mut plan = Plan::new(config(costs, limit, run.in_flight, needs.len() as u64), 0)?;
    let mut flight: Vec<usize> = Vec::new();
    let mut seen = Seen::default();
    let mut demanded = vec![false; needs.len()];
    for _ in 0..10_000 {
        plan_all(&mut plan, needs)?;
        settle(&mut plan, needs, limit, &mut flight, &mut seen);
        let step = plan.reading_step();
        if step as usize == needs.len() {
            // The reader is done; the fetches in flight (and, without a limit, the rest of
            // the dataset) go on to the end.
            while let Some(s) = flight.pop() {
                plan.finished(s, true);
                settle(&mut plan, needs, limit, &mut flight, &mut seen);
            }
            return Ok(seen);
        }
        if run.demands && !demanded[step as usize] {
            let d = step as usize % costs.len();
            plan.demand(d);
            if plan.held(d) == Held::Present {
                demanded[step as usize] = true;
                continue;
            }
        } else if plan.step_ready(step) {
            plan.reading(step + 1);
            continue;
        }
        let Some(s) = (if run.lifo {
            flight.pop()
        } else {
            flight.first().copied()
        }) else {
            if run.demands && !demanded[step as usize] {
                continue;
            }
            panic!("step {step} waits for shards but nothing is being fetched: {plan:?}");
        };
        flight.retain(|&f| f != s);
        plan.finished(s, true);
    }
    panic!("the run did not end: {plan:?}");
}

/// Every non-empty subset of `n` shards.
fn subsets(n: usize) -> Vec<Vec<usize>> {
    (1..1usize << n)
        .map(|m| (0..n).filter(|&s| m & (1 << s) != 0).collect())
        .collect()
}

#[test]
fn every_three_step_run_over_four_shards_keeps_the_invariants() {
    let costs = [1u64, 2, 3, 1];
    let subsets = subsets(costs.len());
    let mut runs = 0;
    for a in &subsets {
        for b in &subsets {
            for c in &subsets {
                let needs = vec![a.clone(), b.clone(), c.clone()];
                for limit in [None, Some(3 + 3), Some(3 + 5), Some(3 + 7)] {
                    for run in [
                        Run {
                            in_flight: 1,
                            lifo: false,
                            demands: false,
                        },
                        Run {
                            in_flight: 2,
                            lifo: true,
                            demands: false,
                        },
                        Run {
                            in_flight: 2,
                            lifo: false,
                            demands: true,
                        },
                    ] {
                        let window = limit.map(|l| l - 3);
                        let too_large = needs
                            .iter()
                            .position(|n| window.is_some_and(|w| n.iter().map(|&s| costs[s]).sum::<u64>() > w));
                        match simulate(&costs, limit, &needs, run) {
                            Ok(seen) => {
                                assert_eq!(too_large, None, "{needs:?} {limit:?}");
                                if limit.is_none() {
                                    // The whole dataset is fetched, each shard once, none let go.
                                    let mut started = seen.started.clone();
                                    started.sort_unstable();
                                    assert_eq!(started, vec![0, 1, 2, 3], "{needs:?}");
                                    assert!(seen.released.is_empty());
                                }
                            }
                            Err(PlanError::StepTooLarge { step, .. }) => {
                                assert_eq!(too_large, Some(step as usize), "{needs:?} {limit:?}");
                            }
                            Err(e) => panic!("{e}"),
                        }
                        runs += 1;
                    }
                }
            }
        }
    }
    assert_eq!(runs, 15 * 15 * 15 * 4 * 3);
}

#[test]
fn without_a_limit_fetches_follow_the_first_need_then_the_rest() {
    let mut plan = Plan::new(config(&[5, 5, 5, 5, 5], None, 8, 2), 0).unwrap();
    plan.add_step(0, vec![3, 1]).unwrap();
    plan.add_step(1, vec![1, 4]).unwrap();
    assert_eq!(plan.wants_step(), None, "the end");
    assert_eq!(plan.window(), vec![1, 3, 4, 0, 2]);
    let mut order = Vec::new();
    while let Some(s) = plan.next_fetch() {
        plan.started(s);
        order.push(s);
    }
    assert_eq!(order, vec![1, 3, 4, 0, 2]);
}

#[test]
fn with_a_limit_the_window_slides_and_releases_behind_the_reader() {
    // Limit 4 less a reserve of one largest shard (1): a window of 3 shards.
    let mut plan = Plan::new(config(&[1, 1, 1, 1, 1, 1], Some(4), 1, 100), 0).unwrap();
    let needs = [vec![0, 1], vec![2], vec![3], vec![0, 4], vec![5]];
    while let Some(step) = plan.wants_step() {
        plan.add_step(step, needs[step as usize].clone()).unwrap();
        if step as usize + 1 == needs.len() {
            break;
        }
    }
    assert_eq!(plan.planned_until(), 3, "planning stops once the window is full");
    assert_eq!(plan.window(), vec![0, 1, 2]);
    for s in [0, 1, 2] {
        plan.started(s);
        plan.finished(s, true);
    }
    assert_eq!(plan.next_fetch(), None, "full");
    plan.reading(1);
    assert_eq!(plan.to_release(), vec![0, 1], "not needed again within the window");
    plan.released(0);
    plan.released(1);
    assert_eq!(plan.next_fetch(), Some(3));
    assert_eq!(plan.next_need(2), Some(1));
    assert_eq!(plan.next_need(0), None, "step 3 is not planned yet");
}

#[test]
fn a_demand_goes_first_and_uses_the_reserve() {
    let mut plan = Plan::new(config(&[2, 2, 2, 2], Some(6), 4, 100), 0).unwrap();
    plan.add_step(0, vec![0, 1]).unwrap();
    plan.add_step(1, vec![2]).unwrap();
    assert_eq!(plan.window(), vec![0, 1], "6 less a reserve of 2");
    plan.demand(3);
    assert_eq!(plan.next_fetch(), Some(3));
    plan.started(3);
    assert_eq!(plan.next_fetch(), Some(0));
    plan.started(0);
    plan.started(1);
    assert_eq!(plan.held_bytes(), 6);
    // Another demand waits until the first one is let go.
    plan.demand(2);
    assert_eq!(plan.next_fetch(), None);
    plan.finished(3, true);
    assert_eq!(plan.to_release(), vec![3]);
    plan.released(3);
    assert_eq!(plan.next_fetch(), Some(2));
    // A demand inside the window only moves it to the front.
    plan.demand(1);
    assert_eq!(plan.window(), vec![1, 0]);
}

#[test]
fn impossible_plans_are_refused_naming_the_numbers() {
    let e = Plan::new(config(&[1, 9], Some(8), 1, 10), 0).unwrap_err();
    assert_eq!(
        e,
        PlanError::ShardTooLarge {
            shard: 1,
            bytes: 9,
            limit: 8
        }
    );
    let mut plan = Plan::new(config(&[3, 3, 3], Some(8), 1, 10), 0).unwrap();
    let e = plan.add_step(0, vec![0, 1]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "step 0 reads 2 shard(s) of 6 bytes in all, more than the 5 bytes this rank may keep ahead in the data cache: raise the cache budget (data.cache_gb), write smaller shards or lower the global batch"
    );
    assert_eq!(
        plan.add_step(3, vec![0]).unwrap_err(),
        PlanError::OutOfOrder { expected: 0, got: 3 }
    );
    assert_eq!(
        plan.add_step(0, vec![7]).unwrap_err(),
        PlanError::NoSuchShard {
            step: 0,
            shard: 7,
            shards: 3
        }
    );
}

#[test]
fn a_reader_that_jumps_past_the_plan_starts_over_there() {
    let mut plan = Plan::new(config(&[1, 1], None, 1, 100), 5).unwrap();
    assert_eq!(plan.wants_step(), Some(5));
    plan.add_step(5, vec![1]).unwrap();
    plan.reading(9);
    assert_eq!((plan.reading_step(), plan.planned_until()), (9, 9));
    assert_eq!(plan.wants_step(), Some(9));
    plan.reading(3);
    assert_eq!(plan.reading_step(), 9, "readers only move forward");
}
