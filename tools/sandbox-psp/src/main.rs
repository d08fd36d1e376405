//! `sandbox-psp`: the sandbox payment provider as its own process, as a real provider is.

use anyhow::{Context, Result};
use clap::Parser;

// The benchmark reads this process's CPU beside the service's; the same allocator keeps the
// comparison about the code, not about malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sandbox-psp",
    version,
    about = "A Stripe-like sandbox payment provider"
)]
struct Cli {
    /// Where to listen (the service's `psp.url` points here).
    #[arg(long, env = "SANDBOX_PSP_LISTEN", default_value = "127.0.0.1:8090")]
    listen: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "sandbox PSP listening");
    axum::serve(listener, sandbox_psp::Sandbox::default().router())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")
}
