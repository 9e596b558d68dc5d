//! `forkrpc load`: an open-loop load generator for scripts. Calls go out on
//! schedule (`--rate` per second) whether or not replies have come back,
//! and each call's latency is measured from the time it was *meant* to be
//! sent, so a stall shows up in the percentiles instead of quietly slowing
//! the load (coordinated omission corrected).

use super::args::{parse_duration, parse_engine, parse_positive, parse_positive_duration, Backend};
use super::raw;
use super::schedule::Schedule;
use super::stats::{self, latency};
use forkrpc::{Octets, Options, Pool, PoolOptions, Template};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Calls per second offered (a positive number).
    #[arg(long, default_value = "10000", value_parser = parse_rate, allow_negative_numbers = true)]
    rate: f64,
    /// How long to offer load: seconds (`3`) or with a unit (`500ms`, `2m`);
    /// more than zero. Calls not sent within 0.1 s after it are missed.
    #[arg(long, default_value = "3", value_parser = parse_positive_duration)]
    duration: Duration,
    /// Workers in the pool (at least 1).
    #[arg(long, default_value = "2", value_parser = parse_positive)]
    workers: usize,
    /// Most batches queued on one worker (the pool's `load`; at least 1).
    #[arg(long, default_value = "2", value_parser = parse_positive)]
    load: usize,
    /// Bytes of payload per call (one octet string; at most 64 MiB).
    #[arg(long, default_value = "16", value_parser = parse_payload)]
    payload: usize,
    /// Worker backend: sync or async.
    #[arg(long, default_value = "sync")]
    backend: Backend,
    /// Handler: `echo`, `burn:MICROS` (spins that long) or `sleep:MILLIS`.
    #[arg(long, default_value = "echo", value_parser = parse_handler)]
    handler: HandlerSpec,
    /// Engine: uring or epoll (default: FORKRPC_ENGINE, else uring if available).
    #[arg(long, value_parser = parse_engine)]
    engine: Option<forkrpc::EngineKind>,
    /// After the last call is issued, wait this long for replies; calls
    /// still unanswered then count as errors and their workers are
    /// stopped (the run's drain: it ends by `--duration` + `--grace`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
    /// Most calls in flight (sent, not yet answered; at least 1), and at
    /// most 256 MiB of their payloads. A call that falls due while this
    /// many are in flight is not sent but counted as missed: memory stays
    /// bounded whatever the rate.
    #[arg(long, default_value = "65536", value_parser = parse_positive_u64)]
    max_outstanding: u64,
    /// Spin (instead of sleeping) over this last part of each wait for a
    /// call's due time: a sleep wakes late, a spin burns a core.
    #[arg(long, default_value = "20us", value_parser = parse_duration)]
    spin: Duration,
    /// Skip the raw baseline (the same schedule against a bare socketpair
    /// echo child, run after the pool's) and its ratios.
    #[arg(long)]
    no_baseline: bool,
    /// Print one JSON line with the results instead of text.
    #[arg(long)]
    json: bool,
}

impl LoadArgs {
    /// Calls allowed in flight: `--max-outstanding`, lowered so that their
    /// payloads (plus about 64 bytes of frame and bookkeeping each) stay
    /// within 256 MiB.
    fn in_flight_cap(&self) -> u64 {
        let by_bytes = MAX_BYTES_IN_FLIGHT / (self.payload as u64 + 64);
        self.max_outstanding.min(by_bytes.max(1))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum HandlerSpec {
    Echo,
    Burn(u64),
    Sleep(u64),
}

/// Bytes of payload: a whole number up to 64 MiB.
fn parse_payload(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > MAX_PAYLOAD => Err(format!("{n} bytes is more than 64 MiB")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number of bytes")),
    }
}

/// Largest `--payload`.
const MAX_PAYLOAD: usize = 64 << 20;
/// Most payload bytes in flight: lowers `--max-outstanding` for big payloads.
const MAX_BYTES_IN_FLIGHT: u64 = 256 << 20;

/// A whole number of at least 1.
fn parse_positive_u64(s: &str) -> Result<u64, String> {
    parse_positive(s).map(|n| n as u64)
}

/// Calls per second: a positive, finite number.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        Ok(_) => Err(format!(
            "{s:?}: the rate must be a positive number of calls per second"
        )),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

