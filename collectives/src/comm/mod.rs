//! [`Communicator`]: the public API of a process group.
//!
//! Every call gets the next sequence number, a deadline, a flight-recorder entry and an
//! algorithm chosen by message size (or forced). Failures become a [`CommError`] that names the
//! rank at fault: a peer that never sent anything for this sequence number is blamed directly;
//! otherwise the rank looks for the abort record the first rank to find the fault published in
//! the rendezvous store, so that every rank of a broken ring blames the same, real culprit.
//! After an error the communicator is broken (its peers have given up too); make a new one.
//!
//! A small all_reduce is about half a microsecond over shared memory, so the bookkeeping of a
//! call is kept to what it needs: one precise clock read (the start: the deadline and the
//! flight record reuse it), a flight record written without a lock (the end stamped by the
//! coarse clock; see [`crate::recorder`]), the member list given to the recorder once rather
//! than per record, and the recursive-doubling scratch buffer kept here between calls.

mod blame;

use crate::algo::{self, ring::Chunking};
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{CommError, Result};
use crate::fabric::Fabric;
use crate::header::{OpDesc, OpKind};
use crate::link::LinkKind;
use crate::recorder::{AlgoName, FlightRecorder, FlightWriter, OpStart, Peers};
use crate::reduce::finish_avg;
use crate::transport::{ExchangeError, OpCtx, RecvSink, SendPart, Transport};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Algorithm family for all_reduce, broadcast and reduce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// By size: `Tree` up to `small_message_bytes` (for an all_reduce among ranks of one host
    /// over shared memory, their shared segment up to `shm_group_bytes`), `Ring` above.
    #[default]
    Auto,
    /// Pipelined ring (all_reduce, reduce) or chain (broadcast): bandwidth-optimal.
    Ring,
    /// Recursive doubling (all_reduce) or binomial tree (broadcast, reduce): latency-optimal.
    Tree,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Algorithm::Auto),
            "ring" => Ok(Algorithm::Ring),
            "tree" | "doubling" => Ok(Algorithm::Tree),
            _ => Err(format!("unknown algorithm `{s}` (expected auto, ring or tree)")),
        }
    }
}

/// Per-call overrides, applied with [`Communicator::with_options`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOptions {
    pub timeout: Option<Duration>,
    pub algorithm: Option<Algorithm>,
}

/// The longest deadline a call gets: a longer one (`GANTRY_TIMEOUT_MS` of years) means "no
/// deadline" to whoever set it, and `start + timeout` must not overflow an `Instant`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct Communicator {
    name: String,
    /// Shared with the flight recorder: the peers of every collective's record.
    members: Arc<[usize]>,
    rank: usize,
    transport: Box<dyn Transport>,
    fabric: Option<Fabric>,
    seq: u64,
    p2p_sent: Vec<u64>,
    p2p_received: Vec<u64>,
    timeout: Duration,
    algorithm: Algorithm,
    small_message_bytes: usize,
    segment_bytes: usize,
    recorder: FlightWriter,
    broken: Option<String>,
    splits: u64,
    /// Recursive doubling's receive buffer, kept between calls up to `small_message_bytes`.
    scratch: Vec<u64>,
}

fn invalid(op: OpKind, message: impl Into<String>) -> CommError {
    CommError::InvalidArgument {
        op,
        message: message.into(),
    }
}

impl Communicator {
    /// Wrap a transport. `members` are the global ranks of the group in group-rank order.
    pub fn new(
        name: String,
        members: Vec<usize>,
        transport: Box<dyn Transport>,
        fabric: Option<Fabric>,
    ) -> Communicator {
        let rank = transport.rank();
        let size = transport.size();
        assert_eq!(members.len(), size, "members must list every rank of the transport");
        let config = fabric.as_ref().map(|f| f.config().clone()).unwrap_or_default();
        let members: Arc<[usize]> = members.into();
        let recorder = FlightWriter::new(name.clone(), members[rank], config.flight_records, members.clone());
        if let Some(f) = &fabric {
            f.recorders().register(recorder.recorder());
        }
        Communicator {
            name,
            members,
            rank,
            transport,
            fabric,
            seq: 0,
            p2p_sent: vec![0; size],
            p2p_received: vec![0; size],
            timeout: config.timeout.min(MAX_TIMEOUT),
            algorithm: Algorithm::Auto,
            small_message_bytes: config.small_message_bytes,
            segment_bytes: config.segment_bytes,
            recorder,
            broken: None,
            splits: 0,
            scratch: Vec::new(),
        }
    }

