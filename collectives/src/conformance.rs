//! The conformance suite every transport must pass: each operation × dtype × reduce op ×
//! algorithm over several sizes (0, 1, sizes not divisible by the world, sizes past the
//! small-message threshold and past a segment), checked against a reference computed in f64
//! (exact for integers; within a bound derived from the dtype's epsilon for floats).
//!
//! It runs on one rank of a communicator; every rank computes everyone's inputs itself, so
//! the check needs no extra communication. Used by the in-process tests (threads over local,
//! TCP and shared-memory links) and by the multi-process tests through `collectives-test-rank`.

use crate::comm::{Algorithm, CallOptions, Communicator};
use crate::dtype::{DType, ReduceOp, with_element_type};
use half::{bf16, f16};

/// Element counts exercised; the largest crosses the 64 KiB small-message threshold for every
/// dtype but u8 and spans several 4 KiB segments.
pub const COUNTS: [usize; 6] = [0, 1, 5, 33, 1000, 20_011];

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Rank `rank`'s input element `i`, already representable in `dtype`, chosen so that sums
/// and products of a few dozen of them stay in range.
pub fn input(rank: usize, i: usize, salt: u64, dtype: DType, op: ReduceOp) -> f64 {
    let h = mix((rank as u64) << 40 ^ (i as u64) ^ salt.rotate_left(17));
    let v = match (op, dtype) {
        (ReduceOp::Product, _) => {
            [1.0, 2.0, 3.0, 1.0, 1.0, 2.0][(h % 6) as usize] * if dtype.is_float() && h & 64 != 0 { 0.5 } else { 1.0 }
        }
        (_, DType::U8) => (h % 51) as f64,
        (_, DType::I32 | DType::I64) => (h % 2001) as f64 - 1000.0,
        _ => ((h % 2001) as f64 - 1000.0) / 256.0,
    };
    quantize(v, dtype)
}

pub fn quantize(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::F64 => v,
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => bf16::from_f64(v).to_f64(),
        DType::I32 | DType::I64 | DType::U8 => v.trunc(),
    }
}

/// f64 values → an 8-byte-aligned buffer of `dtype` elements.
pub fn encode(vals: &[f64], dtype: DType) -> Vec<u64> {
    let mut store = vec![0u64; (vals.len() * dtype.size()).div_ceil(8)];
    let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut store)[..vals.len() * dtype.size()];
    crate::dtype::fill_from_f64(bytes, dtype, |i| vals[i]);
    store
}

pub fn decode(bytes: &[u8], dtype: DType) -> Vec<f64> {
    crate::dtype::to_f64_vec(bytes, dtype)
}

fn bytes_of(store: &mut [u64], len: usize, dtype: DType) -> &mut [u8] {
    &mut bytemuck::cast_slice_mut::<u64, u8>(store)[..len * dtype.size()]
}

fn epsilon(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f32::EPSILON as f64,
        DType::F64 => f64::EPSILON,
        DType::F16 => f16::EPSILON.to_f64(),
        DType::BF16 => bf16::EPSILON.to_f64(),
        _ => 0.0,
    }
}

/// Reference reduction of everyone's element `i`, in f64, as the dtype defines the result.
fn reference(n: usize, i: usize, salt: u64, dtype: DType, op: ReduceOp) -> (f64, f64) {
    let xs: Vec<f64> = (0..n).map(|r| input(r, i, salt, dtype, op)).collect();
    let magnitude: f64 = xs.iter().map(|x| x.abs()).sum();
    let v = match op {
        ReduceOp::Sum => xs.iter().sum(),
        ReduceOp::Avg if dtype.is_float() => xs.iter().sum::<f64>() / n as f64,
        ReduceOp::Avg => (xs.iter().sum::<f64>() / n as f64).trunc(),
        ReduceOp::Product => xs.iter().product(),
        ReduceOp::Max => xs.iter().cloned().fold(f64::MIN, f64::max),
        ReduceOp::Min => xs.iter().cloned().fold(f64::MAX, f64::min),
    };
    let magnitude = if op == ReduceOp::Product { v.abs() } else { magnitude };
    (v, magnitude)
}

fn close(got: f64, want: f64, magnitude: f64, n: usize, dtype: DType) -> bool {
    if !dtype.is_float() {
        return got == want;
    }
    // Each of up to n roundings of a partial result costs at most eps × its magnitude.
    let tol = 2.0 * (n as f64 + 1.0) * epsilon(dtype) * (magnitude + want.abs()) + f64::MIN_POSITIVE;
    (got - want).abs() <= tol
}

/// Failures found, as readable lines; empty means the rank passed.
pub type Failures = Vec<String>;

