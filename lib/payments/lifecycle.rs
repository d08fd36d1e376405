//! Capture on shipment and refund after it, each at most once per shipment or refund: one
//! step shape, [`Settle`], for both operations. Each movement the provider confirmed is
//! written into the payments ledger (`payments.movements`) in the step's transaction.

use std::marker::PhantomData;
use std::sync::Arc;

use rust_decimal::Decimal;
use uuid::Uuid;

use super::idempotency_key;
use super::provider::{PaymentProvider, ProviderError};
use crate::db::Leases;
use crate::saga::events::{Checkout, Event, EventKind, Part};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// A provider operation that moves an authorized payment on (capture, refund).
pub trait Operation: Send + Sync + 'static {
    /// The step's durable, and the operation's name in idempotency keys and the ledger
    /// (`payments.movements.kind`).
    const NAME: &'static str;
    /// The request it answers.
    const CONSUMES: EventKind;

    /// Calls the provider; answers the provider's id of what it did.
    fn call(
        provider: &dyn PaymentProvider,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> impl std::future::Future<Output = Result<String, ProviderError>> + Send;
    /// The request, if the event is one.
    fn request(event: Event) -> Option<Request>;
    /// What the operation emits when the provider did it, and when it refused.
    fn done(request: Request) -> Event;
    fn refused(request: Request, detail: String) -> Event;
    /// The payment's status once this movement is recorded (a statement on
    /// `payments.payments` for `$1`, the order).
    const STATUS_AFTER: &'static str;
}

/// Captures a shipment's share (or, for a request without a part, the whole authorization):
/// `checkout.ship_requested` -> `checkout.captured`.
pub struct Capture;

/// Refunds part of the captured money (or, without a part, all of it):
/// `checkout.refund_requested` -> `checkout.refunded`.
pub struct Refund;

impl Operation for Capture {
    const NAME: &'static str = "capture";
    const CONSUMES: EventKind = EventKind::ShipRequested;
    const STATUS_AFTER: &'static str = "UPDATE payments.payments SET status = 'captured',
             updated_at = now()
         WHERE order_id = $1 AND status = 'authorized'";

    async fn call(
        provider: &dyn PaymentProvider,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        provider.capture(auth_id, amount, key).await
    }

    fn request(event: Event) -> Option<Request> {
        match event {
            Event::ShipRequested {
                checkout,
                attempt,
                part,
            } => Some(Request {
                checkout,
                attempt,
                part,
            }),
            _ => None,
        }
    }

    fn done(r: Request) -> Event {
        Event::Captured {
            checkout: r.checkout,
            attempt: r.attempt,
            part: r.part,
        }
    }

    fn refused(r: Request, detail: String) -> Event {
        Event::CaptureFailed {
            checkout: r.checkout,
            detail,
            attempt: r.attempt,
            part: r.part,
        }
    }
}

impl Operation for Refund {
    const NAME: &'static str = "refund";
    const CONSUMES: EventKind = EventKind::RefundRequested;
    // Refunded once every captured unit of money went back.
    const STATUS_AFTER: &'static str = "UPDATE payments.payments SET status = 'refunded',
             updated_at = now()
         WHERE order_id = $1 AND status = 'captured'
           AND (SELECT coalesce(sum(amount) FILTER (WHERE kind = 'refund'), 0)
                     >= coalesce(sum(amount) FILTER (WHERE kind = 'capture'), 0)
                FROM payments.movements m WHERE m.order_id = $1)";

    async fn call(
        provider: &dyn PaymentProvider,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        provider.refund(auth_id, amount, key).await
    }

    fn request(event: Event) -> Option<Request> {
        match event {
            Event::RefundRequested {
                checkout,
                attempt,
                part,
            } => Some(Request {
                checkout,
                attempt,
                part,
            }),
            _ => None,
        }
    }

    fn done(r: Request) -> Event {
        Event::Refunded {
            checkout: r.checkout,
            attempt: r.attempt,
            part: r.part,
        }
    }

    fn refused(r: Request, detail: String) -> Event {
        Event::RefundFailed {
            checkout: r.checkout,
            detail,
            attempt: r.attempt,
            part: r.part,
        }
    }
}

