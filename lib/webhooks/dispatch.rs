//! Sends the messages to the endpoints. Every order process runs a dispatcher; they share the
//! work through PostgreSQL, in two ways.
//!
//! New messages: each endpoint reads the message log from its own cursor (the feed writes a
//! message once, nothing per endpoint). One process at a time reads an endpoint's cursor: it
//! owns the endpoint for a lease (`owner`, `owned_until`), sends a batch, then records in one
//! statement how it went, the cursor moved past it and the lease renewed for another batch.
//! A batch that all arrived is one row of `webhooks.sent` (its codes and latencies as arrays);
//! only a message that failed (or a batch that did not all arrive) gets a delivery row. A
//! process killed mid-batch leaves the endpoint to another when the lease runs out; its batch
//! is sent again (at least once). A dead endpoint's backlog is the distance from its cursor to
//! the log's end: it grows without a write.
//!
//! Retries (and replays): a failed message becomes a delivery row with its next attempt. Any
//! process claims due rows with `FOR UPDATE SKIP LOCKED`, setting `leased_until` past the time
//! the batch can take; the lease is a column no index covers, so a claim is a HOT update.
//! Delivery is at least once; receivers deduplicate by `webhook-id`, which never changes.
//!
//! Each endpoint is a lane of its own: one batch at a time per process, at most
//! `webhooks.max_in_flight_per_endpoint` requests of it in flight, each with a timeout, so a
//! slow or dead endpoint holds its own lane and nobody else's. A failure is retried after
//! `backoff_base × 2^(attempts-1)` (at most `backoff_max`), less up to half of it at random,
//! until `retry_period` has passed since the message was queued. An endpoint that fails
//! several requests in a row is paused the same way (its waiting messages are not each tried
//! against a dead server), and one that failed for a whole `retry_period` is disabled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::Rng;
use sqlx::{FromRow, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::endpoints;
use super::signing;
use super::target::{self, Target};
use crate::config::WebhooksSettings;
use crate::payments::token_seal::TokenSeal;

/// The statement that records a retry batch's outcomes ($1 the endpoint, then one array per
/// column), a macro so the healthy path can put it in a CTE of its one statement.
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

/// The statement that writes the delivery rows of a batch of new messages that did not all
/// arrive, their first attempt recorded ($1 the endpoint, then the columns as `outcomes!`,
/// then $8 when each was queued).
macro_rules! first_outcomes {
    () => {
        "INSERT INTO webhooks.deliveries (endpoint_id, webhook_id, status, attempts,
                                         next_attempt_at, last_status, last_error,
                                         last_latency_ms, queued_at, delivered_at)
         SELECT $1, u.webhook_id,
                CASE u.result WHEN 'delivered' THEN 'delivered'
                              WHEN 'gave_up' THEN 'failed' ELSE 'pending' END,
                1, now() + u.wait_ms * interval '1 millisecond', u.code, u.error, u.latency,
                u.queued_at, CASE WHEN u.result = 'delivered' THEN now() END
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[], $7::int[],
                     $8::timestamptz[])
              AS u(webhook_id, result, wait_ms, code, error, latency, queued_at)
         ON CONFLICT DO NOTHING"
    };
}

/// The statement that moves an endpoint's cursor and renews its lease ($9, $10 the cursor,
/// $11 the lease, $12 this process), if this process still owns it.
macro_rules! advance {
    () => {
        "UPDATE webhooks.endpoints SET cursor_tx = $9::xid8, cursor_id = $10,
             owned_until = now() + $11::interval"
    };
}

/// The dispatcher of one process.
pub struct Dispatcher {
    pub pool: PgPool,
    pub seal: Arc<TokenSeal>,
    pub settings: WebhooksSettings,
    /// This process's name in the endpoints it owns.
    pub id: Uuid,
}

/// A message to send: a claimed retry, or a new message read from the cursor.
#[derive(sqlx::FromRow)]
struct Claimed {
    webhook_id: String,
    /// Shared with its request, not copied into it.
    #[sqlx(try_from = "String")]
    body: bytes::Bytes,
    attempts: i32,
    queued_at: chrono::DateTime<chrono::Utc>,
    url: String,
}

