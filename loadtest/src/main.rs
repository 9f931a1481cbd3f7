//! `tutti-load`: the load-test harness for Tutti. `tutti-load run SCENARIO.toml`
//! drives a running server (`--target`) or one it starts (`--spawn`), prints a
//! progress line and a final table with PASS/FAIL per SLO, writes JSON, `.hgrm`
//! and SVG reports on request, and exits non-zero when an SLO fails.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tutti_load::app::{RunArgs, run};

mod impair;

#[derive(Parser)]
#[command(
    name = "tutti-load",
    version,
    about = "Load tests for Tutti: scenarios, SLO verdicts, HDR percentiles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once, at start-up: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a scenario file and judge it against its SLOs.
    Run(RunArgs),
    /// Forward IP packets between two TUN devices with loss, delay, jitter and
    /// reordering: a network impairment for benchmarks (loadtest/impair/README.md).
    Impair(impair::ImpairArgs),
}

// mimalloc, as in the server: the generator's QUIC clients allocate per packet and
// per frame too, and on the shared-cores setup every cycle the generator spends is
// one the server cannot (docs/BENCHMARKS.md, "What each change bought").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TUTTI_LOAD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Impair(args) => return impair::main(args),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
