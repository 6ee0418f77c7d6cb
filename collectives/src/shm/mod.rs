//! Shared-memory [`Link`] between two processes on the same host.
//!
//! A pair of ranks shares one ring file per direction,
//! `gantry-{session}-{key_hash:016x}-{from}-{to}` under a directory (normally `/dev/shm`),
//! mapped `MAP_SHARED` by both processes. A file holds two single-producer/single-consumer byte
//! rings, its *lanes*: the stream lane of the link's capacity and an 8 KiB small lane
//! (`ring.rs`):
//!
//! ```text
//! offset 0      header page (4096 bytes), all fields atomics
//!   +0          meta: magic+version, capacity, writer/reader pid, aborted, closed, culprit
//!   +128        producer line: stream write_pos (total bytes written), data_seq
//!   +256        consumer line: stream read_pos (total bytes consumed), space_seq
//!   +384        reader_waiting (its own line)
//!   +512        writer_waiting (its own line)
//!   +640        abort reason (256 bytes)
//!   +896        small lane write_pos (its own line)
//!   +1024       small lane read_pos (its own line)
//! offset 4096   stream lane, `capacity` bytes (a power of two), indexed by pos & (capacity-1)
//! then          small lane, 8 KiB, indexed the same way
//! ```
//!
//! Why this shape:
//! - A frame (a transport message: header, payload, padding) of up to 4 KiB takes the small
//!   lane, a larger one the stream lane; both sides pick by the frame's length, which the
//!   reader knows in advance ([`Link::try_write_frame`], [`Link::try_read_frame`]), and each
//!   lane keeps its order. The small lane's lines stay in both cores' caches between
//!   messages, where a 256 KiB ring lands every message on lines last touched a lap ago:
//!   a 1 KiB 2-rank all_reduce went from 0.53 to 0.46 us. A reader that finds its lane empty
//!   and the other one not knows the ranks disagree on a frame, and says so.
//! - Producer- and consumer-written fields sit on separate cache lines (128 bytes apart, so the
//!   adjacent-line prefetcher does not pair them either): no false sharing between processes.
//!   The `*_waiting` flags have lines of their own, written only by a side about to sleep: the
//!   other side reads its flag after every publish, and finds it in its own cache instead of
//!   fetching the line the sleeper's position moves in (a cross-core miss per message).
//! - Each side keeps the last position it read of the other: a writer rereads `read_pos` only
//!   when what it knows of the free space is too little, a reader rereads `write_pos` only when
//!   it has consumed all it knew of, so a message moves no cache line it does not need.
//! - Positions are monotonic 64-bit counters, so "full" and "empty" are never ambiguous and
//!   wrapping is a mask. Each side keeps its own position locally and only *reads* the other's;
//!   a peer value that breaks `0 <= write_pos - read_pos <= capacity` is a
//!   [`LinkError::Protocol`], never used to index memory.
//! - Waiting uses Linux futexes on `data_seq`/`space_seq` (shared, not `FUTEX_PRIVATE_FLAG`).
//!   The `*_waiting` flags keep the fast path free of syscalls unless the other side sleeps.
//! - A fresh file is all zeroes, which is a valid empty ring, so both sides open-or-create it
//!   symmetrically; magic and capacity are claimed by compare-and-swap and checked.
//! - `posix_fallocate` sizes the file, so a full `/dev/shm` is an error at connect time rather
//!   than a `SIGBUS` on first touch. Both sides call it (it is idempotent) before mapping, so
//!   neither can map a file the other created but has not sized yet.
//! - Connecting does not wait for the peer: each side records its pid in both rings after
//!   mapping both files, and whichever side first sees both pids (at the latest the second to
//!   connect) unlinks the files, so nothing leaks in `/dev/shm` even if a process is later
//!   SIGKILLed. A blocking rendezvous would deadlock as soon as ranks connect lazily in a cycle
//!   (each to its right neighbour first, as a ring step does); bytes written before the peer
//!   attaches simply wait in the ring.
//! - Dropping a link sets `closed`: the peer drains what was written, then gets `Closed`. This
//!   holds even if the peer attaches later (the files are left for it, as TCP would deliver);
//!   files of a peer that never comes stay until [`remove_session_files`].
//!
//! Trust: the peer runs as the same user and follows the protocol. A peer that scribbles on the
//! data region can only corrupt the bytes we receive; one that truncates the file can crash us
//! with `SIGBUS` (inherent to shared memory; this code never truncates).

use crate::error::LinkError;
use crate::link::{Interest, Link, LinkKind};
use std::cell::Cell;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicU32, fence};
use std::time::{Duration, Instant};

