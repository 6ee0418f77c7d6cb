//! Real QUIC endpoints on 127.0.0.1 in one process: bulk transfer both ways, refusals,
//! graceful close and abort.

use super::*;
use crate::auth::JobSecret;
use crate::link::{Interest, Link};
use rand::RngCore;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn job(secret: &str) -> JobAuth {
    JobAuth::new(JobSecret::parse(secret).unwrap(), "job-q", 1)
}

fn identity() -> TlsIdentity {
    TlsIdentity::generate().unwrap()
}

fn endpoint(rank: usize, auth: Option<JobAuth>, mtu: u16) -> QuicEndpoint {
    QuicEndpoint::bind_with_mtu("127.0.0.1:0", rank, auth, &identity(), mtu).unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

/// Rank 1 dials rank 0 for `key`; returns (rank 0's link, rank 1's link).
fn connect(ep0: &QuicEndpoint, ep1: &QuicEndpoint, key: &str, auth1: Option<&JobAuth>) -> (QuicLink, QuicLink) {
    let addr = ep0.local_addr().to_string();
    let l1 = ep1.dial(&addr, key, 1, 0, auth1, soon()).unwrap();
    let l0 = ep0.take(key, 1, soon()).unwrap();
    (l0, l1)
}

/// Random bytes with a prime period; a stream carries `PATTERN[(pos + seed) % PERIOD]`, so a
/// lost, repeated or reordered piece shows.
const PERIOD: usize = 65521;
const CHUNK: usize = 1 << 20;

struct Pattern(Vec<u8>);

impl Pattern {
    fn new() -> Pattern {
        let mut table = vec![0u8; PERIOD];
        rand::rng().fill_bytes(&mut table);
        Pattern((0..PERIOD + CHUNK).map(|i| table[i % PERIOD]).collect())
    }

    fn at(&self, pos: usize, seed: usize, len: usize) -> &[u8] {
        let start = (pos + seed) % PERIOD;
        &self.0[start..start + len]
    }
}

/// Send `total` bytes of the pattern under `send_seed` while receiving and checking `total`
/// bytes under `recv_seed`, on one thread.
fn exchange(link: &mut dyn Link, p: &Pattern, total: usize, send_seed: usize, recv_seed: usize) {
    let mut inbuf = vec![0u8; CHUNK];
    let (mut sent, mut got) = (0, 0);
    let mut last_progress = Instant::now();
    while sent < total || got < total {
        let mut progressed = false;
        if sent < total {
            let n = link.try_write(p.at(sent, send_seed, CHUNK.min(total - sent))).unwrap();
            sent += n;
            progressed |= n > 0;
        }
        if got < total {
            let want = CHUNK.min(total - got);
            let n = link.try_read_into(&mut inbuf[..want]).unwrap();
            assert!(
                inbuf[..n] == *p.at(got, recv_seed, n),
                "bytes {got}..{} differ",
                got + n
            );
            got += n;
            progressed |= n > 0;
        }
        if progressed {
            last_progress = Instant::now();
            continue;
        }
        // A guard against a hang, not a timing assertion.
        assert!(
            last_progress.elapsed() < Duration::from_secs(60),
            "stalled at sent {sent} got {got}"
        );
        let interest = Interest {
            read: got < total,
            write: sent < total,
        };
        link.wait(interest, Duration::from_millis(50));
    }
}

/// Both links move `total` bytes each way at once; returns the seconds it took.
fn both_ways([l0, l1]: [Box<dyn Link>; 2], total: usize) -> f64 {
    let p = Arc::new(Pattern::new());
    let start = Instant::now();
    let threads: Vec<_> = [(l0, 0, 7), (l1, 7, 0)]
        .into_iter()
        .map(|(mut link, send_seed, recv_seed)| {
            let p = p.clone();
            std::thread::spawn(move || {
                exchange(link.as_mut(), &p, total, send_seed, recv_seed);
                link
            })
        })
        .collect();
    let links: Vec<Box<dyn Link>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let secs = start.elapsed().as_secs_f64();
    drop(links);
    secs
}

#[test]
fn sixty_four_mib_both_ways_arrive_intact() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth.clone()), MTU_CEILING);
    let ep1 = endpoint(1, Some(auth.clone()), MTU_CEILING);
    let (l0, l1) = connect(&ep0, &ep1, "world#1", Some(&auth));
    let total = 64 << 20;
    let secs = both_ways([Box::new(l0), Box::new(l1)], total);
    eprintln!(
        "QUIC loopback, MTU ceiling {MTU_CEILING}: 64 MiB each way at once in {secs:.2} s = {:.2} GB/s per direction",
        total as f64 / secs / 1e9
    );
    assert_eq!(ep0.refused_connections() + ep1.refused_connections(), 0);
}

