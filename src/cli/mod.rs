//! Subcommands of the `forkrpc` binary.

pub mod args;
pub mod bench;
pub mod load;
pub mod raw;
pub mod schedule;
pub mod stats;
