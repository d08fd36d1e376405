//! After confirmation: requests to ship, cancel or refund (a pending action is a semantic
//! lock that stops conflicting requests), and the step that records their outcomes.

use sqlx::PgConnection;
use uuid::Uuid;

use super::parts::{self, PartKind};
use super::status::{Action, OrderStatus};
use crate::db::Leases;
use crate::saga::events::{Event, EventKind, FailureReason, Part};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// The answer to a request.
#[derive(Debug, PartialEq, Eq)]
pub enum ActionRequest {
    /// Locked for this action now (or already, by an earlier identical request): publish the
    /// request of this attempt (a new number each time the lock is taken afresh).
    Accepted { attempt: u32 },
    /// Already done: nothing more to do.
    AlreadyDone,
    /// The order is in a state that does not allow it (`None`: not recorded yet, the saga
    /// is still running), or another action is in flight.
    Refused {
        status: Option<OrderStatus>,
        in_flight: Option<Action>,
    },
}

/// Locks the order for `action` if its state allows it, inside the caller's transaction (which
/// also stages the request in the edge's outbox). Taking a free lock starts a new attempt;
/// asking again while it is held repeats the current one.
pub async fn request_action(
    conn: &mut PgConnection,
    order_id: Uuid,
    action: Action,
) -> Result<ActionRequest, sqlx::Error> {
    // In SET, `pending_action` is the old value: a free lock starts a new attempt.
    let locked: Option<(i32,)> = sqlx::query_as(
        "UPDATE orders.orders SET pending_action = $2,
             action_attempt = action_attempt + CASE WHEN pending_action IS NULL THEN 1 ELSE 0 END,
             updated_at = now()
         WHERE order_id = $1 AND status = ANY($3::text[])
           AND (pending_action IS NULL OR pending_action = $2)
         RETURNING action_attempt",
    )
    .bind(order_id)
    .bind(action)
    .bind(allowed(action))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((attempt,)) = locked {
        return Ok(ActionRequest::Accepted {
            attempt: u32::try_from(attempt).unwrap_or(0),
        });
    }
    let row: Option<(OrderStatus, Option<Action>)> =
        sqlx::query_as("SELECT status, pending_action FROM orders.orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(conn)
            .await?;
    Ok(match row {
        Some((status, _)) if status == action.final_status() => ActionRequest::AlreadyDone,
        Some((status, in_flight)) => ActionRequest::Refused {
            status: Some(status),
            in_flight,
        },
        None => ActionRequest::Refused {
            status: None,
            in_flight: None,
        },
    })
}

/// The statuses that allow `action`, as the database spells them.
fn allowed(action: Action) -> Vec<&'static str> {
    action.allowed_from().iter().map(|s| s.as_str()).collect()
}

/// Records a finished whole-order action and releases the lock.
async fn finish_action(
    conn: &mut PgConnection,
    order_id: Uuid,
    action: Action,
    reason: Option<FailureReason>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE orders.orders SET status = $2, pending_action = NULL,
             reason = coalesce($3, reason), updated_at = now()
         WHERE order_id = $1 AND status = ANY($4::text[])",
    )
    .bind(order_id)
    .bind(action.final_status())
    .bind(reason.map(FailureReason::as_str))
    .bind(allowed(action))
    .execute(conn)
    .await?;
    Ok(())
}

/// Releases an action attempt's lock without changing the status (the provider refused it),
/// so the action can be asked for again (as the next attempt).
pub async fn release_action(
    conn: &mut PgConnection,
    order_id: Uuid,
    action: Action,
    attempt: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE orders.orders SET pending_action = NULL, updated_at = now()
         WHERE order_id = $1 AND pending_action = $2 AND (action_attempt = $3 OR $3 = 0)",
    )
    .bind(order_id)
    .bind(action)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// Consumes `checkout.captured` (the shipment shipped, emits `checkout.shipped`),
/// `checkout.refunded` (the refund is done, its units restocked if asked), and
/// `checkout.capture_failed` / `checkout.refund_failed` (the part failed, the lock is
/// released). The order's status follows from its parts.
pub struct LifecycleStep {
    pub leases: Leases,
    /// Where units given back by a refund are announced to every edge.
    pub notices: Option<async_nats::Client>,
}

