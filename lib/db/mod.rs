//! PostgreSQL: the pool, creating the database when it is missing, and embedded migrations.

use std::sync::Arc;

use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::DatabaseSettings;

pub mod group;
pub mod hosts;
pub mod lease;
pub mod primary;

pub use lease::{Lease, Leases};

/// Failures preparing the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    Url(#[from] hosts::HostsError),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(sqlx::Error),
    #[error("cannot create database {name}: {source}")]
    Create { name: String, source: sqlx::Error },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Whether a failure is the database being away, restarting or overloaded (worth retrying,
/// a 503 at the edge) rather than something wrong with the statement: pool and connection
/// failures, and SQLSTATE classes 08 (connection), 53 (resources), 57 (operator
/// intervention: a cancel, a shutdown) and 40 (serialization, deadlock), and 25006: a write
/// on a server that a failover has just made a standby, until the pool follows the primary.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        _ => e
            .as_database_error()
            .and_then(sqlx::error::DatabaseError::code)
            .is_some_and(|c| {
                c == "25006" || ["08", "53", "57", "40"].iter().any(|p| c.starts_with(p))
            }),
    }
}

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects a pool. Where `database.url` names several servers, the pool connects to the
/// primary and a watcher task moves it when the primary moves (see [`primary`]).
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let targets = targets(settings)?;
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        // No ping before every checkout of a connection: that doubled our round trips. A
        // dead connection fails its statement instead, which every caller treats as transient.
        .test_before_acquire(false);
    if !targets.several() {
        let options = targets.hosts[0].clone();
        return pool.connect_with(options).await.map_err(DbError::Connect);
    }
    let (primary, probes) = primary::Primary::find(targets).await;
    let pool = primary
        .hooks(pool)
        .connect_with(primary.options())
        .await
        .map_err(DbError::Connect)?;
    tokio::spawn(Arc::clone(&primary).watch(pool.clone(), probes, settings.primary_probe_interval));
    Ok(pool)
}

fn targets(settings: &DatabaseSettings) -> Result<hosts::Targets, DbError> {
    let mut targets = hosts::parse(settings.url.expose())?;
    for options in &mut targets.hosts {
        *options = options
            .clone()
            .log_statements(tracing::log::LevelFilter::Trace);
    }
    Ok(targets)
}

/// The maintenance database on the primary (the first server that is not a standby).
async fn maintenance(settings: &DatabaseSettings) -> Result<(String, sqlx::PgConnection), DbError> {
    let targets = targets(settings)?;
    let name = targets.hosts[0]
        .get_database()
        .unwrap_or("postgres")
        .to_owned();
    let mut last = None;
    for options in &targets.hosts {
        match sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await {
            Ok(mut conn) if targets.several() => {
                let standby: Result<bool, _> = sqlx::query_scalar("SELECT pg_is_in_recovery()")
                    .fetch_one(&mut conn)
                    .await;
                match standby {
                    Ok(false) => return Ok((name, conn)),
                    Ok(true) => {}
                    Err(e) => last = Some(e),
                }
            }
            Ok(conn) => return Ok((name, conn)),
            Err(e) => last = Some(e),
        }
    }
    Err(DbError::Connect(last.unwrap_or_else(|| {
        sqlx::Error::Protocol("no server in database.url is the primary".into())
    })))
}

/// Creates the configured database if it does not exist, via the `postgres` maintenance db.
pub async fn create_if_missing(settings: &DatabaseSettings) -> Result<(), DbError> {
    let (name, mut conn) = maintenance(settings).await?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await
        .map_err(DbError::Connect)?;
    if exists.is_none() {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(source) => return Err(DbError::Create { name, source }),
        }
    }
    let _ = conn.close().await;
    Ok(())
}

/// Applies pending migrations (sqlx holds an advisory lock, so concurrent starts are safe).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
