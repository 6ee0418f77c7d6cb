//! How a waiting rank spends the time until its peer answers: the [`WaitPolicy`] ladder (spin,
//! yield, sleep) that [`super::MeshTransport`] climbs whenever an exchange makes no progress, and
//! the two run-time adaptations on top of it ([`SpinBudget`], [`YieldGuard`]). Pure: no clock
//! reads and no system calls here, so the rules are tested exhaustively without timing.

use std::time::{Duration, Instant};

/// How a rank waits for a peer, in three rungs counted from the last progress: busy-wait for
/// `spin_for` (and at least `spin_iters` times), then yield the core until `yield_for` has
/// passed (a yield returns at once when nobody else wants the core, and hands it over when a
/// peer sharing it needs to run), then sleep on the link (futex or `poll(2)`) until woken.
/// Every link yields, TCP included.
///
/// The default is for ranks that share cores (measured on 2 cores with 4 ranks, 1 KiB
/// all_reduce): no spinning (a spinning rank holds the core its peer needs to answer: 2–10×
/// slower; even 1 µs cost a third), then yield, TCP too: on an idle host 4 ranks over TCP took
/// 53–81 µs yielding against 72–97 µs sleeping in `poll(2)` at once (Open MPI, which yields,
/// 61–81). Yielding beside busy processes costs a time slice per yield (medians up to 2.8 ms
/// once, for TCP); the `YieldGuard` sees that and sends the waits to sleep (`poll(2)`, where the
/// kernel wakes the rank on data) for a while: 58–102 µs with two CPU hogs beside, like
/// `poll(2)`'s 73–117, where Open MPI took 4–12 ms.
/// [`WaitPolicy::for_host`] picks the policy for ranks that have cores of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    pub spin_iters: u32,
    pub spin_for: Duration,
    pub yield_for: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy {
            spin_iters: 0,
            spin_for: Duration::ZERO,
            yield_for: Duration::from_millis(5),
        }
    }
}

/// How long a rank with a core of its own busy-waits before it yields or sleeps. Far longer
/// than a message takes (about 1 µs over shared memory, 10 µs over loopback TCP), because a
/// rank that sleeps costs more than its own wake-up: the kernel tends to wake it on its
/// waker's core, and two ranks on one core each spin a full window while the other cannot
/// run (measured, 2 ranks over TCP with builds running: 50 µs gave a steady 143 µs per
/// all_reduce, 2 × 50 µs + a wake-up, in most runs; 250 µs gave 545–585 µs in half the runs;
/// 1 ms gave 8–19 µs in 28 runs of 32, see [`SpinBudget`]).
/// Open MPI busy-polls without any bound; this bound keeps a rank whose peer is slow (a
/// longer compute step) from burning its core for more than a millisecond per wait.
pub const OWN_CORE_SPIN: Duration = Duration::from_millis(1);

impl WaitPolicy {
    /// The policy for `ranks_here` ranks on a host of `cores` cores. When every rank has a core
    /// of its own, spin for [`OWN_CORE_SPIN`], then yield, then sleep: a sleeping rank costs a
    /// context switch per message, ~30 µs on a VM (Open MPI busy-polls for the same reason).
    /// When ranks share cores, the [default](WaitPolicy::default): no spin.
    pub fn for_host(ranks_here: usize, cores: usize) -> WaitPolicy {
        if ranks_here <= cores {
            WaitPolicy {
                spin_for: OWN_CORE_SPIN,
                ..WaitPolicy::default()
            }
        } else {
            WaitPolicy::default()
        }
    }