/// A row of a read from an endpoint's cursor: a message, or (all `None`) none after it.
#[derive(sqlx::FromRow)]
struct ReadRow {
    url: String,
    webhook_id: Option<String>,
    body: Option<String>,
    queued_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Its position in the log (a transaction id, as text).
    tx: Option<String>,
    /// The endpoint asked for its type and has no delivery row of it yet.
    wanted: Option<bool>,
}

/// A message read from an endpoint's cursor.
struct Read {
    webhook_id: String,
    body: String,
    queued_at: chrono::DateTime<chrono::Utc>,
    url: String,
    tx: String,
    wanted: bool,
}

/// The messages of a read; `None` when this process does not own the endpoint (no row at
/// all: the endpoint row was not there to read from).
fn read_of(rows: Vec<ReadRow>) -> Option<Vec<Read>> {
    if rows.is_empty() {
        return None;
    }
    Some(
        rows.into_iter()
            .filter_map(|r| {
                Some(Read {
                    webhook_id: r.webhook_id?,
                    body: r.body?,
                    queued_at: r.queued_at?,
                    url: r.url,
                    tx: r.tx?,
                    wanted: r.wanted.unwrap_or(false),
                })
            })
            .collect(),
    )
}

/// What follows a CTE `moved` (the owned endpoint's row: its id, url, events and cursor):
/// the next `limit` messages after the cursor, or one row of `NULL`s if there are none. The
/// limit is written into the statement (one text per limit), so PostgreSQL keeps a plan for
/// each instead of planning every batch afresh; a message is looked up in the endpoint's
/// deliveries one index probe at a time (a sub-select, which is never hashed over the table).
fn read_after(limit: usize) -> String {
    format!(
        "SELECT moved.url, m.webhook_id, m.body, m.created_at AS queued_at, m.tx::text AS tx,
                m.event_type = ANY(moved.events) AND (
                    SELECT d.webhook_id FROM webhooks.deliveries d
                    WHERE d.endpoint_id = moved.endpoint_id AND d.webhook_id = m.webhook_id)
                    IS NULL AS wanted
         FROM moved
         LEFT JOIN LATERAL (
             SELECT * FROM webhooks.messages m
             WHERE (m.tx, m.webhook_id) > (moved.cursor_tx, moved.cursor_id)
               AND m.tx < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY m.tx, m.webhook_id LIMIT {limit}) m ON true
         ORDER BY m.tx, m.webhook_id"
    )
}

/// How one attempt went.
struct Attempt {
    webhook_id: String,
    /// Its number among the delivery's attempts.
    number: i32,
    queued_at: chrono::DateTime<chrono::Utc>,
    status: Option<u16>,
    error: Option<String>,
    latency: Duration,
    /// `delivered`, `failed` (retried later) or `gave_up`.
    result: &'static str,
    /// When a failed one is tried next.
    wait: Duration,
}

/// What a lane sends with: a client that connects to the address its URL was checked at, the
/// URL parsed once, and the endpoint's live secrets as keys.
#[derive(Clone)]
struct Ready {
    client: reqwest::Client,
    url: reqwest::Url,
    signer: signing::Signer,
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
    /// What the lane sends with, when it was made and for which URL.
    ready: Option<(Ready, Instant, String)>,
    /// This process owns the endpoint's cursor until at least then (its lease, counted from
    /// before the statement that set it, so never later than the database's).
    owned_until: Option<Instant>,
}

/// How long a checked address and the opened secrets are trusted before they are read again.
const RECHECK: Duration = Duration::from_secs(10);
/// Failed requests in a row that pause an endpoint.
const PAUSE_AFTER: u32 = 3;
/// Rounds of requests (a slot's worth each) a batch may send.
const ROUNDS: u32 = 4;
/// The most of an endpoint's backlog (of each kind) the gauge counts.
const BACKLOG_COUNTED: i64 = 100_000;
/// Rounds between two reports of the backlog and held-back gauges (5 s at the default poll).
const REPORT_EVERY: u32 = 25;
/// A lease's room beyond its rounds' timeouts: reading, signing, recording.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// The answers of a batch, as the statements that record them bind them.
struct Outcomes<'a> {
    ids: Vec<&'a str>,
    numbers: Vec<i32>,
    codes: Vec<Option<i32>>,
    errors: Vec<Option<&'a str>>,
    latencies: Vec<i32>,
    results: Vec<&'static str>,
    waits: Vec<i64>,
    queued: Vec<chrono::DateTime<chrono::Utc>>,
}

