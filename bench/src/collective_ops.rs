//! The collective benchmark behind `gantry bench collectives`, in the spirit of nccl-tests:
//! per size, a correctness check against a locally computed expectation, then timed
//! iterations. Each iteration is timed on every rank and the slowest rank's time counts
//! (that is when the collective is done for the job); the median over iterations is reported.

use crate::error::BenchError;
use crate::stats;
use gantry_collectives::algo::{scratch, scratch_bytes};
use gantry_collectives::dtype::{fill_from_f64, to_f64_vec};
use gantry_collectives::{CommError, Communicator, DType, ReduceOp};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchOp {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    Reduce,
    AllToAll,
}

impl BenchOp {
    pub const fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all_reduce",
            BenchOp::AllGather => "all_gather",
            BenchOp::ReduceScatter => "reduce_scatter",
            BenchOp::Broadcast => "broadcast",
            BenchOp::Reduce => "reduce",
            BenchOp::AllToAll => "all_to_all",
        }
    }

    /// busbw = algbw × this factor: the fraction of the data each link must carry, so figures
    /// compare across world sizes (nccl-tests' convention).
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            BenchOp::AllGather | BenchOp::ReduceScatter | BenchOp::AllToAll => (n - 1.0) / n,
            BenchOp::Broadcast | BenchOp::Reduce => 1.0,
        }
    }
}

impl std::str::FromStr for BenchOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            BenchOp::AllReduce,
            BenchOp::AllGather,
            BenchOp::ReduceScatter,
            BenchOp::Broadcast,
            BenchOp::Reduce,
            BenchOp::AllToAll,
        ]
        .into_iter()
        .find(|o| o.name() == s.replace('-', "_"))
        .ok_or_else(|| {
            format!("unknown op `{s}` (all_reduce, all_gather, reduce_scatter, broadcast, reduce, all_to_all)")
        })
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub op: BenchOp,
    pub dtype: DType,
    /// Total buffer bytes per rank (for all_gather: the gathered output).
    pub sizes: Vec<usize>,
    pub iters: usize,
    pub warmup: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            op: BenchOp::AllReduce,
            dtype: DType::F32,
            sizes: vec![1 << 10, 1 << 20, 64 << 20],
            iters: 20,
            warmup: 5,
        }
    }
}

impl BenchConfig {
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.iters == 0 {
            return Err(BenchError::setting("iters", "must be at least 1"));
        }
        if self.sizes.is_empty() {
            return Err(BenchError::setting("sizes", "lists none"));
        }
        Ok(())
    }

    /// The table's first line: what runs where (`algorithm` as the user named it).
    pub fn title(&self, world: usize, transport: &str, algorithm: &str) -> String {
        format!(
            "# gantry bench collectives: {} {} world {} transport {} algorithm {} iters {} warmup {}",
            self.op.name(),
            self.dtype,
            world,
            transport,
            algorithm,
            self.iters,
            self.warmup
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub op: &'static str,
    pub dtype: DType,
    pub transport: String,
    pub bytes: usize,
    pub count: usize,
    pub world: usize,
    /// Median over iterations of the slowest rank's time.
    pub time_us: f64,
    pub mean_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub ok: bool,
}

/// Parse `1K`, `64M`, `2G`, `4096` (powers of 1024) into bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1usize << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("bad size `{s}` (examples: 1024, 1K, 64M, 1G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size `{s}` is too large"))
}

/// Values exactly representable in every dtype, so sums of up to a few dozen ranks are exact.
fn pattern(rank: usize, i: usize) -> f64 {
    ((rank + 1) * (i % 7 + 1)) as f64
}

/// Every element equals `f(i)` rounded to the dtype (compared as f64, a block at a time so the
/// expectation never needs a second full-size buffer).
fn matches(buf: &[u8], dtype: DType, f: impl Fn(usize) -> f64) -> bool {
    const BLOCK: usize = 1 << 16;
    let elem = dtype.size();
    let mut expected = vec![0u8; BLOCK * elem];
    buf.chunks(BLOCK * elem).enumerate().all(|(k, got)| {
        let want = &mut expected[..got.len()];
        fill_from_f64(want, dtype, |j| f(k * BLOCK + j));
        to_f64_vec(got, dtype) == to_f64_vec(want, dtype)
    })
}

/// One run of `op` on `buf` (the layout each op expects) — shared by the check and the timing.
fn run_op(comm: &mut Communicator, op: BenchOp, dtype: DType, buf: &mut [u8], out: &mut [u8]) -> Result<(), CommError> {
    match op {
        BenchOp::AllReduce => comm.all_reduce_bytes(buf, dtype, ReduceOp::Sum),
        BenchOp::AllGather => comm.all_gather_bytes(buf, dtype),
        BenchOp::ReduceScatter => comm.reduce_scatter_bytes(buf, dtype, ReduceOp::Sum),
        BenchOp::Broadcast => comm.broadcast_bytes(buf, dtype, 0),
        BenchOp::Reduce => comm.reduce_bytes(buf, dtype, ReduceOp::Sum, 0),
        BenchOp::AllToAll => comm.all_to_all_bytes(buf, out, dtype),
    }
}

