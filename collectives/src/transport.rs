//! The [`Transport`] trait the algorithms are written against, and [`MeshTransport`], its one
//! implementation over per-peer [`Link`]s.
//!
//! The whole data plane goes through one primitive, [`Transport::exchange`]: send one message
//! to a peer while receiving one from a (possibly different) peer, driven together so that
//! rings and pairwise exchanges never deadlock on full buffers. The receive side either copies
//! into the destination or reduces into it as bytes arrive, so a pipelined ring overlaps the
//! transfer of one segment with the reduction of the previous one without extra buffers.

use crate::dtype::ReduceOp;
use crate::error::LinkError;
use crate::header::{HEADER_LEN, Header, OpDesc};
use crate::link::{Interest, Link, LinkKind};
use crate::reduce::reduce_bytes;
use crate::shm::GroupSegment;
use idle::{Idle, MAX_SLEEP, Waiter};
use shared::GroupState;
use std::time::{Duration, Instant};
pub use wait::{OWN_CORE_SPIN, WaitPolicy};

mod idle;
mod shared;
mod wait;

/// Deadline and identity of the operation an exchange belongs to (for errors).
#[derive(Clone, Copy, Debug)]
pub struct OpCtx {
    pub desc: OpDesc,
    pub seq: u64,
    pub started: Instant,
    pub deadline: Instant,
}

impl OpCtx {
    pub fn send<'a>(&self, peer: usize, step: u32, data: &'a [u8]) -> SendPart<'a> {
        SendPart {
            peer,
            desc: self.desc,
            seq: self.seq,
            step,
            data,
        }
    }
    pub fn recv<'a>(&self, peer: usize, step: u32, sink: RecvSink<'a>) -> RecvPart<'a> {
        RecvPart {
            peer,
            desc: self.desc,
            seq: self.seq,
            step,
            sink,
        }
    }
}

/// One outgoing message: the header is built from `desc`, `seq`, `step` and `data.len()`.
pub struct SendPart<'a> {
    pub peer: usize,
    pub desc: OpDesc,
    pub seq: u64,
    pub step: u32,
    pub data: &'a [u8],
}

/// One expected incoming message; its header must match `desc`, `seq`, `step` and the sink's
/// length, or the exchange fails with a mismatch.
pub struct RecvPart<'a> {
    pub peer: usize,
    pub desc: OpDesc,
    pub seq: u64,
    pub step: u32,
    pub sink: RecvSink<'a>,
}

/// Where received payload bytes go.
pub enum RecvSink<'a> {
    Copy(&'a mut [u8]),
    /// `dst ⊕= payload`, element-wise in `desc.dtype`.
    Reduce {
        dst: &'a mut [u8],
        op: ReduceOp,
    },
}

impl RecvSink<'_> {
    fn len(&self) -> usize {
        match self {
            RecvSink::Copy(d) | RecvSink::Reduce { dst: d, .. } => d.len(),
        }
    }
}

/// Why an exchange failed. `peer` is the group-local index of the peer involved; the
/// communicator turns it into a global rank and a [`crate::CommError`].
#[derive(Debug)]
pub struct ExchangeError {
    pub peer: usize,
    pub kind: ExchangeErrorKind,
}

#[derive(Debug)]
pub enum ExchangeErrorKind {
    /// Deadline passed. `entered` tells whether the peer had sent anything for this operation
    /// (if not, it probably never entered it: it is the one to blame).
    Timeout {
        entered: bool,
        detail: String,
    },
    Link(LinkError),
    Mismatch {
        remote: Header,
        expected: Header,
    },
    Protocol(String),
    Connect(LinkError),
}

/// What [`Transport::post_shared`] hands each member's post to: `(buf, rank, post)`.
pub type Combine<'a> = dyn FnMut(&mut [u8], usize, &[u8]) + 'a;

