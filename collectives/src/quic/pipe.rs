//! [`QuicLink`]: the nonblocking [`Link`] calls over the async halves of a QUIC stream.
//!
//! A writer task owns the send stream and drains a bounded outbox into it; a reader task owns
//! the receive stream and fills a bounded inbox from it, and stops reading while the inbox is
//! full, so a slow rank pushes back on its peer through QUIC's flow control. Two eventfds
//! mirror the queues exactly (level-triggered, changed only under the queue's lock):
//! `readable` is set while the inbox has bytes or the stream ended, `writable` while the
//! outbox has room or the stream ended. A waiting rank polls them; nothing is lost between a
//! check and a sleep.

use super::{CLOSE_ABORT, CLOSE_DONE, Core, Parts};
use crate::error::LinkError;
use crate::link::{Interest, Link, LinkKind};
use quinn::{Chunk, ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Bytes the outbox takes before `try_write` reports "would block" (quinn's send window
/// buffers more behind it).
const OUTBOX_BYTES: usize = 8 << 20;
/// Bytes the inbox takes before the reader task stops reading.
const INBOX_BYTES: usize = 8 << 20;
/// Most bytes the reader task takes from quinn at once.
const READ_CHUNK: usize = 1 << 20;
/// A small write joins the buffer queued before it up to this size, so a header and a short
/// payload go to quinn as one piece.
const COALESCE: usize = 64 << 10;
/// How long a dropped link's writer waits for the peer to acknowledge what was written before
/// it closes the connection (a TCP socket delivers its buffer after `close` the same way).
const LINGER: Duration = Duration::from_secs(1);
/// Longest abort reason sent to the peer (a close frame must fit in one packet).
const REASON_BYTES: usize = 512;
/// Culprit code for "nobody in particular".
const NO_CULPRIT: u64 = u64::MAX;

/// How one direction of a link ended; every later call answers with it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    Closed,
    Aborted { culprit: Option<usize>, reason: String },
    Failed(String),
}

impl End {
    fn error(&self) -> LinkError {
        match self {
            End::Closed => LinkError::Closed,
            End::Aborted { culprit, reason } => LinkError::Aborted {
                culprit: *culprit,
                reason: reason.clone(),
            },
            End::Failed(why) => LinkError::Protocol(why.clone()),
        }
    }

    fn of_connection(e: &ConnectionError) -> End {
        match e {
            ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from_u32(CLOSE_ABORT) => {
                decode_abort(&close.reason)
            }
            // Closed, reset, timed out, or closed by us: the peer is gone either way.
            _ => End::Closed,
        }
    }

    fn of_read(e: ReadError) -> End {
        match e {
            ReadError::ConnectionLost(e) => End::of_connection(&e),
            ReadError::Reset(_) | ReadError::ClosedStream => End::Closed,
            e => End::Failed(format!("QUIC stream: {e}")),
        }
    }

    fn of_write(e: WriteError) -> End {
        match e {
            WriteError::ConnectionLost(e) => End::of_connection(&e),
            WriteError::Stopped(_) | WriteError::ClosedStream => End::Closed,
            e => End::Failed(format!("QUIC stream: {e}")),
        }
    }
}

/// An abort's close reason: the culprit (u64 LE, [`NO_CULPRIT`] for none), then the reason
/// in UTF-8, cut at a character boundary.
fn encode_abort(culprit: Option<usize>, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(REASON_BYTES);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let code = culprit.map_or(NO_CULPRIT, |c| c as u64);
    let mut out = code.to_le_bytes().to_vec();
    out.extend_from_slice(&reason.as_bytes()[..cut]);
    out
}

/// Whatever the peer sent, as an abort (no panics on a short or garbled reason).
fn decode_abort(bytes: &[u8]) -> End {
    let Some((code, reason)) = bytes.split_first_chunk::<8>() else {
        return End::Aborted {
            culprit: None,
            reason: String::from_utf8_lossy(bytes).into_owned(),
        };
    };
    let code = u64::from_le_bytes(*code);
    End::Aborted {
        culprit: (code != NO_CULPRIT).then(|| usize::try_from(code).ok()).flatten(),
        reason: String::from_utf8_lossy(reason).into_owned(),
    }
}

/// A nonblocking eventfd used as a level: set or clear.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn set(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor. It cannot block (the
        // counter is 0 or 1) and cannot fail on a valid eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn clear(&self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live u64; nonblocking, so an already clear counter
        // only returns EAGAIN.
        unsafe { libc::read(self.0.as_raw_fd(), (&raw mut count).cast(), 8) };
    }
}

struct Inbox {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    end: Option<End>,
    /// The link is gone: the reader task stops.
    dropped: bool,
}

