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

use crate::db::Leases;
use crate::inventory::{release_for_order, restock_for_order};
use crate::orders::{self, finish_cancel, insert_failed, release_action, Action, Fence};
use crate::payments::void::VoidError;
use crate::payments::{self, void_for_order, PaymentProvider, ProviderError, VoidOutcome};
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// Consumes `checkout.rejected`, `checkout.declined`, `checkout.timed_out` and
/// `checkout.cancel_requested`; emits `checkout.failed`, `checkout.cancelled` or
/// `checkout.cancel_failed`.
pub struct CompensateStep {
    pub leases: Leases,
    pub provider: Arc<dyn PaymentProvider>,
    /// Where units given back are announced to every edge (clears sold-out notices).
    pub notices: Option<async_nats::Client>,
}

/// What compensation is asked to unwind.
pub enum Unwind {
    /// A checkout that cannot complete.
    Fail {
        checkout: Checkout,
        reason: FailureReason,
    },
    /// A checkout the watchdog timed out.
    TimeOut { checkout: Checkout },
    /// An order the buyer or an admin cancels.
    Cancel { checkout: Checkout, attempt: u32 },
}

/// How far the unwinding went, for the order's record.
pub enum Unwound {
    /// Stock and money given back: the order fails.
    Failed,
    /// The order settled before the watchdog's request: nothing was undone.
    Settled,
    /// Fenced and unwound: the order failed with `timed_out`.
    TimedOut,
    /// Voided, restocked, the promotion given back.
    Cancelled,
    /// Part of the order had shipped: the uncaptured rest released, the unshipped units
    /// restocked; the promotion stays redeemed.
    RestCancelled,
    /// The provider refused the void: nothing else was undone.
    CancelFailed(String),
}

impl Step for CompensateStep {
    const DURABLE: &'static str = "compensate";
    const INBOX: InboxTable = InboxTable::Orders;
    const SHAPE: Shape = Shape::Prepared;
    type Input = Unwind;
    type Found = Unwound;

    fn consumes(&self) -> Vec<EventKind> {
        vec![
            EventKind::Rejected,
            EventKind::Declined,
            EventKind::TimedOut,
            EventKind::CancelRequested,
        ]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Unwind, String> {
        match event {
            Event::Rejected {
                checkout, reason, ..
            }
            | Event::Declined {
                checkout, reason, ..
            } => Ok(Unwind::Fail { checkout, reason }),
            Event::TimedOut { checkout } => Ok(Unwind::TimeOut { checkout }),
            Event::CancelRequested { checkout, attempt } => {
                Ok(Unwind::Cancel { checkout, attempt })
            }
            other => Err(format!("compensate cannot handle {:?}", other.kind())),
        }
    }

    /// Every undo is idempotent, and each service's state records how far it got.
    async fn prepare(&self, unwind: &Unwind, _: &Delivery) -> Result<Unwound, StepError> {
        match unwind {
            Unwind::Fail { checkout, reason } => {
                let released = self.give_stock_back(checkout).await?;
                let voided = self.release_money(checkout).await?;
                tracing::info!(
                    reason = reason.as_str(),
                    released,
                    ?voided,
                    "order compensated"
                );
                Ok(Unwound::Failed)
            }
            Unwind::TimeOut { checkout } => self.time_out(checkout).await,
            Unwind::Cancel { checkout, .. } => self.cancel(checkout).await,
        }
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Unwind, &Unwound)],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let mut outputs = Vec::with_capacity(items.len());
        for (unwind, unwound) in items {
            outputs.push(record(tx, unwind, unwound).await?);
        }
        Ok(outputs)
    }
}

/// Records how the order ended, and what it announces.
async fn record(
    tx: &mut Tx<'_>,
    unwind: &Unwind,
    unwound: &Unwound,
) -> Result<Vec<Event>, StepError> {
    Ok(match (unwind, unwound) {
        (Unwind::Fail { checkout, reason }, _) => {
            let reason = *reason;
            if insert_failed(tx.conn, checkout, reason).await? {
                let requested_at = checkout.requested_at;
                tx.after_commit(move || {
                    crate::metrics::order_ended(Some(reason.as_str()), requested_at);
                });
            }
            vec![Event::Failed {
                checkout: checkout.clone(),
                reason,
            }]
        }
        (Unwind::TimeOut { .. }, Unwound::Settled) => Vec::new(),
        (Unwind::TimeOut { checkout }, _) => vec![Event::Failed {
            checkout: checkout.clone(),
            reason: FailureReason::TimedOut,
        }],
        (Unwind::Cancel { checkout, attempt }, Unwound::CancelFailed(detail)) => {
            release_action(tx.conn, checkout.order_id, Action::Cancel, *attempt).await?;
            vec![Event::CancelFailed {
                checkout: checkout.clone(),
                detail: detail.clone(),
                attempt: *attempt,
            }]
        }
        (Unwind::Cancel { checkout, attempt }, Unwound::RestCancelled) => {
            orders::parts::cancel_rest(tx.conn, checkout.order_id).await?;
            vec![Event::Cancelled {
                checkout: checkout.clone(),
                attempt: *attempt,
            }]
        }
        (Unwind::Cancel { checkout, attempt }, _) => {
            finish_cancel(tx.conn, checkout.order_id).await?;
            vec![Event::Cancelled {
                checkout: checkout.clone(),
                attempt: *attempt,
            }]
        }
    })
}