/// The primitive the algorithms use. `rank`/`size` are positions within the group.
pub trait Transport: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Send and receive concurrently; returns when both are complete.
    fn exchange(
        &mut self,
        ctx: &OpCtx,
        send: Option<SendPart<'_>>,
        recv: Option<RecvPart<'_>>,
    ) -> Result<(), ExchangeError>;
    /// Tell every connected peer we are giving up (best effort).
    fn abort(&mut self, culprit: Option<usize>, reason: &str);
    /// The kind of link used to reach `peer`, if connected (for reports).
    fn link_kind(&self, peer: usize) -> Option<LinkKind>;
    /// This rank enters the collective `ctx`: tell the peers that can see it (the group
    /// segment's announcement), so that ranks stuck in different collectives find out. The
    /// first call maps the group segment, if the group has one.
    fn begin(&mut self, _ctx: &OpCtx) -> Result<(), ExchangeError> {
        Ok(())
    }
    /// The most bytes one [`post_shared`](Transport::post_shared) takes: the slot size of the
    /// group's shared segment, 0 when it has none (members on several hosts, or not over
    /// shared memory). Every member gets the same answer. The first call maps the segment,
    /// within `timeout` (later calls read no clock: they are on every small all_reduce's path).
    fn shared_slot_bytes(&mut self, _timeout: Duration) -> Result<usize, ExchangeError> {
        Ok(0)
    }
    /// Post `buf` (at most [`shared_slot_bytes`](Transport::shared_slot_bytes)) into the
    /// group's shared segment, wait until every member has posted, then hand each member's
    /// post to `combine(buf, rank, post)` in rank order (this rank's own included).
    fn post_shared(&mut self, ctx: &OpCtx, buf: &mut [u8], _combine: &mut Combine<'_>) -> Result<(), ExchangeError> {
        Err(shared::no_segment(self.rank(), ctx, buf.len()))
    }
}

/// Makes the link to a peer the first time an exchange needs it. Both sides of a pair reach
/// for the link at the same point of the same collective, so lazy connection is symmetric.
pub trait LinkConnector: Send {
    fn connect(&mut self, peer: usize, deadline: Instant) -> Result<Box<dyn Link>, LinkError>;
    /// Map the group segment every member shares, if they are all on this host and talk over
    /// shared memory; `None` otherwise (the same answer on every member). Called once.
    fn connect_group(&mut self, _deadline: Instant) -> Result<Option<GroupSegment>, LinkError> {
        Ok(None)
    }
}

/// Payloads are padded to a multiple of this in the stream, so every header and payload
/// starts 8-byte aligned in ring memory and read buffers: reductions then read elements in
/// place instead of bouncing through an aligned copy.
const STREAM_ALIGN: usize = 8;
const ZERO_PAD: [u8; STREAM_ALIGN] = [0; STREAM_ALIGN];

fn pad_len(len: usize) -> usize {
    (STREAM_ALIGN - len % STREAM_ALIGN) % STREAM_ALIGN
}

/// Messages up to this size are written header and payload in one call (copied into a
/// coalescing buffer first, except on shared memory, whose ring takes the parts in one publish
/// through `try_write_frame`), and read whole from links whose `try_read_with` lends their own
/// memory (shared memory, TCP's read buffer; the default implementation would stage every read
/// through a 64 KiB stack buffer).
const COALESCE_BYTES: usize = 16 * 1024;

pub struct MeshTransport {
    rank: usize,
    size: usize,
    links: Vec<Option<Box<dyn Link>>>,
    connector: Box<dyn LinkConnector>,
    coalesce: Vec<u8>,
    waiter: Waiter,
    group: GroupState,
}

impl MeshTransport {
    pub fn new(rank: usize, size: usize, connector: Box<dyn LinkConnector>, wait: WaitPolicy) -> MeshTransport {
        MeshTransport {
            rank,
            size,
            links: (0..size).map(|_| None).collect(),
            connector,
            coalesce: Vec::new(),
            waiter: Waiter::new(wait),
            group: GroupState::Unknown,
        }
    }

    fn ensure_link(&mut self, peer: usize, deadline: Instant) -> Result<(), ExchangeError> {
        assert!(
            peer < self.size && peer != self.rank,
            "exchange with invalid peer {peer}"
        );
        if self.links[peer].is_none() {
            let link = self.connector.connect(peer, deadline).map_err(|e| ExchangeError {
                peer,
                kind: ExchangeErrorKind::Connect(e),
            })?;
            self.links[peer] = Some(link);
        }
        Ok(())
    }

    fn link(&mut self, peer: usize) -> &mut dyn Link {
        self.links[peer].as_deref_mut().expect("link connected before use")
    }
}

