//! Stream names, subjects, headers and `Nats-Msg-Id` formulas. `subjects.md` documents them.

use uuid::Uuid;

use super::events::EventKind;

/// The stream holding every saga event.
pub const CHECKOUT_STREAM: &str = "CHECKOUT";
/// Every saga subject: `checkout.<event>.<order_id>`.
pub const CHECKOUT_SUBJECTS: &str = "checkout.>";
/// The stream holding messages no handler could process.
pub const DEADLETTER_STREAM: &str = "DEADLETTER";
/// Every dead-letter subject: `deadletter.<consumer>`.
pub const DEADLETTER_SUBJECTS: &str = "deadletter.>";

/// Header naming the event kind.
pub const HEADER_EVENT: &str = "Checkout-Event";
/// Header carrying the order id.
pub const HEADER_ORDER_ID: &str = "Checkout-Order-Id";
/// Header carrying the payload schema version.
pub const HEADER_SCHEMA: &str = "Checkout-Schema";
/// W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// The subject of one order's event: `checkout.<event>.<order_id>`.
pub fn event_subject(kind: EventKind, order_id: Uuid) -> String {
    format!("checkout.{}.{}", kind.as_str(), order_id)
}

/// The filter matching every order's events of one kind.
pub fn event_filter(kind: EventKind) -> String {
    format!("checkout.{}.*", kind.as_str())
}

/// The dedup id of one order's event: `<order_id>.<event>`, or `<order_id>.<event>.<attempt>`
/// for the events of a repeatable action (ship, cancel, refund). The checkout's own events
/// happen at most once per order and each action attempt at most once, so a republish after a
/// crash carries the same id and JetStream drops it.
pub fn event_msg_id(kind: EventKind, order_id: Uuid, attempt: u32) -> String {
    if attempt == 0 {
        format!("{}.{}", order_id, kind.as_str())
    } else {
        format!("{}.{}.{}", order_id, kind.as_str(), attempt)
    }
}

/// The dead-letter subject of a consumer.
pub fn deadletter_subject(consumer: &str) -> String {
    format!("deadletter.{consumer}")
}

/// The dedup id of a dead letter: one per consumer and stream sequence.
pub fn deadletter_msg_id(consumer: &str, stream_sequence: u64) -> String {
    format!("{consumer}.{stream_sequence}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_ids_are_deterministic() {
        let id = Uuid::nil();
        assert_eq!(
            event_subject(EventKind::Reserved, id),
            "checkout.reserved.00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            event_msg_id(EventKind::Reserved, id, 0),
            "00000000-0000-0000-0000-000000000000.reserved"
        );
        assert_eq!(
            event_msg_id(EventKind::ShipRequested, id, 2),
            "00000000-0000-0000-0000-000000000000.ship_requested.2"
        );
        assert_eq!(event_filter(EventKind::Failed), "checkout.failed.*");
    }
}
