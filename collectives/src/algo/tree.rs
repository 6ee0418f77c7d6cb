//! Rooted operations: broadcast and reduce.
//!
//! Small messages use binomial trees (⌈log2 n⌉ hops from the root). Large broadcasts use a
//! pipelined chain in root order (each rank forwards segment k while receiving k+1), which
//! moves each byte over each link once. Large reduces run the ring reduce-scatter and then
//! gather the finished chunks at the root.

use super::ring::{Chunking, reduce_scatter_phase};
use super::{AlgoResult, chunk_range, disjoint, scratch, scratch_bytes, segment};
use crate::dtype::{DType, ReduceOp};
use crate::reduce::reduce_bytes;
use crate::transport::{OpCtx, RecvSink, Transport};

fn rel(t: &dyn Transport, root: usize) -> usize {
    (t.rank() + t.size() - root) % t.size()
}

fn abs(t: &dyn Transport, root: usize, vr: usize) -> usize {
    (vr + root) % t.size()
}

pub fn broadcast_binomial(t: &mut dyn Transport, ctx: &OpCtx, buf: &mut [u8], root: usize) -> AlgoResult {
    let n = t.size();
    let vr = rel(t, root);
    let mut mask = 1;
    while mask < n {
        if vr & mask != 0 {
            let src = abs(t, root, vr - mask);
            t.exchange(ctx, None, Some(ctx.recv(src, mask as u32, RecvSink::Copy(buf))))?;
            break;
        }
        mask <<= 1;
    }
    mask >>= 1;
    while mask > 0 {
        if vr + mask < n {
            let dst = abs(t, root, vr + mask);
            t.exchange(ctx, Some(ctx.send(dst, mask as u32, buf)), None)?;
        }
        mask >>= 1;
    }
    Ok(())
}

pub fn broadcast_chain(
    t: &mut dyn Transport,
    ctx: &OpCtx,
    buf: &mut [u8],
    root: usize,
    segment_bytes: usize,
) -> AlgoResult {
    let n = t.size();
    if n == 1 {
        return Ok(());
    }
    let vr = rel(t, root);
    let (prev, next) = (abs(t, root, (vr + n - 1) % n), abs(t, root, (vr + 1) % n));
    let all = 0..buf.len();
    let nseg = buf.len().div_ceil(segment_bytes).max(1);
    for k in 0..=nseg {
        let send = (vr < n - 1 && k >= 1).then(|| segment(&all, k - 1, segment_bytes));
        let recv = (vr > 0 && k < nseg).then(|| segment(&all, k, segment_bytes));
        let (sb, rb) = disjoint(buf, send.clone().unwrap_or(0..0), recv.clone().unwrap_or(0..0));
        let s = send.map(|_| ctx.send(next, (k - 1) as u32, sb));
        let r = recv.map(|_| ctx.recv(prev, k as u32, RecvSink::Copy(rb)));
        if s.is_some() || r.is_some() {
            t.exchange(ctx, s, r)?;
        }
    }
    Ok(())
}

/// Binomial-tree reduce into `buf` at `root`. `buf` is clobbered with partial results on the
/// other ranks (callers pass a copy).
pub fn reduce_binomial(
    t: &mut dyn Transport,
    ctx: &OpCtx,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    root: usize,
) -> AlgoResult {
    let n = t.size();
    let vr = rel(t, root);
    let mut tmp_store = scratch(buf.len());
    let tmp = scratch_bytes(&mut tmp_store, buf.len());
    let mut mask = 1;
    while mask < n {
        if vr & mask == 0 {
            let src = vr | mask;
            if src < n {
                let src = abs(t, root, src);
                t.exchange(ctx, None, Some(ctx.recv(src, mask as u32, RecvSink::Copy(tmp))))?;
                reduce_bytes(dtype, op, buf, tmp);
            }
        } else {
            let dst = abs(t, root, vr & !mask);
            t.exchange(ctx, Some(ctx.send(dst, mask as u32, buf)), None)?;
            break;
        }
        mask <<= 1;
    }
    Ok(())
}

/// Ring reduce-scatter, then every rank sends its finished chunk to the root.
pub fn reduce_ring(
    t: &mut dyn Transport,
    ctx: &OpCtx,
    buf: &mut [u8],
    c: Chunking,
    op: ReduceOp,
    root: usize,
) -> AlgoResult {
    let (n, r) = (t.size(), t.rank());
    reduce_scatter_phase(t, ctx, buf, c, op)?;
    let gather_step = u32::MAX - 1;
    if r == root {
        for i in (0..n).filter(|&i| i != root) {
            let range = chunk_range(c.count, n, i, c.elem);
            t.exchange(
                ctx,
                None,
                Some(ctx.recv(i, gather_step, RecvSink::Copy(&mut buf[range]))),
            )?;
        }
    } else {
        let range = chunk_range(c.count, n, r, c.elem);
        t.exchange(ctx, Some(ctx.send(root, gather_step, &buf[range])), None)?;
    }
    Ok(())
}
