//! A group segment: one file that every rank of a communicator on this host maps, where each
//! rank posts a small message into a slot of its own and reads everyone's posts. It turns a
//! small all_reduce among `n` local ranks into one round: post, wait until all have posted,
//! reduce the `n` posts in rank order, where pairwise links need ⌈log2 n⌉ dependent rounds
//! and, on ranks that share cores, a context switch per round.
//!
//! ```text
//! offset 0      meta: magic+version, ranks, slot bytes                        (its own line)
//!   +128        wake: `arrivals` (futex word), `sleepers`                     (its own line)
//!   +256        abort note: state, reason length, culprit, reason (256 bytes)
//!   +640        two control lines per rank (256 bytes): pid, closed, posted generation;
//!               the announced collective (sequence number, header)
//! page-aligned  slots, 2 × ranks of them (generation parity major, rank minor), each a
//!               128-byte slot header (the transport header of the post) then `slot bytes`
//! ```
//!
//! Protocol, for generation `g` (the rank's `g`-th post, from 1):
//! - Post: write header and data into slot `[g % 2][me]`, then store `posted = g` (release),
//!   then wake sleepers if any.
//! - Read: once every rank's `posted >= g` (acquire), slot `[g % 2][r]` holds rank `r`'s post.
//! - Why two parities are enough: a rank writes slot `[g % 2]` again at generation `g + 2`,
//!   after finishing `g + 1`, which needs every rank's post of `g + 1`, which each makes only
//!   after it finished reading generation `g`.
//! - Sleeping: a waiter counts itself in `sleepers`, re-checks, then sleeps on `arrivals`; a
//!   poster stores `posted` then reads `sleepers` (both sequentially consistent), and only
//!   when someone sleeps bumps `arrivals` and wakes. The fast path takes no locked
//!   read-modify-write on a shared line.
//! - Every rank also announces the collective it enters (sequence number and header) on its
//!   control line, whatever algorithm runs it: a rank that waits long for a peer (here or on a
//!   link) compares, and ranks that called different collectives, or the same one with
//!   different sizes (which may pick different algorithms), fail with a mismatch that names
//!   both instead of waiting out their deadlines.
//! - Like the ring files: a fresh file is all zeroes, opened symmetrically by every rank;
//!   magic, ranks and slot size are claimed by compare-and-swap and checked; the file is
//!   unlinked as soon as one rank sees every rank's pid, so nothing stays in `/dev/shm`.
//!   Dropping sets the rank's `closed`, and a rank waiting for a post it will never make gets
//!   [`LinkError::Closed`]; an abort posted by any rank reaches every waiter.

use super::file::{AbortNote, REASON_BYTES, SharedFile};
use super::{fnv1a, futex_wait, futex_wake, process_alive};
use crate::error::LinkError;
use crate::header::HEADER_LEN;
use std::path::Path;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, AtomicU32, AtomicU64, fence};
use std::time::Duration;

/// Magic and layout version in one word.
const MAGIC: u64 = u64::from_le_bytes(*b"GNTGRP01");
const LINE: usize = 128;
const SLOT_HEADER: usize = 128;
const PAGE: usize = 4096;
/// Abort tags: 0 none, 1 being posted, `ABORT_BY_RANK + r` posted by rank `r`.
const ABORT_BY_RANK: u32 = 2;

#[repr(C, align(128))]
struct Meta {
    magic: AtomicU64,
    ranks: AtomicU64,
    slot_bytes: AtomicU64,
}

#[repr(C, align(128))]
struct Wake {
    arrivals: AtomicU32,
    sleepers: AtomicU32,
}

#[repr(C, align(128))]
struct Abort {
    state: AtomicU32,
    reason_len: AtomicU32,
    culprit: AtomicI64,
    reason: [AtomicU8; REASON_BYTES],
}

#[repr(C)]
struct Header {
    meta: Meta,
    wake: Wake,
    abort: Abort,
}