struct TxState<'a> {
    peer: usize,
    header: [u8; HEADER_LEN],
    data: &'a [u8],
    /// Position in header ++ data.
    pos: usize,
    coalesced: bool,
}

impl<'a> TxState<'a> {
    /// Messages up to [`COALESCE_BYTES`] go out in one write from the coalescing buffer where
    /// `coalesce` (every link but shared memory, whose ring takes the parts in one publish);
    /// the rest are written in place, header, payload and padding handed to the link together.
    fn new(s: SendPart<'a>, coalesce: bool) -> TxState<'a> {
        let header = Header {
            desc: s.desc,
            seq: s.seq,
            step: s.step,
            len: s.data.len() as u64,
        }
        .encode();
        TxState {
            peer: s.peer,
            header,
            data: s.data,
            pos: 0,
            coalesced: coalesce && s.data.len() <= COALESCE_BYTES,
        }
    }
    fn total(&self) -> usize {
        HEADER_LEN + self.data.len() + pad_len(self.data.len())
    }

    /// What is left to write of header ++ data ++ padding, as three parts (some empty).
    fn remaining(&self) -> [&[u8]; 3] {
        let (h, d) = (HEADER_LEN, self.data.len());
        let pad = &ZERO_PAD[..pad_len(d)];
        let header = &self.header[self.pos.min(h)..];
        [
            header,
            &self.data[self.pos.clamp(h, h + d) - h..],
            &pad[self.pos.max(h + d) - h - d..],
        ]
    }
    fn done(&self) -> bool {
        self.pos == self.total()
    }
}

struct RxState<'a> {
    peer: usize,
    expect: Header,
    hdr: [u8; HEADER_LEN],
    hdr_got: usize,
    sink: RecvSink<'a>,
    off: usize,
    /// Bytes of a partially received element (links are byte streams).
    carry: [u8; 8],
    carry_len: usize,
    /// Padding bytes after the payload still to skip.
    pad_left: usize,
    /// Read header, payload and padding in one link call ([`RxState::absorb`]).
    whole: bool,
    /// A header that failed its check inside [`RxState::absorb`].
    failed: Option<ExchangeError>,
}

impl<'a> RxState<'a> {
    /// The header expected is the one the sender builds for this step and the sink's length.
    fn new(r: RecvPart<'a>) -> RxState<'a> {
        RxState {
            pad_left: pad_len(r.sink.len()),
            peer: r.peer,
            expect: Header {
                desc: r.desc,
                seq: r.seq,
                step: r.step,
                len: r.sink.len() as u64,
            },
            hdr: [0; HEADER_LEN],
            hdr_got: 0,
            sink: r.sink,
            off: 0,
            carry: [0; 8],
            carry_len: 0,
            whole: false,
            failed: None,
        }
    }
    fn done(&self) -> bool {
        self.hdr_got == HEADER_LEN && self.off == self.sink.len() && self.pad_left == 0
    }

    fn is_reduce(&self) -> bool {
        matches!(self.sink, RecvSink::Reduce { .. })
    }

    /// Bytes of the whole frame: header, payload and padding.
    fn frame(&self) -> usize {
        HEADER_LEN + self.sink.len() + pad_len(self.sink.len())
    }

    /// Bytes of header, payload and padding still to come.
    fn left(&self) -> usize {
        (HEADER_LEN - self.hdr_got) + (self.sink.len() - self.off - self.carry_len) + self.pad_left
    }

    /// Take the next bytes of the message, at most [`RxState::left`]: header (checked once
    /// whole; a bad one is kept in `failed` and the rest dropped), then payload, then padding.
    fn absorb(&mut self, mut bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.hdr_got < HEADER_LEN {
            let take = (HEADER_LEN - self.hdr_got).min(bytes.len());
            self.hdr[self.hdr_got..self.hdr_got + take].copy_from_slice(&bytes[..take]);
            self.hdr_got += take;
            bytes = &bytes[take..];
            if self.hdr_got < HEADER_LEN {
                return;
            }
            if let Err(e) = check_header(self) {
                self.failed = Some(e);
                return;
            }
        }
        let want = self.sink.len() - self.off - self.carry_len;
        let (payload, pad) = bytes.split_at(want.min(bytes.len()));
        if !payload.is_empty() {
            self.payload(payload);
        }
        self.pad_left -= pad.len();
    }

    /// Copy or reduce payload bytes into the sink; a partial element waits in `carry`.
    fn payload(&mut self, mut bytes: &[u8]) {
        let (dst, op) = match &mut self.sink {
            RecvSink::Copy(dst) => {
                dst[self.off..self.off + bytes.len()].copy_from_slice(bytes);
                self.off += bytes.len();
                return;
            }
            RecvSink::Reduce { dst, op } => (dst, *op),
        };
        let dtype = self.expect.desc.dtype;
        let elem = dtype.size();
        let (off, carry, carry_len) = (&mut self.off, &mut self.carry, &mut self.carry_len);
        if *carry_len > 0 {
            let take = (elem - *carry_len).min(bytes.len());
            carry[*carry_len..*carry_len + take].copy_from_slice(&bytes[..take]);
            *carry_len += take;
            bytes = &bytes[take..];
            if *carry_len == elem {
                reduce_bytes(dtype, op, &mut dst[*off..*off + elem], &carry[..elem]);
                *off += elem;
                *carry_len = 0;
            }
        }
        let whole = bytes.len() / elem * elem;
        if whole > 0 {
            reduce_bytes(dtype, op, &mut dst[*off..*off + whole], &bytes[..whole]);
            *off += whole;
        }
        let rest = &bytes[whole..];
        carry[*carry_len..*carry_len + rest.len()].copy_from_slice(rest);
        *carry_len += rest.len();
    }
}

fn link_err(peer: usize) -> impl Fn(LinkError) -> ExchangeError {
    move |e| ExchangeError {
        peer,
        kind: ExchangeErrorKind::Link(e),
    }
}

impl Transport for MeshTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn link_kind(&self, peer: usize) -> Option<LinkKind> {
        self.links.get(peer)?.as_ref().map(|l| l.kind())
    }

