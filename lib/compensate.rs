//! The compensate step: unwind a checkout that cannot complete, a checkout the watchdog timed
//! out, or an order the buyer cancels. It is the one step that writes through three services
//! (inventory, payments, orders), because unwinding is one decision; each undo is idempotent
//! and the state it leaves in each service records how far it got, so a redelivery after a
//! crash carries on where it stopped.
//!
//! - A failed checkout: give the stock back, release the money, then record the failed order
//!   (so a buyer who sees `failed` can retry and find the stock available).
//! - A timed-out checkout: record the failed order first. That row is the fence: the order
//!   step can no longer confirm it, the payment is marked abandoned so the authorize step
//!   cannot start one (and voids one that completes late), and released holds cannot be
//!   committed. Then unwind as for a failure. An order that settled meanwhile is left alone.
//! - A cancellation: void first. If the provider refuses, nothing else is undone and the order
//!   stays `confirmed` with its lock released (`cancel_failed`); otherwise restock, give the
//!   promotion back and record `cancelled`.

use std::sync::Arc;

use sqlx::PgPool;

use crate::inventory::{release_for_order, restock_for_order};
use crate::orders::{self, finish_cancel, insert_failed, release_action, Action, Fence};
use crate::payments::void::VoidError;
use crate::payments::{self, void_for_order, PaymentProvider, ProviderError, VoidOutcome};
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.rejected`, `checkout.declined`, `checkout.timed_out` and
/// `checkout.cancel_requested`; emits `checkout.failed`, `checkout.cancelled` or
/// `checkout.cancel_failed`.
pub struct CompensateStep {
    pub pool: PgPool,
    pub provider: Arc<dyn PaymentProvider>,
    /// Where units given back are announced to every edge (clears sold-out notices).
    pub notices: Option<async_nats::Client>,
}

const DURABLE: &str = "compensate";
const TABLE: InboxTable = InboxTable::Orders;

impl Step for CompensateStep {
    const DURABLE: &'static str = DURABLE;

    fn consumes(&self) -> Vec<EventKind> {
        vec![
            EventKind::Rejected,
            EventKind::Declined,
            EventKind::TimedOut,
            EventKind::CancelRequested,
        ]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        if let Some(events) = inbox::lookup(&self.pool, TABLE, DURABLE, &delivery.event_id).await? {
            return Ok(events);
        }
        match event {
            Event::Rejected {
                checkout, reason, ..
            }
            | Event::Declined {
                checkout, reason, ..
            } => self.fail(checkout, reason, delivery).await,
            Event::TimedOut { checkout } => self.time_out(checkout, delivery).await,
            Event::CancelRequested { checkout, attempt } => {
                self.cancel(checkout, attempt, delivery).await
            }
            other => Err(StepError::permanent(format!(
                "compensate cannot handle {:?}",
                other.kind()
            ))),
        }
    }
}

impl CompensateStep {
    async fn fail(
        &self,
        checkout: Checkout,
        reason: FailureReason,
        delivery: &Delivery,
    ) -> Result<Vec<Event>, StepError> {
        let released = self.give_stock_back(&checkout).await?;
        let voided = self.release_money(&checkout).await?;
        let outputs = vec![Event::Failed {
            checkout: checkout.clone(),
            reason,
        }];
        let mut tx =
            match inbox::claim(&self.pool, TABLE, DURABLE, &delivery.event_id, &outputs).await? {
                Claim::Done(events) => return Ok(events),
                Claim::Fresh(tx) => tx,
            };
        let ended = insert_failed(&mut tx, &checkout, reason).await?;
        tx.commit().await?;
        if ended {
            crate::metrics::order_ended(Some(reason.as_str()), checkout.requested_at);
        }
        tracing::info!(
            reason = reason.as_str(),
            released,
            ?voided,
            "order failed and compensated"
        );
        Ok(outputs)
    }

    async fn time_out(
        &self,
        checkout: Checkout,
        delivery: &Delivery,
    ) -> Result<Vec<Event>, StepError> {
        match orders::fence_timed_out(&self.pool, &checkout).await? {
            Fence::Settled(status) => {
                tracing::info!(%status, "order settled before the watchdog's request; nothing to undo");
                let id = &delivery.event_id;
                return Ok(inbox::record_alone(&self.pool, TABLE, DURABLE, id, Vec::new()).await?);
            }
            Fence::Fenced { new } => {
                if new {
                    crate::metrics::order_ended(
                        Some(FailureReason::TimedOut.as_str()),
                        checkout.requested_at,
                    );
                    crate::metrics::watchdog_timed_out();
                }
            }
        }
        payments::abandon(&self.pool, self.provider.as_ref(), &checkout).await?;
        let released = self.give_stock_back(&checkout).await?;
        let voided = self.release_money(&checkout).await?;
        tracing::warn!(released, ?voided, "order timed out and compensated");
        let outputs = vec![Event::Failed {
            checkout,
            reason: FailureReason::TimedOut,
        }];
        let id = &delivery.event_id;
        Ok(inbox::record_alone(&self.pool, TABLE, DURABLE, id, outputs).await?)
    }

    async fn cancel(
        &self,
        checkout: Checkout,
        attempt: u32,
        delivery: &Delivery,
    ) -> Result<Vec<Event>, StepError> {
        let order_id = checkout.order_id;
        // Money first: if the provider will not release the hold, nothing else is undone.
        if let VoidOutcome::Refused(detail) = self.void(&checkout).await? {
            tracing::warn!(%detail, "cancel failed: the provider refused the void");
            let outputs = vec![Event::CancelFailed {
                checkout,
                detail,
                attempt,
            }];
            let id = &delivery.event_id;
            let mut tx = match inbox::claim(&self.pool, TABLE, DURABLE, id, &outputs).await? {
                Claim::Done(events) => return Ok(events),
                Claim::Fresh(tx) => tx,
            };
            release_action(&mut tx, order_id, Action::Cancel, attempt).await?;
            tx.commit().await?;
            return Ok(outputs);
        }
        let released = self.give_stock_back(&checkout).await?;
        crate::pricing::promo::release(&self.pool, order_id).await?;
        let outputs = vec![Event::Cancelled {
            checkout: checkout.clone(),
            attempt,
        }];
        let id = &delivery.event_id;
        let mut tx = match inbox::claim(&self.pool, TABLE, DURABLE, id, &outputs).await? {
            Claim::Done(events) => return Ok(events),
            Claim::Fresh(tx) => tx,
        };
        finish_cancel(&mut tx, order_id).await?;
        tx.commit().await?;
        tracing::info!(released, "order cancelled");
        Ok(outputs)
    }

    /// Held units go back to available; units already taken out of stock go back on hand.
    /// Both are no-ops when done.
    async fn give_stock_back(&self, checkout: &Checkout) -> Result<i64, StepError> {
        let order_id = checkout.order_id;
        let given = release_for_order(&self.pool, order_id)
            .await?
            .and(restock_for_order(&self.pool, order_id).await?);
        if let Some(client) = &self.notices {
            for (sku, version) in &given.skus {
                crate::inventory::soldout::announce_available(client, sku, *version);
            }
        }
        Ok(given.units)
    }

    /// Voids for a failing order. A refusal does not hold the order up: the buyer is not
    /// charged (nothing is captured) and the hold lapses at the provider; the audit lists it.
    async fn release_money(&self, checkout: &Checkout) -> Result<VoidOutcome, StepError> {
        let outcome = self.void(checkout).await?;
        if let VoidOutcome::Refused(detail) = &outcome {
            tracing::error!(%detail, "the provider refused to void a failed order's authorization");
        }
        Ok(outcome)
    }

    async fn void(&self, checkout: &Checkout) -> Result<VoidOutcome, StepError> {
        void_for_order(&self.pool, self.provider.as_ref(), checkout.order_id)
            .await
            .map_err(|e| match e {
                VoidError::Provider(ProviderError::Deferred(d)) => StepError::RetryAfter(d),
                other => StepError::transient(other.to_string()),
            })
    }
}

/// What the compensate role runs: the compensate step, and the sweepers that end what the
/// saga left (the watchdog), reconcile payments in doubt and prune old rows.
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    consuming: &crate::tasks::Consuming,
    settings: &crate::config::Settings,
    pool: &PgPool,
    provider: &Arc<dyn PaymentProvider>,
) {
    tasks.step(
        consuming,
        CompensateStep {
            pool: pool.clone(),
            provider: provider.clone(),
            notices: Some(consuming.bus.client().clone()),
        },
    );
    let watchdog = orders::watchdog::Watchdog {
        pool: pool.clone(),
        bus: consuming.bus.clone(),
        pending_limit: settings.watchdog.pending_limit,
        interval: settings.watchdog.interval,
        batch: settings.watchdog.batch,
    };
    tasks.until_shutdown("watchdog", move |token| watchdog.run(token));
    let pruner = crate::retention::Pruner {
        pool: pool.clone(),
        settings: settings.retention.clone(),
    };
    tasks.until_shutdown("pruner", move |token| pruner.run(token));
    let (pool, provider) = (pool.clone(), provider.clone());
    let (delay, every, batch) = (
        settings.payments.reconcile_delay,
        settings.watchdog.interval,
        settings.watchdog.batch,
    );
    tasks.until_shutdown("payment-reconciler", move |token| {
        payments::reconcile::run(pool, provider, delay, every, batch, token)
    });
}
