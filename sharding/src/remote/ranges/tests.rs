//! The range plan driven through whole runs: every choice of three steps' reads from a small
//! menu of byte ranges over three shards, several limits, one or two GETs in flight, GETs
//! ending oldest or newest first, with and without failed GETs and reads outside the plan;
//! then random runs by property. The invariants of the module documentation are checked
//! after every event.

use super::*;
use proptest::prelude::*;

/// How a simulated run goes.
#[derive(Clone, Copy, Debug)]
struct Run {
    limit: u64,
    reserve: u64,
    in_flight: usize,
    get_bytes: u64,
    /// GETs end newest first (else oldest first).
    lifo: bool,
    /// Every `fail`-th GET to end fails (0: none).
    fail: usize,
    /// Before each step, the reader reads the first block of shard `step % shards` outside
    /// the plan and waits for it.
    demands: bool,
}

type Reads = Vec<(usize, Range<u64>)>;

fn config(sizes: &[u64], run: &Run, end: u64) -> RangeConfig {
    RangeConfig {
        sizes: sizes.to_vec(),
        block_bytes: 4,
        limit: run.limit,
        reserve: run.reserve,
        in_flight: run.in_flight,
        get_bytes: run.get_bytes,
        horizon: 16,
        end: Some(end),
    }
}

/// The block ids `reads` fall in.
fn blocks(plan: &RangePlan, reads: &Reads) -> Vec<usize> {
    let mut out: Vec<usize> = reads.iter().flat_map(|(s, r)| plan.blocks_of(*s, r).unwrap()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

struct Sim<'a> {
    plan: RangePlan,
    needs: &'a [Reads],
    run: Run,
    flight: Vec<Get>,
    ended: usize,
    /// Bytes fetched, and GETs started.
    fetched: u64,
    gets: usize,
}

impl Sim<'_> {
    fn plan_all(&mut self) -> Result<(), PlanError> {
        while let Some(step) = self.plan.wants_step() {
            self.plan.add_step(step, &self.needs[step as usize])?;
        }
        Ok(())
    }

    /// Apply releases and start what may start, checking the invariants.
    fn settle(&mut self) -> Result<(), PlanError> {
        self.plan_all()?;
        let current = self.plan.reading_step() as usize;
        let reading: Vec<usize> = match self.needs.get(current) {
            Some(reads) => blocks(&self.plan, reads),
            None => Vec::new(),
        };
        for b in self.plan.to_release() {
            assert!(
                !reading.contains(&b),
                "block {b} released while step {current} reads it"
            );
            self.plan.released(b);
        }
        while let Some(get) = self.plan.next_fetch() {
            let ids = self.plan.ids(&get);
            assert!(
                !ids.is_empty()
                    && get.blocks.end
                        <= self
                            .plan
                            .blocks_of(get.shard, &(0..self.plan.cfg.sizes[get.shard]))
                            .unwrap()
                            .len()
            );
            assert!(
                ids.clone().all(|b| self.plan.held(b) == Held::No),
                "{get:?} refetches a held block"
            );
            let bytes: u64 = ids.clone().map(|b| self.plan.cost(b)).sum();
            assert!(bytes <= self.run.get_bytes.max(4), "{get:?}: {bytes} bytes in one GET");
            // It holds the first block not held of the demand, else of the window.
            let (window, _) = self.plan.window();
            let first = match self.plan.demand.iter().find(|&&b| self.plan.held(b) == Held::No) {
                Some(&d) => d,
                None => *window
                    .iter()
                    .find(|&&b| self.plan.held(b) == Held::No)
                    .expect("a GET of nothing wanted"),
            };
            assert!(
                ids.contains(&first),
                "{get:?} does not hold {first}, the first block needed"
            );
            self.plan.started(&get);
            self.fetched += bytes;
            self.gets += 1;
            self.flight.push(get);
            assert!(
                self.plan.held_bytes() <= self.run.limit,
                "{} bytes held, over the limit of {}",
                self.plan.held_bytes(),
                self.run.limit
            );
        }
        Ok(())
    }

    /// End one GET in flight; false when none is.
    fn end_one(&mut self) -> bool {
        if self.flight.is_empty() {
            return false;
        }
        let get = match self.run.lifo {
            true => self.flight.pop().unwrap(),
            false => self.flight.remove(0),
        };
        self.ended += 1;
        let ok = self.run.fail == 0 || !self.ended.is_multiple_of(self.run.fail);
        self.plan.finished(&get, ok);
        true
    }

    /// Wait until every block of `ids` is present, as a reader does.
    fn wait_for(&mut self, ids: &[usize]) -> Result<(), PlanError> {
        for _ in 0..100_000 {
            self.settle()?;
            if ids.iter().all(|&b| self.plan.held(b) == Held::Present) {
                return Ok(());
            }
            assert!(
                self.end_one(),
                "starved: waiting for {ids:?}, nothing in flight ({:?})",
                self.run
            );
        }
        panic!("no progress");
    }
}

