//! Gang placement: all ranks of a job or none.
//!
//! Ranks are numbered as the collectives layout numbers them (DP outermost, then PP, TP
//! innermost), so a tensor-parallel group is `tp` consecutive ranks. Each TP group must sit
//! on one worker (TP exchanges activations every layer); pipeline stages and data-parallel
//! replicas may span workers. Workers are filled one after the other, largest free capacity
//! first, which keeps a job on as few nodes as possible and keeps neighbouring ranks (the
//! PP stages of one replica) together. Cost: O(workers · log workers + ranks).

use super::model::RankSlot;
use std::collections::BTreeMap;

/// What one worker can still take.
#[derive(Clone, Debug)]
pub struct Capacity<'a> {
    pub name: &'a str,
    pub free_slots: u32,
    /// GPU indices not in use.
    pub free_gpus: Vec<u32>,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Shape<'a> {
    pub world: u64,
    pub tp: u32,
    pub gpus_per_rank: u32,
    pub labels: &'a BTreeMap<String, String>,
}

/// How many TP groups of `shape` fit on `c`.
fn groups_on(c: &Capacity, shape: &Shape) -> u64 {
    if !shape.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v)) {
        return 0;
    }
    let mut ranks = c.free_slots as u64;
    if shape.gpus_per_rank > 0 {
        ranks = ranks.min(c.free_gpus.len() as u64 / shape.gpus_per_rank as u64);
    }
    ranks / shape.tp.max(1) as u64
}

/// Total ranks `shape` could get from `workers` (for "does it fit", and error messages).
pub fn rank_capacity(workers: &[Capacity], shape: &Shape) -> u64 {
    workers.iter().map(|c| groups_on(c, shape)).sum::<u64>() * shape.tp.max(1) as u64
}

