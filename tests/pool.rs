//! The pool: the Perl pool's own test, the synopsis example, and every
//! promise beyond Perl's pool — crash replacement, retries, recycling,
//! timeouts, cancellation, bounded queues, drain deadlines, the memory
//! ceiling — and bulk `map`.
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

mod common;

use common::{await_in_order, block, check, destroy_channel, eq, recv, wait_gone};
use forkrpc::{octets, Error, Octets, Options, Pool, PoolOptions, Template};
use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeSet;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LEAK: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn pid() -> String {
    std::process::id().to_string()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn template() -> Result<Template, Error> {
    Template::builder()
        // The Perl pool test's worker: sleeps up to 0.2 s, retires half
        // the time, returns 1 (and its pid).
        .sync("t::perl_pool", |args| {
            let r = args.num(0).unwrap() as u64;
            std::thread::sleep(ms(r % 200));
            if r % 2 == 0 {
                forkrpc::retire();
            }
            octets!["1", pid()]
        })
        .sync("t::pid", |_| octets![pid()])
        // A transformation that shows any argument lost, swapped, cut or
        // misread: the count, then each string reversed with its length.
        .sync("t::fold", |args| fold_locally(&args))
        // Asks to be replaced after every call: a worker's pid shows which
        // calls it ran before the pool saw that.
        .sync("t::retire_pid", |_| {
            forkrpc::retire();
            octets![pid()]
        })
        .sync("t::double", |args| {
            octets![format!("{}{}", args.str(0).unwrap(), args.str(0).unwrap())]
        })
        .try_sync("t::map", |args| match args.str(0) {
            Some(s) if s.ends_with('7') => Err(format!("no sevens: {s}")),
            Some("panic") => panic!("map item panicked"),
            Some(s) => Ok(octets![format!("<{s}>")]),
            None => Err("no argument".to_owned()),
        })
        .sync("t::die", |args| {
            if args.str(0) == Some("die") {
                // SAFETY: _exit takes an integer and never returns.
                unsafe { libc::_exit(7) }
            }
            octets![pid()]
        })
        .sync("t::panic", |args| {
            if args.str(0) == Some("panic") {
                panic!("pool handler panicked");
            }
            octets![pid()]
        })
        .sync("t::sleep", |args| {
            std::thread::sleep(ms(args.num(0).unwrap() as u64));
            octets![args[0].clone(), pid()]
        })
        // Appends its argument to this worker's log; returns the log.
        .sync("t::log", |args| {
            let mut log = LOG.lock().unwrap();
            if let Some(s) = args.str(0) {
                if let Some(ms_) = s.strip_prefix("sleep:") {
                    std::thread::sleep(ms(ms_.parse().unwrap()));
                }
                log.push(s.to_owned());
            }
            log.iter().cloned().collect::<Octets>()
        })
        .sync("t::leak", |_| {
            LEAK.lock().unwrap().push(vec![1u8; 64 << 20]);
            octets![pid()]
        })
        // Dies on the first attempt (marker file absent), answers after.
        .sync("t::flaky", |args| {
            let marker = args.str(0).unwrap();
            if std::fs::metadata(marker).is_err() {
                std::fs::write(marker, b"x").unwrap();
                // SAFETY: _exit takes an integer and never returns.
                unsafe { libc::_exit(9) }
            }
            octets!["ok", pid()]
        })
        // Sleeps, then tells whether the file named exists.
        .sync("t::slow_sees", |args| {
            std::thread::sleep(ms(20));
            let seen = std::fs::metadata(args.str(0).unwrap()).is_ok();
            octets![if seen { "seen" } else { "unseen" }]
        })
        // An event, then the reply (the Perl sync test's worker).
        .sync("t::report", |args| {
            forkrpc::event(octets!["ev", args[0].clone()]);
            octets!["re", args[0].clone()]
        })
        .start()
}

type PoolTest = fn(&Template) -> Result<(), Failed>;

fn main() {
    let t = template().expect("template starts");
    let args = Arguments::from_args();
    let tests: [(&str, PoolTest); 29] = [
        ("perl_pool_test", perl_pool_test),
        ("example_pool_synopsis", example_pool),
        ("call_forms_and_stats", call_forms),
        ("crashed_worker_is_replaced", crash_replaced),
        ("panicking_handler_fails_its_call", panic_call),
        ("retries_resend_after_a_crash", retries),
        ("max_calls_recycles_workers", max_calls),
        ("timeout_kills_and_requeues", timeout),
        ("dropped_future_leaves_the_queue", cancellation),
        (
            "dropped_staged_future_leaves_the_queue",
            staged_cancellation,
        ),
        (
            "big_call_among_staged_ones_keeps_every_argument",
            staged_with_big,
        ),
        ("queue_limit_bounds_the_queue", queue_limit),
        ("close_within_kills_what_is_left", close_within),
        ("close_ends_the_pool_for_every_clone", close_with_clones),
        ("memory_ceiling_recycles_workers", memory_ceiling),
        ("map_keeps_order", map_ordered),
        ("map_honours_max_batch", map_max_batch),
        ("map_unordered_yields_every_index", map_unordered),
        ("map_item_errors_stay_with_their_items", map_errors),
        ("map_panic_resends_the_rest_of_its_chunk", map_panic),
        ("batched_calls_keep_events_in_order", batch_event_order),
        ("map_results_survive_events_mid_chunk", map_events),
        ("slow_batches_deliver_results_as_they_come", slow_batch),
        ("panic_in_a_batch_fails_only_what_it_must", batch_panic),
        ("drop_drains_the_queue", drop_drains),
        ("async_pool", async_pool),
        ("bad_handlers_fail_at_new", bad_handlers),
        ("ncpu_counts", ncpu),
        ("every_path_gives_the_same_results", same_results_every_path),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let t = t.clone();
            Trial::test(name, move || f(&t))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn pid_of(r: &Octets, i: usize) -> i32 {
    r.num(i).unwrap() as i32
}

fn all_gone(pids: impl IntoIterator<Item = i32>) -> Result<(), Failed> {
    for p in pids {
        check(
            wait_gone(p, Duration::from_secs(10)),
            format!("worker {p} is still running"),
        )?;
    }
    Ok(())
}

fn perl_pool_test(t: &Template) -> Result<(), Failed> {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let pids = Arc::new(Mutex::new(BTreeSet::new()));
    let l = log.clone();
    let (destroy, destroyed) = destroy_channel();
    let pool = Pool::new(
        t,
        "t::perl_pool",
        Options::default().on_destroy(move || {
            l.lock().unwrap().push("destroy".into());
            destroy()
        }),
        PoolOptions::default(),
    )?;
    // Pseudo-random 0..200 ms sleeps, half of them retiring.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..30 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (l, p) = (log.clone(), pids.clone());
        pool.call_with(octets![(x % 400).to_string()], move |r| {
            let r = r.unwrap();
            p.lock().unwrap().insert(pid_of(&r, 1));
            l.lock().unwrap().push(format!("ok {}", r.str(0).unwrap()));
        });
    }
    drop(pool);
    recv(&destroyed)?;
    let log = log.lock().unwrap().clone();
    eq(log.len(), 31)?;
    check(log[..30].iter().all(|l| l == "ok 1"), format!("{log:?}"))?;
    eq(log[30].as_str(), "destroy")?;
    let pids = pids.lock().unwrap().clone();
    check(pids.len() > 1, "retiring workers were replaced")?;
    all_gone(pids)
}

fn example_pool(_t: &Template) -> Result<(), Failed> {
    let exe = std::env::current_exe()?
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/pool");
    check(exe.exists(), format!("{} was not built", exe.display()))?;
    let out = std::process::Command::new(&exe).output()?;
    check(out.status.success(), format!("example failed: {out:?}"))?;
    let mut lines: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(String::from)
        .collect();
    // Workers answer concurrently: the order of the lines may vary.
    lines.sort_by_key(|l| l.rsplit(' ').next().unwrap().parse::<u32>().unwrap());
    let want: Vec<String> = (1..=10)
        .map(|i| format!("MyWorker::run returned {}", 2 * i))
        .collect();
    eq(lines, want)
}

fn call_forms(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::double",
        Options::default(),
        PoolOptions::default().max(2).idle(2),
    )?;
    eq(pool.call_blocking(octets!["ab"])?, octets!["abab"])?;
    eq(block(pool.call(octets!["cd"]))?, octets!["cdcd"])?;
    let (tx, rx) = mpsc::channel();
    pool.call_with(octets!["ef"], move |r| tx.send(r).unwrap());
    eq(recv(&rx)?.map_err(|e| e.to_string()), Ok(octets!["efef"]))?;
    // Both idle workers count as active from the start; a pid shows once
    // its fork has finished.
    let s = pool.stats();
    eq((s.active, s.queued), (2, 0))?;
    check((1..=2).contains(&s.pids.len()), format!("{s:?}"))?;
    pool.close_blocking()?;
    all_gone(s.pids)
}

fn crash_replaced(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::die",
        Options::default().on_error(|_| {}),
        PoolOptions::default().max(1).start(Duration::ZERO),
    )?;
    let first = pid_of(&pool.call_blocking(octets!["hi"])?, 0);
    match pool.call_blocking(octets!["die"]) {
        Err(Error::WorkerExited {
            pid,
            status: forkrpc::ExitStatus::Code(7),
            ..
        }) => eq(pid, first)?,
        other => return Err(format!("expected WorkerExited(7), got {other:?}").into()),
    }
    let second = pid_of(&pool.call_blocking(octets!["hi"])?, 0);
    check(second != first, "a new worker took over")?;
    pool.close_blocking()?;
    all_gone([first, second])
}

