//! Tests of the shared-memory ring link.
use super::ring::SMALL_LANE_BYTES;
use super::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

const READ: Interest = Interest {
    read: true,
    write: false,
};
const WRITE: Interest = Interest {
    read: false,
    write: true,
};

/// A unique scratch directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Under `/dev/shm` (tmpfs, as in production) if `shm` and it exists, else under TMPDIR.
    pub(crate) fn new(shm: bool) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Relaxed);
        let dev_shm = Path::new("/dev/shm");
        let base = if shm && dev_shm.is_dir() {
            dev_shm.into()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("gantry-shm-test-{}-{n}", std::process::id()));
        // A recycled pid may find a directory an earlier, killed test run left behind.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn is_empty(&self) -> bool {
        fs::read_dir(&self.0).unwrap().next().is_none()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Connect ranks 0 and 1 from two threads; returns (link of 0, link of 1).
fn pair(dir: &Path, cap: usize) -> (ShmLink, ShmLink) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let d = dir.to_path_buf();
    let t = std::thread::spawn(move || ShmLink::connect(&d, "s", "c", 1, 0, cap, deadline));
    let a = ShmLink::connect(dir, "s", "c", 0, 1, cap, deadline).unwrap();
    (a, t.join().unwrap().unwrap())
}

/// Byte `i` of the test stream (splitmix64 of the word index).
fn pattern(i: u64) -> u8 {
    let mut z = (i / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()[(i % 8) as usize]
}

fn write_all(link: &mut ShmLink, mut data: &[u8]) {
    while !data.is_empty() {
        match link.try_write(data).unwrap() {
            0 => link.wait(WRITE, Duration::from_millis(100)),
            n => data = &data[n..],
        }
    }
}

#[test]
fn streams_64_mib_through_64_kib_ring() {
    const TOTAL: u64 = 64 << 20;
    let dir = TempDir::new(false);
    let (mut a, mut b) = pair(&dir.0, 1000); // rounded up to 64 KiB
    assert_eq!((a.capacity(), b.kind()), (MIN_RING_BYTES, LinkKind::Shm));
    let writer = std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(1);
        let mut pos = 0;
        while pos < TOTAL {
            let len = rng.random_range(1..=100_000).min(TOTAL - pos);
            let chunk: Vec<u8> = (pos..pos + len).map(pattern).collect();
            write_all(&mut a, &chunk);
            pos += len;
        }
    });
    let mut rng = StdRng::seed_from_u64(2);
    let mut buf = vec![0u8; 100_000];
    let mut pos = 0;
    while pos < TOTAL {
        let want = rng.random_range(1..=buf.len());
        let mut at = pos;
        let mut check = |s: &[u8]| {
            for &x in s {
                assert_eq!(x, pattern(at), "byte {at}");
                at += 1;
            }
        };
        let n = if rng.random_bool(0.5) {
            let n = b.try_read_into(&mut buf[..want]).unwrap();
            check(&buf[..n]);
            n
        } else {
            b.try_read_with(want, &mut check).unwrap()
        };
        assert_eq!(at, pos + n as u64);
        if n == 0 {
            b.wait(READ, Duration::from_millis(100));
        }
        pos += n as u64;
    }
    writer.join().unwrap(); // drops the writer's link: end of stream
    assert!(matches!(b.try_read_into(&mut buf), Err(LinkError::Closed)));
}

