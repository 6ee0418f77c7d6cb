//! [`MeshTransport`]'s side of the group segment ([`GroupSegment`]): mapping it on first use,
//! and posting to it with the same waiting ladder, deadline, liveness checks and errors as a
//! link exchange. What the posts are combined into is the algorithm's business
//! (`algo::shared`).

use super::idle::{Idle, MAX_SLEEP};
use super::{Combine, ExchangeError, ExchangeErrorKind, MeshTransport, OpCtx, link_err};
use crate::error::LinkError;
use crate::header::{HEADER_LEN, Header};
use crate::shm::GroupSegment;
use std::time::Instant;

/// Whether this transport's group has a shared segment; asked once.
pub(super) enum GroupState {
    Unknown,
    Absent,
    Mapped(GroupSegment),
}

impl MeshTransport {
    /// The segment's slot size, mapping it on the first call, by `deadline()` (0: the group
    /// has none).
    pub(super) fn group_slot_bytes(&mut self, deadline: impl FnOnce() -> Instant) -> Result<usize, ExchangeError> {
        if let GroupState::Unknown = self.group {
            self.group = match self.connector.connect_group(deadline()) {
                Ok(Some(segment)) => GroupState::Mapped(segment),
                Ok(None) => GroupState::Absent,
                // Mapping the file failed here: no peer is at fault.
                Err(e) => {
                    return Err(ExchangeError {
                        peer: self.rank,
                        kind: ExchangeErrorKind::Connect(e),
                    });
                }
            };
        }
        Ok(match &self.group {
            GroupState::Mapped(segment) => segment.slot_bytes(),
            GroupState::Unknown | GroupState::Absent => 0,
        })
    }

    /// Post `buf`, wait for every member's post of the same generation, check that they all
    /// posted the same operation, and hand the posts to `combine` in rank order.
    pub(super) fn post_to_group(
        &mut self,
        ctx: &OpCtx,
        buf: &mut [u8],
        combine: &mut Combine<'_>,
    ) -> Result<(), ExchangeError> {
        let rank = self.rank;
        let GroupState::Mapped(segment) = &mut self.group else {
            return Err(no_segment(rank, ctx, buf.len()));
        };
        if buf.len() > segment.slot_bytes() {
            return Err(no_segment(rank, ctx, buf.len()));
        }
        let mine = Header {
            desc: ctx.desc,
            seq: ctx.seq,
            step: 0,
            len: buf.len() as u64,
        }
        .encode();
        let generation = segment.post(&mine, buf);
        let mut idle = Idle::new();
        let mut waiting_on = 0;
        while let Some(peer) = segment.first_missing(generation, waiting_on) {
            waiting_on = peer;
            if idle.spin_unclocked() {
                continue;
            }
            segment.check(generation, peer).map_err(link_err(peer))?;
            let now = Instant::now();
            if now >= ctx.deadline {
                return Err(timeout(ctx, segment, generation, peer));
            }
            if !self.waiter.climb(now, &mut idle) {
                continue;
            }
            if idle.liveness_due(now) {
                if !segment.peer_alive(peer) {
                    return Err(link_err(peer)(LinkError::PeerDied));
                }
                in_same_op(segment, ctx, peer)?;
            }
            segment.sleep_until_posted(generation, peer, (ctx.deadline - now).min(MAX_SLEEP));
        }
        self.waiter.progressed(&mut idle);
        for peer in (0..segment.ranks()).filter(|&p| p != rank) {
            let theirs = segment.posted_header(generation, peer);
            if theirs != mine {
                return Err(mismatch(peer, &theirs, &mine));
            }
        }
        for peer in 0..segment.ranks() {
            combine(buf, peer, segment.posted_data(generation, peer, buf.len()));
        }
        Ok(())
    }

    /// Announce `ctx` in the group segment, if the group has one.
    pub(super) fn announce(&self, ctx: &OpCtx) {
        if let GroupState::Mapped(segment) = &self.group {
            segment.announce(ctx.seq, &announcement(ctx));
        }
    }

    /// Fail with a mismatch if `peer` announced a different collective under our sequence
    /// number (nothing to check without a group segment).
    pub(super) fn check_announced(&self, ctx: &OpCtx, peer: usize) -> Result<(), ExchangeError> {
        match &self.group {
            GroupState::Mapped(segment) => in_same_op(segment, ctx, peer),
            GroupState::Unknown | GroupState::Absent => Ok(()),
        }
    }
}

/// What a rank announces of the collective `ctx`: its header with step and length 0.
fn announcement(ctx: &OpCtx) -> [u8; HEADER_LEN] {
    Header {
        desc: ctx.desc,
        seq: ctx.seq,
        step: 0,
        len: 0,
    }
    .encode()
}

fn in_same_op(segment: &GroupSegment, ctx: &OpCtx, peer: usize) -> Result<(), ExchangeError> {
    match segment.announced(peer) {
        Some((seq, theirs)) if seq == ctx.seq => {
            let mine = announcement(ctx);
            if theirs == mine {
                Ok(())
            } else {
                Err(mismatch(peer, &theirs, &mine))
            }
        }
        _ => Ok(()),
    }
}

/// The error for a post the group has no segment slot for.
pub(super) fn no_segment(rank: usize, ctx: &OpCtx, bytes: usize) -> ExchangeError {
    ExchangeError {
        peer: rank,
        kind: ExchangeErrorKind::Protocol(format!(
            "{} seq {}: the group has no shared segment slot for {bytes} bytes",
            ctx.desc.kind, ctx.seq
        )),
    }
}

fn timeout(ctx: &OpCtx, segment: &GroupSegment, generation: u64, peer: usize) -> ExchangeError {
    let waited = ctx.deadline.duration_since(ctx.started);
    let last = segment.posted_by(peer);
    ExchangeError {
        peer,
        kind: ExchangeErrorKind::Timeout {
            // A rank one post behind never entered this operation.
            entered: false,
            detail: format!(
                "waited {waited:?} for its post to the group segment {} (generation {generation}; \
                 its last post is generation {last})",
                segment.path().display()
            ),
        },
    }
}

/// A post whose header differs from ours: the ranks called different operations, or the same
/// one with different sizes.
fn mismatch(peer: usize, theirs: &[u8; HEADER_LEN], mine: &[u8; HEADER_LEN]) -> ExchangeError {
    let kind = match (Header::decode(theirs), Header::decode(mine)) {
        (Ok(remote), Ok(expected)) => ExchangeErrorKind::Mismatch { remote, expected },
        (Err(why), _) | (_, Err(why)) => ExchangeErrorKind::Protocol(format!("bad post in the group segment: {why}")),
    };
    ExchangeError { peer, kind }
}
