//! How far a fault reaches in a pool, on both engines: a timed-out call
//! leaves the pool open and sound (no false `Closed` for the calls after
//! it).
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

mod common;

use common::{await_in_order, check, eq, EngineTest};
use forkrpc::{octets, EngineKind, Error, Options, Pool, PoolOptions, Template};
use libtest_mimic::{Arguments, Failed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pid() -> String {
    std::process::id().to_string()
}

fn template() -> Result<Template, Error> {
    Template::builder()
        .sync("f::die", |args| {
            if args.str(0) == Some("die") {
                // SAFETY: _exit takes an integer and never returns.
                unsafe { libc::_exit(7) }
            }
            octets![args[0].clone(), pid()]
        })
        // `abort:N`, `panic:N`, `exit:N` crash the worker; anything else
        // comes back in brackets.
        .sync("f::work", |args| {
            let a = args.str(0).unwrap_or("");
            match a.split(':').next() {
                Some("abort") => std::process::abort(),
                Some("panic") => panic!("bad input {a}"),
                // SAFETY: _exit takes an integer and never returns.
                Some("exit") => unsafe { libc::_exit(7) },
                Some("sleep") => {
                    std::thread::sleep(ms(a[6..].parse().unwrap()));
                    octets![a.to_owned()]
                }
                _ => octets![format!("<{a}>")],
            }
        })
        .sync("f::sleep", |args| {
            std::thread::sleep(ms(args.num(0).unwrap() as u64));
            octets![args[0].clone(), pid()]
        })
        .start()
}

fn main() {
    let t = template().expect("template starts");
    let args = Arguments::from_args();
    let tests: [(&str, EngineTest); 7] = [
        ("a_crash_in_a_chunk_counts_its_calls", chunk_count),
        ("map_crashes_cost_only_their_calls", map_crashes),
        ("call_crashes_cost_only_their_calls", call_crashes),
        ("dead_worker_is_replaced_at_once", replaced_at_once),
        ("crash_loop_backs_off_and_reports", crash_loop),
        ("timeout_leaves_the_pool_open", timeout_then_quick),
        (
            "timeout_with_retries_leaves_the_pool_open",
            timeout_retries_then_quick,
        ),
    ];
    libtest_mimic::run(&args, common::engine_trials(&t, &tests)).exit();
}

/// 100 rounds: a call that overruns the timeout (its worker is killed),
/// then three quick calls at once, each of which must succeed.
fn rounds_after_timeouts(t: &Template, engine: EngineKind, retries: u32) -> Result<(), Failed> {
    let timeout = ms(100);
    let pool = Pool::new(
        t,
        "f::sleep",
        Options::default().engine(engine).on_error(|_| {}),
        PoolOptions::default()
            .max(2)
            .timeout(timeout)
            .retries(retries),
    )?;
    for round in 0..100 {
        match pool.call_blocking(octets!["10000"]) {
            Err(Error::Timeout { after }) => eq(after, timeout)?,
            other => return Err(format!("round {round}: expected Timeout, got {other:?}").into()),
        }
        let quick: Vec<_> = (0..3).map(|i| pool.call(octets![i.to_string()])).collect();
        for (i, r) in await_in_order(quick).into_iter().enumerate() {
            let r = r.map_err(|e| format!("round {round}, quick call {i}: {e:?}"))?;
            eq(r.str(0), Some(i.to_string().as_str()))?;
        }
    }
    pool.close_blocking()?;
    Ok(())
}

fn timeout_then_quick(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    rounds_after_timeouts(t, engine, 0)
}

fn timeout_retries_then_quick(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    rounds_after_timeouts(t, engine, 3)
}

/// With a start interval of an hour, a dead worker is still replaced at
/// once: the call after the crash is answered (not after an hour).
fn replaced_at_once(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "f::die",
        Options::default().engine(engine).on_error(|_| {}),
        PoolOptions::default()
            .max(1)
            .start(Duration::from_secs(3600)),
    )?;
    let first = pool.call_blocking(octets!["a"])?;
    for round in 0..3 {
        match pool.call_blocking(octets!["die"]) {
            Err(Error::WorkerExited { .. }) => {}
            other => {
                return Err(format!("round {round}: expected WorkerExited, got {other:?}").into())
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        pool.call_with(octets!["b"], move |r| tx.send(r).unwrap());
        let r = common::recv(&rx)??;
        eq(r.str(0), Some("b"))?;
        check(
            r[1] != first[1],
            "the call after a crash ran on a new worker",
        )?;
    }
    pool.close_blocking()?;
    Ok(())
}

/// Workers that die before finishing any call are a crash loop: after
/// `crash_loop` such deaths the pool backs off and says so through
/// `on_error`; once a worker finishes a call, replacements are immediate
/// again.
fn crash_loop(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    let errors: Arc<Mutex<Vec<Error>>> = Arc::default();
    let e = errors.clone();
    let pool = Pool::new(
        t,
        "f::die",
        Options::default()
            .engine(engine)
            .on_error(move |err| e.lock().unwrap().push(err)),
        PoolOptions::default()
            .max(1)
            .max_batch(1)
            .crash_loop(3, ms(20)),
    )?;
    // Each call kills a fresh worker before it finished anything.
    for _ in 0..4 {
        check(pool.call_blocking(octets!["die"]).is_err(), "a crash")?;
    }
    let loops: Vec<(usize, Duration)> = errors
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Error::CrashLoop { deaths, backoff } => Some((*deaths, *backoff)),
            _ => None,
        })
        .collect();
    eq(loops.iter().map(|l| l.0).collect::<Vec<_>>(), vec![3, 4])?;
    check(
        loops[0].1 <= ms(20) && loops[1].1 <= ms(40) && loops[1].1 > ms(20),
        format!("back-offs double from 20 ms: {loops:?}"),
    )?;
    let ok = pool.call_blocking(octets!["x"])?;
    eq(ok.str(0), Some("x"))?;
    pool.close_blocking()?;
    Ok(())
}