fn compare(label: &str, got: &[f64], want: impl Fn(usize) -> (f64, f64), n: usize, dtype: DType, out: &mut Failures) {
    for (i, g) in got.iter().enumerate() {
        let (w, mag) = want(i);
        if !close(*g, w, mag, n, dtype) {
            out.push(format!("{label}: element {i} is {g}, expected {w}"));
            return;
        }
    }
}

fn err(label: &str, e: impl std::fmt::Display, out: &mut Failures) {
    out.push(format!("{label}: {e}"));
}

/// Run the whole suite on this rank. Every rank of `comm` must call it.
///
/// Every check draws fresh inputs from the next `salt`, and every rank walks the checks in
/// the same order, so all ranks agree on every input without exchanging any.
pub fn run(comm: &mut Communicator) -> Failures {
    let mut fails = Failures::new();
    let n = comm.size();
    let mut salt = 0u64;
    for dtype in DType::ALL {
        for count in COUNTS {
            all_reduces(comm, dtype, count, &mut salt, &mut fails);
            for root in [0, n - 1] {
                for algo in [Algorithm::Ring, Algorithm::Tree] {
                    for op in [ReduceOp::Sum, ReduceOp::Max] {
                        salt += 1;
                        reduce(comm, Check { dtype, count, salt }, op, root, algo, &mut fails);
                    }
                    salt += 1;
                    broadcast(comm, Check { dtype, count, salt }, root, algo, &mut fails);
                }
            }
            // Blocked operations: `count` elements per rank.
            salt += 1;
            all_gather(comm, Check { dtype, count, salt }, &mut fails);
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Product] {
                salt += 1;
                reduce_scatter(comm, Check { dtype, count, salt }, op, &mut fails);
            }
            salt += 1;
            all_to_all(comm, Check { dtype, count, salt }, &mut fails);
        }
        p2p(comm, dtype, &mut salt, &mut fails);
    }
    if let Err(e) = comm.barrier() {
        err("barrier", e, &mut fails);
    }
    in_place_variants(comm, &mut fails);
    fails
}

/// One check's element type, element count (per rank for blocked operations) and input salt.
#[derive(Clone, Copy)]
struct Check {
    dtype: DType,
    count: usize,
    salt: u64,
}

/// `f` with the collective algorithm forced to `algo`.
fn forcing<T>(comm: &mut Communicator, algo: Algorithm, f: impl FnOnce(&mut Communicator) -> T) -> T {
    let options = CallOptions {
        algorithm: Some(algo),
        ..Default::default()
    };
    comm.with_options(options, f)
}

/// all_reduce: every op, every algorithm (`Auto` included: it picks by size).
fn all_reduces(comm: &mut Communicator, dtype: DType, count: usize, salt: &mut u64, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    for op in ReduceOp::ALL {
        for algo in [Algorithm::Auto, Algorithm::Ring, Algorithm::Tree] {
            *salt += 1;
            let salt = *salt;
            let label = format!("all_reduce {op} {dtype} count {count} {algo:?} world {n}");
            let mut buf = encode(
                &(0..count).map(|i| input(r, i, salt, dtype, op)).collect::<Vec<_>>(),
                dtype,
            );
            let bytes = bytes_of(&mut buf, count, dtype);
            match forcing(comm, algo, |c| c.all_reduce_bytes(bytes, dtype, op)) {
                Ok(()) => compare(
                    &label,
                    &decode(bytes, dtype),
                    |i| reference(n, i, salt, dtype, op),
                    n,
                    dtype,
                    fails,
                ),
                Err(e) => err(&label, e, fails),
            }
        }
    }
}

/// reduce to `root`: the root holds the reduction, the others keep their input.
fn reduce(comm: &mut Communicator, check: Check, op: ReduceOp, root: usize, algo: Algorithm, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    let Check { dtype, count, salt } = check;
    let label = format!("reduce {op} {dtype} count {count} root {root} {algo:?} world {n}");
    let mine: Vec<f64> = (0..count).map(|i| input(r, i, salt, dtype, op)).collect();
    let mut buf = encode(&mine, dtype);
    let bytes = bytes_of(&mut buf, count, dtype);
    match forcing(comm, algo, |c| c.reduce_bytes(bytes, dtype, op, root)) {
        Ok(()) if r == root => compare(
            &label,
            &decode(bytes, dtype),
            |i| reference(n, i, salt, dtype, op),
            n,
            dtype,
            fails,
        ),
        Ok(()) => compare(&label, &decode(bytes, dtype), |i| (mine[i], 0.0), n, dtype, fails),
        Err(e) => err(&label, e, fails),
    }
}

