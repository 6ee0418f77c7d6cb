//! Tests of the flight recorder: records and their times, dumps racing the writer, pruning.
use super::*;
use std::time::Duration;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-recorder-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Dumps named `flight-{i}.json`, the higher `i` the newer.
fn dumps(dir: &Path, n: u64) {
    let base = SystemTime::now() - Duration::from_secs(3600);
    for i in 0..n {
        let path = dir.join(format!("flight-{i}.json"));
        std::fs::write(&path, "{}").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(base + Duration::from_secs(i)).unwrap();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn op(seq: u64, peers: Peers, started: Instant) -> OpStart {
    OpStart {
        seq,
        op: OpKind::AllReduce,
        dtype: DType::F32,
        bytes: 1024,
        peers,
        algorithm: AlgoName::RecursiveDoubling,
        started,
    }
}

#[test]
fn records_keep_the_callers_instants_as_unix_times_and_the_newest_ops() {
    let mut w = FlightWriter::new("world".into(), 3, 2, Arc::from([2, 3]));
    let t0 = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
    w.start(op(1, Peers::Group, t0));
    w.finish_at(1, OpKind::AllReduce, t0 + Duration::from_millis(5), None);
    w.start(op(2, Peers::Group, t0 + Duration::from_millis(7)));
    w.finish_at(
        2,
        OpKind::AllReduce,
        t0 + Duration::from_millis(9),
        Some("rank 2 vanished".into()),
    );
    // Only `capacity` records stay: seq 1 makes room for seq 3, which never finishes.
    w.start(op(3, Peers::Group, t0 + Duration::from_millis(10)));
    // A finish for an op that is not in flight changes nothing.
    w.finish_at(7, OpKind::AllReduce, t0, None);
    w.finish_at(3, OpKind::Broadcast, t0, None);

    let before_us = now_us();
    let dump = w.recorder().snapshot();
    let seqs: Vec<u64> = dump.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [2, 3]);
    let (failed, stuck) = (&dump.records[0], &dump.records[1]);
    assert_eq!(failed.state, OpState::Failed);
    assert_eq!(failed.error.as_deref(), Some("rank 2 vanished"));
    assert_eq!(failed.end_unix_us.unwrap() - failed.start_unix_us, 2000);
    assert_eq!(stuck.start_unix_us - failed.start_unix_us, 3000);
    assert_eq!((stuck.state, stuck.end_unix_us), (OpState::Started, None));
    assert_eq!(
        (stuck.op, stuck.dtype, stuck.bytes),
        (OpKind::AllReduce, DType::F32, 1024)
    );
    assert_eq!(dump.in_flight.len(), 1);
    assert_eq!(dump.last_completed, None);
    // The instants were taken before the dump: their Unix times are too (±1 µs rounding).
    assert!(failed.start_unix_us <= dump.dumped_unix_us && dump.dumped_unix_us + 1 >= before_us);
    assert!(
        stuck.start_unix_us <= before_us + 1,
        "{} vs {before_us}",
        stuck.start_unix_us
    );
    let json = serde_json::to_value(failed).unwrap();
    assert_eq!(json["peers"], serde_json::json!([2, 3]));
    assert_eq!(json["algorithm"], "recursive_doubling");
}

#[test]
fn p2p_peers_and_coarse_ends_are_recorded() {
    let mut w = FlightWriter::new("pairs".into(), 0, 8, Arc::from([0, 1, 2]));
    let started = Instant::now();
    let peers = [(Some(1), Some(2)), (None, Some(2)), (Some(1), None), (Some(2), Some(2))];
    for (i, &(send, recv)) in peers.iter().enumerate() {
        let mut start = op(i as u64 + 1, Peers::P2p { send, recv }, started);
        (start.op, start.algorithm) = (OpKind::SendRecv, AlgoName::P2p);
        w.start(start);
        w.finish(i as u64 + 1, OpKind::SendRecv, None);
    }
    let dump = w.recorder().snapshot();
    let got: Vec<&[usize]> = dump.records.iter().map(|r| &r.peers[..]).collect();
    assert_eq!(got, [&[1, 2][..], &[2], &[1], &[2, 2]]);
    for r in &dump.records {
        assert_eq!(
            (r.state, r.algorithm, r.op),
            (OpState::Completed, "p2p", OpKind::SendRecv)
        );
        // The coarse clock lags by up to a tick: an end is clamped to its start, and is
        // never after the dump.
        let end = r.end_unix_us.unwrap();
        assert!(end >= r.start_unix_us && end <= dump.dumped_unix_us + 1, "{r:?}");
    }
    assert_eq!(dump.last_completed, Some(4));
}

/// A dump taken while the writer runs flat out sees only whole records: each op's fields
/// are derived from its seq, so a torn copy would show.
#[test]
fn dumps_racing_the_writer_see_only_whole_records() {
    let mut w = FlightWriter::new("race".into(), 0, 16, Arc::from([0, 1]));
    let rec = w.recorder().clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Relaxed) {
                seq += 1;
                let (send, recv) = (Some(seq as usize), Some(seq as usize + 1));
                let mut start = op(seq, Peers::P2p { send, recv }, t0 + Duration::from_micros(seq));
                start.bytes = seq * 8;
                w.start(start);
                let error = seq.is_multiple_of(5).then(|| format!("op {seq}"));
                w.finish_at(seq, OpKind::AllReduce, t0 + Duration::from_micros(seq + 1), error);
            }
            seq
        })
    };
    // Start racing once the ring is full (the writer thread may start late).
    while rec.snapshot().records.len() < 16 {
        std::thread::yield_now();
    }
    let mut seen = 0;
    for _ in 0..2000 {
        for r in rec.snapshot().records {
            let seq = r.seq;
            assert_eq!(r.bytes, seq * 8, "{r:?}");
            assert_eq!(&r.peers[..], &[seq as usize, seq as usize + 1], "{r:?}");
            if let Some(end) = r.end_unix_us {
                assert!(end - r.start_unix_us <= 2, "{r:?}");
            }
            match r.state {
                OpState::Failed => assert_eq!(r.error, Some(format!("op {seq}")), "{r:?}"),
                _ => assert_eq!(r.error, None, "{r:?}"),
            }
            seen += 1;
        }
    }
    stop.store(true, Relaxed);
    let ops = writer.join().unwrap();
    assert!(seen > 0 && ops > 16, "{seen} records seen, {ops} ops");
}