struct Outbox {
    bufs: VecDeque<Vec<u8>>,
    bytes: usize,
    end: Option<End>,
    /// The link is gone or aborted: the writer task flushes (unless aborted) and stops.
    closing: bool,
}

/// What a link and its two tasks share.
struct Pipe {
    inbox: Mutex<Inbox>,
    outbox: Mutex<Outbox>,
    /// Wakes the reader task when the inbox has room again or the link is dropped.
    room: Notify,
    /// Wakes the writer task when the outbox has bytes or the link is closing.
    work: Notify,
    /// Set exactly while the inbox has bytes or an end.
    readable: EventFd,
    /// Set exactly while the outbox has room or an end.
    writable: EventFd,
}

impl Pipe {
    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end_inbox(&self, end: End) {
        let mut inbox = self.inbox();
        if inbox.end.is_none() {
            if inbox.bytes == 0 {
                self.readable.set();
            }
            inbox.end = Some(end);
        }
    }

    fn end_outbox(&self, end: End) {
        let mut outbox = self.outbox();
        if outbox.end.is_none() {
            if outbox.bytes >= OUTBOX_BYTES {
                self.writable.set();
            }
            outbox.end = Some(end);
        }
    }
}

/// A QUIC link: one bidirectional stream of a connection that serves only it.
pub struct QuicLink {
    pipe: Arc<Pipe>,
    conn: quinn::Connection,
    /// Keeps the runtime that drives the tasks alive; dropped last.
    _core: Arc<Core>,
}

impl QuicLink {
    /// Start the reader and writer tasks on a connection that passed the handshake.
    pub(super) fn start(core: Arc<Core>, parts: Parts) -> Result<QuicLink, LinkError> {
        let pipe = Arc::new(Pipe {
            inbox: Mutex::new(Inbox {
                chunks: VecDeque::new(),
                bytes: 0,
                end: None,
                dropped: false,
            }),
            outbox: Mutex::new(Outbox {
                bufs: VecDeque::new(),
                bytes: 0,
                end: None,
                closing: false,
            }),
            room: Notify::new(),
            work: Notify::new(),
            readable: EventFd::new()?,
            writable: EventFd::new()?,
        });
        pipe.writable.set();
        let Parts { conn, send, recv } = parts;
        core.handle().spawn(read_loop(pipe.clone(), recv));
        core.handle().spawn(write_loop(pipe.clone(), send, conn.clone()));
        Ok(QuicLink {
            pipe,
            conn,
            _core: core,
        })
    }
}

/// Fill the inbox from the stream until it ends or the link is dropped; wait while the
/// inbox is full (QUIC's flow control then stops the peer).
async fn read_loop(pipe: Arc<Pipe>, mut recv: RecvStream) {
    loop {
        loop {
            {
                let inbox = pipe.inbox();
                if inbox.dropped {
                    return;
                }
                if inbox.bytes < INBOX_BYTES {
                    break;
                }
            }
            // A `notify_one` between the check and here leaves a permit: no lost wake-up.
            pipe.room.notified().await;
        }
        let chunk = match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return pipe.end_inbox(End::Closed),
            Err(e) => return pipe.end_inbox(End::of_read(e)),
        };
        if chunk.bytes.is_empty() {
            continue;
        }
        let mut inbox = pipe.inbox();
        if inbox.dropped {
            return;
        }
        if inbox.bytes == 0 {
            pipe.readable.set();
        }
        inbox.bytes += chunk.bytes.len();
        inbox.chunks.push_back(chunk);
    }
}

