//! The reserve step: hold stock for every line of a checkout, all or nothing.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::saga::events::{Event, EventKind, FailureReason};
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
        let mut tx = match inbox::claim(
            &self.pool,
            InboxTable::Inventory,
            DURABLE,
            &delivery.event_id,
        )
        .await?
        {
            Claim::Done(events) => return Ok(events),
            Claim::Fresh(tx) => tx,
        };
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::minutes(10));
        let expires_at = Utc::now() + ttl;
        // Lock rows in one global order (by sku) so concurrent orders never deadlock.
        let mut lines: Vec<(String, i32)> = checkout
            .items
            .iter()
            .map(|l| (l.sku.as_str().to_owned(), l.qty))
            .collect();
        lines.sort();
        let mut attempt = sqlx::Acquire::begin(&mut *tx).await?;
        let mut short = Vec::new();
        for (sku, qty) in &lines {
            let updated = sqlx::query(
                "UPDATE inventory.stock SET reserved = reserved + $2, updated_at = now()
                 WHERE sku = $1 AND on_hand - reserved >= $2",
            )
            .bind(sku)
            .bind(qty)
            .execute(&mut *attempt)
            .await?
            .rows_affected();
            if updated == 0 {
                short.push(sku.clone());
                break;
            }
        }
        let outputs = if short.is_empty() {
            let ids: Vec<Uuid> = lines
                .iter()
                .map(|(sku, _)| Uuid::new_v5(&checkout.order_id, sku.as_bytes()))
                .collect();
            let skus: Vec<String> = lines.iter().map(|(s, _)| s.clone()).collect();
            let qtys: Vec<i32> = lines.iter().map(|(_, q)| *q).collect();
            sqlx::query(
                "INSERT INTO inventory.inventory_reservations
                     (reservation_id, order_id, sku, qty, status, expires_at)
                 SELECT id, $2, sku, qty, 'held', $5
                 FROM unnest($1::uuid[], $3::text[], $4::int[]) AS r(id, sku, qty)",
            )
            .bind(&ids)
            .bind(checkout.order_id)
            .bind(&skus)
            .bind(&qtys)
            .bind(expires_at)
            .execute(&mut *attempt)
            .await?;
            sqlx::query(
                "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
                 SELECT sku, 'reserve', $1, 0, qty FROM unnest($2::text[], $3::int[]) AS r(sku, qty)",
            )
            .bind(checkout.order_id)
            .bind(&skus)
            .bind(&qtys)
            .execute(&mut *attempt)
            .await?;
            attempt.commit().await?;
            vec![Event::Reserved {
                checkout,
                expires_at,
            }]
        } else {
            // Nothing of a partial reservation survives: all or nothing.
            attempt.rollback().await?;
            tracing::info!(skus = ?short, "out of stock");
            vec![Event::Rejected {
                checkout,
                reason: FailureReason::OutOfStock,
                detail: format!("not enough stock for {}", short.join(", ")),
            }]
        };
        inbox::complete(
            tx,
            InboxTable::Inventory,
            DURABLE,
            &delivery.event_id,
            &outputs,
        )
        .await?;
        Ok(outputs)
    }
}