/// Default ring size per direction.
pub const DEFAULT_RING_BYTES: usize = 256 << 10;
/// Largest all_reduce, in bytes, that goes through a group segment by default
/// (`FabricConfig::shm_group_bytes`).
pub const DEFAULT_GROUP_BYTES: usize = 4 << 10;
/// Largest slot a group segment may have: each rank reads every rank's post, so the segment
/// pays off only while messages are small.
pub const MAX_GROUP_BYTES: usize = 1 << 20;
/// Smallest ring size; requested capacities are rounded up to a power of two at least this.
pub const MIN_RING_BYTES: usize = 64 << 10;

/// With both read and write interest we can only sleep on one futex; cap the sleep.
const BOTH_SLICE: Duration = Duration::from_micros(200);

// `aborted` states (0: none, 1: being posted, see `file::AbortNote`): which end of the ring
// wrote it, so a side never reports its own abort to itself.
const ABORT_BY_WRITER: u32 = 2;
const ABORT_BY_READER: u32 = 3;
// `closed` bits, set when a side drops its link.
const CLOSED_WRITER: u32 = 1;
const CLOSED_READER: u32 = 2;

mod file;
mod group;
mod ring;
pub use group::{GroupSegment, group_file_name};
use ring::{Lane, Ring, SMALL_FRAME_MAX};

/// 64-bit FNV-1a: stable across processes and builds, unlike std's `RandomState`.
fn fnv1a(s: &str) -> u64 {
    let prime = 0x100_0000_01b3;
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(prime))
}

/// Name of the file holding the ring that carries bytes from rank `from` to rank `to`.
pub fn ring_file_name(session: &str, comm_key: &str, from: usize, to: usize) -> String {
    format!("gantry-{session}-{:016x}-{from}-{to}", fnv1a(comm_key))
}

/// Remove the ring files and group segments of `session` left in `dir` by links and groups
/// whose peers never attached (for example because one crashed). Call when the job is over; returns how many were removed.
pub fn remove_session_files(dir: &Path, session: &str) -> io::Result<usize> {
    let prefix = format!("gantry-{session}-");
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // `{key_hash:016x}-{from}-{to}` (a ring) or `{key_hash:016x}-group` (a group segment),
        // so that session "a" leaves session "a-b" alone.
        let parts: Vec<&str> = rest.split('-').collect();
        let digits = |p: &str, hex: bool| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
        };
        let key = parts[0].len() == 16 && digits(parts[0], true);
        let ring = parts.len() == 3 && digits(parts[1], false) && digits(parts[2], false);
        let group = parts.len() == 2 && parts[1] == "group";
        if key && (ring || group) {
            match fs::remove_file(dir.join(&name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => removed += 1,
            }
        }
    }
    Ok(removed)
}

fn io_err(e: io::Error, what: &str, path: &Path) -> LinkError {
    LinkError::Io(io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let (op, ts) = (libc::FUTEX_WAIT, &ts as *const libc::timespec);
    // SAFETY: `word` is an aligned u32 that stays mapped for the call and `ts` a valid timespec;
    // FUTEX_WAIT only reads them. Every outcome (woken, EAGAIN, ETIMEDOUT, EINTR) just returns
    // to the caller, who re-checks its condition.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), op, expected, ts) };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is an aligned u32; FUTEX_WAKE only uses its address as a key.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// Whether process `pid` exists and is not a zombie. `true` when unknown (`pid <= 0`).
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // kill(pid, 0) succeeds for zombies (a SIGKILLed child its parent has not reaped), so check
    // the state too. The command name (field 2) may contain ')': the state follows the last one.
    exists
        && match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next());
                !matches!(state, Some('Z' | 'X' | 'x'))
            }
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
}

/// One side's place in one lane: its own position (bytes written, or consumed) and the last
/// position it read of the other side's. The peer's only grows, so what it promises (free
/// space, readable bytes) stays true until used up.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    pos: u64,
    seen: u64,
}

/// Shared-memory link to one peer process on this host. See the module docs for the layout.
pub struct ShmLink {
    out: Ring,
    inc: Ring,
    /// Per lane ([`Lane`] as index): our write cursor in `out`, our read cursor in `inc`.
    tx: [Cursor; 2],
    rx: [Cursor; 2],
    /// The lane of the last write that found too little room: what `wait` for writing waits on.
    blocked: Cell<Lane>,
    /// The peer has mapped both files and they have been unlinked.
    attached: bool,
}