impl<'a> Outcomes<'a> {
    fn of(done: &'a [Attempt]) -> Self {
        Outcomes {
            ids: done.iter().map(|a| a.webhook_id.as_str()).collect(),
            numbers: done.iter().map(|a| a.number).collect(),
            codes: done.iter().map(|a| a.status.map(i32::from)).collect(),
            errors: done.iter().map(|a| a.error.as_deref()).collect(),
            latencies: done
                .iter()
                .map(|a| i32::try_from(a.latency.as_millis()).unwrap_or(i32::MAX))
                .collect(),
            results: done.iter().map(|a| a.result).collect(),
            waits: done
                .iter()
                .map(|a| i64::try_from(a.wait.as_millis()).unwrap_or(i64::MAX))
                .collect(),
            queued: done.iter().map(|a| a.queued_at).collect(),
        }
    }

    /// `sql` with $1 the endpoint and $2..$7 the outcome columns bound.
    fn bind(
        &'a self,
        sql: &'a str,
        endpoint_id: Uuid,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql)
            .bind(endpoint_id)
            .bind(&self.ids)
            .bind(&self.results)
            .bind(&self.waits)
            .bind(&self.codes)
            .bind(&self.errors)
            .bind(&self.latencies)
    }
    /// `sql` with the outcome columns bound as `bind` does, then $8 when each message was
    /// queued, $9 and $10 the cursor, $11 the lease, $12 the owner: a batch of new messages.
    fn bind_fresh<'q>(
        &'q self,
        sql: &'q str,
        endpoint_id: Uuid,
        cursor: &'q Cursor,
        lease: &'q str,
        owner: Uuid,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        self.bind(sql, endpoint_id)
            .bind(&self.queued)
            .bind(&cursor.tx)
            .bind(&cursor.id)
            .bind(lease)
            .bind(owner)
    }
}

/// Where a batch of new messages leaves the cursor.
struct Cursor {
    tx: String,
    id: String,
}

