//! The saga's order events, turned into webhook messages: one row per event that an endpoint
//! asked for, written in the step's transaction (with its inbox row), so each event becomes
//! one message exactly once; every endpoint reads the messages from its own cursor. Sending is the dispatcher's job, never the saga's:
//! this step only writes rows, so no endpoint can slow it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::Leases;
use crate::domain::money::format_amount;
use crate::saga::events::{Checkout, Event, EventKind, Part, PartLine};
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
        let (event_type, body) = describe(&event)?;
        Ok(Message {
            webhook_id,
            event_type,
            order_id,
            body,
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

/// A message's body: what every endpoint is sent and signs over.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    event_type: &'static str,
    timestamp: String,
    data: OrderData<'a>,
}

/// The order as its owner sees it: no payment token and no address; with what the event adds.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderData<'a> {
    order_id: uuid::Uuid,
    user_id: &'a str,
    items: Vec<ItemData<'a>>,
    subtotal: String,
    discount: String,
    tax: String,
    shipping: String,
    total: String,
    currency: &'static str,
    promo_code: Option<&'a str>,
    requested_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipment: Option<PartData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refund: Option<PartData<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemData<'a> {
    sku: &'a str,
    qty: i32,
    unit_price: String,
    line_total: String,
}

/// A shipment or refund, or the whole order for an event from before parts (its amount only).
#[derive(Serialize)]
#[serde(untagged)]
enum PartData<'a> {
    Part(PartFields<'a>),
    Whole { amount: String },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PartFields<'a> {
    id: uuid::Uuid,
    amount: String,
    lines: &'a [PartLine],
    provider_ref: Option<&'a str>,
}

/// The event's type and its message body, serialized straight from the event (no JSON tree
/// in between: this runs for every order event).
fn describe(event: &Event) -> Result<(&'static str, String), String> {
    let c = event.checkout();
    let mut data = order_data(c);
    let event_type = match event {
        Event::Confirmed { .. } => {
            data.status = Some("confirmed");
            "order.confirmed"
        }
        Event::Failed { reason, .. } => {
            data.status = Some("failed");
            data.reason = Some(reason.as_str());
            "order.failed"
        }
        Event::Cancelled { .. } => {
            data.status = Some("cancelled");
            "order.cancelled"
        }
        Event::Shipped { part, .. } => {
            data.shipment = Some(part_data(part.as_ref(), c));
            "order.shipped"
        }
        Event::Refunded { part, .. } => {
            data.refund = Some(part_data(part.as_ref(), c));
            "order.refunded"
        }
        other => return Err(format!("webhooks cannot handle {:?}", other.kind())),
    };
    let body = Body {
        event_type,
        timestamp: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        data,
    };
    let body = serde_json::to_string(&body).map_err(|e| format!("message body: {e}"))?;
    Ok((event_type, body))
}

fn order_data(c: &Checkout) -> OrderData<'_> {
    let money = |amount| format_amount(amount, c.currency);
    OrderData {
        order_id: c.order_id,
        user_id: &c.user_id,
        items: c
            .items
            .iter()
            .map(|l| ItemData {
                sku: l.sku.as_str(),
                qty: l.qty.get(),
                unit_price: money(l.unit_price),
                line_total: money(l.line_total),
            })
            .collect(),
        subtotal: money(c.subtotal),
        discount: money(c.discount),
        tax: money(c.tax),
        shipping: money(c.shipping),
        total: money(c.total),
        currency: c.currency.code(),
        promo_code: c.promo_code.as_deref(),
        requested_at: c.requested_at,
        status: None,
        reason: None,
        shipment: None,
        refund: None,
    }
}

fn part_data<'a>(part: Option<&'a Part>, c: &Checkout) -> PartData<'a> {
    match part {
        Some(p) => PartData::Part(PartFields {
            id: p.id,
            amount: format_amount(p.amount, c.currency),
            lines: &p.lines,
            provider_ref: p.provider_ref.as_deref(),
        }),
        None => PartData::Whole {
            amount: format_amount(c.total, c.currency),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::saga::events::FailureReason;
    use rust_decimal::Decimal;
    use serde_json::{json, Value};

    /// The crate's test checkout, at a fixed time so its `requestedAt` can be compared.
    fn checkout() -> Checkout {
        Checkout {
            requested_at: "2026-12-05T10:00:00Z".parse().expect("time"),
            ..crate::saga::events::tests::checkout()
        }
    }

    fn body(event: &Event) -> Value {
        let (kind, body) = describe(event).expect("describes");
        let body: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["type"], kind);
        assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        body["data"].clone()
    }

    #[test]
    fn a_message_shows_the_order_as_its_owner_sees_it_and_what_the_event_adds() {
        let order = json!({
            "orderId": uuid::Uuid::nil(), "userId": "alice",
            "items": [{"sku": "TEE.RED", "qty": 2, "unitPrice": "12.50", "lineTotal": "25.00"}],
            "subtotal": "25.00", "discount": "0.00", "tax": "5.00", "shipping": "0.00",
            "total": "30.00", "currency": "USD", "promoCode": null,
            "requestedAt": "2026-12-05T10:00:00Z",
        });
        let with = |extra: Value| {
            let mut o = order.clone();
            if let (Some(o), Value::Object(extra)) = (o.as_object_mut(), extra) {
                o.extend(extra);
            }
            o
        };
        let c = checkout();
        assert_eq!(
            body(&Event::Confirmed {
                checkout: c.clone()
            }),
            with(json!({"status": "confirmed"}))
        );
        assert_eq!(
            body(&Event::Failed {
                checkout: c.clone(),
                reason: FailureReason::PaymentDeclined
            }),
            with(json!({"status": "failed", "reason": "payment_declined"}))
        );
        let part = Part {
            id: uuid::Uuid::nil(),
            amount: Decimal::new(1250, 2),
            lines: vec![PartLine {
                sku: "TEE.RED".into(),
                qty: 1,
            }],
            restock: false,
            provider_ref: None,
        };
        assert_eq!(
            body(&Event::Shipped {
                checkout: c.clone(),
                attempt: 1,
                part: Some(part),
            }),
            with(
                json!({"shipment": {"id": uuid::Uuid::nil(), "amount": "12.50",
                                     "lines": [{"sku": "TEE.RED", "qty": 1}],
                                     "providerRef": null}})
            )
        );
        // An event from before shipments were parts: the whole order.
        assert_eq!(
            body(&Event::Refunded {
                checkout: c,
                attempt: 1,
                part: None,
            }),
            with(json!({"refund": {"amount": "30.00"}}))
        );
    }

    #[test]
    fn an_event_keeps_its_message_id_and_two_events_differ() {
        let a = webhook_id("0193.confirmed");
        assert_eq!(a, webhook_id("0193.confirmed"));
        assert_ne!(a, webhook_id("0193.shipped.1"));
        assert!(a.starts_with("msg_") && a.len() == 28);
    }
}
