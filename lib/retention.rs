//! Storage that stays bounded: the pruner deletes what only served dedup, retries or
//! debugging once it can no longer be needed, and folds the old stock ledger into daily
//! totals. Orders, payments, reservations and accepted checkouts are business records and
//! are kept (see `docs/capacity.md` for what each costs per order).
//!
//! Every delete takes `retention.batch` rows with `FOR UPDATE SKIP LOCKED`, so two pruners
//! (two compensate processes) split the work and neither ever waits on a saga step's row.
//! Old rows are found through BRIN indexes on their timestamps: nearly free to maintain on
//! the hot path, where a btree would cost a write per event.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionSettings;

/// Batches one table may take in one pass, so a backlog (the pruner's first run on a year of
/// rows) is worked off over several passes rather than in one long burst of I/O.
const BATCHES_PER_PASS: usize = 20;

/// Deletes expired rows every `retention.interval`.
#[derive(Clone)]
pub struct Pruner {
    pub pool: PgPool,
    pub settings: RetentionSettings,
}

/// Rows one pass removed, by what they were.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Inbox rows of the three services' steps.
    pub inbox: u64,
    /// Published outbox rows.
    pub outbox: u64,
    /// Failed-PSP-call counters.
    pub payment_attempts: u64,
    /// Stock movements folded into `inventory.stock_movement_days`.
    pub stock_movements: u64,
    /// Merchant webhook deliveries that ended, with their attempts, and batches of messages
    /// delivered at their first attempt (and then the messages).
    pub webhooks: u64,
}

impl Pass {
    /// Counts what the pass removed, per group of tables.
    fn count(&self) {
        for (table, rows) in [
            ("inbox", self.inbox),
            ("outbox", self.outbox),
            ("payment_attempts", self.payment_attempts),
            ("stock_movements", self.stock_movements),
            ("webhooks", self.webhooks),
        ] {
            crate::metrics::pruned(table, rows);
        }
    }

    fn total(&self) -> u64 {
        self.inbox + self.outbox + self.payment_attempts + self.stock_movements + self.webhooks
    }
}

fn cutoff(keep: Duration) -> chrono::DateTime<Utc> {
    Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX)
}

