//! Tests of the group segment: every rank's posts reach every rank across generations, the
//! file is claimed, checked and unlinked, sleepers are woken, aborts and closes are seen.
use super::*;
use crate::header::{OpDesc, OpKind};
use crate::shm::remove_session_files;
use crate::shm::tests::TempDir;
use crate::{DType, ReduceOp};
use std::time::Instant;

fn header(seq: u64, count: u64) -> [u8; HEADER_LEN] {
    crate::header::Header {
        desc: OpDesc {
            kind: OpKind::AllReduce,
            dtype: DType::U8,
            reduce: Some(ReduceOp::Sum),
            count,
            root: 0,
        },
        seq,
        step: 0,
        len: count,
    }
    .encode()
}

/// Byte `i` of what `rank` posts with generation `g`.
fn byte(rank: usize, g: u64, i: usize) -> u8 {
    (rank as u64 * 131 + g * 31 + i as u64 * 7) as u8
}

#[test]
fn posts_of_every_rank_reach_every_rank_across_generations() {
    let dir = TempDir::new(true);
    let (ranks, generations, len) = (4, 3000u64, 1000);
    let threads: Vec<_> = (0..ranks)
        .map(|me| {
            let d = dir.0.clone();
            std::thread::spawn(move || {
                let mut seg = GroupSegment::open(&d, "s", "k", me, ranks, len).unwrap();
                for g in 1..=generations {
                    // Sizes vary (all ranks agree), so stale bytes past a short post are never read.
                    let n = len - (g as usize % 7);
                    let data: Vec<u8> = (0..n).map(|i| byte(me, g, i)).collect();
                    assert_eq!(seg.post(&header(g, n as u64), &data), g);
                    while let Some(peer) = seg.first_missing(g, 0) {
                        seg.sleep_until_posted(g, peer, Duration::from_millis(1));
                    }
                    for peer in 0..ranks {
                        assert_eq!(seg.posted_header(g, peer), header(g, n as u64), "rank {me} gen {g}");
                        let got = seg.posted_data(g, peer, n);
                        let bad = (0..n).find(|&i| got[i] != byte(peer, g, i));
                        assert_eq!(bad, None, "rank {me} gen {g}: rank {peer}'s post");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        dir.is_empty(),
        "the segment was not unlinked once every rank had mapped it"
    );
}

#[test]
fn ranks_that_disagree_on_the_shape_are_told_which_file() {
    let dir = TempDir::new(false);
    let _first = GroupSegment::open(&dir.0, "s", "k", 0, 3, 1024).unwrap();
    for (ranks, slot, what) in [(4, 1024, "rank count"), (3, 4096, "slot size")] {
        let err = GroupSegment::open(&dir.0, "s", "k", 1, ranks, slot)
            .err()
            .expect("a mismatch");
        let msg = err.to_string();
        assert!(msg.contains(what) && msg.contains(&group_file_name("s", "k")), "{msg}");
    }
    // Nonsense is refused before any file is touched.
    for (me, ranks, slot) in [(3, 3, 1024), (0, 3, 0), (0, usize::MAX / 64, 1024)] {
        assert!(GroupSegment::open(&dir.0, "t", "k", me, ranks, slot).is_err());
    }
}

#[test]
fn a_sleeper_is_woken_by_the_post_it_waits_for() {
    let dir = TempDir::new(true);
    let mut a = GroupSegment::open(&dir.0, "s", "k", 0, 2, 64).unwrap();
    let d = dir.0.clone();
    let poster = std::thread::spawn(move || {
        let mut b = GroupSegment::open(&d, "s", "k", 1, 2, 64).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        b.post(&header(1, 1), &[7]);
        b
    });
    a.post(&header(1, 1), &[3]);
    // A liveness bound, not a speed one: a lost wake-up would sleep the whole minute.
    let start = Instant::now();
    while a.first_missing(1, 0).is_some() && start.elapsed() < Duration::from_secs(60) {
        a.sleep_until_posted(1, 1, Duration::from_secs(60));
    }
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the post did not wake the sleeper"
    );
    assert_eq!(a.posted_data(1, 1, 1), [7]);
    drop(poster.join().unwrap());
}

#[test]
fn aborts_and_closes_reach_the_waiters() {
    let dir = TempDir::new(false);
    let open = |me| GroupSegment::open(&dir.0, "s", "k", me, 3, 64).unwrap();
    let (mut a, b, c) = (open(0), open(1), open(2));
    a.post(&header(1, 1), &[1]);
    // Rank 2 goes away without posting: whoever waits for it learns so.
    drop(c);
    assert!(matches!(a.check(1, 2), Err(LinkError::Closed)));
    assert!(a.check(1, 1).is_ok(), "rank 1 is still there");
    // An abort reaches everyone but its poster, culprit and reason intact; the first one wins.
    b.abort(Some(2), "rank 2 left");
    a.abort(None, "too late");
    assert!(b.check(1, 0).is_ok(), "a rank's own abort is not reported to it");
    match a.check(1, 1) {
        Err(LinkError::Aborted { culprit, reason }) => {
            assert_eq!((culprit, reason.as_str()), (Some(2), "rank 2 left"));
        }
        other => panic!("{other:?}"),
    }
    // A sleeper returns at once rather than sleeping through the abort.
    let start = Instant::now();
    a.sleep_until_posted(1, 1, Duration::from_secs(60));
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_rank_that_posted_and_left_is_not_closed_for_that_post() {
    let dir = TempDir::new(false);
    let mut a = GroupSegment::open(&dir.0, "s", "k", 0, 2, 64).unwrap();
    let mut b = GroupSegment::open(&dir.0, "s", "k", 1, 2, 64).unwrap();
    b.post(&header(1, 2), &[4, 5]);
    drop(b);
    a.post(&header(1, 2), &[1, 2]);
    assert!(a.check(1, 1).is_ok());
    assert_eq!(a.first_missing(1, 0), None);
    assert_eq!(a.posted_data(1, 1, 2), [4, 5]);
    assert!(
        matches!(a.check(2, 1), Err(LinkError::Closed)),
        "it will not post again"
    );
}

#[test]
fn announcements_are_read_back_whole() {
    let dir = TempDir::new(false);
    let a = GroupSegment::open(&dir.0, "s", "k", 0, 2, 64).unwrap();
    let b = GroupSegment::open(&dir.0, "s", "k", 1, 2, 64).unwrap();
    assert_eq!(a.announced(1), None, "nothing announced yet");
    for seq in 1..50 {
        b.announce(seq, &header(seq, seq * 3));
        assert_eq!(a.announced(1), Some((seq, header(seq, seq * 3))));
    }
}

#[test]
fn stale_segments_are_replaced_and_removable() {
    let dir = TempDir::new(false);
    // A group whose other ranks never came leaves its file; a new group of the same name starts
    // from a fresh one rather than from the old posts.
    let mut old = GroupSegment::open(&dir.0, "s", "k", 0, 2, 64).unwrap();
    old.post(&header(1, 1), &[9]);
    drop(old);
    let a = GroupSegment::open(&dir.0, "s", "k", 0, 2, 64).unwrap();
    assert_eq!(a.posted_by(0), 0, "the stale file was reused");
    drop(a);
    drop(GroupSegment::open(&dir.0, "s-2", "k", 0, 2, 64).unwrap());
    assert_eq!(remove_session_files(&dir.0, "s").unwrap(), 1);
    assert_eq!(remove_session_files(&dir.0, "s-2").unwrap(), 1);
    assert!(dir.is_empty());
}