    fn abort(&mut self, culprit: Option<usize>, reason: &str) {
        for link in self.links.iter_mut().flatten() {
            link.abort(culprit, reason);
        }
        if let GroupState::Mapped(segment) = &self.group {
            segment.abort(culprit, reason);
        }
    }

    fn begin(&mut self, ctx: &OpCtx) -> Result<(), ExchangeError> {
        self.group_slot_bytes(|| ctx.deadline)?;
        self.announce(ctx);
        Ok(())
    }

    fn shared_slot_bytes(&mut self, timeout: Duration) -> Result<usize, ExchangeError> {
        self.group_slot_bytes(|| Instant::now() + timeout)
    }

    fn post_shared(&mut self, ctx: &OpCtx, buf: &mut [u8], combine: &mut Combine<'_>) -> Result<(), ExchangeError> {
        self.post_to_group(ctx, buf, combine)
    }

    fn exchange(
        &mut self,
        ctx: &OpCtx,
        send: Option<SendPart<'_>>,
        recv: Option<RecvPart<'_>>,
    ) -> Result<(), ExchangeError> {
        if let Some(s) = &send {
            self.ensure_link(s.peer, ctx.deadline)?;
        }
        if let Some(r) = &recv {
            self.ensure_link(r.peer, ctx.deadline)?;
        }
        let tx = send.map(|s| {
            let coalesce = self.link_kind(s.peer) != Some(LinkKind::Shm);
            TxState::new(s, coalesce)
        });
        if let Some(t) = tx.as_ref().filter(|t| t.coalesced) {
            self.coalesce.clear();
            self.coalesce.extend_from_slice(&t.header);
            self.coalesce.extend_from_slice(t.data);
            self.coalesce.extend_from_slice(&ZERO_PAD[..pad_len(t.data.len())]);
        }
        self.run(ctx, tx, recv.map(RxState::new))
    }
}

