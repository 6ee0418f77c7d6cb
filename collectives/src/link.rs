//! A [`Link`] is a nonblocking, ordered, reliable byte pipe to one peer (both directions).
//!
//! Transports (TCP, TLS, QUIC, shared memory, in-process) only implement this trait; message framing,
//! header checks, reduction on arrival, deadlines and waiting strategy live once in
//! [`crate::transport::MeshTransport`]. Nothing here blocks except [`Link::wait`].

use crate::error::LinkError;
use std::os::fd::RawFd;
use std::time::Duration;

/// Which transport a link uses; reported by benchmarks and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Tcp,
    /// TLS 1.3 over TCP ([`crate::tls`]).
    Tls,
    /// QUIC over UDP ([`crate::quic`]).
    Quic,
    Shm,
    Local,
}

impl LinkKind {
    pub const fn name(self) -> &'static str {
        match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Tls => "tls",
            LinkKind::Quic => "quic",
            LinkKind::Shm => "shm",
            LinkKind::Local => "local",
        }
    }
}

/// What a waiting rank is waiting for on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

pub trait Link: Send {
    fn kind(&self) -> LinkKind;

    /// Write as much of `data` as fits without blocking; `Ok(0)` means "would block".
    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError>;

    /// Write as much as fits of `parts` one after another (what is left of a frame: header,
    /// payload and padding, `frame` bytes in all) without blocking; returns the bytes written,
    /// a prefix of the concatenation. The default writes part after part. A shared-memory link
    /// copies them all and publishes once (a small message needs no coalescing copy), into a
    /// ring of their own for small frames, picked by `frame`, which the reader knows too
    /// ([`Link::try_read_frame`]).
    fn try_write_frame(&mut self, frame: usize, parts: &[&[u8]]) -> Result<usize, LinkError> {
        let _ = frame;
        let mut total = 0;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            let n = self.try_write(part)?;
            total += n;
            if n < part.len() {
                break;
            }
        }
        Ok(total)
    }

    /// Read up to `buf.len()` bytes without blocking; `Ok(0)` means "nothing yet".
    /// End of stream is `Err(LinkError::Closed)`, never `Ok(0)`.
    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError>;

    /// Hand up to `max` readable bytes to `sink` without blocking, as one or more contiguous
    /// slices, and consume them; returns how many were consumed. Lets a reduction read straight
    /// out of a shared-memory ring instead of copying first. The default reads into a stack
    /// buffer; links with their own memory override it.
    fn try_read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        let mut tmp = [0u64; 8192]; // 64 KiB, 8-byte aligned
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut tmp);
        let n = max.min(bytes.len());
        let got = self.try_read_into(&mut bytes[..n])?;
        if got > 0 {
            sink(&bytes[..got]);
        }
        Ok(got)
    }

    /// [`Link::try_read_with`] for part of an expected frame of `frame` bytes in all; see
    /// [`Link::try_write_frame`]. The default ignores `frame`.
    fn try_read_frame(&mut self, frame: usize, max: usize, sink: &mut dyn FnMut(&[u8])) -> Result<usize, LinkError> {
        let _ = frame;
        self.try_read_with(max, sink)
    }

    /// Block until the link may make progress for `interest`, or `timeout` passes. Spurious
    /// wake-ups are fine; callers re-check.
    fn wait(&self, interest: Interest, timeout: Duration);

    /// A file descriptor that `poll(2)` can wait on for this link, if it has one. When every
    /// link an exchange waits on has one, they are polled together.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }

    /// Tell the peer we are giving up (best effort) so it fails fast instead of waiting out
    /// its deadline. `culprit` is the rank we blame, if we know it.
    fn abort(&mut self, culprit: Option<usize>, reason: &str);

    /// Best-effort liveness of the peer process (shared memory can check the pid; sockets
    /// learn it from the connection). `true` when unknown.
    fn peer_alive(&self) -> bool {
        true
    }
}
