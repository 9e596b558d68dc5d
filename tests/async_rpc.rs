//! The async backend on both engines (tokio-uring with io_uring, plain
//! tokio with epoll): the seed's Examples 1a and 2, the Perl module's own
//! async test, many concurrent calls matched by id with events in the
//! child's order, failures of single calls, the concurrency limit, draining
//! and the pending-call count.
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

mod common;

use common::{
    await_in_order, block, check, destroy_channel, engine_trials, eq, logged, recv, EngineTest, Log,
};
use forkrpc::{octets, AsyncRuntime, Done, EngineKind, Error, Octets, Options, Template};
use libtest_mimic::{Arguments, Failed};
use std::cell::Cell;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

thread_local! {
    /// Child side: a sequence number for everything a worker sends, so the
    /// parent can check it sees replies and events in the order made.
    static SEQ: Cell<u64> = const { Cell::new(0) };
    static RUNNING: Cell<usize> = const { Cell::new(0) };
    static MAX_RUNNING: Cell<usize> = const { Cell::new(0) };
}

fn seq() -> String {
    let n = SEQ.get();
    SEQ.set(n + 1);
    n.to_string()
}

fn ms(args: &Octets, i: usize) -> Duration {
    Duration::from_millis(args.num(i).unwrap() as u64)
}

/// The Perl module's t/03_async.t worker: event "ok N" at once, then a
/// 0.1 s repeating timer sends "ok N+1", "ok N+2", "ok N+3" and replies
/// "ok N+4" on the third tick.
fn perl_async(done: Done, args: Octets) {
    let n = args.num(0).unwrap() + 2; // called with 3: starts at "ok 5"
    forkrpc::event(octets![format!("ok {n}")]);
    tokio::task::spawn_local(async move {
        let tick = Duration::from_millis(100);
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        for i in 1..=3 {
            timer.tick().await;
            forkrpc::event(octets![format!("ok {}", n + i)]);
        }
        done.reply(octets![format!("ok {}", n + 4)]);
    });
}

fn template() -> Result<Template, Error> {
    Template::builder()
        .asynchronous("t::perl_async", perl_async)
        // Sleeps args[1] ms, with an event before and after; every frame
        // carries the worker's sequence number.
        .async_fn("t::delayed", |args: Octets| async move {
            forkrpc::event(octets!["start", args[0].clone(), seq()]);
            tokio::time::sleep(ms(&args, 1)).await;
            forkrpc::event(octets!["end", args[0].clone(), seq()]);
            octets![args[0].clone(), seq()]
        })
        // Counts how many calls run at once; replies with the maximum.
        .async_fn("t::gauge", |args: Octets| async move {
            RUNNING.set(RUNNING.get() + 1);
            MAX_RUNNING.set(MAX_RUNNING.get().max(RUNNING.get()));
            tokio::time::sleep(ms(&args, 0)).await;
            RUNNING.set(RUNNING.get() - 1);
            octets![MAX_RUNNING.get().to_string()]
        })
        .asynchronous("t::reply_before_return", |done: Done, args: Octets| {
            done.reply(args)
        })
        .asynchronous("t::panic_now", |_done: Done, args: Octets| {
            panic!("boom now: {args}")
        })
        .async_fn("t::panic_later", |args: Octets| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if args.str(0) == Some("panic") {
                panic!("boom later");
            }
            args
        })
        .async_fn("t::fallible", |args: Octets| async move {
            match args.str(0) {
                Some("ok") => Ok(args),
                _ => Err(format!("refused {args}")),
            }
        })
        .asynchronous("t::drop_done", |done: Done, args: Octets| {
            if args.str(0) == Some("drop") {
                drop(done);
            } else {
                done.reply(args);
            }
        })
        .asynchronous("t::never", |done: Done, _args: Octets| {
            // Keeps the call open for ever.
            std::mem::forget(done);
        })
        .sync("t::runtime", |_| {
            octets![match forkrpc::async_runtime() {
                Some(AsyncRuntime::TokioUring) => "tokio-uring",
                Some(AsyncRuntime::Tokio) => "tokio",
                None => "none",
            }]
        })
        // io_uring file I/O from a handler, where the runtime has it.
        .async_fn("t::uring_read", |args: Octets| async move {
            let path = args.str(0).unwrap().to_owned();
            if forkrpc::async_runtime() != Some(AsyncRuntime::TokioUring) {
                return Ok(octets!["no-uring", std::fs::read(&path).unwrap()]);
            }
            let file = forkrpc::uring::fs::File::open(&path).await?;
            let (res, buf) = file.read_at(Vec::with_capacity(64), 0).await;
            let n = res?;
            file.close().await?;
            Ok::<_, std::io::Error>(octets!["uring", buf[..n].to_vec()])
        })
        .sync("t::sync_double", |args| {
            octets![format!("{}{}", args.str(0).unwrap(), args.str(0).unwrap())]
        })
        .start()
}

