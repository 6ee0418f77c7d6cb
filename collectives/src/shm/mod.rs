//! Shared-memory [`Link`] between two processes on the same host.
//!
//! A pair of ranks shares two single-producer/single-consumer byte rings, one per direction.
//! Each ring lives in its own file, `gantry-{session}-{key_hash:016x}-{from}-{to}` under a
//! directory (normally `/dev/shm`), mapped `MAP_SHARED` by both processes:
//!
//! ```text
//! offset 0      header page (4096 bytes), all fields atomics
//!   +0          meta: magic+version, capacity, writer/reader pid, aborted, closed, culprit
//!   +128        producer line: write_pos (total bytes written), data_seq
//!   +256        consumer line: read_pos (total bytes consumed), space_seq
//!   +384        reader_waiting (its own line)
//!   +512        writer_waiting (its own line)
//!   +640        abort reason (256 bytes)
//! offset 4096   data region, `capacity` bytes (a power of two), indexed by pos & (capacity-1)
//! ```
//!
//! Why this shape:
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
use memmap2::MmapMut;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, AtomicU32, AtomicU64, fence};
use std::time::{Duration, Instant};

/// Default ring size per direction.
pub const DEFAULT_RING_BYTES: usize = 256 << 10;
/// Smallest ring size; requested capacities are rounded up to a power of two at least this.
pub const MIN_RING_BYTES: usize = 64 << 10;

const HEADER_BYTES: usize = 4096;
/// Magic and layout version in one word.
const MAGIC: u64 = u64::from_le_bytes(*b"GNTSHM02");
const REASON_BYTES: usize = 256;
/// With both read and write interest we can only sleep on one futex; cap the sleep.
const BOTH_SLICE: Duration = Duration::from_micros(200);

// `aborted` states. The aborting side claims the slot, fills in culprit and reason, then
// publishes which end of the ring wrote it (so a side never reports its own abort to itself).
const ABORT_CLAIMED: u32 = 1;
const ABORT_BY_WRITER: u32 = 2;
const ABORT_BY_READER: u32 = 3;
// `closed` bits, set when a side drops its link.
const CLOSED_WRITER: u32 = 1;
const CLOSED_READER: u32 = 2;

#[repr(C, align(128))]
struct Meta {
    magic: AtomicU64,
    capacity: AtomicU64,
    writer_pid: AtomicI32,
    reader_pid: AtomicI32,
    aborted: AtomicU32,
    closed: AtomicU32,
    reason_len: AtomicU32,
    culprit: AtomicI64,
}

/// Written only by the producer (plus `data_seq` bumps on abort/close).
#[repr(C, align(128))]
struct Producer {
    write_pos: AtomicU64,
    data_seq: AtomicU32,
}

/// Written only by the consumer (plus `space_seq` bumps on abort/close).
#[repr(C, align(128))]
struct Consumer {
    read_pos: AtomicU64,
    space_seq: AtomicU32,
}

/// A side's "I am about to sleep" flag, alone on its line (see the module docs).
#[repr(C, align(128))]
struct Waiting {
    flag: AtomicU32,
}

#[repr(C)]
struct Header {
    meta: Meta,
    prod: Producer,
    cons: Consumer,
    reader_waiting: Waiting,
    writer_waiting: Waiting,
    reason: [AtomicU8; REASON_BYTES],
}

// The last byte of the header page stays unused: glibc's posix_fallocate fallback (for file
// systems without fallocate) may write a zero byte at the end of each block.
const _: () = assert!(size_of::<Header>() < HEADER_BYTES);
const _: () = assert!(std::mem::offset_of!(Header, cons) >= std::mem::offset_of!(Header, prod) + 64);

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

