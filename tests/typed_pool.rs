//! Typed pools: every codec (octets, JSON, rkyv, one that is not built
//! in) at 1 B, 70 KB (through the shared arena) and 5 MB, on both
//! backends and both engines, with and without per-call tracking
//! (timeout and retries), in the blocking, callback and future forms;
//! then 1,000 concurrent typed calls with distinct arguments. Every reply
//! is compared with the value the handler must have computed.
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

mod common;

use common::{block, eq, recv, RawBytes};
use forkrpc::serial::{Archived, Codec, Json, OctetsCodec, Rkyv};
use forkrpc::{octets, EngineKind, Error, Octets, Options, Pool, PoolOptions, Template};
use libtest_mimic::{Arguments, Failed, Trial};
use std::sync::mpsc;
use std::time::Duration;

/// What every handler computes: each letter moved one on (`z` to `a`).
fn rot(b: &[u8]) -> Vec<u8> {
    b.iter().map(|&c| b'a' + (c - b'a' + 1) % 26).collect()
}

/// `n` letters, distinct per `seed`.
fn letters(seed: u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b'a' + ((i as u64 * 7 + seed as u64) % 26) as u8)
        .collect()
}

fn template() -> Result<Template, Error> {
    Template::builder()
        .sync_with("tp::octets", OctetsCodec, |o: Octets| octets![rot(&o[0])])
        .sync_with("tp::json", Json, |s: String| {
            String::from_utf8(rot(s.as_bytes())).unwrap()
        })
        .sync_with("tp::rkyv", Rkyv::checked(), |v: Archived<Vec<u8>>| {
            rot(v.as_slice())
        })
        .sync_with("tp::raw", RawBytes, |v: Vec<u8>| rot(&v))
        .start()
}

/// How one codec's values are made from bytes and read back as bytes.
struct Case<C: Codec<T>, T> {
    handler: &'static str,
    codec: C,
    make: fn(Vec<u8>) -> T,
    read: fn(&<C as Codec<T>>::Thawed) -> Vec<u8>,
}

#[derive(Clone, Copy)]
struct Setup {
    engine: EngineKind,
    asynchronous: bool,
    tracked: bool,
}

const SIZES: [usize; 3] = [1, 70_000, 5_000_000];

fn exercise<C, T>(t: &Template, s: Setup, case: Case<C, T>) -> Result<(), Failed>
where
    C: Codec<T> + Clone,
    T: Send + 'static,
{
    let mut popts = PoolOptions::default().max(2);
    if s.tracked {
        popts = popts.timeout(Duration::from_secs(120)).retries(1);
    }
    let pool = Pool::new(
        t,
        case.handler,
        Options::default()
            .engine(s.engine)
            .asynchronous(s.asynchronous),
        popts,
    )?;
    let typed = pool.typed::<T, T, C>(case.codec.clone());
    let read = case.read;
    for (k, &n) in SIZES.iter().enumerate() {
        let seed = k as u32 * 3;
        // Blocking.
        let arg = letters(seed, n);
        let r = typed.call_blocking(&(case.make)(arg.clone()))?;
        eq(read(&r), rot(&arg)).map_err(|e| format!("blocking, {n} B: {}", short(e)))?;
        // Callback.
        let arg = letters(seed + 1, n);
        let (tx, rx) = mpsc::channel();
        typed.call_with(&(case.make)(arg.clone()), move |r| {
            tx.send(r.map(|v| read(&v))).unwrap()
        });
        eq(recv(&rx)??, rot(&arg)).map_err(|e| format!("callback, {n} B: {}", short(e)))?;
        // Future.
        let arg = letters(seed + 2, n);
        let r = block(typed.call(&(case.make)(arg.clone())))?;
        eq(read(&r), rot(&arg)).map_err(|e| format!("future, {n} B: {}", short(e)))?;
    }
    // 1,000 at once, each its own argument.
    let args: Vec<Vec<u8>> = (0..1000).map(|i| letters(i, 1 + i as usize % 40)).collect();
    let futs: Vec<_> = args
        .iter()
        .map(|a| typed.call(&(case.make)(a.clone())))
        .collect();
    let replies = common::await_in_order(futs);
    for (i, (a, r)) in args.iter().zip(replies).enumerate() {
        let r = r.map_err(|e| format!("concurrent call {i}: {e}"))?;
        eq(read(&r), rot(a)).map_err(|e| format!("concurrent call {i}: {}", short(e)))?;
    }
    drop(typed);
    pool.close_blocking()?;
    Ok(())
}

/// A failure's text, cut short: a 5 MB mismatch would print megabytes.
fn short(f: Failed) -> String {
    let s = f.message().map(str::to_owned).unwrap_or_default();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

fn octets_case(t: &Template, s: Setup) -> Result<(), Failed> {
    exercise(
        t,
        s,
        Case {
            handler: "tp::octets",
            codec: OctetsCodec,
            make: |b| octets![b],
            read: |o: &Octets| o[0].to_vec(),
        },
    )
}

fn json_case(t: &Template, s: Setup) -> Result<(), Failed> {
    exercise(
        t,
        s,
        Case {
            handler: "tp::json",
            codec: Json,
            make: |b| String::from_utf8(b).unwrap(),
            read: |s: &String| s.as_bytes().to_vec(),
        },
    )
}

fn rkyv_case(t: &Template, s: Setup) -> Result<(), Failed> {
    exercise(
        t,
        s,
        Case {
            handler: "tp::rkyv",
            codec: Rkyv::checked(),
            make: |b| b,
            read: |v: &Archived<Vec<u8>>| v.as_slice().to_vec(),
        },
    )
}

fn raw_case(t: &Template, s: Setup) -> Result<(), Failed> {
    exercise(
        t,
        s,
        Case {
            handler: "tp::raw",
            codec: RawBytes,
            make: |b| b,
            read: |v: &Vec<u8>| v.clone(),
        },
    )
}

type CaseFn = fn(&Template, Setup) -> Result<(), Failed>;

fn main() {
    let t = template().expect("template starts");
    let args = Arguments::from_args();
    let cases: [(&str, CaseFn); 4] = [
        ("octets", octets_case),
        ("json", json_case),
        ("rkyv", rkyv_case),
        ("custom", raw_case),
    ];
    let mut trials = Vec::new();
    for (engine, available) in common::engines() {
        for asynchronous in [false, true] {
            for tracked in [false, true] {
                for &(name, f) in &cases {
                    let s = Setup {
                        engine,
                        asynchronous,
                        tracked,
                    };
                    let t = t.clone();
                    let name = format!(
                        "{}::{}::{}::{name}",
                        engine.name(),
                        if asynchronous { "async" } else { "sync" },
                        if tracked { "tracked" } else { "plain" },
                    );
                    trials.push(Trial::test(name, move || f(&t, s)).with_ignored_flag(!available));
                }
            }
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
