//! End to end through one worker: a call's round trip (callback and
//! blocking forms) and pipelined batches, on the sync and async backends.
//! The same paths as `forkrpc bench` W1/W2, under criterion's statistics.
//!
//! `cargo bench --bench echo`
//!
//! It has its own `main`: `forkrpc::init()` must run first, while the
//! process is single-threaded.

use criterion::{BenchmarkId, Criterion, Throughput};

// As in the `forkrpc` binary: calls are allocated on the caller's thread
// and freed on the driver thread, which glibc malloc does slowly.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use forkrpc::{octets, Options, Template, ECHO};
use std::sync::mpsc;

fn echo(c: &mut Criterion, t: &Template) {
    for (name, asynchronous) in [("sync", false), ("async", true)] {
        let rpc = t
            .fork()
            .run(ECHO, Options::default().asynchronous(asynchronous))
            .expect("worker starts");
        let arg = octets![&b"0123456789abcdef"[..]];
        let mut g = c.benchmark_group(format!("echo_{name}"));
        g.bench_function("round_trip_blocking", |b| {
            b.iter(|| rpc.call_blocking(arg.clone()).unwrap())
        });
        for n in [100u64, 10_000] {
            g.throughput(Throughput::Elements(n));
            g.bench_with_input(BenchmarkId::new("pipelined", n), &n, |b, &n| {
                b.iter(|| {
                    let (tx, rx) = mpsc::channel();
                    for i in 0..n {
                        let tx = tx.clone();
                        rpc.call_with(arg.clone(), move |r| {
                            r.unwrap();
                            if i + 1 == n {
                                tx.send(()).unwrap();
                            }
                        });
                    }
                    rx.recv().unwrap();
                })
            });
        }
        g.finish();
        rpc.close_blocking().expect("worker drains");
    }
}

fn main() {
    let template = forkrpc::init().expect("template starts");
    let mut c = Criterion::default().configure_from_args();
    echo(&mut c, &template);
    c.final_summary();
}