fn main() {
    let t = template().expect("template starts");
    let args = Arguments::from_args();
    let tests: [(&str, EngineTest); 19] = [
        ("call_timeout_fails_only_that_call", call_timeout),
        ("runs_on_the_expected_runtime", runtime_choice),
        ("perl_async_test_order", perl_async_order),
        ("seed_example2_async_countdown", seed_example2),
        ("seed_example1a_async_rmdir", seed_example1a),
        ("hundred_concurrent_calls_random_delays", hundred_concurrent),
        ("done_before_return_and_async_fn", reply_forms),
        ("panic_fails_only_that_call", panic_fails_call),
        ("panic_in_a_task_fails_that_call", panic_in_task),
        ("handler_error_fails_that_call", handler_error),
        ("dropped_done_fails_that_call", dropped_done),
        ("concurrency_limit_is_kept", concurrency_limit),
        ("default_concurrency_runs_all_at_once", default_concurrency),
        ("never_done_shows_in_pending", never_done),
        ("big_replies_beyond_the_output_bound", big_replies),
        ("async_handler_needs_async_option", needs_async),
        ("sync_handler_on_async_backend", sync_on_async),
        ("drop_drains_async_calls", drop_drains),
        ("uring_file_io_in_a_handler", uring_file_io),
    ];
    libtest_mimic::run(&args, engine_trials(&t, &tests)).exit();
}

fn opts(kind: EngineKind) -> Options {
    Options::default().engine(kind).asynchronous(true)
}

fn runtime_choice(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::runtime", opts(kind))?;
    let got = rpc.call_blocking(octets![])?;
    let want = match kind {
        EngineKind::Uring => "tokio-uring",
        EngineKind::Epoll => "tokio",
    };
    eq(got, octets![want])?;
    rpc.close_blocking()?;
    Ok(())
}

fn perl_async_order(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let log = Log::default();
    let (opts, destroyed) = logged(opts(kind), &log);
    let rpc = t.fork().run("t::perl_async", opts)?;
    let l = log.clone();
    rpc.call_with(octets!["3"], move |r| {
        l.lock().unwrap().push(r.unwrap().to_string())
    });
    drop(rpc);
    recv(&destroyed)?;
    let got = log.lock().unwrap().clone();
    eq(
        got,
        ["ok 5", "ok 6", "ok 7", "ok 8", "ok 9", "destroy"]
            .map(String::from)
            .to_vec(),
    )
}

fn example_exe(name: &str) -> Result<std::path::PathBuf, Failed> {
    let exe = std::env::current_exe()?
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    check(exe.exists(), format!("{} was not built", exe.display()))?;
    Ok(exe)
}