impl MeshTransport {
    /// Drive `tx` and `rx` (links connected) until both are done, waiting as the policy says.
    fn run(
        &mut self,
        ctx: &OpCtx,
        mut tx: Option<TxState<'_>>,
        mut rx: Option<RxState<'_>>,
    ) -> Result<(), ExchangeError> {
        if let Some(r) = rx.as_mut() {
            let kind = self.links[r.peer].as_ref().map(|l| l.kind());
            r.whole = r.sink.len() <= COALESCE_BYTES && matches!(kind, Some(LinkKind::Shm | LinkKind::Tcp));
        }
        let mut idle = Idle::new();
        loop {
            let mut progressed = false;
            if let Some(t) = tx.as_mut().filter(|t| !t.done()) {
                progressed |= progress_tx(self.links[t.peer].as_deref_mut().unwrap(), t, &self.coalesce)?;
            }
            if let Some(r) = rx.as_mut().filter(|r| !r.done()) {
                progressed |= progress_rx(self.links[r.peer].as_deref_mut().unwrap(), r)?;
            }
            let tx_pending = tx.as_ref().filter(|t| !t.done());
            let rx_pending = rx.as_ref().filter(|r| !r.done());
            if tx_pending.is_none() && rx_pending.is_none() {
                return Ok(());
            }
            if progressed {
                self.waiter.progressed(&mut idle);
                continue;
            }
            if idle.spin_unclocked() {
                continue;
            }
            let now = Instant::now();
            if now >= ctx.deadline {
                return Err(timeout_error(ctx, tx_pending, rx_pending));
            }
            let (tx_peer, rx_peer) = (tx_pending.map(|t| t.peer), rx_pending.map(|r| r.peer));
            self.back_off(ctx, now, &mut idle, tx_peer, rx_peer)?;
        }
    }
}

impl MeshTransport {
    /// Wait once for the pending peers, as [`WaitPolicy`] says: spin, then yield, then sleep on
    /// the links, checking between sleeps that the peers are alive, so a dead peer fails the
    /// exchange well before its deadline.
    fn back_off(
        &mut self,
        ctx: &OpCtx,
        now: Instant,
        idle: &mut Idle,
        tx_peer: Option<usize>,
        rx_peer: Option<usize>,
    ) -> Result<(), ExchangeError> {
        if !self.waiter.climb(now, idle) {
            return Ok(());
        }
        if idle.liveness_due(now) {
            self.check_alive(tx_peer, rx_peer)?;
            for peer in [tx_peer, rx_peer].into_iter().flatten() {
                self.check_announced(ctx, peer)?;
            }
        }
        let sleep = (ctx.deadline - now).min(MAX_SLEEP);
        self.wait_for(tx_peer, rx_peer, sleep);
        Ok(())
    }

    /// Fail with [`LinkError::PeerDied`] naming the first pending peer whose process is gone.
    fn check_alive(&mut self, tx_peer: Option<usize>, rx_peer: Option<usize>) -> Result<(), ExchangeError> {
        for peer in [tx_peer, rx_peer].into_iter().flatten() {
            if !self.link(peer).peer_alive() {
                return Err(ExchangeError {
                    peer,
                    kind: ExchangeErrorKind::Link(LinkError::PeerDied),
                });
            }
        }
        Ok(())
    }

