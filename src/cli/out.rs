//! The command's report on stdout. A reader that goes away early
//! (`forkrpc bench | head -1`) is no error: what is left of the report is
//! dropped and the run carries on to its end (workers stopped, the usual
//! exit status). Any other failure to write (a full disk) is reported once
//! on stderr, and the report stops there too.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Nothing more is written: the reader left, or writing failed.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Writes one line of the report (what `outln!` expands to).
pub fn line(args: std::fmt::Arguments<'_>) {
    if STOPPED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}").and_then(|()| out.flush()) {
        STOPPED.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            eprintln!("forkrpc: cannot write the report: {e}");
        }
    }
}