    /// This process's rank within the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Global ranks of the members, in group-rank order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An NCCL communicator over the same members, in the same rank order, on CUDA device
    /// `device`: the device-memory twin of this group (its store key is this group's name,
    /// unique per instance). Collective over the members, like every call here; bounded by the
    /// fabric's join timeout. Fails with a setup error for a communicator made without a
    /// fabric (in-process tests).
    pub fn nccl_peer(&self, device: usize) -> Result<crate::nccl::NcclCommunicator> {
        let fabric = self.fabric.as_ref().ok_or_else(|| {
            let name = &self.name;
            CommError::Setup(format!(
                "group `{name}` has no fabric to rendezvous an NCCL communicator through"
            ))
        })?;
        fabric.nccl_communicator(&self.name, &self.members, device)
    }

    /// The last sequence number used by a collective.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The deadline of each later call (at most [`MAX_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.min(MAX_TIMEOUT);
    }

    pub fn set_algorithm(&mut self, algorithm: Algorithm) {
        self.algorithm = algorithm;
    }

    pub fn flight_recorder(&self) -> &Arc<FlightRecorder> {
        self.recorder.recorder()
    }

    /// Link kind used to reach group rank `peer`, once connected.
    pub fn link_kind(&self, peer: usize) -> Option<LinkKind> {
        self.transport.link_kind(peer)
    }

    /// Run `f` with `opts` overriding the timeout and algorithm, restoring them afterwards.
    pub fn with_options<R>(&mut self, opts: CallOptions, f: impl FnOnce(&mut Self) -> R) -> R {
        let saved = (self.timeout, self.algorithm);
        if let Some(t) = opts.timeout {
            self.timeout = t.min(MAX_TIMEOUT);
        }
        if let Some(a) = opts.algorithm {
            self.algorithm = a;
        }
        let out = f(self);
        (self.timeout, self.algorithm) = saved;
        out
    }

    // ----- typed API -------------------------------------------------------------------------

    pub fn all_reduce_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    pub fn all_reduce<T: Element>(&mut self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        same_len(OpKind::AllReduce, send.len(), recv.len())?;
        recv.copy_from_slice(send);
        self.all_reduce_in_place(recv, op)
    }

    pub fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, root)
    }

    /// Reduce into `buf` at `root`; other ranks' buffers are left unchanged.
    pub fn reduce_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op, root)
    }

    /// `recv` is written at `root` only (other ranks may pass anything of the same length).
    pub fn reduce<T: Element>(&mut self, send: &[T], recv: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        same_len(OpKind::Reduce, send.len(), recv.len())?;
        if self.rank == root {
            recv.copy_from_slice(send);
            self.reduce_in_place(recv, op, root)
        } else {
            let mut tmp = send.to_vec();
            self.reduce_in_place(&mut tmp, op, root)
        }
    }

    /// `recv` gets every rank's `send`, in rank order (`recv.len() == size * send.len()`).
    pub fn all_gather<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        if recv.len() != send.len() * self.size() {
            return Err(invalid(
                OpKind::AllGather,
                format!(
                    "recv holds {} elements, expected {} × {}",
                    recv.len(),
                    self.size(),
                    send.len()
                ),
            ));
        }
        let r = self.rank;
        recv[r * send.len()..(r + 1) * send.len()].copy_from_slice(send);
        self.all_gather_in_place(recv)
    }

    /// `buf` holds `size` blocks; this rank's block (at its rank) is sent, the others filled.
    pub fn all_gather_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        self.all_gather_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE)
    }

    /// `send` holds `size` blocks of `recv.len()`; block i is reduced over ranks into rank i's `recv`.
    pub fn reduce_scatter<T: Element>(&mut self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() * self.size() {
            return Err(invalid(
                OpKind::ReduceScatter,
                format!(
                    "send holds {} elements, expected {} × {}",
                    send.len(),
                    self.size(),
                    recv.len()
                ),
            ));
        }
        let mut tmp = send.to_vec();
        self.reduce_scatter_in_place(&mut tmp, op)?;
        let r = self.rank;
        recv.copy_from_slice(&tmp[r * recv.len()..(r + 1) * recv.len()]);
        Ok(())
    }

    /// Afterwards block `rank` of `buf` holds the result; other blocks hold partial results.
    pub fn reduce_scatter_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.reduce_scatter_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// Block i of `send` goes to rank i; block i of `recv` comes from rank i.
    pub fn all_to_all<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.all_to_all_bytes(bytemuck::cast_slice(send), bytemuck::cast_slice_mut(recv), T::DTYPE)
    }

    pub fn all_to_all_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        let send = buf.to_vec();
        self.all_to_all(&send, buf)
    }

    /// Send to group rank `peer`; matched in order with the peer's `recv` of the same tag.
    pub fn send<T: Element>(&mut self, buf: &[T], peer: usize, tag: u32) -> Result<()> {
        self.p2p(Some((bytemuck::cast_slice(buf), peer)), None, T::DTYPE, tag)
    }

    pub fn recv<T: Element>(&mut self, buf: &mut [T], peer: usize, tag: u32) -> Result<()> {
        self.p2p(None, Some((bytemuck::cast_slice_mut(buf), peer)), T::DTYPE, tag)
    }

    /// Send to `to` while receiving from `from` (no deadlock when both sides do it at once).
    pub fn send_recv<T: Element>(
        &mut self,
        send: &[T],
        to: usize,
        recv: &mut [T],
        from: usize,
        tag: u32,
    ) -> Result<()> {
        self.p2p(
            Some((bytemuck::cast_slice(send), to)),
            Some((bytemuck::cast_slice_mut(recv), from)),
            T::DTYPE,
            tag,
        )
    }

    pub fn barrier(&mut self) -> Result<()> {
        let desc = OpDesc {
            kind: OpKind::Barrier,
            dtype: DType::U8,
            reduce: None,
            count: 0,
            root: 0,
        };
        self.run(desc, 0, AlgoName::Dissemination, |t, ctx| {
            algo::doubling::barrier(t, ctx)
        })
    }

    // ----- byte-level API (for tensors whose dtype is only known at run time) ------------------

    pub fn all_reduce_bytes(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let count = check_buf(OpKind::AllReduce, buf, dtype)?;
        let desc = OpDesc {
            kind: OpKind::AllReduce,
            dtype,
            reduce: Some(op),
            count,
            root: 0,
        };
        let tree = self.pick_tree(buf.len());
        let chunking = self.chunking(count as usize, dtype);
        let n = self.size();
        let shared = if tree && self.algorithm == Algorithm::Auto && self.broken.is_none() {
            match self.transport.shared_slot_bytes(self.timeout) {
                Ok(slot) => slot > 0 && buf.len() <= slot,
                // Blamed and recorded like any failure of the operation.
                Err(e) => return self.run(desc, buf.len(), AlgoName::SharedSegment, |_, _| Err(e)),
            }
        } else {
            false
        };
        if shared {
            self.run(desc, buf.len(), AlgoName::SharedSegment, |t, ctx| {
                algo::shared::all_reduce(t, ctx, buf, dtype, op)
            })?;
        } else if tree {
            // Out of `self` for the call (`run` borrows it whole); back afterwards, even on error.
            let mut scratch = std::mem::take(&mut self.scratch);
            let result = self.run(desc, buf.len(), AlgoName::RecursiveDoubling, |t, ctx| {
                algo::doubling::all_reduce(t, ctx, buf, dtype, op, &mut scratch)
            });
            // A forced tree on a large buffer must not pin that much memory for good.
            if scratch.len() * 8 <= self.small_message_bytes {
                self.scratch = scratch;
            }
            result?;
        } else {
            self.run(desc, buf.len(), AlgoName::Ring, |t, ctx| {
                algo::ring::all_reduce(t, ctx, buf, chunking, op)
            })?;
        }
        if op == ReduceOp::Avg {
            finish_avg(dtype, buf, n);
        }
        Ok(())
    }

    pub fn broadcast_bytes(&mut self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        let count = check_buf(OpKind::Broadcast, buf, dtype)?;
        self.check_root(OpKind::Broadcast, root)?;
        let desc = OpDesc {
            kind: OpKind::Broadcast,
            dtype,
            reduce: None,
            count,
            root: root as u32,
        };
        let seg = self.segment_bytes;
        if self.pick_tree(buf.len()) {
            self.run(desc, buf.len(), AlgoName::BinomialTree, |t, ctx| {
                algo::tree::broadcast_binomial(t, ctx, buf, root)
            })
        } else {
            self.run(desc, buf.len(), AlgoName::Chain, |t, ctx| {
                algo::tree::broadcast_chain(t, ctx, buf, root, seg)
            })
        }
    }

    pub fn reduce_bytes(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        let count = check_buf(OpKind::Reduce, buf, dtype)?;
        self.check_root(OpKind::Reduce, root)?;
        let desc = OpDesc {
            kind: OpKind::Reduce,
            dtype,
            reduce: Some(op),
            count,
            root: root as u32,
        };
        let tree = self.pick_tree(buf.len());
        let chunking = self.chunking(count as usize, dtype);
        let n = self.size();
        let is_root = self.rank == root;
        let mut copy_store;
        let work: &mut [u8] = if is_root {
            buf
        } else {
            copy_store = algo::scratch(buf.len());
            let w = algo::scratch_bytes(&mut copy_store, buf.len());
            w.copy_from_slice(buf);
            w
        };
        if tree {
            self.run(desc, work.len(), AlgoName::BinomialTree, |t, ctx| {
                algo::tree::reduce_binomial(t, ctx, work, dtype, op, root)
            })?;
        } else {
            self.run(desc, work.len(), AlgoName::Ring, |t, ctx| {
                algo::tree::reduce_ring(t, ctx, work, chunking, op, root)
            })?;
        }
        if is_root && op == ReduceOp::Avg {
            finish_avg(dtype, work, n);
        }
        Ok(())
    }

    pub fn all_gather_bytes(&mut self, buf: &mut [u8], dtype: DType) -> Result<()> {
        let total = check_buf(OpKind::AllGather, buf, dtype)? as usize;
        let per_rank = self.per_rank(OpKind::AllGather, total)?;
        let desc = OpDesc {
            kind: OpKind::AllGather,
            dtype,
            reduce: None,
            count: per_rank as u64,
            root: 0,
        };
        let chunking = self.chunking(total, dtype);
        self.run(desc, buf.len(), AlgoName::Ring, |t, ctx| {
            algo::ring::all_gather_phase(t, ctx, buf, chunking)
        })
    }

    pub fn reduce_scatter_bytes(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let total = check_buf(OpKind::ReduceScatter, buf, dtype)? as usize;
        let per_rank = self.per_rank(OpKind::ReduceScatter, total)?;
        let desc = OpDesc {
            kind: OpKind::ReduceScatter,
            dtype,
            reduce: Some(op),
            count: per_rank as u64,
            root: 0,
        };
        let chunking = self.chunking(total, dtype);
        let n = self.size();
        self.run(desc, buf.len(), AlgoName::Ring, |t, ctx| {
            algo::ring::reduce_scatter_phase(t, ctx, buf, chunking, op)
        })?;
        if op == ReduceOp::Avg {
            let block = per_rank * dtype.size();
            finish_avg(dtype, &mut buf[self.rank * block..(self.rank + 1) * block], n);
        }
        Ok(())
    }

    pub fn all_to_all_bytes(&mut self, send: &[u8], recv: &mut [u8], dtype: DType) -> Result<()> {
        let total = check_buf(OpKind::AllToAll, recv, dtype)? as usize;
        if send.len() != recv.len() {
            return Err(invalid(
                OpKind::AllToAll,
                format!("send has {} bytes but recv has {}", send.len(), recv.len()),
            ));
        }
        let per_rank = self.per_rank(OpKind::AllToAll, total)?;
        let desc = OpDesc {
            kind: OpKind::AllToAll,
            dtype,
            reduce: None,
            count: per_rank as u64,
            root: 0,
        };
        let block = per_rank * dtype.size();
        self.run(desc, send.len(), AlgoName::Pairwise, |t, ctx| {
            algo::alltoall::all_to_all(t, ctx, send, recv, block)
        })
    }

    // ----- groups -----------------------------------------------------------------------------

    /// Split into sub-communicators: ranks passing the same `color` form a group, ordered by
    /// (`key`, current rank); `None` opts out. Collective over this communicator.
    pub fn split(&mut self, color: Option<u32>, key: u32) -> Result<Option<Communicator>> {
        let Some(fabric) = self.fabric.clone() else {
            return Err(CommError::Setup(
                "this communicator has no fabric to create groups from".into(),
            ));
        };
        let mine = [color.map_or(-1, i64::from), i64::from(key)];
        let mut all = vec![0i64; 2 * self.size()];
        self.with_options(CallOptions::default(), |c| c.all_gather(&mine, &mut all))?;
        self.splits += 1;
        let Some(color) = color else { return Ok(None) };
        let mut group: Vec<(i64, usize)> = (0..self.size())
            .filter(|&r| all[2 * r] == i64::from(color))
            .map(|r| (all[2 * r + 1], r))
            .collect();
        group.sort();
        let members = group.iter().map(|&(_, r)| self.members[r]).collect();
        let name = format!("{}/split{}-c{}", self.name, self.splits, color);
        Ok(Some(fabric.group(&name, members)?))
    }

    // ----- internals --------------------------------------------------------------------------

    fn pick_tree(&self, bytes: usize) -> bool {
        match self.algorithm {
            Algorithm::Auto => bytes <= self.small_message_bytes,
            Algorithm::Tree => true,
            Algorithm::Ring => false,
        }
    }

    fn chunking(&self, count: usize, dtype: DType) -> Chunking {
        Chunking {
            count,
            elem: dtype.size(),
            segment_bytes: self.segment_bytes,
        }
    }

    fn check_root(&self, op: OpKind, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(invalid(
                op,
                format!("root {root} is not a rank of this {}-rank group", self.size()),
            ));
        }
        Ok(())
    }

    fn per_rank(&self, op: OpKind, total: usize) -> Result<usize> {
        if !total.is_multiple_of(self.size()) {
            return Err(invalid(
                op,
                format!("{total} elements do not split evenly over {} ranks", self.size()),
            ));
        }
        Ok(total / self.size())
    }

    fn exchange_deadline(&self, started: Instant) -> Instant {
        // Leave a tenth of the budget to learn the real culprit from the other ranks.
        started + (self.timeout - self.timeout / 10)
    }

    fn run(
        &mut self,
        desc: OpDesc,
        bytes: usize,
        algorithm: AlgoName,
        f: impl FnOnce(&mut dyn Transport, &OpCtx) -> std::result::Result<(), ExchangeError>,
    ) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(CommError::Broken(why.clone()));
        }
        self.seq += 1;
        let started = Instant::now();
        let ctx = OpCtx {
            desc,
            seq: self.seq,
            started,
            deadline: self.exchange_deadline(started),
        };
        self.recorder.start(OpStart {
            seq: ctx.seq,
            op: desc.kind,
            dtype: desc.dtype,
            bytes: bytes as u64,
            peers: Peers::Group,
            algorithm,
            started,
        });
        let result = self.transport.begin(&ctx).and_then(|()| f(&mut *self.transport, &ctx));
        self.conclude(&ctx, result)
    }

    fn p2p(
        &mut self,
        send: Option<(&[u8], usize)>,
        recv: Option<(&mut [u8], usize)>,
        dtype: DType,
        tag: u32,
    ) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(CommError::Broken(why.clone()));
        }
        for peer in send.as_ref().map(|s| s.1).into_iter().chain(recv.as_ref().map(|r| r.1)) {
            if peer >= self.size() || peer == self.rank {
                return Err(invalid(
                    OpKind::SendRecv,
                    format!("peer {peer} is not another rank of this {}-rank group", self.size()),
                ));
            }
        }
        let desc_for = |bytes: usize| OpDesc {
            kind: OpKind::SendRecv,
            dtype,
            reduce: None,
            count: (bytes / dtype.size()) as u64,
            root: tag,
        };
        if let Some((b, _)) = &send {
            check_buf(OpKind::SendRecv, b, dtype)?;
        }
        if let Some((b, _)) = &recv {
            check_buf(OpKind::SendRecv, b, dtype)?;
        }
        let send_part = send.map(|(data, peer)| {
            self.p2p_sent[peer] += 1;
            SendPart {
                peer,
                desc: desc_for(data.len()),
                seq: self.p2p_sent[peer],
                step: 0,
                data,
            }
        });
        let recv_part = recv.map(|(data, peer)| {
            self.p2p_received[peer] += 1;
            crate::transport::RecvPart {
                peer,
                desc: desc_for(data.len()),
                seq: self.p2p_received[peer],
                step: 0,
                sink: RecvSink::Copy(data),
            }
        });
        let peers = Peers::P2p {
            send: send_part.as_ref().map(|s| self.members[s.peer]),
            recv: recv_part.as_ref().map(|r| self.members[r.peer]),
        };
        let bytes = send_part.as_ref().map_or(0, |s| s.data.len())
            + recv_part.as_ref().map_or(0, |r| r.desc.count as usize * dtype.size());
        let seq = send_part
            .as_ref()
            .map(|s| s.seq)
            .or(recv_part.as_ref().map(|r| r.seq))
            .unwrap_or(0);
        let desc = send_part
            .as_ref()
            .map(|s| s.desc)
            .or(recv_part.as_ref().map(|r| r.desc))
            .unwrap_or(desc_for(0));
        let started = Instant::now();
        let ctx = OpCtx {
            desc,
            seq,
            started,
            deadline: self.exchange_deadline(started),
        };
        self.recorder.start(OpStart {
            seq,
            op: OpKind::SendRecv,
            dtype,
            bytes: bytes as u64,
            peers,
            algorithm: AlgoName::P2p,
            started,
        });
        let result = self.transport.exchange(&ctx, send_part, recv_part);
        self.conclude(&ctx, result)
    }

    fn conclude(&mut self, ctx: &OpCtx, result: std::result::Result<(), ExchangeError>) -> Result<()> {
        match result {
            Ok(()) => {
                self.recorder.finish(ctx.seq, ctx.desc.kind, None);
                Ok(())
            }
            Err(e) => {
                let ended = Instant::now();
                let err = self.attribute(ctx, e);
                self.recorder
                    .finish_at(ctx.seq, ctx.desc.kind, ended, Some(err.to_string()));
                self.broken = Some(err.to_string());
                if let Some(f) = &self.fabric {
                    match f.recorders().dump(self.recorder.recorder()) {
                        Ok(path) => tracing::error!(
                            rank = self.members[self.rank],
                            "{err}; flight recorder dumped to {}",
                            path.display()
                        ),
                        Err(e) => tracing::error!("{err}; flight recorder dump failed: {e}"),
                    }
                }
                Err(err)
            }
        }
    }
}

fn same_len(op: OpKind, send: usize, recv: usize) -> Result<()> {
    if send != recv {
        return Err(invalid(op, format!("send has {send} elements but recv has {recv}")));
    }
    Ok(())
}

/// Checks length and alignment of a raw buffer; returns its element count.
fn check_buf(op: OpKind, buf: &[u8], dtype: DType) -> Result<u64> {
    let size = dtype.size();
    if !buf.len().is_multiple_of(size) {
        return Err(invalid(
            op,
            format!("{} bytes is not a whole number of {dtype} elements", buf.len()),
        ));
    }
    if !(buf.as_ptr() as usize).is_multiple_of(size) {
        return Err(invalid(
            op,
            format!("buffer is not aligned to {size} bytes for {dtype}"),
        ));
    }
    Ok((buf.len() / size) as u64)
}
