//! When the driver polls before it sleeps (see [`Spin`]).

use std::time::Duration;

/// When the driver polls before it sleeps. Waking a sleeping thread costs
/// about as much as a whole round trip to a worker on these machines, so
/// while few calls are in flight (a ping-pong, a caller awaiting each
/// reply, whose next call the poll then catches too) the driver polls for
/// up to [`Spin::LIMIT`] before sleeping: W2 went from 1.3–1.45 to
/// 0.86–0.97 of the raw ping-pong, W2f from 2.6–3.0 to 2.07. With many calls in
/// flight a wake-up is shared by a batch of replies and polling would only
/// take CPU from the workers, so it does not. A poll that finds nothing
/// makes the next ones rarer (1, 3, 7 ... up to 63 waits are skipped), so
/// slow calls cost little CPU; one that finds a completion resets that.
/// `FORKRPC_SPIN_US` sets the limit in µs; 0 turns polling off.
pub(crate) struct Spin {
    limit: Duration,
    skip: u32,
    backoff: u32,
}

impl Spin {
    /// Default limit: a little more than a round trip to an idle worker.
    pub(crate) const LIMIT: Duration = Duration::from_micros(30);
    /// Calls in flight up to which the driver polls.
    pub(crate) const MAX_IN_FLIGHT: u64 = 4;

    pub(super) fn from_env() -> Spin {
        let limit = std::env::var("FORKRPC_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Self::LIMIT, Duration::from_micros);
        Spin::new(limit)
    }

    fn new(limit: Duration) -> Spin {
        Spin {
            limit,
            skip: 0,
            backoff: 0,
        }
    }

    /// How long to poll before a wait with `timeout`, `in_flight` calls
    /// being outstanding.
    /// `in_flight` is asked only when the rest allows polling.
    pub(super) fn before_wait(
        &mut self,
        timeout: Option<Duration>,
        in_flight: impl FnOnce() -> u64,
    ) -> Duration {
        if self.limit.is_zero()
            || timeout.is_some_and(|t| t < self.limit)
            || in_flight() > Self::MAX_IN_FLIGHT
        {
            return Duration::ZERO;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Duration::ZERO;
        }
        self.limit
    }

    /// After a wait that polled for `spun`, returning after `took`.
    pub(super) fn after_wait(&mut self, spun: Duration, took: Duration) {
        if spun.is_zero() {
            return;
        }
        if took <= spun {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2 + 1).min(63);
            self.skip = self.backoff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// docs/engines.md: "polls for up to 30 µs" "while at most four calls
    /// are in flight".
    #[test]
    fn polling_defaults_are_the_documented_ones() {
        assert_eq!(Spin::LIMIT, 30 * US);
        assert_eq!(Spin::MAX_IN_FLIGHT, 4);
    }

    #[test]
    fn the_driver_polls_only_with_few_calls_in_flight() {
        let mut s = Spin::new(30 * US);
        assert_eq!(s.before_wait(None, || 0), 30 * US);
        assert_eq!(s.before_wait(None, || Spin::MAX_IN_FLIGHT), 30 * US);
        assert_eq!(
            s.before_wait(None, || Spin::MAX_IN_FLIGHT + 1),
            Duration::ZERO
        );
        assert_eq!(s.before_wait(Some(Duration::ZERO), || 1), Duration::ZERO);
        assert_eq!(
            s.before_wait(Some(10 * US), || 1),
            Duration::ZERO,
            "a timer due first"
        );
        assert_eq!(s.before_wait(Some(Duration::from_secs(1)), || 1), 30 * US);
        let mut off = Spin::new(Duration::ZERO);
        assert_eq!(off.before_wait(None, || 1), Duration::ZERO);
    }

    #[test]
    fn polls_that_find_nothing_back_off_and_a_find_resets() {
        let mut s = Spin::new(30 * US);
        // Waits that poll, each poll finding nothing (the wait took longer).
        let polled = |s: &mut Spin, waits: usize, found: bool| {
            (0..waits)
                .filter(|_| {
                    let spun = s.before_wait(None, || 1);
                    s.after_wait(spun, if found { 5 * US } else { 40 * US });
                    !spun.is_zero()
                })
                .count()
        };
        let mut at = vec![];
        for i in 0..200 {
            if polled(&mut s, 1, false) == 1 {
                at.push(i);
            }
        }
        // Gaps of 1, 3, 7, ... 63 waits, then every 64th.
        assert_eq!(at, [0, 2, 6, 14, 30, 62, 126, 190]);
        // Sleeping waits between polls (no poll) change nothing; a poll
        // that finds a completion makes the next wait poll again.
        while polled(&mut s, 1, true) == 0 {}
        assert_eq!(polled(&mut s, 5, true), 5);
        assert_eq!(polled(&mut s, 1, false), 1);
        assert_eq!(polled(&mut s, 2, false), 1, "one skipped, then a poll");
    }
}
