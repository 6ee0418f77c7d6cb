//! Pairwise all-to-all: in step s every rank sends its block for rank r+s while receiving the
//! block from rank r−s, so each step is a perfect matching and nobody waits on two peers.

use super::AlgoResult;
use crate::transport::{OpCtx, RecvSink, Transport};

/// `send` and `recv` hold n blocks of `block` bytes; block i of `send` goes to rank i, block i
/// of `recv` comes from rank i.
pub fn all_to_all(t: &mut dyn Transport, ctx: &OpCtx, send: &[u8], recv: &mut [u8], block: usize) -> AlgoResult {
    let (n, r) = (t.size(), t.rank());
    recv[r * block..(r + 1) * block].copy_from_slice(&send[r * block..(r + 1) * block]);
    for s in 1..n {
        let to = (r + s) % n;
        let from = (r + n - s) % n;
        let out = &send[to * block..(to + 1) * block];
        let inp = &mut recv[from * block..(from + 1) * block];
        t.exchange(
            ctx,
            Some(ctx.send(to, s as u32, out)),
            Some(ctx.recv(from, s as u32, RecvSink::Copy(inp))),
        )?;
    }
    Ok(())
}