/// One rank's lines: written only by that rank.
#[repr(C, align(128))]
struct Control {
    pid: AtomicI32,
    closed: AtomicU32,
    posted: AtomicU64,
    announced: Announcement,
}

/// The collective a rank is in (its sequence number; 0 while `op` is being written) and its
/// encoded header: a seqlock, read only by peers that have waited on this rank for long. On
/// a line of its own: written every collective, it would otherwise take `posted`'s line away
/// from the peers polling it.
#[repr(C, align(128))]
struct Announcement {
    op_seq: AtomicU64,
    /// The header's bytes, eight to a word (little-endian).
    op: [AtomicU64; HEADER_LEN / 8],
}

const CONTROL_OFFSET: usize = size_of::<Header>();
/// Bytes of one rank's control lines.
const CONTROL: usize = 2 * LINE;
const _: () = assert!(CONTROL_OFFSET == 640);
const _: () = assert!(size_of::<Control>() == CONTROL);
const _: () = assert!(HEADER_LEN <= SLOT_HEADER && HEADER_LEN.is_multiple_of(8));

/// Name of the group segment file of communicator `comm_key`.
pub fn group_file_name(session: &str, comm_key: &str) -> String {
    format!("gantry-{session}-{:016x}-group", fnv1a(comm_key))
}

/// This rank's mapping of its communicator's group segment.
pub struct GroupSegment {
    file: SharedFile,
    me: usize,
    ranks: usize,
    slot_bytes: usize,
    data_offset: usize,
    /// Generations posted so far.
    generation: u64,
    /// Every rank has mapped the file, and it has been unlinked.
    attached: bool,
    /// This rank recorded its pid: only then does dropping mark it closed (a file refused at
    /// open, of another shape or stale, is left as it was).
    joined: bool,
}

impl GroupSegment {
    /// Map the segment of `ranks` ranks with slots of `slot_bytes` (rounded up to 128) as rank
    /// `me`. Every rank calls this with the same `dir`, `session`, `comm_key`, `ranks` and
    /// `slot_bytes`, in any order; nobody waits for the others here.
    pub fn open(
        dir: &Path,
        session: &str,
        comm_key: &str,
        me: usize,
        ranks: usize,
        slot_bytes: usize,
    ) -> Result<GroupSegment, LinkError> {
        if me >= ranks || slot_bytes == 0 || session.contains(['/', '\0']) {
            let msg = format!("bad group segment: rank {me} of {ranks}, {slot_bytes}-byte slots, session {session:?}");
            return Err(LinkError::Protocol(msg));
        }
        let layout = || -> Option<(usize, usize, usize)> {
            let slot = slot_bytes.checked_next_multiple_of(LINE)?;
            let data = (CONTROL_OFFSET.checked_add(ranks.checked_mul(CONTROL)?)?).checked_next_multiple_of(PAGE)?;
            let slots = ranks.checked_mul(2)?.checked_mul(slot.checked_add(SLOT_HEADER)?)?;
            Some((slot, data, data.checked_add(slots)?.checked_add(PAGE)?))
        };
        let (slot, data_offset, total) = layout()
            .ok_or_else(|| LinkError::Protocol(format!("group segment of {ranks} × {slot_bytes} bytes is too big")))?;
        let path = dir.join(group_file_name(session, comm_key));
        // A file whose slot for us already has a pid was left by an earlier communicator of
        // ours with this name whose peers never came: replace it (once).
        for _ in 0..2 {
            // The spare page at the end stays unused: glibc's posix_fallocate fallback may write
            // a zero byte at the end of each block.
            let file = SharedFile::open(path.clone(), total)?;
            let mut seg = GroupSegment {
                file,
                me,
                ranks,
                slot_bytes: slot,
                data_offset,
                generation: 0,
                attached: false,
                joined: false,
            };
            let m = &seg.header().meta;
            seg.file.claim(&m.magic, MAGIC, "magic")?;
            seg.file.claim(&m.ranks, ranks as u64, "rank count")?;
            seg.file.claim(&m.slot_bytes, slot as u64, "slot size")?;
            if seg.control(me).pid.load(Acquire) != 0 {
                seg.file.unlink();
                continue;
            }
            // SAFETY: getpid has no preconditions.
            seg.control(me).pid.store(unsafe { libc::getpid() }, Release);
            seg.joined = true;
            // With every rank doing the same, the last to get here sees all pids.
            fence(SeqCst);
            seg.poll_attach();
            return Ok(seg);
        }
        Err(LinkError::Protocol(format!(
            "{} is in use by another group",
            path.display()
        )))
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and longer than the header, outlives `&self`, and
        // the header holds only atomics, valid for any bit pattern and shared mutation.
        unsafe { &*(self.file.base() as *const Header) }
    }