/// Drain the outbox into the stream. When the link closes: deliver what is left, finish the
/// stream, wait (bounded) for the peer's acknowledgement, then close the connection.
async fn write_loop(pipe: Arc<Pipe>, mut send: SendStream, conn: quinn::Connection) {
    loop {
        // The guard must not live across an await (the task moves between threads).
        let bufs = {
            let mut outbox = pipe.outbox();
            if outbox.bytes >= OUTBOX_BYTES {
                pipe.writable.set();
            }
            outbox.bytes = 0;
            if outbox.bufs.is_empty() && outbox.closing {
                break;
            }
            std::mem::take(&mut outbox.bufs)
        };
        if bufs.is_empty() {
            pipe.work.notified().await;
            continue;
        }
        for buf in bufs {
            if let Err(e) = send.write_chunk(buf.into()).await {
                return pipe.end_outbox(End::of_write(e));
            }
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    conn.close(VarInt::from_u32(CLOSE_DONE), b"link closed");
}

impl QuicLink {
    /// Account for `n` bytes taken from the inbox.
    fn consumed(&self, inbox: &mut Inbox, n: usize) {
        let before = inbox.bytes;
        inbox.bytes -= n;
        if inbox.bytes == 0 && inbox.end.is_none() {
            self.pipe.readable.clear();
        }
        if before >= INBOX_BYTES && inbox.bytes < INBOX_BYTES {
            self.pipe.room.notify_one();
        }
    }
}

impl Link for QuicLink {
    fn kind(&self) -> LinkKind {
        LinkKind::Quic
    }

    fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut outbox = self.pipe.outbox();
        if let Some(end) = &outbox.end {
            return Err(end.error());
        }
        if outbox.closing {
            return Err(LinkError::Closed);
        }
        let n = OUTBOX_BYTES.saturating_sub(outbox.bytes).min(data.len());
        if n == 0 {
            return Ok(0);
        }
        let was_empty = outbox.bufs.is_empty();
        match outbox.bufs.back_mut() {
            Some(last) if last.len() + n <= COALESCE => last.extend_from_slice(&data[..n]),
            _ => outbox.bufs.push_back(data[..n].to_vec()),
        }
        outbox.bytes += n;
        if outbox.bytes >= OUTBOX_BYTES {
            self.pipe.writable.clear();
        }
        drop(outbox);
        // The writer sleeps only on an empty outbox.
        if was_empty {
            self.pipe.work.notify_one();
        }
        Ok(n)
    }

    fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut inbox = self.pipe.inbox();
        if inbox.bytes == 0 {
            return inbox.end.as_ref().map_or(Ok(0), |end| Err(end.error()));
        }
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = inbox.chunks.front_mut() else { break };
            let take = front.bytes.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&front.bytes[..take]);
            if take == front.bytes.len() {
                inbox.chunks.pop_front();
            } else {
                let _ = front.bytes.split_to(take);
            }
            n += take;
        }
        self.consumed(&mut inbox, n);
        Ok(n)
    }

    fn wait(&self, interest: Interest, timeout: Duration) {
        let fd = |e: &EventFd| libc::pollfd {
            fd: e.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [fd(&self.pipe.readable), fd(&self.pipe.writable)];
        let slice: &mut [libc::pollfd] = match (interest.read, interest.write) {
            (true, true) => &mut fds,
            (true, false) => &mut fds[..1],
            (false, true) => &mut fds[1..],
            (false, false) => return,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: a valid array of `slice.len()` pollfd structs for the duration of the call.
        unsafe { libc::poll(slice.as_mut_ptr(), slice.len() as libc::nfds_t, ms) };
    }

    /// The `readable` eventfd, which `poll(2)` reports readable exactly while bytes (or an
    /// end) wait. Callers may also poll it for writing, where an eventfd is always ready, so
    /// it is offered only while the outbox has room, when a write can indeed proceed.
    fn poll_fd(&self) -> Option<RawFd> {
        let outbox = self.pipe.outbox();
        (outbox.bytes < OUTBOX_BYTES || outbox.end.is_some()).then(|| self.pipe.readable.0.as_raw_fd())
    }

    fn abort(&mut self, culprit: Option<usize>, reason: &str) {
        // Close first: the writer must not finish the stream, which the peer would read as
        // an orderly end before the abort.
        self.conn
            .close(VarInt::from_u32(CLOSE_ABORT), &encode_abort(culprit, reason));
        self.pipe.end_outbox(End::Closed);
        self.pipe.outbox().closing = true;
        self.pipe.work.notify_one();
    }

    fn peer_alive(&self) -> bool {
        // Only silence past the idle timeout says the peer is gone; a close says something else.
        !matches!(self.conn.close_reason(), Some(ConnectionError::TimedOut))
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        // Nothing here waits: the writer task delivers what is queued in the background.
        self.pipe.inbox().dropped = true;
        self.pipe.room.notify_one();
        self.pipe.outbox().closing = true;
        self.pipe.work.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_reasons_round_trip_and_garbage_decodes() {
        let e = decode_abort(&encode_abort(Some(3), "rank 3 timed out"));
        assert_eq!(
            e,
            End::Aborted {
                culprit: Some(3),
                reason: "rank 3 timed out".into()
            }
        );
        let e = decode_abort(&encode_abort(None, "bye"));
        assert_eq!(
            e,
            End::Aborted {
                culprit: None,
                reason: "bye".into()
            }
        );
        // Cut at a character boundary, never inside one.
        let long = "é".repeat(REASON_BYTES);
        let End::Aborted { reason, .. } = decode_abort(&encode_abort(Some(1), &long)) else {
            panic!("not an abort")
        };
        assert!(
            reason.len() <= REASON_BYTES && reason.chars().all(|c| c == 'é'),
            "{reason}"
        );
        // Short or invalid bytes from a peer: still an abort, no panic.
        assert!(matches!(decode_abort(b"x"), End::Aborted { culprit: None, .. }));
        assert!(matches!(decode_abort(&[0xff; 12]), End::Aborted { culprit: None, .. }));
    }
}