/// Place every rank, or return `None` when the job does not fit.
pub fn place(workers: &[Capacity], shape: &Shape) -> Option<Vec<RankSlot>> {
    let tp = shape.tp.max(1) as u64;
    if shape.world == 0 || !shape.world.is_multiple_of(tp) {
        return None;
    }
    let mut order: Vec<(u64, usize)> = workers
        .iter()
        .enumerate()
        .map(|(i, c)| (groups_on(c, shape), i))
        .filter(|(g, _)| *g > 0)
        .collect();
    // Most room first; ties by name so placement is deterministic.
    order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| workers[a.1].name.cmp(workers[b.1].name)));
    let mut groups_left = shape.world / tp;
    let mut chosen: Vec<(usize, u64)> = Vec::new();
    for (fit, i) in order {
        if groups_left == 0 {
            break;
        }
        let take = fit.min(groups_left);
        chosen.push((i, take));
        groups_left -= take;
    }
    if groups_left > 0 {
        return None;
    }
    let mut slots = Vec::with_capacity(shape.world as usize);
    for (i, groups) in chosen {
        let c = &workers[i];
        let local_world = (groups * tp) as u32;
        let mut gpus = c.free_gpus.iter().copied();
        for local_rank in 0..local_world {
            let mine: Vec<u32> = gpus.by_ref().take(shape.gpus_per_rank as usize).collect();
            slots.push(RankSlot {
                worker: c.name.to_string(),
                local_rank,
                local_world,
                gpus: mine,
            });
        }
    }
    Some(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cap<'a>(name: &'a str, slots: u32, gpus: u32, labels: &'a BTreeMap<String, String>) -> Capacity<'a> {
        Capacity {
            name,
            free_slots: slots,
            free_gpus: (0..gpus).collect(),
            labels,
        }
    }

    #[test]
    fn tp_groups_never_straddle_workers() {
        let none = BTreeMap::new();
        // 3 free slots each: a TP group of 2 fits once per worker, the third slot stays free.
        let ws = [cap("a", 3, 0, &none), cap("b", 3, 0, &none), cap("c", 3, 0, &none)];
        let shape = Shape {
            world: 6,
            tp: 2,
            gpus_per_rank: 0,
            labels: &none,
        };
        let p = place(&ws, &shape).expect("fits");
        let names: Vec<&str> = p.iter().map(|s| s.worker.as_str()).collect();
        assert_eq!(names, ["a", "a", "b", "b", "c", "c"]);
        assert!(
            place(
                &ws,
                &Shape {
                    world: 8,
                    ..shape.clone()
                }
            )
            .is_none(),
            "8 ranks need 4 groups of 2"
        );
        assert_eq!(rank_capacity(&ws, &shape), 6);
    }

    #[test]
    fn fullest_free_worker_first_and_local_ranks_count_per_worker() {
        let none = BTreeMap::new();
        let ws = [cap("a", 1, 0, &none), cap("b", 4, 0, &none)];
        let p = place(
            &ws,
            &Shape {
                world: 5,
                tp: 1,
                gpus_per_rank: 0,
                labels: &none,
            },
        )
        .unwrap();
        let got: Vec<(&str, u32, u32)> = p
            .iter()
            .map(|s| (s.worker.as_str(), s.local_rank, s.local_world))
            .collect();
        assert_eq!(got, [("b", 0, 4), ("b", 1, 4), ("b", 2, 4), ("b", 3, 4), ("a", 0, 1)]);
    }

    #[test]
    fn gpus_and_labels_limit_workers() {
        let none = BTreeMap::new();
        let h100: BTreeMap<String, String> = [("gpu".to_string(), "h100".to_string())].into();
        let ws = [cap("cpu", 16, 0, &none), cap("g1", 8, 2, &h100), cap("g2", 8, 4, &h100)];
        let p = place(
            &ws,
            &Shape {
                world: 6,
                tp: 1,
                gpus_per_rank: 1,
                labels: &none,
            },
        )
        .unwrap();
        let gpus: Vec<(&str, Vec<u32>)> = p.iter().map(|s| (s.worker.as_str(), s.gpus.clone())).collect();
        assert_eq!(gpus[0], ("g2", vec![0]));
        assert_eq!(gpus[5], ("g1", vec![1]));
        assert!(
            place(
                &ws,
                &Shape {
                    world: 7,
                    tp: 1,
                    gpus_per_rank: 1,
                    labels: &none
                }
            )
            .is_none()
        );
        let p = place(
            &ws,
            &Shape {
                world: 2,
                tp: 1,
                gpus_per_rank: 0,
                labels: &h100,
            },
        )
        .unwrap();
        assert!(p.iter().all(|s| s.worker != "cpu"), "label selector");
    }

    proptest! {
        /// Whatever the cluster: a placement is complete, respects every capacity, keeps TP
        /// groups on one worker, and exists exactly when the capacity count says it fits.
        #[test]
        fn placement_is_gang_and_respects_capacity(
            free in proptest::collection::vec((0u32..9, 0u32..5), 0..12),
            tp in 1u32..5,
            groups in 1u64..12,
            gpus_per_rank in 0u32..2,
        ) {
            let none = BTreeMap::new();
            let names: Vec<String> = (0..free.len()).map(|i| format!("w{i:02}")).collect();
            let ws: Vec<Capacity> = free.iter().zip(&names)
                .map(|(&(s, g), n)| cap(n, s, g, &none)).collect();
            let shape = Shape { world: groups * tp as u64, tp, gpus_per_rank, labels: &none };
            let fits = rank_capacity(&ws, &shape) >= shape.world;
            match place(&ws, &shape) {
                None => prop_assert!(!fits),
                Some(p) => {
                    prop_assert!(fits);
                    prop_assert_eq!(p.len() as u64, shape.world);
                    for g in p.chunks(tp as usize) {
                        prop_assert!(g.iter().all(|s| s.worker == g[0].worker));
                    }
                    for c in &ws {
                        let mine: Vec<&RankSlot> = p.iter().filter(|s| s.worker == c.name).collect();
                        prop_assert!(mine.len() as u32 <= c.free_slots);
                        let used: std::collections::BTreeSet<u32> = mine.iter().flat_map(|s| s.gpus.clone()).collect();
                        prop_assert_eq!(used.len() as u32, mine.len() as u32 * gpus_per_rank);
                        prop_assert!(used.iter().all(|g| c.free_gpus.contains(g)));
                        for (i, s) in mine.iter().enumerate() {
                            prop_assert_eq!(s.local_rank as usize, i);
                            prop_assert_eq!(s.local_world as usize, mine.len());
                        }
                    }
                }
            }
        }
    }
}
