//! The order step: an authorized checkout whose stock is committed becomes a confirmed order.
//!
//! Batch-native: orders without a promotion are inserted with one statement for the whole
//! batch; an order with a promotion redeems it in the same transaction (a row-locked
//! conditional counter), so it is confirmed if and only if its redemption fits the limits.
//! An order the watchdog already failed is not confirmed: it goes back to compensation.

use std::collections::HashSet;

use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use super::record::{self, OrderStatus};
use crate::db::Leases;
use crate::pricing::promo::{self, RedeemRefusal};
use crate::saga::batch::BatchStep;
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;

/// Consumes `checkout.committed`, emits `checkout.confirmed`, or `checkout.rejected` when the
/// promotion's limits were reached first or the order timed out meanwhile.
pub struct OrderStep {
    pub leases: Leases,
}

impl BatchStep for OrderStep {
    type Input = Checkout;

    fn durable(&self) -> &'static str {
        "order"
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Committed]
    }

    fn inbox(&self) -> InboxTable {
        InboxTable::Orders
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn committed(&self, outputs: &[Vec<Event>]) {
        for event in outputs.iter().flatten() {
            if let Event::Confirmed { checkout } = event {
                crate::metrics::order_ended(None, checkout.requested_at);
            }
        }
    }

    fn input(&self, event: Event) -> Result<Checkout, String> {
        match event {
            Event::Committed { checkout, .. } => Ok(checkout),
            other => Err(format!("order cannot handle {:?}", other.kind())),
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        inputs: &[&Checkout],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let mut outcome: Vec<Option<Vec<Event>>> = vec![None; inputs.len()];
        for (n, checkout) in inputs.iter().enumerate() {
            if let Some(code) = checkout.promo_code.as_deref() {
                outcome[n] = Some(with_promo(conn, checkout, code).await?);
            }
        }
        let plain: Vec<&Checkout> = inputs
            .iter()
            .zip(&outcome)
            .filter(|(_, o)| o.is_none())
            .map(|(c, _)| *c)
            .collect();
        let inserted: HashSet<Uuid> = record::insert_confirmed_many(conn, &plain)
            .await?
            .into_iter()
            .collect();
        Ok(inputs
            .iter()
            .zip(outcome)
            .map(|(checkout, done)| {
                done.unwrap_or_else(|| {
                    if inserted.contains(&checkout.order_id) {
                        confirmed(checkout)
                    } else {
                        timed_out(checkout)
                    }
                })
            })
            .collect())
    }
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