impl Dispatcher {
    /// Sends messages as they come and deliveries as they fall due, until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let mut lanes: HashMap<Uuid, Arc<Lane>> = HashMap::new();
        let mut backlog_at = Instant::now();
        loop {
            if let Err(e) = me.round(&mut lanes, &wake).await {
                tracing::warn!(error = %e, "webhook dispatch round failed");
            }
            if backlog_at.elapsed() >= me.settings.poll_interval * REPORT_EVERY {
                backlog_at = Instant::now();
                me.report_backlog().await;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(me.settings.poll_interval) => {}
            }
        }
        // Another process need not wait for the leases to run out.
        if let Err(e) = sqlx::query(
            "UPDATE webhooks.endpoints SET owner = NULL, owned_until = NULL WHERE owner = $1",
        )
        .bind(me.id)
        .execute(&me.pool)
        .await
        {
            tracing::warn!(error = %e, "webhook endpoints not released; their leases will run out");
        }
    }

    /// Starts a batch for every endpoint with messages or retries due and no batch running.
    async fn round(
        self: &Arc<Self>,
        lanes: &mut HashMap<Uuid, Arc<Lane>>,
        wake: &Arc<Notify>,
    ) -> Result<(), sqlx::Error> {
        let due: Vec<(Uuid, bool, bool)> = sqlx::query_as(
            // One probe of the due index and one of the log per endpoint: a dead endpoint's
            // backlog of thousands costs this no more than an empty one. (The log's probe is
            // ordered as its index is: a bare EXISTS was planned as a scan of every message.)
            "SELECT endpoint_id, retries, fresh FROM (
                 SELECT e.endpoint_id,
                        EXISTS (SELECT 1 FROM webhooks.deliveries d
                                WHERE d.endpoint_id = e.endpoint_id AND d.status = 'pending'
                                  AND d.next_attempt_at <= now()
                                  AND (d.leased_until IS NULL OR d.leased_until <= now()))
                            AS retries,
                        coalesce(e.owned_until IS NULL OR e.owned_until <= now() OR e.owner = $1,
                                 false)
                        AND EXISTS (SELECT 1 FROM (
                                SELECT 1 FROM webhooks.messages m
                                WHERE (m.tx, m.webhook_id) > (e.cursor_tx, e.cursor_id)
                                  AND m.tx < pg_snapshot_xmin(pg_current_snapshot())
                                ORDER BY m.tx, m.webhook_id LIMIT 1) next)
                            AS fresh
                 FROM webhooks.endpoints e
                 WHERE e.status = 'enabled' AND e.deleted_at IS NULL) s
             WHERE retries OR fresh",
        )
        .bind(self.id)
        .fetch_all(&self.pool)
        .await?;
        for (endpoint_id, retries, fresh) in due {
            let lane = lanes.entry(endpoint_id).or_default().clone();
            {
                let Ok(mut state) = lane.state.lock() else {
                    continue;
                };
                if state.running || paused(&state) {
                    continue;
                }
                state.running = true;
            }
            let (me, wake) = (self.clone(), wake.clone());
            tokio::spawn(async move {
                if let Err(e) = me.batch(endpoint_id, &lane, retries, fresh).await {
                    // The leases run out and the messages are sent again: at least once.
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

    /// The due retries of an endpoint, then its new messages, each batch sent and recorded.
    async fn batch(
        &self,
        endpoint_id: Uuid,
        lane: &Lane,
        retries: bool,
        fresh: bool,
    ) -> Result<(), sqlx::Error> {
        if retries {
            self.retries(endpoint_id, lane).await?;
        }
        let stopped = lane.state.lock().map_or(true, |s| paused(&s));
        if fresh && !stopped {
            self.fresh(endpoint_id, lane).await?;
        }
        Ok(())
    }

    /// Claims a batch of an endpoint's due deliveries, sends them, records how they went.
    async fn retries(&self, endpoint_id: Uuid, lane: &Lane) -> Result<(), sqlx::Error> {
        let claimed = self.claim(endpoint_id).await?;
        let done = self.send_all(endpoint_id, lane, &claimed).await;
        let unsent: Vec<String> = claimed[done.len()..]
            .iter()
            .map(|c| c.webhook_id.clone())
            .collect();
        self.record_retries(endpoint_id, &done, &unsent, lane).await
    }

    /// Reads the endpoint's new messages from its cursor (owning it for as long as the batch
    /// can take), sends the ones it asked for, records them and moves the cursor past what
    /// was sent; and again while every one arrives, for up to a poll interval (then the round
    /// looks at its retries too).
    async fn fresh(&self, endpoint_id: Uuid, lane: &Lane) -> Result<(), sqlx::Error> {
        let slots = self.settings.max_in_flight_per_endpoint.max(1);
        let mut rounds = self.rounds_owned(lane);
        if rounds == 0 {
            if !self.take(endpoint_id, lane).await? {
                return Ok(());
            }
            rounds = ROUNDS;
        }
        let started = Instant::now();
        let sql = format!(
            "WITH moved AS (
                 SELECT endpoint_id, url, events, cursor_tx, cursor_id FROM webhooks.endpoints
                 WHERE endpoint_id = $1 AND owner = $2 AND owned_until > now()
                   AND status = 'enabled' AND deleted_at IS NULL)
             {}",
            read_after(rounds as usize * slots)
        );
        let rows: Vec<ReadRow> = sqlx::query_as(&sql)
            .bind(endpoint_id)
            .bind(self.id)
            .fetch_all(&self.pool)
            .await?;
        let mut read = read_of(rows);
        loop {
            let Some(mut batch) = read.take() else {
                owned(lane, None);
                return Ok(());
            };
            if batch.is_empty() {
                return Ok(());
            }
            let claimed: Vec<Claimed> = batch
                .iter_mut()
                .filter(|r| r.wanted)
                .map(|r| Claimed {
                    webhook_id: r.webhook_id.clone(),
                    body: std::mem::take(&mut r.body).into(),
                    attempts: 1,
                    queued_at: r.queued_at,
                    url: r.url.clone(),
                })
                .collect();
            let done = self.send_all(endpoint_id, lane, &claimed).await;
            let Some(cursor) = cursor_after(&batch, done.len()) else {
                return Ok(());
            };
            let Some(next) = self.record_fresh(endpoint_id, &done, &cursor, lane).await? else {
                return Ok(());
            };
            let stopped = lane.state.lock().map_or(true, |s| paused(&s));
            if stopped || started.elapsed() >= self.settings.poll_interval {
                return Ok(());
            }
            read = Some(next);
        }
    }

    /// Rounds of requests this process may still send under its lease on the endpoint.
    fn rounds_owned(&self, lane: &Lane) -> u32 {
        let Some(until) = lane.state.lock().ok().and_then(|s| s.owned_until) else {
            return 0;
        };
        let left = until
            .saturating_duration_since(Instant::now())
            .saturating_sub(LEASE_MARGIN);
        let per_round = self.settings.timeout.as_millis().max(1);
        u32::try_from(left.as_millis() / per_round)
            .unwrap_or(ROUNDS)
            .min(ROUNDS)
    }

    /// Owns the endpoint for a whole batch if no other process does; answers whether it does.
    async fn take(&self, endpoint_id: Uuid, lane: &Lane) -> Result<bool, sqlx::Error> {
        let lease = self.settings.timeout * ROUNDS + LEASE_MARGIN;
        let before = Instant::now();
        let taken = sqlx::query(
            "UPDATE webhooks.endpoints SET owner = $2, owned_until = now() + $3::interval
             WHERE endpoint_id = $1 AND status = 'enabled' AND deleted_at IS NULL
               AND (owner = $2 OR owned_until IS NULL OR owned_until <= now())",
        )
        .bind(endpoint_id)
        .bind(self.id)
        .bind(millis(lease))
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        owned(lane, taken.then_some(before + lease));
        Ok(taken)
    }

    /// Sends a batch a slot's worth at a time; a pause of the endpoint stops it between them.
    /// The attempts made, in order (the batch's first ones).
    async fn send_all(&self, endpoint_id: Uuid, lane: &Lane, claimed: &[Claimed]) -> Vec<Attempt> {
        let Some(url) = claimed.first().map(|c| c.url.clone()) else {
            return Vec::new();
        };
        let slots = self.settings.max_in_flight_per_endpoint.max(1);
        let ready = self.prepare(endpoint_id, lane, &url).await;
        let mut done: Vec<Attempt> = Vec::with_capacity(claimed.len());
        for chunk in claimed.chunks(slots) {
            let attempts = join_all(chunk.iter().map(|c| self.one(&ready, c))).await;
            let mut paused = false;
            for attempt in attempts {
                paused |= self.note(lane, &attempt);
                done.push(attempt);
            }
            if paused {
                break;
            }
        }
        done
    }

    /// One attempt with what the lane sends with, or the reason there is none.
    async fn one(&self, ready: &Result<Ready, String>, c: &Claimed) -> Attempt {
        match ready {
            Ok(ready) => self.send(ready, c).await,
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

    /// Takes a batch of an endpoint's due deliveries, leased for as long as sending them may
    /// take.
    async fn claim(&self, endpoint_id: Uuid) -> Result<Vec<Claimed>, sqlx::Error> {
        let n = self.settings.max_in_flight_per_endpoint.max(1) * ROUNDS as usize;
        let lease = self.settings.timeout * ROUNDS + LEASE_MARGIN;
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
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await
    }

    /// What the lane sends with (its client pinned to the address its URL was checked at, the
    /// URL parsed, its secrets as keys), made again when old or when the URL changed.
    async fn prepare(&self, endpoint_id: Uuid, lane: &Lane, url: &str) -> Result<Ready, String> {
        let cached = lane.state.lock().ok().and_then(|s| {
            let (ready, at, for_url) = s.ready.as_ref()?;
            (for_url == url && at.elapsed() < RECHECK).then(|| ready.clone())
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
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let signer = signing::Signer::new(&refs).map_err(|e| format!("secret: {e}"))?;
        let ready = Ready {
            client,
            url: parsed,
            signer,
        };
        if let Ok(mut state) = lane.state.lock() {
            state.ready = Some((ready.clone(), Instant::now(), url.to_owned()));
        }
        Ok(ready)
    }

    /// One request.
    async fn send(&self, ready: &Ready, c: &Claimed) -> Attempt {
        let started = Instant::now();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = ready.signer.sign(&c.webhook_id, timestamp, &c.body);
        let request = ready
            .client
            .post(ready.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &c.webhook_id)
            .header("webhook-timestamp", timestamp)
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
            queued_at: c.queued_at,
            status,
            error,
            latency,
            result,
            wait: backoff(&self.settings, c.attempts),
        }
    }

    /// Writes a retry batch's attempts and what comes next for each; the ones not sent (the
    /// endpoint was paused) wait for the pause, their attempt not counted.
    async fn record_retries(
        &self,
        endpoint_id: Uuid,
        done: &[Attempt],
        unsent: &[String],
        lane: &Lane,
    ) -> Result<(), sqlx::Error> {
        let outcomes = Outcomes::of(done);
        if !done.is_empty() && unsent.is_empty() && done.iter().all(|a| a.result == "delivered") {
            // The healthy endpoint's every batch: one statement, no transaction around it.
            let sql = concat!(
                "WITH recorded AS (",
                outcomes!(),
                ") UPDATE webhooks.endpoints SET failing_since = NULL
                   WHERE endpoint_id = $1 AND failing_since IS NOT NULL"
            );
            outcomes.bind(sql, endpoint_id).execute(&self.pool).await?;
            Self::recorded(endpoint_id, done, false);
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        Self::failed_attempts(&mut tx, endpoint_id, &outcomes).await?;
        outcomes
            .bind(outcomes!(), endpoint_id)
            .execute(&mut *tx)
            .await?;
        release_unsent(&mut tx, endpoint_id, unsent, lane).await?;
        let disabled = self.endpoint_health(&mut tx, endpoint_id, done).await?;
        tx.commit().await?;
        Self::recorded(endpoint_id, done, disabled);
        Ok(())
    }

    /// Records a batch of new messages and moves the endpoint's cursor past it, renewing the
    /// lease for another batch. When every one arrived this is one statement, writing one row
    /// for the batch and reading the next batch (`Some`; its messages, none if this process
    /// lost the endpoint); after a failure, `None`.
    async fn record_fresh(
        &self,
        endpoint_id: Uuid,
        done: &[Attempt],
        cursor: &Cursor,
        lane: &Lane,
    ) -> Result<Option<Vec<Read>>, sqlx::Error> {
        let outcomes = Outcomes::of(done);
        // Renewed for a whole batch, as `take` leases it: the next read is a whole batch too,
        // so a busy endpoint costs a statement per `ROUNDS` × slots messages, not per slot.
        let lease = self.settings.timeout * ROUNDS + LEASE_MARGIN;
        let lease_text = millis(lease);
        let before = Instant::now();
        let batch = self.settings.max_in_flight_per_endpoint.max(1) * ROUNDS as usize;
        if done.iter().all(|a| a.result == "delivered") {
            // No delivery row per message: the batch is one row of `webhooks.sent`, written
            // only if the cursor moved (a process that lost the endpoint records nothing; the
            // new owner sends these again from where the batch began).
            let sql = format!(
                "WITH moved AS (
                     UPDATE webhooks.endpoints SET cursor_tx = $5::xid8, cursor_id = $6,
                         owned_until = now() + $7::interval,
                         failing_since = CASE WHEN cardinality($2::text[]) > 0 THEN NULL
                                              ELSE failing_since END
                     WHERE endpoint_id = $1 AND owner = $8
                     RETURNING endpoint_id, url, events, cursor_tx, cursor_id),
                 recorded AS (
                     INSERT INTO webhooks.sent (endpoint_id, last_tx, last_id, ids, codes,
                                                latencies)
                     SELECT endpoint_id, cursor_tx, cursor_id, $2::text[], $3::int[], $4::int[]
                     FROM moved WHERE cardinality($2::text[]) > 0)
                 {}",
                read_after(batch)
            );
            let rows = sqlx::query(&sql)
                .bind(endpoint_id)
                .bind(&outcomes.ids)
                .bind(&outcomes.codes)
                .bind(&outcomes.latencies)
                .bind(&cursor.tx)
                .bind(&cursor.id)
                .bind(&lease_text)
                .bind(self.id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(ReadRow::from_row)
                .collect::<Result<Vec<_>, _>>()?;
            Self::recorded(endpoint_id, done, false);
            // Not owned any more (the lease ran out and another took it): that one goes on
            // from where this batch began, so these messages were sent twice, never lost.
            owned(lane, (!rows.is_empty()).then_some(before + lease));
            return Ok(Some(read_of(rows).unwrap_or_default()));
        }
        let mut tx = self.pool.begin().await?;
        Self::failed_attempts(&mut tx, endpoint_id, &outcomes).await?;
        let sql = concat!(
            "WITH recorded AS (",
            first_outcomes!(),
            ") ",
            advance!(),
            " WHERE endpoint_id = $1 AND owner = $12"
        );
        let moved = outcomes
            .bind_fresh(sql, endpoint_id, cursor, &lease_text, self.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let disabled = self.endpoint_health(&mut tx, endpoint_id, done).await?;
        tx.commit().await?;
        Self::recorded(endpoint_id, done, disabled);
        owned(lane, (moved == 1).then_some(before + lease));
        Ok(None)
    }

    /// Keeps a row per failed attempt: a success is the delivery row itself (log.rs shows it).
    async fn failed_attempts(
        tx: &mut sqlx::PgConnection,
        endpoint_id: Uuid,
        o: &Outcomes<'_>,
    ) -> Result<(), sqlx::Error> {
        if o.results.iter().all(|r| *r == "delivered") {
            return Ok(());
        }
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
        .bind(&o.ids)
        .bind(&o.numbers)
        .bind(&o.codes)
        .bind(&o.errors)
        .bind(&o.latencies)
        .bind(&o.results)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Counts what a recorded batch did.
    fn recorded(endpoint_id: Uuid, done: &[Attempt], disabled: bool) {
        let endpoint = endpoint_id.to_string();
        for a in done {
            crate::metrics::webhook_attempt(&endpoint, a.result, a.latency.as_secs_f64());
        }
        if disabled {
            tracing::error!(endpoint = %endpoint_id, "webhook endpoint disabled: it failed for the whole retry period");
            crate::metrics::webhook_endpoint_disabled();
        }
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
        .bind(millis(self.settings.retry_period))
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

    /// Each endpoint's messages not yet delivered (waiting retries and the log past its
    /// cursor), as gauges, and how long committed messages have waited behind an open
    /// transaction. Each part of a backlog is counted up to `BACKLOG_COUNTED`: a dead
    /// endpoint's backlog grows for days, and every process counts it every few seconds.
    async fn report_backlog(&self) {
        let rows: Result<Vec<(Uuid, i64)>, _> = sqlx::query_as(
            "SELECT e.endpoint_id,
                    (SELECT count(*) FROM (SELECT 1 FROM webhooks.deliveries d
                     WHERE d.endpoint_id = e.endpoint_id AND d.status = 'pending'
                     LIMIT $1) p)
                    + CASE WHEN e.status = 'enabled' THEN
                          (SELECT count(*) FROM (SELECT 1 FROM webhooks.messages m
                           WHERE (m.tx, m.webhook_id) > (e.cursor_tx, e.cursor_id)
                             AND m.event_type = ANY(e.events)
                           LIMIT $1) f)
                      ELSE 0 END
             FROM webhooks.endpoints e WHERE e.deleted_at IS NULL",
        )
        .bind(BACKLOG_COUNTED)
        .fetch_all(&self.pool)
        .await;
        for (endpoint, pending) in rows.unwrap_or_default() {
            crate::metrics::webhook_backlog(&endpoint.to_string(), pending);
        }
        // A committed message at or past the oldest running transaction is one no cursor may
        // read yet: its age is how long a transaction left open somewhere on the server has
        // held every endpoint back (README, "Merchant webhooks"). One probe of the log's index.
        let held: Result<Option<f64>, _> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - m.created_at)::float8 FROM webhooks.messages m
             WHERE m.tx >= pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY m.tx, m.webhook_id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await;
        if let Ok(held) = held {
            crate::metrics::webhook_held(held.unwrap_or(0.0).max(0.0));
        }
    }
}

/// The lane is paused (its endpoint failed several requests in a row).
fn paused(state: &LaneState) -> bool {
    state.paused_until.is_some_and(|t| t > Instant::now())
}

/// Notes until when this process owns the lane's endpoint (`None`: it does not).
fn owned(lane: &Lane, until: Option<Instant>) {
    if let Ok(mut state) = lane.state.lock() {
        state.owned_until = until;
    }
}

/// Where a batch leaves the cursor: past every message read, up to the first one wanted that
/// a pause left unsent (`sent` of the wanted ones were).
fn cursor_after(batch: &[Read], sent: usize) -> Option<Cursor> {
    let mut cursor = None;
    let mut counted = 0;
    for r in batch {
        if r.wanted {
            if counted == sent {
                break;
            }
            counted += 1;
        }
        cursor = Some(Cursor {
            tx: r.tx.clone(),
            id: r.webhook_id.clone(),
        });
    }
    cursor
}

/// A duration as PostgreSQL's interval text.
fn millis(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
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
    .bind(millis(pause))
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
