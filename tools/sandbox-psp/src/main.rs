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
    /// Where to post webhooks (signed events); one can also be set at runtime with
    /// `POST /v1/sandbox/webhook-endpoint`.
    #[arg(long, env = "SANDBOX_PSP_WEBHOOK_URL", requires = "webhook_secret")]
    webhook_url: Option<String>,
    /// The secret the webhooks are signed with (HMAC-SHA256, the `Psp-Signature` header).
    #[arg(long, env = "SANDBOX_PSP_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    /// How long a new authorization stays capturable, in seconds (card networks: 7 days).
    #[arg(
        long,
        env = "SANDBOX_PSP_AUTHORIZATION_LIFETIME_SECS",
        default_value_t = sandbox_psp::DEFAULT_AUTHORIZATION_LIFETIME.as_secs()
    )]
    authorization_lifetime_secs: u64,
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
    let lifetime = std::time::Duration::from_secs(cli.authorization_lifetime_secs);
    let mut sandbox = sandbox_psp::Sandbox::default().with_authorization_lifetime(lifetime);
    if let (Some(url), Some(secret)) = (cli.webhook_url, cli.webhook_secret) {
        reqwest::Url::parse(&url).with_context(|| format!("bad --webhook-url {url}"))?;
        tracing::info!(url, "webhooks go to this endpoint");
        sandbox = sandbox.with_webhook_endpoint(url, secret);
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        authorization_lifetime_secs = cli.authorization_lifetime_secs,
        "sandbox PSP listening"
    );
    axum::serve(listener, sandbox.router())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")
}
