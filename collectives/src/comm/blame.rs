//! Failure attribution: turning "my exchange with peer P failed" into an error that names the
//! rank really at fault, the same one on every rank of a broken group.
//!
//! A closed connection or a dead pid blames that peer, unless the peer published an abort
//! record first (it always does before aborting its links, so the record is there when the
//! close is seen). A timeout cannot be judged locally, because the peer may itself be blocked
//! on another rank, so timed-out ranks compare notes in the rendezvous store: the member
//! that recorded nothing never reached the operation.

use super::Communicator;
use crate::error::{CommError, LinkError};
use crate::header::Header;
use crate::transport::{ExchangeError, ExchangeErrorKind, OpCtx};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(Serialize, Deserialize)]
pub(super) struct AbortRecord {
    culprit: Option<usize>,
    reporter: usize,
    reason: String,
}

impl Communicator {
    fn abort_key(&self) -> String {
        format!("gantry/abort/{}", self.name)
    }

    fn read_abort_record(&self) -> Option<AbortRecord> {
        let store = self.fabric.as_ref()?.store();
        let raw = store.try_get(&self.abort_key()).ok()??;
        serde_json::from_slice(&raw).ok()
    }

    /// Poll the store for another rank's abort record for up to `grace`.
    fn wait_abort_record(&self, grace: Duration) -> Option<AbortRecord> {
        let until = Instant::now() + grace;
        loop {
            if let Some(r) = self.read_abort_record() {
                return Some(r);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// After a timeout, find the rank that never entered this operation. Every rank that
    /// times out records `waiting on P` for this sequence number in the store; a stalled rank
    /// records nothing. Waiting on an individual peer cannot tell a stalled peer from one that
    /// is itself waiting (in recursive doubling, a rank's second partner is blocked on the
    /// stalled first one), so the ranks compare notes for the rest of the call's budget.
    fn find_absent_rank(&self, ctx: &OpCtx, waiting_on: usize) -> Option<usize> {
        let store = self.fabric.as_ref()?.store();
        let me = self.members[self.rank];
        let base = format!("gantry/timeout/{}/{}", self.name, ctx.seq);
        store
            .set(&format!("{base}/{me}"), waiting_on.to_string().as_bytes())
            .ok()?;
        store.add(&format!("{base}/count"), 1).ok()?;
        let until = ctx.started + self.timeout;
        let others = self.size() as i64 - 1;
        loop {
            let count = store.try_get(&format!("{base}/count")).ok().flatten();
            let count: i64 = count
                .and_then(|c| String::from_utf8_lossy(&c).parse().ok())
                .unwrap_or(0);
            if count >= others || Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let absent: Vec<usize> = self
            .members
            .iter()
            .copied()
            .filter(|&m| m != me && store.try_get(&format!("{base}/{m}")).ok().flatten().is_none())
            .collect();
        if absent.contains(&waiting_on) {
            Some(waiting_on)
        } else {
            absent.first().copied()
        }
    }

    /// Turn an exchange failure into an error that blames the right rank, publish it for the
    /// other ranks, and abort our links so they stop waiting for us.
    pub(super) fn attribute(&mut self, ctx: &OpCtx, e: ExchangeError) -> CommError {
        let err = self.blame(ctx, e);
        self.publish_abort(&err);
        err
    }

    /// Decide whom an exchange failure blames. Only timeouts and closed links need to consult
    /// the other ranks; every other failure names the peer of the failed exchange.
    fn blame(&self, ctx: &OpCtx, e: ExchangeError) -> CommError {
        let peer = self.members[e.peer];
        let (op, seq) = (ctx.desc.kind, ctx.seq);
        match e.kind {
            ExchangeErrorKind::Timeout { detail, .. } => self.blame_timeout(ctx, peer, detail),
            ExchangeErrorKind::Link(LinkError::Aborted { culprit, reason }) => CommError::Aborted {
                rank: culprit.unwrap_or(peer),
                op,
                seq,
                reason,
            },
            ExchangeErrorKind::Link(link) => self.blame_closed_link(ctx, peer, link),
            ExchangeErrorKind::Mismatch { remote, expected } => {
                mismatch_error(seq, self.members[self.rank], peer, remote, expected)
            }
            ExchangeErrorKind::Protocol(m) => CommError::PeerLost {
                rank: peer,
                op,
                seq,
                detail: format!("protocol error: {m}"),
            },
            // Whoever answered at the peer's address failed the handshake: that need not be
            // the peer, so nobody is blamed.
            ExchangeErrorKind::Connect(LinkError::Auth(why)) => CommError::Setup(format!(
                "rank {} could not authenticate its link to rank {peer} for {op} seq {seq}: {why}",
                self.members[self.rank]
            )),
            ExchangeErrorKind::Connect(LinkError::Io(io)) if io.kind() == std::io::ErrorKind::TimedOut => {
                CommError::RankTimeout {
                    rank: peer,
                    op,
                    seq,
                    waited: self.timeout,
                    detail: format!("never connected: {io}"),
                }
            }
            ExchangeErrorKind::Connect(link) => CommError::PeerLost {
                rank: peer,
                op,
                seq,
                detail: format!("could not connect: {link}"),
            },
        }
    }

    /// A timeout blames whoever another rank already blamed; failing that, the rank that never
    /// reached the operation, which need not be the `peer` this rank was waiting on.
    fn blame_timeout(&self, ctx: &OpCtx, peer: usize, detail: String) -> CommError {
        let (op, seq) = (ctx.desc.kind, ctx.seq);
        if let Some(err) = self
            .read_abort_record()
            .and_then(|rec| self.aborted_by_another_rank(ctx, rec))
        {
            return err;
        }
        match self.find_absent_rank(ctx, peer) {
            Some(absent) if absent != peer => CommError::RankTimeout {
                rank: absent,
                op,
                seq,
                waited: self.timeout,
                detail: format!(
                    "it never reached this operation (every other rank timed out inside it); \
                     this rank was waiting on rank {peer}: {detail}"
                ),
            },
            _ => CommError::RankTimeout {
                rank: peer,
                op,
                seq,
                waited: self.timeout,
                detail,
            },
        }
    }

    /// A closed link blames `peer` unless it aborted because of another rank: a peer that
    /// aborted published its reason before closing, one that died did not.
    fn blame_closed_link(&self, ctx: &OpCtx, peer: usize, link: LinkError) -> CommError {
        let lost = CommError::PeerLost {
            rank: peer,
            op: ctx.desc.kind,
            seq: ctx.seq,
            detail: link.to_string(),
        };
        self.wait_abort_record(Duration::from_millis(50))
            .and_then(|rec| self.aborted_by_another_rank(ctx, rec))
            .unwrap_or(lost)
    }

    /// The error another rank's abort record implies, if it blames someone and was not written
    /// by this rank (our own record says nothing new).
    fn aborted_by_another_rank(&self, ctx: &OpCtx, rec: AbortRecord) -> Option<CommError> {
        let rank = rec.culprit?;
        (rec.reporter != self.members[self.rank]).then_some(CommError::Aborted {
            rank,
            op: ctx.desc.kind,
            seq: ctx.seq,
            reason: rec.reason,
        })
    }

    /// Record the verdict in the store (first writer wins, so every rank reports the same
    /// culprit) and abort our links so peers blocked on us fail now rather than at their deadline.
    fn publish_abort(&mut self, err: &CommError) {
        let culprit = err.rank();
        let reason = err.to_string();
        if let Some(f) = &self.fabric {
            let rec = AbortRecord {
                culprit,
                reporter: self.members[self.rank],
                reason: reason.clone(),
            };
            if let Ok(bytes) = serde_json::to_vec(&rec) {
                let _ = f.store().set_if_absent(&self.abort_key(), &bytes);
            }
        }
        self.transport.abort(culprit, &reason);
    }
}

/// A header that differs from the expected one. When the calls agree and only the step or
/// length differs, the ranks are configured differently, and the detail says so.
fn mismatch_error(seq: u64, local_rank: usize, remote_rank: usize, remote: Header, expected: Header) -> CommError {
    let detail = if remote.desc == expected.desc && remote.seq == expected.seq {
        format!(
            "; its message was step {} with {} bytes where step {} with {} bytes was expected \
             (do the ranks use different segment sizes, thresholds or algorithms?)",
            remote.step, remote.len, expected.step, expected.len
        )
    } else {
        String::new()
    };
    CommError::Mismatch {
        seq,
        local_rank,
        local: expected.desc,
        remote_rank,
        remote_seq: remote.seq,
        remote: remote.desc,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{DType, ReduceOp};
    use crate::header::{OpDesc, OpKind};

    fn header(kind: OpKind, step: u32, len: u64) -> Header {
        Header {
            desc: OpDesc {
                kind,
                dtype: DType::F32,
                reduce: Some(ReduceOp::Sum),
                count: 64,
                root: 0,
            },
            seq: 9,
            step,
            len,
        }
    }

    #[test]
    fn a_mismatch_of_like_calls_blames_the_configuration() {
        let expected = header(OpKind::AllReduce, 1, 128);
        let err = mismatch_error(9, 0, 3, header(OpKind::AllReduce, 2, 64), expected);
        let CommError::Mismatch {
            remote_rank, detail, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(*remote_rank, 3);
        assert!(
            detail.contains("step 2 with 64 bytes where step 1 with 128"),
            "{detail}"
        );
        let err = mismatch_error(9, 0, 3, header(OpKind::Broadcast, 1, 128), expected);
        let CommError::Mismatch { detail, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(detail.is_empty(), "{detail}");
    }
}