/// Fill for the check and verify the result; returns whether every element matched on this rank.
fn check(
    comm: &mut Communicator,
    op: BenchOp,
    dtype: DType,
    buf: &mut [u8],
    out: &mut [u8],
) -> Result<bool, CommError> {
    let (n, r) = (comm.size(), comm.rank());
    let count = buf.len() / dtype.size();
    let block = count / n.max(1);
    let sum_ranks = (n * (n + 1) / 2) as f64;
    match op {
        BenchOp::AllGather => fill_from_f64(buf, dtype, |i| if i / block.max(1) == r { pattern(r, i) } else { 0.0 }),
        BenchOp::AllToAll => fill_from_f64(buf, dtype, |i| pattern(r, i) + (i / block.max(1)) as f64),
        _ => fill_from_f64(buf, dtype, |i| pattern(r, i)),
    }
    run_op(comm, op, dtype, buf, out)?;
    let ok = match op {
        BenchOp::AllReduce => matches(buf, dtype, |i| (i % 7 + 1) as f64 * sum_ranks),
        BenchOp::Reduce if r != 0 => true,
        BenchOp::Reduce => matches(buf, dtype, |i| (i % 7 + 1) as f64 * sum_ranks),
        BenchOp::Broadcast => matches(buf, dtype, |i| pattern(0, i)),
        BenchOp::AllGather => matches(buf, dtype, |i| pattern(i / block, i)),
        BenchOp::ReduceScatter => {
            let b = block * dtype.size();
            matches(&buf[r * b..(r + 1) * b], dtype, |j| {
                ((r * block + j) % 7 + 1) as f64 * sum_ranks
            })
        }
        // Block j of our output came from rank j's block r: pattern(j, idx) + r, at idx = r*block + k.
        BenchOp::AllToAll => matches(out, dtype, |i| pattern(i / block, r * block + i % block) + r as f64),
    };
    Ok(ok)
}

/// Run the benchmark on every rank of `comm`; every rank returns the same rows.
pub fn run(comm: &mut Communicator, cfg: &BenchConfig, transport: &str) -> Result<Vec<BenchRow>, CommError> {
    let n = comm.size();
    let mut rows = Vec::new();
    for &size in &cfg.sizes {
        let elem = cfg.dtype.size();
        // Round to whole elements and, for blocked ops, whole blocks per rank.
        let unit = match cfg.op {
            BenchOp::AllGather | BenchOp::ReduceScatter | BenchOp::AllToAll => elem * n,
            _ => elem,
        };
        let bytes = size / unit * unit;
        let mut store = scratch(bytes);
        let buf = scratch_bytes(&mut store, bytes);
        let mut out_store = scratch(if cfg.op == BenchOp::AllToAll { bytes } else { 0 });
        let out = scratch_bytes(&mut out_store, if cfg.op == BenchOp::AllToAll { bytes } else { 0 });

        let ok_here = check(comm, cfg.op, cfg.dtype, buf, out)?;
        let mut ok = [u8::from(ok_here)];
        comm.all_reduce_in_place(&mut ok, ReduceOp::Min)?;

        for _ in 0..cfg.warmup {
            run_op(comm, cfg.op, cfg.dtype, buf, out)?;
        }
        comm.barrier()?;
        let mut times = vec![0f64; cfg.iters];
        for t in times.iter_mut() {
            let start = Instant::now();
            run_op(comm, cfg.op, cfg.dtype, buf, out)?;
            *t = start.elapsed().as_secs_f64() * 1e6;
        }
        comm.all_reduce_in_place(&mut times, ReduceOp::Max)?;
        let mean_us = times.iter().sum::<f64>() / times.len() as f64;
        let time_us = stats::quantile_rounded(&times, 0.5);
        let algbw = if time_us > 0.0 {
            stats::gbps(bytes as u64, time_us * 1e-6)
        } else {
            0.0
        };
        rows.push(BenchRow {
            op: cfg.op.name(),
            dtype: cfg.dtype,
            transport: transport.to_string(),
            bytes,
            count: bytes / elem,
            world: n,
            time_us,
            mean_us,
            algbw_gbps: algbw,
            busbw_gbps: algbw * cfg.op.bus_factor(n),
            ok: ok[0] == 1,
        });
    }
    Ok(rows)
}

/// The table's column names, aligned with [`BenchRow::table_line`].
pub fn column_header() -> String {
    format!(
        "# {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>5}",
        "size", "count", "time_us", "mean_us", "algbw_GB/s", "busbw_GB/s", "ok"
    )
}

impl BenchRow {
    /// One row of the table under [`column_header`].
    pub fn table_line(&self) -> String {
        format!(
            "  {:>10} {:>12} {:>12.1} {:>12.1} {:>12.3} {:>12.3} {:>5}",
            format_size(self.bytes),
            self.count,
            self.time_us,
            self.mean_us,
            self.algbw_gbps,
            self.busbw_gbps,
            if self.ok { "ok" } else { "FAIL" }
        )
    }
}

/// A human-readable size: 1K, 64M.
pub fn format_size(bytes: usize) -> String {
    for (unit, shift) in [("G", 30), ("M", 20), ("K", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("12").unwrap(), 12);
        assert!(parse_size("x").is_err());
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn the_check_compares_every_block_rounded_to_the_dtype() {
        let n = (1 << 16) + 3;
        for dtype in [DType::F32, DType::BF16, DType::U8] {
            let mut buf = vec![0u8; n * dtype.size()];
            fill_from_f64(&mut buf, dtype, |i| pattern(1, i));
            assert!(matches(&buf, dtype, |i| pattern(1, i)));
            // The last element sits in the second block.
            assert!(!matches(&buf, dtype, |i| if i == n - 1 { 0.0 } else { pattern(1, i) }));
        }
    }

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(BenchOp::AllReduce.bus_factor(2), 1.0);
        assert_eq!(BenchOp::AllGather.bus_factor(4), 0.75);
        assert_eq!(BenchOp::Broadcast.bus_factor(8), 1.0);
    }
}