impl ShmLink {
    /// Connect rank `me` to rank `peer`. Both sides call this symmetrically, in either order,
    /// with the same `dir`, `session`, `comm_key` and `capacity` (rounded up to a power of two,
    /// at least [`MIN_RING_BYTES`]).
    ///
    /// This does not wait for the peer (so `_deadline` bounds nothing): bytes written before
    /// the peer attaches wait in the ring, and a read just finds nothing yet. A blocking
    /// rendezvous would deadlock ranks that each connect to their right neighbour first. The
    /// files are unlinked as soon as either side sees that both have attached, at the latest
    /// when the second side connects.
    pub fn connect(
        dir: &Path,
        session: &str,
        comm_key: &str,
        me: usize,
        peer: usize,
        capacity: usize,
        _deadline: Instant,
    ) -> Result<ShmLink, LinkError> {
        if me == peer || session.contains(['/', '\0']) {
            let msg = format!("bad shm link {me}->{peer} in session {session:?}");
            return Err(LinkError::Protocol(msg));
        }
        let cap = capacity.max(MIN_RING_BYTES).checked_next_power_of_two();
        let cap = cap.ok_or_else(|| LinkError::Protocol(format!("ring size {capacity} too big")))?;
        let out_path = dir.join(ring_file_name(session, comm_key, me, peer));
        let in_path = dir.join(ring_file_name(session, comm_key, peer, me));
        let out = Ring::open_fresh(&out_path, cap, true)?;
        let inc = Ring::open_fresh(&in_path, cap, false)?;
        let cursor = |at: u64| Cursor { pos: at, seen: at };
        let tx = [Lane::Stream, Lane::Small].map(|l| cursor(out.write_pos(l).load(Acquire)));
        let rx = [Lane::Stream, Lane::Small].map(|l| cursor(inc.read_pos(l).load(Acquire)));
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        out.hdr().meta.writer_pid.store(pid, Release);
        inc.hdr().meta.reader_pid.store(pid, Release);
        // With the peer doing the same, at least one of us sees the other's pids right away.
        fence(SeqCst);
        let mut link = ShmLink {
            out,
            inc,
            tx,
            rx,
            blocked: Cell::new(Lane::Stream),
            attached: false,
        };
        link.poll_attach();
        Ok(link)
    }

    /// Once the peer has recorded its pids (which it does after mapping both files), unlink
    /// them: nothing is left in the directory even if both processes are later SIGKILLed.
    fn poll_attach(&mut self) {
        let reader = self.out.hdr().meta.reader_pid.load(Acquire);
        if reader != 0 && self.inc.hdr().meta.writer_pid.load(Acquire) != 0 {
            self.attached = true;
            self.out.unlink();
            self.inc.unlink();
        }
    }

    /// Ring capacity per direction in bytes (the stream lane's).
    pub fn capacity(&self) -> usize {
        self.out.cap
    }

    /// An abort the peer posted on either ring. Checked on every call, so the common case (no
    /// abort anywhere: two loads of lines nobody writes) stays inline.
    #[inline(always)]
    fn peer_abort(&self) -> Result<(), LinkError> {
        let posted = |r: &Ring| r.hdr().meta.aborted.load(Relaxed) != 0;
        if !posted(&self.inc) && !posted(&self.out) {
            return Ok(());
        }
        self.posted_abort()
    }

    #[cold]
    fn posted_abort(&self) -> Result<(), LinkError> {
        let abort = self.inc.abort_by(ABORT_BY_WRITER);
        abort.or_else(|| self.out.abort_by(ABORT_BY_READER)).map_or(Ok(()), Err)
    }

    /// Bytes published in `lane` of `inc` and not yet consumed.
    fn readable(&self, lane: Lane) -> Result<usize, LinkError> {
        let c = self.rx[lane as usize];
        self.inc.used(lane, self.inc.write_pos(lane).load(Acquire), c.pos)
    }

    /// [`Self::readable`], reading `write_pos` only when all we knew of is consumed.
    fn readable_now(&mut self, lane: Lane) -> Result<usize, LinkError> {
        let c = &mut self.rx[lane as usize];
        if c.seen == c.pos {
            let wp = self.inc.write_pos(lane).load(Acquire);
            self.inc.used(lane, wp, c.pos)?;
            c.seen = wp;
        }
        Ok(c.seen.wrapping_sub(c.pos) as usize)
    }

    /// Free bytes in `lane` of `out`.
    fn writable(&self, lane: Lane) -> Result<usize, LinkError> {
        let c = self.tx[lane as usize];
        let used = self.out.used(lane, c.pos, self.out.read_pos(lane).load(Acquire))?;
        Ok(self.out.lane_cap(lane) - used)
    }

