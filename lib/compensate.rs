//! The compensate step: unwind a checkout that cannot complete. Each undo is idempotent
//! and runs in the order a human would: give the stock back, release the money, then say
//! the order failed (so a buyer who sees `failed` can retry and find the stock available).

use std::sync::Arc;

use sqlx::PgPool;

use crate::inventory::release_for_order;
use crate::orders::insert_failed;
use crate::payments::{void_for_order, PaymentProvider};
use crate::saga::events::{Event, EventKind, FailureReason};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.rejected` and `checkout.declined`, emits `checkout.failed`.
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
        vec![EventKind::Rejected, EventKind::Declined]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let (checkout, reason) = match event {
            Event::Rejected {
                checkout, reason, ..
            } => (checkout, reason),
            Event::Declined { checkout, .. } => (checkout, FailureReason::PaymentDeclined),
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
        let released = release_for_order(&self.pool, order_id).await?;
        let voided = void_for_order(&self.pool, self.provider.as_ref(), order_id)
            .await
            .map_err(|e| StepError::Transient(e.to_string()))?;
        let mut tx = match inbox::claim(&self.pool, InboxTable::Orders, DURABLE, &delivery.event_id)
            .await?
        {
            Claim::Done(events) => return Ok(events),
            Claim::Fresh(tx) => tx,
        };
        insert_failed(&mut tx, &checkout, reason).await?;
        let outputs = vec![Event::Failed { checkout, reason }];
        inbox::complete(
            tx,
            InboxTable::Orders,
            DURABLE,
            &delivery.event_id,
            &outputs,
        )
        .await?;
        tracing::info!(
            reason = reason.as_str(),
            released,
            voided,
            "order failed and compensated"
        );
        Ok(outputs)
    }
}
