//! Collective algorithms as plain functions over [`Transport`]: no sockets, no threads, no
//! clocks of their own, so the in-process transport can test them exhaustively.
//!
//! - [`ring`]: chunked, pipelined ring reduce-scatter and all-gather (bandwidth-optimal: each
//!   rank sends 2(n−1)/n of the buffer for an all_reduce), segment-major so segment k travels
//!   the whole ring while segment k+1 is still being reduced.
//! - [`doubling`]: recursive-doubling all_reduce for small messages (⌈log2 n⌉ rounds, with the
//!   usual fold for non-powers of two) and the dissemination barrier.
//! - [`tree`]: binomial-tree broadcast and reduce for small messages, a pipelined chain
//!   broadcast and ring-based reduce for large ones.
//! - [`alltoall`]: pairwise exchange.
//! - [`shared`]: small all_reduce among ranks of one host through their shared segment (one
//!   round: every rank posts, then reduces every post in rank order).
//!
//! Buffers are raw bytes of a known dtype; element counts and chunk boundaries are computed
//! identically on every rank, which is what keeps the steps of all ranks in lockstep.

pub mod alltoall;
pub mod doubling;
pub mod ring;
pub mod shared;
pub mod tree;

use crate::transport::{ExchangeError, Transport};
use std::ops::Range;

pub type AlgoResult = Result<(), ExchangeError>;

/// Byte range of chunk `i` when `count` elements are split as evenly as possible over `n`.
pub fn chunk_range(count: usize, n: usize, i: usize, elem: usize) -> Range<usize> {
    let lo = (i as u128 * count as u128 / n as u128) as usize;
    let hi = ((i as u128 + 1) * count as u128 / n as u128) as usize;
    lo * elem..hi * elem
}

/// Segment `k` of `range` when cut into pieces of `seg` bytes (empty past the end).
pub fn segment(range: &Range<usize>, k: usize, seg: usize) -> Range<usize> {
    let lo = (range.start + k * seg).min(range.end);
    let hi = (lo + seg).min(range.end);
    lo..hi
}

/// Split one buffer into a read-only range and a disjoint mutable range.
pub fn disjoint(buf: &mut [u8], read: Range<usize>, write: Range<usize>) -> (&[u8], &mut [u8]) {
    assert!(
        read.end <= write.start || write.end <= read.start || read.is_empty() || write.is_empty(),
        "overlapping ranges {read:?} and {write:?}"
    );
    if read.is_empty() {
        return (&[], &mut buf[write]);
    }
    if read.start < write.start {
        let (a, b) = buf.split_at_mut(write.start);
        (&a[read], &mut b[..write.len()])
    } else {
        let (a, b) = buf.split_at_mut(read.start);
        (&b[..read.len()], &mut a[write])
    }
}

/// An 8-byte-aligned scratch buffer of `len` bytes.
pub fn scratch(len: usize) -> Vec<u64> {
    vec![0u64; len.div_ceil(8)]
}

pub fn scratch_bytes(v: &mut [u64], len: usize) -> &mut [u8] {
    &mut bytemuck::cast_slice_mut(v)[..len]
}

/// The first `len` bytes of a reused 8-byte-aligned scratch buffer, grown to fit if needed.
pub fn grown_scratch(v: &mut Vec<u64>, len: usize) -> &mut [u8] {
    let words = len.div_ceil(8);
    if v.len() < words {
        v.resize(words, 0);
    }
    scratch_bytes(v, len)
}

/// Group-rank helpers shared by the algorithms.
pub(crate) fn left(t: &dyn Transport) -> usize {
    (t.rank() + t.size() - 1) % t.size()
}

pub(crate) fn right(t: &dyn Transport) -> usize {
    (t.rank() + 1) % t.size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_exactly() {
        for count in [0usize, 1, 2, 7, 100, 1001] {
            for n in 1..=6 {
                let mut next = 0;
                for i in 0..n {
                    let r = chunk_range(count, n, i, 4);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, count * 4);
            }
        }
    }

    #[test]
    fn disjoint_both_orders() {
        let mut b: Vec<u8> = (0..10).collect();
        let (r, w) = disjoint(&mut b, 0..3, 5..8);
        assert_eq!(r, &[0, 1, 2]);
        w[0] = 99;
        let (r, w) = disjoint(&mut b, 7..9, 1..3);
        assert_eq!(r, &[7, 8]);
        assert_eq!(w, &[1, 2]);
        assert_eq!(b[5], 99);
    }
}