    /// Sleep until one of the pending links may progress. Links with file descriptors are polled
    /// together; otherwise the receive side is waited on in short slices (the send side is
    /// re-tried between slices).
    fn wait_for(&mut self, tx_peer: Option<usize>, rx_peer: Option<usize>, timeout: Duration) {
        match (tx_peer, rx_peer) {
            (Some(t), Some(r)) if t == r => self.link(t).wait(
                Interest {
                    read: true,
                    write: true,
                },
                timeout,
            ),
            (Some(t), None) => self.link(t).wait(
                Interest {
                    read: false,
                    write: true,
                },
                timeout,
            ),
            (None, Some(r)) => self.link(r).wait(
                Interest {
                    read: true,
                    write: false,
                },
                timeout,
            ),
            (Some(t), Some(r)) => {
                let fds = (self.link(t).poll_fd(), self.link(r).poll_fd());
                if let (Some(tfd), Some(rfd)) = fds {
                    let mut pfds = [
                        libc::pollfd {
                            fd: tfd,
                            events: libc::POLLOUT,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: rfd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
                    // SAFETY: `pfds` is a valid array of two pollfd structs for the call's duration.
                    unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
                } else {
                    let slice = timeout.min(Duration::from_micros(200));
                    self.link(r).wait(
                        Interest {
                            read: true,
                            write: false,
                        },
                        slice,
                    );
                }
            }
            (None, None) => {}
        }
    }
}

fn progress_tx(link: &mut dyn Link, t: &mut TxState<'_>, coalesce: &[u8]) -> Result<bool, ExchangeError> {
    let mut progressed = false;
    while !t.done() {
        let n = if t.coalesced {
            link.try_write(&coalesce[t.pos..])
        } else {
            link.try_write_frame(t.total(), &t.remaining())
        }
        .map_err(link_err(t.peer))?;
        if n == 0 {
            break;
        }
        t.pos += n;
        progressed = true;
    }
    Ok(progressed)
}

/// Receive what the link has of `r`'s message. A small message on a link that lends its own
/// memory is taken whole, one call per batch of bytes (header, payload and padding together:
/// on shared memory one position update instead of three). Otherwise the header, then the
/// payload (a copy straight into the destination, which TCP reads from the socket without
/// staging when large; a reduction from the link's memory), then the padding.
fn progress_rx(link: &mut dyn Link, r: &mut RxState<'_>) -> Result<bool, ExchangeError> {
    let peer = r.peer;
    let mut progressed = false;
    while !r.done() {
        let n = if r.whole || (r.hdr_got == HEADER_LEN && r.off < r.sink.len() && r.is_reduce()) {
            // Whole: everything left; a reduction: the payload only (the header is in).
            let n = if r.whole {
                let (frame, max) = (r.frame(), r.left());
                link.try_read_frame(frame, max, &mut |b| r.absorb(b))
            } else {
                link.try_read_with(r.left() - r.pad_left, &mut |b| r.absorb(b))
            }
            .map_err(link_err(peer))?;
            if let Some(e) = r.failed.take() {
                return Err(e);
            }
            n
        } else if r.hdr_got < HEADER_LEN {
            let n = link.try_read_into(&mut r.hdr[r.hdr_got..]).map_err(link_err(peer))?;
            r.hdr_got += n;
            if r.hdr_got == HEADER_LEN {
                check_header(r)?;
            }
            n
        } else if let (true, RecvSink::Copy(dst)) = (r.off < r.sink.len(), &mut r.sink) {
            let n = link.try_read_into(&mut dst[r.off..]).map_err(link_err(peer))?;
            r.off += n;
            n
        } else {
            let mut skip = [0u8; STREAM_ALIGN];
            let n = link.try_read_into(&mut skip[..r.pad_left]).map_err(link_err(peer))?;
            r.pad_left -= n;
            n
        };
        if n == 0 {
            break;
        }
        progressed = true;
    }
    Ok(progressed)
}

fn check_header(r: &RxState<'_>) -> Result<(), ExchangeError> {
    let got = Header::decode(&r.hdr).map_err(|m| ExchangeError {
        peer: r.peer,
        kind: ExchangeErrorKind::Protocol(m),
    })?;
    if got != r.expect {
        return Err(ExchangeError {
            peer: r.peer,
            kind: ExchangeErrorKind::Mismatch {
                remote: got,
                expected: r.expect,
            },
        });
    }
    Ok(())
}

fn timeout_error(ctx: &OpCtx, tx: Option<&TxState<'_>>, rx: Option<&RxState<'_>>) -> ExchangeError {
    let waited = ctx.deadline.duration_since(ctx.started);
    match (rx, tx) {
        (Some(r), _) => ExchangeError {
            peer: r.peer,
            kind: ExchangeErrorKind::Timeout {
                entered: r.hdr_got > 0,
                detail: format!(
                    "waited {waited:?} to receive step {} from it; got {} of {} payload bytes{}",
                    r.expect.step,
                    r.off,
                    r.sink.len(),
                    if r.hdr_got == 0 {
                        " and no header (it never sent this step)"
                    } else {
                        ""
                    }
                ),
            },
        },
        (None, Some(t)) => ExchangeError {
            peer: t.peer,
            kind: ExchangeErrorKind::Timeout {
                entered: true,
                detail: format!(
                    "waited {waited:?} for it to accept step data; {} of {} bytes sent",
                    t.pos,
                    t.total()
                ),
            },
        },
        (None, None) => unreachable!("timeout with nothing pending"),
    }
}

#[cfg(test)]
mod tests;
