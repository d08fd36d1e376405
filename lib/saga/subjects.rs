//! Stream names, subjects, headers and `Nats-Msg-Id` formulas. `subjects.md` documents them.

use uuid::Uuid;

use super::kind::EventKind;

/// The stream holding every saga event (when not partitioned).
pub const CHECKOUT_STREAM: &str = "CHECKOUT";
/// Every saga subject: `checkout.<event>.<order_id>`.
pub const CHECKOUT_SUBJECTS: &str = "checkout.>";

/// The saga stream of partition `p` of `k`: `CHECKOUT` when `k` is 1, else `CHECKOUT-<p>`.
pub fn checkout_stream(p: u32, k: u32) -> String {
    if k <= 1 {
        CHECKOUT_STREAM.to_owned()
    } else {
        format!("{CHECKOUT_STREAM}-{p}")
    }
}

/// What that stream stores: every saga subject when `k` is 1; else the subjects the servers'
/// mapping sends to partition `p`, `checkout.<event>.<order_id>.<p>`.
pub fn checkout_stream_subjects(p: u32, k: u32) -> String {
    if k <= 1 {
        CHECKOUT_SUBJECTS.to_owned()
    } else {
        format!("checkout.*.*.{p}")
    }
}

/// Every saga stream of `k` partitions.
pub fn checkout_streams(k: u32) -> Vec<String> {
    (0..k.max(1)).map(|p| checkout_stream(p, k)).collect()
}

/// The partition of an order's events: FNV-1a (32 bits) of the order id as text, modulo `k`.
/// The same as the servers' `{{partition(k,2)}}` mapping computes (nats-server hashes the
/// selected token with FNV-1a), so the code can find an order's stream without asking.
pub fn partition_of(order_id: Uuid, k: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in order_id.to_string().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % k.max(1)
}

/// The filter matching one order's events in its stream.
pub fn order_filter(order_id: Uuid, k: u32) -> String {
    if k <= 1 {
        format!("checkout.*.{order_id}")
    } else {
        format!("checkout.*.{order_id}.*")
    }
}
/// Subject prefix of the partition probes (`Bus::check_partitions`): published with an
/// impossible expected sequence, so no stream ever stores one.
pub const PROBE_PREFIX: &str = "checkout.probe";

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

/// The filter matching every order's events of one kind, partitioned (a fourth token) or not.
pub fn event_filter(kind: EventKind) -> String {
    format!("checkout.{}.>", kind.as_str())
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

/// The message id of a provider's webhook event: one per provider event, whatever its id's
/// characters (hashed), so a webhook delivered twice is one message and one inbox key.
pub fn provider_update_msg_id(order_id: Uuid, provider: &str, event_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{provider}\n{event_id}").as_bytes());
    format!(
        "{order_id}.{}.{}",
        EventKind::ProviderUpdate.as_str(),
        hex::encode(&digest[..12])
    )
}

/// The dead-letter subject of a consumer.
pub fn deadletter_subject(consumer: &str) -> String {
    format!("deadletter.{consumer}")
}

/// The dedup id of a dead letter: one per stream, consumer and stream sequence. The stream
/// is part of it because each partition's stream counts its sequences from 1: without it, two
/// partitions' poison messages at the same sequence would share an id and the second would be
/// dropped as a duplicate.
pub fn deadletter_msg_id(stream: &str, consumer: &str, stream_sequence: u64) -> String {
    format!("{stream}.{consumer}.{stream_sequence}")
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
        assert_eq!(event_filter(EventKind::Failed), "checkout.failed.>");
    }

    #[test]
    fn partitions_name_their_streams_and_split_orders_evenly() {
        assert_eq!(checkout_streams(1), ["CHECKOUT"]);
        assert_eq!(
            checkout_streams(3),
            ["CHECKOUT-0", "CHECKOUT-1", "CHECKOUT-2"]
        );
        assert_eq!(checkout_stream_subjects(2, 3), "checkout.*.*.2");
        assert_eq!(partition_of(Uuid::now_v7(), 1), 0);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[partition_of(Uuid::now_v7(), 3) as usize] += 1;
        }
        assert!(counts.iter().all(|n| (800..1200).contains(n)), "{counts:?}");
    }
}
