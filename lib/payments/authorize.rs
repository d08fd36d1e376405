//! The authorize step: hold the checkout's total at the provider, exactly once per order.
//!
//! Only an explicit decline is a decline. Provider trouble (timeouts, 5xx, 401/403/409/429)
//! is retried with the same idempotency key, and the order fails with `payment_unavailable`
//! only after `payments.max_attempts` failed calls spread over at least
//! `payments.retry_window`. Before failing an order whose outcome is unknown (we gave up, or
//! the provider refused the request itself), the provider's own records decide: an
//! authorization it holds for the order is ours and the checkout goes on with it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::provider::{AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderError};
use super::{idempotency_key, payment_id_for, PaymentStatus};
use crate::db::group::{Group, Writes};
use crate::db::Leases;
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::{self, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.reserved`, emits `checkout.authorized` or `checkout.declined`.
pub struct AuthorizeStep {
    /// The payments database: a lease for the look-up before the provider call, the pool for
    /// the cold paths (`claims` records through the same leases).
    pub leases: Leases,
    /// Records the payments, many orders per commit under load.
    pub claims: Group<Claims>,
    pub provider: Arc<dyn PaymentProvider>,
    /// Failed provider calls allowed per order (together with `retry_window`).
    pub max_attempts: i32,
    /// How long provider trouble is retried for one order (together with `max_attempts`).
    pub retry_window: Duration,
    /// Risk scores at or above this are refused (the authorization is voided).
    pub max_risk_score: u8,
    /// Opens the sealed payment token the edge put in the checkout.
    pub seal: Arc<super::token_seal::TokenSeal>,
    /// Fault injection: fail once after the provider answered, before committing.
    pub fail_after_provider_call: bool,
    /// The watchdog's `pending_limit`: only orders older than this are abandoned.
    pub pending_limit: Duration,
}

const DURABLE: &str = "authorize";

/// What the look before a redelivery's provider call found.
enum Looked {
    /// Handled before, or the order was abandoned: these events are the answer.
    Done(Vec<Event>),
    /// Go on to the provider; `failed_before`: an earlier call for this payment failed, so
    /// the breaker does not take another failure as news of the provider (it may have
    /// restarted and forgotten).
    Go { failed_before: bool },
}

/// What to record and emit.
enum Decision {
    Approved(String, Option<DateTime<Utc>>),
    Refused {
        status: PaymentStatus,
        auth_id: Option<String>,
        expires_at: Option<DateTime<Utc>>,
        code: String,
        reason: FailureReason,
    },
}

impl Step for AuthorizeStep {
    const DURABLE: &'static str = DURABLE;

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Reserved]
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Reserved { checkout, .. } = event else {
            return Err(StepError::permanent(format!(
                "authorize cannot handle {:?}",
                event.kind()
            )));
        };
        let table = InboxTable::Payments;
        let order_id = checkout.order_id;
        // The provider call cannot sit inside a transaction, so look first: a redelivery of
        // a handled event must not even reach the provider, nor may an abandoned order start
        // a payment. A young first delivery needs neither look: nothing handled it yet (a
        // handled message is acked, so its redelivery counts two or more), and only the
        // watchdog abandons payments, of orders older than `pending_limit` (half of it here,
        // for clocks that disagree). A replay under another message id still meets the
        // payment row and then the inbox below, after the provider, whose idempotency key
        // answers a repeated call as it answered the first.
        let young = delivery.delivered == 1
            && (Utc::now() - checkout.requested_at)
                .to_std()
                .is_ok_and(|age| age < self.pending_limit / 2);
        let mut failed_before = false;
        if !young {
            match self.look_first(&checkout, delivery).await? {
                Looked::Done(events) => return Ok(events),
                Looked::Go { failed_before: f } => failed_before = f,
            }
        }
        let decision = match self.seal.open(&checkout.payment_token) {
            Ok(token) => {
                let request = AuthorizeRequest {
                    order_id,
                    amount: checkout.total,
                    currency: checkout.currency.code().to_owned(),
                    token,
                    // Same key on every retry: the provider returns the first authorization
                    // again, so a crash between its answer and our commit never authorizes twice.
                    idempotency_key: idempotency_key(order_id, "authorize"),
                    failed_before,
                };
                self.decide(&request).await?
            }
            // Its key was dropped (or the token damaged): nobody can pay with it any more,
            // so the order fails like a declined card instead of retrying forever.
            Err(e) => {
                tracing::warn!(error = %e, "payment token cannot be opened");
                Decision::Refused {
                    status: PaymentStatus::Declined,
                    auth_id: None,
                    expires_at: None,
                    code: "token_unreadable".into(),
                    reason: FailureReason::PaymentDeclined,
                }
            }
        };
        if self.fail_after_provider_call && delivery.delivered == 1 {
            return Err(StepError::transient(
                "chaos: failing after the provider call",
            ));
        }
        let (record, outputs) = outcome(&checkout, decision, self.provider.name());
        let auth_id = record.auth_id.clone();
        let claim = Claim::new(&delivery.event_id, &outputs, &checkout, record)?;
        if self.claims.write(claim).await? {
            let flagged = outputs.iter().any(|e| {
                matches!(e, Event::Declined { reason, .. } if *reason == FailureReason::FraudSuspected)
            });
            if flagged {
                crate::metrics::fraud_flag();
            }
            return Ok(outputs);
        }
        if let Some(events) =
            inbox::lookup(self.leases.pool(), table, DURABLE, &delivery.event_id).await?
        {
            // A concurrent delivery, or the first handling of a replay, recorded first: emit
            // what it recorded, and give back a hold it does not hold.
            if let Some(auth_id) = auth_id.as_deref() {
                self.give_back_unrecorded(order_id, auth_id).await?;
            }
            return Ok(events);
        }
        // The order was abandoned while the provider was answering: give the hold back.
        if let Some(auth_id) = auth_id.as_deref() {
            match self
                .provider
                .void(auth_id, &idempotency_key(order_id, "void"))
                .await
            {
                Ok(()) => {
                    tracing::warn!(%auth_id, "voided an authorization that completed after the order was abandoned");
                }
                Err(ProviderError::Deferred(wait)) => return Err(StepError::RetryAfter(wait)),
                Err(ProviderError::Unavailable(e)) => {
                    return Err(StepError::transient(format!("void after abandonment: {e}")))
                }
                // The reconciler looks at abandoned payments again later.
                Err(ProviderError::Rejected(e)) => {
                    tracing::error!(%auth_id, error = %e, "the provider refused to void a late authorization");
                }
            }
        }
        let outputs = abandoned(checkout);
        Ok(inbox::record_alone(
            self.leases.pool(),
            table,
            DURABLE,
            &delivery.event_id,
            outputs,
        )
        .await?)
    }
}

impl AuthorizeStep {
    /// Voids `auth_id` unless it is the authorization the order's payment recorded. The
    /// provider answers a repeated call from its idempotency key, unless the first calls
    /// failed before it bound the key: then a replay after the order ended (with
    /// `payment_unavailable`) gets a new hold that nobody would capture or void. If the void
    /// cannot be made now, the reconciler is asked to look at the order's payment again.
    async fn give_back_unrecorded(&self, order_id: Uuid, auth_id: &str) -> Result<(), StepError> {
        let recorded: Option<Option<String>> =
            sqlx::query_scalar("SELECT auth_id FROM payments.payments WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(self.leases.pool())
                .await
                .map_err(StepError::transient)?;
        if recorded.flatten().as_deref() == Some(auth_id) {
            return Ok(());
        }
        let key = idempotency_key(order_id, &format!("void:{auth_id}"));
        match self.provider.void(auth_id, &key).await {
            Ok(()) => {
                tracing::warn!(%auth_id, "voided an authorization the order's payment does not hold");
            }
            Err(e) => {
                tracing::warn!(%auth_id, error = %e, "cannot void an authorization the order's payment does not hold; the reconciler will");
                sqlx::query(
                    "UPDATE payments.payments SET reconciled_at = NULL, updated_at = now()
                     WHERE order_id = $1 AND status IN ('failed', 'abandoned')",
                )
                .bind(order_id)
                .execute(self.leases.pool())
                .await
                .map_err(StepError::transient)?;
            }
        }
        Ok(())
    }

    /// What a delivery that may have been handled, or whose order may have been abandoned,
    /// must know before the provider is called (one round trip): the events it emitted then,
    /// or the abandonment's, or whether an earlier call for the payment failed.
    async fn look_first(
        &self,
        checkout: &Checkout,
        delivery: &Delivery,
    ) -> Result<Looked, StepError> {
        let table = InboxTable::Payments;
        let mut lease = self.leases.acquire().await.map_err(StepError::transient)?;
        let (handled, outputs, abandoned_already, failed_before): (
            bool,
            Option<Vec<u8>>,
            bool,
            bool,
        ) = sqlx::query_as(
            "SELECT i.event_id IS NOT NULL, i.outputs,
                        EXISTS (SELECT 1 FROM payments.payments
                                WHERE order_id = $3 AND status = 'abandoned'),
                        EXISTS (SELECT 1 FROM payments.attempts
                                WHERE order_id = $3 AND failures > 0)
                 FROM (SELECT 1) AS one
                 LEFT JOIN payments.inbox i ON i.consumer = $1 AND i.event_id = $2",
        )
        .bind(DURABLE)
        .bind(&delivery.event_id)
        .bind(checkout.order_id)
        .fetch_one(&mut *lease)
        .await
        .map_err(StepError::transient)?;
        lease.park();
        if let Some(events) = inbox::outputs_of(handled.then_some(outputs))? {
            return Ok(Looked::Done(events));
        }
        if abandoned_already {
            // The watchdog failed this order before its payment started: do not start one.
            let outputs = abandoned(checkout.clone());
            return Ok(Looked::Done(
                inbox::record_alone(
                    self.leases.pool(),
                    table,
                    DURABLE,
                    &delivery.event_id,
                    outputs,
                )
                .await?,
            ));
        }
        Ok(Looked::Go { failed_before })
    }

    /// Asks the provider and turns its answer into a decision, or into a retry.
    async fn decide(&self, request: &AuthorizeRequest) -> Result<Decision, StepError> {
        match self.provider.authorize(request).await {
            Ok(AuthorizeOutcome::Approved {
                auth_id,
                expires_at,
                risk_score,
            }) => match risk_score {
                Some(score) if score >= self.max_risk_score => {
                    tracing::warn!(
                        risk_score = score,
                        "fraud suspected; the authorization will be voided"
                    );
                    Ok(Decision::Refused {
                        status: PaymentStatus::Authorized,
                        auth_id: Some(auth_id),
                        expires_at,
                        code: "fraud_suspected".into(),
                        reason: FailureReason::FraudSuspected,
                    })
                }
                _ => Ok(Decision::Approved(auth_id, expires_at)),
            },
            Ok(AuthorizeOutcome::Declined { code }) => Ok(Decision::Refused {
                status: PaymentStatus::Declined,
                auth_id: None,
                expires_at: None,
                code,
                reason: FailureReason::PaymentDeclined,
            }),
            Err(ProviderError::Deferred(wait)) => Err(StepError::RetryAfter(wait)),
            Err(ProviderError::Unavailable(e)) => {
                let spent = record_failure(
                    self.leases.pool(),
                    request.order_id,
                    &e,
                    self.max_attempts,
                    self.retry_window,
                )
                .await?;
                if !spent {
                    return Err(StepError::transient(format!("provider unavailable: {e}")));
                }
                tracing::warn!(error = %e, "giving up on the provider for this order");
                self.settle_unknown(request.order_id, "payment_unavailable".into())
                    .await
            }
            Err(ProviderError::Rejected(e)) => {
                tracing::warn!(error = %e, "the provider refused the authorization request");
                let code = format!(
                    "provider_rejected: {}",
                    e.chars().take(200).collect::<String>()
                );
                self.settle_unknown(request.order_id, code).await
            }
        }
    }

    /// The outcome is unknown: the provider's records decide. An authorization it holds for
    /// the order is adopted; otherwise the order fails with `payment_unavailable`, recorded
    /// as `failed` so that the reconciler looks again later for one that completes late.
    async fn settle_unknown(&self, order_id: Uuid, code: String) -> Result<Decision, StepError> {
        let found = match self.provider.authorizations_for(order_id).await {
            Ok(found) => found,
            Err(ProviderError::Deferred(wait)) => return Err(StepError::RetryAfter(wait)),
            Err(e) => {
                return Err(StepError::transient(format!(
                    "cannot read the provider's records: {e}"
                )))
            }
        };
        if let Some(held) = found.into_iter().find(|a| a.status == "authorized") {
            tracing::warn!(auth_id = %held.auth_id, "adopting the authorization the provider holds");
            return Ok(Decision::Approved(held.auth_id, held.expires_at));
        }
        Ok(Decision::Refused {
            status: PaymentStatus::Failed,
            auth_id: None,
            expires_at: None,
            code,
            reason: FailureReason::PaymentUnavailable,
        })
    }
}

fn abandoned(checkout: Checkout) -> Vec<Event> {
    vec![Event::Declined {
        checkout: checkout.spent(),
        decline_code: "abandoned".into(),
        reason: FailureReason::TimedOut,
    }]
}

/// What the payments row records of the provider's answer.
struct PaymentRecord {
    provider: &'static str,
    status: PaymentStatus,
    auth_id: Option<String>,
    decline_code: Option<String>,
    expires_at: Option<DateTime<Utc>>,
}

fn outcome(
    checkout: &Checkout,
    decision: Decision,
    provider: &'static str,
) -> (PaymentRecord, Vec<Event>) {
    let payment_id = payment_id_for(checkout.order_id);
    match decision {
        Decision::Approved(auth_id, expires_at) => (
            PaymentRecord {
                provider,
                status: PaymentStatus::Authorized,
                auth_id: Some(auth_id.clone()),
                decline_code: None,
                expires_at,
            },
            vec![Event::Authorized {
                checkout: checkout.clone().spent(),
                payment_id,
                auth_id,
            }],
        ),
        Decision::Refused {
            status,
            auth_id,
            expires_at,
            code,
            reason,
        } => {
            tracing::info!(decline_code = %code, reason = reason.as_str(), "payment refused");
            (
                PaymentRecord {
                    provider,
                    status,
                    auth_id,
                    decline_code: Some(code.clone()),
                    expires_at,
                },
                vec![Event::Declined {
                    checkout: checkout.clone().spent(),
                    decline_code: code,
                    reason,
                }],
            )
        }
    }
}

/// A payment to record, with the event that claims it.
pub struct Claim {
    event_id: String,
    /// The events the claim emits, encoded for the inbox.
    outputs: Vec<u8>,
    order_id: Uuid,
    amount: rust_decimal::Decimal,
    currency: &'static str,
    record: PaymentRecord,
}

impl Claim {
    fn new(
        event_id: &str,
        outputs: &[Event],
        checkout: &Checkout,
        record: PaymentRecord,
    ) -> Result<Self, StepError> {
        Ok(Self {
            event_id: event_id.to_owned(),
            outputs: rmp_serde::to_vec_named(outputs)
                .map_err(|e| StepError::refused("outputs do not encode", e))?,
            order_id: checkout.order_id,
            amount: checkout.total,
            currency: checkout.currency.code(),
            record,
        })
    }
}

/// Records payments and claims their events, many orders per statement ([`Group`]). A claim
/// is answered false, with no effect, if its order already has a payment row: a concurrent
/// delivery recorded first, or the order was abandoned.
pub struct Claims;

impl Writes for Claims {
    type Row = Claim;
    type Answer = bool;
    type Key = Uuid;

    fn key(row: &Claim) -> Uuid {
        row.order_id
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        rows: &[Claim],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let claimed: Vec<String> = sqlx::query_scalar(
            "WITH r AS (
                 SELECT * FROM unnest($2::text[], $3::bytea[], $4::uuid[], $5::uuid[], $6::text[],
                                      $7::text[], $8::text[], $9::numeric[], $10::text[],
                                      $11::text[], $12::timestamptz[])
                     AS r(event_id, outputs, payment_id, order_id, provider, status, auth_id,
                          amount, currency, decline_code, expires_at)),
             p AS (
                 INSERT INTO payments.payments
                     (payment_id, order_id, provider, status, auth_id, amount, currency, decline_code, expires_at)
                 SELECT payment_id, order_id, provider, status, auth_id, amount, currency,
                        decline_code, expires_at FROM r
                 ON CONFLICT (order_id) DO NOTHING RETURNING order_id),
             c AS (
                 INSERT INTO payments.inbox (consumer, event_id, outputs)
                 SELECT $1, r.event_id, r.outputs FROM r JOIN p USING (order_id)
                 ON CONFLICT DO NOTHING RETURNING event_id)
             SELECT event_id FROM c",
        )
        .bind(DURABLE)
        .bind(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outputs.as_slice()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| payment_id_for(r.order_id)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record.provider).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record.status.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record.auth_id.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.amount).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.currency).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record.decline_code.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.record.expires_at).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows.iter().map(|r| claimed.contains(&r.event_id)).collect())
    }
}

/// Counts a failed provider call; true once the order's retry budget is spent (at least
/// `max_attempts` failures and at least `window` since the first).
async fn record_failure(
    pool: &PgPool,
    order_id: Uuid,
    error: &str,
    max_attempts: i32,
    window: Duration,
) -> Result<bool, sqlx::Error> {
    let (spent,): (bool,) = sqlx::query_as(
        "INSERT INTO payments.attempts (order_id, failures, last_error) VALUES ($1, 1, $2)
         ON CONFLICT (order_id) DO UPDATE SET failures = payments.attempts.failures + 1,
             last_error = EXCLUDED.last_error, updated_at = now()
         RETURNING failures >= $3 AND now() - first_failed_at >= $4::interval",
    )
    .bind(order_id)
    .bind(error.chars().take(500).collect::<String>())
    .bind(max_attempts)
    .bind(format!("{} milliseconds", window.as_millis()))
    .fetch_one(pool)
    .await?;
    Ok(spent)
}