#[test]
fn read_with_delivers_exactly_the_written_bytes() {
    let dir = TempDir::new(false);
    let (mut a, mut b) = pair(&dir.0, MIN_RING_BYTES);
    let mut got = Vec::new();
    // Leave the positions 10 bytes before the end so the next message wraps.
    let filler = vec![7u8; MIN_RING_BYTES - 10];
    assert_eq!(a.try_write(&filler).unwrap(), filler.len());
    let n = b.try_read_with(usize::MAX, &mut |s| got.extend_from_slice(s));
    assert_eq!((n.unwrap(), &got), (filler.len(), &filler));
    assert_eq!(b.try_read_with(9, &mut |_| panic!("no data")).unwrap(), 0);
    let msg: Vec<u8> = (0..100).collect();
    assert_eq!(a.try_write(&msg).unwrap(), 100);
    let mut slices = Vec::new();
    assert_eq!(b.try_read_with(60, &mut |s| slices.push(s.to_vec())).unwrap(), 60);
    assert_eq!(slices, [&msg[..10], &msg[10..60]]); // two slices, split at the wrap
    got.clear();
    assert_eq!(b.try_read_with(1000, &mut |s| got.extend_from_slice(s)).unwrap(), 40);
    assert_eq!(got, msg[60..]);
    // The other direction; a full ring says "would block".
    let big = vec![1u8; 2 * MIN_RING_BYTES];
    assert_eq!(b.try_write(&big).unwrap(), MIN_RING_BYTES);
    assert_eq!(b.try_write(&big).unwrap(), 0);
}

/// A frame's parts go out as their concatenation in one publish: across the ring's end, and as
/// a prefix (ending inside any part) when the ring has less room; empty parts are skipped. The
/// trait's default (part after part) gives the same bytes.
#[test]
fn frame_parts_are_the_concatenation_wrapping_and_cut_short() {
    // A frame length that takes the stream lane, which `try_read_with` reads.
    const STREAM: usize = SMALL_FRAME_MAX + 1;
    let dir = TempDir::new(false);
    let (mut a, mut b) = pair(&dir.0, MIN_RING_BYTES);
    let read_all = |b: &mut ShmLink| {
        let mut got = Vec::new();
        while b.try_read_with(usize::MAX, &mut |s| got.extend_from_slice(s)).unwrap() > 0 {}
        got
    };
    let filler = vec![7u8; MIN_RING_BYTES - 20];
    assert_eq!(a.try_write(&filler).unwrap(), filler.len());
    assert_eq!(read_all(&mut b), filler);
    let (h, d, p): (Vec<u8>, Vec<u8>, Vec<u8>) = ((0..16).collect(), (100..150).collect(), vec![0; 6]);
    let whole = [&h[..], &[], &d[..], &p[..]].concat();
    // Wraps 20 bytes in, inside the payload.
    assert_eq!(a.try_write_frame(STREAM, &[&h, &[], &d, &p]).unwrap(), whole.len());
    assert_eq!(read_all(&mut b), whole);
    // Room for only 30 bytes: the header and 14 bytes of the payload, nothing of the padding.
    let room = MIN_RING_BYTES - 30;
    assert_eq!(a.try_write(&vec![1u8; room]).unwrap(), room);
    assert_eq!(a.try_write_frame(STREAM, &[&h, &d, &p]).unwrap(), 30);
    assert_eq!(
        a.try_write_frame(STREAM, &[&h, &d, &p]).unwrap(),
        0,
        "a full ring writes nothing"
    );
    let got = read_all(&mut b);
    assert_eq!(&got[room..], &whole[..30]);

    /// Only `try_write`, so the trait's default `try_write_frame` runs.
    struct Plain<'a>(&'a mut ShmLink);
    impl Link for Plain<'_> {
        fn kind(&self) -> LinkKind {
            LinkKind::Shm
        }
        fn try_write(&mut self, data: &[u8]) -> Result<usize, LinkError> {
            self.0.try_write(data)
        }
        fn try_read_into(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
            self.0.try_read_into(buf)
        }
        fn wait(&self, interest: Interest, timeout: Duration) {
            self.0.wait(interest, timeout)
        }
        fn abort(&mut self, culprit: Option<usize>, reason: &str) {
            self.0.abort(culprit, reason)
        }
    }
    assert_eq!(a.try_write(&vec![1u8; room]).unwrap(), room);
    assert_eq!(Plain(&mut a).try_write_frame(STREAM, &[&h, &[], &d, &p]).unwrap(), 30);
    assert_eq!(&read_all(&mut b)[room..], &whole[..30]);
}

