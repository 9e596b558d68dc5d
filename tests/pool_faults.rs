//! How far a fault reaches in a pool, on both engines: a timed-out call
//! leaves the pool open and sound (no false `Closed` for the calls after
//! it).
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

mod common;

use common::{await_in_order, eq, EngineTest};
use forkrpc::{octets, EngineKind, Error, Options, Pool, PoolOptions, Template};
use libtest_mimic::{Arguments, Failed};
use std::time::Duration;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pid() -> String {
    std::process::id().to_string()
}

fn template() -> Result<Template, Error> {
    Template::builder()
        .sync("f::sleep", |args| {
            std::thread::sleep(ms(args.num(0).unwrap() as u64));
            octets![args[0].clone(), pid()]
        })
        .start()
}

fn main() {
    let t = template().expect("template starts");
    let args = Arguments::from_args();
    let tests: [(&str, EngineTest); 2] = [
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
    let timeout = ms(150);
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
