//! The commit step: once the payment is authorized, the order's units leave stock.
//!
//! It runs before the order is confirmed, so that no order is ever confirmed without its
//! stock: if a hold expired while the payment was pending, the units are taken again from
//! what is available, and if they are gone the checkout is rejected with
//! `reservation_expired` (compensation then voids the authorization).

use std::collections::HashMap;

use sqlx::PgPool;

use crate::saga::events::{Event, EventKind, FailureReason};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.authorized`, emits `checkout.committed` or `checkout.rejected`.
pub struct CommitStep {
    pub pool: PgPool,
}

const DURABLE: &str = "inventory-commit";

impl Step for CommitStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Authorized]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Authorized {
            checkout,
            payment_id,
            auth_id,
        } = event
        else {
            return Err(StepError::Permanent(format!(
                "inventory-commit cannot handle {:?}",
                event.kind()
            )));
        };
        let order_id = checkout.order_id;
        let committed = vec![Event::Committed {
            checkout: checkout.clone(),
            payment_id,
            auth_id,
        }];
        let table = InboxTable::Inventory;
        let mut tx =
            match inbox::claim(&self.pool, table, DURABLE, &delivery.event_id, &committed).await? {
                Claim::Done(events) => return Ok(events),
                Claim::Fresh(tx) => tx,
            };
        // Lock the order's holds first, so a concurrent compensation either ran before (its
        // holds are `released`: the order was unwound, commit nothing) or waits for us.
        let statuses: Vec<(String,)> = sqlx::query_as(
            "SELECT status FROM inventory.inventory_reservations WHERE order_id = $1 FOR UPDATE",
        )
        .bind(order_id)
        .fetch_all(&mut *tx)
        .await?;
        if statuses.iter().any(|(s,)| s == "released") {
            tx.rollback().await?;
            tracing::warn!("the order was unwound before its stock was committed");
            let outputs = vec![Event::Rejected {
                checkout,
                reason: FailureReason::TimedOut,
                detail: "the order was unwound before its stock was committed".into(),
            }];
            let id = &delivery.event_id;
            return Ok(inbox::record_alone(&self.pool, table, DURABLE, id, outputs).await?);
        }
        let held: HashMap<String, i32> = sqlx::query_as::<_, (String, i32)>(
            "UPDATE inventory.inventory_reservations SET status = 'committed', updated_at = now()
             WHERE order_id = $1 AND status = 'held' RETURNING sku, qty",
        )
        .bind(order_id)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut lines: Vec<(String, i32)> = checkout
            .items
            .iter()
            .map(|l| (l.sku.as_str().to_owned(), l.qty))
            .collect();
        lines.sort();
        for (sku, qty) in &lines {
            let still_held = held.get(sku).is_some_and(|h| h == qty);
            // A held unit moves from reserved to gone; a lapsed one is taken from available.
            let taken = if still_held {
                sqlx::query(
                    "UPDATE inventory.stock SET on_hand = on_hand - $2, reserved = reserved - $2,
                         updated_at = now() WHERE sku = $1",
                )
            } else {
                sqlx::query(
                    "UPDATE inventory.stock SET on_hand = on_hand - $2, updated_at = now()
                     WHERE sku = $1 AND on_hand - reserved >= $2",
                )
            }
            .bind(sku)
            .bind(qty)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if taken == 0 {
                // Undo everything, holds included: compensation releases what is still held.
                tx.rollback().await?;
                tracing::warn!(%sku, "reservation expired and the stock is gone");
                let outputs = vec![Event::Rejected {
                    checkout,
                    reason: FailureReason::ReservationExpired,
                    detail: format!("hold expired and no stock left for {sku}"),
                }];
                return Ok(inbox::record_alone(
                    &self.pool,
                    table,
                    DURABLE,
                    &delivery.event_id,
                    outputs,
                )
                .await?);
            }
            if !still_held {
                sqlx::query(
                    "UPDATE inventory.inventory_reservations SET status = 'committed', updated_at = now()
                     WHERE order_id = $1 AND sku = $2",
                )
                .bind(order_id)
                .bind(sku)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
                 VALUES ($1, 'commit', $2, -$3, $4)",
            )
            .bind(sku)
            .bind(order_id)
            .bind(qty)
            .bind(if still_held { -qty } else { 0 })
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(committed)
    }
}