/// Throughput by MTU ceiling, against plain TCP and against quinn's streams driven directly
/// (what the bridge to the `Link` calls costs), on the same machine in the same run. Run by
/// hand: `cargo nextest run -p gantry-collectives quic::tests::throughput --run-ignored only
/// --no-capture`.
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    let total = 256 << 20;
    let gbps = |secs: f64| total as f64 / secs / 1e9;
    let auth = job(SECRET);
    let tcp = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dialled = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let accepted = listener.accept().unwrap().0;
        let links: [Box<dyn Link>; 2] = [
            Box::new(crate::tcp::TcpLink::new(accepted).unwrap()),
            Box::new(crate::tcp::TcpLink::new(dialled).unwrap()),
        ];
        both_ways(links, total)
    };
    eprintln!("TCP: {:.2} GB/s per direction, both ways at once", gbps(tcp));
    // Ceilings of 7000 and more stall on loopback (the connection goes silent and times out).
    for mtu in [1452, 3000, 4500, 6000] {
        let ep0 = endpoint(0, Some(auth.clone()), mtu);
        let ep1 = endpoint(1, Some(auth.clone()), mtu);
        let raw = raw_quinn(&ep0, &ep1, &auth, total);
        let (l0, l1) = connect(&ep0, &ep1, "world#1", Some(&auth));
        let link = both_ways([Box::new(l0), Box::new(l1)], total);
        eprintln!(
            "QUIC, MTU ceiling {mtu}: QuicLink {:.2} GB/s, quinn streams alone {:.2} GB/s per direction, both ways \
             at once",
            gbps(link),
            gbps(raw)
        );
    }
}