/// Run a reader over `needs` to the end; the bytes fetched, or the plan's refusal.
fn simulate(sizes: &[u64], needs: &[Reads], run: Run) -> Result<u64, PlanError> {
    let mut sim = Sim {
        plan: RangePlan::new(config(sizes, &run, needs.len() as u64), 0)?,
        needs,
        run,
        flight: Vec::new(),
        ended: 0,
        fetched: 0,
        gets: 0,
    };
    for (step, reads) in needs.iter().enumerate() {
        if run.demands {
            let shard = step % sizes.len();
            if let Some(ids) = sim.plan.blocks_of(shard, &(0..sizes[shard].min(1))) {
                sim.plan.demand(ids.clone());
                sim.wait_for(&ids.collect::<Vec<_>>())?;
            }
        }
        let ids = blocks(&sim.plan, reads);
        sim.wait_for(&ids)?;
        sim.plan.reading(step as u64 + 1);
    }
    // What is still in flight ends; then nothing is held but the demand.
    while sim.end_one() {}
    sim.settle()?;
    assert!(sim.plan.held_bytes() <= run.reserve.max(4));
    Ok(sim.fetched)
}

const SIZES: [u64; 3] = [12, 8, 6];

/// Byte ranges a step may read: within a block, across two, a whole shard, a partial last
/// block, empty.
fn menu() -> Vec<Reads> {
    vec![
        vec![(0, 1..3)],
        vec![(0, 3..9)],
        vec![(1, 0..8)],
        vec![(2, 5..6), (0, 11..12)],
        vec![(2, 0..6), (1, 2..3)],
        vec![(1, 4..4)],
    ]
}

#[test]
fn every_small_run_keeps_the_invariants() {
    let menu = menu();
    let (mut runs, mut finished) = (0, 0);
    for a in 0..menu.len() {
        for b in 0..menu.len() {
            for c in 0..menu.len() {
                let needs = vec![menu[a].clone(), menu[b].clone(), menu[c].clone()];
                for (limit, reserve) in [(8, 4), (12, 4), (16, 8), (40, 4), (100, 8)] {
                    for in_flight in [1, 2] {
                        for (lifo, fail, demands, get_bytes) in [
                            (false, 0, false, 4),
                            (true, 0, false, 16),
                            (false, 3, false, 8),
                            (true, 2, true, 12),
                            (false, 0, true, 100),
                        ] {
                            let run = Run {
                                limit,
                                reserve,
                                in_flight,
                                get_bytes,
                                lifo,
                                fail,
                                demands,
                            };
                            match simulate(&SIZES, &needs, run) {
                                Ok(_) => finished += 1,
                                Err(PlanError::StepTooLarge { bytes, limit: l, .. }) => {
                                    assert!(bytes > l && l == limit - reserve, "{needs:?} {run:?}")
                                }
                                Err(e) => panic!("{e} {needs:?} {run:?}"),
                            }
                            runs += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(runs, 216 * 50);
    assert!(
        finished > runs / 2,
        "half the runs fit their limit: {finished} of {runs}"
    );
}

#[test]
fn neighbouring_blocks_come_in_one_get_and_a_block_held_is_read_again_for_free() {
    // Shard 0 has 3 blocks; step 0 reads all of it, step 1 the middle block again.
    let run = Run {
        limit: 100,
        reserve: 4,
        in_flight: 1,
        get_bytes: 64,
        lifo: false,
        fail: 0,
        demands: false,
    };
    let needs = vec![vec![(0, 0..12)], vec![(0, 5..6)]];
    let mut plan = RangePlan::new(config(&SIZES, &run, 2), 0).unwrap();
    while let Some(step) = plan.wants_step() {
        plan.add_step(step, &needs[step as usize]).unwrap();
    }
    let get = plan.next_fetch().unwrap();
    assert_eq!(get, Get { shard: 0, blocks: 0..3 });
    assert_eq!(simulate(&SIZES, &needs, run).unwrap(), 12, "fetched once");
    // A block of 6 bytes (the last, partial) costs what it holds.
    assert_eq!(plan.cost(plan.id(2, 1)), 2);
    assert_eq!(plan.blocks_of(2, &(5..6)), Some(plan.id(2, 1)..plan.id(2, 2)));
    assert_eq!(plan.blocks_of(2, &(5..7)), None, "past the shard's end");
    assert_eq!(plan.blocks_of(3, &(0..1)), None, "no such shard");
}

#[test]
fn a_limit_without_room_for_a_block_beside_the_reserve_is_refused() {
    let run = Run {
        limit: 7,
        reserve: 4,
        in_flight: 1,
        get_bytes: 4,
        lifo: false,
        fail: 0,
        demands: false,
    };
    assert!(matches!(
        RangePlan::new(config(&SIZES, &run, 1), 0),
        Err(PlanError::LimitTooSmall { need: 8, limit: 7 })
    ));
}

fn reads_strategy() -> impl Strategy<Value = Vec<Reads>> {
    let read = (0usize..SIZES.len(), 0u64..12, 0u64..12).prop_map(|(s, a, b)| {
        let size = SIZES[s];
        let (a, b) = (a.min(size), b.min(size));
        (s, a.min(b)..a.max(b))
    });
    proptest::collection::vec(proptest::collection::vec(read, 0..4), 1..12)
}

proptest! {
    #[test]
    fn random_runs_keep_the_invariants(
        needs in reads_strategy(),
        limit in 8u64..60,
        reserve in 1u64..12,
        in_flight in 1usize..4,
        get_bytes in 1u64..20,
        lifo: bool,
        fail in prop_oneof![Just(0usize), 2usize..5],
        demands: bool,
    ) {
        let run = Run { limit, reserve, in_flight, get_bytes, lifo, fail, demands };
        match simulate(&SIZES, &needs, run) {
            Ok(_) | Err(PlanError::StepTooLarge { .. }) | Err(PlanError::LimitTooSmall { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
