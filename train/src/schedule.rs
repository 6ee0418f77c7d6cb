//! Pipeline schedules as plain data: the ordered operations one stage performs for one step.
//! The executor (`pipeline.rs`) only interprets them, and the tests here simulate every
//! stage against its neighbours with *rendezvous* semantics (a send completes only when the
//! matching receive is posted, each operation pairs with exactly one operation of the
//! neighbour, as the collectives' per-pair sequence numbers require) to prove a schedule can
//! neither deadlock nor mismatch a message.
//!
//! 1F1B follows Megatron-LM's non-interleaved schedule: `pp - stage - 1` warm-up forwards,
//! then alternating one forward and one backward (exchanging an activation and a gradient
//! with the next stage in one combined operation), then the remaining backwards.

use crate::spec::Schedule;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Receive micro-batch `mb`'s activations from the previous stage.
    RecvForward {
        mb: usize,
    },
    Forward {
        mb: usize,
    },
    SendForward {
        mb: usize,
    },
    /// Receive the gradient of micro-batch `mb`'s output from the next stage.
    RecvBackward {
        mb: usize,
    },
    Backward {
        mb: usize,
    },
    SendBackward {
        mb: usize,
    },
    /// With the next stage: send activations of `send`, receive the gradient of `recv`.
    SendForwardRecvBackward {
        send: usize,
        recv: usize,
    },
    /// With the previous stage: send the input gradient of `send`, receive activations of `recv`.
    SendBackwardRecvForward {
        send: usize,
        recv: usize,
    },
}

/// Message tags: both ends of a pairing compute the same one, so the collectives' tag check
/// catches any schedule bug as an error naming both tags.
pub fn tag(op: Op) -> u32 {
    const ACT: u32 = 1 << 30;
    const GRAD: u32 = 2 << 30;
    const PAIR: u32 = 3 << 30;
    let pair = |act: usize, grad: usize| PAIR | ((act as u32 & 0x7fff) << 15) | (grad as u32 & 0x7fff);
    match op {
        Op::RecvForward { mb } | Op::SendForward { mb } => ACT | mb as u32,
        Op::RecvBackward { mb } | Op::SendBackward { mb } => GRAD | mb as u32,
        Op::SendForwardRecvBackward { send, recv } => pair(send, recv),
        Op::SendBackwardRecvForward { send, recv } => pair(recv, send),
        Op::Forward { .. } | Op::Backward { .. } => 0,
    }
}

/// Largest micro-batch count the tags can tell apart.
pub const MAX_MICRO_BATCHES: usize = 1 << 15;

/// The operations of `stage` (of `stages`) for a training step of `micro` micro-batches.
pub fn train_schedule(kind: Schedule, stage: usize, stages: usize, micro: usize) -> Vec<Op> {
    let first = stage == 0;
    let last = stage + 1 == stages;
    let mut ops = Vec::new();
    match kind {
        Schedule::Gpipe => {
            ops.extend(forward_schedule(stage, stages, micro));
            for mb in 0..micro {
                if !last {
                    ops.push(Op::RecvBackward { mb });
                }
                ops.push(Op::Backward { mb });
                if !first {
                    ops.push(Op::SendBackward { mb });
                }
            }
        }
        Schedule::OneFOneB => {
            let warmup = (stages - stage - 1).min(micro);
            let steady = micro - warmup;
            let (mut fwd, mut bwd) = (0, 0);
            for _ in 0..warmup {
                if !first {
                    ops.push(Op::RecvForward { mb: fwd });
                }
                ops.push(Op::Forward { mb: fwd });
                if !last {
                    ops.push(Op::SendForward { mb: fwd });
                }
                fwd += 1;
            }
            if steady > 0 && !first {
                ops.push(Op::RecvForward { mb: fwd });
            }
            for i in 0..steady {
                ops.push(Op::Forward { mb: fwd });
                if !last {
                    ops.push(Op::SendForwardRecvBackward { send: fwd, recv: bwd });
                }
                fwd += 1;
                ops.push(Op::Backward { mb: bwd });
                if !first {
                    if i + 1 == steady {
                        ops.push(Op::SendBackward { mb: bwd });
                    } else {
                        ops.push(Op::SendBackwardRecvForward { send: bwd, recv: fwd });
                    }
                }
                bwd += 1;
            }
            for _ in 0..warmup {
                if !last {
                    ops.push(Op::RecvBackward { mb: bwd });
                }
                ops.push(Op::Backward { mb: bwd });
                if !first {
                    ops.push(Op::SendBackward { mb: bwd });
                }
                bwd += 1;
            }
        }
    }
    ops
}