fn panic_call(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::panic",
        Options::default().on_error(|_| {}),
        PoolOptions::default().max(1).start(Duration::ZERO),
    )?;
    match pool.call_blocking(octets!["panic"]) {
        Err(Error::HandlerPanicked { message, .. }) => check(
            message.starts_with("pool handler panicked at tests/pool.rs:"),
            message,
        )?,
        other => return Err(format!("expected HandlerPanicked, got {other:?}").into()),
    }
    pool.call_blocking(octets!["fine"])?;
    pool.close_blocking()?;
    Ok(())
}

fn marker(name: &str) -> String {
    let p = std::env::temp_dir().join(format!("forkrpc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p.to_string_lossy().into_owned()
}

fn retries(t: &Template) -> Result<(), Failed> {
    let quiet = || Options::default().on_error(|_| {});
    let one = PoolOptions::default().max(1).start(Duration::ZERO);
    // Without retries the call fails with the worker's death ...
    let m = marker("flaky-a");
    let pool = Pool::new(t, "t::flaky", quiet(), one.clone())?;
    match pool.call_blocking(octets![m.clone()]) {
        Err(Error::WorkerExited {
            status: forkrpc::ExitStatus::Code(9),
            ..
        }) => {}
        other => return Err(format!("expected WorkerExited(9), got {other:?}").into()),
    }
    pool.close_blocking()?;
    // ... with one retry it is resent to a new worker and succeeds.
    let m2 = marker("flaky-b");
    let pool = Pool::new(t, "t::flaky", quiet(), one.retries(1))?;
    let r = pool.call_blocking(octets![m2.clone()])?;
    eq(r.str(0), Some("ok"))?;
    pool.close_blocking()?;
    let _ = (std::fs::remove_file(m), std::fs::remove_file(m2));
    Ok(())
}

fn max_calls(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::pid",
        Options::default(),
        PoolOptions::default()
            .max(1)
            .start(Duration::ZERO)
            .max_calls_per_worker(3),
    )?;
    let mut pids = Vec::new();
    for _ in 0..9 {
        pids.push(pid_of(&pool.call_blocking(octets![])?, 0));
    }
    pool.close_blocking()?;
    for chunk in pids.chunks(3) {
        check(chunk.iter().all(|p| *p == chunk[0]), format!("{pids:?}"))?;
    }
    let distinct: BTreeSet<i32> = pids.iter().copied().collect();
    eq(distinct.len(), 3)?;
    all_gone(distinct)
}

fn timeout(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::sleep",
        Options::default().on_error(|_| {}),
        PoolOptions::default()
            .max(1)
            .load(2)
            .max_batch(1)
            .start(Duration::ZERO)
            .timeout(ms(1000)),
    )?;
    let slow = pool.call(octets!["10000"]);
    let behind = pool.call(octets!["1"]);
    let (slow, behind) = block(async { (slow.await, behind.await) });
    match slow {
        Err(Error::Timeout { after }) => eq(after, ms(1000))?,
        other => return Err(format!("expected Timeout, got {other:?}").into()),
    }
    // The call queued behind it on the killed worker never started: it
    // went back to the queue and ran on the replacement.
    let behind = behind?;
    eq(behind.str(0), Some("1"))?;
    let replacement = pid_of(&behind, 1);
    let s = pool.stats();
    eq(s.pids, vec![replacement])?;
    pool.close_blocking()?;
    all_gone([replacement])
}

