//! The reserve step: hold stock for every line of a checkout, all or nothing.
//!
//! Race-free with any number of reserve processes: a hold is one conditional
//! `UPDATE stock SET reserved = reserved + qty WHERE on_hand - reserved >= qty`, and rows are
//! taken in SKU order so that two orders never deadlock. The stock row lock is taken last,
//! just before commit, so a hot SKU's row is held for as short a time as possible; an
//! unlocked pre-check turns buyers away without queueing on that lock once it is sold out.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.requested`, emits `checkout.reserved` or `checkout.rejected`.
pub struct ReserveStep {
    pub pool: PgPool,
    pub ttl: Duration,
}

const DURABLE: &str = "reserve";

impl Step for ReserveStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Requested]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Requested { checkout } = event else {
            return Err(StepError::Permanent(format!(
                "reserve cannot handle {:?}",
                event.kind()
            )));
        };
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::minutes(10));
        let expires_at = Utc::now() + ttl;
        let mut lines: Vec<(String, i32)> = checkout
            .items
            .iter()
            .map(|l| (l.sku.as_str().to_owned(), l.qty))
            .collect();
        lines.sort();
        let skus: Vec<String> = lines.iter().map(|(s, _)| s.clone()).collect();
        let qtys: Vec<i32> = lines.iter().map(|(_, q)| *q).collect();
        let table = InboxTable::Inventory;

        let short = shortfall_without_locks(&self.pool, &skus, &qtys).await?;
        if !short.is_empty() {
            let outputs = rejected(checkout, short);
            return Ok(inbox::record_alone(
                &self.pool,
                table,
                DURABLE,
                &delivery.event_id,
                outputs,
            )
            .await?);
        }
        let reserved = vec![Event::Reserved {
            checkout: checkout.clone(),
            expires_at,
        }];
        let mut tx =
            match inbox::claim(&self.pool, table, DURABLE, &delivery.event_id, &reserved).await? {
                Claim::Done(events) => return Ok(events),
                Claim::Fresh(tx) => tx,
            };
        let ids: Vec<Uuid> = skus
            .iter()
            .map(|sku| Uuid::new_v5(&checkout.order_id, sku.as_bytes()))
            .collect();
        sqlx::query(
            "WITH held AS (
                 INSERT INTO inventory.inventory_reservations
                     (reservation_id, order_id, sku, qty, status, expires_at)
                 SELECT id, $2, sku, qty, 'held', $5
                 FROM unnest($1::uuid[], $3::text[], $4::int[]) AS r(id, sku, qty)
                 RETURNING sku, qty)
             INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
             SELECT sku, 'reserve', $2, 0, qty FROM held",
        )
        .bind(&ids)
        .bind(checkout.order_id)
        .bind(&skus)
        .bind(&qtys)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        for (sku, qty) in &lines {
            let held = sqlx::query(
                "UPDATE inventory.stock SET reserved = reserved + $2, updated_at = now()
                 WHERE sku = $1 AND on_hand - reserved >= $2",
            )
            .bind(sku)
            .bind(qty)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if held == 0 {
                // Lost the race for the last units: nothing of a partial hold survives.
                tx.rollback().await?;
                let outputs = rejected(checkout, vec![sku.clone()]);
                return Ok(inbox::record_alone(
                    &self.pool,
                    table,
                    DURABLE,
                    &delivery.event_id,
                    outputs,
                )
                .await?);
            }
        }
        tx.commit().await?;
        Ok(reserved)
    }
}

fn rejected(checkout: Checkout, short: Vec<String>) -> Vec<Event> {
    tracing::info!(skus = ?short, "out of stock");
    vec![Event::Rejected {
        checkout,
        reason: FailureReason::OutOfStock,
        detail: format!("not enough stock for {}", short.join(", ")),
    }]
}

/// SKUs that visibly lack stock (a snapshot read, no locks). Passing it is not a promise:
/// the conditional update decides.
async fn shortfall_without_locks(
    conn: &PgPool,
    skus: &[String],
    qtys: &[i32],
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT r.sku FROM unnest($1::text[], $2::int[]) AS r(sku, qty)
         LEFT JOIN inventory.stock s ON s.sku = r.sku
         WHERE s.sku IS NULL OR s.on_hand - s.reserved < r.qty
         ORDER BY r.sku",
    )
    .bind(skus)
    .bind(qtys)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
}