fn parse_handler(s: &str) -> Result<HandlerSpec, String> {
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{s:?}: expected a whole number after ':'"))
    };
    match s.split_once(':') {
        None if s == "echo" => Ok(HandlerSpec::Echo),
        Some(("burn", v)) => Ok(HandlerSpec::Burn(num(v)?)),
        Some(("sleep", v)) => Ok(HandlerSpec::Sleep(num(v)?)),
        _ => Err(format!(
            "unknown handler {s:?}: echo, burn:MICROS or sleep:MILLIS"
        )),
    }
}

/// What the callbacks record, on the driver thread.
struct Record {
    hist: Mutex<Histogram<u64>>,
    done: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    first_error: Mutex<Option<String>>,
    /// Calls the waiter waits for (`u64::MAX` while calls are still
    /// being sent): the callback that completes them wakes it.
    target: AtomicU64,
    all_in: (Mutex<()>, Condvar),
}

impl Record {
    fn new() -> Record {
        Record {
            hist: Mutex::new(stats::histogram()),
            done: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
            target: AtomicU64::new(u64::MAX),
            all_in: (Mutex::new(()), Condvar::new()),
        }
    }

    fn answer(&self, intended: Instant, res: forkrpc::Result<Octets>) {
        match res {
            Ok(_) => stats::record(&mut self.hist.lock().unwrap(), intended.elapsed()),
            Err(e) => {
                *self.errors.lock().unwrap().entry(e.kind()).or_insert(0) += 1;
                self.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| e.to_string());
            }
        }
        // SeqCst pairs with `wait_for`: either it sees this count, or this
        // sees its target and wakes it.
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.target.load(Ordering::SeqCst) {
            let _g = self.all_in.0.lock().unwrap();
            self.all_in.1.notify_all();
        }
    }

    /// Waits until `sent` calls are answered or `deadline` passes.
    fn wait_for(&self, sent: u64, deadline: Instant) {
        self.target.store(sent, Ordering::SeqCst);
        let mut g = self.all_in.0.lock().unwrap();
        while self.done.load(Ordering::SeqCst) < sent {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self.all_in.1.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

/// The figures of one run against the pool.
struct PoolRun {
    total: u64,
    sent: u64,
    missed: u64,
    ok: u64,
    unanswered: u64,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    hist: Histogram<u64>,
    lateness: Histogram<u64>,
    elapsed: Duration,
}

impl PoolRun {
    fn errors(&self) -> u64 {
        self.errors.values().sum()
    }
}

pub fn run(args: LoadArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let asynchronous = args.backend == Backend::Async;
    let mut opts = Options::default()
        .asynchronous(asynchronous)
        .on_error(|e| eprintln!("forkrpc load: worker error: {e}"));
    if let Some(e) = args.engine {
        opts = opts.engine(e);
    }
    let (name, prefix): (&str, Option<String>) = match args.handler {
        HandlerSpec::Echo => (forkrpc::ECHO, None),
        HandlerSpec::Burn(us) => (forkrpc::BURN, Some(us.to_string())),
        HandlerSpec::Sleep(ms) if asynchronous => (forkrpc::SLEEP, Some(ms.to_string())),
        HandlerSpec::Sleep(ms) => (forkrpc::SLEEP_BLOCKING, Some(ms.to_string())),
    };
    let workers = args.workers;
    let template = Template::root()?;
    let pool = Pool::new(
        &template,
        name,
        opts,
        PoolOptions::default()
            .max(workers)
            .idle(workers)
            .load(args.load)
            .start(Duration::ZERO),
    )?;
    let warm = prefix.as_ref().map(|_| "0".to_owned());
    let mut call_args: Octets = prefix.into_iter().collect();
    call_args.push(vec![b'x'; args.payload].into());
    // Warm up: every worker forked and answering before the clock starts
    // (a sleeping or burning handler for no time: only the forks count).
    let mut warm_args: Octets = warm.into_iter().collect();
    warm_args.push(vec![b'x'; args.payload].into());
    for _ in 0..workers * 4 {
        pool.call_blocking(warm_args.clone())?;
    }
    let r = drive_pool(&pool, &args, &call_args);
    if r.unanswered > 0 {
        // Past --grace: stop the workers instead of waiting for the calls
        // they still run (the run has ended; they count as errors).
        drop(pool.close_within(Duration::ZERO));
    } else {
        drop(pool);
    }
    let raw = if args.no_baseline {
        None
    } else {
        let (fd, _pid) = template.spawn_raw_echo()?;
        let mut sched = Schedule::new(args.rate, args.duration, args.spin);
        let frame = raw::FRAME.max(8 + args.payload);
        let run = raw::open_loop(&fd, &mut sched, frame, args.in_flight_cap())?;
        Some((sched, run))
    };
    report(&args, &r, raw.as_ref().map(|(s, run)| (s, &run.hist)));
    if let Some(e) = &r.first_error {
        eprintln!("forkrpc load: first error: {e}");
    }
    Ok(r.errors() == 0 && r.missed == 0)
}

/// Offers the schedule to the pool; waits `--grace` for the last replies.
fn drive_pool(pool: &Pool, args: &LoadArgs, call_args: &Octets) -> PoolRun {
    let rec = Arc::new(Record::new());
    let bar = progress(args.duration, args.json);
    let cap = args.in_flight_cap();
    let mut sched = Schedule::new(args.rate, args.duration, args.spin);
    let full = |sent: u64| sent - rec.done.load(Ordering::Acquire) >= cap;
    while let Some(intended) = sched.next(full) {
        let r = rec.clone();
        pool.call_with(call_args.clone(), move |res| r.answer(intended, res));
        if let Some(b) = &bar {
            if sched.sent() % 256 == 0 {
                b.set_position(sched.start().elapsed().as_millis() as u64);
            }
        }
    }
    // Replies still on their way get `--grace`, then count as errors.
    rec.wait_for(sched.sent(), Instant::now() + args.grace);
    let elapsed = sched.start().elapsed();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let done = rec.done.load(Ordering::SeqCst).min(sched.sent());
    let unanswered = sched.sent() - done;
    let mut errors = rec.errors.lock().unwrap().clone();
    let failed: u64 = errors.values().sum();
    if unanswered > 0 {
        errors.insert("unanswered", unanswered);
    }
    let first_error = rec.first_error.lock().unwrap().clone();
    let hist = rec.hist.lock().unwrap().clone();
    PoolRun {
        total: sched.total(),
        sent: sched.sent(),
        missed: sched.missed(),
        ok: done - failed.min(done),
        unanswered,
        errors,
        first_error,
        hist,
        lateness: sched.lateness().clone(),
        elapsed,
    }
}

/// Peak resident memory of this process in MiB (`VmHWM`), if known.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn report(args: &LoadArgs, r: &PoolRun, raw: Option<(&Schedule, &Histogram<u64>)>) {
    let l = latency(&r.hist);
    let late = latency(&r.lateness);
    let achieved = r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let raw_l = raw.map(|(_, h)| latency(h));
    // The pool's latency over the raw baseline's (None without one).
    let ratio = |v: f64, base: Option<f64>| base.filter(|b| *b > 0.0).map(|b| v / b);
    let ratios = [
        ratio(l.p50, raw_l.map(|x| x.p50)),
        ratio(l.p99, raw_l.map(|x| x.p99)),
        ratio(l.p999, raw_l.map(|x| x.p999)),
    ];
    let handler = match args.handler {
        HandlerSpec::Echo => "echo".to_owned(),
        HandlerSpec::Burn(us) => format!("burn:{us}"),
        HandlerSpec::Sleep(ms) => format!("sleep:{ms}"),
    };
    let backend = args.backend.name();
    if args.json {
        let raw_json = raw.zip(raw_l).map(|((s, _), rl)| {
            serde_json::json!({
                "sent": s.sent(),
                "missed": s.missed(),
                "p50_us": rl.p50,
                "p99_us": rl.p99,
                "p999_us": rl.p999,
                "max_us": rl.max,
            })
        });
        let line = serde_json::json!({
            "offered_rate": args.rate,
            "achieved_rate": achieved,
            "calls": r.total,
            "sent": r.sent,
            "missed": r.missed,
            "ok": r.ok,
            "errors": r.errors(),
            "errors_by_kind": r.errors,
            "unanswered": r.unanswered,
            "p50_us": l.p50,
            "p90_us": l.p90,
            "p99_us": l.p99,
            "p999_us": l.p999,
            "max_us": l.max,
            "mean_us": r.hist.mean() / 1000.0,
            "send_late_p50_us": late.p50,
            "send_late_p99_us": late.p99,
            "send_late_p999_us": late.p999,
            "raw": raw_json,
            "p50_ratio": ratios[0],
            "p99_ratio": ratios[1],
            "p999_ratio": ratios[2],
            "duration_s": r.elapsed.as_secs_f64(),
            "max_outstanding": args.in_flight_cap(),
            "peak_rss_mib": peak_rss_mib(),
            "workers": args.workers,
            "load": args.load,
            "payload": args.payload,
            "backend": backend,
            "handler": handler,
        });
        outln!("{line}");
        return;
    }
    outln!(
        "offered {:.0} calls/s for {:.2} s: {} calls, {} sent, {} missed, achieved {:.0} calls/s, {} errors{}",
        args.rate,
        args.duration.as_secs_f64(),
        r.total,
        r.sent,
        r.missed,
        achieved,
        r.errors(),
        if r.errors.is_empty() {
            String::new()
        } else {
            let kinds: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!(" ({})", kinds.join(", "))
        }
    );
    outln!(
        "latency from intended send (µs): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max
    );
    outln!(
        "generator's own lateness (µs):   p50 {:.1}  p99 {:.1}  p99.9 {:.1}",
        late.p50,
        late.p99,
        late.p999
    );
    if let Some(rl) = raw_l {
        let [p50, p99, p999] = ratios.map(|r| r.map_or("-".to_owned(), |r| format!("{r:.2}")));
        outln!(
            "raw socketpair echo, same schedule (µs): p50 {:.1}  p99 {:.1}  p99.9 {:.1}; ratio p50 {p50}  p99 {p99}  p99.9 {p999}",
            rl.p50, rl.p99, rl.p999,
        );
    }
}

/// A progress bar over the run's milliseconds, on a terminal only.
fn progress(d: Duration, json: bool) -> Option<indicatif::ProgressBar> {
    if json {
        return None;
    }
    let b = indicatif::ProgressBar::with_draw_target(
        Some(d.as_millis() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    b.set_style(
        indicatif::ProgressStyle::with_template("load {bar:40} {elapsed}/{duration}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    (!b.is_hidden()).then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_parse() {
        assert_eq!(parse_handler("echo"), Ok(HandlerSpec::Echo));
        assert_eq!(parse_handler("burn:50"), Ok(HandlerSpec::Burn(50)));
        assert_eq!(parse_handler("sleep:10"), Ok(HandlerSpec::Sleep(10)));
        assert!(parse_handler("burn").is_err());
        assert!(parse_handler("sleep:x").is_err());
        assert!(parse_handler("nap:1").is_err());
    }
}