/// `total` bytes each way over one authenticated connection's streams, driven by tasks on
/// the endpoints' runtimes; returns the seconds it took.
fn raw_quinn(ep0: &QuicEndpoint, ep1: &QuicEndpoint, auth: &JobAuth, total: usize) -> f64 {
    let dialing = Dialing {
        endpoint: ep1.core.endpoint.clone(),
        config: ep1.core.client.clone(),
        addrs: vec![ep0.local_addr()],
        addr: ep0.local_addr().to_string(),
        key: "raw".into(),
        me: 1,
        peer: 0,
        auth: Some(auth.clone()),
    };
    let p1 = ep1.core.run(dialing.until(soon())).unwrap().unwrap();
    let p0 = loop {
        if let Some(p) = ep0.pending.try_take("raw", 1) {
            break p;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (done, finished) = std::sync::mpsc::channel();
    let p1_mtu = p1.conn.clone();
    let start = Instant::now();
    for (core, parts) in [(&ep0.core, p0), (&ep1.core, p1)] {
        let Parts {
            conn,
            mut send,
            mut recv,
        } = parts;
        let done_sending = done.clone();
        core.handle().spawn(async move {
            let block = vec![7u8; CHUNK];
            let mut sent = 0;
            while sent < total {
                send.write_chunk(block.clone().into()).await.unwrap();
                sent += block.len();
            }
            done_sending.send(()).unwrap();
            // Keep the stream open until the test ends (a finish is no harm, but be plain).
            std::future::pending::<()>().await;
            drop((send, conn));
        });
        let done_receiving = done.clone();
        core.handle().spawn(async move {
            let mut got = 0;
            while got < total {
                got += recv.read_chunk(CHUNK, true).await.unwrap().unwrap().bytes.len();
            }
            done_receiving.send(()).unwrap();
        });
    }
    drop(done);
    for _ in 0..4 {
        finished.recv().expect("a transfer task failed");
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("  path MTU reached: {}", p1_mtu.stats().path.current_mtu);
    secs
}
/// Wait (bounded) until `ep` has refused `n` connections; the refusal is logged on the
/// listener's own task.
fn await_refusals(ep: &QuicEndpoint, n: u64) {
    let until = soon();
    while ep.refused_connections() < n && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ep.refused_connections(), n);
}

#[test]
fn a_wrong_secret_is_refused_on_both_sides_and_counted() {
    let (ours, theirs) = (job(SECRET), job("fedcba9876543210fedcba9876543210"));
    let ep0 = endpoint(0, Some(ours), MTU_CEILING);
    let ep1 = endpoint(1, Some(theirs.clone()), MTU_CEILING);
    let addr = ep0.local_addr().to_string();
    // The dialler checks the listener's proof first and refuses it.
    let err = ep1.dial(&addr, "world#1", 1, 0, Some(&theirs), soon()).err().unwrap();
    assert!(matches!(err, LinkError::Auth(_)), "{err}");
    assert!(err.to_string().contains("server's proof"), "{err}");
    assert!(!err.to_string().contains("fedcba"), "the secret leaked: {err}");
    // The listener sees the dialler hang up instead of proving itself, and counts it.
    await_refusals(&ep0, 1);
    let err = ep0
        .take("world#1", 1, Instant::now() + Duration::from_millis(100))
        .err()
        .unwrap();
    assert!(
        matches!(err, LinkError::Io(ref e) if e.kind() == io::ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(ep1.refused_connections(), 0);
}

#[test]
fn a_rank_without_a_secret_cannot_join_one_with_a_secret() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth), MTU_CEILING);
    let ep1 = endpoint(1, None, MTU_CEILING);
    let err = ep1
        .dial(&ep0.local_addr().to_string(), "world#1", 1, 0, None, soon())
        .err()
        .unwrap();
    assert!(matches!(err, LinkError::Auth(_)), "{err}");
    await_refusals(&ep0, 1);
}

#[test]
fn without_secrets_links_still_work() {
    let ep0 = endpoint(0, None, MTU_CEILING);
    let ep1 = endpoint(1, None, MTU_CEILING);
    let (l0, l1) = connect(&ep0, &ep1, "world#1", None);
    both_ways([Box::new(l0), Box::new(l1)], 1 << 20);
}

#[test]
fn links_are_filed_by_communicator_and_rank() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth.clone()), MTU_CEILING);
    let ep1 = endpoint(1, Some(auth.clone()), MTU_CEILING);
    let ep2 = endpoint(2, Some(auth.clone()), MTU_CEILING);
    let addr = ep0.local_addr().to_string();
    let mut a = ep1.dial(&addr, "a", 1, 0, Some(&auth), soon()).unwrap();
    let mut b = ep1.dial(&addr, "b", 1, 0, Some(&auth), soon()).unwrap();
    let mut c = ep2.dial(&addr, "a", 2, 0, Some(&auth), soon()).unwrap();
    for (link, byte) in [(&mut a, 1u8), (&mut b, 2), (&mut c, 3)] {
        assert_eq!(link.try_write(&[byte]).unwrap(), 1);
    }
    for (key, rank, byte) in [("b", 1, 2u8), ("a", 2, 3), ("a", 1, 1)] {
        let mut link = ep0.take(key, rank, soon()).unwrap();
        let mut got = [0u8; 1];
        while link.try_read_into(&mut got).unwrap() == 0 {
            link.wait(
                Interest {
                    read: true,
                    write: false,
                },
                Duration::from_secs(1),
            );
        }
        assert_eq!(got[0], byte, "`{key}` from rank {rank}");
    }
}

/// Read until the link fails; returns the bytes read and the error.
fn read_to_error(link: &mut QuicLink) -> (Vec<u8>, LinkError) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let until = soon();
    loop {
        match link.try_read_into(&mut buf) {
            Ok(0) => {
                assert!(Instant::now() < until, "the link never ended");
                let read = Interest {
                    read: true,
                    write: false,
                };
                link.wait(read, Duration::from_millis(100));
            }
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => return (all, e),
        }
    }
}

#[test]
fn a_dropped_link_delivers_what_was_written_then_closes() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth.clone()), MTU_CEILING);
    let ep1 = endpoint(1, Some(auth.clone()), MTU_CEILING);
    let (mut l0, mut l1) = connect(&ep0, &ep1, "world#1", Some(&auth));
    let p = Pattern::new();
    let total = 3 << 20;
    let mut sent = 0;
    while sent < total {
        sent += l1.try_write(p.at(sent, 0, CHUNK.min(total - sent))).unwrap();
    }
    drop(l1);
    let (got, err) = read_to_error(&mut l0);
    assert_eq!(got.len(), total);
    assert!(check(&p, &got), "the bytes before the close differ");
    assert!(matches!(err, LinkError::Closed), "{err}");
    // A peer that closed is not a peer that vanished.
    assert!(l0.peer_alive());
}

fn check(p: &Pattern, got: &[u8]) -> bool {
    got.chunks(CHUNK)
        .enumerate()
        .all(|(i, c)| c == p.at(i * CHUNK, 0, c.len()))
}

