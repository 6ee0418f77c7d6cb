//! A ring file: the header page (positions, sleep flags, abort and close state) and two byte
//! rings after it, the stream lane (the link's capacity) and the small lane. See the parent
//! module for the layout and the protocol; this file maps, claims and names the parts.

use super::file::{AbortNote, REASON_BYTES, SharedFile};
use super::futex_wake;
use crate::error::LinkError;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Release, SeqCst};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU8, AtomicU32, AtomicU64, fence};

const HEADER_BYTES: usize = 4096;
/// Magic and layout version in one word.
const MAGIC: u64 = u64::from_le_bytes(*b"GNTSHM03");

/// Bytes of the small lane. Small enough that its lines stay in both cores' first-level caches
/// between messages: a 1 KiB all_reduce over 2 ranks took 0.45-0.47 us through a 4-8 KiB ring
/// against 0.52-0.54 us through 16-256 KiB (Open MPI 0.47), where every message lands on lines
/// last touched a lap, hundreds of messages, ago. The stream lane keeps its capacity for
/// bandwidth (64 MiB all_reduce: 5.2 GB/s through 256 KiB, 3.7 through 8 KiB).
pub(super) const SMALL_LANE_BYTES: usize = 8 << 10;
/// Frames (header, payload and padding) up to this many bytes take the small lane; two fit,
/// so a sender can be a message ahead of its reader without waiting.
pub(super) const SMALL_FRAME_MAX: usize = SMALL_LANE_BYTES / 2;

/// Which byte ring of a file a frame travels in. Both sides pick it from the frame's length,
/// which a receiver knows before the frame arrives (collectives agree on sizes), so no
/// message says which lane the next one takes. Each lane keeps its own order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    Stream = 0,
    Small = 1,
}

impl Lane {
    pub(super) fn for_frame(frame: usize) -> Lane {
        if frame <= SMALL_FRAME_MAX {
            Lane::Small
        } else {
            Lane::Stream
        }
    }

    pub(super) fn other(self) -> Lane {
        match self {
            Lane::Stream => Lane::Small,
            Lane::Small => Lane::Stream,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Lane::Stream => "stream",
            Lane::Small => "small",
        }
    }
}

#[repr(C, align(128))]
pub(super) struct Meta {
    pub(super) magic: AtomicU64,
    pub(super) capacity: AtomicU64,
    pub(super) writer_pid: AtomicI32,
    pub(super) reader_pid: AtomicI32,
    pub(super) aborted: AtomicU32,
    pub(super) closed: AtomicU32,
    pub(super) reason_len: AtomicU32,
    pub(super) culprit: AtomicI64,
}

/// Written only by the producer (plus `data_seq` bumps on abort/close).
#[repr(C, align(128))]
pub(super) struct Producer {
    pub(super) write_pos: AtomicU64,
    pub(super) data_seq: AtomicU32,
}

/// Written only by the consumer (plus `space_seq` bumps on abort/close).
#[repr(C, align(128))]
pub(super) struct Consumer {
    pub(super) read_pos: AtomicU64,
    pub(super) space_seq: AtomicU32,
}

/// The small lane's positions, each on a line of its own like the stream lane's.
#[repr(C, align(128))]
struct Position {
    pos: AtomicU64,
}

/// A side's "I am about to sleep" flag, alone on its line (see the module docs).
#[repr(C, align(128))]
pub(super) struct Waiting {
    pub(super) flag: AtomicU32,
}

#[repr(C)]
pub(super) struct Header {
    pub(super) meta: Meta,
    pub(super) prod: Producer,
    pub(super) cons: Consumer,
    pub(super) reader_waiting: Waiting,
    pub(super) writer_waiting: Waiting,
    pub(super) reason: [AtomicU8; REASON_BYTES],
    small_write_pos: Position,
    small_read_pos: Position,
}

// The last byte of the header page stays unused: glibc's posix_fallocate fallback (for file
// systems without fallocate) may write a zero byte at the end of each block.
const _: () = assert!(size_of::<Header>() < HEADER_BYTES);
const _: () = assert!(std::mem::offset_of!(Header, cons) >= std::mem::offset_of!(Header, prod) + 64);
// The offsets the parent module's layout names.
const _: () = assert!(std::mem::offset_of!(Header, small_write_pos) == 896);
const _: () = assert!(std::mem::offset_of!(Header, small_read_pos) == 1024);

/// One mapped ring file.
pub(super) struct Ring {
    file: SharedFile,
    pub(super) cap: usize,
}

