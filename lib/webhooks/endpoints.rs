//! The shop's webhook endpoints: where each order event type goes, and the secrets that sign
//! it (sealed at rest with `payments.token_keys`, like payment tokens).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::signing::{self, BadSecret};
use crate::payments::token_seal::{SealError, TokenSeal};

/// The event types an endpoint may ask for.
pub const EVENT_TYPES: [&str; 5] = [
    "order.confirmed",
    "order.failed",
    "order.shipped",
    "order.cancelled",
    "order.refunded",
];

/// Why a secret could not be made, sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Bad(#[from] BadSecret),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// An endpoint as the admin API shows it (never its secrets).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Endpoint {
    pub endpoint_id: Uuid,
    pub url: String,
    pub description: String,
    pub events: Vec<String>,
    pub status: String,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "endpoint_id, url, description, events, status, disabled_reason,
    failing_since, created_at";

/// Registers an endpoint; answers it with its new secret (shown once).
pub async fn create(
    pool: &PgPool,
    seal: &TokenSeal,
    url: &str,
    events: &[String],
    description: &str,
) -> Result<(Endpoint, String), SecretError> {
    let secret = signing::new_secret()?;
    let endpoint: Endpoint = sqlx::query_as(&format!(
        "INSERT INTO webhooks.endpoints (endpoint_id, url, description, events, secret)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(url)
    .bind(description)
    .bind(events)
    .bind(seal.seal(&secret)?)
    .fetch_one(pool)
    .await?;
    Ok((endpoint, secret))
}

/// Every endpoint not deleted, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM webhooks.endpoints WHERE deleted_at IS NULL
         ORDER BY created_at, endpoint_id"
    ))
    .fetch_all(pool)
    .await
}

/// One endpoint, unless deleted.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM webhooks.endpoints WHERE endpoint_id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Deletes an endpoint: nothing more is sent to it (its delivery log stays).
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    // Its waiting deliveries end with it (failed, so the pruner takes them in time); a batch
    // in flight records nothing over them (its outcome only moves pending ones).
    let (deleted,): (i64,) = sqlx::query_as(
        "WITH gone AS (
             UPDATE webhooks.endpoints SET deleted_at = now(), status = 'disabled',
                 disabled_reason = 'deleted'
             WHERE endpoint_id = $1 AND deleted_at IS NULL
             RETURNING endpoint_id),
         ended AS (
             UPDATE webhooks.deliveries d SET status = 'failed', leased_until = NULL,
                 last_error = 'endpoint deleted'
             FROM gone WHERE d.endpoint_id = gone.endpoint_id AND d.status = 'pending')
         SELECT count(*) FROM gone",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    Ok(deleted == 1)
}

/// Gives an endpoint a new secret; the old one keeps signing beside it for `overlap`.
pub async fn rotate(
    pool: &PgPool,
    seal: &TokenSeal,
    id: Uuid,
    overlap: Duration,
) -> Result<Option<String>, SecretError> {
    let secret = signing::new_secret()?;
    let rotated = sqlx::query(
        "UPDATE webhooks.endpoints SET previous_secret = secret, secret = $2,
             previous_until = now() + $3::interval
         WHERE endpoint_id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(seal.seal(&secret)?)
    .bind(format!("{} milliseconds", overlap.as_millis()))
    .execute(pool)
    .await?;
    Ok((rotated.rows_affected() == 1).then_some(secret))
}

/// Turns an endpoint off by hand (its receiver down for maintenance, say): nothing is sent
/// to it until it is enabled again. Its waiting retries wait with it (their retry period
/// runs on); what comes meanwhile is a replay away, as for an endpoint disabled for failing.
/// Disabling a disabled endpoint keeps the reason it has. Answers the endpoint as it is now,
/// `None` if there is none.
pub async fn disable(pool: &PgPool, id: Uuid) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE webhooks.endpoints SET status = 'disabled',
             disabled_reason = CASE WHEN status = 'disabled' THEN disabled_reason
                                    ELSE 'disabled by an admin' END
         WHERE endpoint_id = $1 AND deleted_at IS NULL
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Turns an endpoint back on (after it was disabled for failing, or by hand). It reads the
/// messages from now on, as a new endpoint does: what it missed while disabled is a replay
/// away. Answers the endpoint as it is now, `None` if there is none.
pub async fn enable(pool: &PgPool, id: Uuid) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE webhooks.endpoints SET status = 'enabled', disabled_reason = NULL,
             failing_since = NULL,
             cursor_tx = CASE WHEN status = 'disabled'
                              THEN pg_snapshot_xmin(pg_current_snapshot()) ELSE cursor_tx END,
             cursor_id = CASE WHEN status = 'disabled' THEN '' ELSE cursor_id END
         WHERE endpoint_id = $1 AND deleted_at IS NULL
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// The secrets that sign an endpoint's messages now (the newest first).
pub async fn live_secrets(
    pool: &PgPool,
    seal: &TokenSeal,
    id: Uuid,
) -> Result<Vec<String>, SecretError> {
    let row: Option<(String, Option<String>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT secret, previous_secret, previous_until FROM webhooks.endpoints
         WHERE endpoint_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some((secret, previous, until)) = row else {
        return Ok(Vec::new());
    };
    let mut secrets = vec![seal.open(&secret)?];
    if let (Some(previous), Some(until)) = (previous, until) {
        if until > Utc::now() {
            secrets.push(seal.open(&previous)?);
        }
    }
    Ok(secrets)
}
