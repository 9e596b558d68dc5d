//! `forkrpc bench`: the workloads of BENCHMARKS.md on the built-in echo
//! worker, each with its raw baseline measured in the same run, repeated
//! `--runs` times (median, min, max). Ratios are value / raw.

use super::args::{parse_at_most, parse_engine, Backend};
use super::raw;
use super::stats::{self, latency, summarize, CpuTime, Latency};
use forkrpc::serial::{Json, Rkyv};
use forkrpc::{
    octets, EngineKind, Octets, Options, Pool, PoolOptions, Template, Typed, ECHO, ECHO_JSON,
    ECHO_RKYV, SLEEP,
};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// One JSON object per workload instead of a table.
    #[arg(long)]
    json: bool,
    /// Workloads to run, e.g. `W1,W2` (default: all supported).
    #[arg(long, value_delimiter = ',', value_parser = parse_workload)]
    only: Vec<String>,
    /// Measured runs per workload (after one warm-up; 1 to 1000).
    #[arg(long, default_value = "5", value_parser = |s: &str| parse_at_most(s, MAX_RUNS))]
    runs: usize,
    /// Engine: uring or epoll (default: FORKRPC_ENGINE, else uring if available).
    #[arg(long, value_parser = parse_engine)]
    engine: Option<EngineKind>,
    /// Calls per run for W1, W3 and W3-map, all queued at once (BENCHMARKS.md:
    /// 200000; at most 20,000,000, about 1.5 GB queued).
    #[arg(long, default_value = "200000", value_parser = |s: &str| parse_at_most(s, MAX_CALLS))]
    calls: usize,
    /// Round trips per run for W2/W2f (BENCHMARKS.md: 20000; at most
    /// 10,000,000).
    #[arg(long, default_value = "20000", value_parser = |s: &str| parse_at_most(s, MAX_PINGS))]
    pings: usize,
    /// Backend of the echo worker in W1, W2, W2f and W4: sync or async.
    #[arg(long, default_value = "sync")]
    backend: Backend,
    /// Serialiser of W1 and W4: octets (Perl's default), json or rkyv.
    #[arg(long, default_value = "octets")]
    serialiser: Serialiser,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serialiser {
    Octets,
    Json,
    Rkyv,
}

/// The echo worker of W1 and W4 through the chosen serialiser.
enum Echo {
    Octets(forkrpc::Rpc),
    Json(Typed<Json, serde_json::Value, serde_json::Value>),
    Rkyv(Typed<Rkyv, Vec<u8>, Vec<u8>>),
}

impl Echo {
    fn new(t: &Template, opts: &Options, ser: Serialiser) -> BenchResult<Echo> {
        Ok(match ser {
            Serialiser::Octets => Echo::Octets(t.fork().run(ECHO, opts.clone())?),
            Serialiser::Json => Echo::Json(t.fork().run(ECHO_JSON, opts.clone())?.typed(Json)),
            Serialiser::Rkyv => Echo::Rkyv(
                t.fork()
                    .run(ECHO_RKYV, opts.clone())?
                    .typed(Rkyv::checked()),
            ),
        })
    }

    /// `calls` echoes of a 16-byte string, all queued at once; calls/s.
    fn pipelined(&self, calls: usize) -> BenchResult<f64> {
        let cd = Countdown::new(calls);
        let t = Instant::now();
        match self {
            Echo::Octets(rpc) => {
                let arg = arg16();
                for _ in 0..calls {
                    rpc.call_with(arg.clone(), move |r| cd.hit(r.is_ok()));
                }
            }
            Echo::Json(typed) => {
                let arg = serde_json::json!(["0123456789abcdef"]);
                for _ in 0..calls {
                    typed.call_with(&arg, move |r| cd.hit(r.is_ok()));
                }
            }
            Echo::Rkyv(typed) => {
                let arg = b"0123456789abcdef".to_vec();
                for _ in 0..calls {
                    typed.call_with(&arg, move |r| cd.hit(r.is_ok()));
                }
            }
        }
        cd.wait()?;
        Ok(calls as f64 / t.elapsed().as_secs_f64())
    }

