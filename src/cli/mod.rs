//! Subcommands of the `forkrpc` binary.

pub mod bench;
pub mod raw;
pub mod stats;
