//! Capture on shipment and refund after it, each at most once per order and attempt: one step
//! shape, [`Settle`], for both operations.

use std::marker::PhantomData;
use std::sync::Arc;

use rust_decimal::Decimal;
use uuid::Uuid;

use super::provider::{PaymentProvider, ProviderError};
use super::{idempotency_key, PaymentStatus};
use crate::db::Leases;
use crate::saga::events::{Checkout, Event, EventKind};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// A provider operation that moves an authorized payment on (capture, refund).
pub trait Operation: Send + Sync + 'static {
    /// The step's durable, and the operation's name in idempotency keys.
    const NAME: &'static str;
    /// The request it answers.
    const CONSUMES: EventKind;
    /// The payment's status before and after.
    const FROM: PaymentStatus;
    const TO: PaymentStatus;

    /// Calls the provider.
    fn call(
        provider: &dyn PaymentProvider,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> impl std::future::Future<Output = Result<(), ProviderError>> + Send;
    /// The request's checkout and attempt, if the event is the request.
    fn request(event: Event) -> Option<(Checkout, u32)>;
    /// What the operation emits when the provider did it, and when it refused.
    fn done(checkout: Checkout, attempt: u32) -> Event;
    fn refused(checkout: Checkout, detail: String, attempt: u32) -> Event;
}

/// Captures the authorized amount: `checkout.ship_requested` -> `checkout.captured`.
pub struct Capture;

/// Refunds the captured amount: `checkout.refund_requested` -> `checkout.refunded`.
pub struct Refund;

impl Operation for Capture {
    const NAME: &'static str = "capture";
    const CONSUMES: EventKind = EventKind::ShipRequested;
    const FROM: PaymentStatus = PaymentStatus::Authorized;
    const TO: PaymentStatus = PaymentStatus::Captured;

    async fn call(
        provider: &dyn PaymentProvider,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<(), ProviderError> {
        provider.capture(auth_id, amount, key).await
    }

    fn request(event: Event) -> Option<(Checkout, u32)> {
        match event {
            Event::ShipRequested { checkout, attempt } => Some((checkout, attempt)),
            _ => None,
        }
    }

    fn done(checkout: Checkout, attempt: u32) -> Event {
        Event::Captured { checkout, attempt }
    }

    fn refused(checkout: Checkout, detail: String, attempt: u32) -> Event {
        Event::CaptureFailed {
            checkout,
            detail,
            attempt,
        }
    }
}

impl Operation for Refund {
    const NAME: &'static str = "refund";
    const CONSUMES: EventKind = EventKind::RefundRequested;
    const FROM: PaymentStatus = PaymentStatus::Captured;
    const TO: PaymentStatus = PaymentStatus::Refunded;

    async fn call(
        provider: &dyn PaymentProvider,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<(), ProviderError> {
        provider.refund(auth_id, amount, key).await
    }

    fn request(event: Event) -> Option<(Checkout, u32)> {
        match event {
            Event::RefundRequested { checkout, attempt } => Some((checkout, attempt)),
            _ => None,
        }
    }

    fn done(checkout: Checkout, attempt: u32) -> Event {
        Event::Refunded { checkout, attempt }
    }

    fn refused(checkout: Checkout, detail: String, attempt: u32) -> Event {
        Event::RefundFailed {
            checkout,
            detail,
            attempt,
        }
    }
}

/// The step that settles an operation at the provider and records it on the payment.
pub struct Settle<O> {
    pub leases: Leases,
    pub provider: Arc<dyn PaymentProvider>,
    pub operation: PhantomData<O>,
}

/// Consumes `checkout.ship_requested`: captures the authorized amount.
pub type CaptureStep = Settle<Capture>;
/// Consumes `checkout.refund_requested`: refunds the captured amount.
pub type RefundStep = Settle<Refund>;

impl<O: Operation> Settle<O> {
    /// The step for `provider`, on the payments database.
    pub fn new(leases: Leases, provider: Arc<dyn PaymentProvider>) -> Self {
        Self {
            leases,
            provider,
            operation: PhantomData,
        }
    }
}

/// A request to settle: the order and which attempt.
pub struct Request {
    checkout: Checkout,
    attempt: u32,
}

/// What the provider answered.
pub enum Settled {
    Done,
    /// Wrong state or an expired authorization: retrying cannot help. Said so, so the order's
    /// lock is released and the refusal is visible, rather than dead-lettered.
    Refused(String),
}

impl<O: Operation> Step for Settle<O> {
    const DURABLE: &'static str = O::NAME;
    const INBOX: InboxTable = InboxTable::Payments;
    const SHAPE: Shape = Shape::Prepared;
    type Input = Request;
    type Found = Settled;

    fn consumes(&self) -> Vec<EventKind> {
        vec![O::CONSUMES]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Request, String> {
        let kind = event.kind();
        O::request(event)
            .map(|(checkout, attempt)| Request { checkout, attempt })
            .ok_or_else(|| format!("{} cannot handle {kind:?}", O::NAME))
    }

    async fn prepare(&self, request: &Request, _: &Delivery) -> Result<Settled, StepError> {
        let order_id = request.checkout.order_id;
        let (auth_id, amount) = authorization(&self.leases, order_id).await?;
        let key = attempt_key(order_id, O::NAME, request.attempt);
        match O::call(self.provider.as_ref(), &auth_id, amount, &key).await {
            Ok(()) => Ok(Settled::Done),
            Err(ProviderError::Deferred(wait)) => Err(StepError::RetryAfter(wait)),
            Err(ProviderError::Unavailable(e)) => Err(StepError::transient(e)),
            Err(ProviderError::Rejected(detail)) => {
                tracing::warn!(%detail, "provider refused");
                Ok(Settled::Refused(detail))
            }
        }
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Request, &Settled)],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let mut outputs = Vec::with_capacity(items.len());
        for (request, settled) in items {
            let (checkout, attempt) = (request.checkout.clone(), request.attempt);
            let event = match settled {
                Settled::Refused(detail) => O::refused(checkout, detail.clone(), attempt),
                Settled::Done => {
                    sqlx::query(
                        "UPDATE payments.payments SET status = $3, updated_at = now()
                         WHERE order_id = $1 AND status = $2",
                    )
                    .bind(checkout.order_id)
                    .bind(O::FROM)
                    .bind(O::TO)
                    .execute(&mut *tx.conn)
                    .await?;
                    O::done(checkout, attempt)
                }
            };
            outputs.push(vec![event]);
        }
        Ok(outputs)
    }
}

/// The order's authorization and amount, if it has one.
async fn authorization(leases: &Leases, order_id: Uuid) -> Result<(String, Decimal), StepError> {
    let row: Option<(Option<String>, Decimal)> =
        sqlx::query_as("SELECT auth_id, amount FROM payments.payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(leases.pool())
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
fn attempt_key(order_id: Uuid, operation: &str, attempt: u32) -> String {
    if attempt <= 1 {
        idempotency_key(order_id, operation)
    } else {
        idempotency_key(order_id, &format!("{operation}:{attempt}"))
    }
}