    /// One echo of `size` bytes, blocking; checks the size that came back.
    fn big(&self, payload: &BigPayload) -> BenchResult<()> {
        let n = match (self, payload) {
            (Echo::Octets(rpc), BigPayload::Octets(p)) => rpc.call_blocking(p.clone())?[0].len(),
            (Echo::Json(typed), BigPayload::Json(p)) => {
                typed.call_blocking(p)?.as_str().map_or(0, str::len)
            }
            (Echo::Rkyv(typed), BigPayload::Rkyv(p)) => typed.call_blocking(p)?.len(),
            _ => unreachable!("payload made for this serialiser"),
        };
        if n != BIG {
            return Err(format!("W4: echo came back with {n} bytes, not {BIG}").into());
        }
        Ok(())
    }

    fn payload(&self) -> BigPayload {
        match self {
            Echo::Octets(_) => BigPayload::Octets(octets![vec![0x42u8; BIG]]),
            Echo::Json(_) => BigPayload::Json(serde_json::Value::String("B".repeat(BIG))),
            Echo::Rkyv(_) => BigPayload::Rkyv(vec![0x42u8; BIG]),
        }
    }

    fn pid(&self) -> i32 {
        match self {
            Echo::Octets(rpc) => rpc.pid(),
            Echo::Json(t) => t.rpc().pid(),
            Echo::Rkyv(t) => t.rpc().pid(),
        }
    }

    fn close(self) -> BenchResult<()> {
        let rpc = match self {
            Echo::Octets(rpc) => rpc,
            Echo::Json(t) => t.rpc().clone(),
            Echo::Rkyv(t) => t.rpc().clone(),
        };
        rpc.close_blocking()?;
        Ok(())
    }
}

enum BigPayload {
    Octets(Octets),
    Json(serde_json::Value),
    Rkyv(Vec<u8>),
}

