//! The Perl AnyEvent::Fork::Pool synopsis: a pool with every parameter at
//! its default, ten calls whose results are printed, the pool dropped right
//! after the calls, and the program waiting for `on_destroy`.
//!
//! `cargo run --release --example pool`

use forkrpc::{octets, Octets, Options, Pool, PoolOptions, Template};
use std::sync::mpsc;

/// The worker function: `MyWorker::run` returns its input doubled.
fn run(args: Octets) -> Octets {
    let n: u64 = args.str(0).and_then(|s| s.parse().ok()).unwrap_or(0);
    octets![(2 * n).to_string()]
}

fn main() -> Result<(), forkrpc::Error> {
    let template = Template::builder().sync("MyWorker::run", run).start()?;

    let (finish_tx, finish) = mpsc::channel();
    let pool = Pool::new(
        &template,
        "MyWorker::run",
        Options::default()
            .on_error(|e| {
                eprintln!("FATAL: {e}");
                std::process::exit(1)
            })
            .on_destroy(move || finish_tx.send(()).unwrap()),
        // All the pool parameters, at their (Perl) defaults.
        PoolOptions::default()
            .max(4)
            .idle(0)
            .load(2)
            .start(std::time::Duration::from_millis(100))
            .stop(std::time::Duration::from_secs(10)),
    )?;

    for input in 1..=10 {
        pool.call_with(octets![input.to_string()], move |r| {
            println!("MyWorker::run returned {}", r.expect("call failed"));
        });
    }

    drop(pool);

    finish.recv().unwrap();
    Ok(())
}
