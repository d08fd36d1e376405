//! The compensate step: unwind a checkout that cannot complete, or an order the buyer
//! cancels. Each undo is idempotent and runs in the order a human would: give the stock back,
//! release the money, then record the outcome (so a buyer who sees `failed` can retry and
//! find the stock available).

use std::sync::Arc;

use sqlx::PgPool;

use crate::inventory::{release_for_order, restock_for_order};
use crate::orders::{finish_cancel, insert_failed};
use crate::payments::{void_for_order, PaymentProvider};
use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.rejected`, `checkout.declined` and `checkout.cancel_requested`; emits
/// `checkout.failed` or `checkout.cancelled`.
pub struct CompensateStep {
    pub pool: PgPool,
    pub provider: Arc<dyn PaymentProvider>,
}

const DURABLE: &str = "compensate";

impl Step for CompensateStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![
            EventKind::Rejected,
            EventKind::Declined,
            EventKind::CancelRequested,
        ]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let (checkout, reason) = match event {
            Event::Rejected {
                checkout, reason, ..
            } => (checkout, Some(reason)),
            Event::Declined {
                checkout, reason, ..
            } => (checkout, Some(reason)),
            Event::CancelRequested { checkout } => (checkout, None),
            other => {
                return Err(StepError::Permanent(format!(
                    "compensate cannot handle {:?}",
                    other.kind()
                )))
            }
        };
        if let Some(events) =
            inbox::lookup(&self.pool, InboxTable::Orders, DURABLE, &delivery.event_id).await?
        {
            return Ok(events);
        }
        let order_id = checkout.order_id;
        // Held units go back to available; units already taken out of stock (a cancelled
        // order, or one refused at confirmation) go back on hand. Both are no-ops when done.
        let released = release_for_order(&self.pool, order_id).await?
            + restock_for_order(&self.pool, order_id).await?;
        if reason.is_none() {
            crate::pricing::promo::release(&self.pool, order_id).await?;
        }
        let voided = void_for_order(&self.pool, self.provider.as_ref(), order_id)
            .await
            .map_err(|e| match e {
                crate::payments::void::VoidError::Provider(
                    crate::payments::ProviderError::Deferred(d),
                ) => StepError::RetryAfter(d),
                other => StepError::Transient(other.to_string()),
            })?;
        let outputs = match reason {
            Some(reason) => vec![Event::Failed {
                checkout: checkout.clone(),
                reason,
            }],
            None => vec![Event::Cancelled {
                checkout: checkout.clone(),
            }],
        };
        let table = InboxTable::Orders;
        let mut tx =
            match inbox::claim(&self.pool, table, DURABLE, &delivery.event_id, &outputs).await? {
                Claim::Done(events) => return Ok(events),
                Claim::Fresh(tx) => tx,
            };
        match reason {
            Some(reason) => {
                insert_failed(&mut tx, &checkout, reason).await?;
                let reason = reason.as_str();
                tracing::info!(reason, released, voided, "order failed and compensated");
            }
            None => {
                finish_cancel(&mut tx, order_id).await?;
                tracing::info!(released, voided, "order cancelled");
            }
        }
        tx.commit().await?;
        Ok(outputs)
    }
}