const JOBS: usize = 10_000;

/// 10,000 inputs, 20 of which crash their worker (abort, panic, _exit in
/// turn), spread over the run.
fn crash_inputs() -> Vec<String> {
    (0..JOBS)
        .map(|i| match (i % 500 == 250, (i / 500) % 3) {
            (true, 0) => format!("abort:{i}"),
            (true, 1) => format!("panic:{i}"),
            (true, _) => format!("exit:{i}"),
            _ => i.to_string(),
        })
        .collect()
}

/// Exactly the crashing inputs fail, each saying how; every other one
/// has its own result.
fn check_crash_results(
    what: &str,
    inputs: &[String],
    results: Vec<forkrpc::Result<forkrpc::Octets>>,
) -> Result<(), Failed> {
    eq(results.len(), inputs.len())?;
    let mut failed = 0;
    for (i, (a, r)) in inputs.iter().zip(results).enumerate() {
        let ok = match (a.split(':').next().unwrap(), &r) {
            ("abort", Err(Error::WorkerExited { status, .. })) => {
                *status == forkrpc::ExitStatus::Signal(6)
            }
            ("exit", Err(Error::WorkerExited { status, .. })) => {
                *status == forkrpc::ExitStatus::Code(7)
            }
            ("panic", Err(Error::HandlerPanicked { message, .. })) => {
                message.starts_with(&format!("bad input {a}"))
            }
            (_, Ok(o)) => o.str(0) == Some(format!("<{a}>").as_str()),
            _ => false,
        };
        check(ok, format!("{what}: input {i} ({a}): {r:?}"))?;
        failed += usize::from(r.is_err());
    }
    eq(failed, 20)
}

fn crash_pool(t: &Template, engine: EngineKind, max_batch: Option<usize>) -> Result<Pool, Failed> {
    let mut popts = PoolOptions::default().max(2);
    if let Some(n) = max_batch {
        popts = popts.max_batch(n);
    }
    Ok(Pool::new(
        t,
        "f::work",
        Options::default().engine(engine).on_error(|_| {}),
        popts,
    )?)
}

fn map_crashes(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    let inputs = crash_inputs();
    for max_batch in [None, Some(1), Some(64)] {
        let pool = crash_pool(t, engine, max_batch)?;
        let results = pool
            .map(inputs.iter().map(|a| octets![a.clone()]))
            .results()
            .collect();
        check_crash_results(&format!("map, max_batch {max_batch:?}"), &inputs, results)?;
        pool.close_blocking()?;
    }
    Ok(())
}

fn call_crashes(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    let inputs = crash_inputs();
    for max_batch in [None, Some(1), Some(64)] {
        let pool = crash_pool(t, engine, max_batch)?;
        let calls: Vec<_> = inputs
            .iter()
            .map(|a| pool.call(octets![a.clone()]))
            .collect();
        let results = await_in_order(calls);
        check_crash_results(&format!("call, max_batch {max_batch:?}"), &inputs, results)?;
        pool.close_blocking()?;
    }
    Ok(())
}

/// A worker dies on the first of eight queued calls; the first four of
/// them went to it as one chunk (guided scheduling: half the queue per
/// batch): the error counts the four calls outstanding (not one chunk),
/// and the seven it never ran succeed on its replacement.
fn chunk_count(t: &Template, engine: EngineKind) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "f::work",
        Options::default().engine(engine).on_error(|_| {}),
        PoolOptions::default().max(1).load(1),
    )?;
    let busy = pool.call(octets!["sleep:200"]);
    let mut calls = vec![pool.call(octets!["abort:0"])];
    calls.extend((1..8).map(|i| pool.call(octets![i.to_string()])));
    let mut results = await_in_order(calls).into_iter();
    match results.next().unwrap() {
        Err(Error::WorkerExited {
            outstanding: 4,
            status: forkrpc::ExitStatus::Signal(6),
            ..
        }) => {}
        other => return Err(format!("expected 4 calls outstanding, got {other:?}").into()),
    }
    for (i, r) in (1..8).zip(results) {
        eq(r?.str(0), Some(format!("<{i}>").as_str()))?;
    }
    common::block(busy)?;
    pool.close_blocking()?;
    Ok(())
}