/// An action's outcome, as the order records it.
pub struct Outcome {
    order_id: Uuid,
    action: Action,
    /// Why the provider refused (none: done).
    failure: Option<String>,
    attempt: u32,
    /// The shipment or refund (none: a whole-order request from before parts).
    part: Option<Part>,
    /// What the order announces.
    outputs: Vec<Event>,
}

impl Step for LifecycleStep {
    const DURABLE: &'static str = "order-lifecycle";
    const INBOX: InboxTable = InboxTable::Orders;
    const SHAPE: Shape = Shape::Batch;
    type Input = Outcome;
    type Found = ();

    fn consumes(&self) -> Vec<EventKind> {
        vec![
            EventKind::Captured,
            EventKind::Refunded,
            EventKind::CaptureFailed,
            EventKind::RefundFailed,
        ]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Outcome, String> {
        let (order_id, attempt) = (event.checkout().order_id, event.attempt());
        let (action, failure, part, outputs) = match event {
            Event::Captured {
                checkout,
                attempt,
                part,
            } => (
                Action::Ship,
                None,
                part.clone(),
                vec![Event::Shipped {
                    checkout,
                    attempt,
                    part,
                }],
            ),
            Event::Refunded { part, .. } => (Action::Refund, None, part, Vec::new()),
            Event::CaptureFailed { detail, part, .. } => {
                (Action::Ship, Some(detail), part, Vec::new())
            }
            Event::RefundFailed { detail, part, .. } => {
                (Action::Refund, Some(detail), part, Vec::new())
            }
            other => return Err(format!("order-lifecycle cannot handle {:?}", other.kind())),
        };
        Ok(Outcome {
            order_id,
            action,
            failure,
            attempt,
            part,
            outputs,
        })
    }

    async fn prepare(&self, _: &Outcome, _: &Delivery) -> Result<(), StepError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Outcome, &())],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let mut outputs = Vec::with_capacity(items.len());
        for (outcome, ()) in items {
            match &outcome.part {
                Some(part) => self.settle_part(tx, outcome, part).await?,
                None if outcome.failure.is_none() => {
                    finish_action(tx.conn, outcome.order_id, outcome.action, None).await?;
                    parts::record_whole(tx.conn, outcome.order_id, outcome.action).await?;
                }
                None => {
                    release_action(tx.conn, outcome.order_id, outcome.action, outcome.attempt)
                        .await?;
                }
            }
            outputs.push(outcome.outputs.clone());
        }
        Ok(outputs)
    }
}

impl LifecycleStep {
    /// Settles a shipment or refund; a refund's returned units go back on hand.
    async fn settle_part(
        &self,
        tx: &mut Tx<'_>,
        outcome: &Outcome,
        part: &Part,
    ) -> Result<(), StepError> {
        let failure = outcome.failure.as_deref().map(failure_code);
        let order_id = outcome.order_id;
        if outcome.action == Action::Ship {
            parts::settle(tx.conn, PartKind::Shipment, order_id, part, failure).await?;
            return Ok(());
        }
        let moved = parts::settle(tx.conn, PartKind::Refund, order_id, part, failure).await?;
        if moved && failure.is_none() && part.restock && !part.lines.is_empty() {
            let key = format!("refund:{}", part.id);
            let units: Vec<(String, i64)> =
                part.lines.iter().map(|l| (l.sku.clone(), l.qty)).collect();
            let given = crate::inventory::return_units(tx.conn, order_id, &key, &units).await?;
            if let Some(client) = self.notices.clone() {
                tx.after_commit(move || {
                    for (sku, version) in &given.skus {
                        crate::inventory::soldout::announce_available(&client, sku, *version);
                    }
                });
            }
        }
        Ok(())
    }
}

/// The code a refused capture or refund is shown with: the provider's own error code when it
/// names one we know, `provider_refused` otherwise.
fn failure_code(detail: &str) -> &'static str {
    [
        "authorization_expired",
        "amount_exceeds_authorized",
        "amount_exceeds_captured",
        "invalid_state",
    ]
    .into_iter()
    .find(|code| detail.contains(code))
    .unwrap_or("provider_refused")
}

/// Records a cancellation (compensation's last step for a cancel request).
pub async fn finish_cancel(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    finish_action(
        conn,
        order_id,
        Action::Cancel,
        Some(FailureReason::CustomerCancelled),
    )
    .await
}