    /// Free bytes in `lane` of `out`, at least `want` if there are; reads `read_pos` only when
    /// what we knew of is less than `want`.
    fn writable_for(&mut self, lane: Lane, want: usize) -> Result<usize, LinkError> {
        let cap = self.out.lane_cap(lane);
        let c = &mut self.tx[lane as usize];
        let known = cap - c.pos.wrapping_sub(c.seen) as usize;
        if known >= want {
            return Ok(known);
        }
        let rp = self.out.read_pos(lane).load(Acquire);
        let used = self.out.used(lane, c.pos, rp)?;
        c.seen = rp;
        Ok(cap - used)
    }

    fn ready_to_read(&self) -> bool {
        let data = |lane| !matches!(self.readable(lane), Ok(0));
        data(Lane::Stream) || data(Lane::Small) || self.inc.closed(CLOSED_WRITER) || self.peer_abort().is_err()
    }

    fn ready_to_write(&self) -> bool {
        !matches!(self.writable(self.blocked.get()), Ok(0))
            || self.out.closed(CLOSED_READER)
            || self.peer_abort().is_err()
    }

    /// Sleep on `seq` unless `ready`. No lost wake-up: the other side publishes its position
    /// with a sequentially consistent store, then reads our `flag` (sequentially consistent),
    /// and only when it is set bumps `seq` and wakes us. We set `flag` (sequentially
    /// consistent), fence, then read `seq` and check `ready`. In the single total order either
    /// its flag read comes after our flag store (it bumps `seq` and wakes us; a bump before our
    /// `futex_wait` makes the wait return at once), or its position store comes before our fence
    /// (`ready` sees it). Keeping the bump and the fence off the publishing side leaves one
    /// locked instruction per message on x86 (the store), where a bump plus a fence cost two.
    /// Both lanes share the flags and sequence words.
    fn sleep_on(&self, flag: &AtomicU32, seq: &AtomicU32, ready: fn(&Self) -> bool, timeout: Duration) {
        flag.store(1, SeqCst);
        fence(SeqCst);
        let expected = seq.load(Acquire);
        if !ready(self) && !timeout.is_zero() {
            futex_wait(seq, expected, timeout);
        }
        flag.store(0, Relaxed);
    }

    fn wait_readable(&self, timeout: Duration) {
        let h = self.inc.hdr();
        self.sleep_on(&h.reader_waiting.flag, &h.prod.data_seq, Self::ready_to_read, timeout);
    }

