//! Sends the queued deliveries. Every order process runs a dispatcher; they share the work
//! through PostgreSQL: a claim pushes the delivery's `next_attempt_at` past the request's
//! timeout (a lease) with `FOR UPDATE SKIP LOCKED`, so no two processes send one delivery at
//! once, and one killed mid-request leaves it to the next claim. Delivery is at least once;
//! receivers deduplicate by `webhook-id`, which never changes.
//!
//! Each endpoint has its own slots (`webhooks.max_in_flight_per_endpoint` per process) and
//! every request a timeout, so a slow or dead endpoint fills its own slots and nobody else's.
//! A failure is retried after `backoff_base × 2^(attempts-1)` (at most `backoff_max`), less up to
//! half of it at random, until `retry_period` has passed since the delivery was queued; an endpoint whose
//! every attempt failed for a whole `retry_period` is disabled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::endpoints;
use super::signing;
use super::target::{self, Target};
use crate::config::WebhooksSettings;
use crate::payments::token_seal::TokenSeal;

/// The dispatcher of one process.
pub struct Dispatcher {
    pub pool: PgPool,
    pub seal: Arc<TokenSeal>,
    pub settings: WebhooksSettings,
}

/// A claimed delivery.
#[derive(sqlx::FromRow)]
struct Claimed {
    endpoint_id: Uuid,
    webhook_id: String,
    body: String,
    attempts: i32,
    queued_at: chrono::DateTime<chrono::Utc>,
    url: String,
}

/// How one attempt went.
struct Attempt {
    status: Option<u16>,
    error: Option<String>,
    latency: Duration,
}

impl Attempt {
    fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// An endpoint's slots and its HTTP client, pinned to the address its URL was checked at.
struct Lane {
    slots: Arc<Semaphore>,
    client: Option<(reqwest::Client, Instant, String)>,
}

/// How long a checked address is trusted before the name is resolved and checked again.
const RECHECK: Duration = Duration::from_secs(60);

impl Dispatcher {
    /// Sends deliveries as they fall due until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let mut lanes: HashMap<Uuid, Lane> = HashMap::new();
        let mut backlog_at = Instant::now();
        loop {
            if let Err(e) = me.round(&mut lanes).await {
                tracing::warn!(error = %e, "webhook dispatch round failed");
            }
            if backlog_at.elapsed() >= Duration::from_secs(5) {
                backlog_at = Instant::now();
                me.report_backlog().await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(me.settings.poll_interval) => {}
            }
        }
    }

