//! The edge's outbox: every event the edge owes JetStream (checkout requests; ship, cancel and
//! refund requests) is written to `edge.outbox` in the same transaction as the change that
//! owes it, then published by a task of its own right after the commit. The committed row is the
//! promise, so the request is answered at once: it never waits for NATS, and a NATS outage or
//! a leader election delays the saga, not the buyer's `202`. If the process dies before the
//! publish, or NATS is away, the sweeper republishes the row (same `Nats-Msg-Id`, so never
//! twice).
//!
//! A row whose publish keeps failing while others go through (a payload the server refuses,
//! say) is retried with a doubling delay up to `edge.outbox_max_backoff` and skipped meanwhile,
//! so one bad row never blocks the rest. "Others go through" is any publish of this edge since
//! the sweep before (the sweep's own, or one right after a commit). When none did,
//! NATS itself is away: nothing is counted against the rows, and they go out as soon as it is
//! back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::saga::events::EventKind;
use crate::saga::outgoing::Outgoing;
use crate::saga::subjects::event_subject;

/// Rows whose publish failed this many times are reported as stuck.
const STUCK_AFTER: i32 = 5;

/// Publishes in flight at once, at most: past this (NATS away for a while under load) a
/// committed row waits for the sweeper instead, and memory stays bounded.
const IN_FLIGHT: usize = 4096;

/// Publishes staged events and marks them published.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
    bus: Bus,
    published: mpsc::UnboundedSender<String>,
    /// Permits for publishes in flight (`IN_FLIGHT`).
    in_flight: Arc<Semaphore>,
    /// How many publishes of this edge succeeded: a sweep whose rows fail while this moves
    /// blames the rows, not NATS.
    successes: Arc<AtomicU64>,
}

/// The receiving end of publish confirmations, drained by [`Outbox::run_marker`].
pub struct Marks(mpsc::UnboundedReceiver<String>);

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub published: usize,
    pub failed: usize,
    /// Unpublished rows that have failed at least `STUCK_AFTER` times (all rows, not only
    /// this sweep's).
    pub stuck: i64,
}

/// A staged row, as the sweeper reads it.
#[derive(sqlx::FromRow)]
struct Row {
    msg_id: String,
    subject: String,
    payload: Vec<u8>,
    traceparent: Option<String>,
}

impl Outbox {
    /// The outbox, and the confirmations its marker task records (run it alongside).
    pub fn new(pool: PgPool, bus: Bus) -> (Self, Marks) {
        let (published, marks) = mpsc::unbounded_channel();
        (
            Self {
                pool,
                bus,
                published,
                in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
                successes: Arc::default(),
            },
            Marks(marks),
        )
    }