/// Remove the ring files of `session` left in `dir` by links whose peer never attached (for
/// example because it crashed). Call when the job is over; returns how many were removed.
pub fn remove_session_files(dir: &Path, session: &str) -> io::Result<usize> {
    let prefix = format!("gantry-{session}-");
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // `{key_hash:016x}-{from}-{to}`, so that session "a" leaves session "a-b" alone.
        let parts: Vec<&str> = rest.split('-').collect();
        let digits = |p: &str, hex: bool| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
        };
        if parts.len() == 3
            && parts[0].len() == 16
            && digits(parts[0], true)
            && digits(parts[1], false)
            && digits(parts[2], false)
        {
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

/// One mapped ring file.
struct Ring {
    path: PathBuf,
    /// (device, inode) of the file, so we never unlink a newer file with the same name.
    id: (u64, u64),
    base: NonNull<u8>,
    cap: usize,
    _map: MmapMut,
}

// SAFETY: `base` points into `_map`, which this struct owns and which stays mapped until drop;
// a mapping is not tied to a thread, and shared state is only touched through atomics or raw
// copies of the ranges the ring protocol gives to this side.
unsafe impl Send for Ring {}

impl Ring {
    fn open(path: PathBuf, cap: usize) -> Result<Ring, LinkError> {
        let total = HEADER_BYTES + cap;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_err(e, "opening", &path))?;
        // SAFETY: the fd is valid while `file` lives. posix_fallocate returns the error number.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        if rc != 0 {
            return Err(io_err(io::Error::from_raw_os_error(rc), "allocating", &path));
        }
        let meta = file.metadata().map_err(|e| io_err(e, "stat of", &path))?;
        let (len, id) = (meta.len(), (meta.dev(), meta.ino()));
        if len != total as u64 {
            let msg = format!("{} has {len} bytes, expected {total}", path.display());
            return Err(LinkError::Protocol(msg));
        }
        // SAFETY: mapping is unsafe because others may modify or truncate the file. Modification
        // is the point (all shared access goes through atomics or protocol-owned ranges); the
        // file has its full size, and only the peer, which never truncates, has it open.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_err(e, "mapping", &path))?;
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap returned null");
        let ring = Ring {
            path,
            id,
            base,
            cap,
            _map: map,
        };
        let m = &ring.hdr().meta;
        ring.claim(&m.magic, MAGIC, "magic")?;
        ring.claim(&m.capacity, cap as u64, "capacity")?;
        Ok(ring)
    }

    /// Open as writer (or reader). A file whose writer (reader) pid is already set was left by
    /// an earlier link of ours with this name whose peer never came: replace it.
    fn open_fresh(path: &Path, cap: usize, writer: bool) -> Result<Ring, LinkError> {
        for _ in 0..2 {
            let ring = Ring::open(path.to_path_buf(), cap)?;
            let m = &ring.hdr().meta;
            if (if writer { &m.writer_pid } else { &m.reader_pid }).load(Acquire) == 0 {
                return Ok(ring);
            }
            ring.unlink();
        }
        Err(LinkError::Protocol(format!(
            "{} is in use by another link",
            path.display()
        )))
    }

    /// Remove our file from the directory, if it is still there (the peer may have been first).
    fn unlink(&self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours
            && let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("could not unlink {}: {e}", self.path.display());
        }
    }

    /// Set a zero (fresh) header word to `want`, or check that it already holds `want`.
    fn claim(&self, field: &AtomicU64, want: u64, what: &str) -> Result<(), LinkError> {
        match field.compare_exchange(0, want, AcqRel, Acquire) {
            Ok(_) => Ok(()),
            Err(have) if have == want => Ok(()),
            Err(have) => Err(LinkError::Protocol(format!(
                "{}: {what} is {have:#x}, expected {want:#x}",
                self.path.display()
            ))),
        }
    }

    fn hdr(&self) -> &Header {
        // SAFETY: the mapping is page-aligned, at least HEADER_BYTES long and outlives `&self`;
        // Header holds only atomics, which are valid for any bit pattern and shared mutation.
        unsafe { &*(self.base.as_ptr() as *const Header) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: the data region starts HEADER_BYTES into a mapping of HEADER_BYTES + cap bytes.
        unsafe { self.base.as_ptr().add(HEADER_BYTES) }
    }

    fn closed(&self, bit: u32) -> bool {
        self.hdr().meta.closed.load(Acquire) & bit != 0
    }

    /// The abort posted on this ring by the side tagged `by`, if any.
    fn abort_by(&self, by: u32) -> Option<LinkError> {
        let h = self.hdr();
        if h.meta.aborted.load(Acquire) != by {
            return None;
        }
        let len = (h.meta.reason_len.load(Relaxed) as usize).min(REASON_BYTES);
        let reason: Vec<u8> = h.reason[..len].iter().map(|b| b.load(Relaxed)).collect();
        Some(LinkError::Aborted {
            culprit: usize::try_from(h.meta.culprit.load(Relaxed)).ok(),
            reason: String::from_utf8_lossy(&reason).into_owned(),
        })
    }

    /// Post an abort unless one is already posted (the first one wins), and wake the peer.
    fn post_abort(&self, by: u32, culprit: Option<usize>, reason: &str) {
        let h = self.hdr();
        if h.meta
            .aborted
            .compare_exchange(0, ABORT_CLAIMED, Acquire, Relaxed)
            .is_ok()
        {
            let mut len = reason.len().min(REASON_BYTES);
            while !reason.is_char_boundary(len) {
                len -= 1;
            }
            for (slot, &b) in h.reason.iter().zip(&reason.as_bytes()[..len]) {
                slot.store(b, Relaxed);
            }
            h.meta.reason_len.store(len as u32, Relaxed);
            let culprit = culprit.and_then(|c| i64::try_from(c).ok()).unwrap_or(-1);
            h.meta.culprit.store(culprit, Relaxed);
            h.meta.aborted.store(by, Release); // publishes culprit and reason
        }
        self.wake_all();
    }

    /// Bump both futex words and wake every sleeper; for abort/close, not the fast path.
    fn wake_all(&self) {
        let h = self.hdr();
        fence(SeqCst); // the state change before this is visible to anyone who sees the bump
        h.prod.data_seq.fetch_add(1, Release);
        h.cons.space_seq.fetch_add(1, Release);
        futex_wake(&h.prod.data_seq);
        futex_wake(&h.cons.space_seq);
    }

    /// Used bytes `write_pos - read_pos`, checked against the capacity.
    fn used(&self, wp: u64, rp: u64) -> Result<usize, LinkError> {
        match wp.wrapping_sub(rp) {
            n if n <= self.cap as u64 => Ok(n as usize),
            _ => Err(LinkError::Protocol(format!(
                "{}: ring corrupted (write_pos {wp}, read_pos {rp}, capacity {})",
                self.path.display(),
                self.cap
            ))),
        }
    }
}