struct Row {
    id: &'static str,
    name: &'static str,
    unit: &'static str,
    value: stats::Summary,
    raw: Option<f64>,
    extra: Vec<(&'static str, f64)>,
    runs: usize,
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const ALL: [&str; 9] = ["W1", "W2", "W2f", "W3", "W4", "W5", "W6", "W7", "W3-map"];

pub fn run(args: BenchArgs) -> BenchResult<()> {
    let engine = args.engine.unwrap_or_else(EngineKind::from_env);
    let runs = args.runs;
    let template = Template::root()?;
    let backend = args.backend;
    let opts = Options::default()
        .engine(engine)
        .asynchronous(backend == Backend::Async);
    let backend_name = backend.name();
    let wanted =
        |id: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(id));
    if !args.json {
        outln!(
            "forkrpc bench — engine {}, {backend_name} backend, {} serialiser (W1, W4), {runs} runs each (median [min..max]); ratio = value / raw baseline of the same run",
            engine.name(),
            format!("{:?}", args.serialiser).to_lowercase()
        );
        outln!(
            "{:<5} {:<18} {:>14} {:>14} {:>9}  {:<10} details",
            "id",
            "name",
            "value",
            "raw",
            "ratio",
            "unit"
        );
    }
    type Step<'a> = Box<dyn FnOnce() -> BenchResult<Row> + 'a>;
    let (t, o, ser) = (&template, &opts, args.serialiser);
    let ser_name = match ser {
        Serialiser::Octets => "octets",
        Serialiser::Json => "json",
        Serialiser::Rkyv => "rkyv",
    };
    let steps: Vec<(&str, Step)> = vec![
        ("W1", Box::new(|| w1(t, o, runs, args.calls, ser))),
        ("W2", Box::new(|| w2(t, o, runs, args.pings, false))),
        ("W2f", Box::new(|| w2(t, o, runs, args.pings, true))),
        ("W3", Box::new(|| w3(t, o, runs, args.calls, false))),
        ("W3-map", Box::new(|| w3(t, o, runs, args.calls, true))),
        ("W4", Box::new(|| w4(t, o, runs, ser))),
        ("W5", Box::new(|| w5(t, engine, runs))),
        ("W6", Box::new(|| w6(t, o, runs))),
        ("W7", Box::new(|| w7(t, o))),
    ];
    let steps: Vec<_> = steps.into_iter().filter(|(id, _)| wanted(id)).collect();
    // On a terminal, a bar on stderr says which workload runs; it stays
    // out of pipes and files, and away from --json.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(steps.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    for (id, step) in steps {
        bar.set_message(format!("running {id}"));
        let row = step()?;
        bar.suspend(|| print_row(&row, args.json, backend_name, ser_name));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Most measured runs per workload.
const MAX_RUNS: usize = 1000;
/// Most calls of W1/W3 queued at once (about 75 bytes each in flight).
const MAX_CALLS: usize = 20_000_000;
/// Most round trips per W2 run (one in flight; bounds the time).
const MAX_PINGS: usize = 10_000_000;

/// A workload's id, as in BENCHMARKS.md.
fn parse_workload(s: &str) -> Result<String, String> {
    match ALL.iter().find(|a| a.eq_ignore_ascii_case(s)) {
        Some(a) => Ok((*a).to_owned()),
        None => Err(format!("unknown workload {s:?}; known: {}", ALL.join(", "))),
    }
}

fn print_row(r: &Row, json: bool, backend: &str, ser: &str) {
    let ratio = r.raw.map(|raw| r.value.median / raw);
    if json {
        let mut s = format!(
            "{{\"workload\":\"{}\",\"name\":\"{}\",\"value\":{:.3},\"unit\":\"{}\",\"raw\":{},\"ratio\":{},\"runs\":{},\"min\":{:.3},\"max\":{:.3},\"backend\":\"{}\"",
            r.id,
            r.name,
            r.value.median,
            r.unit,
            num(r.raw),
            num(ratio),
            r.runs,
            r.value.min,
            r.value.max,
            if r.id == "W5" { "async" } else { backend }
        );
        if matches!(r.id, "W1" | "W4") {
            s.push_str(&format!(",\"serialiser\":\"{ser}\""));
        }
        for (k, v) in &r.extra {
            s.push_str(&format!(",\"{k}\":{v:.3}"));
        }
        s.push('}');
        outln!("{s}");
    } else {
        let details: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
        outln!(
            "{:<5} {:<18} {:>14.1} {:>14} {:>9}  {:<10} [{:.1}..{:.1}] {}",
            r.id,
            r.name,
            r.value.median,
            r.raw
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            ratio
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into()),
            r.unit,
            r.value.min,
            r.value.max,
            details.join(" ")
        );
    }
}

fn num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}"))
        .unwrap_or_else(|| "null".into())
}

/// Counts replies down and wakes the waiter at zero.
struct Countdown {
    left: AtomicUsize,
    done: Mutex<bool>,
    cond: Condvar,
    errors: AtomicUsize,
}

impl Countdown {
    /// A countdown that lives for the rest of the run: reply callbacks
    /// borrow it instead of cloning an `Arc`, whose count would bounce
    /// between the caller's and the driver's threads on every call and
    /// show up in the figures as overhead of the harness, not the library.
    fn new(n: usize) -> &'static Self {
        Box::leak(Box::new(Countdown {
            left: AtomicUsize::new(n),
            done: Mutex::new(false),
            cond: Condvar::new(),
            errors: AtomicUsize::new(0),
        }))
    }
    fn hit(&self, ok: bool) {
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.done.lock().unwrap() = true;
            self.cond.notify_all();
        }
    }
    fn wait(&self) -> BenchResult<()> {
        let mut d = self.done.lock().unwrap();
        while !*d {
            d = self.cond.wait(d).unwrap();
        }
        match self.errors.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(format!("{n} calls failed").into()),
        }
    }
}

fn arg16() -> Octets {
    octets![&b"0123456789abcdef"[..]]
}

