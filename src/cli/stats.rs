//! Medians and latency summaries for the bench.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Median, min and max of repeated runs.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(mut v: Vec<f64>) -> Summary {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// A latency histogram in nanoseconds, 1 ns .. 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos() as u64).max(1));
}

/// Latency figures in µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn latency(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        p50: us(h.value_at_quantile(0.5)),
        p90: us(h.value_at_quantile(0.9)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
    }
}

/// CPU time (user + system) used so far by the caller's threads, the
/// engine's driver threads and the given worker processes, from
/// `/proc/.../schedstat` (the scheduler's run time in ns; `stat`'s utime
/// and stime count 10 ms ticks, too coarse for a 40 ms run), falling back
/// to `stat` where schedstat is missing. Summed over a few runs it tells
/// where a workload's CPU goes even when a noisy machine makes throughput
/// jump about.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub caller: Duration,
    pub driver: Duration,
    pub workers: Duration,
}

impl CpuTime {
    pub fn now(workers: &[i32]) -> CpuTime {
        let mut t = CpuTime::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let p = task.path();
                let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                let used = run_time(&p);
                if comm.starts_with("forkrpc-uring") || comm.starts_with("forkrpc-epoll") {
                    t.driver += used;
                } else if !comm.starts_with("forkrpc-templat") {
                    t.caller += used;
                }
            }
        }
        for pid in workers {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
            for task in tasks.into_iter().flatten().flatten() {
                t.workers += run_time(&task.path());
            }
        }
        t
    }

    pub fn since(self, before: CpuTime) -> CpuTime {
        CpuTime {
            caller: self.caller.saturating_sub(before.caller),
            driver: self.driver.saturating_sub(before.driver),
            workers: self.workers.saturating_sub(before.workers),
        }
    }

    pub fn add(&mut self, o: CpuTime) {
        self.caller += o.caller;
        self.driver += o.driver;
        self.workers += o.workers;
    }

    /// `(caller, driver, workers)` in ns per call over `calls` calls.
    pub fn per_call(&self, calls: usize) -> [(&'static str, f64); 3] {
        let ns = |d: Duration| d.as_nanos() as f64 / calls.max(1) as f64;
        [
            ("caller_cpu_ns", ns(self.caller)),
            ("driver_cpu_ns", ns(self.driver)),
            ("workers_cpu_ns", ns(self.workers)),
        ]
    }
}

/// CPU time of the task at `dir` (`/proc/.../task/TID`): schedstat's run
/// time in ns, else utime + stime from `stat`.
fn run_time(dir: &std::path::Path) -> Duration {
    let ns = std::fs::read_to_string(dir.join("schedstat"))
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
        });
    match ns {
        Some(ns) => Duration::from_nanos(ns),
        None => ticks(&dir.join("stat")),
    }
}

/// utime + stime of one `/proc/.../stat`, or zero if it cannot be read.
fn ticks(path: &std::path::Path) -> Duration {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is
    // field 3, utime 14 and stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v.max(1) as u64);
    Duration::from_nanos(f.iter().sum::<u64>() * 1_000_000_000 / hz)
}
