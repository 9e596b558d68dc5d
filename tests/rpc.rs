//! RPC behaviour on both engines: the seed's SYNOPSIS, the Perl module's own
//! sync test, call forms, errors of every kind, draining, descriptors,
//! derived templates, and the process hygiene promises (no fd leaks, no
//! zombies, workers die with the parent).
//!
//! This binary owns `main` (harness = false) because `init()` must run
//! before the test harness starts its threads.

mod common;

use common::{
    await_in_order, block, check, destroy_channel, engine_trials, engines, eq, logged, proc_exists,
    recv, wait_gone, EngineTest, Log,
};
use forkrpc::{octets, EngineKind, Error, ExitStatus, Octets, Options, Template, WorkerArgs};
use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

static FDS_BEFORE_INIT: OnceLock<BTreeSet<i32>> = OnceLock::new();
static INIT_ARGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static FD_CHANNEL: Mutex<Option<OwnedFd>> = Mutex::new(None);
static PRELOAD: Mutex<Option<(String, i32)>> = Mutex::new(None);

fn open_fds() -> BTreeSet<i32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every descriptor this process holds that is a socket.
fn socket_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            link.to_string_lossy()
                .starts_with("socket:")
                .then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

fn template() -> Result<Template, Error> {
    Template::builder()
        // The Perl module's t/02_sync.t worker: event "ok N", reply "ok N+1".
        .sync("t::perl_sync", |args| {
            let n = args.num(0).unwrap();
            forkrpc::event(octets![format!("ok {n}")]);
            octets![format!("ok {}", n + 1)]
        })
        .sync("t::panic", |args| -> Octets { panic!("boom: {}", args) })
        .sync("t::exit", |args| -> Octets {
            // SAFETY: _exit takes an integer and never returns; skipping
            // destructors is the point (a worker dying mid-call).
            unsafe { libc::_exit(args.num(0).unwrap() as i32) }
        })
        // Async: an event, then the reply; `reply-abort` then aborts, before
        // the worker's writer had a chance to send either.
        .asynchronous(
            "t::reply_then_crash",
            |done: forkrpc::Done, args: Octets| {
                let crash = args.str(0) == Some("reply-abort");
                forkrpc::event(octets!["made", args[0].clone()]);
                done.reply(args);
                if crash {
                    std::process::abort();
                }
            },
        )
        // Dies the way its argument says; echoes anything else.
        .sync("t::crash_on", |args| match args.str(0) {
            Some("abort") => std::process::abort(),
            // SAFETY: _exit takes an integer and never returns.
            Some("exit") => unsafe { libc::_exit(7) },
            Some("kill") => {
                let me = nix::unistd::getpid();
                nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGKILL).unwrap();
                unreachable!("killed")
            }
            _ => args,
        })
        // Appends its argument to this worker's record and returns the
        // record; `sleep:MS` first says so in an event, then sleeps.
        .sync("t::record", |args| {
            static RECORD: Mutex<Vec<String>> = Mutex::new(Vec::new());
            let a = args.str(0).unwrap_or("").to_owned();
            if let Some(ms) = a.strip_prefix("sleep:") {
                forkrpc::event(octets!["started"]);
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
            }
            let mut r = RECORD.lock().unwrap();
            r.push(a);
            r.iter().cloned().collect::<Octets>()
        })
        // Whether the file the program opened before start() is open here.
        .sync("t::opened_before", |_| {
            let (fd, path) = OPENED_BEFORE.get().unwrap();
            let here = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
            let open =
                here.is_some_and(|h| h.to_string_lossy().starts_with(&*path.to_string_lossy()));
            octets![if open { "open" } else { "closed" }]
        })
        .try_sync("t::try", |args| match args.str(0) {
            Some("no") => Err(format!("refused {args}")),
            _ => Ok(args),
        })
        .sync("t::kill_self", |_| {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            octets![]
        })
        .sync("t::sleep", |args| {
            std::thread::sleep(Duration::from_millis(args.num(0).unwrap() as u64));
            octets!["slept"]
        })
        .sync("t::sockets", |_| octets![socket_fds().len().to_string()])
        // Writes a malformed reply frame onto its own connection (its only
        // socket), as a broken or hostile worker would, then waits.
        .sync("t::garbage", |args| {
            let fd = socket_fds()[0];
            let frame: &[u8] = match args.str(0) {
                // A reply (id 1, 3 bytes) whose octets claim 5 bytes and
                // hold 2.
                Some("truncated") => b"\0\0\0\x01\0\0\0\x03\x05ab",
                // A reply with an id no sync call has.
                _ => b"\0\0\0\x07\0\0\0\x02\x01a",
            };
            // SAFETY: writes from a live slice to a descriptor this worker holds.
            unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            std::thread::sleep(std::time::Duration::from_secs(60));
            octets!["late"]
        })
        .sync("t::ids", |_| {
            octets![
                std::process::id().to_string(),
                nix::unistd::getppid().as_raw().to_string()
            ]
        })
        .init("t::init_args", |w: WorkerArgs| {
            *INIT_ARGS.lock().unwrap() = w
                .args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
        })
        .sync("t::init_args", |_| {
            INIT_ARGS
                .lock()
                .unwrap()
                .iter()
                .cloned()
                .collect::<Octets>()
        })
        // The seed's descriptor-passing recipe: init keeps one half of a
        // socketpair; a call announces a descriptor, which then arrives on it.
        .init("t::fd_init", |mut w: WorkerArgs| {
            *FD_CHANNEL.lock().unwrap() = Some(w.fds.remove(0));
        })
        .sync("t::fd_run", |args| {
            assert_eq!(
                args.str(0),
                Some("i'll send some fd now, please expect it!")
            );
            let chan = FD_CHANNEL.lock().unwrap();
            let chan = chan.as_ref().unwrap();
            let mut buf = [0u8; 1];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([i32; 1]);
            let msg = nix::sys::socket::recvmsg::<()>(
                chan.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::empty(),
            )
            .unwrap();
            let fd = msg
                .cmsgs()
                .unwrap()
                .find_map(|c| match c {
                    nix::sys::socket::ControlMessageOwned::ScmRights(f) => Some(f[0]),
                    _ => None,
                })
                .unwrap();
            // SAFETY: the descriptor just arrived and is ours alone.
            let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let mut s = String::new();
            file.read_to_string(&mut s).unwrap();
            octets![s]
        })
        .init("t::preload", |w: WorkerArgs| {
            let v = String::from_utf8_lossy(&w.args[0]).into_owned();
            *PRELOAD.lock().unwrap() = Some((v, std::process::id() as i32));
        })
        .sync("t::preloaded", |_| {
            let p = PRELOAD.lock().unwrap().clone().unwrap_or_default();
            octets![p.0, p.1.to_string()]
        })
        .start()
}