/// Frames up to `SMALL_FRAME_MAX` bytes travel in the small lane and larger ones in the stream
/// lane, each lane in order, so interleaved frames of both sizes arrive intact when the reader
/// asks for the sizes the writer sent; the small lane wraps like the stream does.
#[test]
fn frames_take_the_lane_of_their_size_and_keep_their_order() {
    let dir = TempDir::new(false);
    let (mut a, mut b) = pair(&dir.0, MIN_RING_BYTES);
    let sizes = [64, SMALL_FRAME_MAX, SMALL_FRAME_MAX + 64, 1088, 20_000, 64, 3008, 1088];
    let mut sent = 0u64;
    // Enough rounds for the small lane to wrap many times.
    for round in 0..40 {
        let frames: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| {
                let f: Vec<u8> = (sent..sent + n as u64).map(pattern).collect();
                sent += n as u64;
                f
            })
            .collect();
        for f in &frames {
            let (h, rest) = f.split_at(16);
            assert_eq!(
                a.try_write_frame(f.len(), &[h, rest]).unwrap(),
                f.len(),
                "round {round}"
            );
            // The reader takes each frame right away, so neither lane fills up.
            let mut got = Vec::new();
            while got.len() < f.len() {
                let want = f.len() - got.len();
                b.try_read_frame(f.len(), want, &mut |s| got.extend_from_slice(s))
                    .unwrap();
            }
            assert_eq!(&got, f, "round {round}, a {}-byte frame", f.len());
        }
    }
    assert!(sent > 40 * SMALL_LANE_BYTES as u64);
}

/// A reader that expects a frame of another size than the one sent (the lanes differ) gets a
/// protocol error naming both lanes at once, in either direction, instead of waiting for a
/// frame that never comes; a frame published in its own lane meanwhile is not a mismatch.
#[test]
fn a_frame_in_the_other_lane_is_named_not_waited_for() {
    let dir = TempDir::new(false);
    let (mut a, mut b) = pair(&dir.0, MIN_RING_BYTES);
    let (small, large) = (vec![1u8; 1088], vec![2u8; SMALL_FRAME_MAX + 64]);
    let mut sink = |_: &[u8]| {};
    // Nothing sent: an empty read, no error.
    assert_eq!(b.try_read_frame(small.len(), small.len(), &mut sink).unwrap(), 0);
    a.try_write_frame(small.len(), &[&small]).unwrap();
    let err = b.try_read_frame(large.len(), large.len(), &mut sink).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("small lane while this rank waits for one in the stream lane"),
        "{msg}"
    );
    // The other way round, on the other direction of the link.
    b.try_write_frame(large.len(), &[&large]).unwrap();
    let err = a.try_read_frame(small.len(), small.len(), &mut sink).unwrap_err();
    assert!(
        err.to_string()
            .contains("stream lane while this rank waits for one in the small lane"),
        "{err}"
    );
    // Both lanes holding data is no mismatch: the reader takes its own lane's frame.
    a.try_write_frame(large.len(), &[&large]).unwrap();
    let mut got = 0;
    b.try_read_frame(large.len(), large.len(), &mut |s| got += s.len())
        .unwrap();
    assert_eq!(got, large.len());
    b.try_read_frame(small.len(), small.len(), &mut |s| got += s.len())
        .unwrap();
    assert_eq!(got, large.len() + small.len());
}