/// Runs an example with stdout and stderr on one pipe, so the order of
/// their lines is kept.
fn run_example(name: &str, kind: EngineKind) -> Result<String, Failed> {
    let exe = example_exe(name)?;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" 2>&1")
        .arg(&exe)
        .env("FORKRPC_ENGINE", kind.name())
        .output()?;
    check(out.status.success(), format!("{name} failed: {out:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn seed_example2(_t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let out = run_example("async_countdown", kind)?;
    let lines: Vec<&str> = out.lines().collect();
    // The seed's twelve lines; timers that fire together may swap lines.
    let mut want = vec![
        "starting to count up to 3",
        "starting to count up to 2",
        "starting to count up to 1",
        "count 1 of 3",
        "count 1 of 2",
        "count 1 of 1",
        "job 1 finished",
        "count 2 of 2",
        "job 2 finished",
        "count 2 of 3",
        "count 3 of 3",
        "job 3 finished",
    ];
    let mut sorted = lines.clone();
    sorted.sort_unstable();
    want.sort_unstable();
    eq(sorted, want)?;
    let pos = |l: &str| lines.iter().position(|x| *x == l).unwrap();
    // The three calls start together (they overlap: the run takes about
    // three seconds, not six) ...
    eq(
        lines[..3].to_vec(),
        vec![
            "starting to count up to 3",
            "starting to count up to 2",
            "starting to count up to 1",
        ],
    )?;
    // ... each countdown counts in order and finishes after its last count,
    // and the jobs finish in the order 1, 2, 3.
    for (count, n) in [(3, 1), (3, 2), (2, 1)] {
        check(
            pos(&format!("count {n} of {count}")) < pos(&format!("count {} of {count}", n + 1)),
            format!("count {count} out of order: {lines:?}"),
        )?;
    }
    for count in 1..=3 {
        check(
            pos(&format!("count {count} of {count}")) < pos(&format!("job {count} finished")),
            format!("job {count} finished early: {lines:?}"),
        )?;
    }
    check(
        pos("job 1 finished") < pos("job 2 finished")
            && pos("job 2 finished") < pos("job 3 finished"),
        format!("jobs finished out of order: {lines:?}"),
    )?;
    // The second tick of every countdown comes after every first tick.
    check(
        pos("count 2 of 3") > pos("count 1 of 1") && pos("count 2 of 2") > pos("count 1 of 3"),
        format!("ticks interleaved wrongly: {lines:?}"),
    )
}

fn seed_example1a(_t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let out = run_example("async_rmdir", kind)?;
    let expect = "/tmp/somepath/1: No such file or directory
/tmp/somepath/2: No such file or directory
3 requests handled
/tmp/somepath/3: No such file or directory
/tmp/somepath/4: No such file or directory
/tmp/somepath/5: No such file or directory
6 requests handled
/tmp/somepath/6: No such file or directory
";
    eq(out, expect.to_string())
}

fn hundred_concurrent(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // What the parent saw, in order: ("reply"|"start"|"end", call, seq).
    let seen = Arc::new(Mutex::new(Vec::<(String, String, u64)>::new()));
    let s1 = seen.clone();
    let (destroy, destroyed) = destroy_channel();
    let rpc = t.fork().run(
        "t::delayed",
        opts(kind)
            .on_event(move |ev| {
                let e = (ev.str(0).unwrap().to_owned(), ev.str(1).unwrap().to_owned());
                s1.lock()
                    .unwrap()
                    .push((e.0, e.1, ev.num(2).unwrap() as u64));
            })
            .on_destroy(destroy),
    )?;
    // Delays from a fixed pseudo-random sequence (0-49 ms), so replies
    // come back in an order far from the calls'.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let (tx, rx) = mpsc::channel();
    for i in 0..100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = x % 50;
        let (s, tx) = (seen.clone(), tx.clone());
        rpc.call_with(octets![i.to_string(), delay.to_string()], move |r| {
            let r = r.unwrap();
            s.lock().unwrap().push((
                "reply".into(),
                r.str(0).unwrap().into(),
                r.num(1).unwrap() as u64,
            ));
            tx.send((i, r.str(0).unwrap().to_owned())).unwrap();
        });
    }
    drop(rpc);
    recv(&destroyed)?;
    // Every caller got its own reply.
    let mut replies: Vec<(u32, String)> = rx.try_iter().collect();
    eq(replies.len(), 100)?;
    replies.sort();
    for (i, r) in replies {
        eq(r, i.to_string())?;
    }
    // The parent saw every frame in exactly the order the child made them.
    let seen = seen.lock().unwrap();
    eq(seen.len(), 300)?;
    let seqs: Vec<u64> = seen.iter().map(|e| e.2).collect();
    eq(seqs, (0..300).collect())?;
    // And the replies did not come in call order (the calls overlapped).
    let order: Vec<&str> = seen
        .iter()
        .filter(|e| e.0 == "reply")
        .map(|e| e.1.as_str())
        .collect();
    let in_call_order: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    check(
        order != in_call_order.iter().map(String::as_str).collect::<Vec<_>>(),
        "replies came in call order",
    )?;
    // Every call started before the first one ended.
    let first_end = seen.iter().position(|e| e.0 == "end").unwrap();
    eq(
        seen[..first_end].iter().filter(|e| e.0 == "start").count(),
        100,
    )
}