    fn control(&self, rank: usize) -> &Control {
        assert!(rank < self.ranks);
        // SAFETY: as `header`; control lines lie between the header and `data_offset`.
        unsafe { &*(self.file.base().add(CONTROL_OFFSET + rank * CONTROL) as *const Control) }
    }

    /// Start of slot `[generation % 2][rank]`: its header, then its data.
    fn slot(&self, generation: u64, rank: usize) -> *mut u8 {
        assert!(rank < self.ranks);
        let index = (generation % 2) as usize * self.ranks + rank;
        let off = self.data_offset + index * (SLOT_HEADER + self.slot_bytes);
        debug_assert!(off + SLOT_HEADER + self.slot_bytes <= self.file.len());
        // SAFETY: `open` sized the file for 2 × ranks slots after `data_offset`.
        unsafe { self.file.base().add(off) }
    }

    fn poll_attach(&mut self) {
        if (0..self.ranks).all(|r| self.control(r).pid.load(Acquire) != 0) {
            self.attached = true;
            self.file.unlink();
        }
    }

    /// The most bytes one post may hold.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Post `data` (at most [`Self::slot_bytes`]) under `header` as this rank's next
    /// generation, which is returned.
    pub fn post(&mut self, header: &[u8; HEADER_LEN], data: &[u8]) -> u64 {
        assert!(
            data.len() <= self.slot_bytes,
            "post of {} bytes into {}-byte slots",
            data.len(),
            self.slot_bytes
        );
        if !self.attached {
            self.poll_attach();
        }
        self.generation += 1;
        let g = self.generation;
        let slot = self.slot(g, self.me);
        // SAFETY: our own slot of this parity; no rank reads it until we publish `posted = g`
        // below, and every rank finished reading it (generation g - 2) before we could get
        // here (see the module docs). Both copies fit: the header in SLOT_HEADER, the data in
        // `slot_bytes`.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), slot, HEADER_LEN);
            std::ptr::copy_nonoverlapping(data.as_ptr(), slot.add(SLOT_HEADER), data.len());
        }
        self.control(self.me).posted.store(g, SeqCst); // see `sleep_until_posted`
        let wake = &self.header().wake;
        if wake.sleepers.load(SeqCst) != 0 {
            wake.arrivals.fetch_add(1, Release);
            futex_wake(&wake.arrivals);
        }
        g
    }

    /// The last generation `rank` has posted.
    pub fn posted_by(&self, rank: usize) -> u64 {
        self.control(rank).posted.load(Acquire)
    }

    /// The first rank at or after `from` that has not posted `generation` yet.
    #[inline]
    pub fn first_missing(&self, generation: u64, from: usize) -> Option<usize> {
        (from..self.ranks).find(|&r| self.posted_by(r) < generation)
    }

    /// The header rank `rank` posted with `generation`; it must have posted it.
    pub fn posted_header(&self, generation: u64, rank: usize) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        // SAFETY: the slot's header is published (the caller saw `posted >= generation` with
        // acquire) and its writer does not touch it again before we post generation + 1.
        unsafe { std::ptr::copy_nonoverlapping(self.slot(generation, rank), out.as_mut_ptr(), HEADER_LEN) };
        out
    }

    /// The first `len` bytes rank `rank` posted with `generation`; it must have posted it.
    pub fn posted_data(&self, generation: u64, rank: usize, len: usize) -> &[u8] {
        assert!(len <= self.slot_bytes);
        // SAFETY: as `posted_header`; the slice lives no longer than `&self`, and we cannot
        // post again (which frees the slot for its writer) while it is borrowed.
        unsafe { std::slice::from_raw_parts(self.slot(generation, rank).add(SLOT_HEADER), len) }
    }

    /// An abort another rank posted, or `Closed` if `rank` dropped its communicator without
    /// posting `generation`.
    pub fn check(&self, generation: u64, rank: usize) -> Result<(), LinkError> {
        let a = &self.header().abort;
        let state = a.state.load(Acquire);
        if state >= ABORT_BY_RANK && state != ABORT_BY_RANK + self.me as u32 {
            return Err(self.abort_note().read());
        }
        let c = self.control(rank);
        if c.closed.load(Acquire) != 0 && c.posted.load(Acquire) < generation {
            return Err(LinkError::Closed);
        }
        Ok(())
    }

    /// Announce that this rank entered collective `seq`, described by `header`.
    pub fn announce(&self, seq: u64, header: &[u8; HEADER_LEN]) {
        let c = &self.control(self.me).announced;
        c.op_seq.store(0, Relaxed);
        fence(Release);
        for (word, bytes) in c.op.iter().zip(header.chunks_exact(8)) {
            word.store(u64::from_le_bytes(bytes.try_into().expect("8 bytes")), Relaxed);
        }
        c.op_seq.store(seq, Release);
    }

    /// The collective `rank` last announced, unless it is announcing one right now.
    pub fn announced(&self, rank: usize) -> Option<(u64, [u8; HEADER_LEN])> {
        let c = &self.control(rank).announced;
        let seq = c.op_seq.load(Acquire);
        let mut header = [0u8; HEADER_LEN];
        for (bytes, word) in header.chunks_exact_mut(8).zip(&c.op) {
            bytes.copy_from_slice(&word.load(Relaxed).to_le_bytes());
        }
        fence(Acquire);
        (seq != 0 && c.op_seq.load(Relaxed) == seq).then_some((seq, header))
    }

    /// Whether `rank`'s process is still there (`true` before it has mapped the file).
    pub fn peer_alive(&self, rank: usize) -> bool {
        process_alive(self.control(rank).pid.load(Acquire))
    }

    /// Sleep for at most `timeout` unless `rank` has posted `generation`, someone aborted or
    /// `rank` closed. No lost wake-up: see the module docs.
    pub fn sleep_until_posted(&self, generation: u64, rank: usize, timeout: Duration) {
        let wake = &self.header().wake;
        wake.sleepers.fetch_add(1, SeqCst);
        let expected = wake.arrivals.load(SeqCst);
        let posted = self.control(rank).posted.load(SeqCst) >= generation;
        if !posted && self.check(generation, rank).is_ok() && !timeout.is_zero() {
            futex_wait(&wake.arrivals, expected, timeout);
        }
        wake.sleepers.fetch_sub(1, SeqCst);
    }

    fn abort_note(&self) -> AbortNote<'_> {
        let a = &self.header().abort;
        AbortNote {
            state: &a.state,
            reason_len: &a.reason_len,
            culprit: &a.culprit,
            reason: &a.reason,
        }
    }

    fn wake_all(&self) {
        let wake = &self.header().wake;
        fence(SeqCst);
        wake.arrivals.fetch_add(1, Release);
        futex_wake(&wake.arrivals);
    }

    /// Tell every rank of the group we give up (the first abort posted wins).
    pub fn abort(&self, culprit: Option<usize>, reason: &str) {
        self.abort_note().post(ABORT_BY_RANK + self.me as u32, culprit, reason);
        self.wake_all();
    }
}

impl Drop for GroupSegment {
    fn drop(&mut self) {
        if self.joined {
            self.control(self.me).closed.store(1, Release);
            self.wake_all();
        }
    }
}

#[cfg(test)]
mod tests;
