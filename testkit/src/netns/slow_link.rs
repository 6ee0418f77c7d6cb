//! A slow cable: a host's veth pair replaced by two TAP devices (`eth0` in the host, `p<i>` on
//! the switch) with this process relaying every Ethernet frame between them, late by the
//! [`DelaySchedule`] of a [`LinkProfile`].
//!
//! Why frames and not a TCP proxy: this kernel has neither `netem` nor the iptables tools a
//! transparent TCP proxy needs to catch connections, and ranks connect to addresses and ports
//! they learn at run time (the store's `MASTER_PORT`, every rank's listener, in whichever
//! direction the rank numbers say), so a proxy at fixed ports would miss most of them. At the
//! cable, every connection of the host — store, rank links both ways, heartbeats — crosses
//! the delay and the stalls, and nothing in gantry has to know. The switch end is still
//! `p<i>` on the bridge, so [`super::Cluster::link_down`] (writes into a down TAP fail: frames
//! are dropped) and `set_rate` keep working on a slow host.

use super::delay::{DelaySchedule, LinkProfile};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Frames waiting in one direction beyond which new ones are dropped (a router's buffer):
/// a stall holds at most this many.
const QUEUE_FRAMES: usize = 100_000;
/// Longest wait of a relay thread, so a stop request is seen promptly.
const POLL_MS: i32 = 50;
/// Larger than any frame a TAP hands out without offloads (MTU + Ethernet header).
const FRAME_BYTES: usize = 65_536;

/// What a slow link relayed so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames from the host out to the switch.
    pub sent: u64,
    /// Frames from the switch in to the host.
    pub received: u64,
    /// Frames whose departure a stall pushed back.
    pub stalled: u64,
    /// Frames lost: the far end was down (a pulled cable) or the queue was full.
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    stalled: AtomicU64,
    dropped: AtomicU64,
}

/// The relay threads of one host's slow cable; stopping it removes both TAP devices.
pub(super) struct SlowLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl SlowLink {
    /// Relay frames between `host_end` and `switch_end` per `profile`.
    pub(super) fn start(host_end: File, switch_end: File, profile: LinkProfile) -> io::Result<SlowLink> {
        for f in [&host_end, &switch_end] {
            set_nonblocking(f)?;
        }
        let (host_end, switch_end) = (Arc::new(host_end), Arc::new(switch_end));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let start = Instant::now();
        let mut threads = Vec::new();
        for (outbound, from, to) in [(true, &host_end, &switch_end), (false, &switch_end, &host_end)] {
            let relay = Relay {
                from: from.clone(),
                to: to.clone(),
                schedule: DelaySchedule::new(profile, u64::from(outbound)),
                start,
                outbound,
                stop: stop.clone(),
                counters: counters.clone(),
            };
            let name = if outbound { "slow-link-out" } else { "slow-link-in" };
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || relay.run())?,
            );
        }
        Ok(SlowLink {
            stop,
            threads,
            counters,
        })
    }

    pub(super) fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            stalled: c.stalled.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One direction of the cable.
struct Relay {
    from: Arc<File>,
    to: Arc<File>,
    schedule: DelaySchedule,
    start: Instant,
    outbound: bool,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Relay {
    fn run(mut self) {
        let mut queue: VecDeque<(Duration, Vec<u8>)> = VecDeque::new();
        let mut buf = vec![0u8; FRAME_BYTES];
        while !self.stop.load(Ordering::Relaxed) {
            let now = self.start.elapsed();
            let wait = queue.front().map_or(POLL_MS, |(due, _)| {
                let ms = due.saturating_sub(now).as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(POLL_MS).min(POLL_MS)
            });
            if wait > 0 {
                // Woken by a frame to read or by the next departure, whichever comes first.
                wait_readable(&self.from, wait);
            }
            loop {
                match (&*self.from).read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => self.enqueue(&mut queue, buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The device went away (its namespace was deleted): the cable is gone.
                    Err(_) => return,
                }
            }
            let now = self.start.elapsed();
            while queue.front().is_some_and(|(due, _)| *due <= now) {
                let (_, frame) = queue.pop_front().expect("checked non-empty");
                // A down TAP refuses writes (EIO): the frame is lost, as on a pulled cable.
                if (&*self.to).write(&frame).is_err() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                } else if self.outbound {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn enqueue(&mut self, queue: &mut VecDeque<(Duration, Vec<u8>)>, frame: Vec<u8>) {
        if queue.len() >= QUEUE_FRAMES {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let departure = self.schedule.depart(self.start.elapsed());
        if departure.held {
            self.counters.stalled.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back((departure.at, frame));
    }
}

/// Wait up to `ms` milliseconds for `file` to have something to read.
fn wait_readable(file: &File, ms: i32) {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: plain fcntl calls on a descriptor this function's caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags == -1 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A TAP device named `name` in the calling thread's network namespace, without packet
/// information headers: each read is one Ethernet frame. It exists while the file is open.
pub(super) fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name `{name}` is empty or too long"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) with its terminating zero.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