fn w1(
    t: &Template,
    opts: &Options,
    runs: usize,
    calls: usize,
    ser: Serialiser,
) -> BenchResult<Row> {
    let echo = Echo::new(t, opts, ser)?;
    let (rawfd, _) = t.spawn_raw_echo()?;
    echo.pipelined(calls / 10)?;
    raw::stream(&rawfd, calls / 10 * raw::FRAME, 64 * 1024)?;
    let (mut v, mut r) = (Vec::new(), Vec::new());
    let mut cpu = CpuTime::default();
    for _ in 0..runs {
        let d = raw::stream(&rawfd, calls * raw::FRAME, 64 * 1024)?;
        r.push(calls as f64 / d.as_secs_f64());
        let before = CpuTime::now(&[echo.pid()]);
        v.push(echo.pipelined(calls)?);
        cpu.add(CpuTime::now(&[echo.pid()]).since(before));
    }
    echo.close()?;
    Ok(Row {
        id: "W1",
        name: "echo-pipelined",
        unit: "calls/s",
        value: summarize(v),
        raw: Some(summarize(r).median),
        extra: cpu.per_call(calls * runs).to_vec(),
        runs,
    })
}

/// One W2 run: `n` round trips, each issued from the previous reply.
fn ping_chain(rpc: &forkrpc::Rpc, n: usize) -> BenchResult<hdrhistogram::Histogram<u64>> {
    struct State {
        rpc: forkrpc::Rpc,
        left: AtomicUsize,
        hist: Mutex<hdrhistogram::Histogram<u64>>,
        cd: &'static Countdown,
        arg: Octets,
    }
    fn issue(s: Arc<State>) {
        let t = Instant::now();
        let s2 = s.clone();
        s.rpc.call_with(s.arg.clone(), move |r| {
            stats::record(&mut s2.hist.lock().unwrap(), t.elapsed());
            let ok = r.is_ok();
            if ok && s2.left.fetch_sub(1, Ordering::Relaxed) > 1 {
                issue(s2);
            } else {
                s2.cd.hit(ok);
            }
        });
    }
    let s = Arc::new(State {
        rpc: rpc.clone(),
        left: AtomicUsize::new(n),
        hist: Mutex::new(stats::histogram()),
        cd: Countdown::new(1),
        arg: arg16(),
    });
    issue(s.clone());
    s.cd.wait()?;
    let h = s.hist.lock().unwrap().clone();
    Ok(h)
}

/// One W2f run: a task awaits each call's future before the next.
fn ping_future(rpc: &forkrpc::Rpc, n: usize) -> BenchResult<hdrhistogram::Histogram<u64>> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let mut h = stats::histogram();
        let arg = arg16();
        for _ in 0..n {
            let t = Instant::now();
            rpc.call(arg.clone()).await?;
            stats::record(&mut h, t.elapsed());
        }
        Ok(h)
    })
}

fn w2(t: &Template, opts: &Options, runs: usize, n: usize, future: bool) -> BenchResult<Row> {
    let rpc = t.fork().run(ECHO, opts.clone())?;
    let (rawfd, _) = t.spawn_raw_echo()?;
    let one = |rpc: &forkrpc::Rpc, n| {
        if future {
            ping_future(rpc, n)
        } else {
            ping_chain(rpc, n)
        }
    };
    one(&rpc, n / 10)?;
    raw::ping_pong(&rawfd, n / 10)?;
    let (mut means, mut raws) = (Vec::new(), Vec::new());
    let mut all = stats::histogram();
    let mut raw_all = stats::histogram();
    for _ in 0..runs {
        let rh = raw::ping_pong(&rawfd, n)?;
        raws.push(rh.mean() / 1000.0);
        raw_all.add(&rh)?;
        let h = one(&rpc, n)?;
        means.push(h.mean() / 1000.0);
        all.add(&h)?;
    }
    rpc.close_blocking()?;
    let l: Latency = latency(&all);
    let rl = latency(&raw_all);
    Ok(Row {
        id: if future { "W2f" } else { "W2" },
        name: if future {
            "ping-pong-future"
        } else {
            "ping-pong"
        },
        unit: "us/call",
        value: summarize(means),
        raw: Some(summarize(raws).median),
        extra: vec![
            ("p50_us", l.p50),
            ("p90_us", l.p90),
            ("p99_us", l.p99),
            ("p999_us", l.p999),
            ("max_us", l.max),
            ("raw_p50_us", rl.p50),
            ("raw_p99_us", rl.p99),
        ],
        runs,
    })
}