/// Forward passes only (evaluation).
pub fn forward_schedule(stage: usize, stages: usize, micro: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    for mb in 0..micro {
        if stage > 0 {
            ops.push(Op::RecvForward { mb });
        }
        ops.push(Op::Forward { mb });
        if stage + 1 < stages {
            ops.push(Op::SendForward { mb });
        }
    }
    ops
}

/// Simulate all stages with rendezvous semantics; `Err` describes a deadlock or a data
/// dependency violated. Also checks every micro-batch is forwarded and (if `backward`)
/// backwarded exactly once per stage.
pub fn simulate(programs: &[Vec<Op>], micro: usize, backward: bool) -> Result<(), String> {
    let n = programs.len();
    let mut pc = vec![0usize; n];
    // Per stage: activations received (stage>0), gradients received (non-last), done sets.
    let mut have_input = vec![vec![false; micro]; n];
    let mut have_grad = vec![vec![false; micro]; n];
    let mut forwarded = vec![vec![false; micro]; n];
    let mut backwarded = vec![vec![false; micro]; n];
    for mb in 0..micro {
        have_input[0][mb] = true;
        have_grad[n - 1][mb] = true;
    }
    loop {
        let mut progressed = false;
        for s in 0..n {
            let Some(&op) = programs[s].get(pc[s]) else { continue };
            match op {
                Op::Forward { mb } => {
                    if !have_input[s][mb] || forwarded[s][mb] {
                        return Err(format!("stage {s}: forward {mb} without input or twice"));
                    }
                    forwarded[s][mb] = true;
                    pc[s] += 1;
                    progressed = true;
                }
                Op::Backward { mb } => {
                    if !forwarded[s][mb] || !have_grad[s][mb] || backwarded[s][mb] {
                        return Err(format!("stage {s}: backward {mb} before its forward or gradient"));
                    }
                    backwarded[s][mb] = true;
                    pc[s] += 1;
                    progressed = true;
                }
                _ => {
                    // A communication op pairs with the neighbour's current op.
                    let (peer, expect) = match op {
                        Op::SendForward { mb } => (s + 1, Op::RecvForward { mb }),
                        Op::RecvForward { mb } => (s.wrapping_sub(1), Op::SendForward { mb }),
                        Op::RecvBackward { mb } => (s + 1, Op::SendBackward { mb }),
                        Op::SendBackward { mb } => (s.wrapping_sub(1), Op::RecvBackward { mb }),
                        Op::SendForwardRecvBackward { send, recv } => {
                            (s + 1, Op::SendBackwardRecvForward { send: recv, recv: send })
                        }
                        Op::SendBackwardRecvForward { send, recv } => (
                            s.wrapping_sub(1),
                            Op::SendForwardRecvBackward { send: recv, recv: send },
                        ),
                        Op::Forward { .. } | Op::Backward { .. } => unreachable!(),
                    };
                    if peer >= n {
                        return Err(format!("stage {s}: {op:?} has no neighbour"));
                    }
                    let Some(&theirs) = programs[peer].get(pc[peer]) else {
                        continue;
                    };
                    if !is_comm(theirs) {
                        continue;
                    }
                    if theirs != expect {
                        // Paired with the wrong operation: only an error if the peer is
                        // itself waiting on us (otherwise it may be talking to its other side).
                        if comm_peer(peer, theirs) == Some(s) {
                            return Err(format!("stage {s} {op:?} meets stage {peer} {theirs:?}"));
                        }
                        continue;
                    }
                    if tag(op) != tag(theirs) {
                        return Err(format!("tags differ: {op:?} vs {theirs:?}"));
                    }
                    // Both complete; deliver data in both directions.
                    for (stage, o) in [(s, op), (peer, theirs)] {
                        if let Some(mb) = sends_forward(o) {
                            if !forwarded[stage][mb] {
                                return Err(format!(
                                    "stage {stage}: sends activations of {mb} before computing them"
                                ));
                            }
                            have_input[stage + 1][mb] = true;
                        }
                        if let Some(mb) = sends_backward(o) {
                            if !backwarded[stage][mb] {
                                return Err(format!("stage {stage}: sends the gradient of {mb} before computing it"));
                            }
                            have_grad[stage - 1][mb] = true;
                        }
                    }
                    pc[s] += 1;
                    pc[peer] += 1;
                    progressed = true;
                }
            }
        }
        if pc.iter().zip(programs).all(|(&p, prog)| p == prog.len()) {
            break;
        }
        if !progressed {
            let stuck: Vec<String> = (0..n)
                .filter_map(|s| programs[s].get(pc[s]).map(|op| format!("stage {s} at {op:?}")))
                .collect();
            return Err(format!("deadlock: {}", stuck.join(", ")));
        }
    }
    for s in 0..n {
        if forwarded[s].iter().any(|&f| !f) || (backward && backwarded[s].iter().any(|&b| !b)) {
            return Err(format!("stage {s} did not process every micro-batch"));
        }
    }
    Ok(())
}