/// Shared-memory link to one peer process on this host. See the module docs for the layout.
pub struct ShmLink {
    out: Ring,
    inc: Ring,
    /// Our own positions: total bytes written to `out` / consumed from `inc`.
    out_pos: u64,
    in_pos: u64,
    /// The peer's positions as last read (and checked): `read_pos` of `out`, `write_pos` of
    /// `inc`. Both only grow, so what they promise (free space, readable bytes) stays true.
    seen_read: u64,
    seen_write: u64,
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
        let (out_pos, in_pos) = (
            out.hdr().prod.write_pos.load(Acquire),
            inc.hdr().cons.read_pos.load(Acquire),
        );
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        out.hdr().meta.writer_pid.store(pid, Release);
        inc.hdr().meta.reader_pid.store(pid, Release);
        // With the peer doing the same, at least one of us sees the other's pids right away.
        fence(SeqCst);
        let mut link = ShmLink {
            out,
            inc,
            out_pos,
            in_pos,
            seen_read: out_pos,
            seen_write: in_pos,
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

    /// Ring capacity per direction in bytes.
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

    /// Bytes published in `inc` and not yet consumed.
    fn readable(&self) -> Result<usize, LinkError> {
        self.inc.used(self.inc.hdr().prod.write_pos.load(Acquire), self.in_pos)
    }

    /// [`Self::readable`], reading `write_pos` only when all we knew of is consumed.
    fn readable_now(&mut self) -> Result<usize, LinkError> {
        if self.seen_write == self.in_pos {
            let wp = self.inc.hdr().prod.write_pos.load(Acquire);
            self.inc.used(wp, self.in_pos)?;
            self.seen_write = wp;
        }
        Ok(self.seen_write.wrapping_sub(self.in_pos) as usize)
    }

    /// Free bytes in `out`.
    fn writable(&self) -> Result<usize, LinkError> {
        let used = self
            .out
            .used(self.out_pos, self.out.hdr().cons.read_pos.load(Acquire))?;
        Ok(self.out.cap - used)
    }

    /// Free bytes in `out`, at least `want` if there are; reads `read_pos` only when what we
    /// knew of is less than `want`.
    fn writable_for(&mut self, want: usize) -> Result<usize, LinkError> {
        let known = self.out.cap - self.out_pos.wrapping_sub(self.seen_read) as usize;
        if known >= want {
            return Ok(known);
        }
        let rp = self.out.hdr().cons.read_pos.load(Acquire);
        let used = self.out.used(self.out_pos, rp)?;
        self.seen_read = rp;
        Ok(self.out.cap - used)
    }

    fn ready_to_read(&self) -> bool {
        !matches!(self.readable(), Ok(0)) || self.inc.closed(CLOSED_WRITER) || self.peer_abort().is_err()
    }

    fn ready_to_write(&self) -> bool {
        !matches!(self.writable(), Ok(0)) || self.out.closed(CLOSED_READER) || self.peer_abort().is_err()
    }

    /// Sleep on `seq` unless `ready`. No lost wake-up: the other side publishes its position
    /// with a sequentially consistent store, then reads our `flag` (sequentially consistent),
    /// and only when it is set bumps `seq` and wakes us. We set `flag` (sequentially
    /// consistent), fence, then read `seq` and check `ready`. In the single total order either
    /// its flag read comes after our flag store (it bumps `seq` and wakes us; a bump before our
    /// `futex_wait` makes the wait return at once), or its position store comes before our fence
    /// (`ready` sees it). Keeping the bump and the fence off the publishing side leaves one
    /// locked instruction per message on x86 (the store), where a bump plus a fence cost two.
    fn sleep_on(&self, flag: &AtomicU32, seq: &AtomicU32, ready: fn(&Self) -> bool, timeout: Duration) {
        flag.store(1, SeqCst);
        fence(SeqCst);
        let expected = seq.load(Acquire);
        if !ready(self) && !timeout.is_zero() {
            futex_wait(seq, expected, timeout);
        }
        flag.store(0, Relaxed);
    }

    /// Copy `data` into `out` at ring position `pos`, wrapping at the end of the data region.
    /// The caller has checked that it fits in the free part (`writable_for`).
    #[inline(always)]
    fn copy_in(&mut self, pos: u64, data: &[u8]) {
        let off = (pos as usize) & (self.out.cap - 1);
        let first = data.len().min(self.out.cap - off);
        // SAFETY: `off + first <= cap` and `data.len() - first <= off` (it fits in the free
        // part, at most `cap` bytes), so both copies stay inside the data region and only touch
        // its free part, which the reader does not access until we publish it. `data` cannot
        // alias that part: our own `try_read_with` slices come from the other ring, and the
        // peer never hands out free space.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.out.data().add(off), first);
            std::ptr::copy_nonoverlapping(data.as_ptr().add(first), self.out.data(), data.len() - first);
        }
    }