    /// Claims what is due for every endpoint with free slots and sends it.
    async fn round(self: &Arc<Self>, lanes: &mut HashMap<Uuid, Lane>) -> Result<(), sqlx::Error> {
        let due: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT DISTINCT d.endpoint_id FROM webhooks.deliveries d
             JOIN webhooks.endpoints e USING (endpoint_id)
             WHERE d.status = 'pending' AND d.next_attempt_at <= now()
               AND e.status = 'enabled' AND e.deleted_at IS NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        for (endpoint_id,) in due {
            let lane = lanes.entry(endpoint_id).or_insert_with(|| Lane {
                slots: Arc::new(Semaphore::new(
                    self.settings.max_in_flight_per_endpoint.max(1),
                )),
                client: None,
            });
            let free = lane.slots.available_permits();
            if free == 0 {
                continue;
            }
            for claimed in self.claim(endpoint_id, free).await? {
                let Ok(permit) = lane.slots.clone().try_acquire_owned() else {
                    break;
                };
                let client = self.client_for(lane, &claimed.url).await;
                let me = self.clone();
                tokio::spawn(async move {
                    me.deliver(claimed, client).await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    /// Takes up to `n` due deliveries of an endpoint, leasing them past a request's timeout.
    async fn claim(&self, endpoint_id: Uuid, n: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        let lease = self.settings.timeout + Duration::from_secs(5);
        sqlx::query_as(
            "WITH due AS (
                 SELECT endpoint_id, webhook_id FROM webhooks.deliveries
                 WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at <= now()
                 ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE webhooks.deliveries d
             SET next_attempt_at = now() + $3::interval, attempts = d.attempts + 1
             FROM due, webhooks.endpoints e
             WHERE d.endpoint_id = due.endpoint_id AND d.webhook_id = due.webhook_id
               AND e.endpoint_id = d.endpoint_id
             RETURNING d.endpoint_id, d.webhook_id, d.body, d.attempts, d.queued_at, e.url",
        )
        .bind(endpoint_id)
        .bind(i64::try_from(n).unwrap_or(1))
        .bind(format!("{} milliseconds", lease.as_millis()))
        .fetch_all(&self.pool)
        .await
    }

    /// The lane's client, made again when its URL changed or its address check is old.
    async fn client_for(&self, lane: &mut Lane, url: &str) -> Result<reqwest::Client, String> {
        if let Some((client, at, for_url)) = &lane.client {
            if for_url == url && at.elapsed() < RECHECK {
                return Ok(client.clone());
            }
        }
        let parsed = target::parse(url).map_err(|e| e.to_string())?;
        let target = target::resolve(&parsed, self.settings.allow_private_targets)
            .await
            .map_err(|e| e.to_string())?;
        let client = pinned_client(&target, self.settings.timeout).map_err(|e| e.to_string())?;
        lane.client = Some((client.clone(), Instant::now(), url.to_owned()));
        Ok(client)
    }

    /// One attempt, and its record.
    async fn deliver(&self, claimed: Claimed, client: Result<reqwest::Client, String>) {
        let attempt = match client {
            Ok(client) => self.send(&client, &claimed).await,
            Err(error) => Attempt {
                status: None,
                error: Some(error),
                latency: Duration::ZERO,
            },
        };
        if let Err(e) = self.record(&claimed, &attempt).await {
            // The lease runs out and the delivery is tried again: at least once.
            tracing::warn!(error = %e, webhook_id = %claimed.webhook_id, "webhook attempt not recorded");
        }
    }

    async fn send(&self, client: &reqwest::Client, claimed: &Claimed) -> Attempt {
        let started = Instant::now();
        let timestamp = chrono::Utc::now().timestamp();
        let secrets =
            match endpoints::live_secrets(&self.pool, &self.seal, claimed.endpoint_id).await {
                Ok(s) => s,
                Err(e) => {
                    return Attempt {
                        status: None,
                        error: Some(format!("secret: {e}")),
                        latency: started.elapsed(),
                    }
                }
            };
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let signature =
            match signing::signature(&refs, &claimed.webhook_id, timestamp, &claimed.body) {
                Ok(s) => s,
                Err(e) => {
                    return Attempt {
                        status: None,
                        error: Some(e.to_string()),
                        latency: started.elapsed(),
                    }
                }
            };
        let request = client
            .post(&claimed.url)
            .header("content-type", "application/json")
            .header("webhook-id", &claimed.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(claimed.body.clone());
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                drain(response, self.settings.max_response_bytes).await;
                Attempt {
                    status: Some(status),
                    error: None,
                    latency: started.elapsed(),
                }
            }
            Err(e) => Attempt {
                status: None,
                error: Some(without_url(&e)),
                latency: started.elapsed(),
            },
        }
    }

    /// Writes the attempt, and what comes next: delivered, another try later, or given up.
    async fn record(&self, claimed: &Claimed, attempt: &Attempt) -> Result<(), sqlx::Error> {
        let (id, webhook) = (claimed.endpoint_id, &claimed.webhook_id);
        let latency_ms = i32::try_from(attempt.latency.as_millis()).unwrap_or(i32::MAX);
        let now = chrono::Utc::now();
        let period =
            chrono::Duration::from_std(self.settings.retry_period).unwrap_or(chrono::Duration::MAX);
        let result = if attempt.delivered() {
            "delivered"
        } else if now - claimed.queued_at >= period {
            "gave_up"
        } else {
            "failed"
        };
        let wait = backoff(&self.settings, claimed.attempts);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO webhooks.attempts (endpoint_id, webhook_id, attempt, status_code, error,
                                            latency_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(webhook)
        .bind(claimed.attempts)
        .bind(attempt.status.map(i32::from))
        .bind(&attempt.error)
        .bind(latency_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhooks.deliveries SET
                 status = CASE $3 WHEN 'delivered' THEN 'delivered'
                                  WHEN 'gave_up' THEN 'failed' ELSE 'pending' END,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() END,
                 next_attempt_at = now() + $4::interval,
                 last_status = $5, last_error = $6, last_latency_ms = $7
             WHERE endpoint_id = $1 AND webhook_id = $2 AND status = 'pending'",
        )
        .bind(id)
        .bind(webhook)
        .bind(result)
        .bind(format!("{} milliseconds", wait.as_millis()))
        .bind(attempt.status.map(i32::from))
        .bind(&attempt.error)
        .bind(latency_ms)
        .execute(&mut *tx)
        .await?;
        let disabled = self.endpoint_health(&mut tx, claimed, result).await?;
        tx.commit().await?;
        crate::metrics::webhook_attempt(&id.to_string(), result, attempt.latency.as_secs_f64());
        if disabled {
            tracing::error!(endpoint = %id, "webhook endpoint disabled: it failed for the whole retry period");
            crate::metrics::webhook_endpoint_disabled();
        }
        Ok(())
    }

    /// Keeps `failing_since` (cleared by a success) and disables an endpoint failing longer
    /// than the retry period, or that just gave up a delivery without a success since that
    /// delivery's first attempt. Answers whether this attempt disabled it.
    async fn endpoint_health(
        &self,
        tx: &mut sqlx::PgConnection,
        claimed: &Claimed,
        result: &str,
    ) -> Result<bool, sqlx::Error> {
        let id = claimed.endpoint_id;
        if result == "delivered" {
            sqlx::query(
                "UPDATE webhooks.endpoints SET failing_since = NULL
                 WHERE endpoint_id = $1 AND failing_since IS NOT NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            return Ok(false);
        }
        let before: Option<(String,)> = sqlx::query_as(
            "SELECT status FROM webhooks.endpoints WHERE endpoint_id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let after: Option<(String,)> = sqlx::query_as(
            "UPDATE webhooks.endpoints SET
                 failing_since = coalesce(failing_since, now()),
                 status = CASE WHEN failing_since < now() - $2::interval
                                    OR ($3 AND failing_since <= (
                                        SELECT min(at) FROM webhooks.attempts a
                                        WHERE a.endpoint_id = $1 AND a.webhook_id = $4))
                               THEN 'disabled' ELSE status END
             WHERE endpoint_id = $1
             RETURNING status",
        )
        .bind(id)
        .bind(format!(
            "{} milliseconds",
            self.settings.retry_period.as_millis()
        ))
        .bind(result == "gave_up")
        .bind(&claimed.webhook_id)
        .fetch_optional(&mut *tx)
        .await?;
        let disabled = matches!((before, after), (Some((b,)), Some((a,))) if b == "enabled" && a == "disabled");
        if disabled {
            sqlx::query(
                "UPDATE webhooks.endpoints SET disabled_reason = 'failing for the whole retry period'
                 WHERE endpoint_id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        Ok(disabled)
    }

    /// Each endpoint's deliveries not yet delivered, as gauges.
    async fn report_backlog(&self) {
        let rows: Result<Vec<(Uuid, i64)>, _> = sqlx::query_as(
            "SELECT e.endpoint_id, count(d.webhook_id) FROM webhooks.endpoints e
             LEFT JOIN webhooks.deliveries d
                    ON d.endpoint_id = e.endpoint_id AND d.status = 'pending'
             WHERE e.deleted_at IS NULL GROUP BY e.endpoint_id",
        )
        .fetch_all(&self.pool)
        .await;
        for (endpoint, pending) in rows.unwrap_or_default() {
            crate::metrics::webhook_backlog(&endpoint.to_string(), pending);
        }
    }
}

/// The wait before the next attempt after `attempts` attempts: exponential, capped, less up to
/// half at random (so an endpoint coming back is not hit by every retry at once).
fn backoff(settings: &WebhooksSettings, attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let ceiling = settings
        .backoff_base
        .saturating_mul(2u32.saturating_pow(exp))
        .min(settings.backoff_max);
    let millis = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
}

/// A client that connects to the checked address only, follows no redirect and gives up
/// after the timeout.
fn pinned_client(target: &Target, timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .resolve(&target.host, target.addr)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent("checkout-webhooks/1")
        .build()
}

/// Reads at most `limit` bytes of the answer (its status is what counts).
async fn drain(mut response: reqwest::Response, limit: usize) {
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        read += chunk.len();
        if read >= limit {
            break;
        }
    }
}

/// A request error without the URL (it may carry a token the shop put in its path).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let text = e.to_string();
    let text = match e.url() {
        Some(url) => text.replace(url.as_str(), "<endpoint>"),
        None => text,
    };
    format!("{kind}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhooksSettings {
        WebhooksSettings {
            allow_private_targets: true,
            timeout: Duration::from_secs(10),
            retry_period: Duration::from_secs(3 * 86_400),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            max_in_flight_per_endpoint: 4,
            poll_interval: Duration::from_millis(200),
            max_response_bytes: 65_536,
        }
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        let s = settings();
        for _ in 0..50 {
            let first = backoff(&s, 1);
            assert!(first >= Duration::from_millis(2500) && first <= Duration::from_secs(5));
            let fourth = backoff(&s, 4);
            assert!(fourth >= Duration::from_secs(20) && fourth <= Duration::from_secs(40));
            assert!(backoff(&s, 40) <= Duration::from_secs(3600));
        }
    }
}
