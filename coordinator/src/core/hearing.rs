//! Whether the coordinator can hear its workers at all: the rule that keeps a coordinator cut
//! off from the network from declaring every worker lost.
//!
//! A worker's silence past the deadline means it is gone only if the coordinator hears the
//! others. When no worker at all has been heard for half a deadline (heartbeats come far more
//! often; the defaults are 1 s and 10 s), the coordinator takes itself to be the one cut off
//! (its own link, its host, a stall of its process): it declares nobody lost, and when the
//! first worker is heard again every worker is credited the time nobody could be heard, so
//! each has what was left of its deadline to come back. Declaring them lost instead would
//! stop every running job on reconnection (their ranks no longer desired) for nothing: with
//! every worker silent there is nowhere to restart a job anyway.
//!
//! Half a deadline, because a blackout must be recognized before the first worker's deadline
//! passes: workers fall silent together, their last heartbeats at most one interval apart,
//! so when the first one's silence reaches the deadline the coordinator has heard nobody for
//! at least the deadline minus one interval.

/// What the coordinator has heard, across all workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hearing {
    /// When any worker was last heard (a heartbeat or a registration).
    last_heard_ms: u64,
    /// A tick found nobody heard for half a deadline, and nobody has been heard since.
    isolated: bool,
}

/// What a tick may do about silent workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Others are heard: a worker silent past the deadline is lost.
    Hearing,
    /// Nobody heard for `silent_ms`; `newly` on the first tick that found it.
    Isolated { silent_ms: u64, newly: bool },
}

impl Hearing {
    /// As of `now_ms` (a start, or a restart that gives every worker a fresh deadline).
    pub fn new(now_ms: u64) -> Hearing {
        Hearing {
            last_heard_ms: now_ms,
            isolated: false,
        }
    }

    /// A worker was heard at `now_ms`. When that ends an isolation, returns how long nobody
    /// was heard: the credit every worker's silence gets.
    pub fn heard(&mut self, now_ms: u64) -> Option<u64> {
        let credit = self.isolated.then(|| now_ms.saturating_sub(self.last_heard_ms));
        self.isolated = false;
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
        credit
    }

    /// A tick at `now_ms`, with `alive` workers expected to be heard.
    pub fn tick(&mut self, now_ms: u64, deadline_ms: u64, alive: usize) -> Verdict {
        let silent_ms = now_ms.saturating_sub(self.last_heard_ms);
        if alive == 0 || silent_ms <= deadline_ms / 2 {
            return Verdict::Hearing;
        }
        let newly = !self.isolated;
        self.isolated = true;
        Verdict::Isolated { silent_ms, newly }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: u64 = 10_000;

    #[test]
    fn workers_heard_within_half_a_deadline_mean_the_coordinator_hears() {
        let mut h = Hearing::new(0);
        assert_eq!(h.tick(5_000, D, 2), Verdict::Hearing);
        assert_eq!(h.heard(5_000), None);
        assert_eq!(h.tick(10_000, D, 2), Verdict::Hearing);
    }

    #[test]
    fn nobody_heard_for_half_a_deadline_is_isolation_reported_once() {
        let mut h = Hearing::new(1_000);
        assert_eq!(
            h.tick(6_001, D, 3),
            Verdict::Isolated {
                silent_ms: 5_001,
                newly: true
            }
        );
        assert_eq!(
            h.tick(40_000, D, 3),
            Verdict::Isolated {
                silent_ms: 39_000,
                newly: false
            }
        );
        // The first worker heard again ends it; the credit is the whole silence.
        assert_eq!(h.heard(41_000), Some(40_000));
        assert_eq!(h.heard(41_100), None, "credited once");
        assert_eq!(h.tick(41_200, D, 3), Verdict::Hearing);
    }

    #[test]
    fn no_live_worker_is_no_isolation() {
        let mut h = Hearing::new(0);
        assert_eq!(h.tick(60_000, D, 0), Verdict::Hearing);
        assert_eq!(h.heard(60_000), None);
    }

    #[test]
    fn a_silence_no_tick_saw_earns_no_credit() {
        // Between ticks (a simulated clock jumping ahead): nothing was judged in between.
        let mut h = Hearing::new(0);
        assert_eq!(h.heard(9_000), None);
        assert_eq!(h.tick(9_500, D, 1), Verdict::Hearing);
    }

    #[test]
    fn heard_never_moves_backwards() {
        let mut h = Hearing::new(5_000);
        assert_eq!(h.heard(4_000), None);
        assert_eq!(h.tick(10_000, D, 1), Verdict::Hearing);
        assert!(matches!(
            h.tick(10_001, D, 1),
            Verdict::Isolated { silent_ms: 5_001, .. }
        ));
    }
}
