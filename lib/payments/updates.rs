//! Asynchronous payments: what the provider tells us later (its webhooks, stored and handed to
//! the saga by the edge) and what happens when nobody answers (the challenge timeout).
//!
//! A payment's state only moves forward. A pending payment (a 3-D Secure challenge, or a
//! provider that answers by webhook) becomes `authorized` on `authorization.succeeded` (the
//! order step then confirms it, as for any card) or `declined` on `authorization.failed`
//! (`authentication_failed`); nothing within `payments.action_timeout` voids it and fails
//! the order (`authentication_timeout`). An approval that comes after the order ended is voided
//! at once, never captured. Duplicates and stale events change nothing (each is recorded with
//! what was made of it); an event for a payment we have not recorded yet is parked and the
//! authorize step applies it when it records the payment (both under one advisory lock per
//! order, so neither can miss the other).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::authorize::{Authorization, Decision};
use super::provider::{PaymentProvider, ProviderError};
use super::{idempotency_key, payment_id_for, PaymentStatus};
use crate::bus::Bus;
use crate::db::Leases;
use crate::saga::events::{Checkout, Event, EventKind, FailureReason, ProviderUpdate};
use crate::saga::inbox::InboxTable;
use crate::saga::outgoing::Outgoing;
use crate::saga::runner::StepError;
use crate::saga::trace::TraceParent;
use crate::saga::{Delivery, Shape, Step, Tx};

/// The provider's event type that approves an authorization.
pub const SUCCEEDED: &str = "authorization.succeeded";
/// The provider's event type that refuses one (the buyer failed the challenge).
pub const FAILED: &str = "authorization.failed";

/// Consumes `checkout.provider_update` and `checkout.action_expired`; emits
/// `checkout.authorized` or `checkout.declined` when a pending payment settles.
pub struct PaymentUpdateStep {
    pub leases: Leases,
    pub provider: Arc<dyn PaymentProvider>,
}

/// What arrived.
pub enum Update {
    Provider {
        checkout: Checkout,
        update: ProviderUpdate,
    },
    Expired {
        checkout: Checkout,
    },
}

impl Update {
    fn checkout(&self) -> &Checkout {
        match self {
            Self::Provider { checkout, .. } | Self::Expired { checkout } => checkout,
        }
    }
}

/// What to do about it, decided before the transaction (which re-checks the state it read).
pub enum Plan {
    /// No payment recorded yet: keep the event for the authorize step.
    Park,
    /// pending -> authorized.
    Approve { auth_id: String },
    /// pending -> declined (`authentication_failed`).
    Fail,
    /// pending -> voided (`authentication_timeout`); the provider's hold is voided already.
    Expire,
    /// The order ended before the approval came: the hold was voided at the provider.
    VoidedLate,
    /// Nothing to change (a duplicate, a stale or informational event, another payment's).
    Ignore(&'static str),
}

/// The payment row as `prepare` read it.
struct Payment {
    status: PaymentStatus,
    auth_id: Option<String>,
    amount: rust_decimal::Decimal,
    currency: String,
}

impl Step for PaymentUpdateStep {
    const DURABLE: &'static str = "payment_updates";
    const INBOX: InboxTable = InboxTable::Payments;
    const SHAPE: Shape = Shape::Prepared;
    type Input = Update;
    type Found = Plan;

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::ProviderUpdate, EventKind::ActionExpired]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Update, String> {
        match event {
            Event::ProviderUpdate { checkout, update } => Ok(Update::Provider { checkout, update }),
            Event::ActionExpired { checkout } => Ok(Update::Expired { checkout }),
            other => Err(format!("payment-updates cannot handle {:?}", other.kind())),
        }
    }

    async fn prepare(&self, input: &Update, _: &Delivery) -> Result<Plan, StepError> {
        let order_id = input.checkout().order_id;
        let payment = self.payment(order_id).await?;
        match input {
            Update::Provider { update, .. } => self.plan_update(order_id, payment, update).await,
            Update::Expired { .. } => self.plan_expiry(order_id, payment).await,
        }
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Update, &Plan)],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let mut outputs = Vec::with_capacity(items.len());
        for (input, plan) in items {
            let events = apply_one(tx, input, plan).await?;
            if let Update::Provider { update, .. } = input {
                mark(tx.conn, update, outcome_label(plan)).await?;
            }
            outputs.push(events);
        }
        Ok(outputs)
    }
}