/// A reader asleep is woken by a small-lane frame, and a writer that filled the small lane
/// sleeps until the reader drains it, not until its timeout.
#[test]
fn small_lane_frames_wake_sleepers_on_both_sides() {
    let dir = TempDir::new(true);
    let (mut a, mut b) = pair(&dir.0, MIN_RING_BYTES);
    let frame = vec![5u8; SMALL_FRAME_MAX];
    let long = Duration::from_secs(20);
    let read_one = |b: &mut ShmLink| {
        let mut got = 0;
        while got < SMALL_FRAME_MAX {
            match b.try_read_frame(SMALL_FRAME_MAX, SMALL_FRAME_MAX - got, &mut |s| got += s.len()) {
                Ok(0) => b.wait(READ, long),
                r => assert!(r.is_ok(), "{r:?}"),
            }
        }
    };
    std::thread::scope(|scope| {
        // The reader sleeps on an empty lane; one frame wakes it.
        let reader = scope.spawn(|| {
            let t0 = Instant::now();
            read_one(&mut b);
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(a.try_write_frame(SMALL_FRAME_MAX, &[&frame]).unwrap(), SMALL_FRAME_MAX);
        assert!(reader.join().unwrap() < long / 2, "the reader slept out its timeout");
    });
    // Two frames fill the lane, so the third finds no room until the reader takes one.
    for _ in 0..2 {
        assert_eq!(a.try_write_frame(SMALL_FRAME_MAX, &[&frame]).unwrap(), SMALL_FRAME_MAX);
    }
    assert_eq!(
        a.try_write_frame(SMALL_FRAME_MAX, &[&frame]).unwrap(),
        0,
        "the lane is full"
    );
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            read_one(&mut b);
        });
        let t0 = Instant::now();
        while a.try_write_frame(SMALL_FRAME_MAX, &[&frame]).unwrap() == 0 {
            a.wait(WRITE, long);
        }
        assert!(t0.elapsed() < long / 2, "the writer slept out its timeout");
    });
}

#[test]
fn files_are_unlinked_after_connect() {
    let dir = TempDir::new(false);
    let _links = pair(&dir.0, MIN_RING_BYTES);
    assert!(dir.is_empty());
}

#[test]
fn abort_reaches_the_peer_and_wakes_it() {
    let dir = TempDir::new(false);
    let (mut a, mut b) = pair(&dir.0, MIN_RING_BYTES);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        a.abort(Some(3), "rank 3 timed out");
        a
    });
    let start = Instant::now();
    b.wait(READ, Duration::from_secs(20));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "abort did not wake the reader"
    );
    let mut a = t.join().unwrap();
    for r in [b.try_read_into(&mut [0u8; 8]), b.try_write(b"x")] {
        match r {
            Err(LinkError::Aborted { culprit, reason }) => {
                assert_eq!((culprit, reason.as_str()), (Some(3), "rank 3 timed out"))
            }
            other => panic!("expected Aborted, got {other:?}"),
        }
    }
    // The aborting side does not take its own abort for the peer's.
    assert_eq!(a.try_write(b"x").unwrap(), 1);
}

#[test]
fn connect_does_not_wait_for_the_peer() {
    let dir = TempDir::new(false);
    let far = Instant::now() + Duration::from_secs(3600);
    let connect = |me, key| ShmLink::connect(&dir.0, "s", key, me, 1 - me, 0, far).unwrap();
    let mut a = connect(0, "k");
    assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 2);
    assert_eq!(a.try_read_into(&mut [0; 8]).unwrap(), 0);
    assert!(a.peer_alive()); // not known yet
    assert_eq!(a.try_write(b"early").unwrap(), 5); // waits in the ring for the peer
    drop(a); // even gone before the peer comes, like a TCP sender
    let mut b = connect(1, "k");
    assert!(dir.is_empty());
    let mut buf = [0u8; 8];
    assert_eq!(b.try_read_into(&mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"early");
    assert!(matches!(b.try_read_into(&mut buf), Err(LinkError::Closed)));
    assert!(matches!(b.try_write(b"x"), Err(LinkError::Closed)));
}

