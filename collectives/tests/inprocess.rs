//! The conformance suite over every transport with threads as ranks (fast; the
//! multi-process tests cover real processes), and property tests of the ring and tree
//! schedules over the in-process transport.

use gantry_collectives::store::{MemStore, Store};
use gantry_collectives::{
    Algorithm, CallOptions, Communicator, DType, Fabric, FabricConfig, ReduceOp, TransportChoice, conformance,
};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

fn config(transport: TransportChoice, segment_bytes: usize) -> FabricConfig {
    FabricConfig {
        transport,
        segment_bytes,
        timeout: Duration::from_secs(60),
        bind_addr: "127.0.0.1:0".into(),
        shm_ring_bytes: 64 * 1024,
        flight_dir: std::env::temp_dir().join("gantry-test-flight"),
        ..FabricConfig::default()
    }
}

/// One fabric per thread-rank. Local uses in-memory pipes; TCP and shm go through the same
/// join path as processes, with a shared in-memory store.
fn fabrics(n: usize, transport: TransportChoice, segment_bytes: usize, pipe_bytes: usize) -> Vec<Fabric> {
    if transport == TransportChoice::Local {
        return Fabric::local_world(n, config(transport, segment_bytes), pipe_bytes);
    }
    let store: Arc<dyn Store> = MemStore::new();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let store = store.clone();
            std::thread::spawn(move || Fabric::join(r, n, store, config(transport, segment_bytes)).expect("join"))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn on_every_rank<T: Send + 'static>(
    fabrics: Vec<Fabric>,
    f: impl Fn(Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = fabrics
        .into_iter()
        .map(|fabric| {
            let f = f.clone();
            std::thread::spawn(move || f(fabric.world()))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

fn conformance_over(transport: TransportChoice) {
    for n in 1..=5 {
        let results = on_every_rank(fabrics(n, transport, 4096, 64 * 1024), |mut comm| {
            conformance::run(&mut comm)
        });
        for (rank, fails) in results.iter().enumerate() {
            assert!(
                fails.is_empty(),
                "{transport:?} world {n} rank {rank}:\n{}",
                fails.join("\n")
            );
        }
    }
}

#[test]
fn conformance_local() {
    conformance_over(TransportChoice::Local);
}

#[test]
fn conformance_tcp_threads() {
    conformance_over(TransportChoice::Tcp);
}

#[test]
fn conformance_tls_threads() {
    conformance_over(TransportChoice::Tls);
}

#[test]
fn conformance_quic_threads() {
    conformance_over(TransportChoice::Quic);
}

#[test]
fn conformance_shm_threads() {
    conformance_over(TransportChoice::Shm);
}

#[test]
fn split_into_groups_and_layout() {
    let n = 6;
    let results = on_every_rank(fabrics(n, TransportChoice::Local, 4096, 1 << 16), move |mut comm| {
        let r = comm.rank();
        // Three groups of two by r / 2, ordered by descending key.
        let mut sub = comm.split(Some((r / 2) as u32), (10 - r) as u32).unwrap().unwrap();
        assert_eq!(sub.size(), 2);
        assert_eq!(sub.members(), &[r / 2 * 2 + 1, r / 2 * 2]);
        let mut v = [r as i64];
        sub.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
        // Opting out yields no communicator but still takes part in the split.
        let none = comm.split(if r == 0 { None } else { Some(0) }, 0).unwrap();
        assert_eq!(none.is_none(), r == 0);
        v[0]
    });
    for (r, v) in results.iter().enumerate() {
        let g = r / 2 * 2;
        assert_eq!(*v, (g + g + 1) as i64);
    }
}

#[test]
fn invalid_arguments_are_errors_not_panics() {
    let mut comm = Fabric::local_world(1, config(TransportChoice::Local, 4096), 1024)
        .remove(0)
        .world();
    let mut odd = vec![0u8; 7];
    assert!(
        comm.all_reduce_bytes(&mut odd, DType::F32, ReduceOp::Sum)
            .unwrap_err()
            .to_string()
            .contains("whole number")
    );
    assert!(
        comm.broadcast(&mut [1.0f32], 3)
            .unwrap_err()
            .to_string()
            .contains("root 3")
    );
    assert!(
        comm.all_gather(&[1u8, 2], &mut [0u8; 3])
            .unwrap_err()
            .to_string()
            .contains("expected 1 × 2")
    );
    assert!(comm.send(&[1u8], 0, 0).unwrap_err().to_string().contains("peer 0"));
    // Still usable: argument errors do not break the communicator.
    comm.barrier().unwrap();
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn op_strategy() -> impl Strategy<Value = ReduceOp> {
    prop::sample::select(ReduceOp::ALL.to_vec())
}

fn algo_strategy() -> impl Strategy<Value = Algorithm> {
    prop::sample::select(vec![Algorithm::Ring, Algorithm::Tree])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Ring and tree schedules give the reference result for any world size, any count
    /// (including 0 and counts not divisible by the world) and tiny segments and pipes that
    /// force many pipeline steps and back-pressure.
    #[test]
    fn schedules_match_reference(
        n in 1usize..=6,
        count in prop_oneof![Just(0usize), 1usize..64, 64usize..3000],
        dtype in dtype_strategy(),
        op in op_strategy(),
        algo in algo_strategy(),
        root_pick in 0usize..6,
        pipe_bytes in prop_oneof![Just(64usize), Just(1000), Just(1 << 16)],
    ) {
        let root = root_pick % n;
        let results = on_every_rank(fabrics(n, TransportChoice::Local, 1024, pipe_bytes), move |mut comm| {
            let r = comm.rank();
            let salt = 99;
            let mine: Vec<f64> = (0..count).map(|i| conformance::input(r, i, salt, dtype, op)).collect();
            let mut ar = conformance::encode(&mine, dtype);
            let ar_bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut ar)[..count * dtype.size()];
            let mut red = conformance::encode(&mine, dtype);
            let red_bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut red)[..count * dtype.size()];
            let mut bc = conformance::encode(&mine, dtype);
            let bc_bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut bc)[..count * dtype.size()];
            comm.with_options(CallOptions { algorithm: Some(algo), ..Default::default() }, |c| {
                c.all_reduce_bytes(ar_bytes, dtype, op)?;
                c.reduce_bytes(red_bytes, dtype, op, root)?;
                c.broadcast_bytes(bc_bytes, dtype, root)
            }).unwrap();
            (conformance::decode(ar_bytes, dtype), conformance::decode(red_bytes, dtype), conformance::decode(bc_bytes, dtype))
        });
        // Every rank's all_reduce result is bit-identical, and equals the root's reduce.
        for (r, (ar, red, bc)) in results.iter().enumerate() {
            prop_assert_eq!(ar.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), results[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "rank {} differs", r);
            let root_input: Vec<f64> = (0..count).map(|i| conformance::input(root, i, 99, dtype, op)).collect();
            prop_assert_eq!(bc, &root_input);
            if r == root && !dtype.is_float() {
                prop_assert_eq!(red, ar);
            }
        }
        // And it matches the f64 reference.
        let xs = |i: usize| (0..n).map(move |r| conformance::input(r, i, 99, dtype, op));
        for (i, got) in results[0].0.iter().enumerate() {
            let want = match op {
                ReduceOp::Sum => xs(i).sum::<f64>(),
                ReduceOp::Avg if dtype.is_float() => xs(i).sum::<f64>() / n as f64,
                // u8 sums wrap in the element type before the division, as the sum itself does.
                ReduceOp::Avg if dtype == DType::U8 => (xs(i).sum::<f64>().rem_euclid(256.0) / n as f64).trunc(),
                ReduceOp::Avg => (xs(i).sum::<f64>() / n as f64).trunc(),
                ReduceOp::Product => xs(i).product(),
                ReduceOp::Max => xs(i).fold(f64::MIN, f64::max),
                ReduceOp::Min => xs(i).fold(f64::MAX, f64::min),
            };
            // Integer reductions wrap (only u8 can, with these inputs and up to 6 ranks).
            let want = if dtype == DType::U8 { want.rem_euclid(256.0) } else { want };
            let mag: f64 = if op == ReduceOp::Product { want.abs() } else { xs(i).map(f64::abs).sum() };
            let eps = match dtype { DType::F16 => 1e-3, DType::BF16 => 8e-3, DType::F32 => 1.2e-7, DType::F64 => 2.3e-16, _ => 0.0 };
            prop_assert!((got - want).abs() <= 2.0 * (n as f64 + 1.0) * eps * (mag + want.abs()), "element {}: {} vs {}", i, got, want);
        }
    }

    /// all_gather, reduce_scatter and all_to_all over random sizes and worlds.
    #[test]
    fn blocked_ops_match_reference(n in 1usize..=6, per_rank in 0usize..500, pipe_bytes in prop_oneof![Just(100usize), Just(1 << 16)]) {
        let results = on_every_rank(fabrics(n, TransportChoice::Local, 1024, pipe_bytes), move |mut comm| {
            let r = comm.rank();
            let mine: Vec<i64> = (0..per_rank).map(|i| (r * 1000 + i) as i64).collect();
            let mut gathered = vec![0i64; n * per_rank];
            comm.all_gather(&mine, &mut gathered).unwrap();
            let contrib: Vec<i64> = (0..n * per_rank).map(|i| (i * (r + 1)) as i64).collect();
            let mut scattered = vec![0i64; per_rank];
            comm.reduce_scatter(&contrib, &mut scattered, ReduceOp::Sum).unwrap();
            let send: Vec<i64> = (0..n * per_rank).map(|i| (r * 1_000_000 + i) as i64).collect();
            let mut recv = vec![0i64; n * per_rank];
            comm.all_to_all(&send, &mut recv).unwrap();
            (gathered, scattered, recv)
        });
        let tri = (n * (n + 1) / 2) as i64;
        for (r, (g, s, a)) in results.iter().enumerate() {
            for (i, v) in g.iter().enumerate() {
                prop_assert_eq!(*v, ((i / per_rank.max(1)) * 1000 + i % per_rank.max(1)) as i64);
            }
            for (j, v) in s.iter().enumerate() {
                prop_assert_eq!(*v, (r * per_rank + j) as i64 * tri);
            }
            for (i, v) in a.iter().enumerate() {
                let src = i / per_rank.max(1);
                prop_assert_eq!(*v, (src * 1_000_000 + r * per_rank + i % per_rank.max(1)) as i64);
            }
        }
    }
}

#[test]
fn same_call_with_different_algorithms_is_a_mismatch_with_details() {
    let results = on_every_rank(fabrics(2, TransportChoice::Local, 4096, 1 << 16), |mut comm| {
        let algo = if comm.rank() == 0 {
            Algorithm::Ring
        } else {
            Algorithm::Tree
        };
        comm.set_timeout(Duration::from_secs(5));
        let mut buf = vec![1.0f32; 1000];
        let err = comm
            .with_options(
                CallOptions {
                    algorithm: Some(algo),
                    ..Default::default()
                },
                |c| c.all_reduce_in_place(&mut buf, ReduceOp::Sum),
            )
            .unwrap_err();
        // The communicator is broken afterwards, and says so.
        let again = comm.barrier().unwrap_err().to_string();
        (err.to_string(), again)
    });
    for (rank, (err, again)) in results.iter().enumerate() {
        assert!(err.contains("collective mismatch at seq 1"), "rank {rank}: {err}");
        assert!(
            err.contains("different segment sizes, thresholds or algorithms"),
            "rank {rank}: {err}"
        );
        assert!(again.contains("broken"), "rank {rank}: {again}");
    }
}

#[test]
fn nccl_rendezvous_fails_fast_and_typed_without_a_gpu() {
    if gantry_collectives::nccl::nccl_available().is_ok() {
        return; // a GPU machine: the GPU checks cover this path
    }
    let fabrics = fabrics(3, TransportChoice::Local, 4096, 1 << 16);
    let started = std::time::Instant::now();
    let handles: Vec<_> = fabrics
        .into_iter()
        .map(|f| std::thread::spawn(move || f.nccl_communicator("tp", &[0, 1, 2], 0).err().map(|e| e.to_string())))
        .collect();
    for h in handles {
        let err = h.join().unwrap().expect("NCCL cannot work on this machine");
        assert!(err.contains("NCCL is not available"), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "members waited instead of failing fast"
    );
}

#[test]
fn bad_group_membership_is_an_error() {
    let fabric = Fabric::local_world(2, config(TransportChoice::Local, 4096), 1024).remove(0);
    let msg =
        |r: Result<Communicator, gantry_collectives::CommError>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(fabric.group("g", vec![1])).contains("rank 0 is not a member"));
    assert!(msg(fabric.group("g", vec![0, 5])).contains("names rank 5, but the world has 2 ranks"));
    assert!(msg(fabric.group("g", vec![0, 0])).contains("names rank 0 twice"));
    assert_eq!(fabric.group("g", vec![0]).unwrap().size(), 1);
}