#[test]
fn an_abort_reaches_the_peer_with_its_culprit() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth.clone()), MTU_CEILING);
    let ep1 = endpoint(1, Some(auth.clone()), MTU_CEILING);
    let (mut l0, mut l1) = connect(&ep0, &ep1, "world#1", Some(&auth));
    l1.abort(Some(4), "rank 4 timed out in all_reduce");
    let (_, err) = read_to_error(&mut l0);
    match err {
        LinkError::Aborted { culprit, reason } => {
            assert_eq!(culprit, Some(4));
            assert_eq!(reason, "rank 4 timed out in all_reduce");
        }
        e => panic!("expected an abort, got {e}"),
    }
    assert!(l1.try_write(b"x").is_err());
}

/// A relay in the middle that holds no secret: it terminates QUIC towards both ranks and copies
/// the stream's bytes across. The handshake frames pass through intact, but the two sessions
/// have different exporter values, so both ranks refuse the binding.
#[test]
fn a_relay_in_the_middle_is_refused_by_the_session_binding() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth.clone()), MTU_CEILING);
    let ep1 = endpoint(1, Some(auth.clone()), MTU_CEILING);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (client, server) = quic_configs(&identity(), MTU_CEILING).unwrap();
    let relay = {
        let _entered = runtime.enter();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .unwrap()
    };
    let relay_addr = relay.local_addr().unwrap().to_string();
    let target = ep0.local_addr();
    runtime.spawn(async move {
        let down = relay.accept().await.unwrap().await.unwrap();
        let (mut down_send, mut down_recv) = down.accept_bi().await.unwrap();
        let up = relay.connect_with(client, target, SERVER_NAME).unwrap().await.unwrap();
        let (mut up_send, mut up_recv) = up.open_bi().await.unwrap();
        let forward = tokio::spawn(async move { tokio::io::copy(&mut down_recv, &mut up_send).await });
        let _ = tokio::io::copy(&mut up_recv, &mut down_send).await;
        let _ = forward.await;
        drop((down, up, relay));
    });
    let err = ep1
        .dial(&relay_addr, "world#1", 1, 0, Some(&auth), soon())
        .err()
        .unwrap();
    assert!(matches!(err, LinkError::Auth(_)), "{err}");
    assert!(err.to_string().contains("binding does not match"), "{err}");
    await_refusals(&ep0, 1);
    runtime.shutdown_background();
}

/// Whether `fd` polls readable within `ms` milliseconds.
fn readable_within(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

#[test]
fn the_poll_fd_is_readable_exactly_while_bytes_wait_and_offered_only_with_room_to_write() {
    let auth = job(SECRET);
    let ep0 = endpoint(0, Some(auth.clone()), MTU_CEILING);
    let ep1 = endpoint(1, Some(auth.clone()), MTU_CEILING);
    let (mut l0, mut l1) = connect(&ep0, &ep1, "world#1", Some(&auth));
    let fd = l0.poll_fd().expect("an empty outbox has room");
    assert!(!readable_within(fd, 0));
    assert_eq!(l1.try_write(b"hello").unwrap(), 5);
    assert!(readable_within(fd, 20_000));
    let mut buf = [0u8; 8];
    assert_eq!(l0.try_read_into(&mut buf[..2]).unwrap(), 2);
    assert!(readable_within(fd, 0), "3 bytes still wait");
    assert_eq!(l0.try_read_into(&mut buf).unwrap(), 3);
    assert_eq!(&buf[..3], b"llo");
    assert!(!readable_within(fd, 0), "nothing waits");

    // Rank 1 writes while rank 0 reads nothing: the windows and queues fill, then writes
    // would block and rank 1 offers no fd (polling it for writing would not sleep).
    let block = vec![9u8; CHUNK];
    let mut written = 0usize;
    loop {
        match l1.try_write(&block).unwrap() {
            0 if l1.poll_fd().is_none() => break,
            0 => l1.wait(
                Interest {
                    read: false,
                    write: true,
                },
                Duration::from_millis(200),
            ),
            n => written += n,
        }
        assert!(written < 1 << 30, "writes never pushed back");
    }
    // Once rank 0 reads, room frees up and everything arrives.
    let mut sink = vec![0u8; CHUNK];
    let mut got = 0;
    while got < written {
        match l0.try_read_into(&mut sink).unwrap() {
            0 => l0.wait(
                Interest {
                    read: true,
                    write: false,
                },
                Duration::from_millis(200),
            ),
            n => {
                assert!(sink[..n].iter().all(|&b| b == 9));
                got += n;
            }
        }
    }
    assert!(l1.poll_fd().is_some());
}
