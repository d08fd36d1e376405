//! The commit step: once an order is confirmed, its held units leave the warehouse's stock.

use sqlx::PgPool;

use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.confirmed`: held reservations become committed, `on_hand` and
/// `reserved` both drop by their quantities.
pub struct CommitStep {
    pub pool: PgPool,
}

const DURABLE: &str = "inventory-commit";

impl Step for CommitStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Confirmed]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Confirmed { checkout } = event else {
            return Err(StepError::Permanent(format!(
                "inventory-commit cannot handle {:?}",
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
        let held: Vec<(String, i32)> = sqlx::query_as(
            "UPDATE inventory.inventory_reservations SET status = 'committed', updated_at = now()
             WHERE order_id = $1 AND status = 'held' RETURNING sku, qty",
        )
        .bind(checkout.order_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut held = held;
        held.sort();
        for (sku, qty) in &held {
            sqlx::query(
                "UPDATE inventory.stock SET on_hand = on_hand - $2, reserved = reserved - $2,
                     updated_at = now() WHERE sku = $1",
            )
            .bind(sku)
            .bind(qty)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
                 VALUES ($1, 'commit', $2, -$3, -$3)",
            )
            .bind(sku)
            .bind(checkout.order_id)
            .bind(qty)
            .execute(&mut *tx)
            .await?;
        }
        inbox::complete(tx, InboxTable::Inventory, DURABLE, &delivery.event_id, &[]).await?;
        Ok(Vec::new())
    }
}
