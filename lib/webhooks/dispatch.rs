//! Sends the queued deliveries. Every order process runs a dispatcher; they share the work
//! through PostgreSQL: a claim takes a batch of an endpoint's due deliveries with
//! `FOR UPDATE SKIP LOCKED` and sets their `leased_until` past the time the batch can take
//! (a lease), so no two processes send one delivery at once, and one killed mid-batch leaves
//! it to the next claim. The lease is a column no index covers, so a claim is a HOT update
//! (no index entries; the table keeps room on its pages for it). Delivery is at least once; receivers deduplicate by `webhook-id`,
//! which never changes.
//!
//! Each endpoint is a lane of its own: one batch at a time per process, at most
//! `webhooks.max_in_flight_per_endpoint` requests of it in flight, each with a timeout, so a
//! slow or dead endpoint holds its own lane and nobody else's. A batch's outcomes are recorded
//! in one transaction (a few statements, whatever its size). A failure is retried after
//! `backoff_base × 2^(attempts-1)` (at most `backoff_max`), less up to half of it at random,
//! until `retry_period` has passed since the delivery was queued. An endpoint that fails
//! several requests in a row is paused the same way (its waiting messages are not each tried
//! against a dead server), and one that failed for a whole `retry_period` is disabled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::endpoints;
use super::signing;
use super::target::{self, Target};
use crate::config::WebhooksSettings;
use crate::payments::token_seal::TokenSeal;

/// The statement that records a batch's outcomes ($1 the endpoint, then one array per column),
/// a macro so the healthy path can put it in a CTE of its one statement.
macro_rules! outcomes {
    () => {
        "UPDATE webhooks.deliveries d SET
             status = CASE u.result WHEN 'delivered' THEN 'delivered'
                                    WHEN 'gave_up' THEN 'failed' ELSE 'pending' END,
             delivered_at = CASE WHEN u.result = 'delivered' THEN now() END,
             next_attempt_at = now() + u.wait_ms * interval '1 millisecond',
             leased_until = NULL,
             last_status = u.code, last_error = u.error, last_latency_ms = u.latency
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[], $7::int[])
              AS u(webhook_id, result, wait_ms, code, error, latency)
         WHERE d.endpoint_id = $1 AND d.webhook_id = u.webhook_id AND d.status = 'pending'"
    };
}

/// The dispatcher of one process.
pub struct Dispatcher {
    pub pool: PgPool,
    pub seal: Arc<TokenSeal>,
    pub settings: WebhooksSettings,
}

/// A claimed delivery.
#[derive(sqlx::FromRow)]
struct Claimed {
    webhook_id: String,
    body: String,
    attempts: i32,
    queued_at: chrono::DateTime<chrono::Utc>,
    url: String,
}

/// How one attempt went.
struct Attempt {
    webhook_id: String,
    /// Its number among the delivery's attempts.
    number: i32,
    status: Option<u16>,
    error: Option<String>,
    latency: Duration,
    /// `delivered`, `failed` (retried later) or `gave_up`.
    result: &'static str,
    /// When a failed one is tried next.
    wait: Duration,
}

/// One endpoint's lane in this process.
#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    /// A batch of it is being sent.
    running: bool,
    /// Not tried until then (it failed several requests in a row).
    paused_until: Option<Instant>,
    failures_in_a_row: u32,
    client: Option<(reqwest::Client, Instant, String)>,
    secrets: Option<(Vec<String>, Instant)>,
}

/// How long a checked address and the opened secrets are trusted before they are read again.
const RECHECK: Duration = Duration::from_secs(10);
/// Failed requests in a row that pause an endpoint.
const PAUSE_AFTER: u32 = 3;

