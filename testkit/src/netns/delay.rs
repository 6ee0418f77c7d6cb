//! When a frame crossing a slow link leaves it: a fixed delay plus seeded jitter, never
//! overtaking the frame before it, and held to the end of any stall it falls into. Pure:
//! times are durations since the link was made, and the jitter comes from the profile's seed,
//! so a schedule is the same on every run.
//!
//! Why no reordering: jitter that reorders frames makes TCP see duplicate ACKs and retransmit
//! (what a lossy path does, not a slow one); a slow path delays every frame by a varying
//! amount in order. Why stalls hold rather than drop: a stalled connection is what loss looks
//! like above TCP (nothing arrives for a while, then everything), which is the condition the
//! ranks have to survive; the kernel's own retransmissions still happen underneath.

use std::time::Duration;

/// The conditions of a slow link, the same in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkProfile {
    /// Added to every frame, in each direction.
    pub delay: Duration,
    /// Each frame's delay is uniform in `delay ± jitter` (at most `delay`).
    pub jitter: Duration,
    /// A stall starts at every multiple of this since the link was made; `None`: no stalls.
    pub stall_every: Option<Duration>,
    /// How long each stall holds every frame (shorter than `stall_every`).
    pub stall_for: Duration,
    /// Seeds the jitter.
    pub seed: u64,
}

impl LinkProfile {
    /// 20 ms ± 5 ms each way, and a 1 s stall every `stall_every`.
    pub fn wan(stall_every: Duration, seed: u64) -> LinkProfile {
        LinkProfile {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            stall_every: Some(stall_every),
            stall_for: Duration::from_secs(1),
            seed,
        }
    }

    /// Why this profile cannot be applied, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.jitter > self.delay {
            return Err(format!(
                "jitter {:?} is larger than the delay {:?}: delays would go negative",
                self.jitter, self.delay
            ));
        }
        if let Some(every) = self.stall_every
            && self.stall_for >= every
        {
            return Err(format!(
                "stalls of {:?} every {every:?} would never end",
                self.stall_for
            ));
        }
        Ok(())
    }

    /// The stall covering `t`, as its end, if `t` falls into one.
    pub fn stall_end(&self, t: Duration) -> Option<Duration> {
        let every = self.stall_every?.as_nanos();
        if every == 0 || self.stall_for.is_zero() {
            return None;
        }
        let k = t.as_nanos() / every;
        // The first stall is at `every`, not at 0: a link starts out usable.
        if k == 0 {
            return None;
        }
        let start = k * every;
        let end = start + self.stall_for.as_nanos();
        (t.as_nanos() < end).then(|| nanos(end))
    }
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// When a frame leaves a slow link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Departure {
    pub at: Duration,
    /// A stall held it (it would have left during the stall).
    pub held: bool,
}

/// One direction of a slow link: hands out each frame's departure time in arrival order.
#[derive(Clone, Debug)]
pub struct DelaySchedule {
    profile: LinkProfile,
    rng: u64,
    last: Duration,
}

impl DelaySchedule {
    /// A schedule for one direction; `stream` tells the two directions' jitter apart.
    pub fn new(profile: LinkProfile, stream: u64) -> DelaySchedule {
        DelaySchedule {
            profile,
            rng: profile.seed ^ stream.wrapping_mul(0xa076_1d64_78bd_642f),
            last: Duration::ZERO,
        }
    }

    /// When a frame that arrived at `arrived` leaves: never before the previous frame, and
    /// never inside a stall.
    pub fn due(&mut self, arrived: Duration) -> Duration {
        self.depart(arrived).at
    }

    /// As [`DelaySchedule::due`], saying whether a stall held the frame.
    pub fn depart(&mut self, arrived: Duration) -> Departure {
        let jitter = self.profile.jitter.as_nanos() as u64;
        let delay = self.profile.delay.as_nanos() as u64;
        let span = 2 * jitter + 1;
        let d = delay - jitter + splitmix(&mut self.rng) % span;
        let mut at = (arrived + Duration::from_nanos(d)).max(self.last);
        let stall = self.profile.stall_end(at);
        if let Some(end) = stall {
            at = end;
        }
        self.last = at;
        Departure {
            at,
            held: stall.is_some(),
        }
    }
}

