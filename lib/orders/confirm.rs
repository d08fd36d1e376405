//! The order step: an authorized checkout's stock leaves the shelf and it becomes a confirmed
//! order, in one transaction.
//!
//! Batch-native: the batch's stock is committed first (`inventory::commit`, which rejects an
//! order whose lapsed hold can no longer be taken again), then the orders without a promotion
//! are inserted with one statement; an order with a promotion redeems it in the same
//! transaction (a row-locked conditional counter), so it is confirmed if and only if its
//! redemption fits the limits. An order the watchdog already failed is not confirmed: it goes
//! back to compensation.
//!
//! One step rather than two (stock, then order, each with its event): the seed's order step
//! "creates the order, finalizes reservations", and a step of its own cost every checkout one
//! more publish (an fsync at `sync_interval: always`), delivery, ack and transaction.

use std::collections::HashSet;

use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use super::record;
use super::status::OrderStatus;
use crate::db::Leases;
use crate::inventory;
use crate::pricing::promo::{self, RedeemRefusal};
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// Consumes `checkout.authorized` (and `checkout.committed`, which older versions emitted
/// once stock was committed), emits `checkout.confirmed`, or `checkout.rejected` when the stock
/// is gone, the promotion's limits were reached first or the order timed out meanwhile.
pub struct OrderStep {
    pub leases: Leases,
}

/// A checkout to confirm.
pub struct ToConfirm {
    checkout: Checkout,
    /// Its stock left already (a `committed` event).
    stock_committed: bool,
}

impl Step for OrderStep {
    const DURABLE: &'static str = "order";
    const INBOX: InboxTable = InboxTable::Orders;
    const SHAPE: Shape = Shape::Batch;
    type Input = ToConfirm;
    type Found = ();

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Authorized, EventKind::Committed]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<ToConfirm, String> {
        match event {
            Event::Authorized { checkout, .. } => Ok(ToConfirm {
                checkout,
                stock_committed: false,
            }),
            Event::Committed { checkout, .. } => Ok(ToConfirm {
                checkout,
                stock_committed: true,
            }),
            other => Err(format!("order cannot handle {:?}", other.kind())),
        }
    }

    async fn prepare(&self, _: &ToConfirm, _: &Delivery) -> Result<(), StepError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&ToConfirm, &())],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let inputs: Vec<&ToConfirm> = items.iter().map(|(input, ())| *input).collect();
        let outputs = confirm(tx.conn, &inputs).await?;
        let confirmed: Vec<_> = outputs
            .iter()
            .flatten()
            .filter_map(|e| match e {
                Event::Confirmed { checkout } => Some(checkout.requested_at),
                _ => None,
            })
            .collect();
        tx.after_commit(move || {
            for requested_at in confirmed {
                crate::metrics::order_ended(None, requested_at);
            }
        });
        Ok(outputs)
    }
}

/// Takes each order's units out of stock and records it confirmed, or refuses it; the events
/// each emits.
async fn confirm(
    conn: &mut PgConnection,
    inputs: &[&ToConfirm],
) -> Result<Vec<Vec<Event>>, StepError> {
    let to_commit: Vec<&Checkout> = inputs
        .iter()
        .filter(|i| !i.stock_committed)
        .map(|i| &i.checkout)
        .collect();
    let mut refusals = inventory::commit::commit_stock(conn, &to_commit)
        .await?
        .into_iter();
    let mut outcome: Vec<Option<Vec<Event>>> = vec![None; inputs.len()];
    for (n, input) in inputs.iter().enumerate() {
        if !input.stock_committed {
            if let Some(rejected) = refusals.next().flatten() {
                outcome[n] = Some(vec![rejected]);
                continue;
            }
        }
        let checkout = &input.checkout;
        if let Some(code) = checkout.promo_code.as_deref() {
            outcome[n] = Some(with_promo(conn, checkout, code).await?);
        }
    }
    settle_refusals(conn, inputs, &mut outcome).await?;
    let plain: Vec<&Checkout> = inputs
        .iter()
        .zip(&outcome)
        .filter(|(_, o)| o.is_none())
        .map(|(i, _)| &i.checkout)
        .collect();
    let inserted: HashSet<Uuid> = record::insert_confirmed_many(conn, &plain)
        .await?
        .into_iter()
        .collect();
    // An order that existed already: failed by the watchdog first (the usual case), or
    // confirmed by another delivery of the same checkout (the legacy `committed` event of
    // one confirmed from its `authorized` event, around an upgrade), which needs nothing.
    let existing: Vec<Uuid> = plain
        .iter()
        .map(|c| c.order_id)
        .filter(|id| !inserted.contains(id))
        .collect();
    let confirmed_before: HashSet<Uuid> = if existing.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar(
            "SELECT order_id FROM orders.orders WHERE order_id = ANY($1) AND status <> 'failed'",
        )
        .bind(&existing)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect()
    };
    Ok(inputs
        .iter()
        .zip(outcome)
        .map(|(input, done)| {
            let checkout = &input.checkout;
            done.unwrap_or_else(|| {
                if inserted.contains(&checkout.order_id) {
                    confirmed(checkout)
                } else if confirmed_before.contains(&checkout.order_id) {
                    Vec::new()
                } else {
                    timed_out(checkout)
                }
            })
        })
        .collect())
}

