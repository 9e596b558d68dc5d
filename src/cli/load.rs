//! `forkrpc load`: an open-loop load generator for scripts. Calls go out on
//! schedule (`--rate` per second) whether or not replies have come back,
//! and each call's latency is measured from the time it was *meant* to be
//! sent, so a stall shows up in the percentiles instead of quietly slowing
//! the load (coordinated omission corrected).

use super::stats::{self, latency};
use forkrpc::{Octets, Options, Pool, PoolOptions, Template};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Calls per second offered (a positive number).
    #[arg(long, default_value = "10000", value_parser = parse_rate, allow_negative_numbers = true)]
    rate: f64,
    /// How long to offer load: seconds (`3`) or with a unit (`500ms`, `2m`);
    /// more than zero.
    #[arg(long, default_value = "3", value_parser = parse_positive_duration)]
    duration: Duration,
    /// Workers in the pool (at least 1).
    #[arg(long, default_value = "2", value_parser = parse_positive)]
    workers: usize,
    /// Most batches queued on one worker (the pool's `load`; at least 1).
    #[arg(long, default_value = "2", value_parser = parse_positive)]
    load: usize,
    /// Bytes of payload per call (one octet string).
    #[arg(long, default_value_t = 16)]
    payload: usize,
    /// Worker backend: sync or async.
    #[arg(long, default_value = "sync")]
    backend: super::bench::Backend,
    /// Handler: `echo`, `burn:MICROS` (spins that long) or `sleep:MILLIS`.
    #[arg(long, default_value = "echo", value_parser = parse_handler)]
    handler: HandlerSpec,
    /// Engine: uring or epoll (default: FORKRPC_ENGINE, else uring if available).
    #[arg(long)]
    engine: Option<String>,
    /// After the last call is issued, wait this long for replies; calls
    /// still unanswered then count as errors.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
    /// Print one JSON line with the results instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HandlerSpec {
    Echo,
    Burn(u64),
    Sleep(u64),
}

/// `3` (seconds), `1.5`, `500ms`, `2m`, `1h` …
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a duration"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

/// A duration of more than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// A whole number of at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
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
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    all_in: (Mutex<bool>, Condvar),
}

pub fn run(args: LoadArgs) -> Result<bool, Box<dyn std::error::Error>> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a positive number of calls per second".into());
    }
    let asynchronous = args.backend == super::bench::Backend::Async;
    let mut opts = Options::default()
        .asynchronous(asynchronous)
        .on_error(|e| eprintln!("forkrpc load: worker error: {e}"));
    if let Some(e) = &args.engine {
        opts = opts.engine(super::bench::parse_engine(e)?);
    }
    let (name, prefix): (&str, Option<String>) = match args.handler {
        HandlerSpec::Echo => (forkrpc::ECHO, None),
        HandlerSpec::Burn(us) => (forkrpc::BURN, Some(us.to_string())),
        HandlerSpec::Sleep(ms) if asynchronous => (forkrpc::SLEEP, Some(ms.to_string())),
        HandlerSpec::Sleep(ms) => (forkrpc::SLEEP_BLOCKING, Some(ms.to_string())),
    };
    let workers = args.workers.max(1);
    let template = Template::root()?;
    let pool = Pool::new(
        &template,
        name,
        opts,
        PoolOptions::default()
            .max(workers)
            .idle(workers)
            .load(args.load.max(1))
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

    let rec = Arc::new(Record {
        hist: Mutex::new(stats::histogram()),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        all_in: (Mutex::new(false), Condvar::new()),
    });
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let total = (args.duration.as_secs_f64() * args.rate).floor() as u64;
    let bar = progress(args.duration, args.json);
    let start = Instant::now();
    let mut issued = 0u64;
    while issued < total {
        let due = start + interval.mul_f64(issued as f64);
        let now = Instant::now();
        if due > now {
            // Sleep in short steps; calls due meanwhile go out together.
            std::thread::sleep((due - now).min(Duration::from_millis(1)));
            continue;
        }
        // Every call whose time has come, at once (open loop).
        while issued < total && start + interval.mul_f64(issued as f64) <= now {
            let intended = start + interval.mul_f64(issued as f64);
            let r = rec.clone();
            pool.call_with(call_args.clone(), move |res| {
                match res {
                    Ok(_) => stats::record(&mut r.hist.lock().unwrap(), intended.elapsed()),
                    Err(e) => {
                        r.errors.fetch_add(1, Ordering::Relaxed);
                        r.first_error.lock().unwrap().get_or_insert(e.to_string());
                    }
                }
                if r.done.fetch_add(1, Ordering::AcqRel) + 1 == total {
                    *r.all_in.0.lock().unwrap() = true;
                    r.all_in.1.notify_all();
                }
            });
            issued += 1;
        }
        if let Some(b) = &bar {
            b.set_position(start.elapsed().as_millis() as u64);
        }
    }
    let issue_time = start.elapsed();
    // Replies still on their way get `--grace`, then count as errors.
    let deadline = Instant::now() + args.grace;
    let mut all = rec.all_in.0.lock().unwrap();
    while !*all && total > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        all = rec.all_in.1.wait_timeout(all, deadline - now).unwrap().0;
    }
    drop(all);
    let elapsed = start.elapsed();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let done = rec.done.load(Ordering::Acquire);
    let unanswered = total - done.min(total);
    let errors = rec.errors.load(Ordering::Relaxed) + unanswered;
    let hist = rec.hist.lock().unwrap().clone();
    let l = latency(&hist);
    let ok = done - rec.errors.load(Ordering::Relaxed);
    let achieved = ok as f64 / elapsed.max(issue_time).as_secs_f64().max(1e-9);
    if args.json {
        println!(
            "{{\"offered_rate\":{:.1},\"achieved_rate\":{:.1},\"calls\":{},\"errors\":{},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1},\"unanswered\":{},\"duration_s\":{:.3},\"workers\":{},\"load\":{},\"payload\":{},\"backend\":\"{}\",\"handler\":\"{}\"}}",
            args.rate,
            achieved,
            total,
            errors,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            hist.mean() / 1000.0,
            unanswered,
            elapsed.as_secs_f64(),
            workers,
            args.load,
            args.payload,
            if asynchronous { "async" } else { "sync" },
            match args.handler {
                HandlerSpec::Echo => "echo".to_owned(),
                HandlerSpec::Burn(us) => format!("burn:{us}"),
                HandlerSpec::Sleep(ms) => format!("sleep:{ms}"),
            }
        );
    } else {
        println!(
            "offered {:.0} calls/s for {:.2} s: {} calls, achieved {:.0} calls/s, {} errors{}",
            args.rate,
            args.duration.as_secs_f64(),
            total,
            achieved,
            errors,
            if unanswered > 0 {
                format!(" ({unanswered} unanswered after {:?})", args.grace)
            } else {
                String::new()
            }
        );
        println!(
            "latency from intended send (µs): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
    if let Some(e) = rec.first_error.lock().unwrap().as_ref() {
        eprintln!("forkrpc load: first error: {e}");
    }
    if unanswered > 0 {
        // Past --grace: stop the workers instead of waiting for the calls
        // they still run (the run has ended; they count as errors).
        drop(pool.close_within(Duration::ZERO));
    } else {
        drop(pool);
    }
    Ok(errors == 0)
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
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }

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
