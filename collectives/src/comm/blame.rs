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
        let peer = self.members[e.peer];
        let me = self.members[self.rank];
        let (op, seq) = (ctx.desc.kind, ctx.seq);
        let from_record = |rec: AbortRecord, fallback: CommError| match rec.culprit {
            Some(c) if rec.reporter != me => CommError::Aborted {
                rank: c,
                op,
                seq,
                reason: rec.reason,
            },
            _ => fallback,
        };
        let err = match e.kind {
            ExchangeErrorKind::Timeout { detail, .. } => {
                if let Some(rec) = self
                    .read_abort_record()
                    .filter(|r| r.culprit.is_some() && r.reporter != me)
                {
                    CommError::Aborted {
                        rank: rec.culprit.unwrap_or(peer),
                        op,
                        seq,
                        reason: rec.reason,
                    }
                } else {
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
            }
            ExchangeErrorKind::Link(LinkError::Aborted { culprit, reason }) => CommError::Aborted {
                rank: culprit.unwrap_or(peer),
                op,
                seq,
                reason,
            },
            ExchangeErrorKind::Link(link) => {
                let fallback = CommError::PeerLost {
                    rank: peer,
                    op,
                    seq,
                    detail: link.to_string(),
                };
                // A peer that aborted published its reason before closing; one that died did not.
                match self.wait_abort_record(Duration::from_millis(50)) {
                    Some(rec) => from_record(rec, fallback),
                    None => fallback,
                }
            }
            ExchangeErrorKind::Mismatch { remote, expected } => CommError::Mismatch {
                seq,
                local_rank: me,
                local: expected.desc,
                remote_rank: peer,
                remote_seq: remote.seq,
                remote: remote.desc,
                detail: if remote.desc == expected.desc && remote.seq == expected.seq {
                    format!(
                        "; its message was step {} with {} bytes where step {} with {} bytes was expected \
                         (do the ranks use different segment sizes, thresholds or algorithms?)",
                        remote.step, remote.len, expected.step, expected.len
                    )
                } else {
                    String::new()
                },
            },
            ExchangeErrorKind::Protocol(m) => CommError::PeerLost {
                rank: peer,
                op,
                seq,
                detail: format!("protocol error: {m}"),
            },
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
        };
        let culprit = err.rank();
        let reason = err.to_string();
        if let Some(f) = &self.fabric {
            let rec = AbortRecord {
                culprit,
                reporter: me,
                reason: reason.clone(),
            };
            if let Ok(bytes) = serde_json::to_vec(&rec) {
                let _ = f.store().set_if_absent(&self.abort_key(), &bytes);
            }
        }
        self.transport.abort(culprit, &reason);
        err
    }
}
