//! The watchdog: every accepted checkout ends. An order still pending `watchdog.pending_limit`
//! after the edge accepted it (a step's message was dead-lettered, or lost with an
//! unreplicated stream) is sent to compensation as `checkout.timed_out`, which fails it with
//! reason `timed_out` and unwinds whatever its steps did (see `compensate`).
//!
//! It reads the edge's accepted checkouts (the only record of a pending order) and the
//! orders table; each pass starts where the last one proved everything older settled, so it
//! never rescans history. One compensate process does a pass at a time (a row lock).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::Bus;
use crate::saga::events::Event;
use crate::saga::outgoing::Outgoing;
use crate::saga::trace::TraceParent;

/// Finds orders pending too long and asks for their compensation.
#[derive(Clone)]
pub struct Watchdog {
    pub pool: PgPool,
    pub bus: Bus,
    pub pending_limit: Duration,
    pub interval: Duration,
    pub batch: i64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Orders sent to compensation for the first time.
    pub timed_out: usize,
    /// Orders timed out earlier and still without an outcome, asked again.
    pub reminded: usize,
}

#[derive(sqlx::FromRow)]
struct Pending {
    order_id: Uuid,
    event: Vec<u8>,
    created_at: DateTime<Utc>,
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

impl Watchdog {
    /// Runs a pass every `interval` until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.pass().await {
                // Counted where compensation fails the order (`compensate`): an order that
                // settled meanwhile was not timed out.
                Ok(pass) if pass.timed_out + pass.reminded > 0 => {
                    tracing::warn!(
                        timed_out = pass.timed_out,
                        reminded = pass.reminded,
                        limit = ?self.pending_limit,
                        "watchdog: orders pending past the limit sent to compensation"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watchdog pass failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass.
    pub async fn pass(&self) -> Result<Pass, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let cursor: Option<(DateTime<Utc>,)> =
            sqlx::query_as("SELECT settled_before FROM orders.watchdog FOR UPDATE SKIP LOCKED")
                .fetch_optional(&mut *tx)
                .await?;
        let Some((settled_before,)) = cursor else {
            // Another process is doing this pass.
            return Ok(Pass::default());
        };
        let (horizon,): (DateTime<Utc>,) = sqlx::query_as("SELECT now() - $1::interval")
            .bind(interval(self.pending_limit))
            .fetch_one(&mut *tx)
            .await?;
        let pending: Vec<Pending> = sqlx::query_as(
            "SELECT c.order_id, c.event, c.created_at FROM edge.checkouts c
             WHERE c.created_at >= $1 AND c.created_at < $2
               AND NOT EXISTS (SELECT 1 FROM orders.orders o WHERE o.order_id = c.order_id)
               AND NOT EXISTS (SELECT 1 FROM orders.timeouts t WHERE t.order_id = c.order_id)
             ORDER BY c.created_at LIMIT $3",
        )
        .bind(settled_before)
        .bind(horizon)
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        let (sent, unsent) = self.request(&pending).await;
        sqlx::query(
            "INSERT INTO orders.timeouts (order_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING",
        )
        .bind(&sent)
        .execute(&mut *tx)
        .await?;
        // Everything before the new cursor has an order or a timeout on record.
        let full = i64::try_from(pending.len()).unwrap_or(i64::MAX) >= self.batch;
        let next = match (unsent.first(), pending.last()) {
            (Some(first_unsent), _) => *first_unsent,
            (None, Some(last)) if full => last.created_at,
            _ => horizon,
        };
        sqlx::query("UPDATE orders.watchdog SET settled_before = greatest(settled_before, $1)")
            .bind(next)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let reminded = self.remind().await?;
        Ok(Pass {
            timed_out: sent.len(),
            reminded,
        })
    }

    /// Orders timed out before that still have no outcome: ask again (a republish after the
    /// dedup window reaches compensation anew, e.g. after a dead letter was dealt with).
    async fn remind(&self) -> Result<usize, sqlx::Error> {
        let again: Vec<Pending> = sqlx::query_as(
            "SELECT t.order_id, c.event, c.created_at
             FROM orders.timeouts t JOIN edge.checkouts c USING (order_id)
             WHERE t.last_at < now() - $1::interval
               AND NOT EXISTS (SELECT 1 FROM orders.orders o WHERE o.order_id = t.order_id)
             ORDER BY t.last_at LIMIT $2",
        )
        .bind(interval(self.interval * 6))
        .bind(self.batch)
        .fetch_all(&self.pool)
        .await?;
        if again.is_empty() {
            return Ok(0);
        }
        let (sent, _) = self.request(&again).await;
        sqlx::query(
            "UPDATE orders.timeouts SET last_at = now(), requests = requests + 1
             WHERE order_id = ANY($1)",
        )
        .bind(&sent)
        .execute(&self.pool)
        .await?;
        Ok(sent.len())
    }

    /// Publishes `checkout.timed_out` for each order; returns the ids sent and the creation
    /// times of those that could not be.
    async fn request(&self, pending: &[Pending]) -> (Vec<Uuid>, Vec<DateTime<Utc>>) {
        let publishes = pending.iter().map(|p| async move {
            let Ok(Event::Requested { checkout }) = Event::decode(&p.event) else {
                tracing::error!(order_id = %p.order_id, "stored checkout request does not decode");
                return Err(());
            };
            tracing::warn!(order_id = %p.order_id, accepted_at = %p.created_at,
                "order pending past the watchdog limit; timing it out");
            let event = Event::TimedOut {
                checkout: checkout.spent().for_the_bus(),
            };
            let out = Outgoing::new(&event, Some(&TraceParent::new_root())).map_err(|_| ())?;
            self.bus.publish(&out).await.map_err(|e| {
                tracing::warn!(order_id = %p.order_id, error = %e, "watchdog publish failed");
            })
        });
        let results = futures::future::join_all(publishes).await;
        let mut sent = Vec::new();
        let mut unsent = Vec::new();
        for (p, result) in pending.iter().zip(results) {
            match result {
                Ok(()) => sent.push(p.order_id),
                Err(()) => unsent.push(p.created_at),
            }
        }
        (sent, unsent)
    }
}