#[test]
fn pruning_keeps_the_newest_dumps_and_nothing_else_is_touched() {
    let dir = scratch("prune");
    dumps(&dir, 6);
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    std::fs::write(dir.join("flight-9.json.tmp"), "half").unwrap();
    let deleted = prune_dumps(&dir, 2).unwrap();
    assert_eq!(deleted.len(), 4);
    assert_eq!(
        names(&dir),
        ["flight-4.json", "flight-5.json", "flight-9.json.tmp", "notes.txt"]
    );
    // keep = 0 keeps everything; keeping more than there are deletes nothing.
    assert!(prune_dumps(&dir, 0).unwrap().is_empty());
    assert!(prune_dumps(&dir, 10).unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_dump_prunes_the_directory_to_keep() {
    let dir = scratch("dump");
    dumps(&dir, 5);
    let set = RecorderSet::new(dir.clone(), 3);
    let rec = FlightWriter::new("world".into(), 1, 4, Arc::from([1]))
        .recorder()
        .clone();
    set.register(&rec);
    let path = set.dump(&rec).unwrap();
    let left = names(&dir);
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(path.exists(), "the new dump is the newest: never pruned");
    assert!(left.contains(&"flight-4.json".to_string()) && left.contains(&"flight-3.json".to_string()));
    assert_eq!(set.dump_all(), vec![path.clone()]);
    assert_eq!(names(&dir).len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}
