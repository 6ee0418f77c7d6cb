//! The namespace harness itself, on this machine's kernel: hosts reach each other at their
//! own addresses and nothing else, a pulled cable partitions a host until it is plugged back,
//! rate limits land on both ends of the cable, a slow cable delays and stalls every frame yet
//! delivers every byte, and nothing is left behind — after a drop, a
//! killed test (the watchdog) or a dead owner found by the next instance (the sweep).

use gantry_testkit::netns::{Cluster, LinkProfile, names, start_or_skip, sweep};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn ours(cluster: &Cluster) -> Vec<String> {
    let mut v: Vec<String> = cluster.hosts().iter().map(|h| h.netns().to_string()).collect();
    v.push(cluster.switch_netns().to_string());
    v
}

fn connect(cluster: &Cluster, from: usize, to: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    cluster.hosts()[from]
        .enter(|| TcpStream::connect_timeout(&to, limit))
        .expect("enter host")
}

#[test]
fn hosts_reach_each_other_at_their_addresses_and_nothing_else() {
    let Some(c) = start_or_skip("hosts_reach_each_other", &["alpha", "beta"], ci()) else {
        return;
    };
    let (a, b) = (&c.hosts()[0], &c.hosts()[1]);
    assert_eq!(a.addr().octets()[..2], c.network().octets()[..2]);
    assert!(u32::from(a.addr()) >> 17 == u32::from(Ipv4Addr::new(198, 18, 0, 0)) >> 17);

    let listener = b.enter(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut out = connect(&c, 0, SocketAddr::from((b.addr(), port)), Duration::from_secs(10)).unwrap();
    let (mut inbound, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        a.addr(),
        "the connection comes from the first host's own address"
    );
    out.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    inbound.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // The listener is not on the first host's loopback, nor on this test's.
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(connect(&c, 0, local, Duration::from_secs(5)).is_err());
    assert!(TcpStream::connect_timeout(&SocketAddr::from((b.addr(), port)), Duration::from_secs(1)).is_err());
    // No route out of the cluster.
    let outside = connect(&c, 0, "192.0.2.1:80".parse().unwrap(), Duration::from_secs(5)).unwrap_err();
    assert_eq!(outside.kind(), std::io::ErrorKind::NetworkUnreachable, "{outside}");

    // Each host's processes see its own name.
    for h in c.hosts() {
        let out = h.command("cat").arg("/proc/sys/kernel/hostname").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), h.hostname());
    }
}