/// broadcast from `root`: every rank ends with the root's input (the others start at zero).
fn broadcast(comm: &mut Communicator, check: Check, root: usize, algo: Algorithm, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    let Check { dtype, count, salt } = check;
    let label = format!("broadcast {dtype} count {count} root {root} {algo:?} world {n}");
    let mut buf = encode(
        &(0..count)
            .map(|i| {
                if r == root {
                    input(root, i, salt, dtype, ReduceOp::Sum)
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        dtype,
    );
    let bytes = bytes_of(&mut buf, count, dtype);
    match forcing(comm, algo, |c| c.broadcast_bytes(bytes, dtype, root)) {
        Ok(()) => compare(
            &label,
            &decode(bytes, dtype),
            |i| (input(root, i, salt, dtype, ReduceOp::Sum), 0.0),
            n,
            dtype,
            fails,
        ),
        Err(e) => err(&label, e, fails),
    }
}

/// all_gather: each rank fills its own block, every rank ends with all blocks.
fn all_gather(comm: &mut Communicator, check: Check, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    let Check { dtype, count, salt } = check;
    let label = format!("all_gather {dtype} count {count} world {n}");
    let mut buf = encode(
        &(0..n * count)
            .map(|i| {
                if i / count.max(1) == r {
                    input(r, i, salt, dtype, ReduceOp::Sum)
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        dtype,
    );
    let bytes = bytes_of(&mut buf, n * count, dtype);
    match comm.all_gather_bytes(bytes, dtype) {
        Ok(()) => compare(
            &label,
            &decode(bytes, dtype),
            |i| (input(i / count, i, salt, dtype, ReduceOp::Sum), 0.0),
            n,
            dtype,
            fails,
        ),
        Err(e) => err(&label, e, fails),
    }
}

/// reduce_scatter: rank r ends with the reduction of everyone's block r.
fn reduce_scatter(comm: &mut Communicator, check: Check, op: ReduceOp, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    let Check { dtype, count, salt } = check;
    let label = format!("reduce_scatter {op} {dtype} count {count} world {n}");
    let mut buf = encode(
        &(0..n * count).map(|i| input(r, i, salt, dtype, op)).collect::<Vec<_>>(),
        dtype,
    );
    let bytes = bytes_of(&mut buf, n * count, dtype);
    match comm.reduce_scatter_bytes(bytes, dtype, op) {
        Ok(()) => {
            let block = &decode(bytes, dtype)[r * count..(r + 1) * count];
            compare(
                &label,
                block,
                |j| reference(n, r * count + j, salt, dtype, op),
                n,
                dtype,
                fails,
            )
        }
        Err(e) => err(&label, e, fails),
    }
}

/// all_to_all: rank s's element i is destined for rank i / count.
fn all_to_all(comm: &mut Communicator, check: Check, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    let Check { dtype, count, salt } = check;
    let label = format!("all_to_all {dtype} count {count} world {n}");
    let send = encode(
        &(0..n * count)
            .map(|i| input(r, i, salt, dtype, ReduceOp::Sum))
            .collect::<Vec<_>>(),
        dtype,
    );
    let mut recv = encode(&vec![0.0; n * count], dtype);
    let send_bytes = &bytemuck::cast_slice::<u64, u8>(&send)[..n * count * dtype.size()];
    let recv_bytes = bytes_of(&mut recv, n * count, dtype);
    match comm.all_to_all_bytes(send_bytes, recv_bytes, dtype) {
        Ok(()) => compare(
            &label,
            &decode(recv_bytes, dtype),
            |i| (input(i / count, r * count + i % count, salt, dtype, ReduceOp::Sum), 0.0),
            n,
            dtype,
            fails,
        ),
        Err(e) => err(&label, e, fails),
    }
}

/// Tagged send/recv around the ring (send_recv) and plain send/recv pairs.
fn p2p(comm: &mut Communicator, dtype: DType, salt: &mut u64, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    if n == 1 {
        return;
    }
    *salt += 1;
    let s = *salt;
    let count = 777;
    let to = (r + 1) % n;
    let from = (r + n - 1) % n;
    let label = format!("send_recv ring {dtype} world {n}");
    let send = encode(
        &(0..count)
            .map(|i| input(r, i, s, dtype, ReduceOp::Sum))
            .collect::<Vec<_>>(),
        dtype,
    );
    let mut recv = encode(&vec![0.0; count], dtype);
    let sb = &bytemuck::cast_slice::<u64, u8>(&send)[..count * dtype.size()];
    let rb = bytes_of(&mut recv, count, dtype);
    match typed_send_recv(comm, sb, to, rb, from, dtype) {
        Ok(()) => compare(
            &label,
            &decode(rb, dtype),
            |i| (input(from, i, s, dtype, ReduceOp::Sum), 0.0),
            n,
            dtype,
            fails,
        ),
        Err(e) => err(&label, e, fails),
    }
    // Rank 0 sends two tagged messages to the last rank, which receives them in order.
    let last = n - 1;
    let label = format!("send/recv tags {dtype} world {n}");
    if r == 0 {
        for tag in [7u32, 8] {
            let msg = encode(
                &(0..count)
                    .map(|i| input(tag as usize, i, s, dtype, ReduceOp::Sum))
                    .collect::<Vec<_>>(),
                dtype,
            );
            let mb = &bytemuck::cast_slice::<u64, u8>(&msg)[..count * dtype.size()];
            if let Err(e) = bytes_send(comm, mb, last, tag, dtype) {
                err(&label, e, fails);
            }
        }
    } else if r == last {
        for tag in [7u32, 8] {
            let mut msg = encode(&vec![0.0; count], dtype);
            let mb = bytes_of(&mut msg, count, dtype);
            match bytes_recv(comm, mb, 0, tag, dtype) {
                Ok(()) => compare(
                    &label,
                    &decode(mb, dtype),
                    |i| (input(tag as usize, i, s, dtype, ReduceOp::Sum), 0.0),
                    n,
                    dtype,
                    fails,
                ),
                Err(e) => err(&label, e, fails),
            }
        }
    }
}

fn typed_send_recv(
    c: &mut Communicator,
    s: &[u8],
    to: usize,
    r: &mut [u8],
    from: usize,
    dtype: DType,
) -> crate::error::Result<()> {
    with_element_type!(dtype, T => c.send_recv::<T>(bytemuck::cast_slice(s), to, bytemuck::cast_slice_mut(r), from, 3))
}

fn bytes_send(c: &mut Communicator, s: &[u8], to: usize, tag: u32, dtype: DType) -> crate::error::Result<()> {
    with_element_type!(dtype, T => c.send::<T>(bytemuck::cast_slice(s), to, tag))
}

fn bytes_recv(c: &mut Communicator, r: &mut [u8], from: usize, tag: u32, dtype: DType) -> crate::error::Result<()> {
    with_element_type!(dtype, T => c.recv::<T>(bytemuck::cast_slice_mut(r), from, tag))
}

/// The typed out-of-place and in-place entry points agree with each other.
fn in_place_variants(comm: &mut Communicator, fails: &mut Failures) {
    let (n, r) = (comm.size(), comm.rank());
    let mine: Vec<f32> = (0..10).map(|i| (r * 10 + i) as f32).collect();
    let mut out = vec![0f32; 10];
    if let Err(e) = comm.all_reduce(&mine, &mut out, ReduceOp::Sum) {
        err("all_reduce out-of-place", e, fails);
    }
    let want: Vec<f32> = (0..10).map(|i| (0..n).map(|s| (s * 10 + i) as f32).sum()).collect();
    if out != want {
        fails.push(format!("all_reduce out-of-place: got {out:?}, want {want:?}"));
    }
    let mut gathered = vec![0f32; 10 * n];
    if let Err(e) = comm.all_gather(&mine, &mut gathered) {
        err("all_gather out-of-place", e, fails);
    }
    let want: Vec<f32> = (0..n).flat_map(|s| (0..10).map(move |i| (s * 10 + i) as f32)).collect();
    if gathered != want {
        fails.push("all_gather out-of-place: wrong result".into());
    }
    let send: Vec<i64> = (0..2 * n as i64).map(|i| i + r as i64).collect();
    let mut recv = vec![0i64; 2];
    if let Err(e) = comm.reduce_scatter(&send, &mut recv, ReduceOp::Sum) {
        err("reduce_scatter out-of-place", e, fails);
    }
    let tri = (n * (n - 1) / 2) as i64;
    let want = [2 * r as i64 * n as i64 + tri, (2 * r as i64 + 1) * n as i64 + tri];
    if recv != want {
        fails.push(format!("reduce_scatter out-of-place: got {recv:?}, want {want:?}"));
    }
    let mut a2a: Vec<u8> = (0..n).map(|j| (r * 16 + j) as u8).collect();
    if let Err(e) = comm.all_to_all_in_place(&mut a2a) {
        err("all_to_all in place", e, fails);
    }
    let want: Vec<u8> = (0..n).map(|j| (j * 16 + r) as u8).collect();
    if a2a != want {
        fails.push(format!("all_to_all in place: got {a2a:?}, want {want:?}"));
    }
}
