//! All_reduce through the group's shared segment ([`Transport::post_shared`]): every rank
//! posts its buffer, then folds all `n` posts in rank order into it. One round and no
//! dependent hops: where recursive doubling needs ⌈log2 n⌉ rounds, each a wait on a partner
//! (and, on ranks sharing cores, a context switch), a rank here waits only for the last post.
//! Each rank reads `n` buffers, so this is for small messages.
//!
//! Every rank folds the same posts in the same order, so all get bit-identical results, as
//! every all_reduce here must.

use super::AlgoResult;
use crate::dtype::{DType, ReduceOp};
use crate::reduce::reduce_bytes;
use crate::transport::{OpCtx, Transport};

/// `buf ← post₀ ⊕ post₁ ⊕ … ⊕ postₙ₋₁`, left to right. `buf` must fit the segment's slots.
pub fn all_reduce(t: &mut dyn Transport, ctx: &OpCtx, buf: &mut [u8], dtype: DType, op: ReduceOp) -> AlgoResult {
    t.post_shared(ctx, buf, &mut |buf, rank, post| {
        if rank == 0 {
            buf.copy_from_slice(post);
        } else {
            reduce_bytes(dtype, op, buf, post);
        }
    })
}