/// SplitMix64: one 64-bit state, full period, good enough for jitter.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn wan() -> LinkProfile {
        LinkProfile::wan(Duration::from_secs(5), 7)
    }

    #[test]
    fn delays_stay_within_the_jitter_and_vary() {
        let mut s = DelaySchedule::new(wan(), 0);
        let mut seen = std::collections::BTreeSet::new();
        // Frames 100 ms apart never catch up with each other: each gets its own delay.
        for i in 0..40u32 {
            let arrived = 100 * MS * i;
            let d = s.due(arrived) - arrived;
            assert!((15 * MS..=25 * MS).contains(&d), "frame {i}: {d:?}");
            seen.insert(d);
        }
        assert!(seen.len() > 30, "the jitter varies: {seen:?}");
    }

    #[test]
    fn the_seed_fixes_the_schedule_and_directions_differ() {
        let run = |seed, stream| {
            let mut s = DelaySchedule::new(LinkProfile { seed, ..wan() }, stream);
            (0..20u32).map(|i| s.due(MS * 50 * i)).collect::<Vec<_>>()
        };
        assert_eq!(run(7, 0), run(7, 0));
        assert_ne!(run(7, 0), run(8, 0));
        assert_ne!(run(7, 0), run(7, 1));
    }

    #[test]
    fn stalls_hold_frames_to_their_end() {
        let p = wan();
        assert_eq!(p.stall_end(Duration::ZERO), None, "no stall at the start");
        assert_eq!(p.stall_end(4999 * MS), None);
        assert_eq!(p.stall_end(5000 * MS), Some(6000 * MS));
        assert_eq!(p.stall_end(5999 * MS), Some(6000 * MS));
        assert_eq!(p.stall_end(6000 * MS), None);
        assert_eq!(p.stall_end(10_500 * MS), Some(11_000 * MS));
        let mut s = DelaySchedule::new(p, 0);
        assert!(!s.depart(4000 * MS).held);
        // Arriving just before the stall, it would leave inside it: it leaves at its end.
        assert_eq!(
            s.depart(4990 * MS),
            Departure {
                at: 6000 * MS,
                held: true
            }
        );
        // Frames arriving during the stall leave at its end too, in order.
        assert_eq!(s.due(5500 * MS), 6000 * MS);
        let after = s.due(6000 * MS);
        assert!((6015 * MS..=6025 * MS).contains(&after), "{after:?}");
    }

    #[test]
    fn no_stalls_and_no_delay_pass_frames_at_once() {
        let p = LinkProfile {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            stall_every: None,
            stall_for: Duration::ZERO,
            seed: 1,
        };
        p.check().unwrap();
        let mut s = DelaySchedule::new(p, 0);
        for t in [0, 5, 5, 9_000] {
            assert_eq!(s.due(MS * t), MS * t);
        }
    }

    #[test]
    fn impossible_profiles_are_refused() {
        let e = LinkProfile {
            jitter: 30 * MS,
            ..wan()
        }
        .check()
        .unwrap_err();
        assert!(e.contains("larger than the delay"), "{e}");
        let e = LinkProfile {
            stall_for: Duration::from_secs(5),
            ..wan()
        }
        .check()
        .unwrap_err();
        assert!(e.contains("never end"), "{e}");
        wan().check().unwrap();
    }

    proptest! {
        /// Whatever the arrivals: departures keep arrival order, are never early, never land
        /// inside a stall, and (outside stalls and queueing) add at most delay + jitter.
        #[test]
        fn departures_are_ordered_late_enough_and_outside_stalls(
            gaps in proptest::collection::vec(0u64..3_000, 1..200),
            seed in any::<u64>(),
        ) {
            let p = LinkProfile { seed, ..LinkProfile::wan(Duration::from_millis(1500), 0) };
            p.check().unwrap();
            let mut s = DelaySchedule::new(p, 3);
            let (mut t, mut last) = (Duration::ZERO, Duration::ZERO);
            for g in gaps {
                t += MS * g as u32;
                let due = s.due(t);
                prop_assert!(due >= last);
                prop_assert!(due >= t + 15 * MS);
                prop_assert_eq!(p.stall_end(due), None);
                // At most the latest of this frame's own delay and the previous departure,
                // moved to the end of a stall it lands in.
                let latest = (t + 25 * MS).max(last);
                prop_assert!(due <= p.stall_end(latest).unwrap_or(latest));
                last = due;
            }
        }
    }
}