    fn wait_readable(&self, timeout: Duration) {
        let h = self.inc.hdr();
        self.sleep_on(&h.reader_waiting.flag, &h.prod.data_seq, Self::ready_to_read, timeout);
    }
}

impl Link for ShmLink {
    fn kind(&self) -> LinkKind {
        LinkKind::Shm
    }

    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
        self.try_write_parts(&[data])
    }

    fn try_write_parts(&mut self, parts: &[&[u8]]) -> Result<usize, LinkError> {
        if !self.attached {
            self.poll_attach();
        }
        self.peer_abort()?;
        if self.out.closed(CLOSED_READER) {
            return Err(LinkError::Closed);
        }
        let want: usize = parts.iter().map(|p| p.len()).sum();
        let n = want.min(self.writable_for(want)?);
        if n == 0 {
            return Ok(0);
        }
        let mut pos = self.out_pos;
        let mut left = n;
        for part in parts {
            let take = part.len().min(left);
            self.copy_in(pos, &part[..take]);
            pos += take as u64;
            left -= take;
        }
        self.out_pos = pos;
        let h = self.out.hdr();
        h.prod.write_pos.store(self.out_pos, SeqCst); // see sleep_on
        if h.reader_waiting.flag.load(SeqCst) != 0 {
            h.prod.data_seq.fetch_add(1, Release);
            futex_wake(&h.prod.data_seq);
        }
        Ok(n)
    }

    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        let mut at = 0;
        self.try_read_with(buf.len(), &mut |s| {
            buf[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        })
    }

    fn try_read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        if !self.attached {
            self.poll_attach();
        }
        self.peer_abort()?;
        let mut avail = self.readable_now()?;
        // The writer marks `closed` after its last publish, so re-check before reporting EOF.
        if avail == 0 && self.inc.closed(CLOSED_WRITER) {
            avail = self.readable_now()?;
            if avail == 0 {
                return Err(LinkError::Closed);
            }
        }
        let n = avail.min(max);
        if n == 0 {
            return Ok(0);
        }
        let off = (self.in_pos as usize) & (self.inc.cap - 1);
        let first = n.min(self.inc.cap - off);
        // SAFETY: both ranges lie in the data region (see try_write) and hold bytes the writer
        // published (Acquire load of write_pos in `readable`) and will not touch until we
        // advance read_pos below; the slices do not outlive the sink calls.
        unsafe {
            sink(std::slice::from_raw_parts(self.inc.data().add(off), first));
            if n > first {
                sink(std::slice::from_raw_parts(self.inc.data(), n - first));
            }
        }
        self.in_pos += n as u64;
        let h = self.inc.hdr();
        h.cons.read_pos.store(self.in_pos, SeqCst); // see sleep_on
        if h.writer_waiting.flag.load(SeqCst) != 0 {
            h.cons.space_seq.fetch_add(1, Release);
            futex_wake(&h.cons.space_seq);
        }
        Ok(n)
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
