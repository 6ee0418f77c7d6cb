//! Tests of the receive state machine: a message taken whole, in whatever batches a link
//! hands its bytes over ([`RxState::absorb`]).
use super::*;
use crate::dtype::DType;
use crate::header::OpKind;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn ctx(count: u64) -> OpCtx {
    let now = Instant::now();
    OpCtx {
        desc: OpDesc {
            kind: OpKind::AllReduce,
            dtype: DType::F32,
            reduce: Some(ReduceOp::Sum),
            count,
            root: 0,
        },
        seq: 7,
        started: now,
        deadline: now + Duration::from_secs(1),
    }
}

/// What a sender puts in the stream for `payload`: header, payload, zero padding.
fn framed(c: &OpCtx, step: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = TxState::new(c.send(1, step, payload), true).header.to_vec();
    out.extend_from_slice(payload);
    out.extend_from_slice(&ZERO_PAD[..pad_len(payload.len())]);
    out
}

/// Feed `stream` to `r` in random batches of at most `left()` bytes, as a link would.
fn feed(r: &mut RxState<'_>, stream: &[u8], rng: &mut StdRng) {
    let mut at = 0;
    while !r.done() {
        let n = rng.random_range(1..=r.left().min(stream.len() - at));
        r.absorb(&stream[at..at + n]);
        at += n;
        assert!(r.failed.is_none(), "a good header failed its check");
    }
    assert_eq!(at, stream.len(), "the message ended before its bytes did");
}

#[test]
fn a_message_in_any_batches_is_copied_or_reduced_and_its_padding_skipped() {
    let mut rng = StdRng::seed_from_u64(5);
    for count in [0usize, 1, 3, 256, 1001] {
        let c = ctx(count as u64);
        let theirs: Vec<f32> = (0..count).map(|i| i as f32 * 0.5 - 3.0).collect();
        let stream = framed(&c, 2, bytemuck::cast_slice(&theirs));
        for _ in 0..20 {
            let mut got = vec![0f32; count];
            let mut r = RxState::new(c.recv(1, 2, RecvSink::Copy(bytemuck::cast_slice_mut(&mut got))));
            feed(&mut r, &stream, &mut rng);
            assert_eq!(got, theirs, "copy of {count} elements");

            let mut mine: Vec<f32> = (0..count).map(|i| i as f32).collect();
            let want: Vec<f32> = mine.iter().zip(&theirs).map(|(a, b)| a + b).collect();
            let sink = RecvSink::Reduce {
                dst: bytemuck::cast_slice_mut(&mut mine),
                op: ReduceOp::Sum,
            };
            let mut r = RxState::new(c.recv(1, 2, sink));
            feed(&mut r, &stream, &mut rng);
            assert_eq!(mine, want, "reduction of {count} elements");
        }
    }
}

#[test]
fn a_mismatched_header_fails_and_leaves_the_destination_alone() {
    let c = ctx(4);
    let stream = framed(&c, 3, bytemuck::cast_slice(&[1f32, 2.0, 3.0, 4.0]));
    for split in [HEADER_LEN - 1, HEADER_LEN, stream.len()] {
        let mut got = [9f32; 4];
        // Expecting step 2; the sender is at step 3.
        let mut r = RxState::new(c.recv(1, 2, RecvSink::Copy(bytemuck::cast_slice_mut(&mut got))));
        r.absorb(&stream[..split]);
        r.absorb(&stream[split..]);
        match r.failed.take() {
            Some(ExchangeError {
                peer: 1,
                kind: ExchangeErrorKind::Mismatch { remote, expected },
            }) => assert_eq!((remote.step, expected.step), (3, 2)),
            other => panic!("expected a mismatch, got {other:?}"),
        }
        drop(r);
        assert_eq!(
            got, [9f32; 4],
            "payload of a mismatched message written (split {split})"
        );
    }
}