    /// Writes an event to the outbox inside the caller's transaction. Staging the same
    /// message id again is a no-op.
    pub async fn stage(conn: &mut PgConnection, out: &Outgoing) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO edge.outbox (msg_id, subject, payload, traceparent)
             VALUES ($1, $2, $3, $4) ON CONFLICT (msg_id) DO NOTHING",
        )
        .bind(&out.msg_id)
        .bind(&out.subject)
        .bind(&out.payload)
        .bind(&out.traceparent)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Publishes a committed event in a task of its own, so the caller answers without waiting
    /// for NATS. With `IN_FLIGHT` publishes pending already, the sweeper publishes it later.
    pub fn publish_soon(&self, out: Outgoing) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::debug!(msg_id = %out.msg_id, "publishes backed up; the outbox sweeper will publish it");
            return;
        };
        let outbox = self.clone();
        tokio::spawn(async move {
            outbox.publish(&out).await;
            drop(permit);
        });
    }

    /// Publishes a staged event now; on failure the sweeper publishes it later.
    pub async fn publish(&self, out: &Outgoing) -> bool {
        match self.bus.publish(out).await {
            Ok(()) => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                let _ = self.published.send(out.msg_id.clone());
                true
            }
            Err(e) => {
                tracing::warn!(msg_id = %out.msg_id, error = %e, "publish failed; the outbox will retry");
                false
            }
        }
    }

    /// Marks published rows in batches until shutdown, then marks what is left: one UPDATE
    /// (one commit) per `every` at most, off the request path.
    pub async fn run_marker(self, marks: Marks, every: Duration, shutdown: CancellationToken) {
        let Marks(mut rx) = marks;
        let mut batch = Vec::with_capacity(512);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    while let Ok(id) = rx.try_recv() {
                        batch.push(id);
                    }
                    self.mark(&mut batch).await;
                    return;
                }
                n = rx.recv_many(&mut batch, 4096) => {
                    if n == 0 {
                        return;
                    }
                    // A mark is bookkeeping (a row left unmarked is republished after
                    // outbox_grace, and JetStream drops the duplicate), so marks wait and
                    // share a commit rather than cost the database one per few checkouts.
                    let next = tokio::time::Instant::now() + every;
                    self.mark(&mut batch).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep_until(next) => {}
                    }
                }
            }
        }
    }

    async fn mark(&self, batch: &mut Vec<String>) {
        if batch.is_empty() {
            return;
        }
        let result = sqlx::query(
            "UPDATE edge.outbox SET published_at = now()
             WHERE msg_id = ANY($1) AND published_at IS NULL",
        )
        .bind(&*batch)
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            // Unmarked rows are republished by the sweeper; dedup makes that harmless.
            tracing::warn!(error = %e, "could not mark published outbox rows");
        }
        batch.clear();
    }

    /// Republishes rows whose publish never completed, until shutdown.
    pub async fn run_sweeper(
        self,
        interval: Duration,
        grace: Duration,
        max_backoff: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut successes = self.successes.load(Ordering::Relaxed);
        // When publishes last went through. A row not yet due in the sweep right after others
        // went out is tried again only after `grace`: within that window others still count,
        // or a bad row alone in a quiet shop would never be counted against itself.
        let mut moved_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let unpublished: Result<(i64,), _> =
                sqlx::query_as("SELECT count(*) FROM edge.outbox WHERE published_at IS NULL")
                    .fetch_one(&self.pool)
                    .await;
            if let Ok((rows,)) = unpublished {
                crate::metrics::outbox_unpublished(rows);
            }
            // Publishes that went through since the last sweep: NATS is there.
            let now = self.successes.load(Ordering::Relaxed);
            if now != successes {
                moved_at = Some(tokio::time::Instant::now());
            }
            let nats_took_others = moved_at.is_some_and(|t| t.elapsed() <= grace + interval);
            successes = now;
            match self.sweep(grace, max_backoff, nats_took_others).await {
                Ok(sweep) if sweep.stuck > 0 => {
                    tracing::warn!(stuck = sweep.stuck, "outbox rows keep failing to publish");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox sweep failed"),
            }
        }
    }

    /// One sweep over due rows older than `grace`, locked so that several edge instances share
    /// the work without publishing the same row at once. Publishes are pipelined.
    /// `nats_took_others`: other publishes of this edge went through since the last sweep.
    async fn sweep(
        &self,
        grace: Duration,
        max_backoff: Duration,
        nats_took_others: bool,
    ) -> Result<Sweep, sqlx::Error> {
        let connected = matches!(
            self.bus.client().connection_state(),
            async_nats::connection::State::Connected
        );
        if !connected {
            return Ok(Sweep::default());
        }
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT msg_id, subject, payload, traceparent FROM edge.outbox
             WHERE published_at IS NULL AND next_attempt_at <= now()
               AND created_at < now() - $1::interval
             ORDER BY next_attempt_at LIMIT 200 FOR UPDATE SKIP LOCKED",
        )
        .bind(interval(grace))
        .fetch_all(&mut *tx)
        .await?;
        let publishes = rows.iter().map(|row| async move {
            let out = staged(row);
            (row.msg_id.as_str(), self.bus.publish(&out).await)
        });
        let results = futures::future::join_all(publishes).await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut errors = Vec::new();
        for (msg_id, result) in results {
            match result {
                Ok(()) => done.push(msg_id.to_owned()),
                Err(e) => {
                    tracing::warn!(%msg_id, error = %e, "outbox republish failed");
                    failed.push(msg_id.to_owned());
                    errors.push(e.to_string().chars().take(500).collect::<String>());
                }
            }
        }
        // The sweep's own publishes count for the next sweep too: a row that fails in a sweep
        // after the one that published everything else is still the row's own fault.
        self.successes
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        sqlx::query("UPDATE edge.outbox SET published_at = now() WHERE msg_id = ANY($1)")
            .bind(&done)
            .execute(&mut *tx)
            .await?;
        if !failed.is_empty() {
            // Only a row that fails while others succeed is the row's own fault.
            let counted = !done.is_empty() || nats_took_others;
            sqlx::query(
                "UPDATE edge.outbox o SET
                     attempts = o.attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
                     next_attempt_at = now() + CASE WHEN $3
                         THEN least($4::interval * power(2, least(o.attempts, 20)), $5::interval)
                         ELSE $4::interval END,
                     last_error = f.error
                 FROM unnest($1::text[], $2::text[]) AS f(msg_id, error)
                 WHERE o.msg_id = f.msg_id AND o.msg_id = ANY($1)",
            )
            .bind(&failed)
            .bind(&errors)
            .bind(counted)
            .bind(interval(grace))
            .bind(interval(max_backoff))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let (stuck,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM edge.outbox WHERE published_at IS NULL AND attempts >= $1",
        )
        .bind(STUCK_AFTER)
        .fetch_one(&self.pool)
        .await?;
        if !done.is_empty() {
            tracing::info!(count = done.len(), "outbox republished events");
        }
        Ok(Sweep {
            published: done.len(),
            failed: failed.len(),
            stuck,
        })
    }
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

fn staged(row: &Row) -> Outgoing {
    // The subject is `checkout.<event>.<order_id>`; headers are rebuilt from it.
    let mut tokens = row.subject.split('.').skip(1);
    let kind = tokens
        .next()
        .and_then(EventKind::parse)
        .unwrap_or(EventKind::Requested);
    let order_id = tokens
        .next()
        .and_then(|t| uuid::Uuid::parse_str(t).ok())
        .unwrap_or_default();
    debug_assert_eq!(event_subject(kind, order_id), row.subject);
    Outgoing {
        kind,
        order_id,
        subject: row.subject.clone(),
        msg_id: row.msg_id.clone(),
        payload: row.payload.clone(),
        traceparent: row.traceparent.clone(),
    }
}