impl Pruner {
    /// Runs a pass every `retention.interval` until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.pass().await {
                Ok(pass) if pass.total() > 0 => {
                    pass.count();
                    tracing::info!(?pass, "pruned expired rows");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning failed; next pass retries"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.interval) => {}
            }
        }
    }

    /// One pass over every table, each in batches.
    pub async fn pass(&self) -> Result<Pass, sqlx::Error> {
        let s = &self.settings;
        let mut pass = Pass::default();
        for schema in ["inventory", "payments", "orders"] {
            let sql = format!(
                "WITH gone AS (
                     DELETE FROM {schema}.inbox WHERE (consumer, event_id) IN (
                         SELECT consumer, event_id FROM {schema}.inbox WHERE handled_at < $1
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING 1)
                 SELECT count(*) FROM gone"
            );
            pass.inbox += self.batches(&sql, s.inbox).await?;
        }
        pass.outbox += self
            .batches(
                "WITH gone AS (
                     DELETE FROM edge.outbox WHERE msg_id IN (
                         SELECT msg_id FROM edge.outbox
                         WHERE created_at < $1 AND published_at IS NOT NULL
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING 1)
                 SELECT count(*) FROM gone",
                s.outbox,
            )
            .await?;
        pass.payment_attempts += self
            .batches(
                "WITH gone AS (
                     DELETE FROM payments.attempts WHERE order_id IN (
                         SELECT order_id FROM payments.attempts WHERE updated_at < $1
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING 1)
                 SELECT count(*) FROM gone",
                s.payment_attempts,
            )
            .await?;
        // Deleted and added to the day's totals in one statement: the ledger's sums never
        // miss a movement or count one twice, whatever crashes when.
        pass.stock_movements += self
            .batches(
                "WITH gone AS (
                     DELETE FROM inventory.stock_movements WHERE movement_id IN (
                         SELECT movement_id FROM inventory.stock_movements WHERE created_at < $1
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING sku, kind, (created_at AT TIME ZONE 'UTC')::date AS day,
                               on_hand_delta, reserved_delta),
                 folded AS (
                     INSERT INTO inventory.stock_movement_days AS d
                         (sku, day, kind, movements, on_hand_delta, reserved_delta)
                     SELECT sku, day, kind, count(*), sum(on_hand_delta), sum(reserved_delta)
                     FROM gone GROUP BY sku, day, kind
                     ON CONFLICT (sku, day, kind) DO UPDATE SET
                         movements = d.movements + excluded.movements,
                         on_hand_delta = d.on_hand_delta + excluded.on_hand_delta,
                         reserved_delta = d.reserved_delta + excluded.reserved_delta)
                 SELECT count(*) FROM gone",
                s.stock_movements,
            )
            .await?;
        pass.webhooks += self.webhooks(s.webhooks).await?;
        Ok(pass)
    }

    /// Merchant webhook deliveries that ended, with their attempts, and the batches that
    /// delivered messages at their first attempt; then the messages no delivery refers to
    /// any more. A pending delivery (and so its message) is never taken,
    /// nor a message an enabled endpoint has yet to read from its cursor.
    async fn webhooks(&self, keep: Duration) -> Result<u64, sqlx::Error> {
        let deliveries = self
            .batches(
                "WITH gone AS (
                     DELETE FROM webhooks.deliveries WHERE (endpoint_id, webhook_id) IN (
                         SELECT endpoint_id, webhook_id FROM webhooks.deliveries
                         WHERE created_at < $1 AND status <> 'pending'
                         LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING endpoint_id, webhook_id),
                 attempts AS (
                     DELETE FROM webhooks.attempts a USING gone g
                     WHERE a.endpoint_id = g.endpoint_id AND a.webhook_id = g.webhook_id)
                 SELECT count(*) FROM gone",
                keep,
            )
            .await?;
        // A batch's record of the messages it delivered at their first attempt ends by time
        // alone: nothing is pending in it.
        let batches = self
            .batches(
                "WITH gone AS (
                     DELETE FROM webhooks.sent WHERE (endpoint_id, last_tx, last_id) IN (
                         SELECT endpoint_id, last_tx, last_id FROM webhooks.sent
                         WHERE at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING 1)
                 SELECT count(*) FROM gone",
                keep,
            )
            .await?;
        // Its own statement: one that also deleted deliveries would still see them. A message
        // is looked up per endpoint (the deliveries' key), a handful of index probes.
        self.batches(
            "WITH gone AS (
                 DELETE FROM webhooks.messages WHERE webhook_id IN (
                     SELECT m.webhook_id FROM webhooks.messages m
                     WHERE m.created_at < $1 AND NOT EXISTS (
                         SELECT 1 FROM webhooks.endpoints e
                         LEFT JOIN webhooks.deliveries d
                           ON d.endpoint_id = e.endpoint_id AND d.webhook_id = m.webhook_id
                         WHERE d.webhook_id IS NOT NULL
                            OR (e.status = 'enabled' AND e.deleted_at IS NULL
                                AND m.event_type = ANY(e.events)
                                AND (m.tx, m.webhook_id) > (e.cursor_tx, e.cursor_id)))
                     LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING 1)
             SELECT count(*) FROM gone",
            keep,
        )
        .await?;
        Ok(deliveries + batches)
    }

    /// Runs a batch statement (`$1` the cutoff, `$2` the batch size, answering the count it
    /// removed) until a batch comes back short or the pass's share is spent; the rows removed.
    async fn batches(&self, sql: &str, keep: Duration) -> Result<u64, sqlx::Error> {
        let before = cutoff(keep);
        let batch = self.settings.batch.max(1);
        let mut total = 0;
        for _ in 0..BATCHES_PER_PASS {
            let (removed,): (i64,) = sqlx::query_as(sql)
                .bind(before)
                .bind(batch)
                .fetch_one(&self.pool)
                .await?;
            total += u64::try_from(removed).unwrap_or(0);
            if removed < batch {
                break;
            }
        }
        Ok(total)
    }
}