#[test]
fn stale_files_are_replaced_and_removable() {
    let dir = TempDir::new(false);
    let far = Instant::now() + Duration::from_secs(3600);
    let connect = |s, me| ShmLink::connect(&dir.0, s, "k", me, 1 - me, 0, far).unwrap();
    // A link whose peer never came leaves its files; a new link with the same name must not
    // pick up its bytes.
    connect("s", 0).try_write(b"old").unwrap();
    let mut a = connect("s", 0);
    let mut b = connect("s", 1);
    a.try_write(b"new").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(b.try_read_into(&mut buf).unwrap(), 3);
    assert_eq!(&buf[..3], b"new");
    drop((connect("s", 0), connect("s-2", 0)));
    assert_eq!(remove_session_files(&dir.0, "s").unwrap(), 2);
    assert_eq!(remove_session_files(&dir.0, "s-2").unwrap(), 2);
    assert!(dir.is_empty());
}

#[test]
fn ranks_connecting_in_a_cycle_do_not_deadlock() {
    let dir = TempDir::new(false);
    let threads: Vec<_> = (0..3)
        .map(|me| {
            let d = dir.0.clone();
            std::thread::spawn(move || {
                let far = Instant::now() + Duration::from_secs(3600);
                let connect = |p| ShmLink::connect(&d, "s", "ring", me, p, 0, far).unwrap();
                // Right neighbour first, as a ring step does: a cycle of waits if blocking.
                let (mut right, mut left) = (connect((me + 1) % 3), connect((me + 2) % 3));
                write_all(&mut right, &[me as u8]);
                let mut got = [0u8];
                let give_up = Instant::now() + Duration::from_secs(30);
                while left.try_read_into(&mut got).unwrap() == 0 {
                    assert!(
                        Instant::now() < give_up,
                        "rank {me} never heard from its left neighbour"
                    );
                    left.wait(READ, Duration::from_millis(100));
                }
                assert_eq!(usize::from(got[0]), (me + 2) % 3);
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert!(dir.is_empty());
}

#[test]
fn mismatched_capacity_is_a_protocol_error() {
    let dir = TempDir::new(false);
    let far = Instant::now() + Duration::from_secs(3600);
    let _a = ShmLink::connect(&dir.0, "s", "k", 0, 1, MIN_RING_BYTES, far).unwrap();
    let r = ShmLink::connect(&dir.0, "s", "k", 1, 0, 2 * MIN_RING_BYTES, far);
    assert!(matches!(r, Err(LinkError::Protocol(_))), "{:?}", r.map(|_| ()));
}

#[test]
fn killed_unreaped_child_is_dead() {
    let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
    let pid = child.id() as i32;
    assert!(process_alive(pid));
    child.kill().unwrap(); // not waited for: it stays a zombie
    let start = Instant::now();
    while process_alive(pid) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!process_alive(pid), "killed, unreaped child reported alive");
    child.wait().unwrap();
    assert!(process_alive(std::process::id() as i32));
}

/// Not a benchmark gate: prints the rate (`cargo test shm -- --nocapture` to see it).
#[test]
fn throughput_64_mib_through_4_mib_ring() {
    const TOTAL: usize = 64 << 20;
    let dir = TempDir::new(true);
    let (mut a, mut b) = pair(&dir.0, DEFAULT_RING_BYTES);
    let data = vec![0x5au8; TOTAL];
    let start = Instant::now();
    let writer = std::thread::spawn(move || write_all(&mut a, &data));
    let (mut buf, mut got) = (vec![0u8; 1 << 20], 0);
    while got < TOTAL {
        match b.try_read_into(&mut buf).unwrap() {
            0 => b.wait(READ, Duration::from_millis(100)),
            n => {
                assert_eq!((buf[0], buf[n - 1]), (0x5a, 0x5a));
                got += n;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    writer.join().unwrap();
    println!(
        "shm: {TOTAL} bytes in {secs:.4} s = {:.2} GB/s",
        TOTAL as f64 / secs / 1e9
    );
}
