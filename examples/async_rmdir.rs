//! The seed's Example 1a: Example 1 (`sync_rmdir`) moved to the async
//! backend with the least change — `Options::asynchronous(true)` in the
//! parent, and a handler that takes a `Done` first and replies through it.
//!
//! `cargo run --release --example async_rmdir` prints the same eight lines
//! as `sync_rmdir`.

use forkrpc::{octets, Done, Octets, Options, Template};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// The child side: the seed's `MyWorker::run`, async flavour.
fn run(done: Done, args: Octets) {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let count = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    if count % 3 == 0 {
        forkrpc::event(octets![count.to_string()]);
    }
    let path = args.str(1).unwrap_or("");
    let status = match args.str(0) {
        Some("rmdir") => std::fs::remove_dir(path),
        Some("unlink") => std::fs::remove_file(path),
        other => panic!("fatal error, illegal command '{}'", other.unwrap_or("")),
    };
    done.reply(match status {
        Ok(()) => octets!["1"],
        Err(e) => octets!["0", strerror(&e)],
    });
}

/// Perl's "$!": the C library's message without Rust's " (os error N)".
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn main() -> Result<(), forkrpc::Error> {
    let template = Template::builder()
        .asynchronous("MyWorker::run", run)
        .start()?;

    let (done_tx, done) = mpsc::channel();
    let rpc = template.fork().run(
        "MyWorker::run",
        Options::default()
            .asynchronous(true)
            .on_error(|e| {
                eprintln!("FATAL: {e}");
                std::process::exit(1)
            })
            .on_event(|ev| eprintln!("{} requests handled", ev))
            .on_destroy(move || done_tx.send(()).unwrap()),
    )?;

    for id in 1..=6 {
        rpc.call_with(octets!["rmdir", format!("/tmp/somepath/{id}")], move |r| {
            let r = r.expect("call failed");
            if r.str(0) != Some("1") {
                eprintln!("/tmp/somepath/{id}: {}", r.str(1).unwrap_or(""));
            }
        });
    }

    drop(rpc);

    done.recv().unwrap();
    Ok(())
}
