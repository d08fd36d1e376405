//! Saga events. Every event carries the full checkout snapshot (fat events), so each step
//! can act without asking another service, and a replay from the stream alone is complete.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{Address, Sku};

/// The payload schema version, also sent as the `Checkout-Schema` header.
pub const SCHEMA_VERSION: u32 = 1;

/// One priced line, frozen at checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: Sku,
    pub qty: i32,
    pub unit_price: Decimal,
    pub line_total: Decimal,
    /// This line's share of the discount.
    #[serde(default)]
    pub discount: Decimal,
    /// Tax on `line_total - discount`.
    #[serde(default)]
    pub tax: Decimal,
}

/// What the buyer asked for, priced by the edge at the moment of checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    pub order_id: Uuid,
    pub user_id: String,
    pub cart_id: Uuid,
    pub items: Vec<Line>,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub shipping: Decimal,
    pub total: Decimal,
    pub currency: String,
    pub payment_token: String,
    pub address: Address,
    pub requested_at: DateTime<Utc>,
    /// The promotion that was applied (redeemed when the order is confirmed).
    #[serde(default)]
    pub promo_code: Option<String>,
    /// `standard` or `express`.
    #[serde(default)]
    pub shipping_method: Option<String>,
}

/// Why an order failed or ended early; the `reason` the API shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    OutOfStock,
    PaymentDeclined,
    /// The hold lapsed before payment and the stock was gone when it came.
    ReservationExpired,
    /// The provider approved, but its risk score is above our policy's limit.
    FraudSuspected,
    /// The provider did not answer after every allowed attempt.
    PaymentUnavailable,
    /// The promotion's usage limit was reached by other orders first.
    PromoExhausted,
    /// This customer already used the promotion as often as allowed.
    PromoLimitReached,
    /// The buyer (or an admin) cancelled before shipment.
    CustomerCancelled,
}

impl FailureReason {
    /// The reason as the API and the database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "out_of_stock",
            Self::PaymentDeclined => "payment_declined",
            Self::ReservationExpired => "reservation_expired",
            Self::FraudSuspected => "fraud_suspected",
            Self::PaymentUnavailable => "payment_unavailable",
            Self::PromoExhausted => "promo_exhausted",
            Self::PromoLimitReached => "promo_limit_reached",
            Self::CustomerCancelled => "customer_cancelled",
        }
    }
}

fn declined_by_provider() -> FailureReason {
    FailureReason::PaymentDeclined
}

/// Every event of the checkout saga. The variant is also the subject's second token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// edge -> reserve: a priced checkout was accepted.
    Requested { checkout: Checkout },
    /// reserve -> authorize: every line is held until `expires_at`.
    Reserved {
        checkout: Checkout,
        expires_at: DateTime<Utc>,
    },
    /// reserve or inventory-commit -> compensate: a line could not be held (or, after its
    /// hold expired, taken again); nothing is held.
    Rejected {
        checkout: Checkout,
        reason: FailureReason,
        detail: String,
    },
    /// authorize -> inventory-commit: the PSP authorized the total.
    Authorized {
        checkout: Checkout,
        payment_id: Uuid,
        auth_id: String,
    },
    /// inventory-commit -> order: the order's units left stock (re-taken if the hold lapsed).
    Committed {
        checkout: Checkout,
        payment_id: Uuid,
        auth_id: String,
    },
    /// authorize -> compensate: no usable authorization (declined, too risky, or the
    /// provider never answered).
    Declined {
        checkout: Checkout,
        decline_code: String,
        #[serde(default = "declined_by_provider")]
        reason: FailureReason,
    },
    /// order -> anyone watching: the order exists and is confirmed.
    Confirmed { checkout: Checkout },
    /// compensate -> anyone watching: the saga is unwound and the order is failed.
    Failed {
        checkout: Checkout,
        reason: FailureReason,
    },
    /// edge -> capture (authorize role): an admin shipped the order; capture the payment.
    ShipRequested { checkout: Checkout },
    /// capture -> order-lifecycle: the authorized amount was captured.
    Captured { checkout: Checkout },
    /// order-lifecycle -> anyone watching: the order is shipped.
    Shipped { checkout: Checkout },
    /// edge -> compensate: the buyer or an admin cancelled before shipment.
    CancelRequested { checkout: Checkout },
    /// compensate -> anyone watching: stock returned, authorization voided, order cancelled.
    Cancelled { checkout: Checkout },
    /// edge -> refund (authorize role): an admin refunded a shipped order.
    RefundRequested { checkout: Checkout },
    /// refund -> order-lifecycle: the captured amount was refunded.
    Refunded { checkout: Checkout },
    /// capture -> order-lifecycle: the provider refused the capture; the order stays
    /// `confirmed` and its ship lock is released.
    CaptureFailed { checkout: Checkout, detail: String },
    /// refund -> order-lifecycle: the provider refused the refund; the order stays `shipped`.
    RefundFailed { checkout: Checkout, detail: String },
}

