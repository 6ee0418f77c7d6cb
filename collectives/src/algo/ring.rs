//! Chunked, pipelined ring algorithms.
//!
//! The buffer is cut into n chunks (rank i ends up owning chunk i) and each chunk into
//! segments. For every segment, n−1 reduce-scatter steps pass partial sums around the ring,
//! each step reducing straight from the link into the destination as bytes arrive; n−1
//! all-gather steps then pass the finished segments around. Every rank computes the same
//! chunk and segment boundaries, so neighbours agree on every message length.

use super::{AlgoResult, chunk_range, disjoint, left, right, segment};
use crate::dtype::ReduceOp;
use crate::transport::{OpCtx, RecvSink, Transport};

/// How the buffer is cut: `count` elements of `elem` bytes; `even` = every chunk holds exactly
/// count / n elements (reduce_scatter, all_gather), else as even as possible (all_reduce).
#[derive(Clone, Copy)]
pub struct Chunking {
    pub count: usize,
    pub elem: usize,
    pub segment_bytes: usize,
}

impl Chunking {
    fn chunk(&self, n: usize, i: usize) -> std::ops::Range<usize> {
        chunk_range(self.count, n, i, self.elem)
    }

    fn segments(&self, n: usize) -> (usize, usize) {
        let max_chunk = self.count.div_ceil(n) * self.elem;
        let seg = (self.segment_bytes / self.elem).max(1) * self.elem;
        (seg, max_chunk.div_ceil(seg).max(1))
    }
}

/// Reduce-scatter phase: afterwards chunk `rank` of `buf` holds the reduction of everyone's
/// chunk `rank`. Other chunks hold partial sums.
pub fn reduce_scatter_phase(
    t: &mut dyn Transport,
    ctx: &OpCtx,
    buf: &mut [u8],
    c: Chunking,
    op: ReduceOp,
) -> AlgoResult {
    let (n, r) = (t.size(), t.rank());
    if n == 1 {
        return Ok(());
    }
    let (seg, nseg) = c.segments(n);
    let (to, from) = (right(t), left(t));
    for k in 0..nseg {
        for s in 0..n - 1 {
            let send_c = (r + 2 * n - s - 1) % n;
            let recv_c = (r + 2 * n - s - 2) % n;
            let sr = segment(&c.chunk(n, send_c), k, seg);
            let rr = segment(&c.chunk(n, recv_c), k, seg);
            let step = (k * 2 * n + s) as u32;
            let (sb, rb) = disjoint(buf, sr, rr);
            t.exchange(
                ctx,
                Some(ctx.send(to, step, sb)),
                Some(ctx.recv(from, step, RecvSink::Reduce { dst: rb, op })),
            )?;
        }
    }
    Ok(())
}

/// All-gather phase: chunk `rank` of `buf` is complete on entry; afterwards all are.
pub fn all_gather_phase(t: &mut dyn Transport, ctx: &OpCtx, buf: &mut [u8], c: Chunking) -> AlgoResult {
    let (n, r) = (t.size(), t.rank());
    if n == 1 {
        return Ok(());
    }
    let (seg, nseg) = c.segments(n);
    let (to, from) = (right(t), left(t));
    for k in 0..nseg {
        for s in 0..n - 1 {
            let send_c = (r + n - s) % n;
            let recv_c = (r + 2 * n - s - 1) % n;
            let sr = segment(&c.chunk(n, send_c), k, seg);
            let rr = segment(&c.chunk(n, recv_c), k, seg);
            let step = (k * 2 * n + n + s) as u32;
            let (sb, rb) = disjoint(buf, sr, rr);
            t.exchange(
                ctx,
                Some(ctx.send(to, step, sb)),
                Some(ctx.recv(from, step, RecvSink::Copy(rb))),
            )?;
        }
    }
    Ok(())
}

/// Ring all_reduce: reduce-scatter then all-gather over the same (uneven) chunking.
pub fn all_reduce(t: &mut dyn Transport, ctx: &OpCtx, buf: &mut [u8], c: Chunking, op: ReduceOp) -> AlgoResult {
    reduce_scatter_phase(t, ctx, buf, c, op)?;
    all_gather_phase(t, ctx, buf, c)
}
