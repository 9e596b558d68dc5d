//! Exec mode: external programs as workers. A worker written in Perl with
//! Perl's own `pack`/`unpack` (tests/data/perl_sync_worker.pl) proves the
//! wire format against the real thing; a program that cannot be executed
//! is an error; an exec'd worker's exit status reaches the calls.
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

mod common;

use common::{check, destroy_channel, eq, recv};
use forkrpc::{octets, Error, ExitStatus, Fork, Octets, Options};
use libtest_mimic::{Arguments, Failed, Trial};
use std::sync::{Arc, Mutex};

fn main() {
    forkrpc::init().expect("template starts");
    let perl = std::process::Command::new("perl")
        .arg("-e")
        .arg("exit 0")
        .status()
        .is_ok_and(|s| s.success());
    if !perl {
        eprintln!("note: perl is not installed here; the Perl worker test is ignored");
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("perl_worker_speaks_the_wire_format", perl_worker).with_ignored_flag(!perl),
        Trial::test("unexecutable_program_is_an_error", unexecutable),
        Trial::test("exec_worker_exit_status_fails_calls", exit_status),
        Trial::test("huge_announced_frame_allocates_as_bytes_arrive", huge_frame),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn script() -> String {
    format!(
        "{}/tests/data/perl_sync_worker.pl",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn perl_worker() -> Result<(), Failed> {
    let events = Arc::new(Mutex::new(Vec::<Octets>::new()));
    let e = events.clone();
    let (destroy, destroyed) = destroy_channel();
    let rpc = Fork::new()?.exec(
        "perl",
        [script()],
        Options::default()
            .on_event(move |ev| e.lock().unwrap().push(ev))
            .on_destroy(destroy),
    )?;
    eq(
        rpc.call_blocking(octets!["a", "bb", "ccc"])?,
        octets!["ccc", "bb", "a"],
    )?;
    // Lengths of 128 and more take two BER bytes; empty strings one.
    let long = "x".repeat(300);
    let big = vec![7u8; 70_000];
    let r = rpc.call_blocking(octets!["", long.clone(), big.clone()])?;
    eq(r, octets![big, long, ""])?;
    // Pipelined calls come back in order.
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let calls: Vec<_> = (0..50)
        .map(|i| rpc.call(octets![i.to_string(), "x"]))
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        eq(rt.block_on(c)?, octets!["x", i.to_string()])?;
    }
    let pid = rpc.pid();
    rpc.close_blocking()?;
    recv(&destroyed)?;
    let ev = events.lock().unwrap().clone();
    eq(ev.len(), 52)?;
    eq(ev[0].clone(), octets!["got", "3"])?;
    check(
        common::wait_gone(pid, std::time::Duration::from_secs(10)),
        "the Perl worker is gone",
    )
}

fn unexecutable() -> Result<(), Failed> {
    match Fork::new()?.exec("/nonexistent/forkrpc-worker", ["x"], Options::default()) {
        Err(Error::Template(m)) => check(
            m.contains("cannot execute") && m.contains("No such file"),
            m,
        ),
        Err(e) => Err(format!("expected a template error, got {e:?}").into()),
        Ok(_) => Err("a program that does not exist ran".into()),
    }
}

fn exit_status() -> Result<(), Failed> {
    // Reads one request's worth of bytes, then exits with 5.
    let rpc = Fork::new()?.exec(
        "sh",
        ["-c", "head -c 8 >/dev/null; exit 5"],
        Options::default().on_error(|_| {}),
    )?;
    match rpc.call_blocking(octets!["ping"]) {
        Err(Error::WorkerExited {
            status: ExitStatus::Code(5),
            ..
        }) => Ok(()),
        other => Err(format!("expected WorkerExited(code 5), got {other:?}").into()),
    }
}

/// Peak virtual size of this process, in KiB.
fn vm_peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn huge_frame() -> Result<(), Failed> {
    // A worker that announces a reply of 4 GiB - 1, sends 1 MiB of it and
    // exits. Had the parent allocated what was announced, its peak virtual
    // size would have grown by 4 GiB; it grows only with what arrives.
    let before = vm_peak_kib();
    let rpc = Fork::new()?.exec(
        "sh",
        [
            "-c",
            "head -c 4 >/dev/null; printf '\\000\\000\\000\\001\\377\\377\\377\\377'; head -c 1048576 /dev/zero",
        ],
        Options::default().on_error(|_| {}),
    )?;
    match rpc.call_blocking(octets!["give me everything"]) {
        Err(Error::WorkerExited { outstanding: 1, .. }) => {}
        other => return Err(format!("expected WorkerExited, got {other:?}").into()),
    }
    let grown = vm_peak_kib().saturating_sub(before);
    check(
        grown < 512 * 1024,
        format!("peak virtual size grew by {grown} KiB for 1 MiB received"),
    )
}
