//! `checkout`: run a role, migrate, mint a development token, or decode a saga payload.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use checkout::app::{App, Role};
use checkout::config::Settings;
use checkout::saga::Event;
use checkout::{auth, db, telemetry};

#[derive(Parser)]
#[command(
    name = "checkout",
    version,
    about = "A resilient checkout pipeline on NATS JetStream"
)]
struct Cli {
    /// Log as JSON lines (for log shippers) instead of text.
    #[arg(long, global = true, env = "CHECKOUT_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one role (edge, reserve, authorize, order, compensate, psp) or all of them.
    Run {
        /// edge | reserve | authorize | order | compensate | psp | all
        role: String,
    },
    /// Create the database if missing and apply the embedded migrations.
    Migrate,
    /// Mint a development JWT signed with auth.jwt_secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        admin: bool,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Read a MessagePack saga payload on stdin and print it as JSON
    /// (use with `nats stream view CHECKOUT --translate 'checkout decode'`).
    Decode,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Decode => decode(),
        Command::Token { user, admin, ttl } => {
            let settings = Settings::load()?;
            println!(
                "{}",
                auth::mint(settings.auth.jwt_secret.expose(), &user, admin, ttl)?
            );
            Ok(())
        }
        Command::Migrate => {
            telemetry::init(cli.log_json);
            let settings = Settings::load()?;
            db::create_if_missing(&settings.database).await?;
            let pool = db::connect(&settings.database).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Run { role } => {
            telemetry::init(cli.log_json);
            let settings = Settings::load()?;
            let roles: Vec<Role> = if role == "all" {
                Role::ALL.to_vec()
            } else {
                vec![role.parse::<Role>().map_err(anyhow::Error::msg)?]
            };
            let app = App::build(settings, &roles)
                .await
                .with_context(|| format!("starting {role}"))?;
            let token = app.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: finishing in-flight messages");
                token.cancel();
            });
            app.run_until_stopped()
                .await
                .context("stopped with an error")
        }
    }
}

fn decode() -> Result<()> {
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes)?;
    if bytes.is_empty() {
        bail!("no payload on stdin");
    }
    match Event::decode(&bytes) {
        Ok(event) => println!("{}", serde_json::to_string_pretty(&event)?),
        // Not one of ours (or a poison message): show it raw rather than fail the viewer.
        Err(e) => match rmp_serde::from_slice::<serde_json::Value>(&bytes) {
            Ok(value) => println!("{}", serde_json::to_string_pretty(&value)?),
            Err(_) => bail!("not a MessagePack payload: {e}"),
        },
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