    /// Copy `data` into `lane` of `out` at position `pos`, wrapping at the end of its region.
    /// The caller has checked that it fits in the free part (`writable_for`).
    #[inline(always)]
    fn copy_in(&self, lane: Lane, pos: u64, data: &[u8]) {
        let cap = self.out.lane_cap(lane);
        let off = (pos as usize) & (cap - 1);
        let first = data.len().min(cap - off);
        let base = self.out.lane_data(lane);
        // SAFETY: `off + first <= cap` and `data.len() - first <= off` (it fits in the free
        // part, at most `cap` bytes), so both copies stay inside the lane's region and only
        // touch its free part, which the reader does not access until we publish it. `data`
        // cannot alias that part: our own read slices come from the other ring, and the peer
        // never hands out free space.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(off), first);
            std::ptr::copy_nonoverlapping(data.as_ptr().add(first), base, data.len() - first);
        }
    }

    /// Write as much of `parts` (concatenated) as fits into `lane`, then publish it at once.
    fn write_lane(&mut self, lane: Lane, parts: &[&[u8]]) -> Result<usize, LinkError> {
        if !self.attached {
            self.poll_attach();
        }
        self.peer_abort()?;
        if self.out.closed(CLOSED_READER) {
            return Err(LinkError::Closed);
        }
        let want: usize = parts.iter().map(|p| p.len()).sum();
        let n = want.min(self.writable_for(lane, want)?);
        if n < want {
            self.blocked.set(lane);
        }
        if n == 0 {
            return Ok(0);
        }
        let (mut pos, mut left) = (self.tx[lane as usize].pos, n);
        for part in parts {
            let take = part.len().min(left);
            self.copy_in(lane, pos, &part[..take]);
            pos += take as u64;
            left -= take;
        }
        self.tx[lane as usize].pos = pos;
        self.out.write_pos(lane).store(pos, SeqCst); // see sleep_on
        let h = self.out.hdr();
        if h.reader_waiting.flag.load(SeqCst) != 0 {
            h.prod.data_seq.fetch_add(1, Release);
            futex_wake(&h.prod.data_seq);
        }
        Ok(n)
    }

    /// Hand up to `max` readable bytes of `lane` to `sink` and consume them.
    fn read_lane(&mut self, lane: Lane, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        if !self.attached {
            self.poll_attach();
        }
        self.peer_abort()?;
        let mut avail = self.readable_now(lane)?;
        if avail == 0 {
            // The writer marks `closed` after its last publish, so re-check before reporting EOF.
            if self.inc.closed(CLOSED_WRITER) {
                avail = self.readable_now(lane)?;
                if avail == 0 {
                    return Err(LinkError::Closed);
                }
            } else {
                self.check_lanes_agree(lane)?;
            }
        }
        let n = avail.min(max);
        if n == 0 {
            return Ok(0);
        }
        let cap = self.inc.lane_cap(lane);
        let pos = self.rx[lane as usize].pos;
        let off = (pos as usize) & (cap - 1);
        let first = n.min(cap - off);
        let base = self.inc.lane_data(lane);
        // SAFETY: both ranges lie in the lane's region (see copy_in) and hold bytes the writer
        // published (Acquire load of its write position in `readable_now`) and will not touch
        // until we advance the read position below; the slices do not outlive the sink calls.
        unsafe {
            sink(std::slice::from_raw_parts(base.add(off), first));
            if n > first {
                sink(std::slice::from_raw_parts(base, n - first));
            }
        }
        let pos = pos + n as u64;
        self.rx[lane as usize].pos = pos;
        self.inc.read_pos(lane).store(pos, SeqCst); // see sleep_on
        let h = self.inc.hdr();
        if h.writer_waiting.flag.load(SeqCst) != 0 {
            h.cons.space_seq.fetch_add(1, Release);
            futex_wake(&h.cons.space_seq);
        }
        Ok(n)
    }

    /// A reader waits on `lane`, which is empty. The writer finishes a frame before it starts
    /// the next, so unread bytes in the other lane while this one stays empty mean the peer
    /// sent a frame this side does not expect here (the ranks disagree on a message's size or
    /// order): an error naming both, instead of a wait until the deadline. `lane` is read once
    /// more after the other, so a frame published in between is not mistaken for one.
    fn check_lanes_agree(&mut self, lane: Lane) -> Result<(), LinkError> {
        if self.readable_now(lane.other())? == 0 || self.readable_now(lane)? > 0 {
            return Ok(());
        }
        Err(LinkError::Protocol(format!(
            "{}: the peer sent a frame in the {} lane while this rank waits for one in the {} lane \
             (frames up to {SMALL_FRAME_MAX} bytes take the small lane): the ranks disagree on a \
             message's size or order",
            self.inc.path().display(),
            lane.other().name(),
            lane.name()
        )))
    }
}

impl Link for ShmLink {
    fn kind(&self) -> LinkKind {
        LinkKind::Shm
    }

    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
        self.write_lane(Lane::Stream, &[data])
    }

    fn try_write_frame(&mut self, frame: usize, parts: &[&[u8]]) -> Result<usize, LinkError> {
        self.write_lane(Lane::for_frame(frame), parts)
    }

    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        let mut at = 0;
        self.read_lane(Lane::Stream, buf.len(), &mut |s| {
            buf[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        })
    }

    fn try_read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        self.read_lane(Lane::Stream, max, sink)
    }

    fn try_read_frame(&mut self, frame: usize, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        self.read_lane(Lane::for_frame(frame), max, sink)
    }

    fn wait(&self, interest: Interest, timeout: Duration) {
        match (interest.read, interest.write) {
            (true, false) => self.wait_readable(timeout),
            (false, true) => {
                let h = self.out.hdr();
                self.sleep_on(&h.writer_waiting.flag, &h.cons.space_seq, Self::ready_to_write, timeout);
            }
            (true, true) if self.ready_to_write() => {}
            (true, true) => self.wait_readable(timeout.min(BOTH_SLICE)),
            (false, false) => std::thread::sleep(timeout.min(BOTH_SLICE)),
        }
    }

    fn abort(&mut self, culprit: Option<usize>, reason: &str) {
        self.out.post_abort(ABORT_BY_WRITER, culprit, reason);
        self.inc.post_abort(ABORT_BY_READER, culprit, reason);
    }

    fn peer_alive(&self) -> bool {
        process_alive(self.inc.hdr().meta.writer_pid.load(Acquire))
    }
}

impl Drop for ShmLink {
    /// Tell the peer the stream has ended: its reads drain what we wrote, then get `Closed`.
    fn drop(&mut self) {
        self.out.hdr().meta.closed.fetch_or(CLOSED_WRITER, Release);
        self.inc.hdr().meta.closed.fetch_or(CLOSED_READER, Release);
        self.out.wake_all();
        self.inc.wake_all();
    }
}

#[cfg(test)]
mod tests;