/// A file the test program opened before its template started: `(fd,
/// path)`.
static OPENED_BEFORE: OnceLock<(i32, std::path::PathBuf)> = OnceLock::new();

fn main() {
    FDS_BEFORE_INIT.set(open_fds()).unwrap();
    let path = std::env::temp_dir().join(format!("forkrpc-open-before-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap(); // open, but leaves nothing behind
    OPENED_BEFORE
        .set((std::os::fd::IntoRawFd::into_raw_fd(file), path))
        .unwrap();
    if std::env::var_os("FORKRPC_TEST_ORPHAN").is_some() {
        orphan_parent();
    }
    if std::env::var_os("FORKRPC_TEST_NO_HANDLERS").is_some() {
        error_without_handlers();
    }
    let t = template().expect("template starts");
    assert_eq!(
        forkrpc::template_mode(),
        Some(forkrpc::TemplateMode::Forked)
    );

    let args = Arguments::from_args();
    let rpc_tests: Vec<(&str, EngineTest)> = vec![
        ("synopsis", synopsis),
        ("perl_sync_test_order", perl_sync_test_order),
        ("seed_example1_sync_rmdir_order", seed_example1),
        ("call_forms_future_callback_blocking", call_forms),
        ("tokio_multi_thread_callers", tokio_callers),
        ("unknown_handler_is_an_error", unknown_handler),
        ("handler_panic_reports_message", handler_panic),
        ("worker_exit_code_fails_outstanding_calls", worker_exit_code),
        (
            "worker_exit_fails_calls_never_sent",
            worker_exit_with_backlog,
        ),
        ("worker_killed_by_signal", worker_killed),
        (
            "error_goes_to_on_event_without_on_error",
            error_fallback_to_on_event,
        ),
        ("payload_too_large_sends_nothing", payload_too_large),
        ("drop_drains_queued_calls", drop_drains),
        ("close_reaps_the_worker", close_reaps),
        ("close_ends_the_worker_for_every_clone", close_with_clones),
        ("send_arg_reaches_init", send_arg_init),
        ("send_fh_seed_recipe", send_fh_recipe),
        ("derived_template_shares_init_state", derived_template),
        ("workers_hold_no_other_sockets", no_socket_leaks),
        ("workers_hold_no_file_the_program_opened", no_file_leaks),
        ("calls_after_worker_end_name_its_end", calls_after_end),
        ("call_timeout_kills_and_says_so", call_timeout),
        (
            "async_death_fails_the_calls_it_started_only",
            async_death_started_only,
        ),
        (
            "async_death_keeps_replies_made_before_it",
            async_death_keeps_made_replies,
        ),
        (
            "dropped_future_of_an_unsent_call_is_not_sent",
            dropped_unsent,
        ),
        (
            "a_death_costs_only_the_running_call",
            death_costs_the_running_call,
        ),
        (
            "calls_after_idle_death_name_the_signal",
            calls_after_idle_death,
        ),
        ("panicking_callback_is_contained", panicking_callback),
        ("handler_error_fails_only_that_call", handler_error),
        ("big_arguments_round_trip_in_order", big_arguments),
        ("small_calls_survive_full_socket_buffers", full_buffers),
        ("calls_queued_together_go_out_in_one_send", batched_sends),
        (
            "calls_behind_a_slow_one_leave_with_its_reply",
            calls_behind_a_slow_one,
        ),
        ("spent_arguments_are_released_when_idle", spent_arguments),
        (
            "malformed_reply_fails_every_call_and_ends_the_worker",
            malformed_reply,
        ),
        (
            "arguments_of_calls_from_callbacks_are_freed_at_once",
            driver_made_arguments,
        ),
    ];
    let mut trials = engine_trials(&t, &rpc_tests);
    let t2 = t.clone();
    trials.push(Trial::test("parent_fds_are_cloexec", move || {
        parent_fds_cloexec(&t2)
    }));
    trials.push(Trial::test(
        "workers_die_with_the_parent",
        workers_die_with_parent,
    ));
    trials.push(Trial::test(
        "error_without_handlers_goes_to_stderr",
        error_to_stderr,
    ));
    libtest_mimic::run(&args, trials).exit();
}

fn opts(kind: EngineKind) -> Options {
    Options::default().engine(kind)
}

fn synopsis(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let (tx, rx) = mpsc::channel();
    rpc.call_with(octets!["1", "2", "3"], move |r| {
        tx.send(format!("MyModule::server returned {}", r.unwrap()))
            .unwrap();
    });
    eq(recv(&rx)?, "MyModule::server returned 1 2 3".to_string())
}

fn perl_sync_test_order(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let log = Log::default();
    let (opts, destroyed) = logged(opts(kind), &log);
    let rpc = t.fork().run("t::perl_sync", opts)?;
    for n in [5, 7, 9, 11] {
        let l = log.clone();
        rpc.call_with(octets![n.to_string()], move |r| {
            l.lock().unwrap().push(r.unwrap().to_string())
        });
    }
    drop(rpc);
    recv(&destroyed)?;
    let got = log.lock().unwrap().clone();
    eq(
        got,
        [
            "ok 5", "ok 6", "ok 7", "ok 8", "ok 9", "ok 10", "ok 11", "ok 12", "destroy",
        ]
        .map(String::from)
        .to_vec(),
    )
}

fn seed_example1(_t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // `cargo test` builds the examples next to the binaries; run it there.
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_forkrpc"))
        .parent()
        .unwrap()
        .join("examples/sync_rmdir");
    if !exe.exists() {
        return Err(format!("{} was not built", exe.display()).into());
    }
    let out = std::process::Command::new(&exe)
        .env("FORKRPC_ENGINE", kind.name())
        .output()?;
    check(out.status.success(), format!("example failed: {out:?}"))?;
    let expect = "/tmp/somepath/1: No such file or directory
/tmp/somepath/2: No such file or directory
3 requests handled
/tmp/somepath/3: No such file or directory
/tmp/somepath/4: No such file or directory
/tmp/somepath/5: No such file or directory
6 requests handled
/tmp/somepath/6: No such file or directory
";
    eq(
        String::from_utf8_lossy(&out.stderr).into_owned(),
        expect.to_string(),
    )
}

fn call_forms(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    // Future on no runtime at all: a plain executor.
    let fut = rpc.call(octets!["future"]);
    let r = tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(fut)?;
    eq(r, octets!["future"])?;
    eq(
        rpc.call_blocking(octets!["blocking", ""])?,
        octets!["blocking", ""],
    )?;
    let (tx, rx) = mpsc::channel();
    rpc.call_with(octets!["callback"], move |r| tx.send(r).unwrap());
    eq(recv(&rx)??, octets!["callback"])?;
    // A callback may call again (it runs on the driver thread), but not block.
    let (tx, rx) = mpsc::channel();
    let rpc2 = rpc.clone();
    rpc.call_with(octets!["a"], move |_| {
        let blocked = rpc2.call_blocking(octets!["b"]);
        let tx2 = tx.clone();
        rpc2.call_with(octets!["c"], move |r| tx2.send(Ok(r.unwrap())).unwrap());
        tx.send(Err(blocked)).unwrap();
    });
    match recv(&rx)? {
        Err(Err(Error::WouldDeadlock)) => {}
        other => return Err(format!("expected WouldDeadlock, got {other:?}").into()),
    }
    eq(recv(&rx)?.unwrap(), octets!["c"])?;
    rpc.close_blocking()?;
    Ok(())
}

fn tokio_callers(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()?;
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for task in 0..8 {
            let rpc = rpc.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..100 {
                    let s = format!("{task}-{i}");
                    let r = rpc.call(octets![s.clone()]).await.unwrap();
                    got.push((s, r.str(0).unwrap().to_owned()));
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    eq(results.len(), 800)?;
    for (sent, got) in results {
        eq(got, sent)?;
    }
    Ok(())
}

fn unknown_handler(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    match t.fork().run("No::such", opts(kind)) {
        Err(Error::UnknownHandler {
            kind: "handler",
            name,
            known,
        }) => {
            eq(name.as_str(), "No::such")?;
            check(
                known.contains("t::perl_sync"),
                format!("known names listed: {known}"),
            )?;
        }
        Err(e) => return Err(format!("wrong error: {e}").into()),
        Ok(_) => return Err("unknown handler accepted".into()),
    }
    match t.fork().run(forkrpc::ECHO, opts(kind).init("No::init")) {
        Err(Error::UnknownHandler {
            kind: "init function",
            ..
        }) => Ok(()),
        Err(e) => Err(format!("wrong error: {e}").into()),
        Ok(_) => Err("unknown init accepted".into()),
    }
}

fn handler_panic(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    let rpc = t.fork().run(
        "t::panic",
        opts(kind).on_error(move |e| e2.lock().unwrap().push(e)),
    )?;
    let pid = rpc.pid();
    let first = rpc.call(octets!["x"]);
    let second = rpc.call(octets!["y"]);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    match rt.block_on(first) {
        Err(Error::HandlerPanicked { pid: p, message }) => {
            eq(p, pid)?;
            check(
                message.starts_with("boom: x at tests/rpc.rs:"),
                format!("message: {message}"),
            )?;
        }
        other => return Err(format!("expected HandlerPanicked, got {other:?}").into()),
    }
    // The call behind it never started, and says why.
    match rt.block_on(second) {
        Err(Error::NotStarted { pid: p, cause }) => {
            eq(p, pid)?;
            let exit = format!("exit code {}", forkrpc::PANIC_EXIT_CODE);
            check(
                cause.contains(&exit) && cause.contains("a handler panicked: boom: x"),
                format!("cause: {cause}"),
            )?;
        }
        other => return Err(format!("expected NotStarted, got {other:?}").into()),
    }
    let e = rpc.close_blocking();
    check(
        matches!(e, Err(Error::WorkerExited { .. })),
        format!("close: {e:?}"),
    )?;
    let n = errors.lock().unwrap().len();
    eq(n, 1)
}

fn worker_exit_code(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::exit", opts(kind).on_error(|_| {}))?;
    match rpc.call_blocking(octets!["7"]) {
        Err(
            e @ Error::WorkerExited {
                status: ExitStatus::Code(7),
                outstanding: 1,
                panic: None,
                ..
            },
        ) => {
            let msg = e.to_string();
            check(
                msg.contains("exit code 7") && msg.contains("unexpected eof"),
                msg,
            )
        }
        other => Err(format!("expected exit code 7, got {other:?}").into()),
    }
}

/// Many calls (1 KiB each, 20 MiB in all, far more than the socket
/// holds), queued from a callback on the driver thread so that all are in
/// the queue when it next drains it: the worker exits on the first; every
/// one of them, sent or never sent, fails with how it ended.
fn worker_exit_with_backlog(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    const N: usize = 20_000;
    let rpc = t.fork().run("t::exit", opts(kind).on_error(|_| {}))?;
    let echo = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let (tx, rx) = mpsc::channel();
    echo.call_with(octets!["go"], move |_| {
        for i in 0..N {
            let tx = tx.clone();
            let arg = if i == 0 {
                "7".to_owned()
            } else {
                "x".repeat(1024)
            };
            rpc.call_with(octets![arg], move |r| tx.send(r).unwrap());
        }
    });
    // The first call killed the worker; the others never started (its
    // crash journal says so), and say how it ended.
    let got: Vec<_> = rx.iter().collect();
    echo.close_blocking()?;
    eq(got.len(), N)?;
    for (n, r) in got.into_iter().enumerate() {
        match (n, r) {
            (
                0,
                Err(Error::WorkerExited {
                    status: ExitStatus::Code(7),
                    outstanding: N,
                    ..
                }),
            ) => {}
            (1.., Err(Error::NotStarted { cause, .. }))
                if cause.ends_with("ended with exit code 7") => {}
            (n, other) => {
                return Err(format!("call {n}: expected exit code 7, got {other:?}").into())
            }
        }
    }
    Ok(())
}

fn worker_killed(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::kill_self", opts(kind).on_error(|_| {}))?;
    match rpc.call_blocking(octets![]) {
        Err(
            e @ Error::WorkerExited {
                status: ExitStatus::Signal(9),
                ..
            },
        ) => check(e.to_string().contains("signal 9 (SIGKILL)"), e.to_string()),
        other => Err(format!("expected SIGKILL, got {other:?}").into()),
    }
}

fn error_fallback_to_on_event(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let rpc = t.fork().run(
        "t::exit",
        opts(kind).on_event(move |ev| tx.lock().unwrap().send(ev).unwrap()),
    )?;
    let r = rpc.call_blocking(octets!["3"]);
    check(r.is_err(), "call fails")?;
    let ev = recv(&rx)?;
    eq(ev.str(0), Some("error"))?;
    check(
        ev.str(1).unwrap_or("").contains("exit code 3"),
        format!("event: {ev}"),
    )
}

fn payload_too_large(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    // 300 views of one 15 MB buffer: 4.5 GB encoded, 15 MB in memory.
    let big = bytes::Bytes::from(vec![1u8; 15_000_000]);
    match rpc.call_blocking(Octets(vec![big; 300])) {
        Err(Error::PayloadTooLarge { size }) => eq(size, 300 * (15_000_000 + 4))?,
        other => return Err(format!("expected PayloadTooLarge, got {other:?}").into()),
    }
    // Nothing was sent: the worker answers the next call normally.
    eq(rpc.call_blocking(octets!["after"])?, octets!["after"])?;
    rpc.close_blocking()?;
    Ok(())
}

fn drop_drains(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = answered.clone();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let rpc = t.fork().run(
        forkrpc::ECHO,
        opts(kind).on_destroy(move || {
            tx.lock()
                .unwrap()
                .send(a.load(std::sync::atomic::Ordering::SeqCst))
                .unwrap()
        }),
    )?;
    let payload = octets![vec![7u8; 1000]];
    for _ in 0..1000 {
        let a = answered.clone();
        rpc.call_with(payload.clone(), move |r| {
            assert_eq!(r.unwrap()[0].len(), 1000);
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    drop(rpc);
    eq(recv(&rx)?, 1000)
}

fn close_with_clones(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t
        .fork()
        .run(forkrpc::ECHO, Options::default().engine(kind))?;
    let other = rpc.clone(); // as a typed handle holds one
    let before = other.call(octets!["before"]);
    // Returns although `other` is alive: close ends the worker for all.
    rpc.close_blocking()?;
    eq(block(before)?, octets!["before"])?;
    match other.call_blocking(octets!["after"]) {
        Err(Error::Closed) => Ok(()),
        r => Err(format!("a call after close: expected Closed, got {r:?}").into()),
    }
}

fn close_reaps(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let pid = rpc.pid();
    check(proc_exists(pid), "worker runs")?;
    rpc.close_blocking()?;
    // close returns after the template reported the exit: reaped, no zombie.
    check(
        !proc_exists(pid),
        format!("worker {pid} still in /proc after close"),
    )
}

fn send_arg_init(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t
        .fork()
        .send_arg("alpha")
        .send_arg(vec![b'b'; 3])
        .run("t::init_args", opts(kind).init("t::init_args"))?;
    eq(rpc.call_blocking(octets![])?, octets!["alpha", "bbb"])
}

fn send_fh_recipe(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (s1, s2) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let rpc = t
        .fork()
        .send_fh(s2)
        .run("t::fd_run", opts(kind).init("t::fd_init"))?;
    let reply = rpc.call(octets!["i'll send some fd now, please expect it!"]);
    // The descriptor to pass: the read end of a pipe holding a message.
    let (r, w) = nix::unistd::pipe()?;
    let mut w = std::fs::File::from(w);
    w.write_all(b"through the passed descriptor")?;
    drop(w);
    let iov = [std::io::IoSlice::new(b"x")];
    let fds = [r.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        s1.as_raw_fd(),
        &iov,
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )?;
    drop(r);
    let r = tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(reply)?;
    eq(r, octets!["through the passed descriptor"])
}

fn derived_template(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let derived = t.derive("t::preload", ["loaded once"])?;
    check(derived.pid() != t.pid(), "a new template process")?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let rpc = derived.fork().run("t::preloaded", opts(kind))?;
        let r = rpc.call_blocking(octets![])?;
        let ids = rpc.call_blocking(octets![])?;
        eq(r.str(0), Some("loaded once"))?;
        let ppid = {
            let rpc2 = derived.fork().run("t::ids", opts(kind))?;
            rpc2.call_blocking(octets![])?.num(1).unwrap() as i32
        };
        eq(ppid, derived.pid())?;
        seen.push(ids.num(1).unwrap() as i32);
    }
    // init ran once, in the derived template, not in each worker.
    eq(seen, vec![derived.pid(); 3])?;
    // A worker of the root template does not have the state.
    let plain = t.fork().run("t::preloaded", opts(kind))?;
    eq(plain.call_blocking(octets![])?.str(0), Some(""))
}

fn no_socket_leaks(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let others: Vec<_> = (0..3)
        .map(|_| t.fork().run(forkrpc::ECHO, opts(kind)))
        .collect::<Result<_, _>>()?;
    let rpc = t.fork().run("t::sockets", opts(kind))?;
    // Its own connection and nothing else: no other worker's socket, no
    // template control socket.
    eq(rpc.call_blocking(octets![])?, octets!["1"])?;
    let ids = t
        .fork()
        .run("t::ids", opts(kind))?
        .call_blocking(octets![])?;
    eq(ids.num(1).unwrap() as i32, t.pid())?;
    drop(others);
    Ok(())
}

fn calls_after_end(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let (destroy, destroyed) = destroy_channel();
    let rpc = t
        .fork()
        .run("t::exit", opts(kind).on_error(|_| {}).on_destroy(destroy))?;
    let r = rpc.call_blocking(octets!["0"]);
    check(
        matches!(
            r,
            Err(Error::WorkerExited {
                status: ExitStatus::Code(0),
                ..
            })
        ),
        format!("{r:?}"),
    )?;
    check(
        destroyed.try_recv().is_err(),
        "no on_destroy after an error",
    )?;
    // Not `Closed` (that is for a handle the user closed): not started,
    // and why: how the worker ended.
    match rpc.call_blocking(octets!["0"]) {
        Err(Error::NotStarted { pid, cause }) if pid == rpc.pid() => check(
            cause.contains("exit code 0"),
            format!("the cause names the exit: {cause}"),
        ),
        other => Err(format!("expected NotStarted naming exit code 0, got {other:?}").into()),
    }
}

/// A worker killed while idle: calls made after its end fail as never
/// started, naming the signal that killed it, on either backend (sync calls are refused by the
/// outbox, async ones by the engine).
fn calls_after_idle_death(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    for asynchronous in [false, true] {
        let (destroy, destroyed) = destroy_channel();
        let rpc = t.fork().run(
            forkrpc::ECHO,
            opts(kind)
                .asynchronous(asynchronous)
                .on_error(|_| {})
                .on_destroy(destroy),
        )?;
        eq(rpc.call_blocking(octets!["x"])?, octets!["x"])?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(rpc.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        recv(&destroyed)?; // its connection ended
        for form in ["blocking", "future", "callback"] {
            let r = match form {
                "blocking" => rpc.call_blocking(octets!["y"]),
                "future" => block(rpc.call(octets!["y"])),
                _ => {
                    let (tx, rx) = std::sync::mpsc::channel();
                    rpc.call_with(octets!["y"], move |r| tx.send(r).unwrap());
                    recv(&rx)?
                }
            };
            match r {
                Err(Error::NotStarted { pid, cause })
                    if pid == rpc.pid() && cause.contains("signal 9 (SIGKILL)") => {}
                other => {
                    return Err(format!(
                        "async {asynchronous}, {form}: expected NotStarted naming signal 9, got {other:?}"
                    )
                    .into())
                }
            }
        }
    }
    Ok(())
}

fn panicking_callback(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    rpc.call_with(octets!["x"], |_| panic!("callback bug"));
    // The driver thread survived: this and other workers still get replies.
    eq(
        rpc.call_blocking(octets!["still here"])?,
        octets!["still here"],
    )?;
    rpc.close_blocking()?;
    Ok(())
}

fn batched_sends(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    rpc.call_blocking(octets!["warm"])?;
    let before = rpc.send_ops();
    // Queued from a callback on the driver thread, the 1000 calls are all in
    // the queue when the driver next drains it: one batch, one send.
    let (tx, rx) = mpsc::channel();
    let rpc2 = rpc.clone();
    rpc.call_with(octets!["go"], move |_| {
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(1000));
        for i in 0..1000 {
            let (left, tx) = (left.clone(), tx.clone());
            rpc2.call_with(octets![i.to_string()], move |r| {
                assert_eq!(r.unwrap(), octets![i.to_string()]);
                if left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    tx.send(()).unwrap();
                }
            });
        }
    });
    recv(&rx)?;
    let sends = rpc.send_ops() - before;
    // One for "go", one for the batch (a third if the socket took it in two).
    check(
        sends <= 3,
        format!("1001 calls took {sends} send operations"),
    )
}

/// Calls made while a slow call is outstanding wait in the caller's
/// outbox, without waking the driver, and leave together when the slow
/// call's reply arrives: one send for all of them (a sync worker could not
/// have started them earlier anyway). They are made 2 ms apart, so that
/// a driver woken for each would send each on its own.
fn calls_behind_a_slow_one(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::sleep", opts(kind))?;
    eq(rpc.call_blocking(octets!["0"])?, octets!["slept"])?;
    let before = rpc.send_ops();
    let slow = rpc.call(octets!["500"]);
    let quick: Vec<_> = (0..50)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(2));
            rpc.call(octets!["0"])
        })
        .collect();
    // All still waiting behind the slow call, framed ones included.
    eq(rpc.pending(), 51)?;
    eq(block(slow)?, octets!["slept"])?;
    for r in await_in_order(quick) {
        eq(r?, octets!["slept"])?;
    }
    let sends = rpc.send_ops() - before;
    // The slow call's batch, then the rest in one (a third if the socket
    // took it in two).
    check(sends <= 3, format!("51 calls took {sends} send operations"))?;
    rpc.close_blocking()?;
    Ok(())
}

fn parent_fds_cloexec(t: &Template) -> Result<(), Failed> {
    let _rpcs: Vec<_> = engines()
        .into_iter()
        .filter(|e| e.1)
        .map(|(k, _)| t.fork().run(forkrpc::ECHO, opts(k)))
        .collect::<Result<_, _>>()?;
    let before = FDS_BEFORE_INIT.get().unwrap();
    for fd in open_fds().difference(before) {
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue; // closed meanwhile (read_dir's own descriptor)
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
        check(
            flags & libc::O_CLOEXEC as u32 != 0,
            format!("fd {fd} ({}) lacks O_CLOEXEC", target.display()),
        )?;
    }
    Ok(())
}

/// Started as a child of the test: makes a worker that sleeps, prints the
/// worker's pid, and waits to be killed.
fn orphan_parent() -> ! {
    let t = template().unwrap();
    let rpc = t.fork().run("t::sleep", Options::default()).unwrap();
    let _pending = rpc.call(octets!["600000"]);
    println!("{} {}", rpc.pid(), t.pid());
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}

/// Started as a child of the test: a worker with neither `on_error` nor
/// `on_event` dies mid-call.
fn error_without_handlers() -> ! {
    let t = template().unwrap();
    let rpc = t.fork().run("t::exit", Options::default()).unwrap();
    match rpc.call_blocking(octets!["5"]) {
        Err(e) => println!("call failed: {e}"),
        Ok(r) => println!("call succeeded: {r}"),
    }
    std::process::exit(0)
}

fn error_to_stderr() -> Result<(), Failed> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env("FORKRPC_TEST_NO_HANDLERS", "1")
        .output()?;
    check(out.status.success(), format!("{out:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(
        stdout.starts_with("call failed: worker ") && stdout.contains("exit code 5"),
        format!("stdout: {stdout}"),
    )?;
    check(
        stderr
            .lines()
            .any(|l| l.starts_with("forkrpc: worker ") && l.contains("exit code 5")),
        format!("stderr: {stderr}"),
    )
}

fn workers_die_with_parent() -> Result<(), Failed> {
    let mut parent = std::process::Command::new(std::env::current_exe()?)
        .env("FORKRPC_TEST_ORPHAN", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap()).read_line(&mut line)?;
    let pids: Vec<i32> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let (worker, template) = (pids[0], pids[1]);
    check(
        proc_exists(worker) && proc_exists(template),
        "worker and template run",
    )?;
    parent.kill()?;
    parent.wait()?;
    check(
        wait_gone(template, Duration::from_secs(10)),
        "template died with the parent",
    )?;
    check(
        wait_gone(worker, Duration::from_secs(10)),
        "worker died with the parent",
    )
}

fn handler_error(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("t::try", opts(kind))?;
    let pid = rpc.pid();
    let (tx, rx) = mpsc::channel();
    for a in ["yes", "no", "again"] {
        let tx = tx.clone();
        rpc.call_with(octets![a], move |r| tx.send(r).unwrap());
    }
    eq(recv(&rx)?.map_err(|e| e.to_string()), Ok(octets!["yes"]))?;
    match recv(&rx)? {
        Err(Error::Handler { pid: p, message }) => {
            eq(p, pid)?;
            eq(message.as_str(), "refused no")?;
        }
        other => return Err(format!("expected Error::Handler, got {other:?}").into()),
    }
    // The worker carried on, in order.
    eq(recv(&rx)?.map_err(|e| e.to_string()), Ok(octets!["again"]))?;
    eq(rpc.pending(), 0)?;
    rpc.close_blocking()?;
    Ok(())
}

fn big_arguments(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // Big strings travel in place (no staging copy) on both sides; mixed
    // with small ones and with small calls in between, order and bytes
    // must come back exact.
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let big = |n: usize, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let args = octets![
        "head",
        big(3 << 20, 1),
        "middle",
        big(100_000, 2),
        big(65_536, 3),
        "tail"
    ];
    let calls: Vec<_> = (0..4)
        .flat_map(|i| {
            [
                rpc.call(args.clone()),
                rpc.call(octets![format!("small {i}")]),
            ]
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    for (i, c) in calls.into_iter().enumerate() {
        let r = rt.block_on(c)?;
        if i % 2 == 0 {
            check(r == args, format!("big call {i} came back different"))?;
        } else {
            eq(r, octets![format!("small {}", i / 2)])?;
        }
    }
    rpc.close_blocking()?;
    Ok(())
}

fn full_buffers(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // 20,000 calls of ~100 bytes queued from two threads while the worker
    // echoes: about 2 MB each way, far more than a socket buffer holds, so
    // sends go out partly or not at all and are resumed. Every reply must
    // match its call, in order per thread.
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for thread in 0..2 {
            let (rpc, tx) = (rpc.clone(), tx.clone());
            s.spawn(move || {
                let next = Arc::new(Mutex::new(0usize));
                for i in 0..10_000usize {
                    let arg = format!("{thread}:{i:06}:{}", "p".repeat(90));
                    let (next, tx, want) = (next.clone(), tx.clone(), arg.clone());
                    rpc.call_with(octets![arg], move |r| {
                        let mut n = next.lock().unwrap();
                        let ok = r.map(|o| o == octets![want]).unwrap_or(false) && *n == i;
                        *n += 1;
                        tx.send(ok).unwrap();
                    });
                }
            });
        }
    });
    let mut good = 0;
    for _ in 0..20_000 {
        good += recv(&rx)? as usize;
    }
    eq(good, 20_000)?;
    rpc.close_blocking()?;
    Ok(())
}

/// An argument owner that raises a flag when it drops.
struct Flagged(Vec<u8>, Arc<std::sync::atomic::AtomicBool>);

impl AsRef<[u8]> for Flagged {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Flagged {
    fn drop(&mut self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A call made from a reply callback (on the driver thread) had its
/// arguments made there: they are freed as soon as they are sent, not
/// kept for a caller (a ping-pong would otherwise trade warm memory for
/// cold). So by the time its own reply arrives, they are gone.
fn driver_made_arguments(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let (tx, rx) = mpsc::channel();
    let inner = rpc.clone();
    rpc.call_with(octets!["first"], move |_| {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let arg = bytes::Bytes::from_owner(Flagged(b"second".to_vec(), dropped.clone()));
        inner.call_with(octets![arg], move |r| {
            let gone = dropped.load(std::sync::atomic::Ordering::SeqCst);
            tx.send((r, gone)).unwrap();
        });
    });
    let (r, gone) = recv(&rx)?;
    eq(r?, octets!["second"])?;
    check(gone, "the argument was still held when its reply arrived")?;
    rpc.close_blocking()?;
    Ok(())
}

/// A call's arguments and callback are freed on a caller's thread, the next
/// time one queues a call; with no further call, the driver frees them
/// itself soon after (within `leftovers::IDLE_FREE`, 50 ms). Either way they
/// are released: the owner of an argument's bytes signals when it drops.
fn spent_arguments(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    struct Owner(Vec<u8>, mpsc::Sender<()>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Owner {
        fn drop(&mut self) {
            let _ = self.1.send(());
        }
    }
    let rpc = t.fork().run(forkrpc::ECHO, opts(kind))?;
    let (tx, freed) = mpsc::channel();
    let arg = bytes::Bytes::from_owner(Owner(b"spent".to_vec(), tx));
    let (done_tx, done) = mpsc::channel();
    rpc.call_with(octets![arg], move |r| done_tx.send(r).unwrap());
    eq(recv(&done)??, octets!["spent"])?;
    // The reply is a copy: only the arguments hold the owner.
    recv(&freed)?;
    rpc.close_blocking()?;
    Ok(())
}

/// Twenty calls sent together (their replies are buffered by the worker,
/// not yet written) with one that kills the worker in the middle: the
/// calls before it get their replies (from the worker's crash journal),
/// it fails with how the worker died, and the ones after it fail as never
/// started. For abort(), _exit() and SIGKILL.
fn death_costs_the_running_call(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    for (how, status) in [
        ("abort", ExitStatus::Signal(6)),
        ("exit", ExitStatus::Code(7)),
        ("kill", ExitStatus::Signal(9)),
    ] {
        let rpc = t.fork().run("t::crash_on", opts(kind).on_error(|_| {}))?;
        rpc.call_blocking(octets!["warm"])?;
        let calls: Vec<_> = (0..20)
            .map(|i| match i {
                12 => rpc.call(octets![how]),
                i => rpc.call(octets![format!("call {i}")]),
            })
            .collect();
        for (i, r) in await_in_order(calls).into_iter().enumerate() {
            match (i, r) {
                (0..12, Ok(r)) => eq(r, octets![format!("call {i}")])?,
                (12, Err(Error::WorkerExited { status: s, .. })) if s == status => {}
                (13.., Err(Error::NotStarted { pid, .. })) if pid == rpc.pid() => {}
                (i, r) => return Err(format!("{how}: call {i}: {r:?}").into()),
            }
        }
    }
    Ok(())
}

/// `Options::timeout`: a call that overruns fails with `Timeout` (its
/// worker is killed, instead of the handle hanging for the call's 30 s);
/// the calls queued behind it and every later call fail as never started,
/// naming the timeout; calls that finish in time are untouched.
fn call_timeout(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let after = Duration::from_millis(300);
    let rpc = t
        .fork()
        .run("t::sleep", opts(kind).timeout(after).on_error(|_| {}))?;
    for _ in 0..3 {
        eq(rpc.call_blocking(octets!["10"])?, octets!["slept"])?;
    }
    let slow = rpc.call(octets!["30000"]);
    let behind: Vec<_> = (0..3).map(|_| rpc.call(octets!["0"])).collect();
    match block(slow) {
        Err(Error::Timeout { after: a }) => eq(a, after)?,
        other => return Err(format!("expected Timeout, got {other:?}").into()),
    }
    let later = rpc.call(octets!["0"]);
    for r in await_in_order(behind).into_iter().chain([block(later)]) {
        match r {
            Err(Error::NotStarted { pid, cause })
                if pid == rpc.pid() && cause.contains("overran its timeout of 300ms") => {}
            other => {
                return Err(format!("expected NotStarted naming the timeout, got {other:?}").into())
            }
        }
    }
    Ok(())
}

/// A call made while another is running waits in the outbox; dropping its
/// future before the worker is free takes it out: it never runs, and the
/// calls around it do, in order.
fn dropped_unsent(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let (tx, started) = mpsc::channel();
    let tx = Mutex::new(tx);
    let rpc = t.fork().run(
        "t::record",
        opts(kind).on_event(move |_| tx.lock().unwrap().send(()).unwrap()),
    )?;
    let slow = rpc.call(octets!["sleep:200"]);
    recv(&started)?; // it runs: calls made now wait for its reply
    let first = rpc.call(octets!["first"]);
    let dropped = rpc.call(octets!["dropped"]);
    let last = rpc.call(octets!["last"]);
    eq(rpc.pending(), 4)?;
    drop(dropped);
    let got = await_in_order(vec![slow, first, last]);
    let got: Vec<Octets> = got.into_iter().collect::<Result<_, _>>()?;
    eq(got[2].clone(), octets!["sleep:200", "first", "last"])?;
    eq(rpc.pending(), 0)?;
    rpc.close_blocking()?;
    Ok(())
}

/// Async backend, one call at a time (`concurrency(1)`): the worker dies
/// in the call it runs; the three sent behind it, which it had read but
/// not started, fail as never started (its journal counts the requests it
/// started).
fn async_death_started_only(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(
        "t::crash_on",
        opts(kind)
            .asynchronous(true)
            .concurrency(1)
            .on_error(|_| {}),
    )?;
    for i in 0..5 {
        eq(
            rpc.call_blocking(octets![i.to_string()])?,
            octets![i.to_string()],
        )?;
    }
    let calls: Vec<_> = ["abort", "a", "b", "c"]
        .iter()
        .map(|a| rpc.call(octets![*a]))
        .collect();
    for (i, r) in await_in_order(calls).into_iter().enumerate() {
        match (i, r) {
            (
                0,
                Err(Error::WorkerExited {
                    status: ExitStatus::Signal(6),
                    ..
                }),
            ) => {}
            (1.., Err(Error::NotStarted { pid, cause }))
                if pid == rpc.pid() && cause.ends_with("signal 6 (SIGABRT)") => {}
            (i, r) => return Err(format!("call {i}: {r:?}").into()),
        }
    }
    Ok(())
}

/// Async backend: replies and events the worker made before it died but
/// had not written yet still arrive (its journal mirrors its output), in
/// the order made; the one call after the crash never started.
fn async_death_keeps_made_replies(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    let rpc = t.fork().run(
        "t::reply_then_crash",
        opts(kind)
            .asynchronous(true)
            .concurrency(8)
            .on_error(|_| {})
            .on_event(move |ev| {
                let _ = tx.send(ev);
            }),
    )?;
    let args = ["a", "b", "reply-abort", "c"];
    let calls: Vec<_> = args.iter().map(|a| rpc.call(octets![*a])).collect();
    for (i, r) in await_in_order(calls).into_iter().enumerate() {
        match (i, r) {
            (0..=2, Ok(o)) if o == octets![args[i]] => {}
            (3, Err(Error::NotStarted { cause, .. })) if cause.ends_with("signal 6 (SIGABRT)") => {}
            (i, r) => return Err(format!("call {i} ({}): {r:?}", args[i]).into()),
        }
    }
    let events: Vec<Octets> = rx.try_iter().collect();
    eq(
        events,
        vec![
            octets!["made", "a"],
            octets!["made", "b"],
            octets!["made", "reply-abort"],
        ],
    )?;
    Ok(())
}

/// A file the program opened before `start()` is not open in its workers
/// (the template closes what it inherited), though it is in the program.
fn no_file_leaks(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let (fd, path) = OPENED_BEFORE.get().unwrap();
    let here = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    let opened = |h: &std::path::Path| h.to_string_lossy().starts_with(&*path.to_string_lossy());
    check(opened(&here), format!("open here: {}", here.display()))?;
    let rpc = t.fork().run("t::opened_before", opts(kind))?;
    eq(rpc.call_blocking(octets![])?, octets!["closed"])?;
    rpc.close_blocking()?;
    Ok(())
}

/// A worker that writes a malformed reply: the call it answered fails as a
/// protocol error naming what was wrong, the calls queued behind it fail
/// too (none hangs), the worker is killed and reaped, and `on_error` hears
/// of it once.
fn malformed_reply(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    malformed_reply_of(t, kind, "truncated", "truncated")?;
    malformed_reply_of(t, kind, "wrong id", "id 7")
}

fn malformed_reply_of(
    t: &Template,
    kind: EngineKind,
    what: &str,
    named: &str,
) -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let rpc = t.fork().run(
        "t::garbage",
        opts(kind).on_error(move |e| tx.lock().unwrap().send(e.to_string()).unwrap()),
    )?;
    let pid = rpc.pid();
    let futs = vec![
        rpc.call(octets![what.to_owned()]),
        rpc.call(octets!["behind"]),
        rpc.call(octets!["and behind"]),
    ];
    let rs = await_in_order(futs);
    match &rs[0] {
        Err(Error::Protocol { detail, .. }) => check(
            detail.contains(named),
            format!("the detail names the fault: {detail}"),
        )?,
        other => return Err(format!("expected a protocol error, got {other:?}").into()),
    }
    for r in &rs[1..] {
        check(r.is_err(), format!("a call behind it: {r:?}"))?;
    }
    let reported = recv(&rx)?;
    check(
        reported.contains("protocol"),
        format!("on_error: {reported}"),
    )?;
    check(
        wait_gone(pid, Duration::from_secs(10)),
        format!("worker {pid} still runs"),
    )?;
    // Calls after it name the end, at once.
    check(
        rpc.call_blocking(octets!["after"]).is_err(),
        "a call after the end",
    )
}
