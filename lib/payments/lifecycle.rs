//! Capture on shipment and refund after it, each at most once per order.

use std::sync::Arc;

use sqlx::PgPool;

use super::provider::{PaymentProvider, ProviderError};
use super::{idempotency_key, PaymentStatus};
use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.ship_requested`: captures the authorized amount, emits `checkout.captured`.
pub struct CaptureStep {
    pub pool: PgPool,
    pub provider: Arc<dyn PaymentProvider>,
}

/// Consumes `checkout.refund_requested`: refunds the captured amount, emits `checkout.refunded`.
pub struct RefundStep {
    pub pool: PgPool,
    pub provider: Arc<dyn PaymentProvider>,
}

/// The order's authorization and amount, if it has one.
async fn authorization(
    pool: &PgPool,
    order_id: uuid::Uuid,
) -> Result<(String, rust_decimal::Decimal), StepError> {
    let row: Option<(Option<String>, rust_decimal::Decimal)> =
        sqlx::query_as("SELECT auth_id, amount FROM payments.payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    match row {
        Some((Some(auth_id), amount)) => Ok((auth_id, amount)),
        _ => Err(StepError::permanent(format!(
            "order {order_id} has no authorization"
        ))),
    }
}

/// The provider's idempotency key for one attempt of an operation. A new attempt only starts
/// after the provider refused the previous one outright (a refusal the provider remembers
/// under its key), so it needs a key of its own; retries within an attempt reuse it.
fn attempt_key(order_id: uuid::Uuid, operation: &str, attempt: u32) -> String {
    if attempt <= 1 {
        idempotency_key(order_id, operation)
    } else {
        idempotency_key(order_id, &format!("{operation}:{attempt}"))
    }
}

/// A payment status change driven by one provider call.
struct Transition {
    durable: &'static str,
    from: PaymentStatus,
    to: PaymentStatus,
}

async fn run(
    pool: &PgPool,
    transition: Transition,
    delivery: &Delivery,
    order_id: uuid::Uuid,
    call: impl std::future::Future<Output = Result<(), ProviderError>>,
    output: Event,
    refused: impl FnOnce(String) -> Event,
) -> Result<Vec<Event>, StepError> {
    let Transition { durable, from, to } = transition;
    if let Some(events) =
        inbox::lookup(pool, InboxTable::Payments, durable, &delivery.event_id).await?
    {
        return Ok(events);
    }
    match call.await {
        Ok(()) => {}
        Err(ProviderError::Deferred(wait)) => return Err(StepError::RetryAfter(wait)),
        Err(ProviderError::Unavailable(e)) => return Err(StepError::transient(e)),
        // Wrong state or an expired authorization: retrying cannot help. Say so, so the
        // order's lock is released and the refusal is visible, rather than dead-lettering.
        Err(ProviderError::Rejected(detail)) => {
            tracing::warn!(%detail, "provider refused");
            let outputs = vec![refused(detail)];
            let table = InboxTable::Payments;
            return Ok(
                inbox::record_alone(pool, table, durable, &delivery.event_id, outputs).await?,
            );
        }
    }
    let outputs = vec![output];
    let table = InboxTable::Payments;
    let mut tx = match inbox::claim(pool, table, durable, &delivery.event_id, &outputs).await? {
        Claim::Done(events) => return Ok(events),
        Claim::Fresh(tx) => tx,
    };
    sqlx::query(
        "UPDATE payments.payments SET status = $3, updated_at = now() WHERE order_id = $1 AND status = $2",
    )
    .bind(order_id)
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(outputs)
}

impl Step for CaptureStep {
    const DURABLE: &'static str = "capture";

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::ShipRequested]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::ShipRequested { checkout, attempt } = event else {
            return Err(StepError::permanent(format!(
                "capture cannot handle {:?}",
                event.kind()
            )));
        };
        let order_id = checkout.order_id;
        let (auth_id, amount) = authorization(&self.pool, order_id).await?;
        let key = attempt_key(order_id, "capture", attempt);
        let call = self.provider.capture(&auth_id, amount, &key);
        run(
            &self.pool,
            Transition {
                durable: "capture",
                from: PaymentStatus::Authorized,
                to: PaymentStatus::Captured,
            },
            delivery,
            order_id,
            call,
            Event::Captured {
                checkout: checkout.clone(),
                attempt,
            },
            |detail| Event::CaptureFailed {
                checkout,
                detail,
                attempt,
            },
        )
        .await
    }
}

impl Step for RefundStep {
    const DURABLE: &'static str = "refund";

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::RefundRequested]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::RefundRequested { checkout, attempt } = event else {
            return Err(StepError::permanent(format!(
                "refund cannot handle {:?}",
                event.kind()
            )));
        };
        let order_id = checkout.order_id;
        let (auth_id, amount) = authorization(&self.pool, order_id).await?;
        let key = attempt_key(order_id, "refund", attempt);
        let call = self.provider.refund(&auth_id, amount, &key);
        run(
            &self.pool,
            Transition {
                durable: "refund",
                from: PaymentStatus::Captured,
                to: PaymentStatus::Refunded,
            },
            delivery,
            order_id,
            call,
            Event::Refunded {
                checkout: checkout.clone(),
                attempt,
            },
            |detail| Event::RefundFailed {
                checkout,
                detail,
                attempt,
            },
        )
        .await
    }
}