    /// The rung of the ladder for a wait that has gone `waited` (and `spins` busy-waits)
    /// without progress, spinning for `spin_for` (the [`SpinBudget`], at most the policy's).
    pub(super) fn rung(&self, spin_for: Duration, waited: Duration, spins: u32) -> Rung {
        if spins < self.spin_iters || waited < spin_for {
            Rung::Spin
        } else if waited < self.yield_for {
            Rung::Yield
        } else {
            Rung::Sleep
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rung {
    Spin,
    Yield,
    Sleep,
}

/// A yield that keeps a rank off its core longer than this handed the core to other work on
/// the host for a time slice: the kernel (EEVDF) charges a yielding task for the rest of its
/// slice, so with a busy process beside the ranks each yield costs about a slice (measured:
/// 4 ranks on 2 cores beside a build, 1 KiB all_reduce over shared memory, medians of 1.6–2.8
/// ms instead of 20–30 µs). Among ranks alone, a yield returns as soon as the rank it let run
/// waits in turn: microseconds.
const SLOW_YIELD: Duration = Duration::from_micros(250);
/// This many slow yields within [`STRIKE_WINDOW`] close the yield rung. One is not enough: on
/// an idle host a kernel thread or a timer now and then keeps a yielding rank out for 0.25–5 ms
/// (seen in 5 runs of 5, 4 ranks on 2 cores), and closing the rung on that sent the rest of the
/// run to sleeping, a futex wake per message (10–20 µs instead of 10). Beside busy processes a
/// slow yield comes with nearly every wait, so three come within a few slices.
const SLOW_YIELD_STRIKES: u32 = 3;
const STRIKE_WINDOW: Duration = Duration::from_millis(50);
/// Once closed, the yield rung is skipped (waits go from spinning to sleeping, where the kernel
/// wakes the rank as soon as data comes) for a while, then tried again: first for
/// [`YIELD_BACKOFF_MIN`], twice as long at each closing that follows within
/// [`YIELD_BACKOFF_RESET`] of the last, up to [`YIELD_BACKOFF_MAX`]. Beside busy processes the
/// rung keeps closing and the back-off soon reaches its maximum; a single burst (ranks
/// starting beside each other, pinned to one CPU, each exec and page fault a slow yield for
/// the other) costs only the minimum. With a fixed 100 ms, one such burst at start-up sent 1
/// in 8 short benchmarks (4 ranks on 2 CPUs, 1 KiB) to futex sleeps throughout: 10.5 against
/// 7.0 µs.
const YIELD_BACKOFF_MIN: Duration = Duration::from_millis(10);
const YIELD_BACKOFF_MAX: Duration = Duration::from_millis(100);
const YIELD_BACKOFF_RESET: Duration = Duration::from_secs(1);

/// Whether yielding pays on this host just now: adapts the [`WaitPolicy`] ladder to other work
/// sharing the cores, which the policy, fixed at start-up, cannot know.
#[derive(Debug, Default)]
pub(super) struct YieldGuard {
    skip_until: Option<Instant>,
    /// The back-off of the last closing (`skip_until` is its end).
    backoff: Duration,
    /// Slow yields counted since `window_start`.
    strikes: u32,
    window_start: Option<Instant>,
}

impl YieldGuard {
    pub(super) fn allows(&self, now: Instant) -> bool {
        self.skip_until.is_none_or(|until| now >= until)
    }

    /// A yield that began at `start` returned at `end`.
    pub(super) fn record(&mut self, start: Instant, end: Instant) {
        if end.saturating_duration_since(start) <= SLOW_YIELD {
            return;
        }
        let window_over = self
            .window_start
            .is_none_or(|w| end.saturating_duration_since(w) > STRIKE_WINDOW);
        if window_over {
            self.window_start = Some(start);
            self.strikes = 0;
        }
        self.strikes += 1;
        if self.strikes >= SLOW_YIELD_STRIKES {
            let recent = self
                .skip_until
                .is_some_and(|until| end.saturating_duration_since(until) <= YIELD_BACKOFF_RESET);
            self.backoff = if recent {
                (self.backoff * 2).clamp(YIELD_BACKOFF_MIN, YIELD_BACKOFF_MAX)
            } else {
                YIELD_BACKOFF_MIN
            };
            self.skip_until = Some(end + self.backoff);
            self.strikes = 0;
            self.window_start = None;
        }
    }
}

/// The spin rung never shrinks below this (unless the policy's is shorter): longer than a message
/// takes between ranks on cores of their own (1 µs over shared memory, 10 µs over loopback TCP),
/// so a spin that can succeed keeps succeeding and grows the budget back.
const SPIN_FLOOR: Duration = Duration::from_micros(20);

/// How long the spin rung lasts now: halved after every wait that spinning did not end, doubled
/// (up to the policy's) after every wait it did. Two ranks that share a core while the policy
/// thinks they have one each (other work on the host pushed them together, the kernel woke one
/// beside the other) end no wait by spinning, since the spinner holds the core its peer needs:
/// each would spin its whole window per message. With the budget at [`SPIN_FLOOR`] that costs
/// tens of microseconds instead of milliseconds, and once they are apart again their waits end
/// within the spin and it grows back. Not shown to be enough: with builds running, 4 runs in 32
/// of 2 ranks over TCP still gave 1–2 ms per 1 KiB all_reduce, three of them with this budget
/// (BENCHMARKS.md, "Small messages: waiting that adapts").
#[derive(Debug)]
pub(super) struct SpinBudget {
    pub(super) now: Duration,
    max: Duration,
}

impl SpinBudget {
    pub(super) fn new(max: Duration) -> SpinBudget {
        SpinBudget { now: max, max }
    }

    /// A wait ended; `by_spinning`: it ended on the spin rung.
    pub(super) fn after_wait(&mut self, by_spinning: bool) {
        self.now = if by_spinning {
            (self.now * 2).min(self.max)
        } else {
            (self.now / 2).max(SPIN_FLOOR.min(self.max))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: WaitPolicy = WaitPolicy {
        spin_iters: 0,
        spin_for: Duration::ZERO,
        yield_for: Duration::from_millis(5),
    };

    #[test]
    fn ranks_with_cores_of_their_own_spin_then_yield_on_every_link() {
        for (ranks, cores) in [(1, 1), (2, 2), (1, 64), (64, 64)] {
            let p = WaitPolicy::for_host(ranks, cores);
            assert_eq!(p.spin_for, OWN_CORE_SPIN, "{ranks} ranks, {cores} cores");
            assert!(p.yield_for > p.spin_for, "the yield rung must outlast the spin rung");
        }
        // Sharing cores, a spinning rank holds the core its peer needs: no spin.
        for (ranks, cores) in [(3, 2), (4, 2), (65, 64)] {
            assert_eq!(
                WaitPolicy::for_host(ranks, cores),
                SHARED,
                "{ranks} ranks, {cores} cores"
            );
        }
        assert_eq!(WaitPolicy::default(), SHARED);
    }

    #[test]
    fn the_ladder_climbs_spin_yield_sleep() {
        let ms = Duration::from_millis;
        let own = WaitPolicy::for_host(2, 2);
        let rung = |p: WaitPolicy, waited, spins| p.rung(p.spin_for, waited, spins);
        assert_eq!(rung(own, Duration::ZERO, 0), Rung::Spin);
        assert_eq!(rung(own, OWN_CORE_SPIN - Duration::from_nanos(1), 1000), Rung::Spin);
        assert_eq!(rung(own, OWN_CORE_SPIN, 1000), Rung::Yield);
        assert_eq!(rung(own, ms(5), 1000), Rung::Sleep);
        // Shared cores: no spin; every link yields first.
        assert_eq!(rung(SHARED, Duration::ZERO, 0), Rung::Yield);
        assert_eq!(rung(SHARED, ms(4), 0), Rung::Yield);
        assert_eq!(rung(SHARED, ms(5), 0), Rung::Sleep);
        // A spin count is a floor, whatever the clock says.
        let counted = WaitPolicy {
            spin_iters: 3,
            ..SHARED
        };
        assert_eq!(rung(counted, ms(9), 2), Rung::Spin);
        assert_eq!(rung(counted, ms(9), 3), Rung::Sleep);
    }

    #[test]
    fn repeated_slow_yields_skip_the_yield_rung_for_a_while() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let ms = Duration::from_millis;
        let mut guard = YieldGuard::default();
        assert!(guard.allows(t0));
        // A yield of exactly the bound is not slow, however many there are.
        for i in 0..10 {
            guard.record(t0 + ms(i), t0 + ms(i) + SLOW_YIELD);
        }
        assert!(guard.allows(t0 + ms(10)));
        // One slow yield now and then (an idle host's kernel threads) never closes the rung.
        let mut t = t0 + ms(20);
        for _ in 0..20 {
            guard.record(t, t + ms(5));
            assert!(guard.allows(t + ms(5)), "a lone slow yield closed the rung");
            t += STRIKE_WINDOW + ms(1);
        }
        // Strikes short of the count within one window leave it open; the last one closes it.
        let start = t;
        for k in 1..SLOW_YIELD_STRIKES {
            guard.record(t, t + us(300));
            assert!(guard.allows(t + us(300)), "closed after {k} strikes");
            t += ms(1);
        }
        let end = t + ms(3);
        guard.record(t, end);
        assert!(end - start <= STRIKE_WINDOW);
        assert!(!guard.allows(end));
        assert!(!guard.allows(end + YIELD_BACKOFF_MIN - us(1)));
        assert!(guard.allows(end + YIELD_BACKOFF_MIN));
        // The count starts again after a back-off: one more slow yield does not close it.
        let later = end + YIELD_BACKOFF_MIN;
        guard.record(later, later + ms(1));
        assert!(guard.allows(later + ms(1)));
        // Fast yields leave it open.
        guard.record(later, later + us(3));
        assert!(guard.allows(later + us(3)));
    }

    #[test]
    fn the_back_off_doubles_while_the_rung_keeps_closing_and_starts_over_after_a_quiet_second() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut guard = YieldGuard::default();
        // Close the rung at `t` with a burst of slow yields; returns when it opens again.
        let close = |guard: &mut YieldGuard, t: Instant| {
            for k in 0..SLOW_YIELD_STRIKES {
                let start = t + ms(u64::from(k));
                guard.record(start, start + ms(1));
            }
            let end = t + ms(u64::from(SLOW_YIELD_STRIKES));
            assert!(!guard.allows(end));
            let mut open = end;
            while !guard.allows(open) {
                open += ms(1);
            }
            (end, open - end)
        };
        // Busy processes beside: it closes again as soon as it opens.
        let mut t = t0;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (end, backoff) = close(&mut guard, t);
            seen.push(backoff);
            t = end + backoff;
        }
        assert_eq!(seen, [10, 20, 40, 80, 100, 100].map(ms), "back-offs: {seen:?}");
        assert_eq!(seen[0], YIELD_BACKOFF_MIN);
        assert_eq!(*seen.last().unwrap(), YIELD_BACKOFF_MAX);
        // A second without closing: the next burst costs the minimum again.
        let (_, backoff) = close(&mut guard, t + YIELD_BACKOFF_RESET + ms(1));
        assert_eq!(backoff, YIELD_BACKOFF_MIN);
    }

    #[test]
    fn the_spin_budget_shrinks_on_misses_to_its_floor_and_grows_back_on_hits() {
        let mut b = SpinBudget::new(OWN_CORE_SPIN);
        let mut seen = vec![b.now];
        for _ in 0..20 {
            b.after_wait(false);
            seen.push(b.now);
        }
        assert!(seen.windows(2).all(|w| w[1] <= w[0]), "misses never grow it: {seen:?}");
        assert_eq!(b.now, SPIN_FLOOR);
        for _ in 0..20 {
            b.after_wait(true);
        }
        assert_eq!(b.now, OWN_CORE_SPIN);
        // A policy that does not spin never starts to, and one shorter than the floor stays put.
        for max in [Duration::ZERO, SPIN_FLOOR / 4] {
            let mut b = SpinBudget::new(max);
            for hit in [true, false, false, true] {
                b.after_wait(hit);
                assert_eq!(b.now, max);
            }
        }
        // The spin rung follows the budget, not the policy's maximum.
        let own = WaitPolicy::for_host(2, 2);
        assert_eq!(own.rung(SPIN_FLOOR, SPIN_FLOOR, 9), Rung::Yield);
    }
}
