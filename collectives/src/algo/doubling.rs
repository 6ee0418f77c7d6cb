//! Latency-optimal algorithms for small messages.
//!
//! Recursive-doubling all_reduce: ⌈log2 n⌉ rounds of full-buffer exchange with partner
//! `rank XOR mask`. For n not a power of two, the first 2·rem ranks pair up first (even ranks
//! hand their data to the odd neighbour and wait), the remaining power-of-two set runs the
//! rounds, and the odd ranks hand the result back. Both partners compute `mine ⊕ theirs`; the
//! reductions are commutative element-wise, so every rank ends bit-identical.

use super::{AlgoResult, grown_scratch};
use crate::dtype::{DType, ReduceOp};
use crate::reduce::reduce_bytes;
use crate::transport::{OpCtx, RecvSink, Transport};

/// `scratch` holds one received buffer; it is grown when too small and kept by the caller, so
/// that repeated small calls allocate nothing.
pub fn all_reduce(
    t: &mut dyn Transport,
    ctx: &OpCtx,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    scratch: &mut Vec<u64>,
) -> AlgoResult {
    let (n, r) = (t.size(), t.rank());
    if n == 1 {
        return Ok(());
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros()); // largest power of two ≤ n
    let rem = n - p;
    let tmp = grown_scratch(scratch, buf.len());

    // Fold the extra ranks in.
    let new_rank = if r < 2 * rem {
        if r % 2 == 0 {
            t.exchange(ctx, Some(ctx.send(r + 1, 0, buf)), None)?;
            None
        } else {
            t.exchange(ctx, None, Some(ctx.recv(r - 1, 0, RecvSink::Reduce { dst: buf, op })))?;
            Some(r / 2)
        }
    } else {
        Some(r - rem)
    };

    if let Some(nr) = new_rank {
        let mut mask = 1;
        while mask < p {
            let partner_nr = nr ^ mask;
            let partner = if partner_nr < rem {
                partner_nr * 2 + 1
            } else {
                partner_nr + rem
            };
            let step = mask as u32;
            t.exchange(
                ctx,
                Some(ctx.send(partner, step, buf)),
                Some(ctx.recv(partner, step, RecvSink::Copy(tmp))),
            )?;
            reduce_bytes(dtype, op, buf, tmp);
            mask <<= 1;
        }
    }

    // Unfold: hand the result back to the ranks that sat out.
    if r < 2 * rem {
        let step = u32::MAX;
        if r % 2 == 0 {
            t.exchange(ctx, None, Some(ctx.recv(r + 1, step, RecvSink::Copy(buf))))?;
        } else {
            t.exchange(ctx, Some(ctx.send(r - 1, step, buf)), None)?;
        }
    }
    Ok(())
}

/// Dissemination barrier: ⌈log2 n⌉ rounds; in round k rank r signals r+2^k and waits for r−2^k.
pub fn barrier(t: &mut dyn Transport, ctx: &OpCtx) -> AlgoResult {
    let (n, r) = (t.size(), t.rank());
    let mut k = 1;
    let mut step = 0u32;
    while k < n {
        let to = (r + k) % n;
        let from = (r + n - k) % n;
        t.exchange(
            ctx,
            Some(ctx.send(to, step, &[])),
            Some(ctx.recv(from, step, RecvSink::Copy(&mut []))),
        )?;
        k <<= 1;
        step += 1;
    }
    Ok(())
}
