//! After confirmation: requests to ship, cancel or refund (a pending action is a semantic
//! lock that stops conflicting requests), and the step that records their outcomes.

use sqlx::PgConnection;
use uuid::Uuid;

use super::status::{Action, OrderStatus};
use crate::db::Leases;
use crate::saga::events::{Event, EventKind, FailureReason};
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
         WHERE order_id = $1 AND status = $3 AND (pending_action IS NULL OR pending_action = $2)
         RETURNING action_attempt",
    )
    .bind(order_id)
    .bind(action)
    .bind(action.required_status())
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

/// Records a finished action and releases the lock.
async fn finish_action(
    conn: &mut PgConnection,
    order_id: Uuid,
    action: Action,
    reason: Option<FailureReason>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE orders.orders SET status = $2, pending_action = NULL,
             reason = coalesce($3, reason), updated_at = now()
         WHERE order_id = $1 AND status = $4",
    )
    .bind(order_id)
    .bind(action.final_status())
    .bind(reason.map(FailureReason::as_str))
    .bind(action.required_status())
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

/// Consumes `checkout.captured` (order shipped, emits `checkout.shipped`),
/// `checkout.refunded` (order refunded), and `checkout.capture_failed` /
/// `checkout.refund_failed` (the lock is released, the status stays).
pub struct LifecycleStep {
    pub leases: Leases,
}

/// An action's outcome, as the order records it.
pub struct Outcome {
    order_id: Uuid,
    action: Action,
    /// Done (the status moves on) or refused (the lock is released).
    done: bool,
    attempt: u32,
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
        let (action, done, outputs) = match event {
            Event::Captured { checkout, attempt } => (
                Action::Ship,
                true,
                vec![Event::Shipped { checkout, attempt }],
            ),
            Event::Refunded { .. } => (Action::Refund, true, Vec::new()),
            Event::CaptureFailed { .. } => (Action::Ship, false, Vec::new()),
            Event::RefundFailed { .. } => (Action::Refund, false, Vec::new()),
            other => return Err(format!("order-lifecycle cannot handle {:?}", other.kind())),
        };
        Ok(Outcome {
            order_id,
            action,
            done,
            attempt,
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
            if outcome.done {
                finish_action(tx.conn, outcome.order_id, outcome.action, None).await?;
            } else {
                release_action(tx.conn, outcome.order_id, outcome.action, outcome.attempt).await?;
            }
            outputs.push(outcome.outputs.clone());
        }
        Ok(outputs)
    }
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
