//! The seed's Example 2: three countdowns (3, 2 and 1 seconds) run at once
//! in one async worker on one-second timers, reporting with events; the
//! handle is dropped right after the calls and the parent waits for
//! `on_destroy`. The whole run takes about three seconds, not six.
//!
//! `cargo run --release --example async_countdown` prints the seed's twelve
//! lines (timers that fire together may swap their lines). Events go to
//! stdout as in the seed (`print`), "job N finished" to stderr (`warn`).

use forkrpc::{octets, Done, Octets, Options, Template};
use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

/// The child side: `run` of the seed's `__DATA__` section.
fn run(done: Done, args: Octets) {
    let count: u32 = args.str(0).and_then(|c| c.parse().ok()).unwrap_or(0);
    forkrpc::event(octets![format!("starting to count up to {count}\n")]);
    tokio::task::spawn_local(async move {
        let second = Duration::from_secs(1);
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
        for n in 1..=count {
            timer.tick().await;
            forkrpc::event(octets![format!("count {n} of {count}\n")]);
        }
        done.reply(octets![]);
    });
}

fn main() -> Result<(), forkrpc::Error> {
    let template = Template::builder().asynchronous("run", run).start()?;

    let (done_tx, done) = mpsc::channel();
    let rpc = template.fork().run(
        "run",
        Options::default()
            .asynchronous(true)
            .on_error(|e| {
                eprintln!("FATAL: {e}");
                std::process::exit(1)
            })
            .on_event(|ev| {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&ev[0]);
                let _ = out.flush();
            })
            .on_destroy(move || done_tx.send(()).unwrap()),
    )?;

    for count in [3, 2, 1] {
        rpc.call_with(octets![count.to_string()], move |r| {
            r.expect("countdown failed");
            eprintln!("job {count} finished");
        });
    }

    drop(rpc);

    done.recv().unwrap();
    Ok(())
}
