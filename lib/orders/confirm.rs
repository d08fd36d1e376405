//! The order step: an authorized checkout becomes a confirmed order.

use sqlx::PgPool;

use super::record;
use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.committed` (payment authorized and stock taken), creates the order,
/// emits `checkout.confirmed`.
pub struct OrderStep {
    pub pool: PgPool,
}

const DURABLE: &str = "order";

impl Step for OrderStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Committed]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Committed { checkout, .. } = event else {
            return Err(StepError::Permanent(format!(
                "order cannot handle {:?}",
                event.kind()
            )));
        };
        let mut tx = match inbox::claim(&self.pool, InboxTable::Orders, DURABLE, &delivery.event_id)
            .await?
        {
            Claim::Done(events) => return Ok(events),
            Claim::Fresh(tx) => tx,
        };
        record::insert(&mut tx, &checkout, "confirmed", None).await?;
        let outputs = vec![Event::Confirmed { checkout }];
        inbox::complete(
            tx,
            InboxTable::Orders,
            DURABLE,
            &delivery.event_id,
            &outputs,
        )
        .await?;
        Ok(outputs)
    }
}