impl Dispatcher {
    /// Sends deliveries as they fall due until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let mut lanes: HashMap<Uuid, Arc<Lane>> = HashMap::new();
        let mut backlog_at = Instant::now();
        loop {
            if let Err(e) = me.round(&mut lanes, &wake).await {
                tracing::warn!(error = %e, "webhook dispatch round failed");
            }
            if backlog_at.elapsed() >= Duration::from_secs(5) {
                backlog_at = Instant::now();
                me.report_backlog().await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(me.settings.poll_interval) => {}
            }
        }
    }

    /// Starts a batch for every endpoint with deliveries due and no batch running.
    async fn round(
        self: &Arc<Self>,
        lanes: &mut HashMap<Uuid, Arc<Lane>>,
        wake: &Arc<Notify>,
    ) -> Result<(), sqlx::Error> {
        let due: Vec<(Uuid,)> = sqlx::query_as(
            // One probe of the due index per endpoint: a dead endpoint's backlog of thousands
            // costs this no more than an empty one.
            "SELECT e.endpoint_id FROM webhooks.endpoints e
             WHERE e.status = 'enabled' AND e.deleted_at IS NULL
               AND EXISTS (SELECT 1 FROM webhooks.deliveries d
                           WHERE d.endpoint_id = e.endpoint_id AND d.status = 'pending'
                             AND d.next_attempt_at <= now()
                             AND (d.leased_until IS NULL OR d.leased_until <= now()))",
        )
        .fetch_all(&self.pool)
        .await?;
        for (endpoint_id,) in due {
            let lane = lanes.entry(endpoint_id).or_default().clone();
            {
                let Ok(mut state) = lane.state.lock() else {
                    continue;
                };
                let paused = state.paused_until.is_some_and(|t| t > Instant::now());
                if state.running || paused {
                    continue;
                }
                state.running = true;
            }
            let (me, wake) = (self.clone(), wake.clone());
            tokio::spawn(async move {
                if let Err(e) = me.batch(endpoint_id, &lane).await {
                    // The leases run out and the deliveries are tried again: at least once.
                    tracing::warn!(error = %e, endpoint = %endpoint_id, "webhook batch not recorded");
                }
                if let Ok(mut state) = lane.state.lock() {
                    state.running = false;
                }
                wake.notify_one();
            });
        }
        Ok(())
    }

    /// Claims a batch of an endpoint's due deliveries, sends them, records how they went.
    async fn batch(&self, endpoint_id: Uuid, lane: &Lane) -> Result<(), sqlx::Error> {
        let slots = self.settings.max_in_flight_per_endpoint.max(1);
        let claimed = self.claim(endpoint_id, slots * 4).await?;
        let Some(url) = claimed.first().map(|c| c.url.clone()) else {
            return Ok(());
        };
        let ready = self.prepare(endpoint_id, lane, &url).await;
        let mut done: Vec<Attempt> = Vec::with_capacity(claimed.len());
        let mut sent = 0;
        // A slot's worth at a time; a paused endpoint stops the batch between them.
        for chunk in claimed.chunks(slots) {
            let attempts = join_all(chunk.iter().map(|c| self.one(&ready, c))).await;
            sent += chunk.len();
            let mut paused = false;
            for attempt in attempts {
                paused |= self.note(lane, &attempt);
                done.push(attempt);
            }
            if paused {
                break;
            }
        }
        let unsent: Vec<String> = claimed[sent..]
            .iter()
            .map(|c| c.webhook_id.clone())
            .collect();
        self.record(endpoint_id, &done, &unsent, lane).await
    }

    /// One attempt with the lane's client and secrets, or the reason there are none.
    async fn one(
        &self,
        ready: &Result<(reqwest::Client, Vec<String>), String>,
        c: &Claimed,
    ) -> Attempt {
        match ready {
            Ok((client, secrets)) => self.send(client, secrets, c).await,
            Err(error) => self.attempt(c, None, Some(error.clone()), Duration::ZERO),
        }
    }

    /// Counts the lane's failures in a row; answers whether the endpoint is now paused.
    fn note(&self, lane: &Lane, attempt: &Attempt) -> bool {
        let Ok(mut state) = lane.state.lock() else {
            return false;
        };
        if attempt.result == "delivered" {
            state.failures_in_a_row = 0;
            state.paused_until = None;
            return false;
        }
        state.failures_in_a_row += 1;
        if state.failures_in_a_row < PAUSE_AFTER {
            return false;
        }
        let wait = backoff(
            &self.settings,
            i32::try_from(state.failures_in_a_row).unwrap_or(30),
        );
        state.paused_until = Some(Instant::now() + wait);
        true
    }

    /// Takes up to `n` due deliveries of an endpoint, leased for as long as sending them may
    /// take.
    async fn claim(&self, endpoint_id: Uuid, n: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        let rounds = u32::try_from(n / self.settings.max_in_flight_per_endpoint.max(1))
            .unwrap_or(1)
            .max(1);
        let lease = self.settings.timeout * rounds + Duration::from_secs(5);
        sqlx::query_as(
            "WITH due AS (
                 SELECT endpoint_id, webhook_id FROM webhooks.deliveries
                 WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at <= now()
                   AND (leased_until IS NULL OR leased_until <= now())
                 ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE webhooks.deliveries d
             SET leased_until = now() + $3::interval, attempts = d.attempts + 1
             FROM due, webhooks.endpoints e, webhooks.messages m
             WHERE d.endpoint_id = due.endpoint_id AND d.webhook_id = due.webhook_id
               AND e.endpoint_id = d.endpoint_id AND m.webhook_id = d.webhook_id
             RETURNING d.webhook_id, m.body, d.attempts, d.queued_at, e.url",
        )
        .bind(endpoint_id)
        .bind(i64::try_from(n).unwrap_or(1))
        .bind(format!("{} milliseconds", lease.as_millis()))
        .fetch_all(&self.pool)
        .await
    }

    /// The lane's client (pinned to the address its URL was checked at) and secrets, read
    /// again when old or when the URL changed.
    async fn prepare(
        &self,
        endpoint_id: Uuid,
        lane: &Lane,
        url: &str,
    ) -> Result<(reqwest::Client, Vec<String>), String> {
        let cached = lane.state.lock().ok().and_then(|s| {
            let (client, at, for_url) = s.client.clone()?;
            let (secrets, read_at) = s.secrets.clone()?;
            (for_url == url && at.elapsed() < RECHECK && read_at.elapsed() < RECHECK)
                .then_some((client, secrets))
        });
        if let Some(ready) = cached {
            return Ok(ready);
        }
        let parsed = target::parse(url).map_err(|e| e.to_string())?;
        let target = target::resolve(&parsed, self.settings.allow_private_targets)
            .await
            .map_err(|e| e.to_string())?;
        let client = pinned_client(&target, self.settings.timeout).map_err(|e| e.to_string())?;
        let secrets = endpoints::live_secrets(&self.pool, &self.seal, endpoint_id)
            .await
            .map_err(|e| format!("secret: {e}"))?;
        if let Ok(mut state) = lane.state.lock() {
            state.client = Some((client.clone(), Instant::now(), url.to_owned()));
            state.secrets = Some((secrets.clone(), Instant::now()));
        }
        Ok((client, secrets))
    }

    /// One request.
    async fn send(&self, client: &reqwest::Client, secrets: &[String], c: &Claimed) -> Attempt {
        let started = Instant::now();
        let timestamp = chrono::Utc::now().timestamp();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let signature = match signing::signature(&refs, &c.webhook_id, timestamp, &c.body) {
            Ok(s) => s,
            Err(e) => return self.attempt(c, None, Some(e.to_string()), started.elapsed()),
        };
        let request = client
            .post(&c.url)
            .header("content-type", "application/json")
            .header("webhook-id", &c.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(c.body.clone());
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                drain(response, self.settings.max_response_bytes).await;
                self.attempt(c, Some(status), None, started.elapsed())
            }
            Err(e) => self.attempt(c, None, Some(without_url(&e)), started.elapsed()),
        }
    }

    /// An attempt's outcome, and what comes next.
    fn attempt(
        &self,
        c: &Claimed,
        status: Option<u16>,
        error: Option<String>,
        latency: Duration,
    ) -> Attempt {
        let period =
            chrono::Duration::from_std(self.settings.retry_period).unwrap_or(chrono::Duration::MAX);
        let result = if status.is_some_and(|s| (200..300).contains(&s)) {
            "delivered"
        } else if chrono::Utc::now() - c.queued_at >= period {
            "gave_up"
        } else {
            "failed"
        };
        Attempt {
            webhook_id: c.webhook_id.clone(),
            number: c.attempts,
            status,
            error,
            latency,
            result,
            wait: backoff(&self.settings, c.attempts),
        }
    }

    /// Writes a batch's attempts and what comes next for each, in one transaction; the ones
    /// not sent (the endpoint was paused) wait for the pause, their attempt not counted.
    async fn record(
        &self,
        endpoint_id: Uuid,
        done: &[Attempt],
        unsent: &[String],
        lane: &Lane,
    ) -> Result<(), sqlx::Error> {
        let ids: Vec<&str> = done.iter().map(|a| a.webhook_id.as_str()).collect();
        let numbers: Vec<i32> = done.iter().map(|a| a.number).collect();
        let codes: Vec<Option<i32>> = done.iter().map(|a| a.status.map(i32::from)).collect();
        let errors: Vec<Option<&str>> = done.iter().map(|a| a.error.as_deref()).collect();
        let latencies: Vec<i32> = done
            .iter()
            .map(|a| i32::try_from(a.latency.as_millis()).unwrap_or(i32::MAX))
            .collect();
        let results: Vec<&str> = done.iter().map(|a| a.result).collect();
        let waits: Vec<i64> = done
            .iter()
            .map(|a| i64::try_from(a.wait.as_millis()).unwrap_or(i64::MAX))
            .collect();
        let outcomes = |sql: &'static str| {
            sqlx::query(sql)
                .bind(endpoint_id)
                .bind(&ids)
                .bind(&results)
                .bind(&waits)
                .bind(&codes)
                .bind(&errors)
                .bind(&latencies)
        };
        let endpoint = endpoint_id.to_string();
        if !done.is_empty() && unsent.is_empty() && done.iter().all(|a| a.result == "delivered") {
            // The healthy endpoint's every batch: one statement, no transaction around it.
            outcomes(concat!(
                "WITH recorded AS (",
                outcomes!(),
                ") UPDATE webhooks.endpoints SET failing_since = NULL
                   WHERE endpoint_id = $1 AND failing_since IS NOT NULL"
            ))
            .execute(&self.pool)
            .await?;
            for a in done {
                crate::metrics::webhook_attempt(&endpoint, a.result, a.latency.as_secs_f64());
            }
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Failed attempts only: a success is the delivery row itself (log.rs shows it).
        if done.iter().any(|a| a.result != "delivered") {
            sqlx::query(
                "INSERT INTO webhooks.attempts (endpoint_id, webhook_id, attempt, status_code, error,
                                                latency_ms)
                 SELECT $1, a.webhook_id, a.attempt, a.code, a.error, a.latency
                 FROM unnest($2::text[], $3::int[], $4::int[], $5::text[], $6::int[], $7::text[])
                      AS a(webhook_id, attempt, code, error, latency, result)
                 WHERE a.result <> 'delivered'
                 ON CONFLICT DO NOTHING",
            )
            .bind(endpoint_id)
            .bind(&ids)
            .bind(&numbers)
            .bind(&codes)
            .bind(&errors)
            .bind(&latencies)
            .bind(&results)
            .execute(&mut *tx)
            .await?;
        }
        outcomes(outcomes!()).execute(&mut *tx).await?;
        release_unsent(&mut tx, endpoint_id, unsent, lane).await?;
        let disabled = self.endpoint_health(&mut tx, endpoint_id, done).await?;
        tx.commit().await?;
        for a in done {
            crate::metrics::webhook_attempt(&endpoint, a.result, a.latency.as_secs_f64());
        }
        if disabled {
            tracing::error!(endpoint = %endpoint_id, "webhook endpoint disabled: it failed for the whole retry period");
            crate::metrics::webhook_endpoint_disabled();
        }
        Ok(())
    }

    /// Keeps `failing_since` (cleared by a success) and disables an endpoint failing longer
    /// than the retry period, or that just gave up a delivery without a success since that
    /// delivery's first attempt. Answers whether this batch disabled it.
    async fn endpoint_health(
        &self,
        tx: &mut sqlx::PgConnection,
        id: Uuid,
        done: &[Attempt],
    ) -> Result<bool, sqlx::Error> {
        if done.iter().any(|a| a.result == "delivered") {
            sqlx::query(
                "UPDATE webhooks.endpoints SET failing_since = NULL
                 WHERE endpoint_id = $1 AND failing_since IS NOT NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            return Ok(false);
        }
        if done.is_empty() {
            return Ok(false);
        }
        let gave_up = done.iter().find(|a| a.result == "gave_up");
        let before: Option<(String,)> = sqlx::query_as(
            "SELECT status FROM webhooks.endpoints WHERE endpoint_id = $1 FOR NO KEY UPDATE",
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
        .bind(gave_up.is_some())
        .bind(gave_up.map(|a| a.webhook_id.as_str()).unwrap_or_default())
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

/// Puts back what a paused batch did not send: due when the pause ends, its attempt not
/// counted.
async fn release_unsent(
    tx: &mut sqlx::PgConnection,
    endpoint_id: Uuid,
    unsent: &[String],
    lane: &Lane,
) -> Result<(), sqlx::Error> {
    if unsent.is_empty() {
        return Ok(());
    }
    let pause = lane
        .state
        .lock()
        .ok()
        .and_then(|s| s.paused_until)
        .map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
    sqlx::query(
        "UPDATE webhooks.deliveries SET next_attempt_at = now() + $3::interval, leased_until = NULL,
             attempts = attempts - 1
         WHERE endpoint_id = $1 AND webhook_id = ANY($2) AND status = 'pending'",
    )
    .bind(endpoint_id)
    .bind(unsent)
    .bind(format!("{} milliseconds", pause.as_millis()))
    .execute(tx)
    .await?;
    Ok(())
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