/// A refusal (a released hold, a promotion used up, an order that exists) is only right for
/// an order that does not exist yet or that failed: another delivery for an order that is
/// confirmed, cancelled or shipped (a legacy `committed` event after its `authorized` one, a
/// replay after a cancellation) must change nothing, or compensation would restock the units
/// and void the payment of an order that keeps them. Asked only when the batch refused
/// something, so the hot path pays no extra statement.
async fn settle_refusals(
    conn: &mut PgConnection,
    inputs: &[&ToConfirm],
    outcome: &mut [Option<Vec<Event>>],
) -> Result<(), StepError> {
    let refused: Vec<Uuid> = inputs
        .iter()
        .zip(outcome.iter())
        .filter(|(_, o)| {
            o.iter()
                .flatten()
                .any(|e| matches!(e, Event::Rejected { .. }))
        })
        .map(|(i, _)| i.checkout.order_id)
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    let existing: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM orders.orders WHERE order_id = ANY($1)")
            .bind(&refused)
            .fetch_all(&mut *conn)
            .await?;
    for (order_id, status) in existing {
        for (input, done) in inputs.iter().zip(outcome.iter_mut()) {
            if input.checkout.order_id != order_id {
                continue;
            }
            *done = Some(if status == "failed" {
                timed_out(&input.checkout)
            } else {
                tracing::info!(%order_id, %status, "the order exists already; nothing to do");
                Vec::new()
            });
        }
    }
    Ok(())
}

/// Redeems the promotion and inserts the order, or neither (a savepoint).
async fn with_promo(
    conn: &mut PgConnection,
    checkout: &Checkout,
    code: &str,
) -> Result<Vec<Event>, StepError> {
    let mut attempt = conn.begin().await?;
    match promo::redeem(&mut attempt, code, &checkout.user_id, checkout.order_id).await? {
        Ok(()) => {}
        Err(refusal) => {
            attempt.rollback().await?;
            let reason = match refusal {
                RedeemRefusal::Exhausted => FailureReason::PromoExhausted,
                RedeemRefusal::CustomerLimit => FailureReason::PromoLimitReached,
            };
            tracing::info!(order_id = %checkout.order_id, reason = reason.as_str(), "promotion refused at confirmation");
            return Ok(vec![Event::Rejected {
                short: Vec::new(),
                detail: format!("promotion {code} refused"),
                checkout: checkout.clone(),
                reason,
            }]);
        }
    }
    if !record::insert(&mut attempt, checkout, OrderStatus::Confirmed, None).await? {
        attempt.rollback().await?;
        return Ok(timed_out(checkout));
    }
    attempt.commit().await?;
    Ok(confirmed(checkout))
}

fn confirmed(checkout: &Checkout) -> Vec<Event> {
    vec![Event::Confirmed {
        checkout: checkout.clone(),
    }]
}

/// The watchdog failed the order first: its stock and payment go back through compensation.
fn timed_out(checkout: &Checkout) -> Vec<Event> {
    tracing::warn!(order_id = %checkout.order_id, "order already failed (timed out); not confirming it");
    vec![Event::Rejected {
        short: Vec::new(),
        checkout: checkout.clone(),
        reason: FailureReason::TimedOut,
        detail: "the order timed out before it could be confirmed".into(),
    }]
}