fn cancellation(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::log",
        Options::default(),
        PoolOptions::default().max(1).idle(1).load(1).max_batch(1),
    )?;
    let busy = pool.call(octets!["sleep:300"]);
    let cancelled = pool.call(octets!["cancelled"]);
    let last = pool.call(octets!["last"]);
    let log = block(async move {
        // Poll the middle call once, so it is queued, then drop it.
        let mut cancelled = Box::pin(cancelled);
        let poll = futures_poll_once(cancelled.as_mut()).await;
        assert!(poll.is_none(), "the cancelled call finished early");
        drop(cancelled);
        let _ = busy.await;
        last.await
    })?;
    eq(log, octets!["sleep:300", "last"])?;
    pool.close_blocking()?;
    Ok(())
}

/// A pool of one `t::log` worker taking one batch at a time.
fn one_log_worker(t: &Template) -> Result<Pool, Failed> {
    let opts = PoolOptions::default().max(1).idle(1).load(1);
    Ok(Pool::new(t, "t::log", Options::default(), opts)?)
}

/// Calls that join a waiting queue are staged as chunk items; dropping
/// one in the middle must take out exactly its bytes, so the others keep
/// their own arguments (each reply is the log up to and with its call).
fn staged_cancellation(t: &Template) -> Result<(), Failed> {
    let pool = one_log_worker(t)?;
    let busy = pool.call(octets!["sleep:300"]);
    let names = ["a", "bb", "ccc", "dddd", "eeeee", "f"];
    let calls: Vec<_> = names.iter().map(|n| pool.call(octets![*n])).collect();
    let logs = block(async move {
        let mut calls: Vec<_> = calls.into_iter().map(Box::pin).collect();
        for c in &mut calls {
            assert!(futures_poll_once(c.as_mut()).await.is_none());
        }
        // The third (staged between staged ones) and the last.
        drop(calls.remove(5));
        drop(calls.remove(2));
        let _ = busy.await;
        let mut logs = Vec::new();
        for c in calls {
            logs.push(c.await);
        }
        logs
    });
    let want = ["a", "bb", "dddd", "eeeee"];
    for (i, log) in logs.into_iter().enumerate() {
        let mut expect = vec!["sleep:300"];
        expect.extend_from_slice(&want[..=i]);
        eq(log?, expect.into_iter().collect::<Octets>())?;
    }
    pool.close_blocking()?;
    Ok(())
}