/// Two raw echo children fed in parallel: frames/s for `calls` frames.
fn raw_pair(fds: &[OwnedFd; 2], calls: usize) -> BenchResult<f64> {
    let t = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = fds
            .iter()
            .map(|fd| s.spawn(move || raw::stream(fd, calls / 2 * raw::FRAME, 64 * 1024)))
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().expect("raw thread").map(drop))
    })?;
    Ok(calls as f64 / t.elapsed().as_secs_f64())
}

/// W3: a pool of 2 (max 2, idle 2, load 2), `calls` echo calls of 16
/// bytes queued at once (or, for W3-map, one `map` over them); calls/s.
/// Baseline: two raw echo children streaming in parallel.
fn w3(t: &Template, opts: &Options, runs: usize, calls: usize, map: bool) -> BenchResult<Row> {
    let pool = Pool::new(
        t,
        ECHO,
        opts.clone(),
        PoolOptions::default().max(2).idle(2).load(2),
    )?;
    let fds = [t.spawn_raw_echo()?.0, t.spawn_raw_echo()?.0];
    let mut cpu = CpuTime::default();
    // One run of `n` calls; adds the CPU time it took to `cpu`.
    let mut once = |n: usize| -> BenchResult<f64> {
        let arg = arg16();
        let pids = pool.stats().pids;
        if map {
            // Distinct arguments, made before the clock starts (as a
            // Python `Pool.map` over a prepared list).
            let jobs: Vec<Octets> = (0..n).map(|i| octets![format!("{i:016}")]).collect();
            let before = CpuTime::now(&pids);
            let start = Instant::now();
            let mut got = 0;
            for (_, r) in pool.map(jobs) {
                r?;
                got += 1;
            }
            let rate = n as f64 / start.elapsed().as_secs_f64();
            cpu.add(CpuTime::now(&pids).since(before));
            if got != n {
                return Err(format!("W3-map: {got} results for {n} jobs").into());
            }
            return Ok(rate);
        }
        let before = CpuTime::now(&pids);
        let start = Instant::now();
        let cd = Countdown::new(n);
        for _ in 0..n {
            pool.call_with(arg.clone(), move |r| cd.hit(r.is_ok()));
        }
        cd.wait()?;
        let rate = n as f64 / start.elapsed().as_secs_f64();
        cpu.add(CpuTime::now(&pids).since(before));
        Ok(rate)
    };
    once(calls / 10)?;
    raw_pair(&fds, calls / 10)?;
    let (mut v, mut r) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        r.push(raw_pair(&fds, calls)?);
        v.push(once(calls)?);
    }
    let cpu = cpu.per_call(calls / 10 + calls * runs);
    pool.close_blocking()?;
    Ok(Row {
        id: if map { "W3-map" } else { "W3" },
        name: if map { "pool-map" } else { "pool" },
        unit: "calls/s",
        value: summarize(v),
        raw: Some(summarize(r).median),
        // Both workers live through every run (idle = max = 2).
        extra: cpu.to_vec(),
        runs,
    })
}

const BIG: usize = 16 << 20;
const BIG_CALLS: usize = 32;

