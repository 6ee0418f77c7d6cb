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
    let mut sim = Simulation::new(programs, micro);
    loop {
        let mut progressed = false;
        for s in 0..n {
            let Some(op) = sim.current(s) else { continue };
            progressed |= match op {
                Op::Forward { .. } | Op::Backward { .. } => {
                    sim.compute(s, op)?;
                    true
                }
                _ => sim.rendezvous(s, op)?,
            };
        }
        if sim.pc.iter().zip(programs).all(|(&p, prog)| p == prog.len()) {
            break;
        }
        if !progressed {
            return Err(sim.deadlock());
        }
    }
    sim.check_every_micro_batch(backward)
}

/// The state of every stage during [`simulate`]: where each program is, and what each stage
/// has received and computed, indexed `[stage][micro-batch]`.
struct Simulation<'a> {
    programs: &'a [Vec<Op>],
    pc: Vec<usize>,
    /// Activations received (all true on the first stage).
    have_input: Vec<Vec<bool>>,
    /// Output gradients received (all true on the last stage).
    have_grad: Vec<Vec<bool>>,
    forwarded: Vec<Vec<bool>>,
    backwarded: Vec<Vec<bool>>,
}

impl<'a> Simulation<'a> {
    fn new(programs: &'a [Vec<Op>], micro: usize) -> Simulation<'a> {
        let n = programs.len();
        let mut have_input = vec![vec![false; micro]; n];
        let mut have_grad = vec![vec![false; micro]; n];
        for mb in 0..micro {
            have_input[0][mb] = true;
            have_grad[n - 1][mb] = true;
        }
        Simulation {
            programs,
            pc: vec![0usize; n],
            have_input,
            have_grad,
            forwarded: vec![vec![false; micro]; n],
            backwarded: vec![vec![false; micro]; n],
        }
    }

    /// The operation stage `s` is at; `None` once its program is done.
    fn current(&self, s: usize) -> Option<Op> {
        self.programs[s].get(self.pc[s]).copied()
    }

    /// Run stage `s`'s forward or backward, which needs only its own data.
    fn compute(&mut self, s: usize, op: Op) -> Result<(), String> {
        match op {
            Op::Forward { mb } => {
                if !self.have_input[s][mb] || self.forwarded[s][mb] {
                    return Err(format!("stage {s}: forward {mb} without input or twice"));
                }
                self.forwarded[s][mb] = true;
            }
            Op::Backward { mb } => {
                if !self.forwarded[s][mb] || !self.have_grad[s][mb] || self.backwarded[s][mb] {
                    return Err(format!("stage {s}: backward {mb} before its forward or gradient"));
                }
                self.backwarded[s][mb] = true;
            }
            _ => unreachable!("compute called with communication {op:?}"),
        }
        self.pc[s] += 1;
        Ok(())
    }

    /// Complete stage `s`'s communication `op` if its neighbour is at the matching operation;
    /// `Ok(false)` when the neighbour is not there yet. Pairing with the wrong operation is
    /// only an error if the neighbour is itself waiting on `s` (otherwise it may be talking to
    /// its other side).
    fn rendezvous(&mut self, s: usize, op: Op) -> Result<bool, String> {
        let n = self.programs.len();
        let (peer, expect) = counterpart(s, op);
        if peer >= n {
            return Err(format!("stage {s}: {op:?} has no neighbour"));
        }
        let Some(theirs) = self.current(peer) else {
            return Ok(false);
        };
        if !is_comm(theirs) {
            return Ok(false);
        }
        if theirs != expect {
            if comm_peer(peer, theirs) == Some(s) {
                return Err(format!("stage {s} {op:?} meets stage {peer} {theirs:?}"));
            }
            return Ok(false);
        }
        if tag(op) != tag(theirs) {
            return Err(format!("tags differ: {op:?} vs {theirs:?}"));
        }
        // Both complete; deliver data in both directions.
        self.deliver(s, op)?;
        self.deliver(peer, theirs)?;
        self.pc[s] += 1;
        self.pc[peer] += 1;
        Ok(true)
    }

    /// Hand what `stage` sends with `o` to its neighbour, which must have been computed first.
    fn deliver(&mut self, stage: usize, o: Op) -> Result<(), String> {
        if let Some(mb) = sends_forward(o) {
            if !self.forwarded[stage][mb] {
                return Err(format!(
                    "stage {stage}: sends activations of {mb} before computing them"
                ));
            }
            self.have_input[stage + 1][mb] = true;
        }
        if let Some(mb) = sends_backward(o) {
            if !self.backwarded[stage][mb] {
                return Err(format!("stage {stage}: sends the gradient of {mb} before computing it"));
            }
            self.have_grad[stage - 1][mb] = true;
        }
        Ok(())
    }

    /// After the run: `backward` says whether every micro-batch also needed a backward.
    fn check_every_micro_batch(&self, backward: bool) -> Result<(), String> {
        for s in 0..self.programs.len() {
            if self.forwarded[s].iter().any(|&f| !f) || (backward && self.backwarded[s].iter().any(|&b| !b)) {
                return Err(format!("stage {s} did not process every micro-batch"));
            }
        }
        Ok(())
    }

    /// Where every unfinished stage is stuck.
    fn deadlock(&self) -> String {
        let stuck: Vec<String> = (0..self.programs.len())
            .filter_map(|s| self.current(s).map(|op| format!("stage {s} at {op:?}")))
            .collect();
        format!("deadlock: {}", stuck.join(", "))
    }
}

/// The neighbour a communication op of `stage` pairs with, and the op that neighbour must be
/// at for the two to complete together. The neighbour is out of range for an op that points
/// past either end of the pipeline, which the caller reports.
fn counterpart(stage: usize, op: Op) -> (usize, Op) {
    let expect = match op {
        Op::SendForward { mb } => Op::RecvForward { mb },
        Op::RecvForward { mb } => Op::SendForward { mb },
        Op::RecvBackward { mb } => Op::SendBackward { mb },
        Op::SendBackward { mb } => Op::RecvBackward { mb },
        Op::SendForwardRecvBackward { send, recv } => Op::SendBackwardRecvForward { send: recv, recv: send },
        Op::SendBackwardRecvForward { send, recv } => Op::SendForwardRecvBackward { send: recv, recv: send },
        Op::Forward { .. } | Op::Backward { .. } => unreachable!("{op:?} pairs with nothing"),
    };
    let peer = comm_peer(stage, op).expect("a communication op has a neighbour");
    (peer, expect)
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
    fn every_communication_pairs_back_with_the_same_tag() {
        let (a, b) = (4, 7);
        for op in [
            Op::SendForward { mb: a },
            Op::RecvForward { mb: a },
            Op::RecvBackward { mb: a },
            Op::SendBackward { mb: a },
            Op::SendForwardRecvBackward { send: a, recv: b },
            Op::SendBackwardRecvForward { send: a, recv: b },
        ] {
            let (peer, theirs) = counterpart(2, op);
            assert_eq!(peer.abs_diff(2), 1, "{op:?}");
            assert_eq!(counterpart(peer, theirs), (2, op));
            assert_eq!(tag(op), tag(theirs), "{op:?} vs {theirs:?}");
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