/// A big call queued among staged small ones: batches then mix staged
/// items with payloads of their own (a chunk built from both, or calls one
/// by one with staged items read back). Each reply is the log up to and
/// with its call, so any argument cut at the wrong place shows.
fn staged_with_big(t: &Template) -> Result<(), Failed> {
    let pool = one_log_worker(t)?;
    let big = "x".repeat(100 * 1024);
    let busy = pool.call(octets!["sleep:200"]);
    let args: Vec<String> = ["a", "bb", &big, "ccc", "dddd", "e"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let calls: Vec<_> = args.iter().map(|a| pool.call(octets![a.clone()])).collect();
    let logs = await_in_order(calls);
    let _ = block(busy);
    for (i, log) in logs.into_iter().enumerate() {
        let mut expect = vec!["sleep:200".to_owned()];
        expect.extend_from_slice(&args[..=i]);
        eq(log?, expect.into_iter().collect::<Octets>())?;
    }
    pool.close_blocking()?;
    Ok(())
}

/// Polls a future once; `Some` if it was ready.
async fn futures_poll_once<F: std::future::Future + ?Sized>(
    mut f: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

fn queue_limit(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::sleep",
        Options::default(),
        PoolOptions::default()
            .max(1)
            .idle(1)
            .load(1)
            .max_batch(1)
            .queue_limit(2),
    )?;
    // Wait for the worker, so the first call is sent, not queued.
    pool.call_blocking(octets!["0"])?;
    let running = pool.try_call(octets!["300"])?;
    // Queued behind it (staged as chunk items: each must keep its own
    // argument).
    let q1 = pool.try_call(octets!["1"])?;
    let q2 = pool.try_call(octets!["2"])?;
    match pool.try_call(octets!["0"]) {
        Err(Error::QueueFull { limit: 2 }) => {}
        Err(e) => return Err(format!("expected QueueFull, got {e:?}").into()),
        Ok(_) => return Err("a third call got into a queue of two".into()),
    }
    eq(pool.stats().queued, 2)?;
    // A waiting `call` gets in once there is room.
    let waited = pool.call(octets!["3"]);
    let (a, b, c, d) = block(async { (running.await, q1.await, q2.await, waited.await) });
    for (r, arg) in [(a, "300"), (b, "1"), (c, "2"), (d, "3")] {
        eq(r?.str(0), Some(arg))?;
    }
    pool.close_blocking()?;
    Ok(())
}

fn close_with_clones(t: &Template) -> Result<(), Failed> {
    let (destroy, destroyed) = destroy_channel();
    let pool = Pool::new(
        t,
        "t::sleep",
        Options::default().on_destroy(destroy),
        PoolOptions::default().max(1).idle(1),
    )?;
    let other = pool.clone(); // as a typed pool or a running map holds one
    let before = other.call(octets!["20"]);
    // Returns although `other` is alive: close ends the pool for all.
    pool.close_blocking()?;
    recv(&destroyed)?;
    eq(block(before)?.str(0), Some("20"))?;
    match other.call_blocking(octets!["0"]) {
        Err(Error::Closed) => Ok(()),
        r => Err(format!("a call after close: expected Closed, got {r:?}").into()),
    }
}

fn close_within(t: &Template) -> Result<(), Failed> {
    let (destroy, destroyed) = destroy_channel();
    let pool = Pool::new(
        t,
        "t::sleep",
        Options::default().on_error(|_| {}).on_destroy(destroy),
        PoolOptions::default().max(1).idle(1).load(1).max_batch(1),
    )?;
    pool.call_blocking(octets!["0"])?;
    let pid = pool.stats().pids[0];
    let running = pool.call(octets!["10000"]);
    let queued = pool.call(octets!["0"]);
    let closing = pool.clone().close_within(ms(300));
    let (running, queued) = block(async { (running.await, queued.await) });
    for (r, what) in [(running, "killed"), (queued, "still queued")] {
        match r {
            Err(Error::Shutdown { detail }) => check(detail.contains(what), detail)?,
            other => return Err(format!("expected Shutdown ({what}), got {other:?}").into()),
        }
    }
    drop(pool);
    block(closing)?;
    recv(&destroyed)?;
    all_gone([pid])
}

fn memory_ceiling(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::leak",
        Options::default(),
        PoolOptions::default()
            .max(1)
            .start(Duration::ZERO)
            .max_rss(32 << 20),
    )?;
    let a = pid_of(&pool.call_blocking(octets![])?, 0);
    let b = pid_of(&pool.call_blocking(octets![])?, 0);
    check(a != b, "the leaking worker was recycled")?;
    pool.close_blocking()?;
    all_gone([a, b])
}