#[test]
fn a_pulled_cable_partitions_a_host_until_it_is_plugged_back() {
    let Some(c) = start_or_skip("partition", &["h0", "h1", "h2"], ci()) else {
        return;
    };
    let h1 = &c.hosts()[1];
    let listener = h1.enter(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let to = SocketAddr::from((h1.addr(), listener.local_addr().unwrap().port()));
    assert!(connect(&c, 0, to, Duration::from_secs(10)).is_ok());

    c.link_down(h1).unwrap();
    assert!(
        connect(&c, 0, to, Duration::from_secs(2)).is_err(),
        "h1 is cut off from h0"
    );
    assert!(connect(&c, 2, to, Duration::from_secs(2)).is_err(), "and from h2");
    c.link_up(h1).unwrap();
    assert!(connect(&c, 2, to, Duration::from_secs(30)).is_ok(), "plugged back in");
}

#[test]
fn rate_limits_are_set_on_both_ends_of_the_cable_and_removed() {
    let Some(c) = start_or_skip("rate_limit", &["h0"], ci()) else {
        return;
    };
    let h = &c.hosts()[0];
    let qdisc = |netns: &str, dev: &str| {
        let out = Command::new("tc")
            .args(["-n", netns, "qdisc", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    c.set_rate(h, Some(100_000_000)).unwrap();
    for (ns, dev) in [(h.netns(), "eth0"), (c.switch_netns(), "p0")] {
        let shown = qdisc(ns, dev);
        assert!(
            shown.contains("tbf") && shown.contains("100Mbit"),
            "{ns} {dev}: {shown}"
        );
    }
    c.set_rate(h, None).unwrap();
    for (ns, dev) in [(h.netns(), "eth0"), (c.switch_netns(), "p0")] {
        assert!(!qdisc(ns, dev).contains("tbf"), "{ns} {dev}");
    }
}

/// Bytes `0, 1, 2, …` of a stream, so a lost, repeated or reordered byte shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn a_slow_cable_delays_and_stalls_every_frame_but_loses_nothing() {
    let Some(c) = start_or_skip("slow_link", &["fast", "slow"], ci()) else {
        return;
    };
    let (fast, slow) = (&c.hosts()[0], &c.hosts()[1]);
    // Stalls every 1.5 s, so the transfers below (a few seconds at 40 ms round trips) cross some.
    let profile = LinkProfile::wan(Duration::from_millis(1500), 11);
    match c.slow_link(slow, profile) {
        Err(gantry_testkit::netns::NetnsError::Unavailable(why)) if !ci() => {
            eprintln!("SKIP slow_link: {why}");
            return;
        }
        other => other.unwrap(),
    }
    assert!(c.slow_link(slow, profile).is_err(), "one slow link per host");
    assert_eq!(c.link_stats(fast), None);

    let listener = slow.enter(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let to = SocketAddr::from((slow.addr(), listener.local_addr().unwrap().port()));
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).unwrap();
        }
    });
    let mut out = connect(&c, 0, to, Duration::from_secs(30)).unwrap();
    out.set_nodelay(true).unwrap();
    // Round trips: each crosses the relay twice, at least 15 ms each way, whatever the
    // machine's speed (a lower bound the relay guarantees, not a measurement).
    let mut byte = [0u8; 1];
    for i in 0..50u8 {
        let sent = Instant::now();
        out.write_all(&[i]).unwrap();
        out.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], i);
        assert!(
            sent.elapsed() >= Duration::from_millis(30),
            "round trip {i}: {:?}",
            sent.elapsed()
        );
    }
    // Bulk both ways, through stalls: every byte arrives, in order.
    let data = pattern(8 << 20);
    let writer = {
        let mut w = out.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || w.write_all(&data).unwrap())
    };
    let mut back = vec![0u8; data.len()];
    out.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "the echoed stream differs from what was sent");
    let stats = c.link_stats(slow).unwrap();
    assert!(stats.sent > 1000 && stats.received > 1000, "{stats:?}");
    assert!(stats.stalled > 0, "the transfer crossed a stall: {stats:?}");
    drop(out);
    echo.join().unwrap();

    // A slow cable can still be pulled.
    let listener = slow.enter(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let to = SocketAddr::from((slow.addr(), listener.local_addr().unwrap().port()));
    let fast_listener = fast.enter(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let to_fast = SocketAddr::from((fast.addr(), fast_listener.local_addr().unwrap().port()));
    c.link_down(slow).unwrap();
    assert!(connect(&c, 0, to, Duration::from_secs(2)).is_err(), "pulled");
    assert!(connect(&c, 1, to_fast, Duration::from_secs(2)).is_err(), "both ways");
    // The slow host's own frames met the pulled cable.
    assert!(c.link_stats(slow).unwrap().dropped > 0);
    c.link_up(slow).unwrap();
    assert!(connect(&c, 0, to, Duration::from_secs(30)).is_ok(), "plugged back in");
    drop(listener);

    let made = ours(&c);
    drop(c);
    let left: Vec<String> = namespaces().into_iter().filter(|n| made.contains(n)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn dropping_the_cluster_removes_it_and_leftovers_of_dead_owners_are_swept() {
    let Some(c) = start_or_skip("drop_and_sweep", &["h0", "h1"], ci()) else {
        return;
    };
    let made = ours(&c);
    assert!(made.iter().all(|n| namespaces().contains(n)), "{made:?}");
    drop(c);
    let left: Vec<String> = namespaces().into_iter().filter(|n| made.contains(n)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A namespace of an instance whose process is gone, as a SIGKILL during start leaves it.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let used = names::used_subnets(namespaces().iter().map(String::as_str));
    let subnet = names::pick_subnet(&used, 0).unwrap();
    let leftover = names::NsName {
        subnet,
        owner: names::Owner::Pid(dead_pid),
        role: names::Role::Switch,
    }
    .render();
    let added = Command::new("ip").args(["netns", "add", &leftover]).status().unwrap();
    assert!(added.success());
    let swept = sweep().unwrap();
    assert!(swept.contains(&leftover), "{swept:?}");
    assert!(!namespaces().contains(&leftover));
}

/// Not a test of its own: the child process of the next test, holding a cluster until killed.
#[test]
fn hold_a_cluster_until_killed() {
    if std::env::var_os("GANTRY_TESTKIT_HOLD").is_none() {
        return;
    }
    let c = Cluster::start(&["h0", "h1"]).unwrap();
    let host = c.hosts()[0].clone();
    let mut sleeper = host.command("sleep");
    let _child = gantry_testkit::netns::HostProcess::spawn(sleeper.arg("3600")).unwrap();
    println!("HOLDING {}", ours(&c).join(" "));
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(3600));
}

/// The holder process, killed even when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_test_leaves_nothing_behind() {
    if Cluster::start(&["probe"]).is_err() {
        // The skip line comes from start_or_skip; here only CI must not pass silently.
        start_or_skip("killed_test", &["probe"], ci());
        return;
    }
    let me = std::env::current_exe().unwrap();
    let mut holder = KillOnDrop(
        Command::new(me)
            .args([
                "--exact",
                "hold_a_cluster_until_killed",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("GANTRY_TESTKIT_HOLD", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut text = String::new();
    let mut out = holder.0.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while !text.contains("HOLDING") || !text.ends_with('\n') {
        assert_eq!(out.read(&mut byte).unwrap(), 1, "the holder ended early: {text}");
        text.push(byte[0] as char);
    }
    let held: Vec<String> = text
        .lines()
        .find_map(|l| l.split_once("HOLDING ").map(|(_, names)| names))
        .unwrap()
        .split(' ')
        .map(str::to_string)
        .collect();
    assert!(held.iter().all(|n| namespaces().contains(n)), "{held:?}");
    drop(holder);
    // The watchdog notices within a second or so; the bound only keeps a broken one from
    // hanging the test.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = namespaces().into_iter().filter(|n| held.contains(n)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "still there after the holder was killed: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