/// The event's kind, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Requested,
    Reserved,
    Rejected,
    Authorized,
    Committed,
    Declined,
    Confirmed,
    Failed,
    ShipRequested,
    Captured,
    Shipped,
    CancelRequested,
    Cancelled,
    RefundRequested,
    Refunded,
    CaptureFailed,
    RefundFailed,
}

impl EventKind {
    /// The token used in subjects, message ids and the `Checkout-Event` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Reserved => "reserved",
            Self::Rejected => "rejected",
            Self::Authorized => "authorized",
            Self::Committed => "committed",
            Self::Declined => "declined",
            Self::Confirmed => "confirmed",
            Self::Failed => "failed",
            Self::ShipRequested => "ship_requested",
            Self::Captured => "captured",
            Self::Shipped => "shipped",
            Self::CancelRequested => "cancel_requested",
            Self::Cancelled => "cancelled",
            Self::RefundRequested => "refund_requested",
            Self::Refunded => "refunded",
            Self::CaptureFailed => "capture_failed",
            Self::RefundFailed => "refund_failed",
        }
    }
}

/// The order id in an event id (`<order_id>.<event>`).
pub fn order_id_of(event_id: &str) -> Option<Uuid> {
    event_id
        .split('.')
        .next()
        .and_then(|s| Uuid::parse_str(s).ok())
}

/// A payload that is not a saga event of this schema.
#[derive(Debug, thiserror::Error)]
#[error("undecodable payload: {0}")]
pub struct DecodeError(#[from] rmp_serde::decode::Error);

/// An event that cannot be encoded (never happens for well-formed values).
#[derive(Debug, thiserror::Error)]
#[error("unencodable event: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Requested { .. } => EventKind::Requested,
            Self::Reserved { .. } => EventKind::Reserved,
            Self::Rejected { .. } => EventKind::Rejected,
            Self::Authorized { .. } => EventKind::Authorized,
            Self::Committed { .. } => EventKind::Committed,
            Self::Declined { .. } => EventKind::Declined,
            Self::Confirmed { .. } => EventKind::Confirmed,
            Self::Failed { .. } => EventKind::Failed,
            Self::ShipRequested { .. } => EventKind::ShipRequested,
            Self::Captured { .. } => EventKind::Captured,
            Self::Shipped { .. } => EventKind::Shipped,
            Self::CancelRequested { .. } => EventKind::CancelRequested,
            Self::Cancelled { .. } => EventKind::Cancelled,
            Self::RefundRequested { .. } => EventKind::RefundRequested,
            Self::Refunded { .. } => EventKind::Refunded,
            Self::CaptureFailed { .. } => EventKind::CaptureFailed,
            Self::RefundFailed { .. } => EventKind::RefundFailed,
        }
    }

    /// The checkout this event belongs to.
    pub fn checkout(&self) -> &Checkout {
        match self {
            Self::Requested { checkout }
            | Self::Reserved { checkout, .. }
            | Self::Rejected { checkout, .. }
            | Self::Authorized { checkout, .. }
            | Self::Committed { checkout, .. }
            | Self::Declined { checkout, .. }
            | Self::Confirmed { checkout }
            | Self::Failed { checkout, .. }
            | Self::ShipRequested { checkout }
            | Self::Captured { checkout }
            | Self::Shipped { checkout }
            | Self::CancelRequested { checkout }
            | Self::Cancelled { checkout }
            | Self::RefundRequested { checkout }
            | Self::Refunded { checkout }
            | Self::CaptureFailed { checkout, .. }
            | Self::RefundFailed { checkout, .. } => checkout,
        }
    }

    /// MessagePack with field names, so `checkout decode` can print it as JSON.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Reads a MessagePack payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}