impl PaymentUpdateStep {
    async fn payment(&self, order_id: Uuid) -> Result<Option<Payment>, StepError> {
        let row: Option<(PaymentStatus, Option<String>, rust_decimal::Decimal, String)> =
            sqlx::query_as(
                "SELECT status, auth_id, amount, currency FROM payments.payments
                 WHERE order_id = $1",
            )
            .bind(order_id)
            .fetch_optional(self.leases.pool())
            .await?;
        Ok(row.map(|(status, auth_id, amount, currency)| Payment {
            status,
            auth_id,
            amount,
            currency,
        }))
    }

    async fn plan_update(
        &self,
        order_id: Uuid,
        payment: Option<Payment>,
        update: &ProviderUpdate,
    ) -> Result<Plan, StepError> {
        let Some(payment) = payment else {
            return Ok(Plan::Park);
        };
        if payment.auth_id.as_deref() != Some(update.auth_id.as_str()) {
            tracing::warn!(auth_id = %update.auth_id, "a provider event for an authorization this order's payment does not hold");
            return Ok(Plan::Ignore("another_authorization"));
        }
        if payment.amount != update.amount || payment.currency.trim() != update.currency {
            tracing::error!(amount = %update.amount, currency = %update.currency, "a provider event whose amount is not the payment's");
            return Ok(Plan::Ignore("amount_mismatch"));
        }
        let ended = matches!(
            payment.status,
            PaymentStatus::Abandoned
                | PaymentStatus::Declined
                | PaymentStatus::Failed
                | PaymentStatus::Voided
        );
        Ok(match (update.event_type.as_str(), payment.status) {
            (SUCCEEDED, PaymentStatus::Pending) => Plan::Approve {
                auth_id: update.auth_id.clone(),
            },
            (FAILED, PaymentStatus::Pending) => Plan::Fail,
            (SUCCEEDED, _) if ended => match self.void(order_id, &update.auth_id).await {
                Ok(()) => Plan::VoidedLate,
                // Refused: voided already (by the expiry, or the compensation).
                Err(StepError::Permanent { reason, .. }) => {
                    tracing::info!(%reason, "the provider refused to void a late approval");
                    Plan::VoidedLate
                }
                Err(e) => return Err(e),
            },
            (SUCCEEDED | FAILED, _) => Plan::Ignore("already_settled"),
            _ => Plan::Ignore("informational"),
        })
    }

    /// The buyer did not finish in time: void the provider's hold first, so a challenge
    /// answered from now on cannot authorize. If the provider refuses, the challenge may just
    /// have been answered: its webhook decides, and this is asked again later.
    async fn plan_expiry(
        &self,
        order_id: Uuid,
        payment: Option<Payment>,
    ) -> Result<Plan, StepError> {
        match payment {
            Some(Payment {
                status: PaymentStatus::Pending,
                auth_id: Some(auth_id),
                ..
            }) => match self.void(order_id, &auth_id).await {
                Ok(()) => Ok(Plan::Expire),
                Err(StepError::Permanent { reason, .. }) => Err(StepError::transient(format!(
                    "the provider refused to void an expired challenge ({reason}); its answer may be on its way"
                ))),
                Err(e) => Err(e),
            },
            _ => Ok(Plan::Ignore("already_settled")),
        }
    }

    async fn void(&self, order_id: Uuid, auth_id: &str) -> Result<(), StepError> {
        let key = idempotency_key(order_id, &format!("void:{auth_id}"));
        match self.provider.void(auth_id, &key).await {
            Ok(()) => Ok(()),
            Err(ProviderError::Deferred(wait)) => Err(StepError::RetryAfter(wait)),
            Err(ProviderError::Unavailable(e)) => Err(StepError::transient(e)),
            Err(ProviderError::Rejected(e)) => Err(StepError::permanent(e)),
        }
    }
}

