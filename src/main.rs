//! The `forkrpc` command: benchmarks of the workloads in BENCHMARKS.md,
//! run on the built-in echo worker against a raw socketpair baseline.

mod cli;

// glibc malloc pays heavily for frees on another thread than the allocation
// (every call crosses from the caller to the driver thread); mimalloc does not.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// Exit status: some calls of `load` failed, went unanswered or were missed.
const CALLS_FAILED: i32 = 3;

#[derive(Parser)]
#[command(
    name = "forkrpc",
    version,
    about = "Offload jobs to forked worker processes",
    after_help = "Exit status: 0 success; 1 the run could not be carried out (a worker or \
                  the template could not start, I/O failed); 2 bad usage (an unknown or \
                  malformed option, named in the message); 3 `load`: some calls failed, \
                  went unanswered or were missed (the rate was not held)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark workloads (W1..W7) with raw baselines.
    Bench(cli::bench::BenchArgs),
    /// Offer calls at a fixed rate to a pool (open loop) and report latency
    /// from the intended send times, beside a raw socketpair baseline on
    /// the same schedule; exits with 3 if any call failed or was missed.
    Load(cli::load::LoadArgs),
}

fn main() {
    // First thing: fork the template while this process is single-threaded.
    if let Err(e) = forkrpc::init() {
        eprintln!("forkrpc: {e}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Bench(a) => cli::bench::run(a).map(|()| true),
        Command::Load(a) => cli::load::run(a),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(CALLS_FAILED),
        Err(e) => {
            eprintln!("forkrpc: {e}");
            std::process::exit(1);
        }
    }
}