fn is_comm(op: Op) -> bool {
    !matches!(op, Op::Forward { .. } | Op::Backward { .. })
}

fn comm_peer(stage: usize, op: Op) -> Option<usize> {
    match op {
        Op::SendForward { .. } | Op::RecvBackward { .. } | Op::SendForwardRecvBackward { .. } => Some(stage + 1),
        Op::RecvForward { .. } | Op::SendBackward { .. } | Op::SendBackwardRecvForward { .. } => {
            Some(stage.wrapping_sub(1))
        }
        Op::Forward { .. } | Op::Backward { .. } => None,
    }
}

fn sends_forward(op: Op) -> Option<usize> {
    match op {
        Op::SendForward { mb } => Some(mb),
        Op::SendForwardRecvBackward { send, .. } => Some(send),
        _ => None,
    }
}

fn sends_backward(op: Op) -> Option<usize> {
    match op {
        Op::SendBackward { mb } => Some(mb),
        Op::SendBackwardRecvForward { send, .. } => Some(send),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_completes_without_deadlock() {
        for kind in [Schedule::OneFOneB, Schedule::Gpipe] {
            for stages in 1..=6 {
                for micro in 1..=12 {
                    let programs: Vec<Vec<Op>> = (0..stages).map(|s| train_schedule(kind, s, stages, micro)).collect();
                    simulate(&programs, micro, true).unwrap_or_else(|e| panic!("{kind:?} pp {stages} m {micro}: {e}"));
                    let fwd: Vec<Vec<Op>> = (0..stages).map(|s| forward_schedule(s, stages, micro)).collect();
                    simulate(&fwd, micro, false).unwrap();
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_keeps_at_most_pp_micro_batches_in_flight() {
        for stages in 1..=6 {
            for micro in 1..=12 {
                for s in 0..stages {
                    let mut live = 0usize;
                    let mut peak = 0;
                    for op in train_schedule(Schedule::OneFOneB, s, stages, micro) {
                        match op {
                            Op::Forward { .. } => live += 1,
                            Op::Backward { .. } => live -= 1,
                            _ => {}
                        }
                        peak = peak.max(live);
                    }
                    assert!(
                        peak <= stages - s,
                        "stage {s} of {stages}, {micro} mb: {peak} in flight"
                    );
                }
            }
        }
    }

    #[test]
    fn the_simulator_catches_a_broken_schedule() {
        // Stage 1 waits for a gradient nobody sends.
        let programs = vec![
            vec![Op::Forward { mb: 0 }, Op::SendForward { mb: 0 }, Op::Backward { mb: 0 }],
            vec![
                Op::RecvForward { mb: 0 },
                Op::Forward { mb: 0 },
                Op::RecvBackward { mb: 0 },
            ],
        ];
        assert!(simulate(&programs, 1, true).is_err());
        // Mismatched micro-batch order between neighbours.
        let programs = vec![
            vec![
                Op::Forward { mb: 0 },
                Op::Forward { mb: 1 },
                Op::SendForward { mb: 1 },
                Op::SendForward { mb: 0 },
            ],
            vec![
                Op::RecvForward { mb: 0 },
                Op::Forward { mb: 0 },
                Op::RecvForward { mb: 1 },
                Op::Forward { mb: 1 },
            ],
        ];
        assert!(simulate(&programs, 2, false).is_err());
    }
}
