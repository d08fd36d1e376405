//! Saga events. Every event carries the full checkout snapshot (fat events), so each step
//! can act without asking another service, and a replay from the stream alone is complete.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{Address, Currency, Quantity, Sku};
pub use crate::saga::kind::EventKind;

/// The payload schema version, also sent as the `Checkout-Schema` header and as the payload's
/// `v` field. 2 added attempt numbers to repeatable actions and the `timed_out` and
/// `cancel_failed` events; version 1 payloads still decode (missing fields take defaults).
/// Shipments and refunds in parts added an optional `part` to their events: an event without
/// one is a whole-order request. An older capture or refund step would ignore the part and
/// settle the whole order, so a rolling upgrade updates the authorize role before the edges.
pub const SCHEMA_VERSION: u32 = 2;

/// One priced line, frozen at checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: Sku,
    pub qty: Quantity,
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
    pub currency: Currency,
    pub payment_token: String,
    /// Where the order ships. Only in the edge's stored request: no step needs it, so events
    /// on the bus carry none (older payloads did; they still decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    pub requested_at: DateTime<Utc>,
    /// The promotion that was applied (redeemed when the order is confirmed).
    #[serde(default)]
    pub promo_code: Option<String>,
    /// `standard` or `express`.
    #[serde(default)]
    pub shipping_method: Option<String>,
    /// Where the provider sends the buyer back after a payment challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_url: Option<String>,
}

impl Checkout {
    /// This checkout without its payment token. Only the authorize step uses the token, so
    /// every event after it (and a rejection before it) is built from this: no later event,
    /// inbox row or dead letter carries it.
    pub fn spent(mut self) -> Self {
        self.payment_token.clear();
        self
    }

    /// This checkout as it travels on the bus: without the address (see `address`).
    pub fn for_the_bus(mut self) -> Self {
        self.address = None;
        self
    }
}