fn reply_forms(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::reply_before_return", opts(kind))?;
    eq(rpc.call_blocking(octets!["a", "b"])?, octets!["a", "b"])?;
    let r = block(rpc.call(octets!["future"]))?;
    eq(r, octets!["future"])?;
    rpc.close_blocking()?;
    let rpc = t.fork().run("t::delayed", opts(kind))?;
    let r = rpc.call_blocking(octets!["x", "1"])?;
    eq(r.str(0), Some("x"))?;
    rpc.close_blocking()?;
    Ok(())
}

fn panic_fails_call(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::panic_now", opts(kind))?;
    let pid = rpc.pid();
    match rpc.call_blocking(octets!["first"]) {
        Err(Error::HandlerPanicked { pid: p, message }) => {
            eq(p, pid)?;
            check(
                message.starts_with("boom now: first at tests/async_rpc.rs:"),
                format!("message {message:?}"),
            )?;
        }
        other => return Err(format!("expected HandlerPanicked, got {other:?}").into()),
    }
    // The worker carries on.
    match rpc.call_blocking(octets!["second"]) {
        Err(Error::HandlerPanicked { message, .. }) => {
            check(message.starts_with("boom now: second"), message)?
        }
        other => return Err(format!("expected HandlerPanicked, got {other:?}").into()),
    }
    rpc.close_blocking()?;
    Ok(())
}

fn panic_in_task(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::panic_later", opts(kind))?;
    let a = rpc.call(octets!["fine", "1"]);
    let b = rpc.call(octets!["panic"]);
    let c = rpc.call(octets!["fine", "2"]);
    let (a, b, c) = block(async { (a.await, b.await, c.await) });
    eq(a?, octets!["fine", "1"])?;
    eq(c?, octets!["fine", "2"])?;
    match b {
        Err(Error::HandlerPanicked { message, .. }) => {
            check(message.starts_with("boom later at "), message)
        }
        other => Err(format!("expected HandlerPanicked, got {other:?}").into()),
    }?;
    rpc.close_blocking()?;
    Ok(())
}

fn handler_error(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::fallible", opts(kind))?;
    let pid = rpc.pid();
    match rpc.call_blocking(octets!["no", "thanks"]) {
        Err(Error::Handler { pid: p, message }) => {
            eq(p, pid)?;
            eq(message.as_str(), "refused no thanks")?;
        }
        other => return Err(format!("expected Error::Handler, got {other:?}").into()),
    }
    eq(rpc.call_blocking(octets!["ok"])?, octets!["ok"])?;
    rpc.close_blocking()?;
    Ok(())
}

fn dropped_done(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::drop_done", opts(kind))?;
    match rpc.call_blocking(octets!["drop"]) {
        Err(Error::Handler { message, .. }) => eq(
            message.as_str(),
            "the handler dropped its done callback without replying",
        )?,
        other => return Err(format!("expected Error::Handler, got {other:?}").into()),
    }
    eq(rpc.call_blocking(octets!["keep"])?, octets!["keep"])?;
    rpc.close_blocking()?;
    Ok(())
}

fn gauge_max(t: &Template, kind: EngineKind, opts: Options, calls: usize) -> Result<u64, Failed> {
    let rpc = t.fork().run("t::gauge", opts.engine(kind))?;
    let futs: Vec<_> = (0..calls).map(|_| rpc.call(octets!["20"])).collect();
    let mut max = 0;
    for r in await_in_order(futs) {
        max = max.max(r?.num(0).unwrap() as u64);
    }
    rpc.close_blocking()?;
    Ok(max)
}

fn concurrency_limit(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    eq(gauge_max(t, kind, opts(kind).concurrency(3), 12)?, 3)
}

fn default_concurrency(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // Below the default limit every call starts at once.
    eq(gauge_max(t, kind, opts(kind), 50)?, 50)
}

fn never_done(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    let rpc = t.fork().run("t::never", opts(kind).on_error(|_| {}))?;
    rpc.call_with(octets!["hang"], move |r| tx.send(r).unwrap());
    eq(rpc.pending(), 1)?;
    // The call stays open; only killing the worker ends it, with an error
    // that says so.
    check(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a call that never replies resolved",
    )?;
    eq(rpc.pending(), 1)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rpc.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    match recv(&rx)? {
        Err(Error::WorkerExited {
            status: forkrpc::ExitStatus::Signal(9),
            outstanding: 1,
            ..
        }) => {}
        other => return Err(format!("expected WorkerExited by SIGKILL, got {other:?}").into()),
    }
    eq(rpc.pending(), 0)
}

