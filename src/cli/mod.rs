//! Subcommands of the `forkrpc` binary.

/// `println!` for the report: a closed stdout ends it quietly (see `out`).
macro_rules! outln {
    ($($arg:tt)*) => {
        crate::cli::out::line(format_args!($($arg)*))
    };
}

pub mod args;
pub mod bench;
pub mod load;
pub mod out;
pub mod raw;
pub mod schedule;
pub mod stats;