/// A SKU's stock as the reserve step left it: a line it could not serve, or the last units it
/// took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Short {
    pub sku: String,
    /// Units that were still available (fewer than the line asked for; 0 when emptied).
    pub available: i64,
    /// The stock row's version after the step's transaction (`inventory.stock.version`), so
    /// that an edge hearing notices out of order keeps the newest. None from older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
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
    /// The saga did not finish within the watchdog's limit (a step's message was lost or
    /// dead-lettered); compensation unwound whatever had happened.
    TimedOut,
    /// The buyer failed (or refused) the provider's authentication challenge (3-D Secure).
    AuthenticationFailed,
    /// The buyer did not complete the challenge within `payments.action_timeout`.
    AuthenticationTimeout,
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
            Self::TimedOut => "timed_out",
            Self::AuthenticationFailed => "authentication_failed",
            Self::AuthenticationTimeout => "authentication_timeout",
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
        /// SKUs whose last units this reservation took (sold out from now on). Older
        /// versions sent their names as `emptied`, which only their own process read.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sold_out: Vec<Short>,
    },
    /// reserve or order -> compensate: a line could not be held (or, after its hold expired,
    /// taken again), or the order could not be confirmed; compensation gives back what is held.
    Rejected {
        checkout: Checkout,
        reason: FailureReason,
        detail: String,
        /// The lines that lacked stock (`out_of_stock`), with what was left.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        short: Vec<Short>,
    },
    /// authorize -> order: the PSP authorized the total.
    Authorized {
        checkout: Checkout,
        payment_id: Uuid,
        auth_id: String,
    },
    /// No longer emitted: older versions' inventory-commit step -> order, once the order's
    /// units left stock. The order step still confirms one in flight.
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
    /// `attempt` numbers the requests of one order (a second ship after a refused capture is
    /// attempt 2), so each has its own message id and inbox key.
    ShipRequested {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// capture -> order-lifecycle: the authorized amount was captured.
    Captured {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// order-lifecycle -> anyone watching: the order is shipped.
    Shipped {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// edge -> compensate: the buyer or an admin cancelled before shipment.
    CancelRequested {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
    },
    /// compensate -> anyone watching: authorization voided, stock returned, order cancelled.
    Cancelled {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
    },
    /// compensate -> anyone watching: the provider refused the void; nothing was restocked,
    /// the order stays `confirmed` and its cancel lock is released.
    CancelFailed {
        checkout: Checkout,
        detail: String,
        #[serde(default)]
        attempt: u32,
    },
    /// edge -> refund (authorize role): an admin refunded a shipped order.
    RefundRequested {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// refund -> order-lifecycle: the captured amount was refunded.
    Refunded {
        checkout: Checkout,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// capture -> order-lifecycle: the provider refused the capture; the order stays
    /// `confirmed` and its ship lock is released.
    CaptureFailed {
        checkout: Checkout,
        detail: String,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// refund -> order-lifecycle: the provider refused the refund; the order stays `shipped`.
    RefundFailed {
        checkout: Checkout,
        detail: String,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<Part>,
    },
    /// watchdog -> compensate: the order is still pending past the watchdog's limit; fail it
    /// (`timed_out`) and unwind whatever its steps did.
    TimedOut { checkout: Checkout },
    /// authorize -> anyone watching: the provider needs the buyer (a 3-D Secure challenge at
    /// `next_action`) or will answer later by webhook (no `next_action`); the payment is
    /// `pending` until a `provider_update` or `action_expired` settles it.
    ActionRequired {
        checkout: Checkout,
        auth_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_action: Option<String>,
    },
    /// edge -> payment-updates (authorize role): a verified provider webhook, stored before it
    /// was acknowledged. One per provider event (its id is in the message id).
    ProviderUpdate {
        checkout: Checkout,
        update: ProviderUpdate,
    },
    /// payments' challenge sweeper -> payment-updates: the payment is still pending
    /// `payments.action_timeout` after it began; fail the order unless an outcome came first.
    ActionExpired { checkout: Checkout },
}

/// One shipment or refund of an order: which units, and exactly how much money (fixed when it
/// was asked for, see `orders::allocation`). Events of version 2 without it were whole-order
/// requests, which still settle as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The shipment's or refund's id (`orders.shipments`, `orders.refunds`); the provider's
    /// idempotency key names it.
    pub id: Uuid,
    pub amount: Decimal,
    /// The units it covers (none for a refund of an amount).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<PartLine>,
    /// A refund's units go back on hand.
    #[serde(default)]
    pub restock: bool,
    /// The provider's id of the capture or refund, once it is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_ref: Option<String>,
}

/// Units of one SKU in a part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartLine {
    pub sku: String,
    pub qty: i64,
}

/// A provider's webhook as the saga carries it: what happened to which authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderUpdate {
    /// The provider's name (the webhook route's `{provider}`).
    pub provider: String,
    /// The provider's event id (its dedup key).
    pub event_id: String,
    /// The provider's event type, e.g. `authorization.succeeded`.
    pub event_type: String,
    pub auth_id: String,
    pub amount: Decimal,
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_code: Option<String>,
}

/// The order id in an event id (`<order_id>.<event>`).
pub fn order_id_of(event_id: &str) -> Option<Uuid> {
    event_id
        .split('.')
        .next()
        .and_then(|s| Uuid::parse_str(s).ok())
}

/// The payload as it travels: the event's own fields plus `v`.
#[derive(Serialize, Deserialize)]
struct Versioned<'a> {
    /// Payloads before version 2 carried no `v`.
    #[serde(default = "first_version")]
    v: u32,
    #[serde(flatten)]
    event: Cow<'a, Event>,
}

fn first_version() -> u32 {
    1
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
            Self::CancelFailed { .. } => EventKind::CancelFailed,
            Self::TimedOut { .. } => EventKind::TimedOut,
            Self::ActionRequired { .. } => EventKind::ActionRequired,
            Self::ProviderUpdate { .. } => EventKind::ProviderUpdate,
            Self::ActionExpired { .. } => EventKind::ActionExpired,
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
            | Self::ShipRequested { checkout, .. }
            | Self::Captured { checkout, .. }
            | Self::Shipped { checkout, .. }
            | Self::CancelRequested { checkout, .. }
            | Self::Cancelled { checkout, .. }
            | Self::RefundRequested { checkout, .. }
            | Self::Refunded { checkout, .. }
            | Self::CaptureFailed { checkout, .. }
            | Self::RefundFailed { checkout, .. }
            | Self::CancelFailed { checkout, .. }
            | Self::TimedOut { checkout }
            | Self::ActionRequired { checkout, .. }
            | Self::ProviderUpdate { checkout, .. }
            | Self::ActionExpired { checkout } => checkout,
        }
    }

    /// The attempt number of a repeatable action's events (ship, cancel, refund); 0 for the
    /// checkout's own events, which happen at most once per order.
    pub fn attempt(&self) -> u32 {
        match self {
            Self::ShipRequested { attempt, .. }
            | Self::Captured { attempt, .. }
            | Self::Shipped { attempt, .. }
            | Self::CancelRequested { attempt, .. }
            | Self::Cancelled { attempt, .. }
            | Self::CancelFailed { attempt, .. }
            | Self::RefundRequested { attempt, .. }
            | Self::Refunded { attempt, .. }
            | Self::CaptureFailed { attempt, .. }
            | Self::RefundFailed { attempt, .. } => *attempt,
            _ => 0,
        }
    }

    /// The event's identity: its `Nats-Msg-Id` and every consumer's inbox key.
    pub fn msg_id(&self) -> String {
        if let Self::ProviderUpdate { checkout, update } = self {
            return crate::saga::subjects::provider_update_msg_id(
                checkout.order_id,
                &update.provider,
                &update.event_id,
            );
        }
        crate::saga::subjects::event_msg_id(self.kind(), self.checkout().order_id, self.attempt())
    }

    /// MessagePack with field names (so `checkout decode` can print it as JSON), with the
    /// schema version as the payload's `v` field.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(rmp_serde::to_vec_named(&Versioned {
            v: SCHEMA_VERSION,
            event: Cow::Borrowed(self),
        })?)
    }

    /// Reads a MessagePack payload of this schema version or an older one.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let versioned: Versioned<'static> = rmp_serde::from_slice(bytes)?;
        Ok(versioned.event.into_owned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A checkout of two units of one SKU, with an address, for tests across the crate.
    pub(crate) fn checkout() -> Checkout {
        Checkout {
            order_id: Uuid::nil(),
            user_id: "alice".into(),
            cart_id: Uuid::nil(),
            items: vec![Line {
                sku: Sku::parse("TEE.RED").expect("sku"),
                qty: Quantity::new(2).expect("qty"),
                unit_price: Decimal::new(1250, 2),
                line_total: Decimal::new(2500, 2),
                discount: Decimal::ZERO,
                tax: Decimal::new(500, 2),
            }],
            subtotal: Decimal::new(2500, 2),
            discount: Decimal::ZERO,
            tax: Decimal::new(500, 2),
            shipping: Decimal::ZERO,
            total: Decimal::new(3000, 2),
            currency: Currency::parse("USD").expect("currency"),
            payment_token: "tok_visa".into(),
            address: Some(Address {
                name: "Ada".into(),
                line1: "1 Main St".into(),
                city: "London".into(),
                region: None,
                postal_code: "N1".into(),
                country: "GB".into(),
            }),
            requested_at: Utc::now(),
            promo_code: None,
            shipping_method: None,
            return_url: None,
        }
    }

    #[test]
    fn events_round_trip_with_their_version() {
        #[derive(Deserialize)]
        struct Head {
            v: u32,
            #[serde(rename = "type")]
            kind: String,
        }
        let event = Event::CaptureFailed {
            checkout: checkout(),
            detail: "expired".into(),
            attempt: 3,
            part: Some(Part {
                id: Uuid::nil(),
                amount: Decimal::new(1250, 2),
                lines: vec![PartLine {
                    sku: "TEE.RED".into(),
                    qty: 1,
                }],
                restock: false,
                provider_ref: None,
            }),
        };
        let bytes = event.encode().expect("encodes");
        let head: Head = rmp_serde::from_slice(&bytes).expect("a map");
        assert_eq!(head.v, SCHEMA_VERSION);
        assert_eq!(head.kind, "capture_failed");
        assert_eq!(Event::decode(&bytes).expect("decodes"), event);
        assert_eq!(
            event.msg_id(),
            "00000000-0000-0000-0000-000000000000.capture_failed.3"
        );
    }

    #[test]
    fn version_1_payloads_still_decode() {
        // Version 1 wrote the bare event: no `v`, no attempt numbers.
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum V1 {
            ShipRequested { checkout: Checkout },
        }
        let bytes = rmp_serde::to_vec_named(&V1::ShipRequested {
            checkout: checkout(),
        })
        .expect("encodes");
        let event = Event::decode(&bytes).expect("decodes");
        assert_eq!(event.kind(), EventKind::ShipRequested);
        assert_eq!(event.attempt(), 0);
        assert_eq!(
            event.msg_id(),
            "00000000-0000-0000-0000-000000000000.ship_requested"
        );
    }

    #[test]
    fn every_kind_parses_from_its_token() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::parse("teleported"), None);
    }
}