fn big_replies(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // 8 replies of 1 MiB: more output than OUT_HIGH, so the worker has to
    // wait for the writer before starting calls.
    let rpc = t.fork().run("t::reply_before_return", opts(kind))?;
    let futs: Vec<_> = (0..8u8)
        .map(|i| rpc.call(octets![vec![i; forkrpc::OUT_HIGH]]))
        .collect();
    let got = await_in_order(futs);
    for (i, r) in got.into_iter().enumerate() {
        let r = r?;
        check(
            r.len() == 1 && r[0].len() == forkrpc::OUT_HIGH && r[0].iter().all(|&b| b == i as u8),
            format!("reply {i} is wrong"),
        )?;
    }
    rpc.close_blocking()?;
    Ok(())
}

fn needs_async(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    match t
        .fork()
        .run("t::perl_async", Options::default().engine(kind))
    {
        Err(Error::NeedsAsync { name }) => eq(name.as_str(), "t::perl_async"),
        Err(e) => Err(format!("expected NeedsAsync, got {e:?}").into()),
        Ok(_) => Err("an async handler ran on the sync backend".into()),
    }
}

fn sync_on_async(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::sync_double", opts(kind))?;
    eq(rpc.call_blocking(octets!["ab"])?, octets!["abab"])?;
    let rpc2 = t.fork().run(forkrpc::ECHO, opts(kind))?;
    eq(rpc2.call_blocking(octets!["e", "c"])?, octets!["e", "c"])?;
    rpc.close_blocking()?;
    rpc2.close_blocking()?;
    Ok(())
}

fn drop_drains(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let log = Log::default();
    let (opts, destroyed) = logged(opts(kind), &log);
    let rpc = t.fork().run(forkrpc::SLEEP, opts)?;
    for i in 0..200 {
        let l = log.clone();
        // Later calls sleep less, so replies come back reversed.
        let delay = (200 - i) / 10;
        rpc.call_with(octets![delay.to_string(), i.to_string()], move |r| {
            l.lock()
                .unwrap()
                .push(r.unwrap().str(1).unwrap().to_owned())
        });
    }
    drop(rpc);
    recv(&destroyed)?;
    let log = log.lock().unwrap();
    eq(log.len(), 201)?;
    eq(log.last().map(String::as_str), Some("destroy"))?;
    let mut ids: Vec<u32> = log[..200].iter().map(|s| s.parse().unwrap()).collect();
    check(ids[0] > ids[199], "replies came in call order")?;
    ids.sort_unstable();
    eq(ids, (0..200).collect())
}

fn uring_file_io(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let path = std::env::temp_dir().join(format!("forkrpc-uring-{}", std::process::id()));
    std::fs::write(&path, b"read through io_uring")?;
    let rpc = t.fork().run("t::uring_read", opts(kind))?;
    let r = rpc.call_blocking(octets![path.to_str().unwrap().to_owned()]);
    let _ = std::fs::remove_file(&path);
    let want = match kind {
        EngineKind::Uring => "uring",
        EngineKind::Epoll => "no-uring",
    };
    eq(r?, octets![want, "read through io_uring"])?;
    rpc.close_blocking()?;
    Ok(())
}

/// `Options::timeout` on the async backend: the call that overruns fails
/// with `Timeout`; the calls running beside it, and later ones, are
/// answered by the same worker (its late reply is dropped).
fn call_timeout(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let after = Duration::from_millis(200);
    let rpc = t
        .fork()
        .run("t::delayed", opts(kind).timeout(after).on_event(|_| {}))?;
    let slow = rpc.call(octets!["slow", "3000"]);
    let quick: Vec<_> = (0..3)
        .map(|i| rpc.call(octets![i.to_string(), "10"]))
        .collect();
    for (i, r) in await_in_order(quick).into_iter().enumerate() {
        eq(r?.str(0), Some(i.to_string().as_str()))?;
    }
    match block(slow) {
        Err(Error::Timeout { after: a }) => eq(a, after)?,
        other => return Err(format!("expected Timeout, got {other:?}").into()),
    }
    // The same worker still answers (a handle never changes workers).
    eq(
        rpc.call_blocking(octets!["later", "0"])?.str(0),
        Some("later"),
    )?;
    Ok(())
}