/// Writes one plan's effects; a state that moved since `prepare` read it is retried (the next
/// delivery plans again).
async fn apply_one(tx: &mut Tx<'_>, input: &Update, plan: &Plan) -> Result<Vec<Event>, StepError> {
    let checkout = input.checkout();
    let order_id = checkout.order_id;
    Ok(match plan {
        Plan::Park => {
            lock_order(tx.conn, order_id).await?;
            if payment_exists(tx.conn, order_id).await? {
                return Err(StepError::transient("the payment was recorded meanwhile"));
            }
            tracing::info!(%order_id, "provider event parked until its payment is recorded");
            Vec::new()
        }
        Plan::Approve { auth_id } => {
            settle_pending(tx.conn, order_id, PaymentStatus::Authorized, None).await?;
            tx.after_commit(|| crate::metrics::payment_challenge("approved"));
            vec![Event::Authorized {
                checkout: checkout.clone(),
                payment_id: payment_id_for(order_id),
                auth_id: auth_id.clone(),
            }]
        }
        Plan::Fail => {
            settle_pending(
                tx.conn,
                order_id,
                PaymentStatus::Declined,
                Some("authentication_failed"),
            )
            .await?;
            tx.after_commit(|| crate::metrics::payment_challenge("failed"));
            vec![declined(checkout, FailureReason::AuthenticationFailed)]
        }
        Plan::Expire => {
            settle_pending(
                tx.conn,
                order_id,
                PaymentStatus::Voided,
                Some("authentication_timeout"),
            )
            .await?;
            tx.after_commit(|| crate::metrics::payment_challenge("expired"));
            vec![declined(checkout, FailureReason::AuthenticationTimeout)]
        }
        Plan::VoidedLate => {
            tracing::warn!(%order_id, "voided an approval that came after its order ended");
            tx.after_commit(|| crate::metrics::payment_challenge("late_voided"));
            Vec::new()
        }
        Plan::Ignore(why) => {
            tracing::info!(%order_id, why, "provider event changes nothing");
            Vec::new()
        }
    })
}

/// Moves a pending payment on; a payment no longer pending is retried (planned again).
async fn settle_pending(
    conn: &mut PgConnection,
    order_id: Uuid,
    to: PaymentStatus,
    code: Option<&'static str>,
) -> Result<(), StepError> {
    let done = sqlx::query(
        "UPDATE payments.payments SET status = $2, decline_code = coalesce($3, decline_code),
             next_action_url = NULL, updated_at = now()
         WHERE order_id = $1 AND status = 'pending'",
    )
    .bind(order_id)
    .bind(to)
    .bind(code)
    .execute(conn)
    .await?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StepError::transient("the payment moved on meanwhile"))
    }
}

fn declined(checkout: &Checkout, reason: FailureReason) -> Event {
    Event::Declined {
        checkout: checkout.clone(),
        decline_code: reason.as_str().to_owned(),
        reason,
    }
}

fn outcome_label(plan: &Plan) -> Option<&'static str> {
    match plan {
        Plan::Park => None,
        Plan::Approve { .. } | Plan::Fail | Plan::Expire => Some("applied"),
        Plan::VoidedLate => Some("voided"),
        Plan::Ignore(_) => Some("ignored"),
    }
}