fn w4(t: &Template, opts: &Options, runs: usize, ser: Serialiser) -> BenchResult<Row> {
    let echo = Echo::new(t, opts, ser)?;
    let (rawfd, _) = t.spawn_raw_echo()?;
    let payload = echo.payload();
    let moved = (2 * BIG * BIG_CALLS) as f64 / 1e6;
    let once = |calls: usize| -> BenchResult<f64> {
        let t = Instant::now();
        for _ in 0..calls {
            echo.big(&payload)?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let raw_once = |calls: usize| -> BenchResult<f64> {
        let mut d = Duration::ZERO;
        for _ in 0..calls {
            d += raw::stream(&rawfd, BIG, 1 << 20)?;
        }
        Ok(d.as_secs_f64())
    };
    once(2)?;
    raw_once(2)?;
    let (mut v, mut r) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        r.push(moved / raw_once(BIG_CALLS)?);
        v.push(moved / once(BIG_CALLS)?);
    }
    echo.close()?;
    Ok(Row {
        id: "W4",
        name: "big-payload",
        unit: "MB/s",
        value: summarize(v),
        raw: Some(summarize(r).median),
        extra: vec![],
        runs,
    })
}

const W5_CALLS: usize = 1000;
const W5_SLEEP_MS: u64 = 100;

/// W5: 1,000 calls each sleeping 100 ms on a timer in one async worker;
/// total wall time in ms. The baseline is the ideal: one sleep.
fn w5(t: &Template, engine: EngineKind, runs: usize) -> BenchResult<Row> {
    let opts = Options::default().engine(engine).asynchronous(true);
    let rpc = t.fork().run(SLEEP, opts)?;
    let arg = octets![W5_SLEEP_MS.to_string()];
    let once = || -> BenchResult<f64> {
        let cd = Countdown::new(W5_CALLS);
        let start = Instant::now();
        for _ in 0..W5_CALLS {
            rpc.call_with(arg.clone(), move |r| cd.hit(r.is_ok()));
        }
        cd.wait()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    once()?;
    let v = (0..runs).map(|_| once()).collect::<BenchResult<Vec<_>>>()?;
    rpc.close_blocking()?;
    Ok(Row {
        id: "W5",
        name: "async-concurrency",
        unit: "ms",
        value: summarize(v),
        raw: Some(W5_SLEEP_MS as f64),
        extra: vec![],
        runs,
    })
}

fn w6(t: &Template, opts: &Options, runs: usize) -> BenchResult<Row> {
    let n = 20;
    let (mut v, mut r) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut us = Vec::new();
        let mut raw_us = Vec::new();
        for _ in 0..n {
            let start = Instant::now();
            let (fd, _) = t.spawn_raw_echo()?;
            raw::ping_pong(&fd, 1)?;
            raw_us.push(start.elapsed().as_secs_f64() * 1e6);
            drop(fd);
            let start = Instant::now();
            let rpc = t.fork().run(ECHO, opts.clone())?;
            rpc.call_blocking(octets!["x"])?;
            us.push(start.elapsed().as_secs_f64() * 1e6);
            rpc.close_blocking()?;
        }
        v.push(summarize(us).median);
        r.push(summarize(raw_us).median);
    }
    Ok(Row {
        id: "W6",
        name: "cold-start",
        unit: "us",
        value: summarize(v),
        raw: Some(summarize(r).median),
        extra: vec![],
        runs,
    })
}

/// RSS and PSS in KiB from /proc/PID/smaps_rollup.
fn memory(pid: i32) -> BenchResult<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Option<f64> {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    match (field("Rss:"), field("Pss:")) {
        (Some(r), Some(p)) => Ok((r, p)),
        _ => Err(format!("no Rss/Pss in /proc/{pid}/smaps_rollup").into()),
    }
}

/// W7: memory of an idle sync worker (the value), an idle async worker
/// (extra fields) and the raw echo child (the baseline).
fn w7(t: &Template, opts: &Options) -> BenchResult<Row> {
    let rpc = t.fork().run(ECHO, opts.clone().asynchronous(false))?;
    rpc.call_blocking(octets!["warm"])?; // the worker has run its loop once
    let (rss, pss) = memory(rpc.pid())?;
    let (fd, raw_pid) = t.spawn_raw_echo()?;
    raw::ping_pong(&fd, 1)?;
    let (raw_rss, raw_pss) = memory(raw_pid)?;
    rpc.close_blocking()?;
    let arpc = t.fork().run(ECHO, opts.clone().asynchronous(true))?;
    arpc.call_blocking(octets!["warm"])?;
    let (async_rss, async_pss) = memory(arpc.pid())?;
    arpc.close_blocking()?;
    Ok(Row {
        id: "W7",
        name: "memory",
        unit: "KiB RSS",
        value: summarize(vec![rss]),
        raw: Some(raw_rss),
        extra: vec![
            ("pss_kib", pss),
            ("async_rss_kib", async_rss),
            ("async_pss_kib", async_pss),
            ("raw_pss_kib", raw_pss),
        ],
        runs: 1,
    })
}