impl Ring {
    fn open(path: PathBuf, cap: usize) -> Result<Ring, LinkError> {
        let file = SharedFile::open(path, HEADER_BYTES + cap + SMALL_LANE_BYTES)?;
        let ring = Ring { file, cap };
        let m = &ring.hdr().meta;
        ring.file.claim(&m.magic, MAGIC, "magic")?;
        ring.file.claim(&m.capacity, cap as u64, "capacity")?;
        Ok(ring)
    }

    /// Open as writer (or reader). A file whose writer (reader) pid is already set was left by
    /// an earlier link of ours with this name whose peer never came: replace it.
    pub(super) fn open_fresh(path: &Path, cap: usize, writer: bool) -> Result<Ring, LinkError> {
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
    pub(super) fn unlink(&self) {
        self.file.unlink();
    }

    pub(super) fn hdr(&self) -> &Header {
        // SAFETY: the mapping is page-aligned, at least HEADER_BYTES long and outlives `&self`;
        // Header holds only atomics, which are valid for any bit pattern and shared mutation.
        unsafe { &*(self.file.base() as *const Header) }
    }

    /// Bytes of `lane`'s data region.
    pub(super) fn lane_cap(&self, lane: Lane) -> usize {
        match lane {
            Lane::Stream => self.cap,
            Lane::Small => SMALL_LANE_BYTES,
        }
    }

    /// Start of `lane`'s data region: the stream lane right after the header page, the small
    /// lane after the stream lane.
    pub(super) fn lane_data(&self, lane: Lane) -> *mut u8 {
        let off = match lane {
            Lane::Stream => HEADER_BYTES,
            Lane::Small => HEADER_BYTES + self.cap,
        };
        // SAFETY: the mapping is HEADER_BYTES + cap + SMALL_LANE_BYTES long.
        unsafe { self.file.base().add(off) }
    }

    /// `lane`'s write position (the producer's).
    pub(super) fn write_pos(&self, lane: Lane) -> &AtomicU64 {
        match lane {
            Lane::Stream => &self.hdr().prod.write_pos,
            Lane::Small => &self.hdr().small_write_pos.pos,
        }
    }

    /// `lane`'s read position (the consumer's).
    pub(super) fn read_pos(&self, lane: Lane) -> &AtomicU64 {
        match lane {
            Lane::Stream => &self.hdr().cons.read_pos,
            Lane::Small => &self.hdr().small_read_pos.pos,
        }
    }

    pub(super) fn closed(&self, bit: u32) -> bool {
        self.hdr().meta.closed.load(Acquire) & bit != 0
    }

    fn abort_note(&self) -> AbortNote<'_> {
        let h = self.hdr();
        AbortNote {
            state: &h.meta.aborted,
            reason_len: &h.meta.reason_len,
            culprit: &h.meta.culprit,
            reason: &h.reason,
        }
    }

    /// The abort posted on this ring by the side tagged `by`, if any.
    pub(super) fn abort_by(&self, by: u32) -> Option<LinkError> {
        let note = self.abort_note();
        (note.state.load(Acquire) == by).then(|| note.read())
    }

    /// Post an abort unless one is already posted (the first one wins), and wake the peer.
    pub(super) fn post_abort(&self, by: u32, culprit: Option<usize>, reason: &str) {
        self.abort_note().post(by, culprit, reason);
        self.wake_all();
    }

    /// Bump both futex words and wake every sleeper; for abort/close, not the fast path.
    pub(super) fn wake_all(&self) {
        let h = self.hdr();
        fence(SeqCst); // the state change before this is visible to anyone who sees the bump
        h.prod.data_seq.fetch_add(1, Release);
        h.cons.space_seq.fetch_add(1, Release);
        futex_wake(&h.prod.data_seq);
        futex_wake(&h.cons.space_seq);
    }

    /// Used bytes `write_pos - read_pos` of `lane`, checked against its capacity.
    pub(super) fn used(&self, lane: Lane, wp: u64, rp: u64) -> Result<usize, LinkError> {
        let cap = self.lane_cap(lane);
        match wp.wrapping_sub(rp) {
            n if n <= cap as u64 => Ok(n as usize),
            _ => Err(LinkError::Protocol(format!(
                "{}: {} lane corrupted (write_pos {wp}, read_pos {rp}, capacity {cap})",
                self.path().display(),
                lane.name()
            ))),
        }
    }

    pub(super) fn path(&self) -> &Path {
        self.file.path()
    }
}
