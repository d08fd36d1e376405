//! The saga's order events, turned into webhook messages: one row per event that an endpoint
//! asked for, written in the step's transaction (with its inbox row), so each event becomes
//! one message exactly once; every endpoint reads the messages from its own cursor. Sending is the dispatcher's job, never the saga's:
//! this step only writes rows, so no endpoint can slow it.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::db::Leases;
use crate::domain::money::format_amount;
use crate::saga::events::{Checkout, Event, EventKind, Part};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// Consumes `checkout.confirmed`, `failed`, `shipped`, `cancelled` and `refunded`; writes
/// `webhooks.messages`.
pub struct FeedStep {
    pub leases: Leases,
}

/// One message for the shop's endpoints.
pub struct Message {
    /// `msg_` and 24 hex digits of the event's id: the same on every attempt and endpoint.
    webhook_id: String,
    event_type: &'static str,
    order_id: uuid::Uuid,
    /// The JSON body, as signed and sent.
    body: String,
}

/// The Standard Webhooks message id of a saga event.
pub fn webhook_id(event_id: &str) -> String {
    let digest = Sha256::digest(event_id.as_bytes());
    format!("msg_{}", &hex::encode(digest)[..24])
}

impl Step for FeedStep {
    const DURABLE: &'static str = "webhooks";
    const INBOX: InboxTable = InboxTable::Orders;
    const SHAPE: Shape = Shape::Batch;
    type Input = Message;
    type Found = ();

    fn consumes(&self) -> Vec<EventKind> {
        vec![
            EventKind::Confirmed,
            EventKind::Failed,
            EventKind::Shipped,
            EventKind::Cancelled,
            EventKind::Refunded,
        ]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Message, String> {
        let webhook_id = webhook_id(&event.msg_id());
        let order_id = event.checkout().order_id;
        let (event_type, data) = describe(&event)?;
        let body = json!({
            "type": event_type,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": data,
        });
        Ok(Message {
            webhook_id,
            event_type,
            order_id,
            body: body.to_string(),
        })
    }

    async fn prepare(&self, _: &Message, _: &Delivery) -> Result<(), StepError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Message, &())],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        // One statement for the whole pull: a round trip per batch, not per event.
        let ids: Vec<&str> = items.iter().map(|(m, ())| m.webhook_id.as_str()).collect();
        let kinds: Vec<&str> = items.iter().map(|(m, ())| m.event_type).collect();
        let orders: Vec<uuid::Uuid> = items.iter().map(|(m, ())| m.order_id).collect();
        let bodies: Vec<&str> = items.iter().map(|(m, ())| m.body.as_str()).collect();
        // The message once, if an endpoint wants its type; each endpoint reads it from its
        // cursor (dispatch.rs), so nothing here is written per endpoint.
        let queued = sqlx::query(
            "INSERT INTO webhooks.messages (webhook_id, event_type, order_id, body)
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[])
                    AS m(webhook_id, event_type, order_id, body)
             WHERE EXISTS (SELECT 1 FROM webhooks.endpoints e
                           WHERE e.status = 'enabled' AND e.deleted_at IS NULL
                             AND m.event_type = ANY(e.events))
             ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(&kinds)
        .bind(&orders)
        .bind(&bodies)
        .execute(&mut *tx.conn)
        .await?
        .rows_affected();
        if queued > 0 {
            tx.after_commit(move || crate::metrics::webhook_queued(queued));
        }
        Ok(vec![Vec::new(); items.len()])
    }
}

/// The event's type and the order as its message shows it: what the order's owner sees, no
/// payment token and no address.
fn describe(event: &Event) -> Result<(&'static str, Value), String> {
    let (kind, extra) = match event {
        Event::Confirmed { .. } => ("order.confirmed", json!({"status": "confirmed"})),
        Event::Failed { reason, .. } => (
            "order.failed",
            json!({"status": "failed", "reason": reason.as_str()}),
        ),
        Event::Cancelled { .. } => ("order.cancelled", json!({"status": "cancelled"})),
        Event::Shipped { part, .. } => (
            "order.shipped",
            json!({"shipment": part_json(part.as_ref(), event.checkout())}),
        ),
        Event::Refunded { part, .. } => (
            "order.refunded",
            json!({"refund": part_json(part.as_ref(), event.checkout())}),
        ),
        other => return Err(format!("webhooks cannot handle {:?}", other.kind())),
    };
    let mut data = order_json(event.checkout());
    if let (Some(fields), Value::Object(more)) = (data.as_object_mut(), extra) {
        fields.extend(more);
    }
    Ok((kind, data))
}

fn order_json(c: &Checkout) -> Value {
    let money = |amount| format_amount(amount, c.currency);
    json!({
        "orderId": c.order_id,
        "userId": c.user_id,
        "items": c.items.iter().map(|l| json!({
            "sku": l.sku.as_str(),
            "qty": l.qty.get(),
            "unitPrice": money(l.unit_price),
            "lineTotal": money(l.line_total),
        })).collect::<Vec<_>>(),
        "subtotal": money(c.subtotal),
        "discount": money(c.discount),
        "tax": money(c.tax),
        "shipping": money(c.shipping),
        "total": money(c.total),
        "currency": c.currency.code(),
        "promoCode": c.promo_code,
        "requestedAt": c.requested_at,
    })
}

/// A shipment or refund (the whole order for an event from before parts).
fn part_json(part: Option<&Part>, c: &Checkout) -> Value {
    match part {
        Some(p) => json!({
            "id": p.id,
            "amount": format_amount(p.amount, c.currency),
            "lines": p.lines,
            "providerRef": p.provider_ref,
        }),
        None => json!({"amount": format_amount(c.total, c.currency)}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_keeps_its_message_id_and_two_events_differ() {
        let a = webhook_id("0193.confirmed");
        assert_eq!(a, webhook_id("0193.confirmed"));
        assert_ne!(a, webhook_id("0193.shipped.1"));
        assert!(a.starts_with("msg_") && a.len() == 28);
    }
}
