//! `checkout`: run a role, migrate, mint a development token, or decode a saga payload.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use checkout::app::{App, Role};
use checkout::config::Settings;
use checkout::saga::Event;
use checkout::{audit, auth, db, telemetry};

// Every process allocates per request and per message (JSON, msgpack, HTTP and NATS buffers);
// glibc's malloc was an eighth of the edge's CPU under load (perf), mimalloc's thread-local
// free lists cost a fraction of it. See docs/benchmarks-history.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run one role (edge, reserve, authorize, order, compensate), several
    /// (comma-separated, e.g. `edge,reserve`), or all of them.
    Run {
        /// edge | reserve | authorize | order | compensate | all, or a comma-separated list
        role: String,
        /// Consume only these saga partitions, e.g. `0,2` (default: all of `nats.partitions`).
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<u32>,
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
    /// Check that every promise held (orders ended, stock matches its ledger, every
    /// authorization is owned, nothing charged twice); exits 1 on any finding. Read-only.
    Audit,
    /// Print which node leads each saga partition; with --spread, move leaders apart first.
    Leaders {
        #[arg(long)]
        spread: bool,
    },
    /// Read a MessagePack saga payload on stdin and print it as JSON
    /// (use with `nats stream view CHECKOUT --translate 'checkout decode'`).
    Decode,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Command::Run { role, partitions } = cli.command {
        let mut settings = Settings::load()?;
        if !partitions.is_empty() {
            settings.nats.own_partitions = partitions;
            settings.check()?;
        }
        let roles = Role::parse_list(&role).map_err(anyhow::Error::msg)?;
        let threads = Role::worker_threads(&roles, &settings.runtime);
        if threads > 0 {
            runtime.worker_threads(threads);
        }
        return runtime
            .build()?
            .block_on(run(cli.log_json, settings, &role, roles));
    }
    runtime.build()?.block_on(command(cli))
}

/// Runs `roles` (named `role` on the command line) until a shutdown signal.
async fn run(log_json: bool, settings: Settings, role: &str, roles: Vec<Role>) -> Result<()> {
    let otlp = (!settings.telemetry.otlp_endpoint.is_empty()).then(|| telemetry::Otlp {
        endpoint: settings.telemetry.otlp_endpoint.clone(),
        service: role.replace(',', "+"),
    });
    // Kept until this returns: dropping it flushes the spans not yet exported.
    let _spans = telemetry::init_with(log_json, otlp);
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

/// Every command but `run`.
async fn command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Decode => decode(),
        Command::Token { user, admin, ttl } => {
            let settings = Settings::load()?;
            println!("{}", auth::mint_for(&settings.auth, &user, admin, ttl)?);
            Ok(())
        }
        Command::Leaders { spread } => {
            telemetry::init(cli.log_json);
            let settings = Settings::load()?;
            let bus = checkout::bus::Bus::connect(&settings.nats).await?;
            bus.ensure_streams().await?;
            let leaders = if spread {
                bus.spread_leaders().await?
            } else {
                bus.stream_leaders()
                    .await?
                    .into_iter()
                    .map(|(stream, leader, _)| (stream, leader))
                    .collect()
            };
            for (stream, leader) in leaders {
                println!("{stream}\t{leader}");
            }
            Ok(())
        }
        Command::Audit => {
            let settings = Settings::load()?;
            let pool = db::connect(&settings.database).await?;
            // Every configured provider's records (the primary's and the fallback's).
            let providers = checkout::payments::provider(&settings)?;
            let report =
                audit::run(&pool, providers.as_ref(), settings.watchdog.pending_limit).await?;
            print!("{report}");
            if !report.ok() {
                std::process::exit(1);
            }
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
        // `main` starts `run` itself, on a runtime sized for its roles.
        Command::Run { .. } => bail!("`run` is started by main"),
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