fn map_pool(t: &Template) -> Result<Pool, Failed> {
    Ok(Pool::new(
        t,
        "t::map",
        Options::default().on_error(|_| {}),
        PoolOptions::default().max(2).idle(2),
    )?)
}

fn map_ordered(t: &Template) -> Result<(), Failed> {
    let pool = map_pool(t)?;
    let jobs = (0..5000).map(|i| octets![format!("a{i}0")]);
    let got: Vec<(usize, Result<Octets, Error>)> = pool.map(jobs).collect();
    eq(got.len(), 5000)?;
    for (i, (idx, r)) in got.into_iter().enumerate() {
        eq(idx, i)?;
        eq(r?, octets![format!("<a{i}0>")])?;
    }
    // Also as a stream, chunked explicitly.
    let stream = pool
        .map((0..300).map(|i| octets![format!("s{i}0")]))
        .chunk_size(16);
    let got = block(async move {
        let mut stream = std::pin::pin!(stream);
        let mut out = Vec::new();
        while let Some(x) =
            std::future::poll_fn(|cx| futures_core::Stream::poll_next(stream.as_mut(), cx)).await
        {
            out.push(x);
        }
        out
    });
    eq(got.len(), 300)?;
    for (i, (idx, r)) in got.into_iter().enumerate() {
        eq((idx, r?), (i, octets![format!("<s{i}0>")]))?;
    }
    pool.close_blocking()?;
    Ok(())
}

fn map_unordered(t: &Template) -> Result<(), Failed> {
    let pool = map_pool(t)?;
    let mut seen = BTreeSet::new();
    for (idx, r) in pool.map_unordered((0..2000).map(|i| octets![format!("u{i}0")])) {
        eq(r?, octets![format!("<u{idx}0>")])?;
        check(seen.insert(idx), format!("index {idx} twice"))?;
    }
    eq(seen.len(), 2000)?;
    pool.close_blocking()?;
    Ok(())
}

fn map_errors(t: &Template) -> Result<(), Failed> {
    let pool = map_pool(t)?;
    let results: Vec<_> = pool
        .map((0..100).map(|i| octets![i.to_string()]))
        .chunk_size(10)
        .results()
        .collect();
    for (i, r) in results.into_iter().enumerate() {
        if i % 10 == 7 {
            match r {
                Err(Error::Handler { message, .. }) => eq(message, format!("no sevens: {i}"))?,
                other => return Err(format!("item {i}: expected Handler, got {other:?}").into()),
            }
        } else {
            eq(r?, octets![format!("<{i}>")])?;
        }
    }
    pool.close_blocking()?;
    Ok(())
}

