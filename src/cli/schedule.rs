//! The open-loop schedule of `forkrpc load`: when each call is due, how
//! the generator waits for that time, and which calls it could not send.
//!
//! Call `i` is due at `start + i / rate`. The generator sends a call when
//! its time has come, whether or not earlier calls were answered (open
//! loop), and measures its latency from the due time, so a stall shows in
//! the percentiles (coordinated omission corrected). Two things bound a
//! run whatever the rate:
//! - time: at `start + duration` + [`LEEWAY`] sending stops; calls not
//!   sent by then are *missed* (a generator that cannot keep up, e.g.
//!   `--rate 1e9`; the leeway spares the last calls of a run from a short
//!   stall of the generator's thread);
//! - memory: while `cap` calls are in flight, calls that fall due are not
//!   queued but missed, counted in bulk (no per-call work at absurd rates).
//!
//! The generator's own lateness (send time − due time) is recorded apart,
//! so a script can tell the system's latency from the generator's. Waiting
//! is a sleep with the thread's timer slack at 1 ns (the default 50 µs
//! slack makes every wake-up late), then a spin over the last `spin`.

use super::stats;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

/// When the generator finds every slot taken, it looks again after this
/// long (calls falling due meanwhile are missed, counted by time).
const FULL_PAUSE: Duration = Duration::from_micros(50);

/// How long after the run's end calls due before it may still be sent.
pub const LEEWAY: Duration = Duration::from_millis(100);

/// The schedule of one run.
pub struct Schedule {
    start: Instant,
    end: Instant,
    rate: f64,
    total: u64,
    spin: Duration,
    next: u64,
    missed: u64,
    lateness: Histogram<u64>,
}

impl Schedule {
    /// `rate` calls per second for `duration`, starting now.
    pub fn new(rate: f64, duration: Duration, spin: Duration) -> Schedule {
        // 1 ns of timer slack for this thread: sleeps end when asked.
        // Failure only leaves the default slack (later wake-ups).
        let _ = nix::sys::prctl::set_timerslack(1);
        let start = Instant::now();
        Schedule {
            start,
            end: start + duration + LEEWAY,
            rate,
            total: (duration.as_secs_f64() * rate).floor() as u64,
            spin,
            next: 0,
            missed: 0,
            lateness: stats::histogram(),
        }
    }

    /// Calls the schedule holds (`rate × duration`).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Calls not sent: not in time, or while every slot was taken.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Calls handed out by [`Schedule::next`].
    pub fn sent(&self) -> u64 {
        self.next - self.missed
    }

    /// Send time − due time of every call sent.
    pub fn lateness(&self) -> &Histogram<u64> {
        &self.lateness
    }

    /// When the run started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Whether the next call is due already (its sender may batch it
    /// with the one just handed out).
    pub fn due_now(&self) -> bool {
        self.next < self.total && self.due(self.next) <= Instant::now()
    }

    fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// How many calls are due at `now` (due time ≤ now), at most `total`.
    fn due_by(&self, now: Instant) -> u64 {
        let n = ((now - self.start).as_secs_f64() * self.rate).floor() as u64 + 1;
        n.min(self.total)
    }

    /// Waits for the next call's time and returns it (the call's intended
    /// send time), or `None` when the run is over. `full(sent)` says
    /// whether every slot is taken, given the calls sent so far; then the
    /// calls due are missed.
    pub fn next(&mut self, full: impl Fn(u64) -> bool) -> Option<Instant> {
        loop {
            if self.next >= self.total {
                return None;
            }
            let now = Instant::now();
            if now >= self.end {
                self.missed += self.total - self.next;
                self.next = self.total;
                return None;
            }
            let due = self.due(self.next);
            if due > now {
                self.wait(now, due);
                continue;
            }
            if full(self.sent()) {
                let by = self.due_by(now).max(self.next + 1);
                self.missed += by - self.next;
                self.next = by;
                std::thread::sleep(FULL_PAUSE);
                continue;
            }
            stats::record(&mut self.lateness, now - due);
            self.next += 1;
            return Some(due);
        }
    }

    /// Sleeps until `spin` before `until`, then spins.
    fn wait(&self, now: Instant, until: Instant) {
        let left = until - now;
        if left > self.spin {
            std::thread::sleep(left - self.spin);
        } else {
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_sent_or_missed_and_the_run_ends_on_time() {
        // 10^9 calls/s for 50 ms cannot be sent; with 8 slots that never
        // free up, all but 8 are missed, and the run still ends.
        let mut s = Schedule::new(1e9, Duration::from_millis(50), Duration::ZERO);
        let mut sent = 0u64;
        while s.next(|sent| sent >= 8).is_some() {
            sent += 1;
        }
        assert_eq!(sent, 8);
        assert_eq!(s.total(), 50_000_000);
        assert_eq!(s.sent(), 8);
        assert_eq!(s.missed(), 50_000_000 - 8);
        // The last call is missed once it falls due (at 50 ms − 1 ns).
        assert!(s.start().elapsed() >= Duration::from_nanos(49_999_999));
    }

    #[test]
    fn calls_come_due_in_order_one_interval_apart() {
        let mut s = Schedule::new(
            10_000.0,
            Duration::from_millis(20),
            Duration::from_micros(20),
        );
        let mut due = Vec::new();
        while let Some(d) = s.next(|_| false) {
            due.push(d);
        }
        // A prefix is sent (the rest only if the thread was held up past
        // the end), each call at its own time.
        assert_eq!(due.len() as u64 + s.missed(), 200);
        assert!(!due.is_empty());
        for (i, d) in due.iter().enumerate() {
            assert_eq!(
                (*d - s.start()).as_nanos(),
                Duration::from_secs_f64(i as f64 / 10_000.0).as_nanos()
            );
        }
        assert_eq!(s.lateness().len(), due.len() as u64);
    }
}
