//! Climbing the [`WaitPolicy`] ladder while an exchange (or a post to the group segment) makes
//! no progress: [`Idle`] is one wait's state, [`Waiter`] the transport's policy together with
//! what it has learnt ([`SpinBudget`], [`YieldGuard`]). The rules live in `wait.rs`; this file
//! reads the clock and yields.

use super::wait::{Rung, SpinBudget, WaitPolicy, YieldGuard};
use std::time::{Duration, Instant};

/// The spin rung reads the clock (for the ladder and the deadline) once per this many spins:
/// a clock read costs about as much as a spin (22 ns against a 25 ns `pause` on the project's
/// VM), so reading it every time doubled the spin period and with it the time from the peer's
/// publish to our noticing it. 16 spins are well under a microsecond.
const SPINS_PER_CLOCK: u32 = 16;
/// How often a sleeping wait checks that the peers it waits for are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(20);
/// The longest single sleep (the deadline and liveness are checked between sleeps).
pub(super) const MAX_SLEEP: Duration = Duration::from_millis(10);

/// How long a wait has gone without progress, which picks the rung of the [`WaitPolicy`]
/// ladder, and when the peers' liveness was last checked.
pub(super) struct Idle {
    since: Option<Instant>,
    spins: u32,
    /// Spins left before the clock is read again (see [`SPINS_PER_CLOCK`]).
    unclocked: u32,
    /// Went past the spin rung.
    climbed: bool,
    /// Set on the first wait: an exchange that never waits reads no clock for it (one clock
    /// read is a noticeable part of a 1 µs exchange).
    last_liveness: Option<Instant>,
}

impl Idle {
    pub(super) fn new() -> Idle {
        Idle {
            since: None,
            spins: 0,
            unclocked: 0,
            climbed: false,
            last_liveness: None,
        }
    }

    /// Progress restarts the ladder; the liveness clock keeps running, so a peer that
    /// trickles bytes is still checked every [`LIVENESS_EVERY`].
    fn reset(&mut self) {
        self.since = None;
        self.spins = 0;
        self.unclocked = 0;
        self.climbed = false;
    }

    /// Spin once without reading the clock, if the last clocked spin left some to do.
    #[inline]
    pub(super) fn spin_unclocked(&mut self) -> bool {
        if self.unclocked == 0 {
            return false;
        }
        self.unclocked -= 1;
        self.spins += 1;
        std::hint::spin_loop();
        true
    }

    /// Whether the peers' liveness is due a check (every [`LIVENESS_EVERY`] of waiting).
    pub(super) fn liveness_due(&mut self, now: Instant) -> bool {
        let since = *self.last_liveness.get_or_insert(self.since.unwrap_or(now));
        let due = now.duration_since(since) >= LIVENESS_EVERY;
        if due {
            self.last_liveness = Some(now);
        }
        due
    }
}

/// A transport's way of waiting: its policy and the two adaptations on top of it.
pub(super) struct Waiter {
    policy: WaitPolicy,
    yields: YieldGuard,
    spin: SpinBudget,
}

impl Waiter {
    pub(super) fn new(policy: WaitPolicy) -> Waiter {
        Waiter {
            policy,
            yields: YieldGuard::default(),
            spin: SpinBudget::new(policy.spin_for),
        }
    }

    /// A wait ended in progress: teach the spin budget whether spinning ended it.
    pub(super) fn progressed(&mut self, idle: &mut Idle) {
        if idle.since.is_some() {
            self.spin.after_wait(!idle.climbed);
        }
        idle.reset();
    }

    /// Take one step up the ladder at `now`: spin or yield here and return `false`, or return
    /// `true` when the caller should sleep until its peer may have progressed.
    pub(super) fn climb(&mut self, now: Instant, idle: &mut Idle) -> bool {
        let idle_start = *idle.since.get_or_insert(now);
        let rung = self
            .policy
            .rung(self.spin.now, now.duration_since(idle_start), idle.spins);
        idle.climbed |= rung != Rung::Spin;
        match rung {
            Rung::Spin => {
                idle.spins += 1;
                idle.unclocked = SPINS_PER_CLOCK - 1;
                std::hint::spin_loop();
                false
            }
            Rung::Yield if self.yields.allows(now) => {
                std::thread::yield_now();
                self.yields.record(now, Instant::now());
                false
            }
            Rung::Yield | Rung::Sleep => true,
        }
    }
}