/// Calls queued together go to the worker in batches (one chunk frame
/// each); every call sends an event before its reply, and the parent must
/// see them exactly interleaved, as the worker made them.
fn batch_event_order(t: &Template) -> Result<(), Failed> {
    const N: usize = 1000;
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let pool = Pool::new(
        t,
        "t::report",
        Options::default().on_event(move |ev| {
            l.lock()
                .unwrap()
                .push(format!("{} {}", ev.str(0).unwrap(), ev.str(1).unwrap()))
        }),
        PoolOptions::default().max(1).idle(1),
    )?;
    let (tx, rx) = mpsc::channel();
    let (p, l) = (pool.clone(), log.clone());
    // Queued from a callback on the driver thread: no reply is handled
    // before all are queued, so they wait and leave in batches.
    pool.call_with(octets!["go"], move |_| {
        for i in 0..N {
            let (l, tx) = (l.clone(), tx.clone());
            p.call_with(octets![i.to_string()], move |r| {
                let r = r.unwrap();
                l.lock()
                    .unwrap()
                    .push(format!("{} {}", r.str(0).unwrap(), r.str(1).unwrap()));
                tx.send(()).unwrap();
            });
        }
    });
    for _ in 0..N {
        recv(&rx)?;
    }
    pool.close_blocking()?;
    let log = log.lock().unwrap();
    let want: Vec<String> = std::iter::once("ev go".to_owned())
        .chain((0..N).flat_map(|i| [format!("ev {i}"), format!("re {i}")]))
        .collect();
    eq(&log[..], &want[..])
}

/// A batch of slow calls (20 ms each, in one chunk): the first result
/// reaches its callback long before the batch ends. Its callback creates
/// a file that a later call of the batch looks for.
fn slow_batch(t: &Template) -> Result<(), Failed> {
    const N: usize = 30;
    let m = marker("slow-batch");
    let pool = Pool::new(
        t,
        "t::slow_sees",
        Options::default(),
        PoolOptions::default().max(1).idle(1).load(1),
    )?;
    pool.call_blocking(octets!["/nonexistent"])?;
    let (tx, rx) = mpsc::channel();
    let (p, m2) = (pool.clone(), m.clone());
    // Queued from a callback on the driver thread behind a call that keeps
    // the worker busy: when it is done, the first half of the queue (load 1,
    // guided scheduling) leaves as one batch.
    pool.call_with(octets!["/nonexistent"], move |_| {
        p.call_with(octets!["/nonexistent"], |_| {});
        for i in 0..N {
            let (tx, m2) = (tx.clone(), m2.clone());
            p.call_with(octets![m2.clone()], move |r| {
                if i == 0 {
                    std::fs::write(&m2, b"x").unwrap();
                }
                tx.send((i, r)).unwrap();
            });
        }
    });
    let got: Vec<_> = (0..N).map(|_| recv(&rx)).collect::<Result<_, _>>()?;
    let _ = std::fs::remove_file(&m);
    pool.close_blocking()?;
    eq(got[0].0, 0)?;
    eq(got[0].1.clone()?, octets!["unseen"])?;
    // Call 10 ran 200 ms after call 0, in the same batch of 15.
    eq(got[10].1.clone()?, octets!["seen"])
}

/// Handlers that send events make a chunk's results come in parts: the
/// map still yields every result, in order, and every event arrives.
fn map_events(t: &Template) -> Result<(), Failed> {
    const N: usize = 500;
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let pool = Pool::new(
        t,
        "t::report",
        Options::default()
            .on_event(move |ev| e.lock().unwrap().push(ev.str(1).unwrap().to_owned())),
        PoolOptions::default().max(2).idle(2),
    )?;
    let jobs = (0..N).map(|i| octets![i.to_string()]);
    let got: Vec<Octets> = pool
        .map(jobs)
        .chunk_size(50)
        .results()
        .collect::<Result<_, _>>()?;
    let want: Vec<Octets> = (0..N).map(|i| octets!["re", i.to_string()]).collect();
    eq(&got, &want)?;
    pool.close_blocking()?;
    let mut events = events.lock().unwrap().clone();
    events.sort_by_key(|s| s.parse::<usize>().unwrap());
    eq(events, (0..N).map(|i| i.to_string()).collect::<Vec<_>>())
}