impl CompensateStep {
    fn pool(&self) -> &PgPool {
        self.leases.pool()
    }

    /// The fence first: once the failed order is recorded, the order step cannot confirm it,
    /// and the payment is marked abandoned so the authorize step cannot start one. Then unwind
    /// as for a failure. An order that settled meanwhile is left alone.
    async fn time_out(&self, checkout: &Checkout) -> Result<Unwound, StepError> {
        match orders::fence_timed_out(self.pool(), checkout).await? {
            Fence::Settled(status) => {
                tracing::info!(%status, "order settled before the watchdog's request; nothing to undo");
                return Ok(Unwound::Settled);
            }
            Fence::Fenced { new: true } => {
                crate::metrics::order_ended(
                    Some(FailureReason::TimedOut.as_str()),
                    checkout.requested_at,
                );
                crate::metrics::watchdog_timed_out();
            }
            Fence::Fenced { new: false } => {}
        }
        payments::abandon(self.pool(), self.provider.as_ref(), checkout).await?;
        let released = self.give_stock_back(checkout).await?;
        let voided = self.release_money(checkout).await?;
        tracing::warn!(released, ?voided, "order timed out and compensated");
        Ok(Unwound::TimedOut)
    }

    /// Money first: if the provider will not release the hold, nothing else is undone.
    async fn cancel(&self, checkout: &Checkout) -> Result<Unwound, StepError> {
        let standing = {
            let mut conn = self.pool().acquire().await?;
            orders::parts::Standing::read(&mut conn, checkout.order_id).await?
        };
        if !standing.shipped.is_empty() {
            return self.cancel_rest(checkout, &standing).await;
        }
        if let VoidOutcome::Refused(detail) = self.void(checkout).await? {
            tracing::warn!(%detail, "cancel failed: the provider refused the void");
            return Ok(Unwound::CancelFailed(detail));
        }
        let released = self.give_stock_back(checkout).await?;
        crate::pricing::promo::release(self.pool(), checkout.order_id).await?;
        tracing::info!(released, "order cancelled");
        Ok(Unwound::Cancelled)
    }

    /// Cancels what has not shipped of an order that shipped in part: releases the money its
    /// shipments did not capture, then puts the unshipped units back on hand (once: the
    /// returns are keyed by the order).
    async fn cancel_rest(
        &self,
        checkout: &Checkout,
        standing: &orders::parts::Standing,
    ) -> Result<Unwound, StepError> {
        let voided = payments::void_rest(self.pool(), self.provider.as_ref(), checkout.order_id)
            .await
            .map_err(|e| match e {
                VoidError::Provider(ProviderError::Deferred(d)) => StepError::RetryAfter(d),
                other => StepError::transient(other.to_string()),
            })?;
        if let VoidOutcome::Refused(detail) = voided {
            tracing::warn!(%detail, "cancel failed: the provider refused to release the rest");
            return Ok(Unwound::CancelFailed(detail));
        }
        let all =
            orders::allocation::Allocation::new(&checkout.items, checkout.total, checkout.currency)
                .all();
        let left: Vec<(String, i64)> = orders::allocation::left(&all, &standing.shipped)
            .into_iter()
            .collect();
        let mut tx = self.pool().begin().await?;
        let given =
            crate::inventory::return_units(&mut tx, checkout.order_id, "cancel", &left).await?;
        tx.commit().await?;
        if let Some(client) = &self.notices {
            for (sku, version) in &given.skus {
                crate::inventory::soldout::announce_available(client, sku, *version);
            }
        }
        tracing::info!(
            restocked = given.units,
            "unshipped rest of the order cancelled"
        );
        Ok(Unwound::RestCancelled)
    }

    /// Held units go back to available; units already taken out of stock go back on hand.
    /// Both are no-ops when done.
    async fn give_stock_back(&self, checkout: &Checkout) -> Result<i64, StepError> {
        let order_id = checkout.order_id;
        let given = release_for_order(self.pool(), order_id)
            .await?
            .and(restock_for_order(self.pool(), order_id).await?);
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
        void_for_order(self.pool(), self.provider.as_ref(), checkout.order_id)
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
    leases: &Leases,
    provider: &Arc<dyn PaymentProvider>,
) {
    let pool = leases.pool();
    tasks.step(
        consuming,
        CompensateStep {
            leases: leases.clone(),
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