/// Records what was made of a provider event (NULL stays: parked).
async fn mark(
    conn: &mut PgConnection,
    update: &ProviderUpdate,
    applied: Option<&'static str>,
) -> Result<(), sqlx::Error> {
    if let Some(applied) = applied {
        sqlx::query(
            "UPDATE payments.provider_events SET applied = $3, applied_at = now()
             WHERE provider = $1 AND event_id = $2 AND applied IS NULL",
        )
        .bind(&update.provider)
        .bind(&update.event_id)
        .bind(applied)
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Serializes parking an event with recording its payment, per order (transaction-scoped).
async fn lock_order(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))")
        .bind(order_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn payment_exists(conn: &mut PgConnection, order_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM payments.payments WHERE order_id = $1)")
        .bind(order_id)
        .fetch_one(conn)
        .await
}

/// For the authorize step: the parked provider outcomes of the pending payments it is about to
/// record, as the decisions to record instead (an approval or a failure that came first); and
/// the holds of those still pending extended past the challenge's timeout. Card payments
/// (decided at once) cost nothing here.
pub(super) async fn take_parked(
    conn: &mut PgConnection,
    items: &[(&Checkout, &Authorization)],
    action_timeout: Duration,
) -> Result<HashMap<Uuid, Decision>, StepError> {
    let mut pending: Vec<(Uuid, &str)> = items
        .iter()
        .filter_map(|(checkout, found)| match found {
            Authorization::Decided(Decision::Pending { auth_id, .. }, _) => {
                Some((checkout.order_id, auth_id.as_str()))
            }
            _ => None,
        })
        .collect();
    let mut settled = HashMap::new();
    if pending.is_empty() {
        return Ok(settled);
    }
    // In order id order, like every other taker of these locks: no deadlock.
    pending.sort_unstable();
    for (order_id, _) in &pending {
        lock_order(conn, *order_id).await?;
    }
    let ids: Vec<Uuid> = pending.iter().map(|(id, _)| *id).collect();
    let auths: Vec<&str> = pending.iter().map(|(_, auth)| *auth).collect();
    // Only the outcomes of the authorization each payment records: another one's stays parked.
    let parked: Vec<(String, String, Uuid, String, String)> = sqlx::query_as(
        "UPDATE payments.provider_events e SET applied = 'applied', applied_at = now()
         FROM unnest($1::uuid[], $2::text[]) AS p(order_id, auth_id)
         WHERE e.order_id = p.order_id AND e.auth_id = p.auth_id AND e.applied IS NULL
           AND e.event_type IN ($3, $4)
         RETURNING e.provider, e.event_id, e.order_id, e.event_type, e.auth_id",
    )
    .bind(&ids)
    .bind(&auths)
    .bind(SUCCEEDED)
    .bind(FAILED)
    .fetch_all(&mut *conn)
    .await?;
    for (_, event_id, order_id, event_type, auth_id) in parked {
        tracing::info!(%order_id, %event_id, "applying a provider event that came before its payment");
        let decision = if event_type == SUCCEEDED {
            Decision::Approved(auth_id, None)
        } else {
            Decision::Refused {
                status: PaymentStatus::Declined,
                auth_id: Some(auth_id),
                expires_at: None,
                code: FailureReason::AuthenticationFailed.as_str().to_owned(),
                reason: FailureReason::AuthenticationFailed,
            }
        };
        settled.insert(order_id, decision);
    }
    let waiting: Vec<Uuid> = ids
        .into_iter()
        .filter(|id| !settled.contains_key(id))
        .collect();
    // Grace past the timeout: the sweeper's pass and the failure's compensation come after it.
    crate::inventory::extend_holds(conn, &waiting, action_timeout + Duration::from_secs(60))
        .await?;
    Ok(settled)
}

/// The challenge sweeper's settings and reach.
pub struct Sweeper {
    pub pool: sqlx::PgPool,
    pub bus: Bus,
    pub providers: Arc<super::Providers>,
    /// `payments.action_timeout`.
    pub action_timeout: Duration,
    /// `payments.webhook_grace`: how long a pending payment waits for its webhook before the
    /// provider is asked.
    pub webhook_grace: Duration,
}

/// Every `interval` until shutdown: publishes `checkout.action_expired` for payments pending
/// longer than `action_timeout`, and asks the provider about payments whose webhook is late
/// (a provider's outcome that never arrived is applied as if it had). Repeats are harmless:
/// message ids are one per order (or per provider outcome), and the step changes only a
/// payment still pending.
pub async fn run_sweeper(sweeper: Sweeper, interval: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = expire_once(&sweeper.pool, &sweeper.bus, sweeper.action_timeout).await {
            tracing::warn!(error = %e, "challenge expiry pass failed");
        }
        if let Err(e) = reconcile_pending(&sweeper).await {
            tracing::warn!(error = %e, "pending payments reconciliation failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Asks the provider about payments pending past `webhook_grace`; an outcome it has decided is
/// stored and handed to the saga as the webhook would have been. Undecided ones are asked
/// again a grace later.
async fn reconcile_pending(sweeper: &Sweeper) -> Result<(), StepError> {
    let due: Vec<(Uuid, String, rust_decimal::Decimal, String, Vec<u8>)> = sqlx::query_as(
        // The few pending payments first (a partial index), and only then their checkouts:
        // this runs every second in every authorize process, whatever the tables' sizes.
        "WITH due AS MATERIALIZED (
             SELECT order_id FROM payments.payments
             WHERE status = 'pending' AND updated_at < now() - $1::interval AND auth_id IS NOT NULL
             ORDER BY updated_at LIMIT 50 FOR UPDATE SKIP LOCKED),
         touched AS (
             UPDATE payments.payments p SET updated_at = now() FROM due
             WHERE p.order_id = due.order_id
             RETURNING p.order_id, p.auth_id, p.amount, p.currency)
         SELECT t.order_id, t.auth_id, t.amount, t.currency, c.event
         FROM touched t JOIN edge.checkouts c USING (order_id)",
    )
    .bind(format!(
        "{} milliseconds",
        sweeper.webhook_grace.as_millis()
    ))
    .fetch_all(&sweeper.pool)
    .await?;
    for (order_id, auth_id, amount, currency, stored) in due {
        let theirs = match sweeper.providers.authorizations_for(order_id).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(%order_id, error = %e, "cannot read the provider's records of a pending payment");
                continue;
            }
        };
        let Some(held) = theirs.into_iter().find(|a| a.auth_id == auth_id) else {
            continue;
        };
        let (event_type, decline_code) = match held.status.as_str() {
            "authorized" | "captured" => (SUCCEEDED, None),
            "failed" | "declined" => (FAILED, Some("authentication_failed".to_owned())),
            _ => continue,
        };
        let Ok(Event::Requested { checkout }) = Event::decode(&stored) else {
            tracing::error!(%order_id, "stored checkout request does not decode");
            continue;
        };
        tracing::warn!(%order_id, %auth_id, status = %held.status, "the provider decided a payment whose webhook never came");
        let update = ProviderUpdate {
            provider: sweeper.providers.holder(&auth_id).to_owned(),
            event_id: format!("reconciled:{auth_id}:{}", held.status),
            event_type: event_type.to_owned(),
            auth_id,
            amount,
            currency: currency.trim().to_owned(),
            decline_code,
        };
        store_update(&sweeper.pool, order_id, &update).await?;
        let event = Event::ProviderUpdate {
            checkout: checkout.spent().for_the_bus(),
            update,
        };
        let out = Outgoing::new(&event, Some(&TraceParent::new_root()))
            .map_err(|e| StepError::permanent(e.to_string()))?;
        sweeper
            .bus
            .publish(&out)
            .await
            .map_err(|e| StepError::transient(e.to_string()))?;
    }
    Ok(())
}

/// Records a provider outcome as its webhook would have been (once per event id).
async fn store_update(
    pool: &sqlx::PgPool,
    order_id: Uuid,
    update: &ProviderUpdate,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments.provider_events
             (provider, event_id, order_id, event_type, auth_id, amount, currency, decline_code)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&update.provider)
    .bind(&update.event_id)
    .bind(order_id)
    .bind(&update.event_type)
    .bind(&update.auth_id)
    .bind(update.amount)
    .bind(&update.currency)
    .bind(&update.decline_code)
    .execute(pool)
    .await?;
    Ok(())
}

async fn expire_once(
    pool: &sqlx::PgPool,
    bus: &Bus,
    action_timeout: Duration,
) -> Result<(), StepError> {
    let due: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
        "WITH due AS MATERIALIZED (
             SELECT order_id FROM payments.payments
             WHERE status = 'pending' AND created_at < now() - $1::interval
             ORDER BY created_at LIMIT 100)
         SELECT due.order_id, c.event FROM due JOIN edge.checkouts c USING (order_id)",
    )
    .bind(format!("{} milliseconds", action_timeout.as_millis()))
    .fetch_all(pool)
    .await?;
    for (order_id, stored) in due {
        let Ok(Event::Requested { checkout }) = Event::decode(&stored) else {
            tracing::error!(%order_id, "stored checkout request does not decode");
            continue;
        };
        let event = Event::ActionExpired {
            checkout: checkout.spent().for_the_bus(),
        };
        let out = Outgoing::new(&event, Some(&TraceParent::new_root()))
            .map_err(|e| StepError::permanent(e.to_string()))?;
        bus.publish(&out)
            .await
            .map_err(|e| StepError::transient(e.to_string()))?;
    }
    Ok(())
}
