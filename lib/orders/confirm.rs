//! The order step: an authorized checkout becomes a confirmed order.

use sqlx::PgPool;

use super::record;
use crate::pricing::promo::{self, RedeemRefusal};
use crate::saga::events::{Event, EventKind, FailureReason};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.committed` (payment authorized and stock taken), redeems the promotion
/// and creates the order: emits `checkout.confirmed`, or `checkout.rejected` when the
/// promotion's limits were reached first.
pub struct OrderStep {
    pub pool: PgPool,
}

const DURABLE: &str = "order";

impl Step for OrderStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Committed]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Committed { checkout, .. } = event else {
            return Err(StepError::Permanent(format!(
                "order cannot handle {:?}",
                event.kind()
            )));
        };
        let confirmed = vec![Event::Confirmed {
            checkout: checkout.clone(),
        }];
        let table = InboxTable::Orders;
        let mut tx =
            match inbox::claim(&self.pool, table, DURABLE, &delivery.event_id, &confirmed).await? {
                Claim::Done(events) => return Ok(events),
                Claim::Fresh(tx) => tx,
            };
        // The promotion is redeemed in the order's own transaction: the order is confirmed
        // if and only if its redemption fits under the limits.
        let refusal = match checkout.promo_code.as_deref() {
            None => None,
            Some(code) => promo::redeem(&mut tx, code, &checkout.user_id, checkout.order_id)
                .await?
                .err(),
        };
        let outputs = match refusal {
            None => {
                if !record::insert(&mut tx, &checkout, "confirmed", None).await? {
                    // The watchdog failed the order first: its stock and payment go back.
                    tx.rollback().await?;
                    tracing::warn!("order already failed (timed out); not confirming it");
                    let outputs = vec![Event::Rejected {
                        checkout,
                        reason: FailureReason::TimedOut,
                        detail: "the order timed out before it could be confirmed".into(),
                    }];
                    let id = &delivery.event_id;
                    return Ok(inbox::record_alone(&self.pool, table, DURABLE, id, outputs).await?);
                }
                confirmed
            }
            Some(refusal) => {
                let reason = match refusal {
                    RedeemRefusal::Exhausted => FailureReason::PromoExhausted,
                    RedeemRefusal::CustomerLimit => FailureReason::PromoLimitReached,
                };
                tracing::info!(
                    reason = reason.as_str(),
                    "promotion refused at confirmation"
                );
                let code = checkout.promo_code.clone().unwrap_or_default();
                let outputs = vec![Event::Rejected {
                    detail: format!("promotion {code} refused"),
                    checkout,
                    reason,
                }];
                inbox::set_outputs(&mut tx, table, DURABLE, &delivery.event_id, &outputs).await?;
                outputs
            }
        };
        tx.commit().await?;
        Ok(outputs)
    }
}