/// The step that settles an operation at the provider and records it on the payment.
pub struct Settle<O> {
    pub leases: Leases,
    pub provider: Arc<dyn PaymentProvider>,
    pub operation: PhantomData<O>,
}

/// Consumes `checkout.ship_requested`: captures the shipment's share.
pub type CaptureStep = Settle<Capture>;
/// Consumes `checkout.refund_requested`: refunds the refund's amount.
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

/// A request to settle: the order, which attempt, and which part (none: the whole order).
#[derive(Clone)]
pub struct Request {
    checkout: Checkout,
    attempt: u32,
    part: Option<Part>,
}

impl Request {
    /// The ledger's key for this movement: the part's id, or `whole`.
    fn key(&self) -> String {
        self.part
            .as_ref()
            .map_or_else(|| "whole".to_owned(), |p| p.id.to_string())
    }
}

/// What the provider answered.
pub enum Settled {
    /// Done: how much moved, at which provider, under which of its ids (none for nothing
    /// to move, e.g. a shipment of free units).
    Done {
        amount: Decimal,
        provider: String,
        provider_ref: Option<String>,
    },
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
        O::request(event).ok_or_else(|| format!("{} cannot handle {kind:?}", O::NAME))
    }

    async fn prepare(&self, request: &Request, _: &Delivery) -> Result<Settled, StepError> {
        let order_id = request.checkout.order_id;
        let held = authorization(&self.leases, order_id).await?;
        let (amount, key) = match &request.part {
            Some(part) => (
                part.amount,
                idempotency_key(order_id, &format!("{}:{}", O::NAME, part.id)),
            ),
            None => (held.amount, attempt_key(order_id, O::NAME, request.attempt)),
        };
        if amount <= Decimal::ZERO {
            return Ok(Settled::Done {
                amount: Decimal::ZERO,
                provider: held.provider,
                provider_ref: None,
            });
        }
        match O::call(self.provider.as_ref(), &held.auth_id, amount, &key).await {
            Ok(id) => Ok(Settled::Done {
                amount,
                provider: held.provider,
                provider_ref: Some(id),
            }),
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
            let mut request = (*request).clone();
            let event = match settled {
                Settled::Refused(detail) => O::refused(request, detail.clone()),
                Settled::Done {
                    amount,
                    provider,
                    provider_ref,
                } => {
                    record_movement(
                        tx,
                        O::NAME,
                        &request,
                        *amount,
                        provider,
                        provider_ref.as_ref(),
                    )
                    .await?;
                    sqlx::query(O::STATUS_AFTER)
                        .bind(request.checkout.order_id)
                        .execute(&mut *tx.conn)
                        .await?;
                    if let Some(part) = request.part.as_mut() {
                        part.provider_ref.clone_from(provider_ref);
                    }
                    O::done(request)
                }
            };
            outputs.push(vec![event]);
        }
        Ok(outputs)
    }
}

/// Writes the movement into the payments ledger (once per order, kind and part).
async fn record_movement(
    tx: &mut Tx<'_>,
    kind: &str,
    request: &Request,
    amount: Decimal,
    provider: &str,
    provider_ref: Option<&String>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments.movements (order_id, kind, key, amount, provider, provider_ref)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(request.checkout.order_id)
    .bind(kind)
    .bind(request.key())
    .bind(amount)
    .bind(provider)
    .bind(provider_ref)
    .execute(&mut *tx.conn)
    .await?;
    Ok(())
}

/// An order's authorization: its provider id, amount and provider.
struct Held {
    auth_id: String,
    amount: Decimal,
    provider: String,
}

/// The order's authorization, if it has one.
async fn authorization(leases: &Leases, order_id: Uuid) -> Result<Held, StepError> {
    let row: Option<(Option<String>, Decimal, String)> = sqlx::query_as(
        "SELECT auth_id, amount, provider FROM payments.payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(leases.pool())
    .await?;
    match row {
        Some((Some(auth_id), amount, provider)) => Ok(Held {
            auth_id,
            amount,
            provider,
        }),
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