/// A call that panics in the middle of a batch: those before it succeed,
/// it fails with its panic, those after it fail saying so (not run, or
/// the worker exited) or run on the replacement worker.
fn batch_panic(t: &Template) -> Result<(), Failed> {
    const N: usize = 100;
    let pool = Pool::new(
        t,
        "t::panic",
        Options::default().on_error(|_| {}),
        PoolOptions::default().max(1).idle(1).start(Duration::ZERO),
    )?;
    let first = pool.call_blocking(octets!["warm"])?;
    let (tx, rx) = mpsc::channel();
    let p = pool.clone();
    pool.call_with(octets!["go"], move |_| {
        for i in 0..N {
            let tx = tx.clone();
            let arg = if i == N / 2 {
                "panic".to_owned()
            } else {
                i.to_string()
            };
            p.call_with(octets![arg], move |r| tx.send((i, r)).unwrap());
        }
    });
    let mut got: Vec<_> = (0..N).map(|_| recv(&rx)).collect::<Result<_, _>>()?;
    got.sort_by_key(|(i, _)| *i);
    let panicked = |m: &str| m.contains("pool handler panicked at tests/pool.rs:");
    for (i, r) in got {
        match r {
            Ok(r) if i < N / 2 => eq(&r, &first)?,
            Err(Error::HandlerPanicked { message, .. }) if i == N / 2 => {
                check(panicked(&message), message)?
            }
            // Not started on the worker that panicked: sent again.
            Ok(r) if i > N / 2 => {
                check(r != first, "a call after the panic ran on the dead worker")?
            }
            other => return Err(format!("call {i}: unexpected {other:?}").into()),
        }
    }
    pool.close_blocking()?;
    Ok(())
}

fn map_panic(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::map",
        Options::default().on_error(|_| {}),
        // One chunk at a time: the second waits in the queue while the
        // first panics, then runs on the replacement worker.
        PoolOptions::default()
            .max(1)
            .load(1)
            .max_batch(1)
            .start(Duration::ZERO),
    )?;
    let jobs = ["a", "panic", "b", "c", "d"].map(|s| octets![s]);
    let got: Vec<_> = pool.map(jobs).chunk_size(4).results().collect();
    eq(got.len(), 5)?;
    eq(
        got[0].clone().map_err(|e| e.to_string()),
        Ok(octets!["<a>"]),
    )?;
    match &got[1] {
        Err(Error::HandlerPanicked { message, .. }) => {
            check(message.starts_with("map item panicked"), message.clone())?
        }
        other => return Err(format!("expected HandlerPanicked, got {other:?}").into()),
    }
    // The items after it in its chunk never ran: they were sent again,
    // to the replacement worker.
    for (r, s) in got[2..4].iter().zip(["<b>", "<c>"]) {
        eq(r.clone().map_err(|e| e.to_string()), Ok(octets![s]))?;
    }
    // The next chunk ran on a replacement worker.
    eq(
        got[4].clone().map_err(|e| e.to_string()),
        Ok(octets!["<d>"]),
    )?;
    pool.close_blocking()?;
    Ok(())
}

fn drop_drains(t: &Template) -> Result<(), Failed> {
    let count = Arc::new(Mutex::new(0usize));
    let c = count.clone();
    let (destroy, destroyed) = destroy_channel();
    let pool = Pool::new(
        t,
        "t::double",
        Options::default().on_destroy(move || {
            // Every reply came before on_destroy.
            assert_eq!(*c.lock().unwrap(), 500);
            destroy()
        }),
        PoolOptions::default(),
    )?;
    for i in 0..500 {
        let c = count.clone();
        pool.call_with(octets![i.to_string()], move |r| {
            r.unwrap();
            *c.lock().unwrap() += 1;
        });
    }
    drop(pool);
    recv(&destroyed)?;
    let n = *count.lock().unwrap();
    eq(n, 500)
}

fn async_pool(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        forkrpc::SLEEP,
        Options::default().asynchronous(true),
        PoolOptions::default().max(2).idle(2).load(50),
    )?;
    let calls: Vec<_> = (0..100)
        .map(|i| pool.call(octets!["50", i.to_string()]))
        .collect();
    let got = await_in_order(calls);
    for (i, r) in got.into_iter().enumerate() {
        eq(r?, octets!["50", i.to_string()])?;
    }
    let results: Vec<_> = pool
        .map((0..20).map(|i| octets!["1", i.to_string()]))
        .results()
        .collect::<Result<_, _>>()?;
    eq(results.len(), 20)?;
    pool.close_blocking()?;
    Ok(())
}

