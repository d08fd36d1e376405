//! `checkout-bench`: drives the real pipeline over HTTP and compares it with this machine's
//! own ceiling measured in the same run (raw JetStream publishes, raw PostgreSQL commits).
//!
//! By default it starts everything itself: a nats-server per run (with `sync_interval` at its
//! default and at `always`), a fresh database, and each role as its own process (1 and 2
//! processes per consumer role), so CPU per checkout can be read per process. The `checkout`
//! and `sandbox-psp` binaries it starts are the ones built beside it.

mod bench;
mod ceiling;
mod load;
mod procs;
mod receivers;
mod stats;

use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let options = bench::BenchOptions::parse().resolved();
    checkout::telemetry::init(false);
    let settings = checkout::config::Settings::load()?;
    bench::run(settings, options).await?;
    Ok(())
}