fn bad_handlers(t: &Template) -> Result<(), Failed> {
    match Pool::new(t, "t::nope", Options::default(), PoolOptions::default()) {
        Err(Error::UnknownHandler { name, .. }) => eq(name.as_str(), "t::nope")?,
        Err(e) => return Err(format!("expected UnknownHandler, got {e:?}").into()),
        Ok(_) => return Err("a pool with an unknown handler".into()),
    }
    match Pool::new(
        t,
        forkrpc::SLEEP,
        Options::default(),
        PoolOptions::default(),
    ) {
        Err(Error::NeedsAsync { .. }) => Ok(()),
        Err(e) => Err(format!("expected NeedsAsync, got {e:?}").into()),
        Ok(_) => Err("an async handler in a sync pool".into()),
    }
}

fn ncpu(_t: &Template) -> Result<(), Failed> {
    let n = forkrpc::ncpu();
    check(n.physical >= 1 && n.physical <= n.logical, format!("{n:?}"))?;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                    None => 1,
                })
                .sum::<usize>()
        })
        .unwrap_or(n.logical);
    check(n.logical <= online, format!("{n:?} but {online} online"))
}

/// `map` sends no more than `max_batch` calls at once: with one call per
/// batch and a worker that retires after each call, every call runs on a
/// worker of its own (map's own chunk size, 10 here, would put 10 on
/// each).
fn map_max_batch(t: &Template) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "t::retire_pid",
        Options::default(),
        PoolOptions::default()
            .max(1)
            .load(1)
            .max_batch(1)
            .start(Duration::ZERO),
    )?;
    let pids: BTreeSet<String> = pool
        .map((0..40).map(|i| octets![i.to_string()]))
        .results()
        .map(|r| r.map(|o| o.str(0).unwrap().to_owned()))
        .collect::<Result<_, _>>()?;
    eq(pids.len(), 40)?;
    pool.close_blocking()?;
    Ok(())
}

/// `t::fold`: what the worker returns, and the expected results computed
/// here.
fn fold_locally(args: &Octets) -> Octets {
    let mut out = vec![args.len().to_string().into_bytes()];
    for a in args.iter() {
        let mut r = a.to_vec();
        r.reverse();
        r.extend_from_slice(format!("/{}", a.len()).as_bytes());
        out.push(r);
    }
    Octets(out.into_iter().map(bytes::Bytes::from).collect())
}

/// The pool's fast paths and their general twins give the same results
/// for the same calls: small calls staged by their callers (`submit_small`)
/// and sent as chunk frames; the general submit (a queue limit set), which
/// stages too; one call each, as plain frames (retries on: per-call
/// bookkeeping, no chunks, no staging); `map` in chunks and one item per
/// call. The calls mix empty, small, medium and big (sent in place or
/// through the arena) strings, so that each path meets each size.
fn same_results_every_path(t: &Template) -> Result<(), Failed> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let calls: Vec<Octets> = (0..1500)
        .map(|i| {
            let n = (next() % 4) as usize;
            let strings = (0..n).map(|j| {
                let len = match next() % 50 {
                    0 if i % 300 == 7 => 70_000, // big: in place or the arena
                    0..=29 => (next() % 12) as usize,
                    30..=45 => (next() % 300) as usize,
                    _ => 1000 + (next() % 3000) as usize,
                };
                let fill = (i * 7 + j) as u8;
                bytes::Bytes::from((0..len).map(|k| fill ^ (k as u8)).collect::<Vec<u8>>())
            });
            Octets(strings.collect())
        })
        .collect();
    let expect: Vec<Octets> = calls.iter().map(fold_locally).collect();
    check(
        calls.iter().any(|c| c.iter().any(|s| s.len() >= 65536)),
        "the inputs hold a big string",
    )?;
    let pool = |p: PoolOptions| Pool::new(t, "t::fold", Options::default(), p.max(2).load(4));
    let by_calls = |p: &Pool| -> Result<Vec<Octets>, Failed> {
        let futs: Vec<_> = calls.iter().map(|c| p.call(c.clone())).collect();
        await_in_order(futs)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failed::from(e.to_string()))
    };
    let lean = pool(PoolOptions::default())?;
    eq(by_calls(&lean)?, expect.clone())?;
    let general = pool(PoolOptions::default().queue_limit(1 << 20))?;
    eq(by_calls(&general)?, expect.clone())?;
    let one_each = pool(PoolOptions::default().retries(1))?;
    eq(by_calls(&one_each)?, expect.clone())?;
    let mapped: Result<Vec<Octets>, Error> = lean.map(calls.clone()).results().collect();
    eq(mapped?, expect.clone())?;
    let mapped: Result<Vec<Octets>, Error> =
        lean.map(calls.clone()).chunk_size(1).results().collect();
    eq(mapped?, expect)?;
    Ok(())
}
